"""End to end on real Stanford Cars photos: imgsim_index, then imgsim_query on that index.

One index for the whole module (building it is the expensive part). imgsim_index over
loopback HTTP (Kaggle layout): run 1 indexes the 1,960 shared sample photos with
efficientnet_lite0; run 2 (next logical date) finds 20 new photos in incoming/<date>/ and
embeds exactly those; run 3 has nothing new and publishes nothing. Then query photos are
dropped into queries/inbox/, imgsim_query runs, and the results, pictures, ledger and moves
are checked; the CLI answers too; a rollback to version 1 makes the next query run use it.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
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
BIN = Path(sys.executable).parent


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


def run_dag(env: dict[str, str], date: str, dag_id: str = "imgsim_index") -> str:
    proc = subprocess.run(
        [str(BIN / "airflow"), "dags", "test", dag_id, date],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
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
    from imgsim.versions.models import read_manifest

    return read_manifest(layout)


@pytest.fixture(scope="module")
def served(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    src = tmp_path_factory.mktemp("source")
    build_kaggle_archive(sample_dir, src)
    with serve_directory(src) as base:
        yield base


@pytest.fixture(scope="module")
def env(
    airflow_env: dict[str, str], served: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    data = tmp_path_factory.mktemp("data")
    return {
        **airflow_env,
        "IMGSIM_DATA_ROOT": str(data),
        "IMGSIM_ARCHIVE_URL": f"{served}/cars_train.tgz",
        "IMGSIM_LABELS_URL": f"{served}/cars_train_labels.csv",
        "IMGSIM_BACKBONE": "efficientnet_lite0",
        "IMGSIM_SHARD_SIZE": "700",
    }


@pytest.fixture(scope="module")
def first_run(env: dict[str, str]) -> dict[str, Any]:
    layout = Layout(Path(env["IMGSIM_DATA_ROOT"]))
    run_dag(env, "2026-01-01")
    return {"layout": layout, "manifest": manifest(layout), "shards": shard_names(layout)}


def test_first_run_indexes_every_sample_photo(first_run: dict[str, Any]) -> None:
    from imgsim.catalog import live_rows
    from imgsim.versions.models import current_version

    layout, m = first_run["layout"], first_run["manifest"]
    assert m["counts"]["indexed"] == 1960
    assert m["counts"]["catalog_live"] == 1960
    assert m["backbone"]["name"] == "efficientnet_lite0"
    assert m["backbone"]["dim"] == m["embedding_dim"] == 1280
    assert current_version(layout) == m["version"]
    assert shard_rows(layout, first_run["shards"]) == 1960
    assert len(first_run["shards"]) == 3  # 1,960 images in shards of 700
    rows = live_rows(layout)
    assert len({r["class_id"] for r in rows}) == 196
    assert all(r["class_name"] for r in rows)
    assert len(list(layout.thumbs.glob("*.jpg"))) == 1960
    # Recall of the LSH against exact search, measured by the fit job on a sample.
    metrics = m["metrics"]
    assert metrics["queries"] == 200
    assert metrics["recall_at_k"] >= 0.8  # the configured floor
    assert metrics["label_hit_at_k"] > 0.2  # chance is about 2.5%
    validation = layout.models / m["version"] / "validation.json"
    assert validation.exists()
    # The learn_projection task: every photo is labelled, so auto learns LDA from the labels
    # (cross-validated inside the references); the LSH lives in its space, and validation
    # re-projected stored vectors in NumPy and found Spark's.
    # Near-duplicates: every candidate pair verified as one photo on its thumbnails. Every group
    # is a pair known to be one photo (found by eye: the sample's list and the training set's,
    # benchmarks/bench_duplicates.py and duplicates_train.py); most known pairs are found.
    dup = m["duplicates"]
    assert dup["verification"]["min_inliers"] == 90
    assert dup["verification"]["unverifiable"] == 0
    assert dup["verification"]["same_photo"] <= dup["verification"]["candidates"]
    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_duplicates import SAMPLE_DUPLICATES
    from duplicates_train import SAME_BY_EYE

    known = {frozenset(p) for p in (*SAMPLE_DUPLICATES, *SAME_BY_EYE)}
    members = pq.read_table(layout.models / m["version"] / "duplicates").to_pylist()
    groups: dict[int, set[str]] = {}
    for r in members:
        groups.setdefault(r["group"], set()).add(Path(r["path"]).name)
    assert groups and all(frozenset(g) in known for g in groups.values()), groups
    found = sum(frozenset(p) in {frozenset(g) for g in groups.values()} for p in SAMPLE_DUPLICATES)
    assert found >= 4, (groups, dup)  # 4 of 10 on this machine: the others are no candidates
    proj = m["projection"]
    assert proj["kind"] == "lda" and proj["requested"] == "auto"
    assert proj["coverage"]["labelled_images"] == 1960 and proj["coverage"]["classes"] == 196
    assert m["search_dim"] == proj["dims"] <= 195
    assert (layout.models / m["version"] / proj["file"]).exists()
    checks = json.loads(validation.read_text())["checks"]
    assert checks["projection"] == "lda" and checks["projection_max_abs_diff"] < 1e-4
    assert metrics["label_precision_at_k"] > 0.3  # raw space: about 0.15


@pytest.fixture(scope="module")
def second_run(first_run: dict[str, Any], env: dict[str, str], sample_dir: Path) -> dict[str, Any]:
    """20 new photos (mirror images of sample photos: new bytes, real cars) for 2026-01-02,
    labelled with class ids and names (the query tests show names for every neighbour)."""
    from PIL import Image, ImageOps

    layout = first_run["layout"]
    day = layout.incoming_day("2026-01-02")
    day.mkdir(parents=True)
    with open(sample_dir / "labels.csv", newline="") as fh:
        picked = list(csv.DictReader(fh))[:20]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "Class", "class_name"])
    for row in picked:
        name = f"new_{row['image']}"
        ImageOps.mirror(Image.open(sample_dir / "images" / row["image"])).save(
            day / name, quality=92
        )
        writer.writerow([name, row["Class"], row["class_name"]])
    (day / "labels.csv").write_text(buf.getvalue())
    new_ids = {sha256_file(p) for p in day.glob("*.jpg")}
    assert len(new_ids) == 20
    run_dag(env, "2026-01-02")
    return {"new_ids": new_ids, "manifest": manifest(layout), "shards": shard_names(layout)}


def test_second_run_embeds_exactly_the_new_photos(
    first_run: dict[str, Any], second_run: dict[str, Any]
) -> None:
    import pyarrow.parquet as pq

    from imgsim.versions.models import current_version, published_versions

    layout = first_run["layout"]
    added = second_run["shards"] - first_run["shards"]
    assert shard_rows(layout, added) == 20
    ids = set()
    for name in added:
        ids |= set(
            pq.read_table(layout.embeddings("efficientnet_lite0") / name, columns=["image_id"])
            .column("image_id")
            .to_pylist()
        )
    assert ids == second_run["new_ids"]
    m = second_run["manifest"]
    assert m["counts"]["indexed"] == 1980
    assert m["version"] != first_run["manifest"]["version"]
    assert current_version(layout) == m["version"]
    assert published_versions(layout) == sorted([first_run["manifest"]["version"], m["version"]])
    # 20 new of 1,960 (1%, under IMGSIM_PROJECTION_REFRESH): the run kept the first version's
    # LDA, so the search space did not move and the exact graph was updated, not rescanned
    first = first_run["manifest"]
    assert m["projection"]["reuse"] == {
        "from": first["version"],
        "previous": first["version"],
        "learned_on": 1960,
        "changed": 20,
        "refresh": 0.05,
    }
    graph = m["neighbours"]
    assert graph["mode"] == "incremental" and graph["previous"] == first["version"]
    assert graph["changes"]["new"] == 20 and graph["changes"]["gone"] == 0
    assert graph["recall_at_k"] == 1.0


def test_third_run_with_nothing_new_publishes_nothing(
    first_run: dict[str, Any], second_run: dict[str, Any], env: dict[str, str]
) -> None:
    from imgsim.versions.models import current_version, published_versions

    layout = first_run["layout"]
    out = run_dag(env, "2026-01-03")
    assert "no refit" in out
    assert shard_names(layout) == second_run["shards"]
    assert current_version(layout) == second_run["manifest"]["version"]
    assert len(published_versions(layout)) == 2


# -- queries against that index ------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_rows(sample_dir: Path) -> list[dict[str, str]]:
    with open(sample_dir / "labels.csv", newline="") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: r["image"])


@pytest.fixture(scope="module")
def versions(second_run: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The two versions runs 1 and 2 published (run 3 publishes nothing)."""
    from imgsim.versions.models import published_versions

    found = published_versions(Layout(Path(env["IMGSIM_DATA_ROOT"])))
    assert len(found) == 2
    return found


