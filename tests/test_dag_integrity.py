"""One integrity test per DAG file: imports cleanly, cheap to parse, follows the house rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
DAG_FILES = sorted(p for p in DAGS.glob("*.py") if not p.name.startswith("_"))
HEAVY = ("torch", "torchvision", "timm", "pyspark", "PIL", "pandas", "pyarrow", "scipy")

PROBE = r"""
import importlib.util, json, sys
from airflow.sdk import BaseHook, Variable

def forbidden(*a, **k):
    raise RuntimeError("connection or variable look-up while parsing a DAG file")

BaseHook.get_connection = classmethod(forbidden)
Variable.get = staticmethod(forbidden)
heavy_before = {m for m in HEAVY if m in sys.modules}
spec = importlib.util.spec_from_file_location("dagfile", PATH)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from airflow.sdk import DAG
dags = [v for v in vars(mod).values() if isinstance(v, DAG)]
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=PATH)
out = {
    "heavy": sorted({m for m in HEAVY if m in sys.modules} - heavy_before),
    "import_errors": {k: str(v)[-500:] for k, v in bag.import_errors.items()},
    "dags": {d.dag_id: {"tags": sorted(d.tags), "doc": bool(d.doc_md),
                        "max_active_runs": d.max_active_runs,
                        "retries": {t.task_id: t.retries for t in d.tasks},
                        "wiring": {t.task_id: [t.trigger_rule, sorted(t.downstream_task_ids)]
                                   for t in d.tasks},
                        "spark_args": {t.task_id: list(getattr(t, "application_args", None)
                                                       or getattr(t, "_application_args", None)
                                                       or []) for t in d.tasks}}
             for d in bag.dags.values()},
}
print("RESULT" + json.dumps(out))
"""


def probe(path: Path, env: dict[str, str]) -> dict:
    code = f"HEAVY = {HEAVY!r}\nPATH = {str(path)!r}\n" + PROBE
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.airflow
@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_integrity(dag_file: Path, airflow_env: dict[str, str]) -> None:
    result = probe(dag_file, airflow_env)
    assert result["import_errors"] == {}
    assert result["dags"], f"{dag_file.name} defines no DAG"
    assert result["heavy"] == [], f"{dag_file.name} imports {result['heavy']} at parse time"
    for dag_id, info in result["dags"].items():
        assert dag_id == dag_file.stem, "one DAG per file, named like the file"
        assert "imgsim" in info["tags"]
        assert info["doc"], f"{dag_id} has no doc_md"
        assert info["max_active_runs"] == 1
        assert all(r >= 1 for r in info["retries"].values()), info["retries"]
    if dag_file.stem == "imgsim_index":
        # The fit task passes every fit setting of the plan, in the same form as
        # pipeline.fit_job_args (evaluate and the benchmarks), so none is silently dropped.
        from imgsim.index.pipeline import fit_job_args

        args = result["dags"]["imgsim_index"]["spark_args"]["fit_lsh"]
        from imgsim.sparktasks import FIT_PLAN_ARGS

        plan = {key: f"<{key}>" for key in FIT_PLAN_ARGS.values()}
        assert {"graph_k", "duplicate_distance", "scan_below"} <= set(plan)
        want = fit_job_args(plan, "<run_id>")
        assert args[0::2] == want[0::2]
        for flag, value in zip(want[0::2], want[1::2], strict=True):
            key = value.strip("<>")
            templated = args[args.index(flag) + 1]
            assert (f"['{key}']" in templated) or (key == "run_id" and "run_id" in templated)

    if dag_file.stem == "imgsim_query":
        # embed picks the engine: write_results directly (in-process answer) or the Spark
        # lookup first; write_results runs after either (the other is skipped).
        wiring = result["dags"]["imgsim_query"]["wiring"]
        assert wiring["embed"][1] == ["lookup", "write_results"]
        assert wiring["lookup"][1] == ["write_results"]
        assert wiring["write_results"][0] == "none_failed_min_one_success"
        args = result["dags"]["imgsim_query"]["spark_args"]["lookup"]
        assert "query_expansion" in args[args.index("--expansion") + 1]


def test_every_dag_file_is_checked() -> None:
    assert {p.name for p in DAG_FILES} >= {"imgsim_index.py"}
