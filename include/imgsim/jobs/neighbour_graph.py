"""The neighbour graph and near-duplicate groups of a version, on Spark (a stage of the fit job).

From the reference table (image_id, vector: the version's projected space) and the graph's
own LSH (:class:`imgsim.ann.graph.GraphLsh`, tuned per version by
:func:`imgsim.ann.graph.tune_graph_lsh`):

1. every reference gets a node number (its rank by image id, so ties by node are ties by id)
   and is exploded into its band keys; the buckets are counted and single-member buckets
   dropped;
2. the rows are shuffled by bucket (band, key) and sorted, and each partition walks its
   buckets: :func:`imgsim.ann.graph.bucket_neighbours` splits a bucket over the cap at
   medians of seeded projections and scores each leaf with one float64 Gram product, keeping
   each member's k nearest;
3. the k nearest per image over all its buckets (a pair found in several bands once) are the
   graph; an image left with fewer than k neighbours is answered by an exact scan (up to
   ``FILL_MAX`` of them);
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
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

if TYPE_CHECKING:
    from imgsim.ann.graph import GraphLsh

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
        T.StructField("node", T.LongType()),
        T.StructField("neighbour", T.LongType()),
        T.StructField("distance", T.DoubleType()),
        T.StructField("pairs", T.LongType()),
        T.StructField("split", T.LongType()),
        T.StructField("leaf", T.LongType()),
    ]
)


class GraphError(ValueError):
    """The graph cannot be built as asked (the message says why and what to change)."""


def arrow_vectors(column: Any, dim: int) -> np.ndarray:
    """(m, dim) float32 from an Arrow list<float> column (one copy, no per-row Python)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise GraphError("a reference vector is null")
    offsets = column.offsets.to_numpy()
    if len(column) and not (np.diff(offsets) == dim).all():
        raise GraphError(f"reference vectors of other than {dim} dimensions")
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values[offsets[0] : offsets[0] + len(column) * dim].reshape(len(column), dim)


def arrow_list(x: np.ndarray) -> Any:
    """An Arrow list<float> column of the rows of ``x`` (m, dim)."""
    import pyarrow as pa

    m, dim = x.shape
    offsets = pa.array(np.arange(0, (m + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x).ravel()))


def explode_bands(nodes: DataFrame, lsh: GraphLsh, vectors: bool) -> DataFrame:
    """(node, vector) -> one row per band: band, key (and node, vector with ``vectors``)."""
    schema = "band int, key bigint" + (", node bigint, vector array<float>" if vectors else "")

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for batch in batches:
            m = batch.num_rows
            if not m:
                continue
            x = arrow_vectors(batch.column("vector"), lsh.dim)
            cols = {
                "band": pa.array(np.tile(np.arange(lsh.bands, dtype=np.int32), m)),
                "key": pa.array(lsh.band_keys(x).ravel()),
            }
            if vectors:
                node = batch.column("node").to_numpy(zero_copy_only=False)
                cols["node"] = pa.array(np.repeat(node.astype(np.int64), lsh.bands))
                cols["vector"] = arrow_list(np.repeat(x, lsh.bands, axis=0))
            yield pa.RecordBatch.from_pydict(cols)

    return nodes.select("node", "vector").mapInArrow(run, schema)


