"""imgsim_index: build and update the reference index. Wiring only; logic is in ``imgsim``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import Param, dag, get_current_context, task

from imgsim.assets import LSH_MODEL
from imgsim.config import Settings
from imgsim.params import setting_param
from imgsim.sparktasks import FIT_CONF, FIT_PLAN_ARGS, plan_value, spark_task

#: choose_embed_engine's routes (imgsim.index.pipeline.embed_route) -> the task that follows.
EMBED_ROUTES = {"none": "embed_summary", "tasks": "embed", "spark": "embed_spark"}
DEFAULTS = Settings.from_env()
#: how the trigger form takes a list of locations and an optional checksum
LOCATIONS = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
CHECKSUM = {
    "type": ["null", "string"],
    "pattern": "^((md5:)?[0-9a-f]{32}|(sha256:)?[0-9a-f]{64})?$",
}

DOC = """
# imgsim_index

Builds the reference index of car photos and keeps it current, one run per day.

| task | what it does | output |
| --- | --- | --- |
| `download` | fetches the archive, labels and optional class names, each from the first of its locations that gives the right bytes (http/https/file/local path, or a local folder of images; md5/sha256-checked, resumable, transient errors retried, skipped when current). A permanent error (404, bad URL, wrong bytes) fails the task at once | `raw/` |
| `extract` | safe extraction (no paths outside the target, no links or devices), once per archive | `images/<archive>/` |
| `catalog` | picks the embedder (Param `embedder`, default `IMGSIM_EMBEDDER`=current: the trained embedder the `imgsim_train` DAG published, else the frozen backbone; a new one means every reference is embedded again); sha256 id per image; archive + `incoming/<logical date>/`; labels matched by path; fails when they match under `min_label_coverage` of the archive's images; marks gone images; diff against the embedding store; reports label coverage | `catalog/catalog.parquet` |
| `plan_shards` | splits the new images into shards | `runs/<run>/shards/` |
| `choose_embed_engine` | picks the engine (Param `embed_engine`, default `IMGSIM_EMBED_ENGINE`): the mapped `embed` tasks or the Spark job; neither when nothing is new | `runs/<run>/spark_embed.json` (spark) |
| `embed` | engine `tasks`: one mapped task per shard: decode, RGB, 224x224 thumbnail, batched CNN embedding; bad images quarantined | `embeddings/<backbone>/`, `thumbs/`, `quarantine/` |
| `embed_spark` | engine `spark`: spark-submit `spark_jobs/embed_images.py`, the same code and the same store files, spread over Spark executors | the same |
| `embed_summary` | totals over the shards' result records, the same for both engines (images, embedded, quarantined by reason) | XCom |
| `fit_plan` | skips the rest when nothing changed since the current version | XCom: version |
| `learn_projection` | learns the search space from the live references (Param `projection`, default `IMGSIM_PROJECTION`=auto): Fisher LDA from the labels (shrinkage and dims cross-validated inside the references) when they cover the index, else PCA-whitening; `none` opts out. In the task, or on Spark for large indexes. A run that changes little (`IMGSIM_PROJECTION_REFRESH`) keeps CURRENT's projection instead | `runs/<run>/projection/` |
| `fit_lsh` | spark-submit `spark_jobs/fit_lsh.py`: projects the live embeddings, fits BucketedRandomProjectionLSH in that space, builds (or, in CURRENT's space, updates) the neighbour graph and the near-duplicate groups | `models/lsh/.staging/<version>/` |
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
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,
    },
    tags=["imgsim", "index"],
    doc_md=DOC,
    # Each Param defaults to its setting and takes its type, limits, title and description.
    params={
        "archive_url": setting_param(
            DEFAULTS, "archive_url", default=DEFAULTS.archive_locations, **LOCATIONS
        ),
        "labels_url": setting_param(
            DEFAULTS, "labels_url", default=DEFAULTS.labels_locations, **LOCATIONS
        ),
        # Optional values are nullable: the trigger form treats an empty string as missing.
        "archive_checksum": setting_param(
            DEFAULTS, "archive_checksum", default=DEFAULTS.archive_checksum or None, **CHECKSUM
        ),
        "labels_checksum": setting_param(
            DEFAULTS, "labels_checksum", default=DEFAULTS.labels_checksum or None, **CHECKSUM
        ),
        "min_label_coverage": setting_param(DEFAULTS, "min_label_coverage"),
        "backbone": setting_param(DEFAULTS, "backbone"),
        "embedder": setting_param(DEFAULTS, "embedder"),
        "num_hash_tables": setting_param(DEFAULTS, "lsh_num_hash_tables"),
        "bucket_length": setting_param(DEFAULTS, "lsh_bucket_length"),
        "projection": setting_param(DEFAULTS, "projection"),
        "full_rebuild": Param(
            False,
            type="boolean",
            title="Full rebuild",
            description="re-embed every image and refit even if unchanged",
        ),
        "embed_engine": setting_param(DEFAULTS, "embed_engine"),
    },
)
def imgsim_index() -> None:
    # One index run at a time per data root, whoever started it (scheduler, backfill, another
    # deployment): a lease taken first and given back last (imgsim.versions.runlease). A waiting run
    # pokes for IMGSIM_LEASE_HOLD_S, then gives its worker slot back and is re-queued
    # IMGSIM_LEASE_REQUEUE_S later (no quick re-queue: Airflow 3.3's reschedule race).
    @task
    def take_lease(run_id: str, dag_run: Any = None) -> None:
        from imgsim.versions.runlease import deployment_id, take_for_run

        settings = Settings.from_env()
        take_for_run(
            settings.layout,
            run_id,
            "imgsim_index",
            poke_s=settings.lease_poke_s,
            hold_s=settings.lease_hold_s,
            requeue_s=settings.lease_requeue_s,
            waiting_since=getattr(dag_run, "start_date", None),
            deployment=deployment_id(settings.deployment_id),
            ttl_s=settings.lease_ttl_s,
        )

    @task
    def release_lease(run_id: str) -> bool:
        from imgsim.versions.runlease import deployment_id, release

        settings = Settings.from_env()
        return release(settings.layout, run_id, deployment=deployment_id(settings.deployment_id))

    # The downloader retries transient errors itself: any download error is final here.
    @task
    def download(params: dict[str, Any]) -> dict[str, Any]:
        from imgsim.index import pipeline

        settings = Settings.from_env()
        with pipeline.index_task(downloads_retried=True):
            return pipeline.download_sources(
                settings,
                params["archive_url"],
                params["labels_url"],
                params["archive_checksum"] or "",
                params["labels_checksum"] or "",
                settings.class_names_locations,
            )

    @task
    def extract(fetched: dict[str, Any]) -> dict[str, Any]:
        from imgsim.index import pipeline

        archive = fetched["archive"]
        with pipeline.index_task():
            return pipeline.extract(
                Settings.from_env(), archive["path"], archive["sha256"], archive.get("kind", "file")
            )

    @task
    def catalog(
        extracted: dict[str, Any],
        fetched: dict[str, Any],
        params: dict[str, Any],
        run_id: str,
        ds: str | None = None,
        dag_run: Any = None,
    ) -> dict[str, Any]:
        from imgsim.index import pipeline

        day = pipeline.run_day(ds, dag_run.run_after if dag_run is not None else None)
        names = fetched.get("class_names")
        with pipeline.index_task():
            return pipeline.catalog(
                Settings.from_env(),
                extracted["root"],
                fetched["labels"]["path"],
                day,
                run_id,
                params["backbone"],
                params["full_rebuild"],
                names["path"] if names else None,
                params["min_label_coverage"],
                params["embedder"],
            )

    @task
    def plan_shards(cataloged: dict[str, Any], run_id: str) -> list[dict[str, Any]]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            return pipeline.plan_shards(
                Settings.from_env(), cataloged["to_embed_file"], run_id, cataloged["backbone"]
            )

    @task(max_active_tis_per_dagrun=2)
    def embed(shard: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            return pipeline.embed_shard(Settings.from_env(), shard["spec"], shard["backbone"])

    @task.branch
    def choose_embed_engine(
        shards: list[dict[str, Any]], cataloged: dict[str, Any], params: dict[str, Any], run_id: str
    ) -> str:
        from imgsim.index import pipeline

        with pipeline.index_task():
            route, job = pipeline.embed_route(
                Settings.from_env(), params["embed_engine"], shards, run_id, cataloged["backbone"]
            )
        get_current_context()["ti"].xcom_push(key="spark_job", value=job)
        return EMBED_ROUTES[route]

    embed_spark = spark_task(
        "embed_spark",
        "embed_images.py",
        name="imgsim-embed",
        conf={"spark.python.worker.reuse": "true"},
        extra_args=["--job", plan_value("choose_embed_engine", "", xcom_key="spark_job")],
    )

    @task(trigger_rule="none_failed_min_one_success")
    def embed_summary(shards: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            return pipeline.embed_summary(shards, params["embed_engine"])

    @task.short_circuit(trigger_rule="none_failed")
    def fit_plan(
        embedded: dict[str, Any], cataloged: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            return pipeline.fit_plan(
                Settings.from_env(),
                cataloged["backbone"],
                params["num_hash_tables"],
                params["bucket_length"],
                params["full_rebuild"],
                embedded=embedded,
                projection=params["projection"],
                run_id=get_current_context()["run_id"],
            )

    @task
    def learn_projection(plan: dict[str, Any]) -> dict[str, Any]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            return pipeline.learn_projection(Settings.from_env(), plan)

    fit_lsh = spark_task(
        "fit_lsh",
        "fit_lsh.py",
        name="imgsim-fit-lsh",
        plan_task="fit_plan",
        conf=FIT_CONF,
        plan_args=FIT_PLAN_ARGS,
        extra_args=["--run-id", "{{ run_id }}"],
    )

    @task
    def validate(plan: dict[str, Any]) -> dict[str, Any]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            return pipeline.validate(Settings.from_env(), plan)

    @task(outlets=[LSH_MODEL])
    def publish(plan: dict[str, Any], run_id: str) -> dict[str, Any]:
        from imgsim.index import pipeline

        with pipeline.index_task():
            published = pipeline.publish(Settings.from_env(), plan["version"], run_id)
        get_current_context()["outlet_events"][LSH_MODEL].extra = published
        return published

    lease = take_lease()
    fetched = download()
    lease >> fetched
    extracted = extract(fetched)
    cataloged = catalog(extracted, fetched)
    shards = plan_shards(cataloged)
    chosen = choose_embed_engine(shards, cataloged)
    embedded = embed.expand(shard=shards)
    summary = embed_summary(shards)
    chosen >> [embedded, embed_spark, summary]
    [embedded, embed_spark] >> summary  # type: ignore[operator]
    planned = fit_plan(summary, cataloged)
    learned = learn_projection(planned)
    learned >> fit_lsh
    validated = validate(planned)
    published = publish(planned)
    fit_lsh >> validated >> published  # type: ignore[operator]
    # The teardown waits for every task of the run, also when one fails or the run is skipped
    # at fit_plan, and does not decide the run's state.
    released = release_lease()
    [embedded, embed_spark, summary, planned, learned, fit_lsh, validated, published] >> released  # type: ignore[operator]
    released.as_teardown(setups=lease)


imgsim_index()
