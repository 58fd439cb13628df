"""imgsim_index: build and update the reference index. Wiring only; logic is in ``imgsim``."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Param, dag, get_current_context, task

from imgsim.assets import LSH_MODEL
from imgsim.config import BACKBONES, Settings

SPARK_JOBS = Path(__file__).resolve().parents[1] / "spark_jobs"
DEFAULTS = Settings.from_env()

DOC = """
# imgsim_index

Builds the reference index of car photos and keeps it current, one run per day.

| task | what it does | output |
| --- | --- | --- |
| `download` | fetches the archive and labels (http/https/file/local path; resumable, retried, checksum-checked, skipped when current) | `raw/` |
| `extract` | safe extraction (no paths outside the target, no links or devices), once per archive | `images/<archive>/` |
| `catalog` | sha256 id per image; archive + `incoming/<logical date>/`; marks gone images; diff against the embedding store | `catalog/catalog.parquet` |
| `plan_shards` | splits the new images into shards | `runs/<run>/shards/` |
| `embed` | one mapped task per shard: decode, RGB, 224x224 thumbnail, batched CNN embedding; bad images quarantined | `embeddings/<backbone>/`, `thumbs/`, `quarantine/` |
| `fit_plan` | skips the rest when nothing changed since the current version | XCom: version |
| `fit_lsh` | spark-submit `spark_jobs/fit_lsh.py`: BucketedRandomProjectionLSH on all live embeddings | `models/lsh/.staging/<version>/` |
| `validate` | counts, snapshot, recall@5 against exact search >= floor, NumPy re-hash equals Spark's | `validation.json` |
| `publish` | atomic rename + `CURRENT` pointer; emits the `imgsim_lsh_model` asset | `models/lsh/<version>/` |

Backfill past days (each reads its own `incoming/<date>/`):
`airflow backfill create --dag-id imgsim_index --from-date 2026-01-01 --to-date 2026-01-07`.
"""


@dag(
    dag_id="imgsim_index",
    schedule="@daily",
    start_date=datetime.fromisoformat(DEFAULTS.index_start_date),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1),
                  "retry_exponential_backoff": True},
    tags=["imgsim", "index"],
    doc_md=DOC,
    params={
        "archive_url": Param(DEFAULTS.archive_url, type="string", minLength=1,
                             title="Archive URL",
                             description="https://, http://, file:// URL or local path of the "
                                         "image archive (car_ims.tgz or a Kaggle-layout zip/tgz)"),
        "labels_url": Param(DEFAULTS.labels_url, type="string", minLength=1, title="Labels URL",
                            description="cars_annos.mat or a CSV with Class and image columns"),
        # Optional values are nullable: the trigger form treats an empty string as missing.
        "archive_sha256": Param(DEFAULTS.archive_sha256 or None, type=["null", "string"],
                                pattern="^([0-9a-f]{64})?$", title="Archive sha256 (optional)",
                                description="verified after download when given"),
        "labels_sha256": Param(DEFAULTS.labels_sha256 or None, type=["null", "string"],
                               pattern="^([0-9a-f]{64})?$", title="Labels sha256 (optional)"),
        "backbone": Param(DEFAULTS.backbone, type="string", enum=list(BACKBONES),
                          title="Backbone", description="CNN that embeds the images"),
        "num_hash_tables": Param(DEFAULTS.lsh_num_hash_tables, type="integer", minimum=1,
                                 maximum=512, title="LSH hash tables (numHashTables)"),
        "bucket_length": Param(DEFAULTS.lsh_bucket_length, type="number", minimum=0,
                               maximum=100, title="LSH bucket length (0 = auto)",
                               description="bucket width of the projections of L2-normalised "
                                           "vectors; 0 derives it from the data's scale"),
        "full_rebuild": Param(False, type="boolean", title="Full rebuild",
                              description="re-embed every image and refit even if unchanged"),
    },
)
def imgsim_index() -> None:
    @task(retries=3)
    def download(params: dict[str, Any]) -> dict[str, Any]:
        from imgsim import pipeline

        return pipeline.download_sources(Settings.from_env(), params["archive_url"],
                                         params["labels_url"], params["archive_sha256"] or "",
                                         params["labels_sha256"] or "")

    @task
    def extract(fetched: dict[str, Any]) -> dict[str, Any]:
        from imgsim import pipeline

        return pipeline.extract(Settings.from_env(), fetched["archive"]["path"])

    @task
    def catalog(extracted: dict[str, Any], fetched: dict[str, Any], params: dict[str, Any],
                ds: str, run_id: str) -> dict[str, Any]:
        from imgsim import pipeline

        return pipeline.catalog(Settings.from_env(), extracted["root"], fetched["labels"]["path"],
                                ds, run_id, params["backbone"], params["full_rebuild"])

    @task
    def plan_shards(cataloged: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
        from imgsim import pipeline

        return pipeline.plan_shards(Settings.from_env(), cataloged["to_embed_file"], run_id)

    @task(max_active_tis_per_dagrun=2)
    def embed(shard: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        from imgsim import pipeline

        return pipeline.embed_shard(Settings.from_env(), shard["spec"], params["backbone"])

    @task.short_circuit(trigger_rule="none_failed")
    def fit_plan(params: dict[str, Any]) -> dict[str, Any]:
        from imgsim import pipeline

        return pipeline.fit_plan(Settings.from_env(), params["backbone"],
                                 params["num_hash_tables"], params["bucket_length"],
                                 params["full_rebuild"])

    plan = "ti.xcom_pull(task_ids='fit_plan')"
    fit_lsh = SparkSubmitOperator(
        task_id="fit_lsh",
        conn_id="spark_default",
        application=str(SPARK_JOBS / "fit_lsh.py"),
        name="imgsim-fit-lsh",
        conf={"spark.sql.shuffle.partitions": "8", "spark.ui.showConsoleProgress": "false"},
        application_args=[
            "--data-root", f"{{{{ {plan}['data_root'] }}}}",
            "--backbone", f"{{{{ {plan}['backbone'] }}}}",
            "--version", f"{{{{ {plan}['version'] }}}}",
            "--num-hash-tables", f"{{{{ {plan}['num_hash_tables'] }}}}",
            "--bucket-length", f"{{{{ {plan}['bucket_length'] }}}}",
            "--run-id", "{{ run_id }}",
        ],
    )

    @task
    def validate(plan: dict[str, Any]) -> dict[str, Any]:
        from imgsim import pipeline

        return pipeline.validate(Settings.from_env(), plan)

    @task(outlets=[LSH_MODEL])
    def publish(plan: dict[str, Any]) -> dict[str, Any]:
        from imgsim import pipeline

        published = pipeline.publish(Settings.from_env(), plan["version"])
        get_current_context()["outlet_events"][LSH_MODEL].extra = published
        return published

    fetched = download()
    extracted = extract(fetched)
    cataloged = catalog(extracted, fetched)
    embedded = embed.expand(shard=plan_shards(cataloged))
    planned = fit_plan()
    embedded >> planned >> fit_lsh
    fit_lsh >> validate(planned) >> publish(planned)  # type: ignore[operator]


imgsim_index()
