"""The neighbour graph's core (imgsim.ann.graph): ownership, caps, exactness, duplicate groups."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from imgsim.ann import l2_normalize
from imgsim.ann.brp import hash_vectors
from imgsim.ann.graph import (
    bucket_neighbours,
    bucket_sizes,
    capped_buckets,
    chunk_of,
    duplicate_groups,
    exact_neighbours,
    local_graph,
    owned_pairs,
)


def sha_ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def brp_hashes(x: np.ndarray, tables: int, width: float, seed: int = 0) -> np.ndarray:
    from imgsim.ann.brp import BrpParams, random_unit_vectors

    return hash_vectors(BrpParams(random_unit_vectors(tables, x.shape[1], seed), width), x)


def test_one_bucket_is_exact_search() -> None:
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(60, 16)))
    ids = sha_ids(60)
    hashes = np.zeros((60, 3), np.int64)  # every image in one bucket of every band
    r = bucket_neighbours(ids, x, hashes, band=0, keys_per_band=1, k=5)
    idx, _dist = exact_neighbours(x, 5)
    got: dict[str, list[str]] = {}
    for s, t in zip(r.image_id, r.neighbour_id, strict=True):
        got.setdefault(s, []).append(t)
    for i, image_id in enumerate(ids):
        assert got[image_id] == [ids[j] for j in idx[i]]
    assert r.pairs == 60 * 59 // 2
    # a later band owns nothing: band 0 compared every pair already
    later = bucket_neighbours(ids, x, hashes, band=2, keys_per_band=1, k=5)
    assert later.pairs == 0 and len(later.image_id) == 0


def test_every_colliding_pair_is_scored_exactly_once() -> None:
    rng = np.random.default_rng(1)
    n, keys_per_band = 300, 2
    x = l2_normalize(rng.normal(size=(n, 8)))
    hashes = brp_hashes(x, tables=6 * keys_per_band, width=0.6)
    ids = sha_ids(n)
    bands = hashes.shape[1] // keys_per_band
    colliding = set()
    for i, j in itertools.combinations(range(n), 2):
        hi = hashes[i].reshape(bands, keys_per_band)
        hj = hashes[j].reshape(bands, keys_per_band)
        if (hi == hj).all(axis=1).any():
            colliding.add((i, j))
    scored = 0
    for b in range(bands):
        cols = hashes[:, b * keys_per_band : (b + 1) * keys_per_band]
        _, bucket = np.unique(cols, axis=0, return_inverse=True)
        for g in np.unique(bucket):
            members = np.flatnonzero(bucket == g)
            owned = owned_pairs([ids[i] for i in members], hashes[members], b, keys_per_band, {})
            scored += int(owned.sum())
    assert colliding and scored == len(colliding)
    _, pairs = local_graph(ids, x, hashes, keys_per_band, k=5, cap=10_000)
    assert pairs == len(colliding)


def test_capped_buckets_bound_the_work_and_lose_no_owned_pair() -> None:
    rng = np.random.default_rng(2)
    n = 400
    x = l2_normalize(rng.normal(size=(n, 8)))
    hashes = brp_hashes(x, tables=4, width=5.0)  # wide buckets: most images share one
    ids = sha_ids(n)
    sizes = bucket_sizes(hashes, 1)
    assert max(max(v.values()) for v in sizes.values()) > 100
    capped = capped_buckets(sizes, 100)
    assert any(capped.values())
    graph, pairs = local_graph(ids, x, hashes, 1, k=5, cap=100)
    _, all_pairs = local_graph(ids, x, hashes, 1, k=5, cap=10_000)
    assert pairs < 0.7 * all_pairs  # the cap bounds the work ...
    # ... and every pair that shares a bucket and a chunk in some band is scored, once
    chunk = np.stack(
        [chunk_of(ids, b, [capped[b].get((int(h),), 1) for h in hashes[:, b]]) for b in range(4)],
        axis=1,
    )
    expected = sum(
        1
        for i, j in itertools.combinations(range(n), 2)
        if ((hashes[i] == hashes[j]) & (chunk[i] == chunk[j])).any()
    )
    assert pairs == expected
    idx, _ = exact_neighbours(x, 5)
    recall = np.mean(
        [len({t for _, t in graph[i]} & {ids[j] for j in idx[r]}) / 5 for r, i in enumerate(ids)]
    )
    assert recall > 0.6
    # chunks: a capped bucket's members split by id, the same way in NumPy and Spark SQL
    ch = chunk_of(ids, 3, 4)
    assert set(ch.tolist()) == {0, 1, 2, 3}
    assert (chunk_of(["not-hex"], 0, 4) == 0).all()


def test_graph_recall_against_exact_search() -> None:
    rng = np.random.default_rng(3)
    centres = l2_normalize(rng.normal(size=(40, 32)))
    x = l2_normalize(np.repeat(centres, 25, axis=0) + 0.1 * rng.normal(size=(1000, 32)))
    ids = sha_ids(1000)
    hashes = brp_hashes(x, tables=16 * 3, width=0.2)  # 16 bands of 3 keys
    graph, pairs = local_graph(ids, x, hashes, 3, k=10, cap=200)
    idx, _dist = exact_neighbours(x, 10)
    recall = np.mean(
        [len({t for _, t in graph[i]} & {ids[j] for j in idx[r]}) / 10 for r, i in enumerate(ids)]
    )
    assert recall > 0.9
    assert pairs < 1000 * 999 / 2 * 0.5  # far fewer than all pairs
    # the distances are the exact float64 ones
    r0 = graph[ids[0]]
    d = np.linalg.norm(x[[ids.index(t) for _, t in r0]].astype(np.float64) - x[0], axis=1)
    assert np.allclose([dd for dd, _ in r0], d, atol=1e-9)


def test_duplicate_groups_are_connected_components_largest_first() -> None:
    src = ["a", "b", "x", "p", "c"]
    dst = ["b", "c", "y", "q", "d"]
    dist = np.array([0.01, 0.02, 0.03, 0.5, 0.04])
    g = duplicate_groups(src, dst, dist, threshold=0.1)
    assert list(g.image_id) == ["a", "b", "c", "d", "x", "y"]
    assert list(g.group) == [0, 0, 0, 0, 1, 1]
    assert list(g.size) == [4, 4, 4, 4, 2, 2]
    assert list(g.nearest_id) == ["b", "a", "b", "c", "y", "x"]
    assert np.allclose(g.nearest_distance, [0.01, 0.01, 0.02, 0.04, 0.03, 0.03])
    assert len(duplicate_groups(src, dst, dist, threshold=0.001).image_id) == 0


def test_bucket_input_must_agree() -> None:
    from imgsim.ann.brp import AnnError

    with pytest.raises(AnnError, match="bucket of 3 ids"):
        bucket_neighbours(["a", "b", "c"], np.zeros((2, 4)), np.zeros((3, 1)), 0, 1, 5)
