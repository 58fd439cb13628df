"""One index run at a time per data root: a lease file that serializes `imgsim_index` runs.

The scheduler's ``max_active_runs=1`` serializes scheduled and triggered runs of one
deployment, but not everything: backfills run with their own ``--max-active-runs``, and two
deployments (say, a laptop and a cluster) can point at the same data root. Two overlapping
index runs would both see the same images as new, embed them twice, and the run that fitted
the older snapshot could publish last. So the first task of a run takes the lease at
``<root>/locks/index.lease`` and the last one gives it back.

The lease is a small JSON file, replaced atomically under an ``flock``. A run that finds it
held by another run waits: it re-checks every ``IMGSIM_LEASE_POKE_S`` for at most
``IMGSIM_LEASE_HOLD_S`` on its worker slot, then gives the slot back and is re-queued
``IMGSIM_LEASE_REQUEUE_S`` later (Airflow's up-for-reschedule), until the lease is free or the
run has waited a day (then it fails, naming the holder). The re-queue delay is long on purpose:
in Airflow 3.3 a reschedule-mode sensor re-queued within seconds could meet the executor's late
report of its previous poke and be failed into a retry.

A lease whose holder is no longer running (failed, killed, marked failed by hand, or deleted)
is stale: ``holder_alive`` says so, and the next run takes it over with a warning. When the
holder's state cannot be read (a metadata-database hiccup), the lease fails *closed*: the read
is retried, and if it still fails the holder counts as alive and the run keeps waiting, so two
runs never embed and publish at the same time. Re-acquiring by the holder itself (a retried
task) is allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from imgsim.config import Layout
from imgsim.errors import PermanentError
from imgsim.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)

INDEX_LEASE = "index"
LIVE_RUN_STATES = frozenset({"queued", "running"})
#: A run waits at most this long for the lease, then fails naming the holder.
MAX_WAIT = timedelta(days=1)


class LeaseLost(RuntimeError, PermanentError):
    """The run does not hold the lease it needs (another run took it over)."""


class HolderStateUnknown(RuntimeError):
    """The holder run's state could not be read; the lease stays with it (fail closed)."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    acquired_at: str
    host: str
    pid: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lease:
        return cls(
            run_id=str(d["run_id"]),
            acquired_at=str(d.get("acquired_at", "")),
            host=str(d.get("host", "")),
            pid=int(d.get("pid", 0)),
        )


def lease_path(layout: Layout, name: str = INDEX_LEASE) -> Path:
    return layout.root / "locks" / f"{name}.lease"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_lease(layout: Layout, name: str = INDEX_LEASE) -> Lease | None:
    """The current lease, or None. A damaged lease file is reported, never silently ignored."""
    path = lease_path(layout, name)
    if not path.exists():
        return None
    try:
        return Lease.from_dict(read_json(path))
    except (ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"lease file {path} is damaged ({exc}); delete it once no index run is active"
        ) from exc


