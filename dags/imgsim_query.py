"""imgsim_query: answer new query images with the published model. Wiring only."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from imgsim.config import Settings
from imgsim.sparktasks import spark_task

#: the engine that answers (imgsim.query.run.choose_engine) -> the task that follows embed
QUERY_ROUTES = {"local": "write_results", "spark": "lookup"}
DEFAULTS = Settings.from_env()

DOC = """
# imgsim_query

Answers query photos with the **published** model: for each, the k most similar reference
images, as data (`results.json`, `results.csv`) and as pictures (`contact_sheet.png`,
`gallery.html`), under `queries/results/<run>/`.

Drop photos into `queries/inbox/` (they are picked up by the next scheduled run) or name files
in the trigger form. The run pins the model version when it starts (the current one, or the
one given), embeds the queries with exactly the backbone and weights recorded in that version's
manifest, looks them up, writes the results and moves answered photos to
`queries/processed/<run>/` (unusable ones to `queries/rejected/<run>/`, with the reason in the
results). A photo already answered by the same version is not answered again.

Few queries (at most `IMGSIM_QUERY_LOCAL_MAX`, default 200) are answered in the `embed` task by
the in-process twin of the published model, without starting a JVM; more by one Spark job
(`spark_jobs/query_lsh.py`). Both give the same neighbours; `results.json` and the
`write_results` return value say which `engine` answered (`local` or `spark`).

| task | what it does |
| --- | --- |
| `collect` | inbox + Params, ids, version pinned, already-answered ones marked |
| `embed` | the manifest's backbone (a different one is an error), bad images recorded with the reason; picks the engine and, for `local`, answers the queries in-process |
| `lookup` | engine `spark` only: spark-submit `query_lsh.py`, top k per query over all queries |
| `write_results` | JSON, CSV, contact sheet, HTML gallery; ledger; inbox emptied |
"""


@dag(
    dag_id="imgsim_query",
    schedule=DEFAULTS.query_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    tags=["imgsim", "query"],
    doc_md=DOC,
    params={
        "image_paths": Param(
            [],
            type="array",
            items={"type": "string", "minLength": 1},
            title="Query images",
            description="files to look up, besides queries/inbox/ (absolute "
            "paths under the data root or IMGSIM_QUERY_ROOTS)",
        ),
        "k": Param(
            5,
            type="integer",
            minimum=1,
            maximum=100,
            title="Neighbours (k)",
            description="how many similar reference images per query",
        ),
        "version": Param(
            None,
            type=["null", "string"],
            pattern="^(v\\d{8}T\\d{6}Z-[0-9a-f]{6})?$",
            title="Model version",
            description="empty = the current version; see `imgsim versions`",
        ),
    },
)
def imgsim_query() -> None:
    @task.short_circuit
    def collect(params: dict[str, Any], run_id: str) -> dict[str, Any]:
        from imgsim.errors import fail_fast
        from imgsim.query import run as query

        with fail_fast():
            return query.collect(
                Settings.from_env(),
                run_id,
                list(params["image_paths"]),
                params["k"],
                params["version"] or None,
            )

    @task.branch
    def embed(plan: dict[str, Any]) -> str:
        from imgsim.errors import fail_fast
        from imgsim.query import run as query

        with fail_fast():
            done = query.embed_and_route(Settings.from_env(), plan["run_dir"])
        get_current_context()["ti"].xcom_push(key="embedded", value=done)
        return QUERY_ROUTES[done["engine"]]

    lookup = spark_task(
        "lookup",
        "query_lsh.py",
        name="imgsim-query-lsh",
        plan_task="collect",
        conf={"spark.sql.shuffle.partitions": "8"},
        plan_args={
            "--data-root": "data_root",
            "--version": "model_version",
            "--run-dir": "run_dir",
            "--k": "k",
            # Deliberately not the settings' defaults: a plan written before a
            # setting existed (a run queued across an upgrade) keeps its former
            # behaviour: no expansion, never an exact scan (share 1.0, below 0).
            "--expansion": ("query_expansion", 0),
            "--scan-share": ("scan_share", 1.0),
            "--scan-below": ("scan_below", 0),
        },
    )

    @task(trigger_rule="none_failed_min_one_success")
    def write_results(plan: dict[str, Any]) -> dict[str, Any]:
        from imgsim.errors import fail_fast
        from imgsim.query import run as query

        with fail_fast():
            return query.finalize(Settings.from_env(), plan["run_dir"])

    planned = collect()
    embedded = embed(planned)
    written = write_results(planned)
    embedded >> lookup >> written  # type: ignore[operator]
    embedded >> written  # type: ignore[operator]


imgsim_query()