def drop(layout: Layout, files: dict[str, Path | bytes]) -> None:
    inbox = layout.queries / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = inbox / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)


def latest_results(layout: Layout) -> tuple[Path, dict[str, Any]]:
    runs = sorted((layout.queries / "results").glob("manual__*"), key=lambda p: p.stat().st_mtime)
    return runs[-1], json.loads((runs[-1] / "results.json").read_text())


@pytest.fixture(scope="module")
def first_query(
    env: dict[str, str], versions: list[str], sample_dir: Path, sample_rows: list[dict[str, str]]
) -> dict[str, Any]:
    layout = Layout(Path(env["IMGSIM_DATA_ROOT"]))
    ref = [sample_dir / "images" / r["image"] for r in sample_rows[:3]]
    new = [sample_dir / "images" / r["image"] for r in sample_rows[-2:]]
    drop(
        layout,
        {
            **{f"ref_{p.name}": p for p in ref},
            **{f"new_{p.name}": p for p in new},
            "broken.jpg": b"this is not a photo\n" * 10,
        },
    )
    run_dag(env, "2026-01-03", "imgsim_query")
    run_dir, results = latest_results(layout)
    return {"layout": layout, "run_dir": run_dir, "results": results, "ref": ref, "new": new}


def test_query_run_answers_every_valid_photo(
    first_query: dict[str, Any], versions: list[str]
) -> None:
    results = first_query["results"]
    by_name = {q["query_name"]: q for q in results["queries"]}
    assert set(by_name) == {"ref_" + p.name for p in first_query["ref"]} | {
        "new_" + p.name for p in first_query["new"]
    } | {"broken.jpg"}
    assert results["model_version"] == versions[-1]
    # Few photos (<= IMGSIM_QUERY_LOCAL_MAX): answered in the embed task, no Spark lookup.
    assert results["engine"] == "local"
    bad = by_name.pop("broken.jpg")
    assert bad["status"] == "rejected" and bad["reason"] == "not_an_image"
    for name, q in by_name.items():
        assert q["status"] == "answered", name
        assert q["model_version"] == versions[-1]
        if len(q["neighbours"]) < 5:  # the LSH may return fewer: then it says so
            assert q["note"] and "of 5" in q["note"]
        else:
            assert [n["rank"] for n in q["neighbours"]] == [1, 2, 3, 4, 5]
        distances = [n["distance"] for n in q["neighbours"]]
        assert distances == sorted(distances)
        assert all(n["class_name"] and n["path"] for n in q["neighbours"])


