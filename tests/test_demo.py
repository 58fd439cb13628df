"""`make demo`'s command on a fresh data root and Airflow home: offline, synthetic archive."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imgsim.demo import build_demo_archive, synthetic_car

pytestmark = [pytest.mark.airflow, pytest.mark.spark, pytest.mark.slow]


def test_demo_archive_is_deterministic_and_in_the_stanford_layout(tmp_path: Path) -> None:
    import tarfile

    from imgsim.sources.labels import read_labels

    archive, labels = build_demo_archive(tmp_path / "a")
    again, _ = build_demo_archive(tmp_path / "b")
    assert archive.read_bytes() == again.read_bytes()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert len(names) == 48 and names[0] == "car_ims/000001.jpg"
    recs = read_labels(labels)
    assert len(recs) == 48 and recs["000001.jpg"].class_name == "Synthetic Red Sedan"
    assert synthetic_car(0, 0) != synthetic_car(0, 1)


def test_demo_indexes_offline_and_prints_the_summary(airflow_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    env = {**airflow_env, "IMGSIM_DATA_ROOT": str(tmp_path / "data")}
    proc = subprocess.run([str(Path(sys.executable).parent / "imgsim"), "demo",
                           "--date", "2026-02-01"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    out = proc.stdout
    assert "serving the synthetic demo archive at http://127.0.0.1:" in out
    assert "imgsim index built" in out
    assert "images indexed  : 48 of 48 live" in out
