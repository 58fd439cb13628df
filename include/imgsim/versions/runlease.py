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

The lease names the deployment that holds it (:func:`deployment_id`: ``IMGSIM_DEPLOYMENT_ID``,
else a hash of the Airflow metadata database's URL, so every scheduler, worker and API server
of one deployment agree and two deployments differ) and carries a heartbeat (``heartbeat_at``),
renewed every ``IMGSIM_LEASE_TTL_S / 6`` by every running task of the holder run
(:func:`keep_alive`).

A lease held by a run of *this* deployment whose run is no longer running (failed, killed,
marked failed by hand, or deleted) is stale: ``holder_alive`` asks this deployment's database,
and the next run takes it over with a warning. When the holder's state cannot be read (a
metadata-database hiccup), the lease fails *closed*: the read is retried, and if it still fails
the holder counts as alive and the run keeps waiting. A lease held by *another* deployment
(whose runs this database does not know) is taken over only once its heartbeat is older than
``IMGSIM_LEASE_TTL_S``; equal run ids on two deployments (``scheduled__<date>``) are two runs,
never "a retry of the holder's own task". Re-acquiring by the holder itself (a retried task of
the same run on the same deployment) is allowed.
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
from imgsim.fsutil import atomic_write_json, exclusive_lock, read_json

log = logging.getLogger(__name__)

INDEX_LEASE = "index"
LIVE_RUN_STATES = frozenset({"queued", "running"})
#: A run waits at most this long for the lease, then fails naming the holder.
MAX_WAIT = timedelta(days=1)
#: IMGSIM_LEASE_TTL_S's default: another deployment's lease without a heartbeat for this long
#: is taken over (longer than any gap between two tasks of a run and any one Spark job).
LEASE_TTL_S = 3 * 3600.0


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
    deployment: str = ""  # deployment_id() of the holder ("" in leases before it existed)
    heartbeat_at: str = ""  # last sign of life of the holder run ("": acquired_at)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lease:
        return cls(
            run_id=str(d["run_id"]),
            acquired_at=str(d.get("acquired_at", "")),
            host=str(d.get("host", "")),
            pid=int(d.get("pid", 0)),
            deployment=str(d.get("deployment", "")),
            heartbeat_at=str(d.get("heartbeat_at", "")),
        )

    def last_seen(self) -> datetime | None:
        try:
            return datetime.fromisoformat(self.heartbeat_at or self.acquired_at)
        except ValueError:
            return None

    def expired(self, ttl_s: float, now: datetime | None = None) -> bool:
        """No heartbeat for ``ttl_s`` (or none readable)."""
        seen = self.last_seen()
        return seen is None or (now or datetime.now(UTC)) - seen > timedelta(seconds=ttl_s)

    def held_by(self, run_id: str, deployment: str) -> bool:
        return self.run_id == run_id and self.deployment == deployment


def deployment_id(explicit: str = "") -> str:
    """Who this Airflow deployment is, the same in all of its processes: ``explicit``
    (IMGSIM_DEPLOYMENT_ID) when set, else ``db:`` + the first 12 hex digits of the sha256 of
    the metadata database's URL (never the URL itself: it may hold a password), else the host.
    """
    if explicit:
        return explicit
    import hashlib

    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not url:
        try:
            from airflow.configuration import conf

            url = str(conf.get("database", "sql_alchemy_conn", fallback="") or "")
        except Exception:  # no Airflow configuration in this process
            url = ""
    if url:
        return "db:" + hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"host:{socket.gethostname()}"


def lease_path(layout: Layout, name: str = INDEX_LEASE) -> Path:
    return layout.root / "locks" / f"{name}.lease"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with exclusive_lock(path.with_name(path.name + ".lock")):
        yield


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
    layout: Layout,
    run_id: str,
    holder_alive: Callable[[str], bool],
    name: str = INDEX_LEASE,
    *,
    deployment: str = "",
    ttl_s: float = LEASE_TTL_S,
    now: datetime | None = None,
) -> Lease | None:
    """Take the lease for ``run_id`` of ``deployment``. Returns None when taken, else the live
    lease in the way.

    ``holder_alive(run_id)`` says whether a holder run of this deployment is still queued or
    running; another deployment's holder is alive while its heartbeat is younger than
    ``ttl_s``.
    """
    if not run_id:
        raise ValueError("run_id must not be empty")
    path = lease_path(layout, name)
    now = now or datetime.now(UTC)
    with _locked(path):
        current = read_lease(layout, name)
        if current is not None and current.held_by(run_id, deployment):
            _write(path, replace_heartbeat(current, now))  # a retry of the holder's own task
            return None
        if current is not None:
            why = _why_gone(current, holder_alive, deployment, ttl_s, now, name)
            if why is None:
                return current
            log.warning(
                "taking over the %s lease from run %r of deployment %s (held since %s on %s): %s",
                name,
                current.run_id,
                current.deployment or "unknown",
                current.acquired_at,
                current.host,
                why,
            )
        stamp = now.isoformat(timespec="seconds")
        lease = Lease(run_id, stamp, socket.gethostname(), os.getpid(), deployment, stamp)
        _write(path, lease)
        log.info("run %r (deployment %s) holds the %s lease %s", run_id, deployment, name, path)
        return None


