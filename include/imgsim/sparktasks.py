"""The DAGs' Spark tasks, built one way: the same connection, conf and XCom templating.

A Spark task runs one application of ``spark_jobs/`` through ``SparkSubmitOperator`` on the
``spark_default`` connection (``local[*]`` in the embedded default, the standalone master in
the compose stack). Its arguments come from a plan an earlier task returned (its XCom), named
here once per argument. Nothing heavy is imported: DAG files call this at parse time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imgsim.config import PROJECT_ROOT

SPARK_JOBS = PROJECT_ROOT / "spark_jobs"
#: conf every imgsim Spark application gets (a progress bar only clutters task logs)
BASE_CONF = {"spark.ui.showConsoleProgress": "false"}
#: the fit job's own (a small shuffle: the data is one vector per reference)
FIT_CONF = {"spark.sql.shuffle.partitions": "8"}


#: spark_jobs/fit_lsh.py's arguments: flag -> key of the index DAG's fit plan
FIT_PLAN_ARGS = {
    "--data-root": "data_root",
    "--backbone": "backbone",
    "--version": "version",
    "--num-hash-tables": "num_hash_tables",
    "--bucket-length": "bucket_length",
    "--seed": "seed",
    "--sample-size": "validation_sample",
    "--target-recall": "target_recall",
    "--projection-dir": "projection_dir",
    "--graph-k": "graph_k",
    "--graph-bucket-cap": "graph_bucket_cap",
    "--duplicate-distance": "duplicate_distance",
    "--duplicate-verifier": "duplicate_verifier",
    "--duplicate-min-inliers": "duplicate_min_inliers",
    "--scan-below": "scan_below",
    "--map-points": "map_points",
    "--base": "base",
    "--base-reason": "base_reason",
}


def plan_value(
    plan_task: str,
    key: str,
    default: Any = None,
    *,
    xcom_key: str | None = None,
) -> str:
    """A Jinja expression for ``key`` of the dict that task ``plan_task`` returned (with
    ``default`` when the plan has no such key); ``xcom_key`` pulls that XCom instead."""
    pull = f"ti.xcom_pull(task_ids='{plan_task}'" + (f", key='{xcom_key}')" if xcom_key else ")")
    if not key:
        return f"{{{{ {pull} }}}}"
    lookup = f"[{key!r}]" if default is None else f".get({key!r}, {default!r})"
    return f"{{{{ {pull}{lookup} }}}}"


def spark_task(
    task_id: str,
    script: str,
    *,
    name: str,
    plan_task: str = "",
    plan_args: Mapping[str, str | tuple[str, Any]] | None = None,
    extra_args: Sequence[str] = (),
    conf: Mapping[str, str] | None = None,
) -> Any:
    """A ``SparkSubmitOperator`` for ``spark_jobs/<script>``, named ``name`` in Spark's UI.

    ``plan_args`` maps each command-line flag to a key of ``plan_task``'s returned dict, or to
    ``(key, default)``; ``extra_args`` are appended as they are (templated by Airflow).
    """
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    args: list[str] = []
    for flag, spec in (plan_args or {}).items():
        key, default = spec if isinstance(spec, tuple) else (spec, None)
        args += [flag, plan_value(plan_task, key, default)]
    return SparkSubmitOperator(
        task_id=task_id,
        conn_id="spark_default",
        application=str(SPARK_JOBS / script),
        name=name,
        conf={**BASE_CONF, **(conf or {})},
        application_args=[*args, *extra_args],
    )
