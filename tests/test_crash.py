"""Crash safety: SIGKILL in the middle of an embedding shard, the Spark fit and publishing.

After each kill the state is either the old one or the new one (never a mix), CURRENT names a
complete, validated version (or nothing, before the first publish), and a re-run completes
with no duplicate and no missing image id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsim.config import Settings
from imgsim.fsutil import TMP_PREFIX, read_json
from imgsim.index import pipeline
from imgsim.store import embedded_ids, shard_files
from imgsim.versions import models
from jobargs import fit_argv
from test_fit_job import make_store
from test_models import build_version, make_ids, validate

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]


def spawn(code: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_when(proc: subprocess.Popen[str], condition, timeout: float = 120.0) -> None:
    """SIGKILL the process group as soon as ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the kill point:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def photos(folder: Path, n: int) -> None:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=90
        )


def test_sigkill_during_an_embedding_shard(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path / "data", shard_size=10_000, batch_size=8)
    layout = settings.layout
    photos(layout.images / "car_ims", 240)
    labels = tmp_path / "labels.csv"
    labels.write_text("Class,image\n" + "".join(f"1,{i:05d}.jpg\n" for i in range(240)))
    cat = pipeline.catalog(
        settings, str(layout.images / "car_ims"), str(labels), "2026-01-01", "run1", "random"
    )
    (shard,) = pipeline.plan_shards(settings, cat["to_embed_file"], "run1")
    proc = spawn(f"""
        from pathlib import Path
        from imgsim.index import pipeline
        from imgsim.config import Settings
        s = Settings(data_root=Path({str(layout.root)!r}), batch_size=8)
        pipeline.embed_shard(s, {shard["spec"]!r}, "random")
    """)
    # Killed once a third of the thumbnails exist: inference is under way, the shard unwritten.
    kill_when(proc, lambda: len(list(layout.thumbs.glob("*.jpg"))) >= 80)
    assert shard_files(layout, "random") == []  # no half-written shard is visible
    assert embedded_ids(layout, "random") == set()
    # The re-run (same run, same shard) completes; running it once more duplicates nothing.
    pipeline.embed_shard(settings, shard["spec"], "random")
    pipeline.embed_shard(settings, shard["spec"], "random")
    (only,) = shard_files(layout, "random")
    import pyarrow.parquet as pq

    ids = pq.read_table(only, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 240
    assert set(ids) == {it["image_id"] for it in read_json(cat["to_embed_file"])}


@pytest.mark.spark
def test_sigkill_during_the_spark_fit(tmp_path: Path) -> None:
    from imgsim.envsetup import embedded_environment

    layout = make_store(tmp_path / "data", n=300, dim=16, gone=0)
    version = "v20260101T000000Z-00000f"
    staged = layout.staging / version
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        str(PROJECT / "spark_jobs" / "fit_lsh.py"),
        *fit_argv(layout.root, version, "--bucket-length 0.2"),
    ]
    proc = subprocess.Popen(
        cmd,
        env=embedded_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    kill_when(proc, lambda: (staged / "model").exists(), timeout=300)
    assert not (staged / "manifest.json").exists()
    ids = [f"{i:064x}" for i in range(300)]
    with pytest.raises(models.ValidationFailed, match=r"no manifest\.json"):
        validate(layout, version, ids, recall_floor=0.0)
    with pytest.raises(models.ValidationFailed):
        models.publish(layout, version)
    assert models.current_version(layout) is None
    # The retry starts clean in the same staging directory and completes.
    proc = subprocess.run(cmd, env=embedded_environment(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    validate(layout, version, ids, recall_floor=0.0)
    models.publish(layout, version)
    assert models.current_version(layout) == version


@pytest.mark.parametrize("kill_point", ["before_current", "inside_current_write"])
def test_sigkill_while_publishing(tmp_path: Path, kill_point: str) -> None:
    settings = Settings(data_root=tmp_path / "data")
    layout = settings.layout
    ids = make_ids(8)
    old, new = "v20260101T000000Z-000001", "v20260102T000000Z-000002"
    for v in (old, new):
        build_version(layout.staging, v, ids)
        validate(layout, v, ids, recall_floor=0.5)
    models.publish(layout, old)
    marker = tmp_path / "reached"
    # A hook that stops the publisher at the kill point (the test then SIGKILLs it).
    hook = {
        "before_current": "models.atomic_write_text = stall(models.atomic_write_text)",
        "inside_current_write": "fsutil.os.replace = stall(fsutil.os.replace)",
    }[kill_point]
    proc = spawn(f"""
        import time
        from pathlib import Path
        from imgsim import fsutil
        from imgsim.versions import models
        from imgsim.config import Layout
        def stall(fn):
            def inner(*a, **k):
                Path({str(marker)!r}).touch()
                time.sleep(600)
            return inner
        {hook}
        models.publish(Layout(Path({str(layout.root)!r})), {new!r})
    """)
    kill_when(proc, marker.exists)
    assert models.current_version(layout) == old  # the old state, complete
    assert (layout.models / old / "manifest.json").exists()
    leftovers = [p.name for p in layout.models.iterdir() if p.name.startswith(TMP_PREFIX)]
    assert all(p.startswith(f"{TMP_PREFIX}CURRENT") for p in leftovers)
    # Re-running publish completes the move to the new version.
    models.publish(layout, new)
    assert models.current_version(layout) == new
    assert models.published_versions(layout) == [old, new]
