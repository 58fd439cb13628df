"""The neighbour graph's core (imgsim.ann.graph): its LSH, tuning, splits, exactness, groups."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from imgsim.ann import l2_normalize
from imgsim.ann.brp import AnnError
from imgsim.ann.graph import (
    GraphLsh,
    bucket_neighbours,
    collision_probability,
    duplicate_groups,
    exact_neighbours,
    local_graph,
    predicted_recall,
    split_leaves,
    tune_graph_lsh,
)


def sha_ids(n: int) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)]


def clustered(n: int, dim: int, clusters: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(clusters, dim)))
    return l2_normalize(
        np.repeat(centres, n // clusters, axis=0) + noise * rng.normal(size=(n, dim))
    ).astype(np.float32)


def recall_of(graph: dict, ids: list, x: np.ndarray, k: int) -> float:
    idx, _ = exact_neighbours(x, k)
    return float(
        np.mean(
            [
                len({t for _, t in graph[i]} & {ids[j] for j in idx[r]}) / k
                for r, i in enumerate(ids)
            ]
        )
    )


def test_one_bucket_is_exact_search() -> None:
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(60, 16)))
    ids = sha_ids(60)
    lsh = GraphLsh(16, bands=1, keys=1, width=1e6)  # every image in one bucket
    assert len(set(lsh.band_keys(x)[:, 0])) == 1
    r = bucket_neighbours(ids, x, lsh, band=0, k=5, cap=1000)
    idx, _dist = exact_neighbours(x, 5)
    got: dict[str, list[str]] = {}
    for s, t in zip(r.image_id, r.neighbour_id, strict=True):
        got.setdefault(s, []).append(t)
    for i, image_id in enumerate(ids):
        assert got[image_id] == [ids[j] for j in idx[i]]
    assert r.pairs == 60 * 59 // 2 and r.leaves == 1
    # the kept distances are float64 pair by pair: the same in any other bucket
    small = bucket_neighbours(ids[:7], x[:7], lsh, band=0, k=5, cap=1000)
    both = {(s, t): d for s, t, d in zip(r.image_id, r.neighbour_id, r.distance, strict=True)}
    shared = [
        (s, t, d)
        for s, t, d in zip(small.image_id, small.neighbour_id, small.distance, strict=True)
        if (s, t) in both
    ]
    assert shared and all(both[(s, t)] == d for s, t, d in shared)


def test_hash_collisions_follow_the_e2lsh_probability() -> None:
    rng = np.random.default_rng(1)
    dim, width = 32, 0.5
    lsh = GraphLsh(dim, bands=2000, keys=1, width=width, seed=3)
    for d in (0.1, 0.4, 0.8, 1.4):
        a = l2_normalize(rng.normal(size=(1, dim)))
        step = rng.normal(size=(1, dim))
        step -= (step @ a.T) * a
        b = a + d * l2_normalize(step)
        keys = lsh.band_keys(np.vstack([a, b]))
        share = float(np.mean(keys[0] == keys[1]))
        assert abs(share - float(collision_probability(np.array([d]), width)[0])) < 0.04, d
    # keys per band AND the values: two bands of 3 keys agree less often than of 1
    lsh3 = GraphLsh(dim, bands=2000, keys=3, width=width, seed=3)
    k3 = lsh3.band_keys(np.vstack([a, b]))
    p = float(collision_probability(np.array([1.4]), width)[0])
    assert abs(float(np.mean(k3[0] == k3[1])) - p**3) < 0.03


def test_split_leaves_halve_at_medians_until_under_the_cap() -> None:
    rng = np.random.default_rng(2)
    values = rng.normal(size=(1000, 24))
    leaves = split_leaves(values, cap=100)
    assert sorted(np.concatenate(leaves).tolist()) == list(range(1000))
    assert max(len(leaf) for leaf in leaves) <= 100 and len(leaves) == 16
    # the first split is at the median of level 0
    left = set(np.argsort(values[:, 0], kind="stable")[:500].tolist())
    assert all(set(leaf.tolist()) <= left or not set(leaf.tolist()) & left for leaf in leaves)
    assert split_leaves(values[:50], cap=100)[0].tolist() == list(range(50))


def test_split_buckets_bound_the_work_and_keep_neighbours_together() -> None:
    n = 800
    x = clustered(n, 16, 20, 0.15, seed=4)
    ids = sha_ids(n)
    lsh = GraphLsh(16, bands=4, keys=1, width=50.0)  # wide buckets: everything in one
    graph, work = local_graph(ids, x, lsh, k=5, cap=100)
    _, whole = local_graph(ids, x, lsh, k=5, cap=10_000)
    assert work["split"] == 4 and work["largest_leaf"] <= 100
    assert work["pairs"] < 0.15 * whole["pairs"]  # the cap bounds the work ...
    # ... and the median splits keep neighbours together (a split into 8 chunks at random
    # would keep 1/8 of a member's neighbours with it per band: recall about 0.42 in 4 bands)
    assert recall_of(graph, ids, x, 5) > 0.8


def test_tuned_graph_reaches_its_recall_at_a_fraction_of_the_pairs() -> None:
    n, k = 4000, 10
    x = clustered(n, 32, 50, 0.25, seed=5)
    ids = sha_ids(n)
    _idx, dist = exact_neighbours(x, k)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, n, 20_000), rng.integers(0, n, 20_000)
    pairs = np.linalg.norm(x[a] - x[b], axis=1)[a != b]
    lsh, info = tune_graph_lsh(dist[:200], pairs, n, 32, target=0.9, cap=1000, seed=1)
    assert info["reached"] and info["predicted_recall"] >= 0.9
    assert info["predicted_recall"] == round(
        predicted_recall(dist[:200], lsh.width, lsh.keys, lsh.bands), 4
    )
    graph, work = local_graph(ids, x, lsh, k=k, cap=1000)
    recall = recall_of(graph, ids, x, k)
    assert recall > 0.83 and abs(recall - info["predicted_recall"]) < 0.08
    assert work["pairs"] < 0.7 * n * (n - 1) / 2
    # the distances are the exact float64 ones
    r0 = graph[ids[0]]
    d = np.linalg.norm(x[[ids.index(t) for _, t in r0]].astype(np.float64) - x[0], axis=1)
    assert np.allclose([dd for dd, _ in r0], d, atol=1e-9)
    # an unreachable target: the highest predicted recall, and the entry says so
    lsh2, info2 = tune_graph_lsh(dist[:200], pairs, n, 32, target=1.01, cap=1000)
    assert not info2["reached"] and lsh2.bands == 32


def test_graph_lsh_refuses_bad_input() -> None:
    with pytest.raises(AnnError, match="width > 0"):
        GraphLsh(8, bands=2, keys=1, width=0.0)
    with pytest.raises(AnnError, match="16 dims"):
        GraphLsh(16, 2, 1, 0.5).band_keys(np.zeros((3, 8)))
    with pytest.raises(AnnError, match="all equal"):
        tune_graph_lsh(np.ones(5), np.zeros(10), 100, 8, target=0.9, cap=100)
    lsh = GraphLsh(8, 2, 3, 0.7, seed=9)
    assert GraphLsh.from_entry(lsh.entry()) == lsh


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
    with pytest.raises(AnnError, match="bucket of 3 ids"):
        bucket_neighbours(["a", "b", "c"], np.zeros((2, 4)), GraphLsh(4, 1, 1, 1.0), 0, 5, 10)
