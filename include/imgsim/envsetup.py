"""The embedded default's environment: Airflow home, DAG folder, Spark connection, Python paths.

One place builds it; ``make`` targets (through ``imgsim env``), the demo and the tests all use it,
so nothing is set by hand. Every value can be overridden by setting the variable beforehand.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from imgsim.config import PROJECT_ROOT


def venv_bin() -> Path:
    return Path(sys.executable).parent


def embedded_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the embedded default needs, merged over ``base`` (default os.environ)."""
    env = dict(os.environ if base is None else base)
    python = str(venv_bin() / "python")
    defaults = {
        "AIRFLOW_HOME": env.get("IMGSIM_AIRFLOW_HOME", str(PROJECT_ROOT / ".airflow")),
        "IMGSIM_DATA_ROOT": str(PROJECT_ROOT / "data"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "4",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": "8080",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[*]"}),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": python,
        "PYSPARK_DRIVER_PYTHON": python,
        "PYTHONPATH": str(PROJECT_ROOT / "include"),
        "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    }
    for key, value in defaults.items():
        if not env.get(key):
            env[key] = value
    # Task processes reach the API server's execution API; it must follow a changed host/port.
    if not env.get("AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = (
            f"http://{env['AIRFLOW__API__HOST']}:{env['AIRFLOW__API__PORT']}/execution/"
        )
    path = env.get("PATH", "")
    if str(venv_bin()) not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([str(venv_bin()), path]) if path else str(venv_bin())
    return env


def shell_exports(env: Mapping[str, str]) -> str:
    """``export K=V`` lines for the variables that differ from os.environ."""
    lines = [
        f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if os.environ.get(k) != v
    ]
    return "\n".join(lines)
