"""The neighbour graph of an index: every reference's k nearest references, from its LSH buckets.

The references are grouped by band key (band ``b`` and its ``keys_per_band`` hash values: one
LSH bucket). The members of a bucket are compared with one another in one float64 Gram
product, and each member keeps its k nearest. A pair that shares a bucket in several bands is
compared in the first band where it does, its *owner* band: every band checks, from the
members' full hash rows, which of its pairs an earlier band already compared, so a pair is
scored once however many bands it collides in.

A bucket with more than ``cap`` members is split into chunks of about ``cap`` by a hash of the
image id for that band (:func:`chunk_of`, also computable in Spark SQL: :func:`chunk_sql`), so
one huge bucket cannot blow up the work (ScANNS's bucket limit). Pairs in different chunks of a
band are not compared there; the owner of a pair is then the first band where it shares a
bucket *and* a chunk.

Near-duplicate groups are the connected components of the graph's edges under a distance
(:func:`duplicate_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from imgsim.ann.brp import AnnError
from imgsim.ann.search import smallest_k

#: hex digits of the image id (a sha256) that pick a member's chunk in a capped bucket
CHUNK_HEX = 12
#: a band's digits start at ``band * CHUNK_HEX`` modulo this (every band reads other digits)
_CHUNK_SPAN = 64 - CHUNK_HEX

#: near-duplicate distance per search space (projection kind), measured by
#: benchmarks/bench_duplicates.py on copies of 300 sample photos: the largest distance at which
#: at most 0.5% of the photos have a distinct photo within it (results/duplicates.md). Whitening
#: was not measured: a whitened version gets no groups unless IMGSIM_DUPLICATE_DISTANCE is set.
DUPLICATE_DISTANCE = {"lda": 0.51, "none": 0.41}

#: capped buckets: band -> {band key: number of chunks}
Capped = Mapping[int, Mapping[tuple[int, ...], int]]


def chunk_offset(band: int) -> int:
    return (band * CHUNK_HEX) % _CHUNK_SPAN


def chunk_of(image_ids: Sequence[str], band: int, chunks: int | np.ndarray) -> np.ndarray:
    """The chunk of each image in a bucket of band ``band`` split into ``chunks``: 12 hex
    digits of its id (others per band) modulo ``chunks``; an id that is not hex is chunk 0."""
    off = chunk_offset(band)
    values = np.zeros(len(image_ids), np.int64)
    for i, image_id in enumerate(image_ids):
        try:
            values[i] = int(image_id[off : off + CHUNK_HEX], 16)
        except ValueError:
            values[i] = 0
    return np.mod(values, np.maximum(np.asarray(chunks, np.int64), 1))


def chunk_sql(band_col: str, chunks_col: str, id_col: str = "image_id") -> str:
    """:func:`chunk_of` as a Spark SQL expression over columns (the same chunk, exactly)."""
    return (
        f"pmod(coalesce(cast(conv(substring({id_col}, "
        f"pmod({band_col} * {CHUNK_HEX}, {_CHUNK_SPAN}) + 1, {CHUNK_HEX}), 16, 10) "
        f"as bigint), 0), greatest({chunks_col}, 1))"
    )


@dataclass(frozen=True)
class BucketResult:
    """One bucket's answer: directed edges (member -> one of its k nearest) and pairs scored."""

    image_id: np.ndarray  # (e,) object
    neighbour_id: np.ndarray  # (e,) object
    distance: np.ndarray  # (e,) float64
    pairs: int


def owned_pairs(
    ids: Sequence[str], hashes: np.ndarray, band: int, keys_per_band: int, capped: Capped
) -> np.ndarray:
    """(m, m) bool, upper triangle: the pairs of this bucket of band ``band`` that no earlier
    band compared (they share no earlier bucket, or not the same chunk of a capped one)."""
    m = len(ids)
    owned = np.triu(np.ones((m, m), bool), 1)
    for b in range(band):
        cols = hashes[:, b * keys_per_band : (b + 1) * keys_per_band]
        same = np.ones((m, m), bool)
        for c in range(keys_per_band):
            same &= cols[:, c, None] == cols[None, :, c]
        band_caps = capped.get(b)
        if band_caps:
            chunks = np.array([band_caps.get(tuple(int(v) for v in row), 1) for row in cols])
            if (chunks > 1).any():
                ch = chunk_of(ids, b, chunks)
                same &= ch[:, None] == ch[None, :]
        owned &= ~same
    return owned


