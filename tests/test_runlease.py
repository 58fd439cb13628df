"""The index-run lease: one imgsim_index run at a time per data root."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from imgsim.config import Layout
from imgsim.versions import runlease
from imgsim.versions.runlease import (
    MAX_WAIT,
    HolderStateUnknown,
    LeaseLost,
    airflow_run_alive,
    ensure_held,
    lease_path,
    read_lease,
    release,
    take_for_run,
    try_acquire,
    wait_for_lease,
)


def alive(*run_ids: str):
    return lambda run_id: run_id in run_ids


def test_first_run_takes_the_lease_and_a_second_waits(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert try_acquire(layout, "run-a", alive()) is None
    holder = try_acquire(layout, "run-b", alive("run-a"))
    assert holder is not None and holder.run_id == "run-a"
    assert read_lease(layout).run_id == "run-a"  # the waiting run changed nothing
    ensure_held(layout, "run-a")
    with pytest.raises(LeaseLost, match="held by run 'run-a'"):
        ensure_held(layout, "run-b")


def test_holder_may_reacquire_its_own_lease(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    assert try_acquire(layout, "run-a", alive()) is None
    first = read_lease(layout)
    assert try_acquire(layout, "run-a", alive("run-a")) is None  # a retried first task
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
        ensure_held(layout, "run-a")  # the old run may not publish


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
    procs = [
        ctx.Process(target=_contend, args=(str(tmp_path), f"run-{i}", barrier, out))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    results = dict(out.get(timeout=5) for _ in range(n))
    winners = [r for r, got in results.items() if got]
    assert len(winners) == 1
    assert read_lease(Layout(tmp_path)).run_id == winners[0]


# -- fail closed: an unreadable holder state keeps the lease with its holder ---------------------


class FakeTaskInstance:
    """Stands in for the execution API: scripted answers of get_dagrun_state / get_dr_count."""

    def __init__(self, states: list[object], counts: list[object] | None = None) -> None:
        self.states, self.counts = list(states), list(counts or [])
        self.calls = 0

    def get_dagrun_state(self, dag_id: str, run_id: str) -> str:
        self.calls += 1
        answer = self.states.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    def get_dr_count(self, dag_id: str, run_ids: list[str]) -> int:
        answer = self.counts.pop(0) if self.counts else RuntimeError("database is locked")
        if isinstance(answer, Exception):
            raise answer
        return int(answer)  # type: ignore[call-overload]


@pytest.fixture
def execution_api(monkeypatch: pytest.MonkeyPatch):
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    def install(fake: FakeTaskInstance) -> FakeTaskInstance:
        monkeypatch.setattr(
            RuntimeTaskInstance, "get_dagrun_state", staticmethod(fake.get_dagrun_state)
        )
        monkeypatch.setattr(RuntimeTaskInstance, "get_dr_count", staticmethod(fake.get_dr_count))
        return fake

    return install


def test_an_unreadable_holder_state_keeps_the_lease_with_its_holder(
    tmp_path: Path, execution_api, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: any error reading the holder's state used to count as "that run is gone"."""
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    fake = execution_api(FakeTaskInstance([RuntimeError("database is locked")] * 3))
    sleeps: list[float] = []
    holder = try_acquire(layout, "run-b", airflow_run_alive("imgsim_index", sleep=sleeps.append))
    assert holder is not None and holder.run_id == "run-a"
    assert read_lease(layout).run_id == "run-a"
    assert fake.calls == 3 and sleeps == [2.0, 4.0]  # retried, with a pause
    assert "keeps waiting" in caplog.text and "database is locked" in caplog.text


def test_a_transient_error_is_retried_and_the_real_state_used(
    tmp_path: Path, execution_api
) -> None:
    execution_api(
        FakeTaskInstance([RuntimeError("timeout"), "running", RuntimeError("x"), "failed"])
    )
    is_alive = airflow_run_alive("imgsim_index", sleep=lambda s: None)
    assert is_alive("run-a") is True
    assert is_alive("run-a") is False


def test_a_deleted_holder_run_is_gone(tmp_path: Path, execution_api) -> None:
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    execution_api(FakeTaskInstance([RuntimeError("404 not found")], counts=[0]))
    assert try_acquire(layout, "run-b", airflow_run_alive("imgsim_index")) is None
    assert read_lease(layout).run_id == "run-b"


def test_holder_state_unknown_from_any_checker_means_wait(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())

    def unknown(run_id: str) -> bool:
        raise HolderStateUnknown("no answer")

    assert try_acquire(layout, "run-b", unknown).run_id == "run-a"


# -- a bounded wait on the worker, then a re-queue --------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_wait_for_lease_gives_up_the_slot_after_hold_s(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    clock = FakeClock()
    holder = wait_for_lease(
        layout, "run-b", alive("run-a"), poke_s=30, hold_s=120, sleep=clock.sleep, clock=clock
    )
    assert holder is not None and holder.run_id == "run-a"
    assert clock.sleeps == [30, 30, 30, 30] and clock.now <= 120


