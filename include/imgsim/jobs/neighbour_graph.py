"""The neighbour graph and near-duplicate groups of a version, on Spark (a stage of the fit job).

From the reference table (image_id, vector: the version's projected space) and the graph's
own cells (:class:`imgsim.ann.graph.GraphCells`, trained per version by
:func:`imgsim.ann.graph.tune_graph_cells`):

1. every reference gets a node number (its rank by image id, so ties by node are ties by id)
   and one row per probed cell (the nearest: its home);
2. the rows are shuffled by cell and sorted, and each partition walks its cells:
   :func:`imgsim.ann.graph.bucket_neighbours` splits a cell over the cap at medians of
   seeded projections and scores each leaf's rows against its homes with one float64 Gram
   product, keeping k nearest per row and per home;
3. the k nearest per image over all its cells (a pair found in several cells once) are the
   graph; an image left with fewer than k neighbours is answered by an exact scan (up to
   ``FILL_MAX`` of them);
4. edges at or under the duplicate distance form the near-duplicate groups (connected
   components, :func:`imgsim.ann.graph.duplicate_groups`); where the search space is a
   projection, each image's first few edges are rescored between the embeddings first.

Written into the version as ``neighbours/`` (image_id, rank, neighbour_id, distance; rank 1 is
the nearest), ``neighbours-cells.npy`` (the centroids) and ``duplicates/`` (group, size,
image_id, path, class_id, class_name, nearest_id, nearest_distance; group 0 is the largest).
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

from imgsim.errors import PermanentError

if TYPE_CHECKING:
    from imgsim.ann.graph import GraphCells

log = logging.getLogger("imgsim.neighbour_graph")

#: images the cells left short of k neighbours that an exact scan completes (more: left short)
FILL_MAX = 5000
#: edges under the duplicate distance collected on the driver (more: the distance is too big)
MAX_DUPLICATE_EDGES = 5_000_000
#: bytes of exploded rows per shuffle partition of the cell stage
PARTITION_BYTES = 64 << 20
#: the file of the graph's centroids in a version
CELLS_FILE = "neighbours-cells.npy"

EDGE_SCHEMA = T.StructType(
    [
        T.StructField("node", T.LongType()),
        T.StructField("neighbour", T.LongType()),
        T.StructField("distance", T.DoubleType()),
        # the work of the batch's cells, on its first row (0 on the others)
        T.StructField("pairs", T.LongType()),
        T.StructField("cells", T.LongType()),
        T.StructField("split", T.LongType()),
        T.StructField("largest", T.LongType()),
        T.StructField("leaf", T.LongType()),
    ]
)


class GraphError(ValueError, PermanentError):
    """The graph cannot be built as asked (the message says why and what to change)."""


def arrow_vectors(column: Any, dim: int | None = None) -> np.ndarray:
    """(m, dim) float32 from an Arrow list<float> column (one copy, no per-row Python); dim
    None: the first row's."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise GraphError("a reference vector is null")
    offsets = column.offsets.to_numpy()
    if dim is None:
        dim = int(offsets[1] - offsets[0]) if len(column) else 0
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


