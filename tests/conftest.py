"""Shared fixtures: paths to the shared real data, a local SparkSession, the Airflow env."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
SAMPLE_DIR = SHARED_DATA / "stanford_cars_sample"
LABELS_DIR = SHARED_DATA / "stanford_cars_labels"


#: The slowest test files, about longest first (seconds alone on the 2-core CI box: backfill 785,
#: distributed 513, e2e 676 (as two files with two indexes; now one), evaluate 339, browser 244,
#: crash 175, train_dag 180 (measured alone beside a training run), demo 107, spark_embed 106;
#: everything else about 300 together). `make test` runs files in 2 processes (pytest-xdist,
#: --dist loadfile --no-loadscope-reorder) in this order, so the long ones start first and the
#: short ones fill the gaps at the end.
SLOWEST_FIRST = (
    "test_backfill.py",
    "test_distributed.py",
    "test_e2e.py",
    "test_train_dag.py",
    "test_evaluate.py",
    "test_browser.py",
    "test_crash.py",
    "test_demo.py",
    "test_spark_embed.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slowest files first (a stable sort: the order inside a file is kept)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def require_sample() -> Path:
    """The shared real Stanford Cars sample, or skip with the reason."""
    if not (SAMPLE_DIR / "labels.csv").exists():
        pytest.skip(f"needs the shared Stanford Cars sample at {SAMPLE_DIR} (absent here)")
    return SAMPLE_DIR


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variables: the download tests talk to servers on 127.0.0.1 only."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return require_sample()


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """One local SparkSession for the whole test session (marker: spark)."""
    from imgsim.envsetup import embedded_environment

    for key in ("SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
        os.environ.setdefault(key, embedded_environment()[key])
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("imgsim-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An isolated embedded-default environment (own Airflow home, migrated once)."""
    from imgsim.envsetup import embedded_environment

    home = tmp_path_factory.mktemp("airflow-home")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "IMGSIM_"))}
    base["AIRFLOW_HOME"] = str(home)
    env = embedded_environment(base)
    env["AIRFLOW_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    airflow = str(Path(sys.executable).parent / "airflow")
    proc = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return env
