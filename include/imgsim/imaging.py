"""Decoding and resizing of untrusted image files.

Every image is opened with a pixel limit (decompression bombs are refused, not decoded),
EXIF orientation is applied, any mode (L, LA, P, CMYK, I;16, RGBA ...) is converted to RGB,
and JPEGs are decoded in draft mode (DCT scaling) when the target is much smaller than the file.
PIL is imported lazily so this module is cheap to import from DAG files.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from imgsim.config import setting_default

if TYPE_CHECKING:
    from PIL.Image import Image
    from PIL.ImageFile import ImageFile

log = logging.getLogger(__name__)

THUMB_SIZE = 224


class ImageRejected(ValueError):
    """An input that cannot be used as an image; ``reason`` is a short machine-readable code."""

    def __init__(self, path: str | Path, reason: str, detail: str, transient: bool = False) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        # True for a read error of the file system (EIO, a vanished NFS handle, EACCES...):
        # trying again later may work, so the image is not quarantined
        self.transient = transient


#: Rejection reasons decided by IMGSIM_MAX_IMAGE_PIXELS: a larger limit re-admits the image.
SIZE_REASONS = frozenset({"too_large", "decompression_bomb"})


@dataclass(frozen=True)
class DecodedImage:
    image: Image  # RGB, EXIF-transposed, possibly draft-downscaled
    original_size: tuple[int, int]
    original_mode: str
    format: str


def load_rgb(
    path: str | Path,
    *,
    max_pixels: int = setting_default("max_image_pixels"),
    draft_size: tuple[int, int] | None = (THUMB_SIZE, THUMB_SIZE),
) -> DecodedImage:
    """Decode ``path`` into an RGB image, or raise :class:`ImageRejected` with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageRejected(p, "unreadable", str(exc), transient=True) from exc
    if size == 0:
        raise ImageRejected(p, "empty", "the file has 0 bytes")
    try:
        with _open_image(p, max_pixels) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageRejected(
                    p,
                    "too_large",
                    f"{width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels} (IMGSIM_MAX_IMAGE_PIXELS)",
                )
            if width < 8 or height < 8:
                raise ImageRejected(p, "too_small", f"{width}x{height} is below 8x8 pixels")
            fmt = im.format or "unknown"
            mode = im.mode
            if draft_size is not None and fmt == "JPEG" and mode in ("RGB", "L", "CMYK"):
                # DCT-domain downscaling: decodes at >= draft_size, 2-4x faster for photos.
                im.draft("RGB" if mode != "CMYK" else "CMYK", draft_size)
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im))
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(p, "decompression_bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(p, "not_an_image", "not a recognised image format") from exc
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the decoder's
            raise ImageRejected(p, "unreadable", str(exc), transient=True) from exc
        raise ImageRejected(p, "corrupt", f"{type(exc).__name__}: {exc}") from exc
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(p, "corrupt", f"{type(exc).__name__}: {exc}") from exc
    return DecodedImage(rgb, (width, height), mode, fmt)


def _open_image(path: Path, max_pixels: int) -> ImageFile:
    """Open ``path`` lazily (header only), without touching PIL's process-wide settings.

    PIL warns above its global ``Image.MAX_IMAGE_PIXELS`` and refuses above twice that. Our own
    limit is checked from the header right after open, before any pixel is decoded. When it is
    no looser than PIL's, :func:`PIL.Image.open` is used as is; when it is looser, the format
    plugins registered with PIL open the file directly (what ``Image.open`` does, minus its
    global check), so the server's other users of PIL keep PIL's limit.
    """
    from PIL import Image, UnidentifiedImageError

    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None or max_pixels <= pil_limit:
        return Image.open(path)
    fh = open(path, "rb")  # noqa: SIM115 - owned by the returned image (closed with it)
    try:
        prefix = fh.read(16)
        Image.preinit()
        for registry_complete in (False, True):
            if registry_complete:
                Image.init()
            for fmt in list(Image.ID):
                factory, accept = Image.OPEN[fmt]
                accepted = accept(prefix) if accept is not None else True
                if not accepted or isinstance(accepted, str):  # str: known, but unreadable
                    continue
                fh.seek(0)
                try:
                    im = factory(fh, str(path))
                except (SyntaxError, IndexError, TypeError, struct.error):
                    continue
                im._exclusive_fp = True  # closing the image closes the file
                return im
        raise UnidentifiedImageError(f"cannot identify image file {str(path)!r}")
    except BaseException:
        fh.close()
        raise


def _to_rgb(im: Image) -> Image:
    from PIL import Image as PILImage

    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = PILImage.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit integer or float greyscale: scale to 8 bits by the image's own range.
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return PILImage.fromarray(scaled.round().astype("uint8"), "L").convert("RGB")
    return im.convert("RGB")


def resize_square(im: Image, size: int = THUMB_SIZE) -> Image:
    """Resize to ``size`` x ``size`` (the reference pipeline's 224x224, aspect not kept)."""
    from PIL import Image as PILImage

    if im.size == (size, size):
        return im
    return im.resize((size, size), PILImage.Resampling.BILINEAR, reducing_gap=3.0)


#: Every backbone embeds the thumbnail, so the file is kept close to it: JPEG quality 97
#: without chroma subsampling (26.8 KB a thumbnail of the sample photos against 15.2 KB at
#: quality 90 4:2:0). Queried thumbnails of the 24 drawn demo cars (efficientnet_lite0) then
#: find their own photo first 24 times, against 22 at quality 90 and 23 at quality 95.
THUMB_JPEG = {"quality": 97, "subsampling": 0}


def save_thumbnail(im: Image, path: Path) -> None:
    """Write a JPEG thumbnail atomically (kept for display in results, and downloadable)."""
    from imgsim.fsutil import atomic_open

    with atomic_open(path, "wb") as fh:
        im.save(fh, format="JPEG", **THUMB_JPEG)


# -- drawn test images (the demo archive, the ONNX int8 calibration set) -------------------

DEMO_CLASSES = [
    "Synthetic Red Sedan",
    "Synthetic Blue Coupe",
    "Synthetic Green SUV",
    "Synthetic Yellow Cab",
    "Synthetic Black Van",
    "Synthetic White Pickup",
]
COLOURS = [
    (200, 30, 30),
    (30, 60, 200),
    (40, 150, 60),
    (230, 200, 30),
    (25, 25, 25),
    (235, 235, 235),
]


def synthetic_car(class_index: int, variant: int, size: tuple[int, int] = (480, 320)) -> bytes:
    """A drawn 'car' (body, cabin, wheels) labelled SYNTHETIC, as JPEG bytes. Deterministic."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(class_index * 1000 + variant)
    w, h = size
    sky = tuple(rng.randint(150, 220) for _ in range(3))
    im = Image.new("RGB", size, sky)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, int(h * 0.72), w, h], fill=(90, 90, 90))
    colour = COLOURS[class_index % len(COLOURS)]
    x0 = rng.randint(20, 80)
    length = int(w * (0.55 + 0.1 * (class_index % 3)))
    body_top = int(h * (0.42 - 0.06 * (class_index % 2)))
    draw.rectangle([x0, body_top, x0 + length, int(h * 0.7)], fill=colour)
    cabin = [x0 + length // 5, body_top - int(h * 0.16), x0 + int(length * 0.7), body_top]
    draw.rectangle(cabin, fill=tuple(max(0, c - 40) for c in colour))  # type: ignore[arg-type]
    r = int(h * 0.09)
    for cx in (x0 + length // 5, x0 + int(length * 0.8)):
        draw.ellipse([cx - r, int(h * 0.7) - r, cx + r, int(h * 0.7) + r], fill=(10, 10, 10))
    draw.text((10, 10), f"SYNTHETIC {DEMO_CLASSES[class_index]} #{variant}", fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()