def test_wait_for_lease_takes_the_lease_once_freed(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    clock = FakeClock()

    def sleep(s: float) -> None:
        clock.sleep(s)
        if clock.now >= 60:
            release(layout, "run-a")

    assert (
        wait_for_lease(
            layout, "run-b", alive("run-a"), poke_s=30, hold_s=600, sleep=sleep, clock=clock
        )
        is None
    )
    assert read_lease(layout).run_id == "run-b" and clock.now == 60


def test_take_for_run_requeues_then_fails_after_a_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException

    layout = Layout(tmp_path)
    try_acquire(layout, "run-a", alive())
    monkeypatch.setattr(runlease, "airflow_run_alive", lambda dag_id: alive("run-a"))
    kw = {"poke_s": 1.0, "hold_s": 0.0, "requeue_s": 300.0}
    now = datetime.now(UTC)
    with pytest.raises(AirflowRescheduleException) as exc_info:
        take_for_run(layout, "run-b", "imgsim_index", waiting_since=now, **kw)
    delay = (exc_info.value.reschedule_date - now).total_seconds()
    assert 299 <= delay <= 330
    with pytest.raises(AirflowFailException, match="run-a"):
        take_for_run(
            layout,
            "run-b",
            "imgsim_index",
            waiting_since=now - MAX_WAIT - timedelta(minutes=1),
            **kw,
        )
    release(layout, "run-a")
    assert take_for_run(layout, "run-b", "imgsim_index", waiting_since=now, **kw) is None
    assert read_lease(layout).run_id == "run-b"


# -- two deployments on one data root (issue 23 item 4) -----------------------------------------


def test_a_run_of_another_deployment_is_never_taken_for_gone_while_it_beats(
    tmp_path: Path,
) -> None:
    """Deployment B's database does not know A's runs: B waits while A's heartbeat is fresh
    (formerly the unknown run counted as gone and was taken over), then takes over once it
    expired."""
    from datetime import UTC, datetime, timedelta

    layout = Layout(tmp_path)
    t0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    assert try_acquire(layout, "run-a", alive(), deployment="db:A", now=t0) is None
    nobody = alive()  # B's database: no such run
    later = t0 + timedelta(seconds=3000)
    held = try_acquire(layout, "run-b", nobody, deployment="db:B", ttl_s=3600, now=later)
    assert held is not None and held.run_id == "run-a" and held.deployment == "db:A"
    # A beats: still A's an hour and a half after it started
    assert runlease.heartbeat(layout, "run-a", "db:A")
    assert not runlease.heartbeat(layout, "run-a", "db:B")  # B cannot renew A's lease
    beat = read_lease(layout).last_seen()
    assert try_acquire(layout, "run-b", nobody, deployment="db:B", ttl_s=3600) is not None
    # no heartbeat for longer than the TTL: B takes over, and A may no longer publish
    expired = beat + timedelta(seconds=3601)
    assert try_acquire(layout, "run-b", nobody, deployment="db:B", ttl_s=3600, now=expired) is None
    assert read_lease(layout).deployment == "db:B"
    with pytest.raises(LeaseLost, match="deployment db:B"):
        ensure_held(layout, "run-a", deployment="db:A")


def test_equal_run_ids_on_two_deployments_are_two_runs(tmp_path: Path) -> None:
    """``scheduled__2026-12-07`` on the laptop and on the cluster: not "a retry of the
    holder's own task"; neither may publish or release the other's lease."""
    layout = Layout(tmp_path)
    run = "scheduled__2026-12-07T00:00:00+00:00"
    assert try_acquire(layout, run, alive(), deployment="db:A") is None
    assert try_acquire(layout, run, alive(run), deployment="db:B") is not None
    with pytest.raises(LeaseLost):
        ensure_held(layout, run, deployment="db:B")
    assert release(layout, run, deployment="db:B") is False
    ensure_held(layout, run, deployment="db:A")
    assert release(layout, run, deployment="db:A") is True


def test_keep_alive_renews_the_heartbeat_while_a_task_runs(tmp_path: Path) -> None:
    import time

    layout = Layout(tmp_path)
    assert try_acquire(layout, "run-a", alive(), deployment="db:A") is None
    path = lease_path(layout)
    before = json.loads(path.read_text())
    before["heartbeat_at"] = "2026-01-01T00:00:00+00:00"
    path.write_text(json.dumps(before))
    with runlease.keep_alive(layout, "run-a", "db:A", every_s=0.05):
        time.sleep(0.2)
    assert read_lease(layout).heartbeat_at > "2026-01-01T00:00:00+00:00"
    assert read_lease(layout).acquired_at == before["acquired_at"]


def test_the_deployment_id_is_a_hash_of_the_metadata_db_never_its_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "postgresql+psycopg2://airflow:s3cret@postgres/airflow"
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", secret)
    got = runlease.deployment_id()
    assert got.startswith("db:") and "s3cret" not in got and len(got) == 15
    assert runlease.deployment_id() == got  # the same in every process of the deployment
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", secret.replace("postgres/", "pg2/"))
    assert runlease.deployment_id() != got
    assert runlease.deployment_id("laptop") == "laptop"  # IMGSIM_DEPLOYMENT_ID