def _why_gone(
    current: Lease,
    holder_alive: Callable[[str], bool],
    deployment: str,
    ttl_s: float,
    now: datetime,
    name: str,
) -> str | None:
    """Why ``current``'s holder is gone (None: alive, or not known to be gone)."""
    if current.deployment != deployment:
        if not current.expired(ttl_s, now):
            return None
        seen = current.heartbeat_at or current.acquired_at
        return (
            f"another deployment's run, no heartbeat since {seen} "
            f"(more than IMGSIM_LEASE_TTL_S {ttl_s:.0f} s)"
        )
    try:
        if holder_alive(current.run_id):
            return None
    except HolderStateUnknown as exc:
        log.warning(
            "%s; the %s lease stays with run %r and this run keeps waiting",
            exc,
            name,
            current.run_id,
        )
        return None
    return "that run is no longer running"


def replace_heartbeat(lease: Lease, now: datetime) -> Lease:
    return Lease(**{**asdict(lease), "heartbeat_at": now.isoformat(timespec="seconds")})


def _write(path: Path, lease: Lease) -> None:
    atomic_write_json(path, asdict(lease))


def heartbeat(layout: Layout, run_id: str, deployment: str = "", name: str = INDEX_LEASE) -> bool:
    """Renew the lease's heartbeat if ``run_id`` of ``deployment`` holds it; whether it did."""
    path = lease_path(layout, name)
    if not path.exists():
        return False
    with _locked(path):
        current = read_lease(layout, name)
        if current is None or not current.held_by(run_id, deployment):
            return False
        _write(path, replace_heartbeat(current, datetime.now(UTC)))
        return True


@contextlib.contextmanager
def keep_alive(
    layout: Layout,
    run_id: str,
    deployment: str = "",
    every_s: float = LEASE_TTL_S / 6,
    name: str = INDEX_LEASE,
) -> Iterator[None]:
    """While the block runs, renew the heartbeat of ``run_id``'s lease every ``every_s`` (a
    daemon thread; nothing happens if the run does not hold the lease)."""
    import threading

    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                heartbeat(layout, run_id, deployment, name)
            except Exception as exc:  # a damaged lease file or a full disk: say so, go on
                log.warning("could not renew the %s lease's heartbeat: %s", name, exc)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=beat, name=f"imgsim-{name}-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def ensure_held(
    layout: Layout, run_id: str, name: str = INDEX_LEASE, *, deployment: str = ""
) -> None:
    """Raise LeaseLost unless ``run_id`` of ``deployment`` holds the lease (checked before
    publishing and rolling back)."""
    current = read_lease(layout, name)
    if current is None or not current.held_by(run_id, deployment):
        holder = (
            f"run {current.run_id!r} of deployment {current.deployment or 'unknown'}"
            if current
            else "nobody"
        )
        raise LeaseLost(
            f"run {run_id!r} does not hold the {name} lease ({lease_path(layout, name)}"
            f" is held by {holder}); another index run took over, so this run "
            "must not publish. Re-run it after that run finishes."
        )


def release(layout: Layout, run_id: str, name: str = INDEX_LEASE, *, deployment: str = "") -> bool:
    """Give the lease back if ``run_id`` of ``deployment`` holds it. Returns whether it did."""
    path = lease_path(layout, name)
    with _locked(path):
        current = read_lease(layout, name)
        if current is None or not current.held_by(run_id, deployment):
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
    deployment: str = "",
    ttl_s: float = LEASE_TTL_S,
) -> Lease | None:
    """Try every ``poke_s`` for at most ``hold_s``: None once ``run_id`` holds the lease, else
    the lease still in the way (the caller then gives its worker slot back)."""
    deadline = clock() + hold_s
    while True:
        holder = try_acquire(layout, run_id, holder_alive, deployment=deployment, ttl_s=ttl_s)
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
    deployment: str = "",
    ttl_s: float = LEASE_TTL_S,
) -> None:
    """The lease task: returns once ``run_id`` holds the lease.

    While another live run holds it, waits on the worker for at most ``hold_s``, then raises
    Airflow's reschedule request (re-queued ``requeue_s`` later, no worker slot held in
    between). After :data:`MAX_WAIT` since ``waiting_since`` (the run's start), it fails.
    """
    holder = wait_for_lease(
        layout,
        run_id,
        airflow_run_alive(dag_id),
        poke_s=poke_s,
        hold_s=hold_s,
        deployment=deployment,
        ttl_s=ttl_s,
    )
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
