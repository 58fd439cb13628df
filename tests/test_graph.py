"""The neighbour graph's core (imgsim.ann.graph): its cells, tuning, splits, exactness, groups."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imgsim.ann import l2_normalize
from imgsim.ann.brp import AnnError
from imgsim.ann.graph import (
    GraphCells,
    balanced_kmeans,
    bucket_neighbours,
    duplicate_groups,
    exact_neighbours,
    kmeans,
    local_graph,
    probe_recall,
    split_leaves,
    tune_graph_cells,
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


def test_one_cell_is_exact_search() -> None:
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(60, 16)))
    ids = sha_ids(60)
    cells = GraphCells(x.mean(0, keepdims=True), probes=1)  # every image at home in one cell
    assert (cells.probe_cells(x) == 0).all()
    r = bucket_neighbours(ids, x, np.ones(60, bool), cells, k=5, cap=1000)
    idx, _dist = exact_neighbours(x, 5)
    got: dict[str, list[str]] = {}
    for s, t in zip(r.source, r.target, strict=True):
        got.setdefault(s, []).append(t)
    for i, image_id in enumerate(ids):
        assert got[image_id] == [ids[j] for j in idx[i]]
    assert r.pairs == 60 * 59 // 2 and r.leaves == 1
    # the kept distances are float64 pair by pair: the same in any other cell
    small = bucket_neighbours(ids[:7], x[:7], np.ones(7, bool), cells, k=5, cap=1000)
    both = {(s, t): d for s, t, d in zip(r.source, r.target, r.distance, strict=True)}
    shared = [
        (s, t, d)
        for s, t, d in zip(small.source, small.target, small.distance, strict=True)
        if (s, t) in both
    ]
    assert shared and all(both[(s, t)] == d for s, t, d in shared)


def test_probes_are_scored_against_homes_only() -> None:
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(30, 8)))
    ids = sha_ids(30)
    home = np.arange(30) < 10  # 10 homes, 20 rows that only probe the cell
    cells = GraphCells(x[:1], probes=1)
    r = bucket_neighbours(ids, x, home, cells, k=3, cap=1000)
    assert r.pairs == 10 * 9 // 2 + 10 * 20
    homes = {ids[i] for i in range(10)}
    # every edge has a home at one end; a probe gets its 3 nearest homes, a home its 3
    # nearest of all 29 others
    assert all(s in homes or t in homes for s, t in zip(r.source, r.target, strict=True))
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(d, np.inf)
    edges: dict[str, set[str]] = {}
    for s, t in zip(r.source, r.target, strict=True):
        edges.setdefault(s, set()).add(t)
    for i in (0, 15):
        cand = np.arange(10) if i >= 10 else np.arange(30)
        want = {ids[j] for j in cand[np.argsort(d[i, cand], kind="stable")[:3]]}
        assert want <= edges[ids[i]]
    # no home in the cell: nothing to score
    none = bucket_neighbours(ids, x, np.zeros(30, bool), cells, k=3, cap=1000)
    assert none.pairs == 0 and not len(none.source)


def test_kmeans_finds_the_clusters_and_balances_the_cells() -> None:
    x = clustered(800, 16, 8, 0.05, seed=1)
    c = kmeans(x, 8, seed=2)
    label = GraphCells(c, 1).probe_cells(x)[:, 0]
    # each true cluster (100 rows in a run) lands in a cell of its own
    assert sorted(set(label[i : i + 100]).pop() for i in range(0, 800, 100)) == list(range(8))
    assert all(len(set(label[i : i + 100])) == 1 for i in range(0, 800, 100))
    # from other seeds two clusters can share a cell (and one take two): the re-cut splits
    # a cell of twice the mean or more
    c = kmeans(x, 8, seed=0)
    assert np.bincount(GraphCells(c, 1).probe_cells(x)[:, 0]).max() == 200
    label = GraphCells(balanced_kmeans(x, 8, seed=0), 1).probe_cells(x)[:, 0]
    assert np.bincount(label).max() == 100
    # one tight cluster of 600 and 4 loose ones of 50: k-means gives the tight one a cell of
    # its own; the re-cut splits it into 4 of about the mean
    big = np.vstack([clustered(600, 16, 1, 0.02, seed=3), clustered(200, 16, 4, 0.3, seed=4)])
    assert np.bincount(GraphCells(kmeans(big, 5, seed=0), 1).probe_cells(big)[:, 0]).max() == 600
    cells = GraphCells(balanced_kmeans(big, 5, seed=0), 1)
    sizes = np.bincount(cells.probe_cells(big)[:, 0])
    assert cells.cells == 8 and sizes.max() < 2 * 160 and sizes.sum() == 800
    with pytest.raises(AnnError, match="at least as many"):
        kmeans(x[:3], 4, seed=0)


def test_probe_recall_is_the_share_of_pairs_that_meet() -> None:
    rng = np.random.default_rng(4)
    c = np.eye(4)  # four cells on the axes
    cells = GraphCells(c, 1)
    q = np.array([[1.0, 0.1, 0, 0], [1.0, 0, 0, 0], [0, 0.1, 0.05, 1.0]])
    v = np.array([[0.1, 1.0, 0, 0], [0.9, 0, 0, 0.1], [1.0, 0, 0.5, 0.2]])
    # pair 0: homes 0 and 1, each the other's second cell; pair 1: the same home; pair 2:
    # homes 3 and 0, cell 0 the query's fourth, cell 3 the neighbour's third
    assert probe_recall(cells, q, v).tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert len(probe_recall(GraphCells(rng.normal(size=(40, 4)), 1), q, v)) == 16


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


def test_split_cells_bound_the_work_and_keep_neighbours_together() -> None:
    n = 800
    x = clustered(n, 16, 20, 0.15, seed=4)
    ids = sha_ids(n)
    cells = GraphCells(x.mean(0, keepdims=True), probes=1)  # one cell: everything at home
    values = cells.split_values(x)
    home = np.arange(n) % 2 == 0
    leaves = split_leaves(values, cap=100, home=home)  # the cap counts homes
    assert max(int(home[leaf].sum()) for leaf in leaves) <= 100 and len(leaves) == 4
    graph, work = local_graph(ids, x, cells, k=5, cap=100)
    _, whole = local_graph(ids, x, cells, k=5, cap=10_000)
    assert work["split"] == 1 and work["largest_leaf"] <= 100 and work["largest_cell"] == n
    assert work["pairs"] < 0.15 * whole["pairs"]  # the cap bounds the work ...
    # ... and the median splits keep neighbours together far more often than 8 chunks at
    # random would (1/8 of a member's neighbours with it); the tuner sizes cells so that a
    # split is the exception
    assert recall_of(graph, ids, x, 5) > 0.5


def test_tuned_graph_reaches_its_predicted_recall_at_a_fraction_of_the_pairs(
    tmp_path: Path,
) -> None:
    n, k = 4000, 10
    x = clustered(n, 32, 50, 0.25, seed=5)
    ids = sha_ids(n)
    idx, _dist = exact_neighbours(x, k)
    q = np.arange(0, n, 20)  # 200 validation queries
    pairs = (np.repeat(x[q], k, axis=0), x[idx[q].ravel()])
    cells, info = tune_graph_cells(x, *pairs, n, target=0.9, cap=200, seed=1)
    assert info["reached"] and info["predicted_recall"] >= 0.9
    assert info["cells"] == cells.cells >= 80 and info["probes"] == cells.probes
    assert info["predicted_recall"] == round(
        float(probe_recall(cells, *pairs)[cells.probes - 1]), 4
    )
    graph, work = local_graph(ids, x, cells, k=k, cap=1000)
    recall = recall_of(graph, ids, x, k)
    assert recall > 0.88 and abs(recall - info["predicted_recall"]) < 0.05
    assert work["pairs"] < 0.25 * n * (n - 1) / 2
    # the distances are the exact float64 ones
    r0 = graph[ids[0]]
    d = np.linalg.norm(x[[ids.index(t) for _, t in r0]].astype(np.float64) - x[0], axis=1)
    assert np.allclose([dd for dd, _ in r0], d, atol=1e-9)
    # an unreachable target: the most probes, and the entry says so
    cells2, info2 = tune_graph_cells(x, *pairs, n, target=1.01, cap=200)
    assert not info2["reached"] and cells2.probes == 16
    # the centroids round-trip through their file
    cells.save(tmp_path / "cells.npy")
    back = GraphCells.load(tmp_path / "cells.npy", cells.entry())
    assert np.array_equal(back.centroids, cells.centroids) and back.entry() == cells.entry()


def test_graph_cells_refuse_bad_input(tmp_path: Path) -> None:
    with pytest.raises(AnnError, match=r"probes 3 not in 1\.\.2"):
        GraphCells(np.zeros((2, 8)), probes=3)
    with pytest.raises(AnnError, match="finite"):
        GraphCells(np.full((2, 8), np.nan), probes=1)
    with pytest.raises(AnnError, match="16 dims"):
        GraphCells(np.zeros((2, 16)), 1).probe_cells(np.zeros((3, 8)))
    with pytest.raises(AnnError, match="needs training vectors"):
        tune_graph_cells(
            np.zeros((10, 8)), np.zeros((0, 8)), np.zeros((0, 8)), 10, target=0.9, cap=100
        )
    cells = GraphCells(np.eye(3), 2)
    cells.save(tmp_path / "c.npy")
    with pytest.raises(AnnError, match="the manifest says"):
        GraphCells.load(tmp_path / "c.npy", {**cells.entry(), "cells": 4})


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
    with pytest.raises(AnnError, match="cell of 3 ids"):
        bucket_neighbours(
            ["a", "b", "c"], np.zeros((2, 4)), np.ones(3, bool), GraphCells(np.eye(4), 1), 5, 10
        )
