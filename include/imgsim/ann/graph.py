"""The neighbour graph of an index: every reference's k nearest references, from LSH buckets.

The graph has its own LSH (:class:`GraphLsh`, E2LSH of Datar et al. 2004: ``bands`` bands of
``keys`` hash values ``floor((x . a + b) / width)`` with Gaussian ``a`` and uniform offsets
``b``), tuned per version by :func:`tune_graph_lsh` for the graph's recall target at the least
cost from the index's own distances: the exact k nearest distances of the validation queries
(over the whole index) and the distances of random pairs. Its buckets therefore stay about
the same size as the index grows (more keys per band, more bands), where the query LSH's
buckets, tuned on a fixed sample, grow with n.

The members of a bucket are compared with one another in one float64 Gram product and each
member keeps its k nearest; the kept distances are recomputed pair by pair in float64, so a
pair scored in several bands gets the same distance in each (duplicates are dropped before the
top-k). A bucket with more than ``cap`` members is split like a random projection tree: at
the median of its members' projections on a seeded direction (one per band and level), again
and again until every leaf has at most ``cap`` members; pairs are scored within leaves. Close
pairs stay together far more often than under a random split, and no bucket costs more than
``cap``^2 / 2 pairs.

Near-duplicate groups are the connected components of the graph's edges under a distance
(:func:`duplicate_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from imgsim.ann.brp import AnnError
from imgsim.ann.search import smallest_k

#: near-duplicate distance per search space (projection kind), measured by
#: benchmarks/bench_duplicates.py on copies of 300 sample photos: the largest distance at which
#: at most 0.5% of the photos have a distinct photo within it (results/duplicates.md). Whitening
#: was not measured: a whitened version gets no groups unless IMGSIM_DUPLICATE_DISTANCE is set.
DUPLICATE_DISTANCE = {"lda": 0.51, "none": 0.41}

#: median splits a bucket over the cap can take (a leaf then has at most 2**-levels of it)
SPLIT_LEVELS = 24
#: the tuner's cost of one exploded row (explode, bucket shuffle, walk, its k edges through the
#: top-k), in pairs scored: about 30 us against 0.03 us in bench_graph.py's 100k run (3.2M rows
#: and 587M pairs in a 121 s bucket stage on 2 cores, the Gram products about 15 s of it)
ROW_COST = 1000.0
#: the tuner's grid: bands, keys per band, and widths as multiples of the median pair distance
MAX_BANDS = 32
MAX_KEYS = 24
WIDTH_FACTORS = tuple(float(f) for f in np.geomspace(0.05, 8.0, 23))

_MIX = np.uint64(0x100000001B3)


def collision_probability(distance: np.ndarray, width: float) -> np.ndarray:
    """P[one E2LSH hash value agrees] for points ``distance`` apart (Datar et al. 2004):
    1 - 2 Phi(-c) - 2 / (sqrt(2 pi) c) (1 - exp(-c^2 / 2)), c = width / distance."""
    from scipy.special import ndtr

    d = np.maximum(np.asarray(distance, np.float64), 1e-12)
    c = width / d
    return np.clip(
        1.0 - 2.0 * ndtr(-c) - 2.0 / (math.sqrt(2.0 * math.pi) * c) * (1.0 - np.exp(-(c**2) / 2)),
        0.0,
        1.0,
    )


@dataclass(frozen=True)
class GraphLsh:
    """The graph's LSH: ``bands`` band keys per vector, each from ``keys`` E2LSH values of
    ``width``; seeded directions for the median splits of buckets over the cap."""

    dim: int
    bands: int
    keys: int
    width: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim < 1 or self.bands < 1 or self.keys < 1 or not self.width > 0:
            raise AnnError(f"bad graph LSH {self}: dim, bands, keys >= 1 and width > 0")

    @cached_property
    def _planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.standard_normal((self.dim, self.bands * self.keys))
        b = rng.uniform(0.0, self.width, self.bands * self.keys)
        s = rng.standard_normal((self.dim, self.bands * SPLIT_LEVELS))
        return a, b, s

    def band_keys(self, x: np.ndarray) -> np.ndarray:
        """(n, bands) int64: each vector's bucket key per band (its ``keys`` values mixed)."""
        x = self._check(x)
        a, b, _ = self._planes
        h = np.floor((x @ a + b) / self.width).astype(np.int64).view(np.uint64)
        h = h.reshape(len(x), self.bands, self.keys)
        acc = np.zeros((len(x), self.bands), np.uint64)
        for j in range(self.keys):
            acc = (acc * _MIX) ^ h[:, :, j]
        return acc.view(np.int64)

    def split_values(self, x: np.ndarray, band: int) -> np.ndarray:
        """(m, SPLIT_LEVELS) float64: the projections a bucket of ``band`` is split on."""
        _, _, s = self._planes
        return self._check(x) @ s[:, band * SPLIT_LEVELS : (band + 1) * SPLIT_LEVELS]

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise AnnError(f"vectors of shape {x.shape} for a graph LSH of {self.dim} dims")
        return x

    def entry(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "bands": self.bands,
            "keys": self.keys,
            "width": self.width,
            "seed": self.seed,
        }

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> GraphLsh:
        return cls(
            int(entry["dim"]),
            int(entry["bands"]),
            int(entry["keys"]),
            float(entry["width"]),
            int(entry["seed"]),
        )


