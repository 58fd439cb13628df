"""The copy verifier (imgsim.ann.copies): the same photo in other bytes, or two photos."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from conftest import require_sample
from imgsim.ann.copies import MIN_INLIERS, CopyVerifier, verify_pairs
from imgsim.imaging import load_rgb, resize_square, save_thumbnail


def thumbnail(img: Image.Image, path: Path) -> Path:
    """The 224x224 thumbnail the index stores for ``img``."""
    src = path.with_suffix(".png")
    img.save(src)
    save_thumbnail(resize_square(load_rgb(src).image), path)
    return path


def sample_photos(n: int) -> list[Path]:
    sample = require_sample()
    return sorted((sample / "images").rglob("*.jpg"))[:: 1960 // n][:n]


def test_copies_are_the_same_photo_and_two_photos_are_not(tmp_path: Path) -> None:
    photos = sample_photos(6)
    verifier = CopyVerifier()
    for k, photo in enumerate(photos[:3]):
        img = Image.open(photo).convert("RGB")
        w, h = img.size
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=40)
        variants = {
            "jpeg40": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "flip": ImageOps.mirror(img),
            "crop90": img.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
        }
        original = thumbnail(img, tmp_path / f"o{k}.jpg")
        for name, copy in variants.items():
            score = verifier.score(original, thumbnail(copy, tmp_path / f"c{k}-{name}.jpg"))
            assert score.same(), (photo.name, name, score)
            assert score.mirrored == (name == "flip")
    others = [
        thumbnail(Image.open(p).convert("RGB"), tmp_path / f"x{i}.jpg")
        for i, p in enumerate(photos)
    ]
    for a, b in itertools.pairwise(others):
        assert verifier.score(a, b).inliers < MIN_INLIERS // 2


def test_a_missing_thumbnail_cannot_be_verified(tmp_path: Path) -> None:
    photo = thumbnail(Image.open(sample_photos(1)[0]).convert("RGB"), tmp_path / "a.jpg")
    got = verify_pairs([("a", "a"), ("a", "gone")], lambda i: tmp_path / f"{i}.jpg")
    assert got[0] is not None and got[0].same() and got[1] is None
    assert photo.exists()


@pytest.mark.parametrize("min_inliers", [1, 10_000])
def test_the_threshold_decides(tmp_path: Path, min_inliers: int) -> None:
    photo = thumbnail(Image.open(sample_photos(1)[0]).convert("RGB"), tmp_path / "a.jpg")
    assert CopyVerifier(min_inliers).same(photo, photo) == (min_inliers == 1)