def test_a_reference_photo_finds_itself_first(first_query: dict[str, Any]) -> None:
    by_name = {q["query_name"]: q for q in first_query["results"]["queries"]}
    for p in first_query["ref"]:
        top = by_name["ref_" + p.name]["neighbours"][0]
        assert top["image_id"] == sha256_file(p)
        assert top["distance"] < 1e-3


def test_results_files_pictures_and_moves(first_query: dict[str, Any]) -> None:
    from PIL import Image

    run_dir, layout = first_query["run_dir"], first_query["layout"]
    with Image.open(run_dir / "contact_sheet.png") as im:
        im.load()
        assert im.width > 500 and im.height > 300
    html = (run_dir / "gallery.html").read_text()
    assert "data:image/jpeg;base64," in html and "http://" not in html
    with open(run_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["query_name"] for r in rows} >= {"broken.jpg"}
    assert list((layout.queries / "inbox").iterdir()) == []
    processed = {p.name for p in (layout.queries / "processed" / run_dir.name).iterdir()}
    assert len(processed) == 5
    assert [p.name for p in (layout.queries / "rejected" / run_dir.name).iterdir()] == [
        "broken.jpg"
    ]


def test_the_same_photo_is_not_answered_twice_by_the_same_version(
    first_query: dict[str, Any], env: dict[str, str]
) -> None:
    layout = first_query["layout"]
    again = first_query["ref"][0]
    drop(layout, {"again.jpg": again})
    run_dag(env, "2026-01-04", "imgsim_query")
    _, results = latest_results(layout)
    (q,) = results["queries"]
    assert q["status"] == "already_answered" and q["neighbours"] == []
    assert not (layout.queries / "inbox" / "again.jpg").exists()


def test_cli_query_prints_the_reference_photo_first(
    first_query: dict[str, Any], env: dict[str, str], tmp_path: Path
) -> None:
    photo = first_query["ref"][1]
    proc = subprocess.run(
        [str(BIN / "imgsim"), "query", str(photo), "-k", "3", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    first = next(line for line in table if line.strip().startswith("1 "))
    assert photo.name in first and "0.0000" in first
    assert (tmp_path / "contact_sheet.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["engine"] == "local"


def test_rollback_makes_the_next_query_run_use_the_older_version(
    first_query: dict[str, Any],
    env: dict[str, str],
    versions: list[str],
    sample_dir: Path,
    sample_rows: list[dict[str, str]],
) -> None:
    from imgsim.versions.models import current_version

    layout = first_query["layout"]
    proc = subprocess.run(
        [str(BIN / "imgsim"), "rollback", versions[0]], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert current_version(layout) == versions[0]
    listing = subprocess.run(
        [str(BIN / "imgsim"), "versions"], env=env, capture_output=True, text=True
    ).stdout
    assert f"* {versions[0]}" in listing
    drop(layout, {"after_rollback.jpg": sample_dir / "images" / sample_rows[5]["image"]})
    run_dag(env, "2026-01-05", "imgsim_query")
    _, results = latest_results(layout)
    (q,) = results["queries"]
    assert q["status"] == "answered" and q["model_version"] == versions[0]
    assert results["model_version"] == versions[0]
