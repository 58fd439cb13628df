"""Scale-out with real processes: Postgres, Redis + CeleryExecutor, a Spark standalone cluster.

The whole topology of the scale-out deployment runs on 127.0.0.1 (``tests/cluster.py``):
PostgreSQL as the metadata DB (and Celery's result backend), Redis as the broker, Airflow's
api-server, scheduler, dag-processor, triggerer and a separate Celery worker, and a Spark
master with one worker that ``spark_default`` points at. ``imgsim_index`` indexes a small
archive of real sample photos served over HTTP (a one-day backfill created over REST), then
``imgsim_query`` (triggered over REST) answers photos dropped into the inbox. The test checks
where things ran: every task instance in the Celery worker, every DAG run and Celery result in
Postgres, and the fit and query Spark applications finished with their executors on the Spark
worker (the master's and the worker's JSON status, and the executors' logs in its work dir).

The master's and the worker's JSON status are kept in ``test-output/distributed/`` (with every
log when the test fails).
"""

from __future__ import annotations

import csv
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from cluster import CELERY_WORKER_NAME, Cluster, cluster
from imgsim.config import Layout
from imgsim.demo import serve_directory

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(1200)]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = PROJECT_ROOT / "test-output" / "distributed"
N_REFERENCE, SHARD_SIZE, N_QUERY = 160, 80, 3


