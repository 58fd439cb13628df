"""The neighbour graph and near-duplicate groups of a version, on Spark (a stage of the fit job).

From the hashed reference table (image_id, vector, hashes: the version's LSH in its projected
space):

1. every reference is exploded into its band keys and the buckets are counted; buckets over
   the cap are split into chunks (:func:`imgsim.ann.graph.chunk_sql`);
2. the rows are shuffled by bucket (band, chunk, key) and sorted, and each partition walks its
   buckets: :func:`imgsim.ann.graph.bucket_neighbours` scores the pairs the bucket owns (each
   pair once, in the first band it collides in) with one float64 Gram product and keeps each
   member's k nearest;
3. the k nearest per image over all its buckets are the graph; an image the LSH left with
   fewer than k neighbours is answered by an exact scan (up to ``FILL_MAX`` of them);
4. edges at or under the duplicate distance form the near-duplicate groups (connected
   components, :func:`imgsim.ann.graph.duplicate_groups`).

Written into the version as ``neighbours/`` (image_id, rank, neighbour_id, distance; rank 1 is
the nearest) and ``duplicates/`` (group, size, image_id, path, class_id, class_name,
nearest_id, nearest_distance; group 0 is the largest).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

log = logging.getLogger("imgsim.neighbour_graph")

#: images the LSH left short of k neighbours that an exact scan completes (more: left short)
FILL_MAX = 5000
#: edges under the duplicate distance collected on the driver (more: the distance is too big)
MAX_DUPLICATE_EDGES = 5_000_000
#: bytes of exploded rows per shuffle partition of the bucket stage
PARTITION_BYTES = 64 << 20
#: buckets with two or more members up to which their table is broadcast to drop the rows of
#: single-member buckets before the bucket shuffle (more: every row is shuffled)
SHARED_BROADCAST_MAX = 2_000_000

EDGE_SCHEMA = T.StructType(
    [
        T.StructField("image_id", T.StringType()),
        T.StructField("neighbour_id", T.StringType()),
        T.StructField("distance", T.DoubleType()),
        T.StructField("pairs", T.LongType()),
    ]
)


class GraphError(ValueError):
    """The graph cannot be built as asked (the message says why and what to change)."""


def _bucket_stage(
    exploded: DataFrame, capped: dict[int, dict[tuple[int, ...], int]], keys_per_band: int, k: int
) -> DataFrame:
    """Each bucket's owned pairs scored; every member's k nearest among them (EDGE_SCHEMA)."""
    bc = exploded.sparkSession.sparkContext.broadcast(capped)

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from imgsim.ann.graph import bucket_neighbours

        caps = bc.value
        pending: pd.DataFrame | None = None

        def buckets(frame: pd.DataFrame, final: bool) -> Iterator[pd.DataFrame]:
            g = frame["gkey"].to_numpy()
            starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
            ends = np.r_[starts[1:], len(g)]
            if not final:  # the last bucket may go on in the next batch
                starts, ends = starts[:-1], ends[:-1]
            out = []
            for s, e in zip(starts, ends, strict=True):
                if e - s < 2:
                    continue
                part = frame.iloc[s:e]
                x = np.stack(part["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
                h = np.stack(part["hashes"].map(lambda v: np.asarray(v, np.int64)).to_list())
                r = bucket_neighbours(
                    part["image_id"].tolist(),
                    x,
                    h,
                    int(part["band"].iloc[0]),
                    keys_per_band,
                    k,
                    caps,
                )
                if len(r.image_id):
                    pairs = np.zeros(len(r.image_id), np.int64)
                    pairs[0] = r.pairs
                    out.append(
                        pd.DataFrame(
                            {
                                "image_id": r.image_id,
                                "neighbour_id": r.neighbour_id,
                                "distance": r.distance,
                                "pairs": pairs,
                            }
                        )
                    )
            if out:
                yield pd.concat(out, ignore_index=True)

        for batch in batches:
            if batch.empty:
                continue
            frame = batch if pending is None else pd.concat([pending, batch], ignore_index=True)
            yield from buckets(frame, final=False)
            g = frame["gkey"].to_numpy()
            last = int(np.flatnonzero(np.r_[True, g[1:] != g[:-1]])[-1])
            pending = frame.iloc[last:].reset_index(drop=True)
        if pending is not None and len(pending):
            yield from buckets(pending, final=True)

    return exploded.select("gkey", "band", "image_id", "vector", "hashes").mapInPandas(
        run, EDGE_SCHEMA
    )


def top_k(edges: DataFrame, k: int) -> DataFrame:
    """Each image's k nearest edges: image_id, rank (1 = nearest), neighbour_id, distance."""
    w = Window.partitionBy("image_id").orderBy("distance", "neighbour_id")
    return (
        edges.withColumn("rank", F.row_number().over(w))
        .filter(F.col("rank") <= k)
        .select("image_id", F.col("rank").cast("int"), "neighbour_id", "distance")
    )