def predicted_recall(near: np.ndarray, width: float, keys: int, bands: int) -> float:
    """The share of the true neighbours (``near``: their distances) that share a bucket with
    their query in at least one of ``bands`` bands of ``keys`` values of ``width``."""
    p = collision_probability(near, width) ** keys
    return float(np.mean(1.0 - (1.0 - p) ** bands))


def tune_graph_lsh(
    near: np.ndarray,
    pairs: np.ndarray,
    n: int,
    dim: int,
    *,
    target: float,
    cap: int,
    seed: int = 0,
) -> tuple[GraphLsh, dict[str, Any]]:
    """The cheapest graph LSH predicted to reach ``target`` recall@k.

    ``near``: distances of true k nearest neighbours (the validation queries', exact over the
    whole index); ``pairs``: distances of random pairs of references. For every width and keys
    per band of the grid, the fewest bands reaching ``target`` (:func:`predicted_recall`);
    cost per band: n rows through the shuffle (``ROW_COST`` pairs each) plus the pairs that
    collide, n^2 / 2 x the mean collision probability of random pairs; buckets expected over
    ``cap`` members are ruled out (larger ones are split; some are, as sizes vary). Without
    any candidate reaching ``target``, the one with the highest predicted recall (the entry
    says so)."""
    near = np.asarray(near, np.float64).ravel()
    pairs = np.asarray(pairs, np.float64).ravel()
    if not len(near) or not len(pairs):
        raise AnnError("tuning the graph LSH needs neighbour and pair distances")
    median = float(np.median(pairs))
    if not median > 0:
        raise AnnError("every sampled pair is at distance 0: the vectors are all equal")
    best: tuple[float, float, int, int, float] | None = None  # cost, recall, bands, keys, width
    fallback: tuple[tuple[float, float], float, int, int, float] | None = None
    bands_grid = np.arange(1, MAX_BANDS + 1)
    for factor in WIDTH_FACTORS:
        width = factor * median
        p_near = collision_probability(near, width)
        p_far = collision_probability(pairs, width)
        for keys in range(1, MAX_KEYS + 1):
            collide = float(np.mean(p_far**keys))
            if 1 + (n - 1) * collide > cap:
                continue
            recall = np.mean(1.0 - (1.0 - p_near[:, None] ** keys) ** bands_grid, axis=0)
            per_band = n * ROW_COST + n * (n - 1) / 2 * collide
            ok = np.flatnonzero(recall >= target)
            if len(ok):
                bands = int(bands_grid[ok[0]])
                if best is None or bands * per_band < best[0]:
                    best = (bands * per_band, float(recall[ok[0]]), bands, keys, width)
            rank = (-float(recall[-1]), MAX_BANDS * per_band)
            if fallback is None or rank < fallback[0]:
                fallback = (rank, float(recall[-1]), MAX_BANDS, keys, width)
    chosen = best or fallback
    if chosen is None:
        raise AnnError(f"no graph LSH keeps the expected bucket under the cap {cap}")
    _, recall, bands, keys, width = chosen
    lsh = GraphLsh(dim, bands, keys, width, seed)
    collide = float(np.mean(collision_probability(pairs, width) ** keys))
    return lsh, {
        "predicted_recall": round(recall, 4),
        "target_recall": target,
        "reached": best is not None,
        "expected_bucket": round(1 + (n - 1) * collide, 2),
        "expected_pairs": int(bands * n * (n - 1) / 2 * collide),
        "median_pair_distance": median,
        "method": "E2LSH collision probabilities of the validation queries' exact neighbour "
        "distances and of random sample pairs; least rows x ROW_COST + pairs",
    }


