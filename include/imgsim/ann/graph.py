"""The neighbour graph of an index: every reference's k nearest references, from k-means cells.

The graph partitions the index with its own quantiser (:class:`GraphCells`, trained per
version by :func:`tune_graph_cells`): k-means centroids on a sample of the index, about
``cap / 4`` references per cell, so the cells stay the same size as the index grows. Each
reference is *stored* in its nearest cell (its home) and *probes* its ``probes`` nearest cells
(the home among them): a pair is scored where one of the two probes the other's home, the
inverted-file search of Jegou et al. (2011) run for every reference at once, a self-join on
cell ids. The tuner picks the fewest probes whose predicted recall reaches the target from the
validation queries' exact neighbours over the whole index (the share of them that share a
probed cell with their query, read off the centroids: no guess at a distribution).

Data-adaptive cells replaced random-projection buckets (E2LSH, until this release): on the
bench's 1M vectors the tuned E2LSH reached recall@10 0.58 at its band budget, because random
hyperplanes cut through the dense regions where the near neighbours are; k-means cells follow
them (benchmarks/README.md, "Neighbour graph cost").

A cell's members are scored in one float64 Gram product of its rows against its homes; each
row keeps its k nearest homes and each home its k nearest rows. The kept distances are
recomputed pair by pair in float64, so a pair scored in several cells gets the same distance
in each (duplicates are dropped before the top-k). A cell storing more than ``cap``
references (homes) is split like a random projection tree: where half its homes lie below on
a seeded direction (one per level), again and again until every leaf stores at most ``cap``;
pairs are scored within leaves, so a leaf costs at most its rows x ``cap`` pairs.

Near-duplicate groups are the connected components of the graph's edges under a distance
(:func:`duplicate_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from imgsim.ann.brp import AnnError
from imgsim.ann.search import smallest_k

#: near-duplicate distance between L2-normalised embeddings (not the search space: a learned
#: projection pulls photos of one model together and hides copies), measured by
#: benchmarks/bench_duplicates.py on copies of 300 sample photos: the largest distance at which
#: at most 0.5% of the photos have a distinct photo within it (results/duplicates.md)
DUPLICATE_DISTANCE = 0.41
#: where the search space is a projection, the candidates rescored in the embedding space:
#: each image's DUPLICATE_RANK nearest in the graph (bench_duplicates.py: copies meet their
#: original within it)
DUPLICATE_RANK = 5

#: median splits a cell over the cap can take (a leaf then has at most 2**-levels of it)
SPLIT_LEVELS = 24
#: a cell's homes: the cap over CELL_FILL (a cell holds its homes and the probes of about
#: probes x as many other references)
CELL_FILL = 4
#: the most cells a reference probes
MAX_PROBES = 16
#: k-means: training vectors per centroid (faiss warns under 39; 32 measured as enough here),
#: at least TRAIN_MIN of them (where the index has as many), and Lloyd iterations
TRAIN_PER_CELL = 32
TRAIN_MIN = 50_000
KMEANS_ITERATIONS = 10
#: rows of a Gram product against the centroids at a time (bounds the memory)
CHUNK_ROWS = 8192


def _squared_to(x: np.ndarray, centroids: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Squared distances of the rows of ``x`` to every centroid (float64), less |x|^2 (the
    same for every centroid of a row, so the order is the distance order)."""
    return norms[None, :] - 2.0 * (x @ centroids.T)


