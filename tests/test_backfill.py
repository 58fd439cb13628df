"""Backfill and concurrent runs under a real scheduler (`airflow standalone`).

`airflow backfill create` over past dates, each with its own incoming/<date>/, with two runs
allowed at once (the index lease serializes them), run twice: the second changes nothing, and
the index holds every image exactly once. Then two triggers of imgsim_index at the same moment,
without a logical date (the REST API's default; such runs read today's drop folder): both
succeed, one after the other, and today's photos are indexed once."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest

from imgsim.catalog import live_rows
from imgsim.config import Layout
from imgsim.demo import serve_directory
from imgsim.store import shard_files
from imgsim.versions.models import current_version, published_versions, read_manifest
from standalone import standalone

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]
DATES = ["2026-01-01", "2026-01-02"]
TRIGGERED = ["manual__first", "manual__second"]
ARCHIVE, PER_DAY = 24, 4


def backfill(env: dict[str, str], airflow: Any, *extra: str) -> None:
    """``airflow backfill create`` over DATES, as a user types it; retried on SQLite's transient
    lock. A try that failed after its backfill was committed counts as done (the retry would
    meet that very backfill as AlreadyRunningBackfill)."""
    cmd = [
        str(Path(sys.executable).parent / "airflow"),
        "backfill",
        "create",
        "--dag-id",
        "imgsim_index",
        "--from-date",
        DATES[0],
        "--to-date",
        DATES[-1],
        "--max-active-runs",
        "2",
        *extra,
    ]

    def count() -> int:
        return len(airflow.call("GET", "/api/v2/backfills?dag_id=imgsim_index")["backfills"])

    before = count()
    for attempt in range(12):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or count() > before:
            return
        # SQLite (the embedded default) admits one writer: the CLI can meet a busy scheduler.
        if "database is locked" not in out or attempt == 11:
            break
        time.sleep(5)
    raise AssertionError(out[-6000:])


def work_span(airflow: Any, run_id: str) -> tuple[datetime, datetime]:
    """From the first task start to the last task end of a run, leaving out the lease wait."""
    tis = airflow.call(
        "GET", f"/api/v2/dags/imgsim_index/dagRuns/{quote(run_id)}/taskInstances?limit=200"
    )["task_instances"]
    starts = [
        datetime.fromisoformat(t["start_date"])
        for t in tis
        if t["start_date"] and t["task_id"] != "take_lease"
    ]
    ends = [datetime.fromisoformat(t["end_date"]) for t in tis if t["end_date"]]
    assert starts and ends, tis
    return min(starts), max(ends)


def assert_serialized(airflow: Any, run_ids: list[str]) -> None:
    spans = sorted(work_span(airflow, r) for r in run_ids)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, f"index runs overlapped: {spans}"


@pytest.mark.timeout(1800)
def test_backfill_twice_indexes_every_image_once(
    airflow_env: dict[str, str], sample_dir: Path, tmp_path: Path
) -> None:
    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["image"])
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "cars_train.tgz", "w:gz") as tar:
        for r in rows[:ARCHIVE]:
            tar.add(sample_dir / "images" / r["image"], arcname=f"cars_train/{r['image']}")
    (src / "labels.csv").write_text(
        "Class,image\n" + "".join(f"{r['Class']},{r['image']}\n" for r in rows[:ARCHIVE])
    )
    layout = Layout(tmp_path / "data")
    today = datetime.now(UTC).date().isoformat()
    for d, day in enumerate([*DATES, today]):
        folder = layout.incoming_day(day)
        folder.mkdir(parents=True)
        picked = rows[ARCHIVE + d * PER_DAY : ARCHIVE + (d + 1) * PER_DAY]
        for r in picked:
            (folder / r["image"]).write_bytes((sample_dir / "images" / r["image"]).read_bytes())
        (folder / "labels.csv").write_text(
            "Class,image\n" + "".join(f"{r['Class']},{r['image']}\n" for r in picked)
        )
    expected = ARCHIVE + PER_DAY * len(DATES)

    def ids_in_store() -> list[str]:
        return [
            i
            for f in shard_files(layout, "efficientnet_lite0")
            for i in pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
        ]

    with serve_directory(src) as base:
        env = {
            **airflow_env,
            "AIRFLOW_HOME": str(tmp_path / "airflow-home"),
            "IMGSIM_DATA_ROOT": str(layout.root),
            "IMGSIM_BACKBONE": "efficientnet_lite0",
            "IMGSIM_ARCHIVE_URL": f"{base}/cars_train.tgz",
            "IMGSIM_LABELS_URL": f"{base}/labels.csv",
            # No scheduled run of its own while the test backfills the past.
            "IMGSIM_INDEX_START_DATE": "2099-01-01",
            "IMGSIM_LEASE_POKE_S": "5",
            # a waiting run gives its worker slot back and is re-queued (up_for_reschedule)
            "IMGSIM_LEASE_HOLD_S": "10",
            "IMGSIM_LEASE_REQUEUE_S": "30",
        }
        with standalone(env, tmp_path / "standalone.log") as airflow:
            airflow.wait_for_dag("imgsim_index")
            airflow.call("PATCH", "/api/v2/dags/imgsim_index", {"is_paused": False})
            backfill(env, airflow)
            airflow.wait_for_backfills("imgsim_index", 1, timeout=900)
            done = airflow.wait_for_runs("imgsim_index", len(DATES), timeout=60)
            assert len(done) == 2
            assert_serialized(airflow, [r["dag_run_id"] for r in done])  # the lease at work
            live = live_rows(layout)
            assert len(live) == expected
            shards = shard_files(layout, "efficientnet_lite0")
            ids = ids_in_store()
            assert len(ids) == len(set(ids)) == expected  # each image exactly once
            assert set(ids) == {r["image_id"] for r in live}
            versions = published_versions(layout)
            current = current_version(layout)
            assert read_manifest(layout)["counts"]["indexed"] == expected
            assert len(versions) == len(DATES)  # one per day with news

            backfill(env, airflow, "--reprocess-behavior", "completed")  # the same dates again
            airflow.wait_for_backfills("imgsim_index", 2, timeout=900)
            assert all(r["state"] == "success" for r in airflow.runs("imgsim_index"))
            assert shard_files(layout, "efficientnet_lite0") == shards
            assert published_versions(layout) == versions
            assert current_version(layout) == current
            assert len(live_rows(layout)) == expected

            # Two triggers at the same moment. (A run dated before the DAG's start date would
            # get no tasks at all, so these carry no logical date and read today's folder.)
            for run_id in TRIGGERED:
                airflow.call(
                    "POST",
                    "/api/v2/dags/imgsim_index/dagRuns",
                    {"logical_date": None, "dag_run_id": run_id},
                )
            airflow.wait_for_runs("imgsim_index", len(DATES) + len(TRIGGERED), timeout=900)
            assert_serialized(airflow, TRIGGERED)
            expected += PER_DAY
            ids = ids_in_store()
            assert len(ids) == len(set(ids)) == expected == len(live_rows(layout))
            assert read_manifest(layout)["counts"]["indexed"] == expected
            assert not (layout.root / "locks" / "index.lease").exists()  # given back