def bucket_neighbours(
    ids: Sequence[str],
    x: np.ndarray,
    hashes: np.ndarray,
    band: int,
    keys_per_band: int,
    k: int,
    capped: Capped | None = None,
) -> BucketResult:
    """Each member's k nearest among the pairs this bucket owns (:func:`owned_pairs`).

    ``ids`` are the members' image ids, ``x`` their vectors (m, dim), ``hashes`` their full
    hash rows (m, bands * keys_per_band). Distances are float64; ties go to the lower id.
    """
    m = len(ids)
    if m < 2 or k < 1:
        return _empty_result()
    if x.shape[0] != m or hashes.shape[0] != m:
        raise AnnError(f"bucket of {m} ids with {x.shape[0]} vectors, {hashes.shape[0]} hashes")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # ties -> lower id
    sids = np.asarray(ids, dtype=object)[order]
    xs = np.asarray(x, np.float64)[order]
    hs = np.asarray(hashes, np.int64)[order]
    owned = owned_pairs(list(sids), hs, band, keys_per_band, capped or {})
    pairs = int(owned.sum())
    if not pairs:
        return _empty_result()
    sq = (xs * xs).sum(1)
    d = sq[:, None] + sq[None, :] - 2.0 * (xs @ xs.T)
    np.maximum(d, 0.0, out=d)
    np.sqrt(d, out=d)
    d[~(owned | owned.T)] = np.inf
    top = smallest_k(d, min(k, m - 1))
    rows = np.repeat(np.arange(m), top.shape[1])
    cols = top.ravel()
    dist = d[rows, cols]
    keep = np.isfinite(dist)
    return BucketResult(sids[rows[keep]], sids[cols[keep]], dist[keep], pairs)


def _empty_result() -> BucketResult:
    empty = np.empty(0, dtype=object)
    return BucketResult(empty, empty, np.empty(0), 0)


def bucket_sizes(hashes: np.ndarray, keys_per_band: int) -> dict[int, dict[tuple[int, ...], int]]:
    """band -> {band key: members} for an (n, bands * keys_per_band) hash matrix."""
    out: dict[int, dict[tuple[int, ...], int]] = {}
    for b in range(hashes.shape[1] // keys_per_band):
        keys, counts = np.unique(
            hashes[:, b * keys_per_band : (b + 1) * keys_per_band], axis=0, return_counts=True
        )
        out[b] = {tuple(int(v) for v in key): int(c) for key, c in zip(keys, counts, strict=True)}
    return out


def capped_buckets(
    sizes: Mapping[int, Mapping[tuple[int, ...], int]], cap: int
) -> dict[int, dict[tuple[int, ...], int]]:
    """The buckets over ``cap`` members and the chunks each is split into (ceil(size / cap))."""
    return {
        b: {key: -(-size // cap) for key, size in keys.items() if size > cap}
        for b, keys in sizes.items()
    }


def local_graph(
    ids: Sequence[str], x: np.ndarray, hashes: np.ndarray, keys_per_band: int, k: int, cap: int
) -> tuple[dict[str, list[tuple[float, str]]], int]:
    """The whole graph in one process, bucket by bucket as the Spark job builds it (tests and
    benchmarks compare the two): each image's k nearest as sorted (distance, id) lists, and
    the number of pairs scored."""
    ids = list(ids)
    hashes = np.asarray(hashes, np.int64)
    capped = capped_buckets(bucket_sizes(hashes, keys_per_band), cap)
    found: dict[str, list[tuple[float, str]]] = {i: [] for i in ids}
    pairs = 0
    for b in range(hashes.shape[1] // keys_per_band):
        cols = hashes[:, b * keys_per_band : (b + 1) * keys_per_band]
        chunks = np.array([capped[b].get(tuple(int(v) for v in row), 1) for row in cols])
        chunk = chunk_of(ids, b, chunks)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, row in enumerate(cols):
            groups.setdefault((*(int(v) for v in row), int(chunk[i])), []).append(i)
        for members in groups.values():
            r = bucket_neighbours(
                [ids[i] for i in members], x[members], hashes[members], b, keys_per_band, k, capped
            )
            pairs += r.pairs
            for s, t, d in zip(r.image_id, r.neighbour_id, r.distance, strict=True):
                found[s].append((float(d), str(t)))
    return {i: sorted(v)[:k] for i, v in found.items()}, pairs


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