def explode_cells(nodes: DataFrame, cells: GraphCells) -> DataFrame:
    """(node, vector) -> one row per probed cell: cell, home (the nearest), node, vector."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for batch in batches:
            m = batch.num_rows
            if not m:
                continue
            x = arrow_vectors(batch.column("vector"), cells.dim)
            probe = cells.probe_cells(x)
            node = batch.column("node").to_numpy(zero_copy_only=False).astype(np.int64)
            yield pa.RecordBatch.from_pydict(
                {
                    "cell": pa.array(probe.ravel().astype(np.int32)),
                    "home": pa.array(np.tile(np.arange(cells.probes) == 0, m)),
                    "node": pa.array(np.repeat(node, cells.probes)),
                    "vector": arrow_list(np.repeat(x, cells.probes, axis=0)),
                }
            )

    schema = "cell int, home boolean, node bigint, vector array<float>"
    return nodes.select("node", "vector").mapInArrow(run, schema)


def _cell_stage(rows: DataFrame, cells: GraphCells, k: int, cap: int) -> DataFrame:
    """Each cell's leaves scored (EDGE_SCHEMA; the work done rides on the first row of each
    output batch). Rows arrive sorted by (cell, node); a cell may go on from one Arrow batch
    into the next."""

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        from imgsim.ann.graph import bucket_neighbours

        def starts_of(cell: np.ndarray) -> np.ndarray:
            return np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]])

        def walk(cols: tuple[np.ndarray, ...], upto: int) -> Any:
            cell, home, node, vec = cols
            starts = starts_of(cell[:upto])
            ends = np.r_[starts[1:], upto]
            src, dst, dist = [], [], []
            work = np.zeros(5, np.int64)  # pairs, cells, split, largest, leaf
            for s, e in zip(starts, ends, strict=True):
                r = bucket_neighbours(node[s:e], vec[s:e], home[s:e], cells, k, cap)
                work[:3] += r.pairs, 1, r.leaves > 1
                work[3:] = np.maximum(work[3:], (e - s, r.largest_leaf))
                src.append(r.source)
                dst.append(r.target)
                dist.append(r.distance)
            source = np.concatenate(src).astype(np.int64) if src else np.zeros(0, np.int64)
            if not len(source):  # the work still counts: one row to the node -1
                src, dst, dist = [np.array([-1])], [np.array([-1])], [np.array([np.inf])]
                source = np.array([-1], np.int64)
            stats = np.zeros((5, len(source)), np.int64)
            stats[:, 0] = work
            return pa.RecordBatch.from_pydict(
                {
                    "node": pa.array(source),
                    "neighbour": pa.array(np.concatenate(dst).astype(np.int64)),
                    "distance": pa.array(np.concatenate(dist).astype(np.float64)),
                    **{
                        name: pa.array(stats[i])
                        for i, name in enumerate(("pairs", "cells", "split", "largest", "leaf"))
                    },
                }
            )

        pending: tuple[np.ndarray, ...] | None = None
        for batch in batches:
            if not batch.num_rows:
                continue
            cols: tuple[np.ndarray, ...] = (
                batch.column("cell").to_numpy(zero_copy_only=False),
                batch.column("home").to_numpy(zero_copy_only=False).astype(bool),
                batch.column("node").to_numpy(zero_copy_only=False),
                arrow_vectors(batch.column("vector"), cells.dim),
            )
            if pending is not None:
                cols = tuple(np.concatenate([a, b]) for a, b in zip(pending, cols, strict=True))
            last = int(starts_of(cols[0])[-1])  # the last cell may go on
            if last:
                yield walk(cols, last)
            pending = tuple(c[last:] for c in cols)
        if pending is not None and len(pending[0]):
            yield walk(pending, len(pending[0]))

    return rows.select("cell", "home", "node", "vector").mapInArrow(run, EDGE_SCHEMA)


def top_k(edges: DataFrame, k: int) -> DataFrame:
    """Each node's k nearest distinct neighbours: node, rank (1 = nearest), neighbour,
    distance. A pair found in several cells has the same distance in each (recomputed pair
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


def _score_cells(
    rows: DataFrame, cells: GraphCells, *, k: int, cap: int, n: int, shuffled: int
) -> tuple[DataFrame, dict[str, Any]]:
    """The cell stage over ``rows`` (cell, home, node, vector; ``shuffled`` of them) of an
    index of ``n``: its edges (EDGE_SCHEMA, cached: unpersist it; node -1 rows only carry
    work) and its statistics for the manifest."""
    spark = rows.sparkSession
    partitions = max(
        spark.sparkContext.defaultParallelism,
        int(shuffled * (cells.dim * 4 + 64) // PARTITION_BYTES),
    )
    grouped = rows.repartition(partitions, "cell").sortWithinPartitions("cell", "node")
    edges = _cell_stage(grouped, cells, k, cap).cache()
    work = cast(
        Any,
        edges.agg(
            F.sum("pairs"), F.sum("cells"), F.sum("split"), F.max("largest"), F.max("leaf")
        ).first(),
    )
    return edges, {
        "k": k,
        "bucket_cap": cap,
        "cells": cells.entry(),
        "cells_used": int(work[1] or 0),
        "largest_cell": int(work[3] or 0),
        "split_cells": int(work[2] or 0),
        "largest_leaf": int(work[4] or 0),
        "pairs_compared": int(work[0] or 0),
        "pairs_share": float(work[0] or 0) / max(n * (n - 1) / 2, 1),
        "partitions": partitions,
        "shuffled_rows": shuffled,
    }


def _named(edges: DataFrame, names: DataFrame) -> DataFrame:
    """Edges by node (node, neighbour, ...) with both ends' image ids (image_id,
    neighbour_id) in their place."""
    neighbours = names.select(
        F.col("image_id").alias("neighbour_id"), F.col("node").alias("neighbour")
    )
    return edges.join(names, "node").join(neighbours, "neighbour").drop("node", "neighbour")


def build_graph(
    reference: DataFrame, cells: GraphCells, *, k: int, cap: int
) -> tuple[DataFrame, dict[str, Any]]:
    """The graph of ``reference`` (image_id, vector) before the exact fill, and its cell
    statistics for the manifest."""
    names = node_numbers(reference).cache()
    nodes = reference.select("image_id", "vector").join(names, "image_id")
    n = names.count()
    edges, info = _score_cells(
        explode_cells(nodes, cells), cells, k=k, cap=cap, n=n, shuffled=n * cells.probes
    )
    graph = (
        _named(
            top_k(edges.filter(F.col("node") >= 0).select("node", "neighbour", "distance"), k),
            names,
        )
        .select("image_id", "rank", "neighbour_id", "distance")
        .cache()  # the short-list fill and the write (with its sort's sampling) both read it
    )
    graph.count()
    edges.unpersist()  # k x probes x 2 edges per image: give the memory (or disk) back
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


def graph_changes(previous: DataFrame, reference: DataFrame) -> dict[str, list[str]]:
    """What changed since the ``previous`` graph (image_id, rank, neighbour_id, distance):
    images new to ``reference``, gone from it, and the kept ones that lost a neighbour."""
    now = reference.select("image_id")
    before = previous.select("image_id").distinct()
    gone = before.join(now, "image_id", "left_anti")
    lost = (
        previous.join(gone.select(F.col("image_id").alias("neighbour_id")), "neighbour_id")
        .select("image_id")
        .distinct()
        .join(now, "image_id")
    )

    def ids(df: DataFrame) -> list[str]:
        return sorted(r[0] for r in df.collect())

    return {
        "new": ids(now.join(before, "image_id", "left_anti")),
        "gone": ids(gone),
        "lost": ids(lost),
    }


def incremental_scan_graph(
    reference: DataFrame,
    previous: DataFrame,
    changes: dict[str, list[str]],
    k: int,
    exact: Any,
) -> DataFrame:
    """The exact graph of ``reference`` from the ``previous`` exact graph in the same space:
    new images and those that lost a neighbour are scanned afresh (``exact`` as in
    :func:`scan_graph`); every other image keeps its previous list, merged with its distances
    to the new images (float64, as the scan computes them)."""
    from imgsim.ann.search import smallest_k

    rows = cast(pd.DataFrame, reference.select("image_id", "vector").toPandas())
    ids = rows["image_id"].to_numpy()
    x = np.stack(rows["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
    at = {i: j for j, i in enumerate(ids)}
    again = sorted(set(changes["new"]) | set(changes["lost"]))
    spark = reference.sparkSession
    fresh = exact_edges(spark, again, x[[at[i] for i in again]], k, exact) if again else None
    keep = np.ones(len(ids), bool)
    keep[[at[i] for i in again]] = False
    kept_ids = ids[keep]
    new = [at[i] for i in changes["new"]]
    merged = previous.join(
        F.broadcast(spark.createDataFrame([(str(i),) for i in kept_ids], "image_id string")),
        "image_id",
    ).select("image_id", "neighbour_id", "distance")
    if new and len(kept_ids):
        xk = x[keep].astype(np.float64)
        # each kept image to every new one, the scan's formula (float64 differences)
        d = np.stack([np.sqrt(((xk - x[j].astype(np.float64)) ** 2).sum(1)) for j in new], axis=1)
        top = smallest_k(d, min(k, len(new)))
        edges = pd.DataFrame(
            {
                "image_id": np.repeat(kept_ids, top.shape[1]).astype(str),
                "neighbour_id": ids[np.asarray(new)[top.ravel()]].astype(str),
                "distance": np.take_along_axis(d, top, 1).ravel(),
            }
        )
        merged = merged.unionByName(
            spark.createDataFrame(edges, "image_id string, neighbour_id string, distance double")
        )
    w = Window.partitionBy("image_id").orderBy("distance", "neighbour_id")
    graph = (
        merged.withColumn("rank", F.row_number().over(w))
        .filter(F.col("rank") <= k)
        .select("image_id", F.col("rank").cast("int"), "neighbour_id", "distance")
    )
    return graph if fresh is None else graph.unionByName(fresh)


def touched_cells(reference: DataFrame, ids: list[str], cells: GraphCells) -> list[int]:
    """The cells the images ``ids`` are stored in or probe (where their pairs are scored)."""
    if not ids:
        return []
    spark = reference.sparkSession
    chosen = reference.select("image_id", "vector").join(
        F.broadcast(spark.createDataFrame([(i,) for i in ids], "image_id string")), "image_id"
    )
    nodes = chosen.select(F.lit(0).cast("bigint").alias("node"), "vector")
    return sorted(r[0] for r in explode_cells(nodes, cells).select("cell").distinct().collect())


def incremental_cell_graph(
    reference: DataFrame,
    previous: DataFrame,
    changes: dict[str, list[str]],
    cells: GraphCells,
    touched: list[int],
    *,
    k: int,
    cap: int,
) -> tuple[DataFrame, dict[str, Any]]:
    """The graph of ``reference`` from the ``previous`` one built with the same ``cells`` in
    the same space: only the ``touched`` cells (those of the new images and of the images
    that lost a neighbour: :func:`touched_cells`) are scored again. New images and those
    that lost a neighbour take their lists from that scoring alone (every pair of theirs
    meets in a touched cell); every other image merges its previous list with it. Before
    the exact fill, as :func:`build_graph`."""
    spark = reference.sparkSession
    names = node_numbers(reference).cache()
    nodes = reference.select("image_id", "vector").join(names, "image_id")
    n = names.count()
    cell_ids = F.broadcast(spark.createDataFrame([(int(c),) for c in touched], "cell int"))
    rows = explode_cells(nodes, cells).join(cell_ids, "cell")
    edges, info = _score_cells(
        rows, cells, k=k, cap=cap, n=n, shuffled=rows.count() if touched else 0
    )
    fresh = _named(edges.filter(F.col("node") >= 0).select("node", "neighbour", "distance"), names)
    again = spark.createDataFrame(
        [(i,) for i in sorted(set(changes["new"]) | set(changes["lost"]))], "image_id string"
    )
    kept = (
        previous.join(names.select("image_id"), "image_id")  # still indexed
        .join(F.broadcast(again), "image_id", "left_anti")
        .select("image_id", "neighbour_id", "distance")
    )
    w = Window.partitionBy("image_id").orderBy("distance", "neighbour_id")
    graph = (
        kept.unionByName(fresh)
        .dropDuplicates(["image_id", "neighbour_id"])
        .withColumn("rank", F.row_number().over(w))
        .filter(F.col("rank") <= k)
        .select("image_id", F.col("rank").cast("int"), "neighbour_id", "distance")
        .cache()
    )
    graph.count()
    edges.unpersist()
    names.unpersist()
    return graph, {**info, "cells_scored_again": len(touched)}


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


def raw_distances(pairs: DataFrame, raw: DataFrame) -> DataFrame:
    """(image_id, neighbour_id) pairs with their distance between the ``raw`` vectors
    (image_id, vector; float64 from the float32 vectors, on Arrow batches)."""
    joined = pairs.join(raw.select("image_id", F.col("vector").alias("a")), "image_id").join(
        raw.select(F.col("image_id").alias("neighbour_id"), F.col("vector").alias("b")),
        "neighbour_id",
    )

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        import pyarrow as pa

        for batch in batches:
            if not batch.num_rows:
                continue
            a, b = (arrow_vectors(batch.column(c)) for c in ("a", "b"))
            if a.shape != b.shape:
                raise GraphError(f"embeddings of {a.shape[1]} and {b.shape[1]} dimensions")
            diff = a.astype(np.float64) - b
            yield pa.RecordBatch.from_pydict(
                {
                    "image_id": batch.column("image_id"),
                    "neighbour_id": batch.column("neighbour_id"),
                    "distance": pa.array(np.sqrt(np.einsum("ij,ij->i", diff, diff))),
                }
            )

    schema = "image_id string, neighbour_id string, distance double"
    return joined.select("image_id", "neighbour_id", "a", "b").mapInArrow(run, schema)


def write_duplicates(
    graph: DataFrame,
    reference: DataFrame,
    threshold: float,
    out: Path,
    raw: DataFrame | None = None,
    thumbs: Path | None = None,
    min_inliers: int = 0,
) -> dict[str, Any]:
    """Near-duplicate groups of the graph's edges at or under ``threshold``, written to
    ``out``; their counts for the manifest. With ``raw`` (image_id, vector: the embeddings
    the search space projects), each image's DUPLICATE_RANK nearest are rescored there and
    the threshold applies to those distances. With ``thumbs`` (the data root's thumbnails),
    each such candidate pair is kept only if it is the same photo
    (:class:`imgsim.ann.copies.CopyVerifier`, ``min_inliers``; 0: its measured default):
    groups are the connected pieces of the verified pairs."""
    from imgsim.ann.graph import DUPLICATE_RANK, duplicate_groups

    t0 = time.perf_counter()
    near = graph.select("image_id", "neighbour_id", "distance")
    entry: dict[str, Any] = {"space": "search", "candidates": "every graph edge"}
    if raw is not None:
        first = graph.filter(F.col("rank") <= DUPLICATE_RANK)
        pairs = first.select(
            F.least("image_id", "neighbour_id").alias("image_id"),
            F.greatest("image_id", "neighbour_id").alias("neighbour_id"),
        ).distinct()
        near = raw_distances(pairs, raw)
        entry = {
            "space": "embeddings (L2-normalised, before the projection)",
            "candidates": f"each image's {DUPLICATE_RANK} nearest in the graph, rescored",
        }
    near = near.filter(F.col("distance") <= threshold)
    edges = cast(pd.DataFrame, near.limit(MAX_DUPLICATE_EDGES + 1).toPandas())
    if len(edges) > MAX_DUPLICATE_EDGES:
        raise GraphError(
            f"more than {MAX_DUPLICATE_EDGES} edges are at or under the duplicate distance "
            f"{threshold}: it is far too large (IMGSIM_DUPLICATE_DISTANCE)"
        )
    candidates = len(edges)
    verified = verify_candidates(edges, thumbs, min_inliers) if thumbs is not None else {}
    if thumbs is not None:
        edges = edges.loc[edges["same_photo"].astype(bool).to_numpy()].reset_index(drop=True)
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
    classes = cast(  # the group members' labels only (a few rows, not the index)
        pd.DataFrame,
        F.broadcast(members.select("image_id"))
        .join(reference.select("image_id", "class_id"), "image_id")
        .toPandas(),
    )
    conflicts = _label_conflicts(g.group, g.image_id, classes.set_index("image_id")["class_id"])
    return {
        "distance": threshold,
        **entry,
        "candidate_edges": candidates,
        "verification": verified or None,
        "groups": len(sizes),
        "images": len(g.image_id),
        "largest": int(sizes.max()) if len(sizes) else 0,
        "edges": len(edges),
        "label_conflicts": conflicts,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def verify_candidates(edges: pd.DataFrame, thumbs: Path, min_inliers: int) -> dict[str, Any]:
    """Score each candidate pair with the copy verifier on its thumbnails; adds the columns
    ``inliers`` and ``same_photo`` to ``edges``; the counts for the manifest."""
    from imgsim.ann.copies import MIN_INLIERS, verify_pairs

    need = min_inliers or MIN_INLIERS
    t0 = time.perf_counter()
    scores = verify_pairs(
        zip(edges["image_id"], edges["neighbour_id"], strict=True),
        lambda iid: thumbs / f"{iid}.jpg",
        need,
    )
    edges["inliers"] = [-1 if s is None else s.inliers for s in scores]
    edges["same_photo"] = [s is not None and s.same(need) for s in scores]
    return {
        "method": "ORB keypoints of the two thumbnails, ratio test, RANSAC similarity "
        "transform (mirror tried too): imgsim.ann.copies",
        "min_inliers": need,
        "min_inliers_source": "IMGSIM_DUPLICATE_MIN_INLIERS"
        if min_inliers
        else "measured (benchmarks/bench_duplicates.py)",
        "candidates": len(edges),
        "same_photo": int(edges["same_photo"].sum()),
        "unverifiable": int(sum(s is None for s in scores)),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _label_conflicts(group: np.ndarray, image_id: np.ndarray, class_of: pd.Series) -> int:
    """Groups whose members carry two or more labels ("same photo, two labels": label noise)."""
    seen: dict[int, set[Any]] = {}
    for gid, iid in zip(group.tolist(), image_id.tolist(), strict=True):
        cls = class_of.get(str(iid))
        if cls is not None and not (isinstance(cls, float) and np.isnan(cls)):
            seen.setdefault(int(gid), set()).add(int(cls))
    return sum(1 for labels in seen.values() if len(labels) > 1)