def build_archive(sample: Path, rows: list[dict[str, str]], out: Path) -> None:
    """cars_train.tgz (Kaggle layout) + labels.csv for ``rows``."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "cars_train.tgz", "w:gz") as tar:
        for r in rows:
            tar.add(sample / "images" / r["image"], arcname=f"cars_train/{r['image']}")
    (out / "labels.csv").write_text(
        "Class,image\n" + "".join(f"{r['Class']},{r['image']}\n" for r in rows)
    )


def wait_idle(c: Cluster, dag_id: str, timeout: float = 120) -> None:
    """Until no run of ``dag_id`` is queued or running (a scheduled one may have started)."""
    deadline = time.monotonic() + timeout
    while any(r["state"] in ("queued", "running") for r in c.api.runs(dag_id)):
        assert time.monotonic() < deadline, c.api.runs(dag_id)
        time.sleep(2)


def backfill_one_day(c: Cluster, dag_id: str, day: str, timeout: float = 120) -> str:
    """Create a one-day backfill over REST; returns the id of its run.

    imgsim_index gets a start date in 2099 here so that the scheduler starts no run of its own;
    a manual run with a logical date before the start date would have no task instances, and
    one without a logical date has no ``ds`` for the catalog task. A backfill run has both.
    """
    when = f"{day}T00:00:00Z"
    c.api.call(
        "POST",
        "/api/v2/backfills",
        {"dag_id": dag_id, "from_date": when, "to_date": when, "max_active_runs": 1},
    )
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in c.api.runs(dag_id) if r["run_type"] == "backfill"]
        if runs:
            return str(runs[0]["dag_run_id"])
        assert time.monotonic() < deadline, "the backfill created no run"
        time.sleep(2)


def check_ran_in_celery_worker(
    c: Cluster, dag_id: str, run_id: str, expected: set[str]
) -> list[dict[str, Any]]:
    """The task instances that ran (all of ``expected`` among them), each in the Celery worker.

    Skipped ones (a branch not taken) never ran anywhere.
    """
    tis = c.api.task_instances(dag_id, run_id)
    assert all(t["state"] in ("success", "skipped") for t in tis), [
        (t["task_id"], t["state"]) for t in tis
    ]
    ran = [t for t in tis if t["state"] == "success"]
    assert expected <= {t["task_id"] for t in ran}, (expected, [t["task_id"] for t in ran])
    for ti in ran:
        # Only the Celery worker's processes report this hostname (tests/cluster.py).
        assert ti["hostname"] == CELERY_WORKER_NAME, (ti["task_id"], ti["hostname"])
        assert ti["queue"] == "default"
    return ran


def spark_app(master: dict[str, Any], prefix: str) -> dict[str, Any]:
    apps = [a for a in master["completedapps"] if a["name"].startswith(prefix)]
    assert len(apps) == 1, (prefix, [a["name"] for a in master["completedapps"]])
    return dict(apps[0])


def test_index_and_query_on_postgres_celery_and_spark_standalone(
    sample_dir: Path, tmp_path: Path
) -> None:
    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: r["image"])
    src = tmp_path / "src"
    build_archive(sample_dir, rows[:N_REFERENCE], src)
    layout = Layout(tmp_path / "data")
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    failure_logs = OUTPUT / "logs"
    started = time.monotonic()

    with serve_directory(src) as base:
        extra = {
            "IMGSIM_DATA_ROOT": str(layout.root),
            "IMGSIM_ARCHIVE_URL": f"{base}/cars_train.tgz",
            "IMGSIM_LABELS_URL": f"{base}/labels.csv",
            "IMGSIM_BACKBONE": "efficientnet_lite0",
            "IMGSIM_SHARD_SIZE": str(SHARD_SIZE),
            # Embedding as a Spark application too, so it also runs on the worker.
            "IMGSIM_EMBED_ENGINE": "spark",
            # the projection's statistics on the cluster too (spark_jobs/learn_projection)
            "IMGSIM_PROJECTION_ENGINE": "spark",
            # Only the runs this test starts: no scheduled run of either DAG.
            "IMGSIM_INDEX_START_DATE": "2099-01-01",
            "IMGSIM_QUERY_SCHEDULE": "0 0 29 2 *",
            # Every query run by the Spark job on the cluster (not in the embed task).
            "IMGSIM_QUERY_LOCAL_MAX": "0",
        }
        with cluster(tmp_path / "cluster", extra, failure_logs) as c:
            up = time.monotonic() - started
            for dag_id in ("imgsim_index", "imgsim_query"):
                c.api.wait_for_dag(dag_id, timeout=300)
                c.api.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

            # ---- imgsim_index on the cluster
            t0 = time.monotonic()
            index_run = backfill_one_day(c, "imgsim_index", "2026-01-01")
            c.api.wait_for_run("imgsim_index", index_run, timeout=900)
            index_s = time.monotonic() - t0
            from imgsim.versions.models import current_version, read_manifest

            manifest = read_manifest(layout)
            assert current_version(layout) == manifest["version"]
            assert manifest["counts"]["indexed"] == N_REFERENCE
            assert manifest["counts"]["catalog_live"] == N_REFERENCE
            assert manifest["backbone"]["name"] == "efficientnet_lite0"
            assert manifest["spark"]["master"] == c.spark.url  # not local[*]
            assert manifest["projection"]["requested"] == "auto"
            assert manifest["projection"]["coverage"]["images"] == N_REFERENCE
            assert manifest["projection"]["reason"]
            index_tis = check_ran_in_celery_worker(
                c,
                "imgsim_index",
                index_run,
                {
                    "take_lease",
                    "download",
                    "extract",
                    "catalog",
                    "plan_shards",
                    "choose_embed_engine",
                    "embed_spark",
                    "embed_summary",
                    "fit_plan",
                    "learn_projection",
                    "fit_lsh",
                    "validate",
                    "publish",
                    "release_lease",
                },
            )

            # ---- imgsim_query on the cluster
            wait_idle(c, "imgsim_query")
            inbox = layout.queries / "inbox"
            inbox.mkdir(parents=True, exist_ok=True)
            queries = rows[N_REFERENCE : N_REFERENCE + N_QUERY]
            for r in queries:
                shutil.copyfile(sample_dir / "images" / r["image"], inbox / f"q_{r['image']}")
            t0 = time.monotonic()
            query_run = c.api.trigger("imgsim_query")
            c.api.wait_for_run("imgsim_query", query_run, timeout=420)
            query_s = time.monotonic() - t0
            results_dirs = [p.parent for p in (layout.queries / "results").glob("*/results.json")]
            assert len(results_dirs) == 1
            results = json.loads((results_dirs[0] / "results.json").read_text())
            assert results["model_version"] == manifest["version"]
            assert results["engine"] == "spark"
            answered = {q["query_name"]: q for q in results["queries"]}
            assert set(answered) == {f"q_{r['image']}" for r in queries}
            for name, q in answered.items():
                assert q["status"] == "answered", (name, q)
                assert 1 <= len(q["neighbours"]) <= 5, (name, q)
            for f in ("results.csv", "contact_sheet.png", "gallery.html"):
                assert (results_dirs[0] / f).stat().st_size > 0, f
            assert not list(inbox.iterdir())  # inbox emptied
            query_tis = check_ran_in_celery_worker(
                c, "imgsim_query", query_run, {"collect", "embed", "lookup", "write_results"}
            )

            # ---- the Celery worker ran every task instance
            worker_log = c.airflow.procs["celery-worker"].log.read_text(errors="replace")
            executed = worker_log.count("Executing workload in Celery")
            assert executed >= len(index_tis) + len(query_tis), executed
            for ti in index_tis + query_tis:
                assert f"task_id='{ti['task_id']}'" in worker_log, ti["task_id"]

            # ---- Airflow's metadata (and Celery's results) are in Postgres
            # The worker stores a task's Celery result just after the task's own state, so
            # the last one may lag the run's end by a moment.
            deadline = time.monotonic() + 60
            while True:
                with c.postgres.connect() as conn, conn.cursor() as cur:
                    cur.execute("SELECT dag_id, run_id, state FROM dag_run")
                    db_runs = {(d, r): s for d, r, s in cur.fetchall()}
                    cur.execute(
                        "SELECT count(*) FROM task_instance WHERE hostname = %s",
                        (CELERY_WORKER_NAME,),
                    )
                    (db_tis,) = cur.fetchone()
                    cur.execute("SELECT status, count(*) FROM celery_taskmeta GROUP BY status")
                    celery_results = dict(cur.fetchall())
                conn.close()
                if (
                    celery_results.get("SUCCESS", 0) >= len(index_tis) + len(query_tis)
                    or time.monotonic() > deadline
                ):
                    break
                time.sleep(2)
            assert db_runs[("imgsim_index", index_run)] == "success"
            assert db_runs[("imgsim_query", query_run)] == "success"
            assert db_tis == len(index_tis) + len(query_tis)
            assert celery_results.get("SUCCESS", 0) >= len(index_tis) + len(query_tis)

            # ---- the Spark applications ran their executors on the standalone worker
            master, worker = c.spark.master_state(), c.spark.worker_state()
            (OUTPUT / "spark-master.json").write_text(json.dumps(master, indent=2))
            (OUTPUT / "spark-worker.json").write_text(json.dumps(worker, indent=2))
            assert [w["state"] for w in master["workers"]] == ["ALIVE"]
            embed = spark_app(master, "imgsim-embed")
            fit = spark_app(master, "imgsim-fit-lsh")
            learn = spark_app(master, "imgsim-learn-projection")
            query = spark_app(master, "imgsim-query-lsh")
            on_worker = {e["appid"] for e in worker["finishedexecutors"]}
            for app in (embed, learn, fit, query):
                assert app["state"] == "FINISHED", app
                assert app["id"] in on_worker, (app["id"], on_worker)
                logs = list((c.spark.worker_dir / app["id"]).glob("*/stderr"))
                assert logs, f"no executor logs for {app['id']} in {c.spark.worker_dir}"
                assert any("Finished task" in p.read_text(errors="replace") for p in logs)
            c.check()  # nothing died on the way
            summary = {
                "cluster_up_s": round(up, 1),
                "index_run_s": round(index_s, 1),
                "query_run_s": round(query_s, 1),
                "index_run": index_run,
                "query_run": query_run,
                "model_version": manifest["version"],
                "spark_master": c.spark.url,
                "spark_apps": {
                    a["name"]: {"id": a["id"], "state": a["state"], "cores": a["cores"]}
                    for a in (embed, fit, query)
                },
                "executors_on_worker": sorted(on_worker),
                "task_instances_on_celery_worker": db_tis,
            }
            (OUTPUT / "summary.json").write_text(json.dumps(summary, indent=2))
            print(json.dumps(summary, indent=2))
