"""Decoding of untrusted image files: every bad input is built here, in tmp_path, with PIL/bytes.

Each case asserts the exact outcome: an RGB 8-bit image with the expected size and pixels, or
:class:`ImageRejected` with the expected ``reason``.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from imgsim.fsutil import TMP_PREFIX
from imgsim.imaging import (
    THUMB_SIZE,
    DecodedImage,
    ImageRejected,
    load_rgb,
    resize_square,
    save_thumbnail,
)

WHITE = (255, 255, 255)


# --- helpers ----------------------------------------------------------------------------------


def _noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(im: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A ~70-byte valid-looking PNG whose IHDR declares ``width`` x ``height`` (8-bit grey)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _rejected(path: Path, **kwargs: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        load_rgb(path, **kwargs)  # type: ignore[arg-type]
    return info.value


def _assert_rgb8(decoded: DecodedImage, size: tuple[int, int]) -> np.ndarray:
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == size
    arr = np.asarray(decoded.image)
    assert arr.dtype == np.uint8
    assert arr.shape == (size[1], size[0], 3)
    return arr


# --- rejections -------------------------------------------------------------------------------


def test_zero_byte_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    exc = _rejected(path)
    assert exc.reason == "empty"
    assert exc.path == str(path)
    assert str(path) in str(exc)


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    assert _rejected(tmp_path / "nope.jpg").reason == "unreadable"


@pytest.mark.parametrize("draft_size", [(THUMB_SIZE, THUMB_SIZE), None])
def test_truncated_jpeg_is_corrupt(tmp_path: Path, draft_size: tuple[int, int] | None) -> None:
    # PIL can decode a truncated JPEG partially (grey bottom) when LOAD_TRUNCATED_IMAGES is set;
    # imaging must keep it off and turn load()'s OSError into a rejection.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    data = _jpeg_bytes(_noise_rgb(300, 200), quality=90)
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: int(len(data) * 0.4)])
    with Image.open(path) as im:  # the header alone still parses
        assert im.size == (300, 200)
    exc = _rejected(path, draft_size=draft_size)
    assert exc.reason == "corrupt"
    assert "truncated" in exc.detail


def test_truncated_png_is_corrupt(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _noise_rgb(300, 200).save(buf, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 4 // 10])
    assert _rejected(path).reason == "corrupt"


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG, just some text\n" * 20)
    assert _rejected(path).reason == "not_an_image"


def test_max_pixels_limit_is_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (1, 2, 3)).save(path)
    exc = _rejected(path, max_pixels=5000)
    assert exc.reason == "too_large"
    assert "100x100" in exc.detail
    # the same file within the limit decodes
    _assert_rgb8(load_rgb(path, max_pixels=10_000), (100, 100))


def test_header_declaring_huge_image_is_refused_without_decoding(tmp_path: Path) -> None:
    # 20000x20000 = 4e8 pixels, far above the default limit: refused from the header alone.
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 20_000))
    assert path.stat().st_size < 200
    exc = _rejected(path)
    assert exc.reason == "too_large"
    assert "400000000" in exc.detail
    # with a limit below PIL's own, PIL refuses it first (2 x its limit) as a bomb
    exc = _rejected(path, max_pixels=1_000_000)
    assert exc.reason == "decompression_bomb" and "400000000" in exc.detail


def test_load_rgb_leaves_pils_global_limit_alone(tmp_path: Path) -> None:
    """Regression: load_rgb raised PIL's process-wide MAX_IMAGE_PIXELS to its own limit, which
    changed it for every other user of PIL in the process (the API server)."""
    before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "big-ok.png"
    path.write_bytes(_png_header_only(9500, 9450))  # above PIL's default, below ours
    for limit in (before * 3, 90_000_000):
        with pytest.raises(ImageRejected):
            load_rgb(path, max_pixels=limit)
        assert before == Image.MAX_IMAGE_PIXELS
    ok = tmp_path / "ok.jpg"
    Image.new("RGB", (64, 48), (1, 2, 3)).save(ok)
    _assert_rgb8(load_rgb(ok, max_pixels=before * 3), (64, 48))
    assert before == Image.MAX_IMAGE_PIXELS


def test_a_limit_above_twice_pils_is_honoured_without_a_global_change(tmp_path: Path) -> None:
    # 14000x14000 = 1.96e8 pixels > 2 x PIL's default: PIL alone would refuse it as a bomb.
    path = tmp_path / "huge-ok.png"
    path.write_bytes(_png_header_only(14_000, 14_000))
    before = Image.MAX_IMAGE_PIXELS
    exc = _rejected(path, max_pixels=200_000_000)
    assert exc.reason == "corrupt"  # past every size check; a header-only file has no data
    assert before == Image.MAX_IMAGE_PIXELS


def test_an_unreadable_file_under_a_loose_limit_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not an image at all")
    exc = _rejected(path, max_pixels=500_000_000)
    assert exc.reason == "not_an_image"


def test_header_above_the_limit_is_refused_without_decoding(tmp_path: Path) -> None:
    # 10000x10000 = 1e8 pixels: above the default limit (9e7) but below twice it, where PIL
    # only warns. imaging checks the header itself, so the image is refused before decoding.
    path = tmp_path / "bomb-warn.png"
    path.write_bytes(_png_header_only(10_000, 10_000))
    exc = _rejected(path)
    assert exc.reason == "too_large"
    assert "10000x10000" in exc.detail


def test_limit_above_pils_default_is_honoured(tmp_path: Path) -> None:
    # 9500x9450 = 89.8M pixels: above PIL's default 89.48M, below the configured limit.
    path = tmp_path / "big-ok.png"
    path.write_bytes(_png_header_only(9500, 9450))
    exc = _rejected(path, max_pixels=90_000_000)
    assert exc.reason == "corrupt"  # past the size checks; a header-only file has no data


def test_header_huge_but_below_pil_limit_hits_max_pixels(tmp_path: Path) -> None:
    path = tmp_path / "big-header.png"
    path.write_bytes(_png_header_only(5000, 5000))  # 2.5e7 pixels: PIL is fine with it
    exc = _rejected(path, max_pixels=1_000_000)
    assert exc.reason == "too_large"
    assert "5000x5000" in exc.detail


@pytest.mark.parametrize("size", [(4, 4), (7, 100), (100, 7)])
def test_tiny_image_is_too_small(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "tiny.png"
    Image.new("RGB", size, (9, 9, 9)).save(path)
    assert _rejected(path).reason == "too_small"


def test_smallest_accepted_image_is_8x8(tmp_path: Path) -> None:
    path = tmp_path / "eight.png"
    Image.new("RGB", (8, 8), (9, 8, 7)).save(path)
    arr = _assert_rgb8(load_rgb(path), (8, 8))
    assert (arr == (9, 8, 7)).all()


# --- conversions ------------------------------------------------------------------------------


def test_png_bytes_with_jpg_extension_decode(tmp_path: Path) -> None:
    path = tmp_path / "actually-a-png.jpg"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(path, format="PNG")
    decoded = load_rgb(path)
    assert decoded.format == "PNG"
    assert decoded.original_size == (30, 20)
    arr = _assert_rgb8(decoded, (30, 20))
    assert (arr == (10, 200, 30)).all()


def test_rgb_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "plain.jpg"
    Image.new("RGB", (40, 30), (200, 100, 50)).save(path, quality=95)
    decoded = load_rgb(path)
    assert (decoded.format, decoded.original_mode) == ("JPEG", "RGB")
    arr = _assert_rgb8(decoded, (40, 30))
    assert np.abs(arr.astype(int) - (200, 100, 50)).max() <= 3


def test_grayscale_l(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (20, 10), 77).save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode == "L"
    assert (_assert_rgb8(decoded, (20, 10)) == 77).all()


def test_grayscale_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "grey.jpg"
    Image.new("L", (20, 10), 120).save(path, quality=95)
    decoded = load_rgb(path)
    assert decoded.original_mode == "L"
    arr = _assert_rgb8(decoded, (20, 10)).astype(int)
    assert np.abs(arr - 120).max() <= 2
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_bilevel_mode_1(tmp_path: Path) -> None:
    path = tmp_path / "bw.png"
    im = Image.new("1", (20, 10), 1)
    im.putpixel((0, 0), 0)
    im.save(path)
    arr = _assert_rgb8(load_rgb(path), (20, 10))
    assert tuple(arr[0, 0]) == (0, 0, 0)
    assert tuple(arr[9, 19]) == WHITE


def test_grayscale_alpha_la_composited_on_white(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    im = Image.new("LA", (20, 10), (77, 255))
    im.putpixel((0, 0), (0, 0))  # fully transparent black
    im.putpixel((1, 0), (0, 128))  # half-transparent black
    im.save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode == "LA"
    arr = _assert_rgb8(decoded, (20, 10)).astype(int)
    assert tuple(arr[0, 0]) == WHITE
    assert np.abs(arr[0, 1] - 127).max() <= 1
    assert tuple(arr[5, 5]) == (77, 77, 77)


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    path = tmp_path / "rgba.png"
    im = Image.new("RGBA", (20, 10), (10, 20, 30, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((19, 9), (255, 0, 0, 0))  # transparent red is white too, not red
    im.save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode == "RGBA"
    arr = _assert_rgb8(decoded, (20, 10))
    assert tuple(arr[0, 0]) == WHITE
    assert tuple(arr[9, 19]) == WHITE
    assert tuple(arr[5, 5]) == (10, 20, 30)


def test_rgba_webp_is_composited(tmp_path: Path) -> None:
    path = tmp_path / "clear.webp"
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)).save(path, lossless=True)
    decoded = load_rgb(path)
    assert decoded.format == "WEBP"
    assert (_assert_rgb8(decoded, (20, 10)) == 255).all()


def _palette_image() -> Image.Image:
    im = Image.new("P", (20, 10), 1)
    im.putpalette([0, 0, 0, 200, 10, 10, 5, 6, 7] + [0, 0, 0] * 253)
    im.putpixel((0, 0), 2)
    return im


def test_palette_without_transparency(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    _palette_image().save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode == "P"
    arr = _assert_rgb8(decoded, (20, 10))
    assert tuple(arr[0, 0]) == (5, 6, 7)
    assert tuple(arr[5, 5]) == (200, 10, 10)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"pt.{fmt.lower()}"
    _palette_image().save(path, format=fmt, transparency=2)
    decoded = load_rgb(path)
    assert decoded.original_mode == "P"
    arr = _assert_rgb8(decoded, (20, 10))
    assert tuple(arr[0, 0]) == WHITE  # the transparent index
    assert tuple(arr[5, 5]) == (200, 10, 10)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    decoded = load_rgb(path)
    assert (decoded.format, decoded.original_mode) == ("JPEG", "CMYK")
    arr = _assert_rgb8(decoded, (20, 10)).astype(int)
    assert np.abs(arr - (255, 0, 0)).max() <= 3


def test_16bit_png_scaled_to_8bit_range(tmp_path: Path) -> None:
    path = tmp_path / "i16.png"
    values = np.linspace(1000, 3000, 200).reshape(10, 20).astype(np.uint16)
    Image.fromarray(values).save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode.startswith("I")
    arr = _assert_rgb8(decoded, (20, 10))
    assert arr.min() == 0 and arr.max() == 255  # stretched, not clipped to 255
    assert tuple(arr[0, 0]) == (0, 0, 0) and tuple(arr[9, 19]) == WHITE
    mid = arr[..., 0].astype(float)
    assert np.all(np.diff(mid.ravel()) >= 0)  # monotone, like the input ramp
    expected = (values.astype(float) - 1000) * 255 / 2000
    assert np.abs(mid - expected).max() <= 0.5 + 1e-9


def test_16bit_constant_png_does_not_divide_by_zero(tmp_path: Path) -> None:
    path = tmp_path / "flat16.png"
    Image.fromarray(np.full((10, 20), 4000, dtype=np.uint16)).save(path)
    arr = _assert_rgb8(load_rgb(path), (20, 10))
    assert (arr == 0).all()


def test_32bit_int_tiff_scaled(tmp_path: Path) -> None:
    path = tmp_path / "i32.tif"
    Image.fromarray(np.linspace(-5, 70_000, 200).reshape(10, 20).astype(np.int32)).save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode == "I"
    arr = _assert_rgb8(decoded, (20, 10))
    assert (arr.min(), arr.max()) == (0, 255)


def test_float_tiff_scaled(tmp_path: Path) -> None:
    # mode F (e.g. 0..1 scientific images) must be stretched like I;16, not truncated to 0/1
    path = tmp_path / "f32.tif"
    Image.fromarray(np.linspace(0.0, 1.0, 200).reshape(10, 20).astype(np.float32)).save(path)
    decoded = load_rgb(path)
    assert decoded.original_mode == "F"
    arr = _assert_rgb8(decoded, (20, 10))
    assert (arr.min(), arr.max()) == (0, 255)
    assert len(np.unique(arr[..., 0])) > 100


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    im = Image.new("RGB", (60, 40), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 10))  # blue marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(path, exif=exif, quality=95)
    decoded = load_rgb(path)
    assert decoded.original_size == (60, 40)
    arr = _assert_rgb8(decoded, (40, 60)).astype(int)
    assert np.abs(arr[3, 36] - (0, 0, 255)).max() <= 10  # marker now at the top-right
    assert np.abs(arr[3, 3] - (255, 0, 0)).max() <= 10
    assert np.abs(arr[56, 3] - (255, 0, 0)).max() <= 10


def test_exif_orientation_1_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "upright.jpg"
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.new("RGB", (60, 40), (0, 255, 0)).save(path, exif=exif)
    _assert_rgb8(load_rgb(path), (60, 40))


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_draft_mode_decodes_smaller_but_not_below_target(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"large-{mode}.jpg"
    fill = {"RGB": (30, 140, 220), "L": 100, "CMYK": (0, 0, 0, 0)}[mode]
    Image.new(mode, (1600, 1200), fill).save(path, quality=90)
    decoded = load_rgb(path, draft_size=(THUMB_SIZE, THUMB_SIZE))
    assert decoded.original_size == (1600, 1200)
    assert decoded.original_mode == mode
    w, h = decoded.image.size
    assert decoded.image.mode == "RGB"
    assert w < 1600 and h < 1200
    assert w >= THUMB_SIZE and h >= THUMB_SIZE
    assert w * 3 == h * 4  # aspect ratio kept
    full = load_rgb(path, draft_size=None)
    assert full.image.size == (1600, 1200)


def test_draft_mode_is_not_used_for_png(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    Image.new("RGB", (1000, 800), (1, 2, 3)).save(path)
    assert load_rgb(path).image.size == (1000, 800)


def test_returned_image_is_usable_after_the_file_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "gone.jpg"
    path.write_bytes(_jpeg_bytes(_noise_rgb(64, 48)))
    decoded = load_rgb(path)
    path.unlink()
    assert np.asarray(resize_square(decoded.image)).shape == (THUMB_SIZE, THUMB_SIZE, 3)


# --- resize and thumbnails --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 200), (50, 400), (224, 224), (1000, 1000)])
def test_resize_square_returns_224(size: tuple[int, int]) -> None:
    im = Image.new("RGB", size, (12, 34, 56))
    out = resize_square(im)
    assert out.size == (THUMB_SIZE, THUMB_SIZE)
    assert out.mode == "RGB"
    assert (np.asarray(out) == (12, 34, 56)).all()


def test_resize_square_other_size_and_content() -> None:
    im = Image.new("RGB", (200, 100), (0, 0, 0))
    im.paste((255, 255, 255), (100, 0, 200, 100))  # right half white
    out = np.asarray(resize_square(im, 64))
    assert out.shape == (64, 64, 3)
    assert (out[:, :28] == 0).all() and (out[:, 36:] == 255).all()


def test_save_thumbnail_writes_jpeg_atomically(tmp_path: Path) -> None:
    target = tmp_path / "thumbs" / "car-1.jpg"  # parent is created
    save_thumbnail(resize_square(_noise_rgb(300, 200)), target)
    with Image.open(target) as im:
        assert im.format == "JPEG"
        assert im.size == (THUMB_SIZE, THUMB_SIZE)
        assert im.mode == "RGB"
    assert [p.name for p in target.parent.iterdir()] == ["car-1.jpg"]

    save_thumbnail(Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (0, 255, 0)), target)  # replace
    with Image.open(target) as im:
        assert np.abs(np.asarray(im).astype(int) - (0, 255, 0)).max() <= 3
    assert [p.name for p in target.parent.iterdir()] == ["car-1.jpg"]


def test_save_thumbnail_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "car-2.jpg"
    save_thumbnail(Image.new("RGB", (16, 16), (1, 2, 3)), target)
    before = target.read_bytes()
    with pytest.raises(OSError):  # JPEG cannot store RGBA
        save_thumbnail(Image.new("RGBA", (16, 16)), target)
    assert target.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert [p.name for p in tmp_path.iterdir()] == ["car-2.jpg"]


# --- real photos ------------------------------------------------------------------------------


def test_real_sample_photos_decode(sample_dir: Path) -> None:
    paths = sorted((sample_dir / "images").glob("*.jpg"))[:20]
    assert len(paths) == 20
    for path in paths:
        decoded = load_rgb(path)
        assert decoded.format == "JPEG"
        assert decoded.image.mode == "RGB"
        assert decoded.image.size == decoded.original_size == (224, 224)
