"""Answer a batch of queries with a published LSH model version, in one Spark job.

    spark-submit --master 'local[*]' spark_jobs/query_lsh.py \
        --data-root data --version v20261122T171400Z-3fa9c2 \
        --run-dir data/queries/results/<run> --k 5

Reads ``<run-dir>/query_vectors.parquet`` (query_id, unit-length vector) and the version's saved
``BucketedRandomProjectionLSHModel`` and hashed reference table. ``approxSimilarityJoin`` with a
threshold above the largest possible distance returns every (query, reference) pair that shares
a bucket in at least one hash table, with its distance: exactly the candidates Spark's
``approxNearestNeighbors`` compares, for all queries at once. The k nearest per query are kept.
Writes ``<run-dir>/neighbours`` (Parquet: query_id, rank, image_id, path, class_id, class_name,
distance, candidates); a query with no candidate gets one row with a null image_id.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from pyspark.ml.feature import BucketedRandomProjectionLSHModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

log = logging.getLogger("imgsim.query_lsh")

#: Unit vectors are at most 2 apart; anything above returns every candidate pair.
ALL_CANDIDATES = 4.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--version", required=True)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--k", type=int, default=5)
    args = p.parse_args(argv)
    if not 1 <= args.k <= 100:
        p.error("--k must be between 1 and 100")
    if "/" in args.version or args.version.startswith("."):
        p.error(f"--version {args.version!r} is not a version name")
    return args


def read_model(data_root: Path, version: str) -> tuple[BucketedRandomProjectionLSHModel, Path]:
    vdir = data_root / "models" / "lsh" / version
    if not (vdir / "manifest.json").exists():
        raise FileNotFoundError(f"model version {version} is not published under {vdir.parent}")
    manifest = json.loads((vdir / "manifest.json").read_text())
    model = BucketedRandomProjectionLSHModel.load(str(vdir / manifest["files"]["model"]))
    return model, vdir / manifest["files"]["reference"]


def read_reference(spark: SparkSession, path: Path) -> DataFrame:
    return (spark.read.parquet(str(path))
            .select("image_id", "path", "class_id", "class_name",
                    array_to_vector("vector").alias("features")))


def read_queries(spark: SparkSession, run_dir: Path) -> DataFrame:
    return (spark.read.parquet(str(run_dir / "query_vectors.parquet"))
            .select("query_id", array_to_vector(F.col("vector").cast("array<float>"))
                    .alias("features")))


def nearest(model: BucketedRandomProjectionLSHModel, queries: DataFrame, reference: DataFrame,
            k: int) -> DataFrame:
    """Top-k references per query among the LSH candidates, with the candidate count."""
    pairs = model.approxSimilarityJoin(queries, reference, ALL_CANDIDATES, distCol="distance")
    flat = pairs.select(F.col("datasetA.query_id").alias("query_id"),
                        F.col("datasetB.image_id").alias("image_id"),
                        F.col("datasetB.path").alias("path"),
                        F.col("datasetB.class_id").alias("class_id"),
                        F.col("datasetB.class_name").alias("class_name"), "distance")
    by_query = Window.partitionBy("query_id")
    ranked = (flat.withColumn("candidates", F.count("*").over(by_query))
              .withColumn("rank", F.row_number().over(by_query.orderBy("distance", "image_id"))))
    top = ranked.where(F.col("rank") <= k)
    none = (queries.select("query_id").join(flat.select("query_id").distinct(), "query_id",
                                             "left_anti")
            .select("query_id", F.lit(None).cast("string").alias("image_id"),
                    F.lit(None).cast("string").alias("path"),
                    F.lit(None).cast("int").alias("class_id"),
                    F.lit(None).cast("string").alias("class_name"),
                    F.lit(None).cast("double").alias("distance"),
                    F.lit(0).cast("long").alias("candidates"),
                    F.lit(None).cast("int").alias("rank")))
    return top.select(*none.columns).unionByName(none)


def write_atomically(df: DataFrame, target: Path) -> None:
    """Write to a temporary sibling directory, then rename it onto ``target``."""
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    df.coalesce(1).write.parquet(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    spark = SparkSession.builder.appName(f"imgsim-query-lsh-{args.run_dir.name}").getOrCreate()
    try:
        model, reference_path = read_model(args.data_root.resolve(), args.version)
        queries = read_queries(spark, args.run_dir)
        result = nearest(model, queries, read_reference(spark, reference_path), args.k)
        write_atomically(result, args.run_dir / "neighbours")
        log.info("answered %d queries with %s", queries.count(), args.version)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
