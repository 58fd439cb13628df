"""The index-run lease: one imgsim_index run at a time per data root."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from imgsim.config import Layout
from imgsim.runlease import (
    LeaseLost,
    ensure_held,
    lease_path,
    read_lease,
    release,
    try_acquire,
)


def alive(*run_ids: str):
    return lambda run_id: run_id in run_ids


def test_first_run_takes_the_lease_and_a_second_waits(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert try_acquire(layout, "run-a", alive()) is None
    holder = try_acquire(layout, "run-b", alive("run-a"))
    assert holder is not None and holder.run_id == "run-a"
    assert read_lease(layout).run_id == "run-a"           # the waiting run changed nothing
    ensure_held(layout, "run-a")
    with pytest.raises(LeaseLost, match="held by run-a"):
        ensure_held(layout, "run-b")


def test_holder_may_reacquire_its_own_lease(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert try_acquire(layout, "run-a", alive()) is None
    first = read_lease(layout)
    assert try_acquire(layout, "run-a", alive("run-a")) is None   # a retried first task
    assert read_lease(layout) == first


def test_release_frees_the_lease_only_for_its_holder(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    assert release(layout, "run-b") is False
    assert read_lease(layout).run_id == "run-a"
    assert release(layout, "run-a") is True
    assert read_lease(layout) is None
    assert try_acquire(layout, "run-b", alive("run-a")) is None
    assert read_lease(layout).run_id == "run-b"


def test_a_stale_lease_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    # run-a was killed or marked failed: it never released. run-b takes over, with a warning.
    assert try_acquire(layout, "run-b", alive()) is None
    assert read_lease(layout).run_id == "run-b"
    assert "taking over" in caplog.text and "run-a" in caplog.text
    with pytest.raises(LeaseLost):
        ensure_held(layout, "run-a")                       # the old run may not publish


def test_no_lease_means_nobody_may_publish(tmp_path: Path) -> None:
    with pytest.raises(LeaseLost, match="nobody"):
        ensure_held(Layout(tmp_path), "run-a")


def test_damaged_lease_file_is_an_error_not_a_free_lease(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    path = lease_path(layout)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(RuntimeError, match="damaged"):
        try_acquire(layout, "run-a", alive())
    path.write_text(json.dumps({"acquired_at": "x"}))
    with pytest.raises(RuntimeError, match="damaged"):
        read_lease(layout)


def test_empty_run_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="run_id"):
        try_acquire(Layout(tmp_path), "", alive())


def _contend(root: str, run_id: str, barrier, out) -> None:
    barrier.wait()
    got = try_acquire(Layout(Path(root)), run_id, lambda r: True) is None
    out.put((run_id, got))


def test_simultaneous_acquires_in_separate_processes_admit_exactly_one(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), f"run-{i}", barrier, out))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = dict(out.get(timeout=5) for _ in range(n))
    winners = [r for r, got in results.items() if got]
    assert len(winners) == 1
    assert read_lease(Layout(tmp_path)).run_id == winners[0]