def kmeans(x: np.ndarray, cells: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """(cells, dim) float64 centroids of ``x`` by Lloyd's algorithm from ``cells`` distinct
    seeded rows (faiss's default: k-means++ seeding measured 51 s for 4,000 cells of 195-d on
    2 cores, more than the iterations; :func:`balanced_kmeans` re-cuts what it would fix); a
    cell left empty restarts at the row farthest from its centroid."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not 1 <= cells <= len(x):
        raise AnnError(f"k-means of {cells} cells needs at least as many vectors, got {x.shape}")
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(len(x), cells, replace=False)].copy()
    for _ in range(iterations):
        norms = (centroids * centroids).sum(1)
        label = np.empty(len(x), np.int64)
        best = np.empty(len(x))
        for s in range(0, len(x), CHUNK_ROWS):
            d = _squared_to(x[s : s + CHUNK_ROWS], centroids, norms)
            label[s : s + CHUNK_ROWS] = d.argmin(1)
            best[s : s + CHUNK_ROWS] = d[np.arange(len(d)), label[s : s + CHUNK_ROWS]]
        counts = np.bincount(label, minlength=cells)
        sums = np.zeros_like(centroids)
        np.add.at(sums, label, x)
        full = counts > 0
        centroids[full] = sums[full] / counts[full, None]
        empty = np.flatnonzero(~full)
        if len(empty):  # restart them at the rows worst served
            far = np.argsort(-(best + (x * x).sum(1)), kind="stable")[: len(empty)]
            centroids[empty] = x[far]
    return centroids


def balanced_kmeans(x: np.ndarray, cells: int, seed: int) -> np.ndarray:
    """:func:`kmeans`, then every cell with twice the mean share of ``x`` or more re-cut by
    k-means of its own members into cells of about the mean (k-means cells of real data vary
    several-fold, and a random start can leave two clusters in one cell)."""
    x = np.asarray(x, np.float64)
    centroids = kmeans(x, cells, seed)
    label = GraphCells(centroids, 1).probe_cells(x, 1)[:, 0]
    mean = len(x) / cells
    out = []
    for c in range(cells):
        members = x[label == c]
        parts = math.ceil(len(members) / mean)
        if len(members) >= 2 * mean and parts <= len(members):
            out.append(kmeans(members, parts, seed + 1 + c))
        else:
            out.append(centroids[c : c + 1])
    return np.concatenate(out)


@dataclass(frozen=True, eq=False)
class GraphCells:
    """The graph's partition: k-means ``centroids`` (cells, dim); every reference probes its
    ``probes`` nearest cells; seeded directions for the median splits of cells over the cap."""

    centroids: np.ndarray = field(repr=False)
    probes: int
    seed: int = 0

    def __post_init__(self) -> None:
        c = np.asarray(self.centroids, np.float64)
        if c.ndim != 2 or not len(c) or not c.shape[1] or not np.isfinite(c).all():
            raise AnnError(f"graph cells need finite (cells, dim) centroids, got {c.shape}")
        if not 1 <= self.probes <= len(c):
            raise AnnError(f"graph cells: probes {self.probes} not in 1..{len(c)} cells")
        object.__setattr__(self, "centroids", c)

    @property
    def cells(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @cached_property
    def _norms(self) -> np.ndarray:
        return (self.centroids * self.centroids).sum(1)

    @cached_property
    def _split_directions(self) -> np.ndarray:
        return np.random.default_rng(self.seed).standard_normal((self.dim, SPLIT_LEVELS))

    def distances(self, x: np.ndarray) -> np.ndarray:
        """(n, cells): squared distances to the centroids less |x|^2 (distance order)."""
        return _squared_to(self._check(x), self.centroids, self._norms)

    def probe_cells(self, x: np.ndarray, probes: int | None = None) -> np.ndarray:
        """(n, probes) int64: each vector's nearest cells, nearest first (column 0: its home;
        ties: the lower cell)."""
        x = self._check(x)
        m = self.probes if probes is None else probes
        out = np.empty((len(x), m), np.int64)
        for s in range(0, len(x), CHUNK_ROWS):
            d = self.distances(x[s : s + CHUNK_ROWS])
            part = np.argpartition(d, m - 1, axis=1)[:, :m] if m < self.cells else None
            if part is None:
                part = np.broadcast_to(np.arange(self.cells), d.shape)
            dd = np.take_along_axis(d, part, 1)
            order = np.lexsort((part, dd), axis=1)
            out[s : s + len(d)] = np.take_along_axis(part, order, 1)
        return out

    def split_values(self, x: np.ndarray) -> np.ndarray:
        """(m, SPLIT_LEVELS) float64: the projections a cell over the cap is split on."""
        return self._check(x) @ self._split_directions

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise AnnError(f"vectors of shape {x.shape} for graph cells of {self.dim} dims")
        return x

    def entry(self) -> dict[str, Any]:
        """The manifest's record (the centroids go to their own file: :meth:`save`)."""
        return {"cells": self.cells, "dim": self.dim, "probes": self.probes, "seed": self.seed}

    def save(self, path: Any) -> None:
        """The centroids as a .npy file, written whole or not at all."""
        from pathlib import Path

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, self.centroids)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Any, entry: dict[str, Any]) -> GraphCells:
        """The cells of a manifest ``entry`` with their centroids from ``path``."""
        centroids = np.load(path, allow_pickle=False)
        cells = cls(centroids, int(entry["probes"]), int(entry["seed"]))
        if (cells.cells, cells.dim) != (int(entry["cells"]), int(entry["dim"])):
            raise AnnError(f"{path} holds {centroids.shape} centroids, the manifest says {entry}")
        return cells


