"""`make demo`'s command on a fresh data root and Airflow home: offline, synthetic archive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imgsim.demo import DemoView, build_demo_archive, synthetic_car

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]


def test_demo_archive_is_deterministic_and_in_the_stanford_layout(tmp_path: Path) -> None:
    import tarfile

    from imgsim.sources.labels import read_labels

    archive, labels = build_demo_archive(tmp_path / "a")
    again, _ = build_demo_archive(tmp_path / "b")
    assert archive.read_bytes() == again.read_bytes()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert len(names) == 48 and names[0] == "car_ims/000001.jpg"
    recs = read_labels(labels)
    assert len(recs) == 48 and recs["car_ims/000001.jpg"].class_name == "Synthetic Red Sedan"
    assert synthetic_car(0, 0) != synthetic_car(0, 1)


def test_demo_indexes_offline_and_prints_the_summary(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**airflow_env, "IMGSIM_DATA_ROOT": str(tmp_path / "data")}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "imgsim"), "demo", "--date", "2026-02-01"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    out = proc.stdout
    assert "serving the synthetic demo archive at http://127.0.0.1:" in out
    assert "imgsim index built" in out
    assert "images indexed  : 48 of 48 live" in out
    # Issue 12: a quiet demo. A short view (each task as it starts and ends, progress, the
    # summary); Airflow's and Spark's whole output in the log file it names.
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 60, "\n".join(lines)
    for task in (
        "take_lease",
        "download",
        "extract",
        "catalog",
        "embed[0]",
        "fit_lsh",
        "validate",
        "publish",
        "release_lease",
    ):
        assert f"> {task} started" in out and f"+ {task} done in" in out, task
    assert "download car_ims.tgz done:" in out and "embedded 48/48 images" in out
    log_line = next(line for line in lines if line.startswith("full log: "))
    log_file = Path(log_line.split()[2])
    assert log_file.is_file() and log_file.parent == tmp_path / "data" / "logs"
    full = log_file.read_text()
    assert full.count("\n") > 10 * len(lines)
    assert "[DAG TEST] starting task_id=fit_lsh" in full


def test_demo_view_shows_tasks_progress_and_failures() -> None:
    now = [0.0]
    view = DemoView(clock=lambda: now[0])
    feed = [
        "2026-02-01T00:00:00Z [info] [DAG TEST] starting task_id=download map_index=-1 [dag]",
        "[info] download car_ims.tgz progress: 1.0 MB / 9.0 MB (11.1%) at 1.00 MB/s, ETA 8 s",
        "[info] download car_ims.tgz progress: 2.0 MB / 9.0 MB (22.2%) at 1.00 MB/s, ETA 7 s",
        "[info] download car_ims.tgz done: 9.0 MB / 9.0 MB (100.0%) at 1.00 MB/s, ETA 0 s [x]",
        "[info] [DAG TEST] end task task_id=download map_index=-1",
        "[info] [DAG TEST] starting task_id=embed map_index=0",
        "INFO - embedded 32/48 images (10.0 images/s) source=imgsim.embedding.infer",
        "INFO - embedded 48/48 images (10.0 images/s)",
        "some Spark chatter that is not shown",
        "[error] [DAG TEST] Error running task <TaskInstance: embed>",
        "[info] [DAG TEST] end task task_id=embed map_index=0",
    ]
    shown = []
    for i, line in enumerate(feed):
        now[0] = float(i)
        if (out := view.feed(line)) is not None:
            shown.append(out.strip())
    assert shown == [
        "> download started",
        "download car_ims.tgz progress: 1.0 MB / 9.0 MB (11.1%) at 1.00 MB/s, ETA 8 s",
        "download car_ims.tgz done: 9.0 MB / 9.0 MB (100.0%) at 1.00 MB/s, ETA 0 s",
        "+ download done in 4 s",
        "> embed[0] started",
        "embedded 32/48 images (10.0 images/s)",
        "embedded 48/48 images (10.0 images/s)",
        "x embed[0] FAILED after 5 s",
    ]
    assert view.tasks_failed == ["embed[0]"]


def test_a_failed_task_shows_its_error_not_its_traceback() -> None:
    """The quiet view prints a failed task's error (the traceback's last line, Airflow's
    wrapper dropped) under its line and keeps it for the summary."""
    view = DemoView(clock=lambda: 0.0)
    feed = [
        "[info] [DAG TEST] starting task_id=catalog map_index=-1",
        "2026-12-07T11:25:41Z [error    ] Task failed with exception     [task]",
        "Traceback (most recent call last):",
        '  File "/x/catalog.py", line 1, in check',
        "imgsim.catalog.LabelCoverageError: the labels name 0 of 48 images (0%); expected",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        "airflow.sdk.exceptions.AirflowFailException: LabelCoverageError: the labels name 0 "
        "of 48 images (0%); expected",
        "Fix: give the labels file that belongs to these images",
        "2026-12-07T11:25:41Z [info     ] ::group::Post Execute          [task]",
        "[info] [DAG TEST] end task task_id=catalog map_index=-1",
        "[info] [DAG TEST] starting task_id=fit_plan map_index=-1",
        "ValueError: a line outside a failed task is not an error of it",
        "[info] [DAG TEST] end task task_id=fit_plan map_index=-1",
    ]
    shown = [out for line in feed if (out := view.feed(line)) is not None]
    assert shown == [
        "  > catalog started",
        "  x catalog FAILED after 0 s\n"
        "      LabelCoverageError: the labels name 0 of 48 images (0%); expected\n"
        "      Fix: give the labels file that belongs to these images",
        "  > fit_plan started",
        "  + fit_plan done in 0 s",
    ]
    assert view.errors == {
        "catalog": "LabelCoverageError: the labels name 0 of 48 images (0%); expected\n"
        "      Fix: give the labels file that belongs to these images"
    }


def test_the_summary_lines_of_an_updated_graph_and_a_placed_map() -> None:
    """A daily run updates CURRENT's graph (no share of pairs compared: the summary once
    failed with KeyError 'pairs_share' after the index was built) and places new references
    into the map."""
    from imgsim.demo import describe_graph, describe_map

    manifest = {
        "version": "v2",
        "neighbours": {
            "k": 10,
            "recall_at_k": 1.0,
            "mode": "incremental",
            "previous": "v1",
            "changes": {"new": 3, "gone": 1, "lost": 0},
            "seconds": 12.5,
        },
        "duplicates": {"groups": 4, "distance": 0.41},
        "map": {
            "points": 4036,
            "references": 8133,
            "layout": "tsne",
            "laid_out_in": "v1",
            "placed": 3,
            "seconds": 2.0,
            "same_class_nearest_on_map": 0.9035,
            "same_class_nearest_in_space": 0.8748,
        },
    }
    assert describe_graph(manifest) == (
        "k=10, recall@10 1.000 against exact search, updated from v1 (3 new, 1 gone), 12 s; "
        "4 near-duplicate group(s) at distance <= 0.41"
    )
    assert describe_map(manifest) == (
        "4036 of 8133 references, t-SNE, 3 placed into v1's layout, 2 s; nearest point on "
        "the map of the same class: 90% (in the search space: 87%)"
    )
    manifest["map"]["laid_out_in"] = "v2"
    assert ", laid out anew, " in describe_map(manifest)
    assert describe_map({"version": "v2"}).startswith("none (IMGSIM_MAP_POINTS=0")