def build_graph(
    reference: DataFrame, *, bands: int, keys_per_band: int, k: int, cap: int, dim: int
) -> tuple[DataFrame, dict[str, Any]]:
    """The graph of ``reference`` (image_id, vector, hashes) before the exact fill, and its
    bucket statistics for the manifest."""
    spark = reference.sparkSession
    ref = reference.select("image_id", "vector", "hashes")
    exploded = ref.withColumn("band", F.explode(F.sequence(F.lit(0), F.lit(bands - 1)))).withColumn(
        "key", F.slice("hashes", F.col("band") * keys_per_band + 1, F.lit(keys_per_band))
    )
    counts = exploded.groupBy("band", "key").count().cache()
    stats = cast(
        Any,
        counts.agg(
            F.count("*").alias("buckets"),
            F.max("count").alias("largest"),
            F.sum(F.when(F.col("count") > 1, 1).otherwise(0)).alias("shared"),
            F.sum(F.when(F.col("count") > 1, F.col("count")).otherwise(0)).alias("rows"),
            F.sum(F.when(F.col("count") > cap, 1).otherwise(0)).alias("capped"),
        ).first(),
    )
    capped: dict[int, dict[tuple[int, ...], int]] = {b: {} for b in range(bands)}
    capped_rows = counts.filter(F.col("count") > cap).collect()
    for row in capped_rows:
        capped[int(row.band)][tuple(int(v) for v in row.key)] = -(-int(row["count"]) // cap)
    from imgsim.ann.graph import chunk_sql

    shared = int(stats.shared or 0)
    if shared <= SHARED_BROADCAST_MAX:
        # the buckets with pairs, and their chunks: a broadcast inner join drops the rows of
        # single-member buckets (no pairs) before the shuffle that carries the vectors
        buckets = counts.filter(F.col("count") > 1).select(
            "band", "key", F.ceil(F.col("count") / F.lit(cap)).cast("bigint").alias("chunks")
        )
        exploded = exploded.join(F.broadcast(buckets), ["band", "key"], "inner").withColumn(
            "chunk", F.expr(chunk_sql("band", "chunks"))
        )
    elif capped_rows:
        caps = spark.createDataFrame(
            [(int(r.band), list(r.key), -(-int(r["count"]) // cap)) for r in capped_rows],
            "band int, key array<bigint>, chunks bigint",
        )
        exploded = exploded.join(F.broadcast(caps), ["band", "key"], "left").withColumn(
            "chunk", F.expr(chunk_sql("band", "coalesce(chunks, 1)"))
        )
    else:
        exploded = exploded.withColumn("chunk", F.lit(0).cast("bigint"))
    n = reference.count()
    rows = int(stats.rows or 0) if shared <= SHARED_BROADCAST_MAX else n * bands
    partitions = max(
        spark.sparkContext.defaultParallelism, int(rows * (dim * 4 + 200) // PARTITION_BYTES)
    )
    grouped = (
        exploded.withColumn(
            "gkey", F.concat_ws("/", "band", "chunk", F.array_join(F.col("key"), ","))
        )
        .repartition(partitions, "gkey")
        .sortWithinPartitions("gkey")
    )
    edges = _bucket_stage(grouped, capped, keys_per_band, k).cache()
    pairs = cast(Any, edges.agg(F.sum("pairs")).first())[0] or 0
    counts.unpersist()
    info = {
        "k": k,
        "bucket_cap": cap,
        "buckets": int(stats.buckets or 0),
        "shared_buckets": int(stats.shared or 0),
        "largest_bucket": int(stats.largest or 0),
        "capped_buckets": int(stats.capped or 0),
        "pairs_compared": int(pairs),
        "pairs_share": float(pairs) / max(n * (n - 1) / 2, 1),
        "partitions": partitions,
        "shuffled_rows": rows,
    }
    # cached: the short-list fill and the write (with its sort's sampling pass) both read it
    return top_k(edges.drop("pairs"), k).cache(), info


def fill_short(
    graph: DataFrame, reference: DataFrame, k: int, n: int, exact: Any
) -> tuple[DataFrame, dict[str, int]]:
    """Images with fewer than min(k, n - 1) neighbours get their k nearest by exact search
    (``exact(queries, vectors, k)`` -> rows query_id, image_id, distance), up to FILL_MAX."""
    need = min(k, n - 1)
    found = graph.groupBy("image_id").count()
    short = (
        reference.select("image_id", "vector")
        .join(found, "image_id", "left")
        .filter(F.coalesce(F.col("count"), F.lit(0)) < need)
    )
    rows = cast(pd.DataFrame, short.limit(FILL_MAX + 1).toPandas())
    if not len(rows):
        return graph, {"short": 0, "filled": 0}
    if len(rows) > FILL_MAX:
        total = short.count()
        log.warning(
            "%d images have fewer than %d neighbours; not filled (> %d)", total, need, FILL_MAX
        )
        return graph, {"short": int(total), "filled": 0}
    q_vec = np.stack(rows["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
    ids = rows["image_id"].tolist()
    spark = graph.sparkSession
    filled = exact_edges(spark, ids, q_vec, k, exact)
    kept = graph.join(
        F.broadcast(spark.createDataFrame([(i,) for i in ids], "image_id string")),
        "image_id",
        "left_anti",
    )
    return kept.unionByName(filled), {"short": len(ids), "filled": len(ids)}


def exact_edges(
    spark: SparkSession, ids: list[str], vectors: np.ndarray, k: int, exact: Any
) -> DataFrame:
    """The k nearest other references of ``ids`` (their ``vectors``) by exact search, as graph
    rows (``exact(queries, vectors, k + 1)`` -> query_id, image_id, distance; the query itself
    is among them and dropped)."""
    rows = exact(pd.DataFrame({"image_id": ids}), vectors, k)
    rows = rows[rows["image_id"] != rows["query_id"]]
    rows = rows.sort_values(["query_id", "distance", "image_id"])
    rows["rank"] = rows.groupby("query_id").cumcount() + 1
    rows = rows[rows["rank"] <= k]
    return spark.createDataFrame(
        rows.rename(columns={"image_id": "neighbour_id", "query_id": "image_id"})[
            ["image_id", "rank", "neighbour_id", "distance"]
        ].astype({"rank": "int32"}),
        "image_id string, rank int, neighbour_id string, distance double",
    )


def scan_graph(
    reference: DataFrame, k: int, n: int, exact: Any
) -> tuple[DataFrame, dict[str, Any]]:
    """The whole graph by exact search (a small index: cheaper than the buckets, and exact)."""
    rows = cast(pd.DataFrame, reference.select("image_id", "vector").toPandas())
    vectors = np.stack(rows["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
    graph = exact_edges(reference.sparkSession, rows["image_id"].tolist(), vectors, k, exact)
    return graph, {
        "k": k,
        "pairs_compared": n * (n - 1) // 2,
        "pairs_share": 1.0,
        "short": 0,
        "filled": 0,
    }


def graph_recall(
    graph: DataFrame, exact_rows: pd.DataFrame, queries: list[str], k: int, n: int
) -> dict[str, Any]:
    """Recall@k of the graph against exact search for the sampled ``queries`` (exact_rows:
    query_id, image_id, distance; the query itself among them)."""
    need = min(k, n - 1)
    got = cast(
        pd.DataFrame,
        graph.filter(F.col("image_id").isin(queries)).select("image_id", "neighbour_id").toPandas(),
    )
    by_query = got.groupby("image_id")["neighbour_id"].apply(set).to_dict()
    recalls = []
    for q in queries:
        rows = exact_rows[(exact_rows["query_id"] == q) & (exact_rows["image_id"] != q)]
        truth = set(rows.sort_values(["distance", "image_id"])["image_id"].head(need))
        recalls.append(len(truth & by_query.get(q, set())) / max(need, 1))
    return {"recall_at_k": float(np.mean(recalls)) if recalls else None, "queries": len(recalls)}


def write_graph(graph: DataFrame, out: Path) -> int:
    graph.orderBy("image_id", "rank").write.mode("overwrite").parquet(str(out))
    return int(graph.sparkSession.read.parquet(str(out)).count())


def write_duplicates(
    graph: DataFrame, reference: DataFrame, threshold: float, out: Path
) -> dict[str, Any]:
    """Near-duplicate groups of the graph's edges at or under ``threshold``, written to
    ``out``; their counts for the manifest."""
    from imgsim.ann.graph import duplicate_groups

    t0 = time.perf_counter()
    near = graph.filter(F.col("distance") <= threshold).select(
        "image_id", "neighbour_id", "distance"
    )
    edges = cast(pd.DataFrame, near.limit(MAX_DUPLICATE_EDGES + 1).toPandas())
    if len(edges) > MAX_DUPLICATE_EDGES:
        raise GraphError(
            f"more than {MAX_DUPLICATE_EDGES} edges are at or under the duplicate distance "
            f"{threshold}: it is far too large (IMGSIM_DUPLICATE_DISTANCE)"
        )
    g = duplicate_groups(
        edges["image_id"].to_numpy(), edges["neighbour_id"].to_numpy(), edges["distance"], threshold
    )
    spark = graph.sparkSession
    members = spark.createDataFrame(
        pd.DataFrame(
            {
                "group": g.group.astype("int32"),
                "size": g.size.astype("int32"),
                "image_id": g.image_id.astype(str),
                "nearest_id": g.nearest_id.astype(str),
                "nearest_distance": g.nearest_distance,
            }
        ),
        "group int, size int, image_id string, nearest_id string, nearest_distance double",
    )
    (
        members.join(
            reference.select("image_id", "path", "class_id", "class_name"), "image_id", "left"
        )
        .select(
            "group",
            "size",
            "image_id",
            "path",
            "class_id",
            "class_name",
            "nearest_id",
            "nearest_distance",
        )
        .orderBy("group", "image_id")
        .coalesce(1)
        .write.mode("overwrite")
        .parquet(str(out))
    )
    sizes = np.bincount(g.group) if len(g.group) else np.zeros(0, np.int64)
    return {
        "distance": threshold,
        "groups": len(sizes),
        "images": len(g.image_id),
        "largest": int(sizes.max()) if len(sizes) else 0,
        "edges": len(edges),
        "seconds": round(time.perf_counter() - t0, 3),
    }
