"""End to end: imgsim_query answers inbox photos with the published model; CLI; rollback.

A small index (300 real sample photos, efficientnet_lite0) is built twice with different LSH
parameters (two versions). Query photos are dropped into queries/inbox/, imgsim_query runs,
and the results, pictures, ledger and moves are checked; then a rollback.
"""

from __future__ import annotations

import csv
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
N_REFERENCE = 300


def airflow_test(env: dict[str, str], dag_id: str, date: str,
                 conf: dict[str, Any] | None = None) -> str:
    cmd = [str(BIN / "airflow"), "dags", "test", dag_id, date]
    if conf:
        cmd[3:3] = ["-c", json.dumps(conf)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "state=success" in out, out[-6000:]
    return out


@pytest.fixture(scope="module")
def sample_rows(sample_dir: Path) -> list[dict[str, str]]:
    with open(sample_dir / "labels.csv", newline="") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: r["image"])


@pytest.fixture(scope="module")
def env(airflow_env: dict[str, str], sample_dir: Path, sample_rows: list[dict[str, str]],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    src = tmp_path_factory.mktemp("qsource")
    with tarfile.open(src / "cars_train.tgz", "w:gz") as tar:
        for row in sample_rows[:N_REFERENCE]:
            tar.add(sample_dir / "images" / row["image"], arcname=f"cars_train/{row['image']}")
    with open(src / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(sample_rows[0]))
        w.writeheader()
        w.writerows(sample_rows[:N_REFERENCE])
    data = tmp_path_factory.mktemp("qdata")
    with serve_directory(src) as base:
        yield {**airflow_env, "IMGSIM_DATA_ROOT": str(data),
               "IMGSIM_ARCHIVE_URL": f"{base}/cars_train.tgz",
               "IMGSIM_LABELS_URL": f"{base}/labels.csv",
               "IMGSIM_BACKBONE": "efficientnet_lite0"}


@pytest.fixture(scope="module")
def versions(env: dict[str, str]) -> list[str]:
    """Two published versions: default parameters, then 6 hash tables (a refit, no re-embed)."""
    from imgsim.models import published_versions

    airflow_test(env, "imgsim_index", "2026-01-01")
    airflow_test(env, "imgsim_index", "2026-01-02", {"num_hash_tables": 6})
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
def first_query(env: dict[str, str], versions: list[str], sample_dir: Path,
                sample_rows: list[dict[str, str]]) -> dict[str, Any]:
    layout = Layout(Path(env["IMGSIM_DATA_ROOT"]))
    ref = [sample_dir / "images" / r["image"] for r in sample_rows[:3]]
    new = [sample_dir / "images" / r["image"] for r in sample_rows[-2:]]
    drop(layout, {**{f"ref_{p.name}": p for p in ref}, **{f"new_{p.name}": p for p in new},
                  "broken.jpg": b"this is not a photo\n" * 10})
    airflow_test(env, "imgsim_query", "2026-01-03")
    run_dir, results = latest_results(layout)
    return {"layout": layout, "run_dir": run_dir, "results": results, "ref": ref, "new": new}


def test_query_run_answers_every_valid_photo(first_query: dict[str, Any],
                                             versions: list[str]) -> None:
    results = first_query["results"]
    by_name = {q["query_name"]: q for q in results["queries"]}
    assert set(by_name) == {"ref_" + p.name for p in first_query["ref"]} | {
        "new_" + p.name for p in first_query["new"]} | {"broken.jpg"}
    assert results["model_version"] == versions[-1]
    # Few photos (<= IMGSIM_QUERY_LOCAL_MAX): answered in the embed task, no Spark lookup.
    assert results["engine"] == "local"
    bad = by_name.pop("broken.jpg")
    assert bad["status"] == "rejected" and bad["reason"] == "not_an_image"
    for name, q in by_name.items():
        assert q["status"] == "answered", name
        assert q["model_version"] == versions[-1]
        if len(q["neighbours"]) < 5:          # the LSH may return fewer: then it says so
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
        "broken.jpg"]


def test_the_same_photo_is_not_answered_twice_by_the_same_version(
        first_query: dict[str, Any], env: dict[str, str]) -> None:
    layout = first_query["layout"]
    again = first_query["ref"][0]
    drop(layout, {"again.jpg": again})
    airflow_test(env, "imgsim_query", "2026-01-04")
    _, results = latest_results(layout)
    (q,) = results["queries"]
    assert q["status"] == "already_answered" and q["neighbours"] == []
    assert not (layout.queries / "inbox" / "again.jpg").exists()


def test_cli_query_prints_the_reference_photo_first(first_query: dict[str, Any],
                                                    env: dict[str, str],
                                                    tmp_path: Path) -> None:
    photo = first_query["ref"][1]
    proc = subprocess.run([str(BIN / "imgsim"), "query", str(photo), "-k", "3", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.splitlines()
    first = next(line for line in table if line.strip().startswith("1 "))
    assert photo.name in first and "0.0000" in first
    assert (tmp_path / "contact_sheet.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["engine"] == "local"


def test_rollback_makes_the_next_query_run_use_the_older_version(
        first_query: dict[str, Any], env: dict[str, str], versions: list[str],
        sample_dir: Path, sample_rows: list[dict[str, str]]) -> None:
    from imgsim.models import current_version

    layout = first_query["layout"]
    proc = subprocess.run([str(BIN / "imgsim"), "rollback", versions[0]], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert current_version(layout) == versions[0]
    listing = subprocess.run([str(BIN / "imgsim"), "versions"], env=env, capture_output=True,
                             text=True).stdout
    assert f"* {versions[0]}" in listing
    drop(layout, {"after_rollback.jpg": sample_dir / "images" / sample_rows[5]["image"]})
    airflow_test(env, "imgsim_query", "2026-01-05")
    _, results = latest_results(layout)
    (q,) = results["queries"]
    assert q["status"] == "answered" and q["model_version"] == versions[0]
    assert results["model_version"] == versions[0]
