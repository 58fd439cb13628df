"""The trained embedder through Airflow and Spark: imgsim_index (frozen), imgsim_train (publishes
an embedder, emits its Asset), imgsim_index again (every reference re-embedded with it, a
version that names it, fitted by the real spark-submit), a query that embeds with it, a second
imgsim_train that has nothing to learn, and a rollback that brings the frozen backbone back.

40 real sample photos (4 classes), the ``random`` backbone (the ResNet path, fast), 1 epoch,
``IMGSIM_TRAIN_PUBLISH=always`` (whether training beats the baseline is measured in
benchmarks/bench_training.py, not here).
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imgsim.config import Layout
from imgsim.demo import serve_directory

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]
BIN = Path(sys.executable).parent
CLASSES = {"11", "12", "13", "14"}


def run(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=1500
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.fixture(scope="module")
def env(
    airflow_env: dict[str, str], sample_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    src = tmp_path_factory.mktemp("source")
    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Class"] in CLASSES]
    with tarfile.open(src / "cars_train.tgz", "w:gz") as tar:
        for r in rows:
            tar.add(sample_dir / "images" / r["image"], arcname=f"cars_train/{r['image']}")
    with open(src / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Class", "image"])
        w.writerows([r["Class"], r["image"]] for r in rows)
    with serve_directory(src) as base:
        yield {
            **airflow_env,
            "IMGSIM_DATA_ROOT": str(tmp_path_factory.mktemp("data")),
            "IMGSIM_ARCHIVE_URL": f"{base}/cars_train.tgz",
            "IMGSIM_LABELS_URL": f"{base}/labels.csv",
            "IMGSIM_BACKBONE": "random",
            "IMGSIM_TRAIN_EPOCHS": "1",
            "IMGSIM_TRAIN_BATCH_SIZE": "16",
            "IMGSIM_TRAIN_MIN_IMAGES": "8",
            "IMGSIM_TRAIN_PUBLISH": "always",
        }


@pytest.fixture(scope="module")
def runs(env: dict[str, str]) -> dict[str, Any]:
    from imgsim.versions.models import read_manifest

    layout = Layout(Path(env["IMGSIM_DATA_ROOT"]))
    run(env, "airflow", "dags", "test", "imgsim_index", "2026-01-01")
    frozen = read_manifest(layout)
    train_log = run(env, "airflow", "dags", "test", "imgsim_train", "2026-01-02")
    index_log = run(env, "airflow", "dags", "test", "imgsim_index", "2026-01-03")
    return {
        "layout": layout,
        "frozen": frozen,
        "trained": read_manifest(layout),
        "train_log": train_log,
        "index_log": index_log,
    }


def test_train_dag_publishes_an_embedder(runs: dict[str, Any]) -> None:
    from imgsim.versions.embedders import current_embedder, read_embedder

    layout = runs["layout"]
    version = current_embedder(layout)
    assert version, runs["train_log"][-3000:]
    manifest = read_embedder(layout, version, hashes=True)
    assert manifest["base"]["name"] == "random" and manifest["epochs"] == 1
    assert "train: True (no trained embedder yet)" in runs["train_log"]
    assert "epoch 1/1: loss" in runs["train_log"]  # the progress line in the task log


def test_next_index_run_re_embeds_everything_with_it(runs: dict[str, Any]) -> None:
    from imgsim.store import embedded_ids
    from imgsim.versions.embedders import current_embedder

    layout, frozen, trained = runs["layout"], runs["frozen"], runs["trained"]
    version = current_embedder(layout)
    assert frozen["backbone"]["name"] == "random"
    assert trained["backbone"]["name"] == f"random@{version}"
    assert trained["backbone"]["dim"] == 512
    assert trained["counts"]["indexed"] == frozen["counts"]["indexed"] == 40
    assert len(embedded_ids(layout, f"random@{version}")) == 40
    assert f"embedding with random@{version}" in runs["index_log"]
    assert trained["version"] != frozen["version"]


def test_queries_embed_with_the_versions_embedder(
    runs: dict[str, Any], env: dict[str, str], sample_dir: Path
) -> None:
    photo = next(iter(sorted((runs["layout"].images).rglob("*.jpg"))))
    out = run(env, "imgsim", "query", str(photo), "-k", "3")
    assert runs["trained"]["version"] in out
    versions = run(env, "imgsim", "versions")
    assert runs["trained"]["backbone"]["name"].split("@")[1] in versions


def test_train_again_has_nothing_to_learn_and_rollback_brings_frozen_back(
    runs: dict[str, Any], env: dict[str, str]
) -> None:
    from imgsim.index.pipeline import resolve_embedder
    from imgsim.versions.embedders import current_embedder

    layout = runs["layout"]
    out = run(env, "airflow", "dags", "test", "imgsim_train", "2026-01-09")
    assert "train: False (the labelled references are those" in out
    run(env, "imgsim", "rollback", runs["frozen"]["version"])
    assert current_embedder(layout) is None
    from imgsim.config import Settings

    settings = Settings().replace(data_root=layout.root)
    assert resolve_embedder(settings, "random")["backbone"] == "random"