def _bucket_stage(rows: DataFrame, lsh: GraphLsh, k: int, cap: int) -> DataFrame:
    """Each bucket's leaves scored; every member's k nearest among them (EDGE_SCHEMA; the
    work done rides on the first row of each output batch). Rows arrive sorted by (band,
    key, node); a bucket may go on from one Arrow batch into the next."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        from imgsim.ann.graph import bucket_neighbours

        def starts_of(band: np.ndarray, key: np.ndarray) -> np.ndarray:
            return np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])

        def walk(cols: tuple[np.ndarray, ...], upto: int) -> Any:
            band, key, node, vec = cols
            starts = starts_of(band[:upto], key[:upto])
            ends = np.r_[starts[1:], upto]
            src, dst, dist, pairs, split, leaf = [], [], [], 0, 0, 0
            for s, e in zip(starts, ends, strict=True):
                if e - s < 2:
                    continue
                r = bucket_neighbours(node[s:e], vec[s:e], lsh, int(band[s]), k, cap)
                pairs, split = pairs + r.pairs, split + (r.leaves > 1)
                leaf = max(leaf, r.largest_leaf)
                src.append(r.image_id)
                dst.append(r.neighbour_id)
                dist.append(r.distance)
            if not src:
                return None
            source = np.concatenate(src).astype(np.int64)
            work = np.zeros((3, len(source)), np.int64)
            if len(source):
                work[:, 0] = pairs, split, leaf
            return pa.RecordBatch.from_pydict(
                {
                    "node": pa.array(source),
                    "neighbour": pa.array(np.concatenate(dst).astype(np.int64)),
                    "distance": pa.array(np.concatenate(dist).astype(np.float64)),
                    "pairs": pa.array(work[0]),
                    "split": pa.array(work[1]),
                    "leaf": pa.array(work[2]),
                }
            )

        pending: tuple[np.ndarray, ...] | None = None
        for batch in batches:
            if not batch.num_rows:
                continue
            cols: tuple[np.ndarray, ...] = (
                batch.column("band").to_numpy(zero_copy_only=False),
                batch.column("key").to_numpy(zero_copy_only=False),
                batch.column("node").to_numpy(zero_copy_only=False),
                arrow_vectors(batch.column("vector"), lsh.dim),
            )
            if pending is not None:
                cols = tuple(np.concatenate([a, b]) for a, b in zip(pending, cols, strict=True))
            last = int(starts_of(cols[0], cols[1])[-1])  # the last bucket may go on
            out = walk(cols, last)
            if out is not None:
                yield out
            pending = tuple(c[last:] for c in cols)
        if pending is not None and len(pending[0]):
            out = walk(pending, len(pending[0]))
            if out is not None:
                yield out

    return rows.select("band", "key", "node", "vector").mapInArrow(run, EDGE_SCHEMA)


def top_k(edges: DataFrame, k: int) -> DataFrame:
    """Each node's k nearest distinct neighbours: node, rank (1 = nearest), neighbour,
    distance. A pair found in several buckets has the same distance in each (recomputed pair
    by pair), so it ranks once."""
    w = Window.partitionBy("node").orderBy("distance", "neighbour")
    return (
        edges.withColumn("rank", F.dense_rank().over(w))
        .filter(F.col("rank") <= k)
        .dropDuplicates(["node", "neighbour"])
        .select("node", F.col("rank").cast("int"), "neighbour", "distance")
    )


def node_numbers(reference: DataFrame) -> DataFrame:
    """image_id -> node: the rank of the id (0-based), so node order is id order."""
    spark = reference.sparkSession
    ranked = reference.select("image_id").orderBy("image_id").rdd.zipWithIndex()
    return spark.createDataFrame(
        ranked.map(lambda r: (r[0][0], r[1])), "image_id string, node bigint"
    )


def build_graph(
    reference: DataFrame, lsh: GraphLsh, *, k: int, cap: int
) -> tuple[DataFrame, dict[str, Any]]:
    """The graph of ``reference`` (image_id, vector) before the exact fill, and its bucket
    statistics for the manifest."""
    spark = reference.sparkSession
    names = node_numbers(reference).cache()
    nodes = reference.select("image_id", "vector").join(names, "image_id").cache()
    n = nodes.count()
    counts = explode_bands(nodes, lsh, vectors=False).groupBy("band", "key").count().cache()
    stats = cast(
        Any,
        counts.agg(
            F.count("*").alias("buckets"),
            F.max("count").alias("largest"),
            F.sum(F.when(F.col("count") > 1, 1).otherwise(0)).alias("shared"),
            F.sum(F.when(F.col("count") > 1, F.col("count")).otherwise(0)).alias("rows"),
            F.sum(F.when(F.col("count") > cap, 1).otherwise(0)).alias("over_cap"),
        ).first(),
    )
    rows = explode_bands(nodes, lsh, vectors=True)
    shared = int(stats.shared or 0)
    if shared <= SHARED_BROADCAST_MAX:
        # the buckets with pairs: a broadcast inner join drops the rows of single-member
        # buckets (no pairs) before the shuffle that carries the vectors
        rows = rows.join(
            F.broadcast(counts.filter(F.col("count") > 1).select("band", "key")), ["band", "key"]
        )
        shuffled = int(stats.rows or 0)
    else:
        shuffled = n * lsh.bands
    partitions = max(
        spark.sparkContext.defaultParallelism,
        int(shuffled * (lsh.dim * 4 + 64) // PARTITION_BYTES),
    )
    grouped = rows.repartition(partitions, "band", "key").sortWithinPartitions(
        "band", "key", "node"
    )
    edges = _bucket_stage(grouped, lsh, k, cap).cache()
    work = cast(Any, edges.agg(F.sum("pairs"), F.sum("split"), F.max("leaf")).first())
    counts.unpersist()
    info = {
        "k": k,
        "bucket_cap": cap,
        "lsh": lsh.entry(),
        "buckets": int(stats.buckets or 0),
        "shared_buckets": shared,
        "largest_bucket": int(stats.largest or 0),
        "split_buckets": int(work[1] or 0),
        "largest_leaf": int(work[2] or 0),
        "pairs_compared": int(work[0] or 0),
        "pairs_share": float(work[0] or 0) / max(n * (n - 1) / 2, 1),
        "partitions": partitions,
        "shuffled_rows": shuffled,
    }
    neighbours = names.select(
        F.col("image_id").alias("neighbour_id"), F.col("node").alias("neighbour")
    )
    graph = (
        top_k(edges.select("node", "neighbour", "distance"), k)
        .join(names, "node")
        .join(neighbours, "neighbour")
        .select("image_id", "rank", "neighbour_id", "distance")
        .cache()  # the short-list fill and the write (with its sort's sampling) both read it
    )
    graph.count()
    edges.unpersist()  # k x bands edges per image: give the memory (or disk) back
    nodes.unpersist()
    names.unpersist()
    return graph, info


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
