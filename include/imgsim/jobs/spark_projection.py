"""The projection's Spark side: statistics where the vectors are, the map applied to a DataFrame.

The executors each reduce their partitions to :class:`imgsim.ann.projection.Stats` (counts, sums and
scatter, overall and per class: O(dim^2) per partition, whatever the number of rows), a tree
reduce merges them, and the driver solves the small eigenproblem
(:func:`imgsim.ann.projection.choose`). The same NumPy code runs in both places, so Spark's
statistics equal the NumPy twin's (``tests/test_projection.py``).

Imported only by Spark jobs and tests (pyspark is imported inside the functions).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from imgsim.ann.projection import Projection, Stats, stats_from_arrays


def _rows_to_arrays(rows: Iterator[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
    vecs, labels = [], []
    for row in rows:
        vecs.append(np.asarray(row[0], np.float32))
        labels.append(-1 if row[1] is None else int(row[1]))
    if not vecs:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.stack(vecs), np.asarray(labels, np.int64)


def stats_of(
    df: Any, dim: int, vector_col: str = "vector", label_col: str = "class_id", chunk: int = 4096
) -> Stats:
    """:class:`Stats` of a DataFrame's (array<float>) vectors and (nullable int) labels."""

    def partial(rows: Iterator[Any]) -> Iterator[Stats]:
        total = Stats(dim)
        buf: list[Any] = []
        for row in rows:
            buf.append(row)
            if len(buf) >= chunk:
                total = total.merge(stats_from_arrays(*_rows_to_arrays(iter(buf), dim)))
                buf = []
        if buf:
            total = total.merge(stats_from_arrays(*_rows_to_arrays(iter(buf), dim)))
        yield total

    rdd = df.select(vector_col, label_col).rdd.mapPartitions(partial)
    if rdd.getNumPartitions() == 0:
        return Stats(dim)
    result: Stats = rdd.treeReduce(lambda a, b: a.merge(b), depth=2)
    return result


def labelled_sample(
    df: Any, size: int, seed: int, vector_col: str = "vector", label_col: str = "class_id"
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``size`` labelled vectors (a seeded choice by image id), on the driver."""
    from pyspark.sql import functions as F

    rows = (
        df.where(F.col(label_col).isNotNull() & (F.col(label_col) >= 0))
        .orderBy(F.xxhash64(F.col("image_id"), F.lit(seed)))
        .select("image_id", vector_col, label_col)
        .limit(size)
        .toPandas()
    )
    if rows.empty:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    # In image id order, as the task's engine holds them, so both draw the same folds.
    rows = rows.sort_values("image_id", kind="stable")
    x = np.stack(rows[vector_col].map(lambda v: np.asarray(v, np.float32)).to_list())
    return x, rows[label_col].astype(np.int64).to_numpy()


def project(df: Any, projection: Projection, vector_col: str = "vector") -> Any:
    """``df`` with ``vector_col`` replaced by its projection (array<float>, unit length)."""
    from pyspark.sql import types as T

    bc = df.sparkSession.sparkContext.broadcast(projection)
    schema = T.StructType(
        [
            f if f.name != vector_col else T.StructField(vector_col, T.ArrayType(T.FloatType()))
            for f in df.schema.fields
        ]
    )

    def run(batches: Iterator[Any]) -> Iterator[Any]:
        proj: Projection = bc.value
        for b in batches:
            if b.empty:
                yield b
                continue
            x = np.stack(b[vector_col].map(lambda v: np.asarray(v, np.float32)).to_list())
            b = b.copy()
            b[vector_col] = list(proj.apply(x))
            yield b

    return df.mapInPandas(run, schema)