def cell_count(n: int, cap: int, train: int) -> int:
    """Cells for ``n`` references: about cap / CELL_FILL homes each, at most one per
    TRAIN_PER_CELL training vectors."""
    return max(1, min(math.ceil(n / max(cap // CELL_FILL, 1)), train // TRAIN_PER_CELL, n))


def train_size(n: int, cap: int) -> int:
    """How many vectors of an index of ``n`` the cells are trained on."""
    return min(n, max(TRAIN_MIN, TRAIN_PER_CELL * math.ceil(n / max(cap // CELL_FILL, 1))))


def probe_recall(cells: GraphCells, queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """recall[m - 1] for m = 1..MAX_PROBES (at most the cells): the share of the (query,
    neighbour) pairs (``queries[i]`` and ``neighbours[i]``: their vectors) that meet with m
    probes, the neighbour's home among the query's m nearest cells or the other way round."""
    q, v = cells.distances(queries), cells.distances(neighbours)
    rows = np.arange(len(q))
    hq, hv = q.argmin(1), v.argmin(1)
    # a cell's rank for a vector: the cells strictly nearer (ties: the lower cell first)
    rank_q = (q < q[rows, hv][:, None]).sum(1) + (
        (q == q[rows, hv][:, None]) & (np.arange(cells.cells) < hv[:, None])
    ).sum(1)
    rank_v = (v < v[rows, hq][:, None]).sum(1) + (
        (v == v[rows, hq][:, None]) & (np.arange(cells.cells) < hq[:, None])
    ).sum(1)
    meet = np.minimum(rank_q, rank_v)
    top = min(MAX_PROBES, cells.cells)
    return np.array([float(np.mean(meet < m)) for m in range(1, top + 1)])


def tune_graph_cells(
    train: np.ndarray,
    queries: np.ndarray,
    neighbours: np.ndarray,
    n: int,
    *,
    target: float,
    cap: int,
    seed: int = 0,
) -> tuple[GraphCells, dict[str, Any]]:
    """The graph's cells for ``n`` references: k-means on the ``train`` vectors (a sample of
    the index), and the fewest probes predicted to reach ``target`` recall (:func:`probe_recall`
    of the validation queries and their exact neighbours over the whole index, pair by pair:
    ``queries[i]``, ``neighbours[i]``). Without enough probes to reach it, MAX_PROBES (the
    entry says so)."""
    train = np.asarray(train, np.float64)
    if train.ndim != 2 or not len(train) or not len(queries) or len(queries) != len(neighbours):
        raise AnnError(
            "tuning the graph cells needs training vectors and (query, neighbour) pairs, got "
            f"{np.shape(train)}, {np.shape(queries)}, {np.shape(neighbours)}"
        )
    centroids = balanced_kmeans(train, cell_count(n, cap, len(train)), seed)
    count = len(centroids)
    probe = GraphCells(centroids, 1, seed)
    recall = probe_recall(probe, queries, neighbours)
    ok = np.flatnonzero(recall >= target)
    probes = int(ok[0]) + 1 if len(ok) else len(recall)
    cells = GraphCells(centroids, probes, seed)
    homes = np.bincount(cells.probe_cells(train, 1)[:, 0], minlength=count) * (n / len(train))
    probed = cells.probe_cells(train[:CHUNK_ROWS])
    return cells, {
        "cells": count,
        "probes": probes,
        "predicted_recall": round(float(recall[probes - 1]), 4),
        "recall_by_probes": [round(float(r), 4) for r in recall],
        "target_recall": target,
        "reached": bool(len(ok)),
        "train_vectors": len(train),
        "mean_cell": round(n / count, 1),
        "largest_cell_expected": int(homes.max()),
        # each reference against the homes of the cells it probes (pairs of two homes twice)
        "expected_scorings": int(n * float(homes[probed].sum(1).mean())),
        "method": "k-means cells on a sample of the index; fewest probes whose share of the "
        "validation queries' exact neighbours in a probed home cell reaches the target",
    }


@dataclass(frozen=True)
class BucketResult:
    """One cell's answer: directed edges (member -> one of its k nearest), pairs scored,
    leaves (1 unless the cell was split) and the largest leaf."""

    source: np.ndarray  # (e,) the ids' type (node numbers in the Spark job)
    target: np.ndarray  # (e,)
    distance: np.ndarray  # (e,) float64
    pairs: int
    leaves: int
    largest_leaf: int


def split_leaves(values: np.ndarray, cap: int, home: np.ndarray | None = None) -> list[np.ndarray]:
    """Positions of a cell's rows grouped into leaves of at most ``cap`` homes (``home``: which
    rows are homes; None: all): a group over the cap is cut where half its homes lie below, in
    the order of its ``values`` column for its level (ties: lower position first), level by
    level (``values``: (m, levels))."""
    m, levels = values.shape
    weight = np.ones(m, np.int64) if home is None else np.asarray(home, np.int64)
    leaves, stack = [], [(np.arange(m), 0)]
    while stack:
        idx, level = stack.pop()
        homes = int(weight[idx].sum())
        if homes <= cap or level >= levels:
            leaves.append(idx)
            continue
        order = idx[np.lexsort((idx, values[idx, level]))]
        cut = int(np.searchsorted(np.cumsum(weight[order]), homes // 2, side="right"))
        stack += [(order[cut:], level + 1), (order[:cut], level + 1)]
    return leaves


def _nearest_edges(d: np.ndarray, rows: np.ndarray, cols: np.ndarray, k: int) -> tuple:
    """Each row's k nearest columns of ``d`` (inf: not a pair) as (rows, cols) positions."""
    top = smallest_k(d, min(k, d.shape[1]))
    keep = np.isfinite(np.take_along_axis(d, top, 1))
    return np.repeat(rows, top.shape[1])[keep.ravel()], cols[top[keep]]


def bucket_neighbours(
    ids: Sequence[Any] | np.ndarray,
    x: np.ndarray,
    home: np.ndarray,
    cells: GraphCells,
    k: int,
    cap: int,
) -> BucketResult:
    """The k nearest edges of one cell's rows: ``ids`` (any sortable type; ties go to the
    lower id), their vectors ``x`` (m, dim) and whether the cell is their ``home`` (else they
    probe it). Every row gets its k nearest homes and every home its k nearest rows, within
    its leaf (:func:`split_leaves` when the cell has more than ``cap`` homes); probes are not
    scored against probes. Distances of the kept pairs are float64, recomputed pair by pair
    (the same in every cell)."""
    m = len(ids)
    home = np.asarray(home, bool)
    if x.shape[0] != m or home.shape != (m,):
        raise AnnError(f"cell of {m} ids with {x.shape[0]} vectors and {home.shape} home flags")
    if m < 2 or k < 1 or not home.any():
        return _empty_result(m)
    arr = np.asarray(ids)
    order = np.argsort(arr, kind="stable")
    sids, hs = arr[order], home[order]
    xs = np.asarray(x, np.float64)[order]
    over = int(hs.sum()) > cap
    leaves = split_leaves(cells.split_values(xs), cap, hs) if over else [np.arange(m)]
    src, dst, pairs = [], [], 0
    for leaf in leaves:
        at = np.flatnonzero(hs[leaf])  # the homes' positions in the leaf
        g, h = len(leaf), len(at)
        if g < 2 or not h:
            continue
        pairs += h * (h - 1) // 2 + h * (g - h)
        xl = xs[leaf]
        sq = (xl * xl).sum(1)
        d = sq[:, None] + sq[at][None, :] - 2.0 * (xl @ xl[at].T)  # rows x homes
        d[at, np.arange(h)] = np.inf  # not itself
        s, t = _nearest_edges(d, leaf, leaf[at], k)
        src.append(s)
        dst.append(t)
        if h < g:  # each home's k nearest of all the rows (with only homes: the same edges)
            s, t = _nearest_edges(d.T, leaf[at], leaf, k)
            src.append(s)
            dst.append(t)
    largest = max(len(leaf) for leaf in leaves)
    if not src:
        return _empty_result(m, len(leaves), largest)
    s, t = np.concatenate(src), np.concatenate(dst)
    diff = xs[s] - xs[t]
    dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return BucketResult(sids[s], sids[t], dist, pairs, len(leaves), largest)


def _empty_result(m: int, leaves: int = 1, largest: int = 0) -> BucketResult:
    empty = np.empty(0, dtype=object)
    return BucketResult(empty, empty, np.empty(0), 0, leaves, largest or m)


def local_graph(
    ids: Sequence[Any], x: np.ndarray, cells: GraphCells, k: int, cap: int
) -> tuple[dict[Any, list[tuple[float, Any]]], dict[str, int]]:
    """The whole graph in one process, cell by cell as the Spark job builds it (tests and
    benchmarks compare the two): each image's k nearest as sorted (distance, id) lists, and
    the work done (pairs scored, cells split, largest cell and leaf)."""
    ids = list(ids)
    arr = np.asarray(ids)
    probe = cells.probe_cells(x)
    cell = probe.ravel()
    member = np.repeat(np.arange(len(ids)), probe.shape[1])
    home = np.tile(np.arange(probe.shape[1]) == 0, len(ids))
    found: dict[Any, dict[Any, float]] = {i: {} for i in ids}
    stats = {"pairs": 0, "split": 0, "largest_cell": 0, "largest_leaf": 0}
    order = np.argsort(cell, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(cell[order]) != 0])
    for rows in np.split(order, starts[1:]):
        stats["largest_cell"] = max(stats["largest_cell"], len(rows))
        r = bucket_neighbours(arr[member[rows]], x[member[rows]], home[rows], cells, k, cap)
        stats["pairs"] += r.pairs
        stats["split"] += int(r.leaves > 1)
        stats["largest_leaf"] = max(stats["largest_leaf"], r.largest_leaf)
        for s, t, d in zip(r.source, r.target, r.distance, strict=True):
            found[s][t] = float(d)
    graph = {i: sorted((d, t) for t, d in v.items())[:k] for i, v in found.items()}
    return graph, stats


def exact_neighbours(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k nearest other rows by exact search (tests, benchmarks): (n, k) indices
    and float64 distances, ties by index."""
    from imgsim.ann.search import refine, squared_distances

    x = np.asarray(x, np.float32)
    n = len(x)
    kk = min(k, n - 1)
    idx = np.empty((n, kk), np.int64)
    dist = np.empty((n, kk))
    step = max(1, (1 << 22) // max(n, 1))
    for s in range(0, n, step):
        d = squared_distances(x[s : s + step], x)
        d[np.arange(d.shape[0]), np.arange(s, s + d.shape[0])] = np.inf  # not itself
        top = smallest_k(d, min(n - 1, kk + 16))
        for r, row in enumerate(top):
            i, dd = refine(x[s + r], x, row)
            idx[s + r], dist[s + r] = i[:kk], dd[:kk]
    return idx, dist


@dataclass(frozen=True)
class Groups:
    """Near-duplicate groups: each member's group (0 = the largest) and its nearest member."""

    image_id: np.ndarray  # (g,) object, ordered by group then id
    group: np.ndarray  # (g,) int64
    size: np.ndarray  # (g,) int64
    nearest_id: np.ndarray  # (g,) object: the member's nearest other member
    nearest_distance: np.ndarray  # (g,) float64


def duplicate_groups(
    source: Sequence[str], target: Sequence[str], distance: np.ndarray, threshold: float
) -> Groups:
    """Connected components of the edges (source -> target, distance) at or under
    ``threshold``; components of two or more images, largest first (ties: lowest id)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    distance = np.asarray(distance, np.float64)
    near = distance <= threshold
    src = np.asarray(source, dtype=object)[near]
    dst = np.asarray(target, dtype=object)[near]
    dist = distance[near]
    if not len(src):
        empty = np.empty(0, dtype=object)
        return Groups(empty, np.empty(0, np.int64), np.empty(0, np.int64), empty, np.empty(0))
    names, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
    a, b = inverse[: len(src)], inverse[len(src) :]
    n = len(names)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    sizes = np.bincount(label)
    # each image's nearest other member, over both directions of its edges (names are
    # sorted, so the lower index is the lower id)
    u, v, d = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([dist, dist])
    order = np.lexsort((v, d, u))
    u, v, d = u[order], v[order], d[order]
    first_of = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    best, best_id = np.full(n, np.inf), np.zeros(n, np.int64)
    best[u[first_of]], best_id[u[first_of]] = d[first_of], v[first_of]
    # group order: size descending, then the group's lowest id
    first = np.full(len(sizes), n)
    np.minimum.at(first, label, np.arange(n))  # names are sorted: lowest index = lowest id
    rank = np.lexsort((first, -sizes))
    group_of = np.empty(len(sizes), np.int64)
    group_of[rank] = np.arange(len(sizes))
    g = group_of[label]
    order = np.lexsort((np.arange(n), g))
    return Groups(
        names[order],
        g[order],
        sizes[label][order],
        names[best_id[order]],
        best[order],
    )
