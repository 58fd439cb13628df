"""The scale-out topology with real processes on 127.0.0.1, no Docker: a test helper and a demo.

* PostgreSQL (the Debian package's ``initdb``/``pg_ctl``) as Airflow's metadata DB;
* Redis (``redis-server``, no persistence) as the Celery broker;
* a Spark standalone master and one worker (``spark-class``), the target of ``spark_default``;
* Airflow 3 as separate processes: ``api-server``, ``scheduler``, ``dag-processor``,
  ``triggerer`` and ``celery worker`` (CeleryExecutor, results in Postgres).

Every service listens on 127.0.0.1 on a free port and keeps its files in a temporary folder.
Each process runs in its own process group and logs to a file; every context manager waits
for its service to answer before it yields, and stops the whole group on the way out (SIGTERM
or SIGINT, then SIGKILL), also when the body fails.

By hand (Ctrl-C stops everything)::

    .venv/bin/python -m tests.cluster up [--data-root DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from standalone import Airflow, free_port
except ImportError:  # `python -m tests.cluster`
    from tests.standalone import Airflow, free_port  # type: ignore[no-redef]

BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: the Celery worker reports this name as its task instances' hostname (see ``airflow_env``)
CELERY_WORKER_NAME = "imgsim-celery-worker-1"


class ServiceError(RuntimeError):
    """A service did not start, or died; the message ends with the tail of its log."""


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive:
            raise ServiceError(
                f"{self.name} exited with {self.popen.returncode}{log_tail(self.log)}"
            )


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return f"\n--- {path} (tail) ---\n{text[-chars:]}"


def start(
    name: str,
    cmd: list[str],
    env: Mapping[str, str],
    log: Path,
    stop_signal: int = signal.SIGTERM,
    cwd: Path | None = None,
) -> Proc:
    """Start ``cmd`` in a new session (its own process group), stdout+stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
    return Proc(name, popen, log, stop_signal)


