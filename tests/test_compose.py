"""The scale-out deployment's files line up with the code: docker-compose.yaml, the two
Dockerfiles, .env.example and the docker/ helpers.

No Docker engine is needed (nor available on the development machine): the compose file is
read with PyYAML and its ``${VAR}`` references are substituted here from ``.env.example`` the
way Compose does. When Debian's ``docker-compose`` (1.29) is installed, ``docker-compose config``
must accept the file too. The topology itself (Postgres, Redis + Celery, a Spark standalone
cluster behind ``spark_default``) runs for real, without containers, in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = (ROOT / "Dockerfile", ROOT / "docker" / "spark.Dockerfile")
DATA_ROOT = "/data/imgsim"
DATA_VOLUME = "imgsim-data"

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
SPARK_SERVICES = ("spark-master", "spark-worker-1", "spark-worker-2")
SERVICES = ("postgres", "redis", *AIRFLOW_SERVICES, *SPARK_SERVICES)
ONE_SHOT = ("airflow-init",)
SPARK_MASTER_URL = "spark://spark-master:7077"

SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|JWT|TOKEN")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


# --- helpers ------------------------------------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution, for the forms this project uses ($$ is a literal $)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name)
        if (op in (":-", ":?") and not got) or (op in ("-", "?") and got is None):
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg
        return got or ""

    parts = value.split("$$")
    return "$".join(VAR_REF.sub(sub, p) for p in parts)


def resolve(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, env) for v in node]
    return interpolate(node, env) if isinstance(node, str) else node


def strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def var_refs(node: Any) -> list[tuple[str, str, str]]:
    """(name, operator, argument) of every ${...} in the values, ignoring $$-escaped ones."""
    return [
        (m.group(1), m.group(2) or "", m.group(3) or "")
        for s in strings(node)
        for part in s.split("$$")
        for m in VAR_REF.finditer(part)
    ]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping (KEY: value)"
    return {k: str(v) for k, v in env.items()}


def host_ports(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each published port ('IP:HOST:CONTAINER')."""
    out = []
    for spec in service.get("ports") or []:
        parts = str(spec).split(":")
        assert len(parts) == 3, f"{spec!r}: publish as IP:HOST:CONTAINER"
        out.append((parts[0], parts[1], parts[2]))
    return out


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The compose file as written (anchors merged, ${VAR} not substituted)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return read_dotenv(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    """The compose file with ${VAR} substituted from .env.example."""
    return dict(resolve(raw, example_env))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


# --- services, images, environment --------------------------------------------------------


def test_every_service_of_the_deployment_is_there(raw: dict[str, Any]) -> None:
    assert set(SERVICES) <= set(raw["services"]), set(SERVICES) - set(raw["services"])
    for name in SERVICES:
        assert "container_name" not in raw["services"][name], f"{name}: breaks --scale"
    for name in ("imgsim-data", "postgres-db", "airflow-logs", "airflow-auth"):
        assert name in raw["volumes"]


def test_airflow_services_share_image_environment_and_volumes(raw: dict[str, Any]) -> None:
    common = raw["x-airflow-common"]
    for name in AIRFLOW_SERVICES:
        svc = raw["services"][name]
        assert svc["image"] == common["image"], name
        assert svc["build"] == common["build"], name
        assert svc["volumes"] == common["volumes"], name
        env = env_of(svc)
        for key, value in env_of(common).items():
            assert env.get(key) == value, (name, key)
        # airflow-init runs as root to chown the shared volumes; everything else as AIRFLOW_UID.
        assert svc["user"] == ("0:0" if name in ONE_SHOT else common["user"]), name
    assert env_of(common)["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert raw["services"]["airflow-worker"]["command"] == "celery worker"
    # Every Spark container runs as the same uid as the Airflow ones (shared data root).
    for name in SPARK_SERVICES:
        assert raw["services"][name]["user"] == common["user"], name
        assert raw["services"][name]["image"] == raw["x-spark-common"]["image"], name


def test_metadata_db_broker_and_api_point_at_their_services(
    services: dict[str, dict[str, Any]],
) -> None:
    env = env_of(services["airflow-scheduler"])
    pg = env_of(services["postgres"])
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND"):
        url = urlsplit(env[key])
        assert url.scheme.endswith(("postgresql", "postgresql+psycopg2")), key
        assert (url.hostname, url.port, url.path) == ("postgres", 5432, "/airflow"), key
        assert (url.username, url.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"]), key
        assert pg["POSTGRES_DB"] == "airflow"
    broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    assert broker.password == env_of(services["redis"])["REDIS_PASSWORD"]
    assert "6379" in [str(p) for p in services["redis"]["expose"]]

    api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert (api.hostname, api.path) == ("airflow-apiserver", "/execution/")
    assert [(ip, c) for ip, _, c in host_ports(services["airflow-apiserver"])] == [
        ("127.0.0.1", str(api.port))
    ]


def test_the_data_root_is_one_volume_at_the_same_path_everywhere(
    raw: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    for name in (*AIRFLOW_SERVICES, *SPARK_SERVICES):
        assert env_of(services[name])["IMGSIM_DATA_ROOT"] == DATA_ROOT, name
        mounts = [str(v).split(":")[:2] for v in services[name]["volumes"]]
        assert [DATA_VOLUME, DATA_ROOT] in mounts, (name, mounts)
    # A host folder may replace the named volume, but for every service at once.
    refs = {
        v
        for name in (*AIRFLOW_SERVICES, *SPARK_SERVICES)
        for v in raw["services"][name]["volumes"]
        if str(v).endswith(":" + DATA_ROOT)
    }
    assert len(refs) == 1, refs
    # The images agree (and pre-create it, so a fresh volume gets their ownership).
    for dockerfile in DOCKERFILES:
        assert f"IMGSIM_DATA_ROOT={DATA_ROOT}" in dockerfile.read_text(), dockerfile


def spark_conn(raw: dict[str, Any]) -> dict[str, Any]:
    conn = json.loads(env_of(raw["x-airflow-common"])["AIRFLOW_CONN_SPARK_DEFAULT"])
    assert isinstance(conn, dict)
    return conn


def test_spark_default_is_the_standalone_master_in_json_form(
    raw: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    conn = spark_conn(raw)
    assert conn["conn_type"] == "spark"
    assert conn["host"] == SPARK_MASTER_URL
    assert conn["extra"]["deploy-mode"] == "client"
    master = urlsplit(conn["host"])
    svc = services[master.hostname or ""]
    cmd = [str(c) for c in svc["command"]]
    assert "org.apache.spark.deploy.master.Master" in cmd
    assert cmd[cmd.index("--port") + 1] == str(master.port)
    assert cmd[cmd.index("--host") + 1] == master.hostname
    assert str(master.port) in [str(p) for p in svc["expose"]]
    for name in ("spark-worker-1", "spark-worker-2"):
        cmd = [str(c) for c in services[name]["command"]]
        assert "org.apache.spark.deploy.worker.Worker" in cmd and cmd[-1] == SPARK_MASTER_URL
    # The driver runs in the Celery worker: its Python must exist, by name, on both sides.
    env = env_of(raw["x-airflow-common"])
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"] == py
    assert "SPARK_LOCAL_IP" not in env, "the driver must advertise an address executors reach"


def test_every_connection_the_dags_use_is_configured(raw: dict[str, Any]) -> None:
    env = env_of(raw["x-airflow-common"])
    files = [*(ROOT / "dags").glob("*.py"), *(ROOT / "include" / "imgsim").rglob("*.py")]
    conn_ids = {
        m for path in files for m in re.findall(r"conn_id\s*=\s*[\"'](\w+)[\"']", path.read_text())
    }
    assert conn_ids, "no conn_id found in dags/ or the imgsim package (Spark task factory)"
    for conn_id in conn_ids:
        assert f"AIRFLOW_CONN_{conn_id.upper()}" in env, conn_id


def test_spark_submit_hook_resolves_the_connection_to_the_master(
    raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("airflow.providers.apache.spark")
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_SPARK_DEFAULT", env_of(raw["x-airflow-common"])["AIRFLOW_CONN_SPARK_DEFAULT"]
    )
    resolved = SparkSubmitHook(conn_id="spark_default")._connection
    assert resolved["master"] == SPARK_MASTER_URL
    assert resolved["deploy_mode"] == "client"


def test_imgsim_variables_are_ones_the_settings_read(raw: dict[str, Any]) -> None:
    from imgsim import config

    read = config.env_names()
    assert {
        "IMGSIM_DATA_ROOT",
        "IMGSIM_BACKBONE",
        "IMGSIM_WEIGHTS",
        "IMGSIM_ARCHIVE_SHA256",
    } <= set(read)

    names = {k for svc in raw["services"].values() for k in env_of(svc) if k.startswith("IMGSIM_")}
    names |= {k for k in read_dotenv(ENV_EXAMPLE) if k.startswith("IMGSIM_")}
    assert names, "compose sets no IMGSIM_ variable"
    unknown = sorted(names - set(read))
    assert not unknown, f"not read by Settings.from_env (include/imgsim/config.py): {unknown}"


# --- secrets ----------------------------------------------------------------------------


def secret_problems(raw: dict[str, Any]) -> list[str]:
    """Secrets written into the compose file instead of coming from ${VAR:?} substitution."""
    problems = [
        f"${{{name}}} has a default value"
        for name, op, _ in var_refs(raw)
        if SECRET_NAME.search(name) and op not in ("", ":?", "?")
    ]
    required = re.compile(r"\$\{[A-Z_][A-Z0-9_]*(:?\?[^}]*)?\}")
    envs = [raw.get(k, {}).get("environment") or {} for k in raw if k.startswith("x-")]
    envs += [svc.get("environment") or {} for svc in raw["services"].values()]
    for env in envs:
        for key, value in env.items():
            if (
                SECRET_NAME.search(key)
                and not key.endswith(("_FILE", "_PATH"))
                and not required.fullmatch(str(value))
            ):
                problems.append(f"{key}: {value!r} is not ${{VAR:?...}}")
    # Credentials inside URLs come from variables too.
    for s in strings(raw):
        for password in re.findall(r"://[^:/@\s]*:([^@\s]+)@", s):
            if not required.fullmatch(password):
                problems.append(f"password literal in {s!r}")
    return problems


def test_no_secret_is_written_in_the_compose_file(raw: dict[str, Any]) -> None:
    assert secret_problems(raw) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}@postgres", "hunter2@postgres"),
        ("${AIRFLOW_FERNET_KEY:?set AIRFLOW_FERNET_KEY in .env}", "c2VjcmV0"),
        ("${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}", "${REDIS_PASSWORD:-hunter2}"),
    ],
)
def test_the_secret_check_finds_a_written_secret(old: str, new: str) -> None:
    text = COMPOSE.read_text()
    assert old in text
    assert secret_problems(yaml.safe_load(text.replace(old, new, 1)))


def test_env_example_defines_every_required_variable_with_placeholders(
    raw: dict[str, Any], example_env: dict[str, str]
) -> None:
    refs = var_refs(raw)
    required = {name for name, op, _ in refs if op in ("", ":?", "?")}
    missing = sorted(n for n in required if not example_env.get(n))
    assert not missing, f".env.example lacks {missing}"
    optional = {name for name, op, _ in refs if op in (":-", "-")}
    assert not sorted(optional - set(example_env)), "document optional variables too"
    for key, value in example_env.items():
        if SECRET_NAME.search(key):
            assert value.startswith("change-me"), f"{key}: only placeholders are committed"


def test_make_env_generates_every_secret() -> None:
    runs = [
        subprocess.run(
            ["sh", str(ROOT / "docker" / "make-env.sh")], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    ]
    assert runs[0] != runs[1]
    generated = {
        k: v
        for k, v in (
            line.split("=", 1) for line in runs[0].splitlines() if line and not line.startswith("#")
        )
    }
    assert not [k for k, v in generated.items() if "change-me" in v]
    example = read_dotenv(ENV_EXAMPLE)
    assert set(generated) == set(example)
    for key, value in generated.items():
        if not example[key].startswith("change-me"):
            assert value == example[key], key
        elif "FERNET" in key:
            from cryptography.fernet import Fernet

            Fernet(value.encode())  # raises if it is not a valid key
        else:
            assert re.fullmatch(r"[0-9a-f]{48}", value), key


# --- health, ordering, ports --------------------------------------------------------------


def test_every_long_running_service_has_a_healthcheck(raw: dict[str, Any]) -> None:
    for name, svc in raw["services"].items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", name
            continue
        test = (svc.get("healthcheck") or {}).get("test")
        assert test and test != ["NONE"], f"{name} has no healthcheck"
        assert svc.get("restart") == "always", name


def test_depends_on_conditions_point_at_services_that_can_meet_them(raw: dict[str, Any]) -> None:
    svcs = raw["services"]
    for name, svc in svcs.items():
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: use depends_on with conditions"
        for dep, spec in deps.items():
            assert dep in svcs, (name, dep)
            condition = spec["condition"]
            if condition == "service_healthy":
                assert svcs[dep].get("healthcheck"), (name, dep)
            else:
                assert condition == "service_completed_successfully" and dep in ONE_SHOT
    for name in AIRFLOW_SERVICES:
        deps = svcs[name]["depends_on"]
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy"
        if name not in ONE_SHOT:
            assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    assert svcs["airflow-worker"]["depends_on"]["spark-master"]["condition"] == "service_healthy"


def test_published_ports_are_local_distinct_and_do_not_clash(
    services: dict[str, dict[str, Any]],
) -> None:
    published = [(name, *p) for name, svc in services.items() for p in host_ports(svc)]
    assert all(ip == "127.0.0.1" for _, ip, _, _ in published), published
    hosts = [h for _, _, h, _ in published]
    assert len(hosts) == len(set(hosts)), published
    by_service = {name: (h, c) for name, _, h, c in published}
    assert by_service["airflow-apiserver"][1] == "8080"
    assert by_service["spark-master"][1] == "8080"  # its UI; a different host port than Airflow
    assert by_service["spark-master"][0] != by_service["airflow-apiserver"][0]
    assert "airflow-worker" not in by_service, "a host port would stop --scale airflow-worker=N"


# --- images -------------------------------------------------------------------------------


def lock_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S*)", path.read_text(), flags=re.M))


def test_python_spark_airflow_and_java_versions_match() -> None:
    pins = lock_versions()
    airflow, spark = (dockerfile_args(p) for p in DOCKERFILES)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert airflow["PYTHON_VERSION"] == spark["PYTHON_VERSION"] == here
    assert airflow["AIRFLOW_VERSION"] == pins["apache-airflow"]
    assert pins["pyspark"] == pins["pyspark-client"]
    assert spark["SPARK_IMAGE"].startswith(f"apache/spark:{pins['pyspark']}-"), spark["SPARK_IMAGE"]
    assert "java17" in spark["SPARK_IMAGE"] and ":17-" in airflow["JAVA_IMAGE"]


def test_dockerfile_copy_sources_exist_and_are_in_the_build_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {
        line.strip().rstrip("/")
        for line in lines
        if line.strip() and not line.startswith(("#", "!"))
    }
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text().replace("\\\n", " ")
        copies = [line.split()[1:] for line in text.splitlines() if line.startswith("COPY ")]
        assert copies, dockerfile
        for args in copies:
            if any(a.startswith("--from=") for a in args):
                continue
            sources = [a for a in args if not a.startswith("--")][:-1]
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"{dockerfile.name}: COPY {src} does not exist"
                assert src.split("/")[0] not in ignored, f"{src} is in .dockerignore"
    for script in ("bake_weights.sh", "airflow-init.sh", "make-env.sh"):
        assert os.access(ROOT / "docker" / script, os.X_OK), script


def test_spark_image_requirements_are_pinned_by_the_lock() -> None:
    pins = lock_versions()
    wanted = [
        re.sub(r"[-_.]+", "-", line.strip()).lower()
        for line in (ROOT / "docker" / "spark-requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [w for w in wanted if w not in pins], "not in requirements.lock"
    for needed in ("numpy", "pandas", "pyarrow", "torch", "torchvision", "timm", "pillow"):
        assert needed in wanted


def test_ignore_files_keep_secrets_and_local_state_out() -> None:
    gitignore = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in gitignore
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    for entry in (".git", ".venv", ".airflow", "data", "test-output", ".env"):
        assert entry in dockerignore, entry
    assert "!.env.example" in dockerignore


# --- docker-compose itself ----------------------------------------------------------------

DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (apt-get install docker-compose; make installs it)",
)


def compose_config(env_file: Path) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE
    return subprocess.run(
        [DOCKER_COMPOSE, "-f", str(COMPOSE), "--env-file", str(env_file), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_compose
def test_docker_compose_accepts_the_file_with_the_example_env() -> None:
    done = compose_config(ENV_EXAMPLE)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert set(SERVICES) <= set(resolved["services"])
    assert (
        resolved["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
        == (read_dotenv(ENV_EXAMPLE)["POSTGRES_PASSWORD"])
    )


@needs_compose
def test_docker_compose_refuses_to_run_without_a_secret(tmp_path: Path) -> None:
    env = tmp_path / "partial.env"
    env.write_text(
        "".join(
            line + "\n"
            for line in ENV_EXAMPLE.read_text().splitlines()
            if not line.startswith("AIRFLOW_JWT_SECRET=")
        )
    )
    done = compose_config(env)
    assert done.returncode != 0
    assert "AIRFLOW_JWT_SECRET" in done.stderr + done.stdout


# --- the docker/ scripts, run here ------------------------------------------------------------


def run_script(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    shell = "bash" if name == "airflow-init.sh" else "sh"
    return subprocess.run(
        [shell, str(ROOT / "docker" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_bake_weights_checks_the_file_and_bakes_nothing_without_a_source(tmp_path: Path) -> None:
    dest, local = tmp_path / "checkpoints", tmp_path / "weights"
    local.mkdir()
    done = run_script("bake_weights.sh", str(dest), "", str(local))
    assert done.returncode == 0 and "no ResNet-18 weights baked" in done.stdout
    assert not list(dest.iterdir())

    # A file that is not torchvision's (its sha256 does not start with f37072fd) is refused,
    # from the build context and from a URL alike.
    (local / "resnet18-f37072fd.pth").write_bytes(b"not the weights")
    for args in (
        (str(dest), "", str(local)),
        (str(dest), (local / "resnet18-f37072fd.pth").as_uri(), str(tmp_path / "none")),
    ):
        done = run_script("bake_weights.sh", *args)
        assert done.returncode == 1 and "expected f37072fd" in done.stderr, done
        assert not list(dest.iterdir())


def test_bake_weights_downloads_the_file_the_url_names_and_checks_its_hash(tmp_path: Path) -> None:
    """The docker weight step fetches as torchvision does: the URL's file name, its hash prefix."""
    import hashlib

    from imgsim.demo import serve_directory

    served = tmp_path / "server"
    served.mkdir()
    data = b"stand-in weights " * 1000
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (served / name).write_bytes(data)
    (served / "resnet18-0badc0de.pth").write_bytes(data)
    dest = tmp_path / "checkpoints"
    with serve_directory(served) as base:
        done = run_script("bake_weights.sh", str(dest), f"{base}/{name}", str(tmp_path / "none"))
        assert done.returncode == 0, done
        assert (dest / name).read_bytes() == data and "checked" in done.stdout
        bad = run_script("bake_weights.sh", str(dest), f"{base}/resnet18-0badc0de.pth", "")
        assert bad.returncode == 1 and "expected 0badc0de" in bad.stderr, bad
        missing = run_script("bake_weights.sh", str(dest), f"{base}/resnet18-12345678.pth", "")
        assert missing.returncode == 1 and "HTTP 404" in missing.stderr, missing
    assert sorted(p.name for p in dest.iterdir()) == [name]


def init_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(tmp_path / "logs"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "auth" / "pw.json"),
        "IMGSIM_DATA_ROOT": str(tmp_path / "data"),
        "AIRFLOW_UID": str(os.getuid()),
        "AIRFLOW_ADMIN_PASSWORD": "from-the-env-file",
    }
    env.update(extra)
    return env


def test_airflow_init_refuses_the_example_placeholders(tmp_path: Path) -> None:
    placeholder = read_dotenv(ENV_EXAMPLE)["AIRFLOW_FERNET_KEY"]
    env = init_env(tmp_path, AIRFLOW__CORE__FERNET_KEY=placeholder)
    done = run_script("airflow-init.sh", env=env)
    assert done.returncode == 1 and "make-env.sh" in done.stderr
    assert not (tmp_path / "airflow.db").exists() and not (tmp_path / "auth").exists()


@pytest.mark.airflow
@pytest.mark.skipif(os.geteuid() != 0, reason="airflow-init chowns to AIRFLOW_UID:0, as root")
def test_airflow_init_migrates_and_writes_the_admin_password(tmp_path: Path) -> None:
    done = run_script("airflow-init.sh", env=init_env(tmp_path), timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    pw = tmp_path / "auth" / "pw.json"
    assert json.loads(pw.read_text()) == {"admin": "from-the-env-file"}
    assert pw.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "airflow.db").stat().st_size > 0
    assert (tmp_path / "data").stat().st_mode & 0o2775 == 0o2775


def test_postgres_refuses_to_initialise_with_the_placeholder(raw: dict[str, Any]) -> None:
    script = raw["services"]["postgres"]["command"][-1].replace("$$", "$")
    script = script.replace("exec docker-entrypoint.sh postgres", "echo starting")
    for password, rc in ((read_dotenv(ENV_EXAMPLE)["POSTGRES_PASSWORD"], 1), ("0f3a9c", 0)):
        done = subprocess.run(
            ["sh", "-c", script],
            capture_output=True,
            text=True,
            env={"POSTGRES_PASSWORD": password, "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == rc, done
