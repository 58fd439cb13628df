"""One index run at a time per data root: a lease file that serializes `imgsim_index` runs.

The scheduler's ``max_active_runs=1`` serializes scheduled and triggered runs of one
deployment, but not everything: backfills run with their own ``--max-active-runs``, and two
deployments (say, a laptop and a cluster) can point at the same data root. Two overlapping
index runs would both see the same images as new, embed them twice, and the run that fitted
the older snapshot could publish last. So the first task of a run takes the lease at
``<root>/locks/index.lease`` and the last one gives it back.

The lease is a small JSON file, replaced atomically under an ``flock``. A run that finds it
held by another run waits (the DAG's sensor re-checks in reschedule mode, so no worker slot is
held). A lease whose holder is no longer running (failed, killed, marked failed by hand, or
deleted) is stale: ``holder_alive`` says so, and the next run takes it over with a warning.
Re-acquiring by the holder itself (a retried task) is allowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgsim.config import Layout
from imgsim.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)

INDEX_LEASE = "index"
LIVE_RUN_STATES = frozenset({"queued", "running"})


class LeaseLost(RuntimeError):
    """The run does not hold the lease it needs (another run took it over)."""


@dataclass(frozen=True)
class Lease:
    run_id: str
    acquired_at: str
    host: str
    pid: int

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lease:
        return cls(run_id=str(d["run_id"]), acquired_at=str(d.get("acquired_at", "")),
                   host=str(d.get("host", "")), pid=int(d.get("pid", 0)))


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
        raise RuntimeError(f"lease file {path} is damaged ({exc}); delete it once no index run "
                           "is active") from exc


def try_acquire(layout: Layout, run_id: str, holder_alive: Callable[[str], bool],
                name: str = INDEX_LEASE) -> Lease | None:
    """Take the lease for ``run_id``. Returns None when taken, else the live lease in the way.

    ``holder_alive(run_id)`` says whether another holder's run is still queued or running.
    """
    if not run_id:
        raise ValueError("run_id must not be empty")
    path = lease_path(layout, name)
    with _locked(path):
        current = read_lease(layout, name)
        if current is not None and current.run_id != run_id:
            if holder_alive(current.run_id):
                return current
            log.warning("taking over the %s lease from run %r, which is no longer running "
                        "(held since %s on %s)", name, current.run_id, current.acquired_at,
                        current.host)
        if current is not None and current.run_id == run_id:
            return None                               # a retry of the holder's own task
        lease = Lease(run_id=run_id, acquired_at=datetime.now(UTC).isoformat(timespec="seconds"),
                      host=socket.gethostname(), pid=os.getpid())
        atomic_write_json(path, asdict(lease))
        log.info("run %r holds the %s lease %s", run_id, name, path)
        return None


def ensure_held(layout: Layout, run_id: str, name: str = INDEX_LEASE) -> None:
    """Raise LeaseLost unless ``run_id`` holds the lease (checked before publishing)."""
    current = read_lease(layout, name)
    if current is None or current.run_id != run_id:
        holder = current.run_id if current else "nobody"
        raise LeaseLost(f"run {run_id!r} does not hold the {name} lease ({lease_path(layout, name)}"
                        f" is held by {holder}); another index run took over, so this run "
                        "must not publish. Re-run it after that run finishes.")


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


def airflow_run_alive(dag_id: str) -> Callable[[str], bool]:
    """``holder_alive`` for a task: asks Airflow (execution API) for the holder run's state."""

    def alive(run_id: str) -> bool:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        try:
            state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
        except Exception as exc:
            log.warning("could not read the state of run %r of %s (%s); treating it as gone",
                        run_id, dag_id, exc)
            return False
        return str(getattr(state, "value", state)) in LIVE_RUN_STATES

    return alive


def take_for_run(layout: Layout, run_id: str, dag_id: str) -> bool:
    """The lease sensor's poke: True once ``run_id`` holds the lease, False while it waits."""
    holder = try_acquire(layout, run_id, airflow_run_alive(dag_id))
    if holder is not None:
        log.info("waiting for the %s lease: run %r holds it since %s (on %s); this run starts "
                 "when it finishes", INDEX_LEASE, holder.run_id, holder.acquired_at, holder.host)
    return holder is None