def try_acquire(
    layout: Layout, run_id: str, holder_alive: Callable[[str], bool], name: str = INDEX_LEASE
) -> Lease | None:
    """Take the lease for ``run_id``. Returns None when taken, else the live lease in the way.

    ``holder_alive(run_id)`` says whether another holder's run is still queued or running.
    """
    if not run_id:
        raise ValueError("run_id must not be empty")
    path = lease_path(layout, name)
    with _locked(path):
        current = read_lease(layout, name)
        if current is not None and current.run_id != run_id:
            try:
                holder_is_alive = holder_alive(current.run_id)
            except HolderStateUnknown as exc:
                log.warning(
                    "%s; the %s lease stays with run %r and this run keeps waiting",
                    exc,
                    name,
                    current.run_id,
                )
                return current
            if holder_is_alive:
                return current
            log.warning(
                "taking over the %s lease from run %r, which is no longer running "
                "(held since %s on %s)",
                name,
                current.run_id,
                current.acquired_at,
                current.host,
            )
        if current is not None and current.run_id == run_id:
            return None  # a retry of the holder's own task
        lease = Lease(
            run_id=run_id,
            acquired_at=datetime.now(UTC).isoformat(timespec="seconds"),
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        atomic_write_json(path, asdict(lease))
        log.info("run %r holds the %s lease %s", run_id, name, path)
        return None


def ensure_held(layout: Layout, run_id: str, name: str = INDEX_LEASE) -> None:
    """Raise LeaseLost unless ``run_id`` holds the lease (checked before publishing)."""
    current = read_lease(layout, name)
    if current is None or current.run_id != run_id:
        holder = current.run_id if current else "nobody"
        raise LeaseLost(
            f"run {run_id!r} does not hold the {name} lease ({lease_path(layout, name)}"
            f" is held by {holder}); another index run took over, so this run "
            "must not publish. Re-run it after that run finishes."
        )


def release(layout: Layout, run_id: str, name: str = INDEX_LEASE) -> bool:
    """Give the lease back if ``run_id`` holds it. Returns whether it did."""
    path = lease_path(layout, name)
    with _locked(path):
        current = read_lease(layout, name)
        if current is None or current.run_id != run_id:
            return False
        path.unlink()
        log.info("run %r released the %s lease", run_id, name)
        return True


def airflow_run_alive(
    dag_id: str,
    attempts: int = 3,
    pause_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[[str], bool]:
    """``holder_alive`` for a task: asks Airflow (execution API) for the holder run's state.

    A run that no longer exists (deleted) is gone. An error reading the state is retried
    ``attempts`` times; then :class:`HolderStateUnknown` is raised, which
    :func:`try_acquire` treats as "still alive" (fail closed).
    """

    def alive(run_id: str) -> bool:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        errors: list[str] = []
        for attempt in range(attempts):
            if attempt:
                sleep(pause_s * attempt)
            try:
                state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
                return str(getattr(state, "value", state)) in LIVE_RUN_STATES
            except Exception as exc:  # the API answers a deleted run with an error too
                errors.append(f"{type(exc).__name__}: {exc}")
            try:
                if RuntimeTaskInstance.get_dr_count(dag_id=dag_id, run_ids=[run_id]) == 0:
                    log.info("run %r of %s no longer exists", run_id, dag_id)
                    return False
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            log.warning(
                "could not read the state of run %r of %s (attempt %d of %d): %s",
                run_id,
                dag_id,
                attempt + 1,
                attempts,
                errors[-1],
            )
        raise HolderStateUnknown(
            f"could not read the state of run {run_id!r} of {dag_id} in "
            f"{attempts} attempts ({errors[-1]})"
        )

    return alive


def wait_for_lease(
    layout: Layout,
    run_id: str,
    holder_alive: Callable[[str], bool],
    *,
    poke_s: float,
    hold_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Lease | None:
    """Try every ``poke_s`` for at most ``hold_s``: None once ``run_id`` holds the lease, else
    the lease still in the way (the caller then gives its worker slot back)."""
    deadline = clock() + hold_s
    while True:
        holder = try_acquire(layout, run_id, holder_alive)
        if holder is None:
            return None
        log.info(
            "waiting for the %s lease: run %r holds it since %s (on %s); this run starts "
            "when it finishes",
            INDEX_LEASE,
            holder.run_id,
            holder.acquired_at,
            holder.host,
        )
        if clock() + poke_s > deadline:
            return holder
        sleep(poke_s)


def take_for_run(
    layout: Layout,
    run_id: str,
    dag_id: str,
    *,
    poke_s: float,
    hold_s: float,
    requeue_s: float,
    waiting_since: datetime | None,
) -> None:
    """The lease task: returns once ``run_id`` holds the lease.

    While another live run holds it, waits on the worker for at most ``hold_s``, then raises
    Airflow's reschedule request (re-queued ``requeue_s`` later, no worker slot held in
    between). After :data:`MAX_WAIT` since ``waiting_since`` (the run's start), it fails.
    """
    holder = wait_for_lease(layout, run_id, airflow_run_alive(dag_id), poke_s=poke_s, hold_s=hold_s)
    if holder is None:
        return
    from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException

    now = datetime.now(UTC)
    if waiting_since is not None and now - waiting_since > MAX_WAIT:
        raise AirflowFailException(
            f"run {run_id!r} waited since {waiting_since.isoformat(timespec='seconds')} for the "
            f"{INDEX_LEASE} lease ({lease_path(layout)}), which run {holder.run_id!r} holds since "
            f"{holder.acquired_at} on {holder.host}; giving up after {MAX_WAIT}. If that run is "
            "stuck, mark it failed; the next run takes the lease over."
        )
    log.info("giving the worker slot back; re-queued in %.0f s", requeue_s)
    raise AirflowRescheduleException(now + timedelta(seconds=requeue_s))
