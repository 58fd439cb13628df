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
distance, candidates, method), as :func:`imgsim.query.run.answer_locally` does for small runs; a
query with no candidate gets one row with a null image_id. The version's file sizes are checked
before Spark starts and its sha256 when a read fails
(:func:`imgsim.versions.models.reading_version`): a
damaged version fails the job with ``VersionDamaged``, naming the file and ``imgsim rollback``.

A version whose manifest records AND-amplified bands or multi-probe (``lsh.keys_per_band`` > 1
or ``lsh.probes`` > 0) is answered by joining on band keys instead: the reference table's
hash columns, ``keys_per_band`` at a time, against each query's probe keys (computed with
:func:`imgsim.ann.probe_keys` from the saved random vectors, as the in-process lookup does).
The join carries ids only; distances are computed once per distinct candidate pair.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.ml.feature import BucketedRandomProjectionLSHModel
from pyspark.ml.functions import array_to_vector
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from imgsim.ann import METHODS
from imgsim.config import SCAN_BELOW, SCAN_SHARE, setting_default
from imgsim.jobs import run_application

log = logging.getLogger("imgsim.query_lsh")

#: Unit vectors are at most 2 apart; anything above returns every candidate pair.
ALL_CANDIDATES = 4.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--version", required=True)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--k", type=int, default=5)
    p.add_argument(
        "--expansion",
        type=int,
        default=setting_default("query_expansion"),
        help="query expansion: search again with each query plus its first N "
        "answers (0 = off; IMGSIM_QUERY_EXPANSION)",
    )
    p.add_argument(
        "--scan-share",
        type=float,
        default=SCAN_SHARE,
        help="answer by an exact scan when the version's LSH compared more than "
        "this share of the index in validation (IMGSIM_SCAN_SHARE)",
    )
    p.add_argument(
        "--scan-below",
        type=int,
        default=SCAN_BELOW,
        help="scan exactly when references x dims is below this (IMGSIM_SCAN_BELOW)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.scan_share <= 1.0 or args.scan_below < 0:
        p.error("--scan-share must be in [0, 1] and --scan-below >= 0")
    if not 1 <= args.k <= 100:
        p.error("--k must be between 1 and 100")
    if "/" in args.version or args.version.startswith("."):
        p.error(f"--version {args.version!r} is not a version name")
    return args


def version_manifest(data_root: Path, version: str) -> tuple[dict[str, Any], Path]:
    vdir = data_root / "models" / "lsh" / version
    if not (vdir / "manifest.json").exists():
        raise FileNotFoundError(f"model version {version} is not published under {vdir.parent}")
    return json.loads((vdir / "manifest.json").read_text()), vdir


def read_model(data_root: Path, version: str) -> tuple[BucketedRandomProjectionLSHModel, Path]:
    manifest, vdir = version_manifest(data_root, version)
    model = BucketedRandomProjectionLSHModel.load(str(vdir / manifest["files"]["model"]))
    return model, vdir / manifest["files"]["reference"]


def read_reference(spark: SparkSession, path: Path) -> DataFrame:
    return spark.read.parquet(str(path)).select(
        "image_id",
        "path",
        "class_id",
        "class_name",
        array_to_vector(F.col("vector")).alias("features"),
    )


def read_queries(spark: SparkSession, run_dir: Path) -> DataFrame:
    return spark.read.parquet(str(run_dir / "query_vectors.parquet")).select(
        "query_id", array_to_vector(F.col("vector").cast("array<float>")).alias("features")
    )


def top_k_per_query(flat: DataFrame, queries: DataFrame, k: int) -> DataFrame:
    """The k nearest of each query's candidates (query_id, image_id, path, class_id,
    class_name, distance), with the candidate count; a query without candidates gets one row
    with nulls and ``candidates`` 0."""
    by_query = Window.partitionBy("query_id")
    ranked = flat.withColumn("candidates", F.count("*").over(by_query)).withColumn(
        "rank", F.row_number().over(by_query.orderBy("distance", "image_id"))
    )
    top = ranked.where(F.col("rank") <= k)
    none = (
        queries.select("query_id")
        .join(flat.select("query_id").distinct(), "query_id", "left_anti")
        .select(
            "query_id",
            F.lit(None).cast("string").alias("image_id"),
            F.lit(None).cast("string").alias("path"),
            F.lit(None).cast("int").alias("class_id"),
            F.lit(None).cast("string").alias("class_name"),
            F.lit(None).cast("double").alias("distance"),
            F.lit(0).cast("long").alias("candidates"),
            F.lit(None).cast("int").alias("rank"),
        )
    )
    return top.select(*none.columns).unionByName(none)


def nearest(
    model: BucketedRandomProjectionLSHModel, queries: DataFrame, reference: DataFrame, k: int
) -> DataFrame:
    """Top-k references per query among the LSH candidates, with the candidate count."""
    pairs = model.approxSimilarityJoin(queries, reference, ALL_CANDIDATES, distCol="distance")
    flat = pairs.select(
        F.col("datasetA.query_id").alias("query_id"),
        F.col("datasetB.image_id").alias("image_id"),
        F.col("datasetB.path").alias("path"),
        F.col("datasetB.class_id").alias("class_id"),
        F.col("datasetB.class_name").alias("class_name"),
        "distance",
    )
    return top_k_per_query(flat, queries, k)


def reference_band_keys(reference: DataFrame, keys_per_band: int) -> DataFrame:
    """(image_id, band, key): each reference's hash columns, ``keys_per_band`` at a time."""
    kb = keys_per_band
    bands = F.transform(
        F.sequence(F.lit(0), (F.size("hashes") / kb).cast("int") - 1),
        lambda b: F.slice("hashes", b * kb + 1, kb),
    )
    return reference.select("image_id", F.posexplode(bands).alias("band", "key"))


def query_probe_keys(
    queries: DataFrame, matrix: np.ndarray, bucket_length: float, keys_per_band: int, probes: int
) -> DataFrame:
    """(query_id, band, key) for every probe key of every query (imgsim.ann.probe_keys)."""
    from imgsim.ann import BrpParams, probe_keys

    params = queries.sparkSession.sparkContext.broadcast(BrpParams(matrix, bucket_length))

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for b in batches:
            if b.empty:
                continue
            x = np.stack(b["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
            keys = probe_keys(params.value, x, keys_per_band, probes)  # (m, L, P, K)
            m, tables, p, _ = keys.shape
            yield pd.DataFrame(
                {
                    "query_id": np.repeat(b["query_id"].to_numpy(), tables * p),
                    "band": np.tile(np.repeat(np.arange(tables, dtype=np.int32), p), m),
                    "key": list(keys.reshape(m * tables * p, keys_per_band)),
                }
            )

    schema = T.StructType(
        [
            T.StructField("query_id", T.StringType()),
            T.StructField("band", T.IntegerType()),
            T.StructField("key", T.ArrayType(T.LongType())),
        ]
    )
    return queries.select("query_id", "vector").mapInPandas(run, schema)


def candidate_distances(pairs: DataFrame, queries: DataFrame, reference: DataFrame) -> DataFrame:
    """(query_id, image_id, path, class_id, class_name, distance) for every candidate pair.

    The pairs are grouped per reference, so each reference vector is read once and never
    copied per pair; the (few) query vectors are broadcast. Distances are L2 in float64.
    """
    q_rows = queries.select("query_id", "vector").collect()
    q_index = {r.query_id: i for i, r in enumerate(q_rows)}
    q_mat = (
        np.stack([np.asarray(r.vector, np.float64) for r in q_rows]) if q_rows else np.zeros((0, 1))
    )
    bq = pairs.sparkSession.sparkContext.broadcast((q_index, q_mat))
    grouped = (
        pairs.groupBy("image_id")
        .agg(F.collect_list("query_id").alias("qids"))
        .join(reference.select("image_id", "path", "class_id", "class_name", "vector"), "image_id")
    )

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        index, qm = bq.value
        for b in batches:
            out: list[tuple[str, str, str | None, Any, str | None, float]] = []
            for row in b.itertuples(index=False):
                qi = np.fromiter((index[q] for q in row.qids), np.int64, len(row.qids))
                d = np.sqrt(((qm[qi] - np.asarray(row.vector, np.float64)) ** 2).sum(axis=1))
                cid = None if pd.isna(row.class_id) else int(row.class_id)
                out.extend(
                    (q, row.image_id, row.path, cid, row.class_name, float(v))
                    for q, v in zip(row.qids, d, strict=True)
                )
            yield pd.DataFrame(
                out, columns=["query_id", "image_id", "path", "class_id", "class_name", "distance"]
            )

    schema = T.StructType(
        [
            T.StructField("query_id", T.StringType()),
            T.StructField("image_id", T.StringType()),
            T.StructField("path", T.StringType()),
            T.StructField("class_id", T.IntegerType()),
            T.StructField("class_name", T.StringType()),
            T.StructField("distance", T.DoubleType()),
        ]
    )
    return grouped.mapInPandas(run, schema)


def nearest_banded(
    params: Any, queries: DataFrame, reference: DataFrame, k: int, keys_per_band: int, probes: int
) -> DataFrame:
    """Top-k per query among references sharing a band key with one of its probe keys.

    ``queries``: query_id, vector (array<float>); ``reference``: image_id, path, class_id,
    class_name, vector, hashes (the stored reference table); ``params``: imgsim.ann.BrpParams.
    """
    qkeys = query_probe_keys(queries, params.matrix, params.bucket_length, keys_per_band, probes)
    rkeys = reference_band_keys(reference, keys_per_band)
    pairs = qkeys.join(rkeys, ["band", "key"]).select("query_id", "image_id").distinct()
    flat = candidate_distances(pairs, queries, reference)
    return top_k_per_query(flat, queries, k)


def answer(
    spark: SparkSession,
    data_root: Path,
    version: str,
    run_dir: Path,
    k: int,
    expansion: int = 0,
    scan: tuple[float, int] = (SCAN_SHARE, SCAN_BELOW),
) -> DataFrame:
    """The neighbours of the run's queries with the version's search (plain or banded).

    The query vectors are mapped into the version's search space first (its projection, as
    :meth:`imgsim.query.lookup.LoadedModel.to_search_space`), then go through the ladder of
    :class:`imgsim.ann.LshIndex`: queries for which the LSH finds fewer than
    ``min(k, index size)`` candidates are searched again with every probe, then exactly.
    A version whose LSH compared more than ``scan[0]`` of the index in validation, or whose
    references x dims is below ``scan[1]``, is answered by an exact scan instead
    (:func:`imgsim.ann.scan_is_cheaper`, the in-process lookup's rule). ``method`` says which
    search answered.
    """
    from imgsim.ann import load_brp_model, scan_is_cheaper
    from imgsim.ann.projection import load as load_projection
    from imgsim.jobs.spark_projection import project
    from imgsim.versions.models import banding, measured_share

    manifest, vdir = version_manifest(data_root, version)
    keys_per_band, probes = banding(manifest)
    reference_path = vdir / manifest["files"]["reference"]
    params = load_brp_model(vdir / manifest["files"]["model"])
    queries = spark.read.parquet(str(run_dir / "query_vectors.parquet")).select(
        "query_id", F.col("vector").cast("array<float>").alias("vector")
    )
    projection = load_projection(vdir, manifest.get("projection"))
    if projection is not None:
        queries = project(queries, projection)
    queries = queries.cache()
    reference = (
        spark.read.parquet(str(reference_path))
        .select("image_id", "path", "class_id", "class_name", "vector", "hashes")
        .cache()
    )
    model = read_model(data_root, version)[0] if keys_per_band == 1 and probes == 0 else None
    indexed = int(manifest["counts"]["indexed"])
    search_dim = int(manifest.get("search_dim") or manifest.get("embedding_dim") or 1)
    want = min(k, indexed)

    scans = scan_is_cheaper(measured_share(manifest), indexed, search_dim, *scan)

    def search(q: DataFrame) -> DataFrame:
        if scans:
            return exact_nearest(q, reference, k).withColumn("method", F.lit("scan"))
        if model is not None:
            found = nearest(
                model,
                q.withColumn("features", array_to_vector(F.col("vector"))),
                read_reference(spark, reference_path),
                k,
            )
        else:
            found = nearest_banded(params, q, reference, k, keys_per_band, probes)
        found = found.withColumn("method", F.lit("lsh")).localCheckpoint()
        steps = (
            [
                (
                    "widened",
                    lambda s: nearest_banded(params, s, reference, k, keys_per_band, keys_per_band),
                )
            ]
            if probes < keys_per_band
            else []
        )
        steps.append(("exact", lambda s: exact_nearest(s, reference, k)))
        for method, widen in steps:
            short = [
                r.query_id
                for r in found.groupBy("query_id")
                .agg(F.count("image_id").alias("n"))
                .where(F.col("n") < want)
                .collect()
            ]
            if not short:
                break
            log.info(
                "%d queries found fewer than %d candidates: %s search", len(short), want, method
            )
            is_short = F.col("query_id").isin(short)
            again = widen(q.where(is_short)).withColumn("method", F.lit(method))
            found = found.where(~is_short).unionByName(again).localCheckpoint()
        return found

    found = search(queries)
    if expansion <= 0 or found.isEmpty():
        return found
    return expand_and_search(spark, queries, found, reference, search, expansion, k)


def expand_and_search(
    spark: SparkSession,
    queries: DataFrame,
    found: DataFrame,
    reference: DataFrame,
    search: Any,
    expansion: int,
    k: int,
) -> DataFrame:
    """Search again with each query plus its first neighbours (imgsim.ann.expand_queries);
    order the new answers by distance to the original query, as imgsim.query.lookup.lookup does."""
    from imgsim.ann import expand_queries

    counts = found.groupBy("query_id").agg(F.count("image_id").alias("n"))
    fewest = counts.agg(F.min("n")).first()
    n = min(expansion, int(fewest[0] or 0) if fewest is not None else 0)
    if n == 0:
        return found
    first = (
        found.where(F.col("rank") <= n)
        .select("query_id", "image_id", "rank")
        .join(reference.select("image_id", F.col("vector").alias("rvec")), "image_id")
        .collect()
    )
    q_rows = queries.select("query_id", "vector").collect()
    ids = [r.query_id for r in q_rows]
    pos = {qid: i for i, qid in enumerate(ids)}
    q = np.stack([np.asarray(r.vector, np.float32) for r in q_rows])
    neigh = np.zeros((len(ids), n, q.shape[1]), np.float32)
    filled = np.zeros(len(ids), int)
    for r in sorted(first, key=lambda r: (r.query_id, r.rank)):  # summed in rank order
        i = pos[r.query_id]
        neigh[i, filled[i]] = np.asarray(r.rvec, np.float32)
        filled[i] += 1
    wide = expand_queries(q, neigh)
    expanded = spark.createDataFrame(
        [(qid, [float(v) for v in wide[i]]) for i, qid in enumerate(ids)],
        "query_id string, vector array<float>",
    )
    again = search(expanded)
    info = (
        again.groupBy("query_id")
        .agg(F.max("candidates").alias("candidates"), F.first("method").alias("method2"))
        .join(found.groupBy("query_id").agg(F.first("method").alias("method1")), "query_id")
    )
    order = F.udf(lambda a, b: max(a, b, key=METHODS.index))
    flat = candidate_distances(
        again.where(F.col("image_id").isNotNull()).select("query_id", "image_id"),
        queries,
        reference,
    )
    ranked = top_k_per_query(flat, queries, k).drop("candidates")
    return (
        ranked.join(info, "query_id")
        .withColumn("method", order("method1", "method2"))
        .drop("method1", "method2")
    )


def exact_nearest(queries: DataFrame, reference: DataFrame, k: int) -> DataFrame:
    """Top-k per query over the whole reference table (every pair compared)."""
    pairs = queries.select("query_id").crossJoin(reference.select("image_id"))
    return top_k_per_query(candidate_distances(pairs, queries, reference), queries, k)


def write_atomically(df: DataFrame, target: Path) -> None:
    """Write to a temporary sibling directory, then rename it onto ``target``."""
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    df.coalesce(1).write.parquet(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)


def main(argv: list[str] | None = None) -> int:
    from imgsim.config import Layout
    from imgsim.versions.models import reading_version, verify_version

    args = parse_args(argv)
    layout = Layout(args.data_root.resolve())
    verify_version(layout, args.version)  # file sizes, before Spark starts

    def body(spark: SparkSession) -> None:
        # A failed read of the version checks its sha256: damage is named, with the way out.
        with reading_version(layout, args.version):
            result = answer(
                spark,
                layout.root,
                args.version,
                args.run_dir,
                args.k,
                args.expansion,
                (args.scan_share, args.scan_below),
            )
            write_atomically(result, args.run_dir / "neighbours")
        log.info("answered the queries of %s with %s", args.run_dir, args.version)

    return run_application(f"imgsim-query-lsh-{args.run_dir.name}", body)