@dataclass(frozen=True)
class BucketResult:
    """One bucket's answer: directed edges (member -> one of its k nearest), pairs scored,
    leaves (1 unless the bucket was split) and the largest leaf."""

    image_id: np.ndarray  # (e,) the ids' type
    neighbour_id: np.ndarray  # (e,)
    distance: np.ndarray  # (e,) float64
    pairs: int
    leaves: int
    largest_leaf: int


def split_leaves(values: np.ndarray, cap: int) -> list[np.ndarray]:
    """Positions of a bucket's members grouped into leaves of at most ``cap``: a group over
    the cap is halved at the median of its ``values`` column for its level (ties: lower
    position first), level by level (``values``: (m, levels))."""
    m, levels = values.shape
    leaves, stack = [], [(np.arange(m), 0)]
    while stack:
        idx, level = stack.pop()
        if len(idx) <= cap or level >= levels:
            leaves.append(idx)
            continue
        order = idx[np.lexsort((idx, values[idx, level]))]
        half = len(order) // 2
        stack += [(order[half:], level + 1), (order[:half], level + 1)]
    return leaves


def bucket_neighbours(
    ids: Sequence[Any] | np.ndarray,
    x: np.ndarray,
    lsh: GraphLsh,
    band: int,
    k: int,
    cap: int,
) -> BucketResult:
    """Each member's k nearest in its leaf of this bucket of band ``band``.

    ``ids`` are the members' ids (any sortable type; ties go to the lower id), ``x`` their
    vectors (m, dim). Leaves: :func:`split_leaves` when the bucket is over ``cap``. Distances
    of the kept pairs are float64, recomputed pair by pair (the same in every bucket).
    """
    m = len(ids)
    if m < 2 or k < 1:
        return _empty_result(m)
    if x.shape[0] != m:
        raise AnnError(f"bucket of {m} ids with {x.shape[0]} vectors")
    arr = np.asarray(ids)
    order = np.argsort(arr, kind="stable")
    sids = arr[order]
    xs = np.asarray(x, np.float64)[order]
    leaves = split_leaves(lsh.split_values(xs, band), cap) if m > cap else [np.arange(m)]
    src, dst, pairs = [], [], 0
    for leaf in leaves:
        g = len(leaf)
        if g < 2:
            continue
        pairs += g * (g - 1) // 2
        xl = xs[leaf]
        sq = (xl * xl).sum(1)
        d = sq[:, None] + sq[None, :] - 2.0 * (xl @ xl.T)
        np.fill_diagonal(d, np.inf)
        top = smallest_k(d, min(k, g - 1))
        src.append(np.repeat(leaf, top.shape[1]))
        dst.append(leaf[top.ravel()])
    if not src:
        return _empty_result(m, len(leaves), max(len(leaf) for leaf in leaves))
    s, t = np.concatenate(src), np.concatenate(dst)
    diff = xs[s] - xs[t]
    dist = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return BucketResult(
        sids[s], sids[t], dist, pairs, len(leaves), max(len(leaf) for leaf in leaves)
    )


def _empty_result(m: int, leaves: int = 1, largest: int = 0) -> BucketResult:
    empty = np.empty(0, dtype=object)
    return BucketResult(empty, empty, np.empty(0), 0, leaves, largest or m)


def local_graph(
    ids: Sequence[Any], x: np.ndarray, lsh: GraphLsh, k: int, cap: int
) -> tuple[dict[Any, list[tuple[float, Any]]], dict[str, int]]:
    """The whole graph in one process, bucket by bucket as the Spark job builds it (tests and
    benchmarks compare the two): each image's k nearest as sorted (distance, id) lists, and
    the work done (pairs scored, buckets split, largest leaf)."""
    ids = list(ids)
    arr = np.asarray(ids)
    keys = lsh.band_keys(x)
    found: dict[Any, dict[Any, float]] = {i: {} for i in ids}
    stats = {"pairs": 0, "split": 0, "largest_leaf": 0}
    for b in range(lsh.bands):
        _, inverse = np.unique(keys[:, b], return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(inverse[order]) != 0])
        for members in np.split(order, starts[1:]):
            if len(members) < 2:
                continue
            r = bucket_neighbours(arr[members], x[members], lsh, b, k, cap)
            stats["pairs"] += r.pairs
            stats["split"] += int(r.leaves > 1)
            stats["largest_leaf"] = max(stats["largest_leaf"], r.largest_leaf)
            for s, t, d in zip(r.image_id, r.neighbour_id, r.distance, strict=True):
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
