"""A full disk: the data root on a small tmpfs. The task fails with a clear message; the
published index and the catalog are left exactly as they were; nothing half-written remains."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsim.config import Settings
from imgsim.fsutil import TMP_PREFIX, DiskFull
from imgsim.index import pipeline
from imgsim.query.lookup import load_model
from imgsim.versions import models
from test_models import build_version, make_ids, validate

VERSION = "v20260101T000000Z-0000d1"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI and the dev machines run as root)")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem of ``path`` until only about ``leave`` bytes are free."""
    filler = path / "filler.bin"
    with open(filler, "wb") as fh:
        chunk = b"\0" * 65536
        try:
            while True:
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_full_disk_fails_clearly_and_keeps_the_index(small_disk: Path, tmp_path: Path) -> None:
    settings = Settings(data_root=small_disk / "data", shard_size=100)
    layout = settings.layout
    ids = make_ids(8)
    build_version(layout.staging, VERSION, ids)
    validate(layout, VERSION, ids, recall_floor=0.5)
    models.publish(layout, VERSION)
    rng = np.random.default_rng(5)
    (layout.images / "car_ims").mkdir(parents=True)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(
            layout.images / "car_ims" / f"{i:05d}.jpg", quality=95
        )
    labels = tmp_path / "labels.csv"
    labels.write_text("Class,image\n" + "".join(f"2,{i:05d}.jpg\n" for i in range(40)))
    cat = pipeline.catalog(
        settings, str(layout.images / "car_ims"), str(labels), "2026-01-02", "run2", "random"
    )
    (shard,) = pipeline.plan_shards(settings, cat["to_embed_file"], "run2")
    catalog_before = layout.catalog.read_bytes()
    current_before = layout.current_pointer.read_bytes()

    filler = fill(small_disk, leave=40_000)
    with pytest.raises(DiskFull, match="no space left on the device while writing"):
        pipeline.embed_shard(settings, shard["spec"], "random")

    assert layout.current_pointer.read_bytes() == current_before
    assert layout.catalog.read_bytes() == catalog_before
    assert load_model(layout).version == VERSION  # the index still loads whole
    assert not [p for p in layout.root.rglob(f"{TMP_PREFIX}*")]
    assert not list(layout.embeddings("random").glob("part-*.parquet"))
    # With space again, the same task completes.
    filler.unlink()
    out = pipeline.embed_shard(settings, shard["spec"], "random")
    assert out["embedded"] == 40
