"""Embed one index run's images on Spark executors; writes the same store as the embed tasks.

    spark-submit --master 'local[*]' spark_jobs/embed_images.py \
        --job data/runs/<run>/spark_embed.json

The job file is written by the index DAG's ``choose_embed_engine`` task
(:func:`imgsim.index.pipeline.write_spark_embed_job`) from the shards of ``plan_shards``: the data
root, the backbone, the run key, the shard spec files and the embedding settings (batch size,
device, weights file, threads, pixel limit) of the Airflow worker that planned the run.

1. The driver loads the backbone once on the CPU for its spec (weights file and sha256,
   preprocessing) and checks it against ``embeddings/<backbone>/BACKBONE.json``.
2. ``mapInPandas`` spreads the images over the executors in contiguous slices. Each Python
   worker loads the backbone once (cached in :mod:`imgsim.index.spark_embed`) and runs the in-task
   code: threaded decoding (draft mode, EXIF orientation, RGB), thumbnails, batched inference;
   bad images are quarantined with their reason.
3. ``groupBy(shard).applyInPandas`` writes one Parquet file per planned shard,
   ``embeddings/<backbone>/part-<run>-<shard>.parquet`` (atomic rename, same columns and
   types, same name, so a retry replaces it), then the shard's result record
   ``runs/<run>/embedded/shard-NNNNN.json``, which the DAG's ``embed_summary`` reads.

On a standalone cluster (``--master spark://HOST:7077``) the data root must be the same shared
path on every worker, and every worker's Python must have imgsim and the weights installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession

from imgsim.index.pipeline import check_backbone_record, embed_summary
from imgsim.index.spark_embed import (
    EMBEDDED_SCHEMA,
    ITEM_SCHEMA,
    RESULT_SCHEMA,
    EmbedJob,
    PlannedShard,
    cached_backbone,
    embed_partition,
    item_rows,
    read_shards,
    write_shard_group,
)
from imgsim.jobs import run_application

log = logging.getLogger("imgsim.embed_images")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--job",
        required=True,
        type=Path,
        help="runs/<run>/spark_embed.json (imgsim.index.pipeline.write_spark_embed_job)",
    )
    p.add_argument(
        "--images-per-task",
        type=int,
        default=256,
        help="images per Spark task (at least one task per core)",
    )
    args = p.parse_args(argv)
    if args.images_per_task < 1:
        p.error("--images-per-task must be >= 1")
    return args


def num_slices(total: int, parallelism: int, images_per_task: int) -> int:
    """Enough tasks to keep every core busy, each about ``images_per_task`` images."""
    return max(1, min(total, max(parallelism, math.ceil(total / images_per_task))))


def item_frame(
    spark: SparkSession,
    shards: list[PlannedShard],
    images_per_task: int,
) -> DataFrame:
    rows = item_rows(shards)
    sc = spark.sparkContext
    slices = num_slices(len(rows), sc.defaultParallelism, images_per_task)
    log.info("%d images in %d shard(s) -> %d Spark tasks", len(rows), len(shards), slices)
    return spark.createDataFrame(sc.parallelize(rows, slices), ITEM_SCHEMA)


def run(spark: SparkSession, args: argparse.Namespace) -> dict[str, Any]:
    job = EmbedJob.from_file(args.job)
    shards = read_shards(job)
    # On the CPU: the driver only needs the spec (and, for ONNX, exports the model file once
    # into the cache before executors on this machine look for it).
    driver_backbone = cached_backbone(
        job.backbone, job.weights_path, "cpu", job.runtime, job.cache_dir, job.layout.embedders
    )
    spec = driver_backbone.spec.as_dict()
    check_backbone_record(job.layout, spec)

    spark.conf.set(
        "spark.sql.shuffle.partitions",
        str(max(1, min(len(shards), spark.sparkContext.defaultParallelism * 2))),
    )
    items = item_frame(spark, shards, args.images_per_task)
    embedded = items.mapInPandas(partial(embed_partition, job, spec), EMBEDDED_SCHEMA)
    written = (
        embedded.groupBy("shard")
        .applyInPandas(
            partial(write_shard_group, job, {s.shard: s.spec for s in shards}, int(spec["dim"])),
            RESULT_SCHEMA,
        )
        .collect()
    )
    done = {int(r["shard"]) for r in written}
    missing = sorted({s.shard for s in shards} - done)
    if missing:  # every planned shard has at least one image, so each one is a group
        raise RuntimeError(f"shards {missing} were not written")
    for r in sorted(written, key=lambda r: int(r["shard"])):
        log.info(
            "shard %d: %d embedded, quarantined %s -> %s",
            r["shard"],
            r["embedded"],
            json.loads(r["quarantined"]) or "none",
            r["file"],
        )
    return embed_summary([s.as_plan() for s in shards], "spark")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary: dict[str, Any] = {}
    rc = run_application(
        f"imgsim-embed-{args.job.parent.name}", lambda spark: summary.update(run(spark, args))
    )
    print("IMGSIM_EMBED_SUMMARY " + json.dumps(summary, sort_keys=True), flush=True)
    return rc
