"""End to end: imgsim_index on real Stanford Cars photos (Kaggle layout) over loopback HTTP.

Run 1 indexes the 1,960 shared sample photos with efficientnet_lite0; run 2 (next logical
date) finds 20 new photos in incoming/<date>/ and embeds exactly those; run 3 has nothing new
and publishes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgsim.config import Layout
from imgsim.demo import serve_directory
from imgsim.fsutil import sha256_file

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]


def build_kaggle_archive(sample: Path, out: Path) -> tuple[Path, Path]:
    """cars_train.tgz (cars_train/NNNNN.jpg) + the sample's labels CSV (Class, image, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    archive = out / "cars_train.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for img in sorted((sample / "images").glob("*.jpg")):
            tar.add(img, arcname=f"cars_train/{img.name}")
    labels = out / "cars_train_labels.csv"
    labels.write_bytes((sample / "labels.csv").read_bytes())
    return archive, labels


def run_dag(env: dict[str, str], date: str) -> str:
    airflow = str(Path(sys.executable).parent / "airflow")
    proc = subprocess.run([airflow, "dags", "test", "imgsim_index", date], env=env,
                          capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "state=success" in out, out[-6000:]
    return out


def shard_rows(layout: Layout, names: set[str]) -> int:
    import pyarrow.parquet as pq

    root = layout.embeddings("efficientnet_lite0")
    return sum(pq.read_metadata(root / n).num_rows for n in names)


def shard_names(layout: Layout) -> set[str]:
    return {p.name for p in layout.embeddings("efficientnet_lite0").glob("part-*.parquet")}


def manifest(layout: Layout) -> dict[str, Any]:
    from imgsim.models import read_manifest

    return read_manifest(layout)


@pytest.fixture(scope="module")
def served(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    src = tmp_path_factory.mktemp("source")
    build_kaggle_archive(sample_dir, src)
    with serve_directory(src) as base:
        yield base


@pytest.fixture(scope="module")
def env(airflow_env: dict[str, str], served: str,
        tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data = tmp_path_factory.mktemp("data")
    return {**airflow_env, "IMGSIM_DATA_ROOT": str(data),
            "IMGSIM_ARCHIVE_URL": f"{served}/cars_train.tgz",
            "IMGSIM_LABELS_URL": f"{served}/cars_train_labels.csv",
            "IMGSIM_BACKBONE": "efficientnet_lite0", "IMGSIM_SHARD_SIZE": "700"}


@pytest.fixture(scope="module")
def first_run(env: dict[str, str]) -> dict[str, Any]:
    layout = Layout(Path(env["IMGSIM_DATA_ROOT"]))
    run_dag(env, "2026-01-01")
    return {"layout": layout, "manifest": manifest(layout), "shards": shard_names(layout)}


def test_first_run_indexes_every_sample_photo(first_run: dict[str, Any]) -> None:
    from imgsim.catalog import live_rows
    from imgsim.models import current_version

    layout, m = first_run["layout"], first_run["manifest"]
    assert m["counts"]["indexed"] == 1960
    assert m["counts"]["catalog_live"] == 1960
    assert m["backbone"]["name"] == "efficientnet_lite0"
    assert m["backbone"]["dim"] == m["embedding_dim"] == 1280
    assert current_version(layout) == m["version"]
    assert shard_rows(layout, first_run["shards"]) == 1960
    assert len(first_run["shards"]) == 3                      # 1,960 images in shards of 700
    rows = live_rows(layout)
    assert len({r["class_id"] for r in rows}) == 196
    assert all(r["class_name"] for r in rows)
    assert len(list(layout.thumbs.glob("*.jpg"))) == 1960
    # Recall of the LSH against exact search, measured by the fit job on a sample.
    metrics = m["metrics"]
    assert metrics["queries"] == 200
    assert metrics["recall_at_k"] >= 0.8                     # the configured floor
    assert metrics["label_hit_at_k"] > 0.2                   # chance is about 2.5%
    validation = (layout.models / m["version"] / "validation.json")
    assert validation.exists()
    # The learn_projection task: every photo is labelled, so auto learns LDA from the labels
    # (cross-validated inside the references); the LSH lives in its space, and validation
    # re-projected stored vectors in NumPy and found Spark's.
    proj = m["projection"]
    assert proj["kind"] == "lda" and proj["requested"] == "auto"
    assert proj["coverage"]["labelled_images"] == 1960 and proj["coverage"]["classes"] == 196
    assert m["search_dim"] == proj["dims"] <= 195
    assert (layout.models / m["version"] / proj["file"]).exists()
    checks = json.loads(validation.read_text())["checks"]
    assert checks["projection"] == "lda" and checks["projection_max_abs_diff"] < 1e-4
    assert metrics["label_precision_at_k"] > 0.3             # raw space: about 0.15


@pytest.fixture(scope="module")
def second_run(first_run: dict[str, Any], env: dict[str, str], sample_dir: Path
               ) -> dict[str, Any]:
    """20 new photos (mirror images of sample photos: new bytes, real cars) for 2026-01-02."""
    from PIL import Image, ImageOps

    layout = first_run["layout"]
    day = layout.incoming_day("2026-01-02")
    day.mkdir(parents=True)
    with open(sample_dir / "labels.csv", newline="") as fh:
        picked = list(csv.DictReader(fh))[:20]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "Class"])
    for row in picked:
        name = f"new_{row['image']}"
        ImageOps.mirror(Image.open(sample_dir / "images" / row["image"])).save(
            day / name, quality=92)
        writer.writerow([name, row["Class"]])
    (day / "labels.csv").write_text(buf.getvalue())
    new_ids = {sha256_file(p) for p in day.glob("*.jpg")}
    assert len(new_ids) == 20
    run_dag(env, "2026-01-02")
    return {"new_ids": new_ids, "manifest": manifest(layout), "shards": shard_names(layout)}


def test_second_run_embeds_exactly_the_new_photos(first_run: dict[str, Any],
                                                  second_run: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    from imgsim.models import current_version, published_versions

    layout = first_run["layout"]
    added = second_run["shards"] - first_run["shards"]
    assert shard_rows(layout, added) == 20
    ids = set()
    for name in added:
        ids |= set(pq.read_table(layout.embeddings("efficientnet_lite0") / name,
                                 columns=["image_id"]).column("image_id").to_pylist())
    assert ids == second_run["new_ids"]
    m = second_run["manifest"]
    assert m["counts"]["indexed"] == 1980
    assert m["version"] != first_run["manifest"]["version"]
    assert current_version(layout) == m["version"]
    assert published_versions(layout) == sorted([first_run["manifest"]["version"], m["version"]])


def test_third_run_with_nothing_new_publishes_nothing(first_run: dict[str, Any],
                                                      second_run: dict[str, Any],
                                                      env: dict[str, str]) -> None:
    from imgsim.models import current_version, published_versions

    layout = first_run["layout"]
    out = run_dag(env, "2026-01-03")
    assert "no refit" in out
    assert shard_names(layout) == second_run["shards"]
    assert current_version(layout) == second_run["manifest"]["version"]
    assert len(published_versions(layout)) == 2