def stop(procs: list[Proc], timeout: float = 30.0) -> None:
    """Signal every group, wait up to ``timeout`` in all, then SIGKILL what is left."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, p.stop_signal)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in procs:  # the leader may be gone while its children are not
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.popen.wait(timeout=10)


@contextlib.contextmanager
def running(
    name: str,
    cmd: list[str],
    env: Mapping[str, str],
    log: Path,
    stop_signal: int = signal.SIGTERM,
    timeout: float = 30.0,
) -> Iterator[Proc]:
    proc = start(name, cmd, env, log, stop_signal)
    try:
        yield proc
    finally:
        stop([proc], timeout)


def wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    procs: tuple[Proc, ...] = (),
    interval: float = 1.0,
) -> None:
    """Poll ``ready`` until it is true; fail early if one of ``procs`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            p.check()
        with contextlib.suppress(Exception):
            if ready():
                return
        if time.monotonic() > deadline:
            logs = "".join(log_tail(p.log) for p in procs)
            raise ServiceError(f"{what} not ready after {timeout:.0f} s{logs}")
        time.sleep(interval)


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Postgres:
    port: int
    datadir: Path
    user: str
    password: str
    database: str
    log: Path

    @property
    def sqlalchemy_url(self) -> str:
        return (
            f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/"
            f"{self.database}"
        )

    @property
    def celery_result_backend(self) -> str:
        return f"db+postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def connect(self) -> Any:
        import psycopg2

        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.database,
        )


def postgres_bin() -> Path:
    """The folder of the Debian package's server binaries (initdb, pg_ctl, postgres)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ServiceError("PostgreSQL is not installed (apt-get install postgresql)")


def _as_postgres(cmd: list[str]) -> list[str]:
    """The server refuses to run as root: as root, run it as the `postgres` system user."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@contextlib.contextmanager
def postgres(log_dir: Path, database: str = "airflow", user: str = "airflow") -> Iterator[Postgres]:
    """A throwaway cluster: initdb in a temp folder, pg_ctl start, a database and its owner."""
    import psycopg2

    pg_bin = postgres_bin()
    # Not under pytest's tmp_path: its parents are private to root; the server user owns this.
    base = Path(tempfile.mkdtemp(prefix="imgsim-pg-"))
    datadir = base / "data"
    log = base / "postgres.log"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    base.chmod(0o700)
    port = free_port()
    password = secrets.token_hex(12)
    pg = Postgres(port, datadir, user, password, database, log)
    started = False
    try:
        subprocess.run(
            _as_postgres(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(datadir),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=180,
        )
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        started = True
        proc = subprocess.run(
            _as_postgres(
                [
                    str(pg_bin / "pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    "120",
                    "-D",
                    str(datadir),
                    "-l",
                    str(log),
                    "-o",
                    opts,
                ]
            ),
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode != 0:
            raise ServiceError(f"pg_ctl start failed: {proc.stdout}{proc.stderr}{log_tail(log)}")
        admin = psycopg2.connect(host=str(base), port=port, user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f"CREATE ROLE {user} LOGIN PASSWORD %s", (password,))
            cur.execute(f"CREATE DATABASE {database} OWNER {user}")
        admin.close()
        yield pg
    finally:
        if started:

            def pg_stop(mode: str) -> int:
                cmd = [str(pg_bin / "pg_ctl"), "stop", "-D", str(datadir), "-m", mode, "-w"]
                return subprocess.run(
                    _as_postgres([*cmd, "-t", "30"]), capture_output=True, timeout=60
                ).returncode

            if pg_stop("fast") != 0 and (datadir / "postmaster.pid").exists():
                pg_stop("immediate")
        log_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(log, log_dir / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class Redis:
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@contextlib.contextmanager
def redis(workdir: Path, log_dir: Path) -> Iterator[Redis]:
    """redis-server on 127.0.0.1, no RDB snapshots, no AOF."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    folder = workdir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
        "--protected-mode",
        "yes",
        "--daemonize",
        "no",
    ]
    with running("redis", cmd, os.environ, log_dir / "redis.log") as proc:
        import redis as redis_py

        client = redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        wait_until("redis", lambda: bool(client.ping()), 60, (proc,), 0.3)
        client.close()
        yield Redis(port, proc)


# --------------------------------------------------------------------------- Spark


@dataclass(frozen=True)
class SparkCluster:
    port: int
    webui_port: int
    worker_webui_port: int
    worker_dir: Path
    master_proc: Proc
    worker_proc: Proc

    @property
    def url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    def master_state(self) -> dict[str, Any]:
        """The master's JSON status: workers, activeapps, completedapps."""
        return dict(get_json(f"http://127.0.0.1:{self.webui_port}/json/"))

    def worker_state(self) -> dict[str, Any]:
        """The worker's JSON status: executors, finishedexecutors (with their app ids)."""
        return dict(get_json(f"http://127.0.0.1:{self.worker_webui_port}/json/"))


def spark_env(workdir: Path, base: Mapping[str, str]) -> dict[str, str]:
    conf_dir = workdir / "spark-conf"  # empty: no spark-defaults.conf from elsewhere
    conf_dir.mkdir(parents=True, exist_ok=True)
    local = workdir / "spark-local"
    local.mkdir(parents=True, exist_ok=True)
    return {
        **base,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_CONF_DIR": str(conf_dir),
        "SPARK_LOCAL_DIRS": str(local),
        "SPARK_DAEMON_MEMORY": "512m",
        "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false "
        "-Dspark.deploy.retainedApplications=50",
        "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=false",
    }


@contextlib.contextmanager
def spark_cluster(
    workdir: Path,
    log_dir: Path,
    base_env: Mapping[str, str],
    worker_cores: int = 1,
    worker_memory: str = "2g",
) -> Iterator[SparkCluster]:
    """A standalone master and one worker, both started with ``spark-class``."""
    env = spark_env(workdir, base_env)
    spark_class = str(BIN / "spark-class")
    port, webui, worker_webui = free_port(), free_port(), free_port()
    worker_dir = workdir / "spark-work"
    worker_dir.mkdir(parents=True, exist_ok=True)
    master_cmd = [
        spark_class,
        "org.apache.spark.deploy.master.Master",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--webui-port",
        str(webui),
    ]
    with running("spark-master", master_cmd, env, log_dir / "spark-master.log") as master:
        wait_until(
            "spark master",
            lambda: get_json(f"http://127.0.0.1:{webui}/json/")["status"] == "ALIVE",
            180,
            (master,),
        )
        worker_cmd = [
            spark_class,
            "org.apache.spark.deploy.worker.Worker",
            f"spark://127.0.0.1:{port}",
            "--host",
            "127.0.0.1",
            "--cores",
            str(worker_cores),
            "--memory",
            worker_memory,
            "--webui-port",
            str(worker_webui),
            "--work-dir",
            str(worker_dir),
        ]
        with running("spark-worker", worker_cmd, env, log_dir / "spark-worker.log") as worker:
            cluster = SparkCluster(port, webui, worker_webui, worker_dir, master, worker)

            def registered() -> bool:
                return any(w["state"] == "ALIVE" for w in cluster.master_state()["workers"])

            wait_until("spark worker registration", registered, 180, (master, worker))
            yield cluster


# --------------------------------------------------------------------------- Airflow

HOOKS_MODULE = "imgsim_cluster_hooks"


def _write_worker_hooks(folder: Path) -> Path:
    """A module for the Celery worker only: its task instances report CELERY_WORKER_NAME.

    Every component runs on this one machine, so the default hostname (the FQDN) would be the
    same for all of them; this name shows that a task instance ran in the Celery worker.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{HOOKS_MODULE}.py").write_text(
        '"""Written by tests/cluster.py for the Celery worker process only."""\n\n\n'
        f"def worker_hostname() -> str:\n    return {CELERY_WORKER_NAME!r}\n"
    )
    return folder


def airflow_env(
    home: Path,
    pg: Postgres,
    broker: Redis,
    spark: SparkCluster,
    api_port: int,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment every Airflow component shares (the embedded default's, scaled out)."""
    from imgsim.envsetup import embedded_environment

    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "IMGSIM_"))}
    base.update(extra or {})
    base["AIRFLOW_HOME"] = str(home)
    base["AIRFLOW__API__PORT"] = str(api_port)
    base["AIRFLOW__API__HOST"] = "127.0.0.1"
    env = embedded_environment(base)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.sqlalchemy_url,
            "AIRFLOW__CELERY__BROKER_URL": broker.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": pg.celery_result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            # Components sign and check each other's tokens: one secret for all of them.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps(
                {"conn_type": "spark", "host": spark.url, "extra": {"deploy-mode": "client"}}
            ),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class AirflowCluster:
    env: dict[str, str]
    api: Airflow
    procs: dict[str, Proc]
    worker_env: dict[str, str]

    def check(self) -> None:
        for p in self.procs.values():
            p.check()


def _health_ok(api: Airflow) -> bool:
    health = api.call("GET", "/api/v2/monitor/health", auth=False)
    return all(
        health.get(c, {}).get("status") == "healthy"
        for c in ("metadatabase", "scheduler", "triggerer", "dag_processor")
    )


@contextlib.contextmanager
def airflow_components(
    env: dict[str, str], log_dir: Path, workdir: Path
) -> Iterator[AirflowCluster]:
    """db migrate, then api-server, scheduler, dag-processor, triggerer and a Celery worker."""
    import importlib.util

    if importlib.util.find_spec("asyncpg") is None:
        raise ServiceError(
            "asyncpg is not installed: Airflow 3 opens an async engine on the "
            "metadata DB too, postgresql+asyncpg for PostgreSQL"
        )
    airflow = str(BIN / "airflow")
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    migrate = subprocess.run(
        [airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=900
    )
    (log_dir / "airflow-db-migrate.log").write_text(migrate.stdout + migrate.stderr)
    if migrate.returncode != 0:
        raise ServiceError(
            "airflow db migrate failed" + log_tail(log_dir / "airflow-db-migrate.log")
        )
    hooks = _write_worker_hooks(workdir / "worker-hooks")
    worker_env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(hooks), env.get("PYTHONPATH", "")]),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{HOOKS_MODULE}.worker_hostname",
    }
    commands: dict[str, tuple[list[str], dict[str, str], int]] = {
        "api-server": (
            [airflow, "api-server", "--host", "127.0.0.1", "--port", env["AIRFLOW__API__PORT"]],
            env,
            signal.SIGTERM,
        ),
        "scheduler": ([airflow, "scheduler"], env, signal.SIGTERM),
        "dag-processor": ([airflow, "dag-processor"], env, signal.SIGTERM),
        "triggerer": ([airflow, "triggerer"], env, signal.SIGTERM),
        # SIGTERM is Celery's warm shutdown: running tasks finish first.
        "celery-worker": (
            [
                airflow,
                "celery",
                "worker",
                "--concurrency",
                "2",
                "--celery-hostname",
                f"{CELERY_WORKER_NAME}@%h",
            ],
            worker_env,
            signal.SIGTERM,
        ),
    }
    procs: dict[str, Proc] = {}
    try:
        for name, (cmd, proc_env, sig) in commands.items():
            procs[name] = start(
                f"airflow {name}", cmd, proc_env, log_dir / f"airflow-{name}.log", sig
            )
        api = Airflow(f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}", env)
        everything = tuple(procs.values())
        wait_until(
            "airflow api-server",
            lambda: port_open(int(env["AIRFLOW__API__PORT"])),
            300,
            everything,
            2,
        )
        api.login(timeout=120)
        wait_until(
            "airflow components (monitor/health)", lambda: _health_ok(api), 300, everything, 2
        )
        worker_log = procs["celery-worker"].log
        wait_until(
            "celery worker",
            lambda: " ready." in worker_log.read_text(errors="replace"),
            300,
            everything,
            2,
        )
        yield AirflowCluster(env, api, procs, worker_env)
    finally:
        stop(list(procs.values()), timeout=45)


# --------------------------------------------------------------------------- everything


@dataclass
class Cluster:
    workdir: Path
    log_dir: Path
    postgres: Postgres
    redis: Redis
    spark: SparkCluster
    airflow: AirflowCluster
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def api(self) -> Airflow:
        return self.airflow.api

    @property
    def env(self) -> dict[str, str]:
        return self.airflow.env

    def check(self) -> None:
        """Fail (with the log's tail) if any process of the cluster has died."""
        for p in (self.redis.proc, self.spark.master_proc, self.spark.worker_proc):
            p.check()
        self.airflow.check()


def save_logs(workdir: Path, log_dir: Path, target: Path) -> None:
    """Copy the service logs, Airflow's task logs and the Spark executors' logs to ``target``."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        shutil.copytree(log_dir, target / "services", dirs_exist_ok=True)
    with contextlib.suppress(OSError):
        shutil.copytree(
            workdir / "airflow-home" / "logs", target / "airflow-task-logs", dirs_exist_ok=True
        )
    spark_work = workdir / "spark-work"
    for f in spark_work.glob("app-*/*/std*"):
        dest = target / "spark-executors" / f.relative_to(spark_work)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(f, dest)


@contextlib.contextmanager
def cluster(
    workdir: Path, extra_env: Mapping[str, str] | None = None, failure_logs: Path | None = None
) -> Iterator[Cluster]:
    """Postgres, Redis, Spark master + worker and the Airflow components, in that order.

    ``extra_env`` (e.g. ``IMGSIM_DATA_ROOT``) goes to every Airflow component. If the body
    (or the start) fails, the logs are copied to ``failure_logs`` before everything stops.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            try:
                pg = stack.enter_context(postgres(log_dir))
                broker = stack.enter_context(redis(workdir, log_dir))
                from imgsim.envsetup import embedded_environment

                spark_base = embedded_environment(
                    {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
                )
                spark = stack.enter_context(spark_cluster(workdir, log_dir, spark_base))
                env = airflow_env(
                    workdir / "airflow-home", pg, broker, spark, free_port(), extra_env
                )
                af = stack.enter_context(airflow_components(env, log_dir, workdir))
                yield Cluster(workdir, log_dir, pg, broker, spark, af)
            except BaseException:
                if failure_logs is not None:
                    save_logs(workdir, log_dir, failure_logs)
                raise
    finally:
        if failure_logs is not None and failure_logs.exists():
            # postgres.log is copied into log_dir only when Postgres stops.
            with contextlib.suppress(OSError):
                shutil.copyfile(
                    log_dir / "postgres.log", failure_logs / "services" / "postgres.log"
                )


# --------------------------------------------------------------------------- by hand


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole cluster; Ctrl-C stops it")
    up.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="imgsim data root shared by every component (default: WORKDIR/data)",
    )
    up.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the services' files and logs (default: a temp folder)",
    )
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="imgsim-cluster-"))
    extra = {k: v for k, v in os.environ.items() if k.startswith("IMGSIM_")}
    extra["IMGSIM_DATA_ROOT"] = str((args.data_root or workdir / "data").resolve())
    print(f"starting the cluster in {workdir} (logs in {workdir / 'logs'}) ...", flush=True)
    stopping = False

    def interrupt(signum: int, frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        with cluster(workdir, extra) as c:
            pw_file = Path(c.env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
            print(
                f"""
imgsim cluster up
  Airflow UI/API   : {c.api.base}   (user admin, password in {pw_file})
  metadata DB      : postgresql://{c.postgres.user}:***@127.0.0.1:{c.postgres.port}/{c.postgres.database}
  Celery broker    : {c.redis.url}
  Spark master     : {c.spark.url}  UI http://127.0.0.1:{c.spark.webui_port}
  Spark worker UI  : http://127.0.0.1:{c.spark.worker_webui_port}
  data root        : {extra["IMGSIM_DATA_ROOT"]}
  logs             : {c.log_dir}
Ctrl-C stops everything.""",
                flush=True,
            )
            while True:
                c.check()
                time.sleep(5)
    except KeyboardInterrupt:
        print("stopping ...", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
