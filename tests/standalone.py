"""Run `airflow standalone` (as `make airflow` does) for a test, and talk to its REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Airflow:
    base: str
    env: dict[str, str]
    token: str = ""

    def login(self, user: str = "admin", timeout: float = 180.0) -> None:
        """Wait for the API, then get a token with the generated password."""
        pw_file = Path(self.env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + timeout
        while True:
            try:
                password = json.loads(pw_file.read_text())[user]
                body = self.call(
                    "POST", "/auth/token", {"username": user, "password": password}, auth=False
                )
                self.token = body["access_token"]
                return
            except (OSError, ValueError, KeyError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, auth: bool = True
    ) -> Any:
        req = urllib.request.Request(
            self.base + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
        )
        req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        # SQLite (the embedded default) has one writer: a read can meet a busy scheduler and
        # answer 5xx. Reads are retried; writes are not (they might have happened).
        attempts = 5 if method == "GET" else 1
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    data = resp.read()
                return json.loads(data) if data else None
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == attempts - 1:
                    raise
                time.sleep(2)
        raise AssertionError("unreachable")

    def wait_for_dag(self, dag_id: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"])

    def wait_for_runs(self, dag_id: str, count: int, timeout: float) -> list[dict[str, Any]]:
        """Until ``count`` runs are finished; fails fast on a failed run."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(dag_id)
            failed = [r for r in runs if r["state"] == "failed"]
            assert not failed, f"failed runs: {[r['dag_run_id'] for r in failed]}"
            done = [r for r in runs if r["state"] == "success"]
            if len(done) >= count:
                return done
            assert time.monotonic() < deadline, f"only {len(done)}/{count} runs finished: {runs}"
            time.sleep(3)

    def trigger(
        self, dag_id: str, conf: dict[str, Any] | None = None, logical_date: str | None = "now"
    ) -> str:
        """A manual run of ``dag_id``; returns its run id.

        ``logical_date`` "now" (the default) gives the run the current time, as the UI's
        trigger form does; ``None`` makes a run without a logical date (no ``ds``).
        """
        if logical_date == "now":
            from datetime import UTC, datetime

            logical_date = datetime.now(UTC).isoformat()
        body = self.call(
            "POST",
            f"/api/v2/dags/{dag_id}/dagRuns",
            {"logical_date": logical_date, "conf": conf or {}},
        )
        return str(body["dag_run_id"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100"
        return list(self.call("GET", path)["task_instances"])

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        """Until run ``run_id`` succeeds; fails at once, naming the task states, if it fails."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] == "success":
                return dict(run)
            if run["state"] == "failed" or time.monotonic() > deadline:
                states = {
                    (t["task_id"], t["map_index"]): t["state"]
                    for t in self.task_instances(dag_id, run_id)
                }
                raise AssertionError(f"{dag_id} run {run_id} is {run['state']}: {states}")
            time.sleep(3)

    def wait_for_backfills(self, dag_id: str, count: int, timeout: float) -> None:
        """Until ``count`` backfills of ``dag_id`` exist and every one has completed; fails
        fast on a failed run."""
        deadline = time.monotonic() + timeout
        while True:
            failed = [r["dag_run_id"] for r in self.runs(dag_id) if r["state"] == "failed"]
            assert not failed, f"failed runs: {failed}"
            fills = self.call("GET", f"/api/v2/backfills?dag_id={dag_id}")["backfills"]
            if len(fills) >= count and all(b["completed_at"] is not None for b in fills):
                return
            assert time.monotonic() < deadline, f"backfills not completed: {fills}"
            time.sleep(3)


@contextlib.contextmanager
def standalone(env: dict[str, str], log: Path) -> Iterator[Airflow]:
    """`airflow standalone` on a free port; stopped (SIGINT, then SIGKILL) on exit."""
    port = free_port()
    env = {
        **env,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
        # the scheduler's and triggerer's log servers (8793/8794 by default): free ports,
        # so that two standalones (parallel test processes) do not collide
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "standalone"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            airflow = Airflow(f"http://127.0.0.1:{port}", env)
            airflow.login()
            yield airflow
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # stray children of standalone
                os.killpg(proc.pid, signal.SIGKILL)
