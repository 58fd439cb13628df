"""The versions' 2-D maps (imgsim.ann.layout): t-SNE islands, placing new points, the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imgsim.ann.layout import (
    LayoutError,
    in_sample,
    lay_out,
    place,
    principal_plane,
    read_map,
    same_class_neighbours,
    sample_cut,
    unit_square,
    write_map,
)


def clusters(classes: int, per: int, dim: int = 40, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """``classes`` tight clusters at random centres: far apart in ``dim`` dimensions, but no
    plane shows them all (the two leading components hold a small share of the spread)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = [c for c in range(classes) for _ in range(per)]
    x = centres[labels] + 0.6 * rng.normal(size=(len(labels), dim))
    return x, labels


def test_the_map_keeps_the_classes_together_where_the_principal_plane_cannot() -> None:
    x, labels = clusters(classes=30, per=10)
    laid = lay_out(x, seed=3, threads=1)
    assert laid.method == "tsne" and laid.xy.shape == (len(labels), 2)
    assert laid.info["perplexity"] == 30.0 and laid.info["kl_divergence"] > 0
    in_space = same_class_neighbours(x, labels)
    assert in_space == 1.0  # the clusters are apart in the space
    assert same_class_neighbours(laid.xy, labels) >= 0.95  # islands on the map
    assert same_class_neighbours(principal_plane(x), labels) < 0.5  # the old map: fog
    again = lay_out(x, seed=3, threads=1)
    np.testing.assert_array_equal(again.xy, laid.xy)  # seeded: the same map every time


def test_new_points_are_placed_among_their_own_class_and_the_old_ones_stay() -> None:
    x, labels = clusters(classes=10, per=20, seed=1)
    rng = np.random.default_rng(2)
    new_rows = rng.choice(len(labels), size=30, replace=False)
    old_rows = np.setdiff1d(np.arange(len(labels)), new_rows)
    old = lay_out(x[old_rows], seed=0, threads=1)
    new_xy = place(x[old_rows], old.xy, x[new_rows], seed=0)
    assert new_xy.shape == (30, 2) and np.isfinite(new_xy).all()
    # at the median of its 3 nearest old points in the space, nudged by under a spacing
    gap = ((x[new_rows][:, None, :] - x[old_rows][None, :, :]) ** 2).sum(axis=2)
    median = np.median(old.xy[np.argsort(gap, axis=1)[:, :3]], axis=1)
    spacing = np.median(np.sort(((old.xy[:, None] - old.xy[None]) ** 2).sum(2), axis=1)[:, 1])
    assert (np.linalg.norm(new_xy - median, axis=1) < np.sqrt(spacing)).all()
    np.testing.assert_array_equal(place(x[old_rows], old.xy, x[new_rows], seed=0), new_xy)
    # each new point's nearest old point on the map is of its class
    d = ((new_xy[:, None, :] - old.xy[None, :, :]) ** 2).sum(axis=2)
    nearest = np.asarray(labels)[old_rows][d.argmin(axis=1)]
    assert (nearest == np.asarray(labels)[new_rows]).mean() >= 0.9
    with pytest.raises(LayoutError, match="8-d, new 40-d"):
        place(x[old_rows][:, :8], old.xy, x[new_rows], seed=0)
    with pytest.raises(LayoutError, match="too few"):
        place(x[:4], old.xy[:4], x[new_rows], seed=0)


def test_a_tiny_map_is_the_principal_plane_and_bad_vectors_are_refused() -> None:
    x = np.random.default_rng(0).normal(size=(5, 6))
    laid = lay_out(x, seed=0)
    assert laid.method == "pca" and "too few for t-SNE" in laid.info["reason"]
    x[2, 3] = np.nan
    with pytest.raises(LayoutError, match="1 values are not finite"):
        lay_out(x, seed=0)


def test_the_sample_by_id_is_stable_and_shrinks_to_a_subset() -> None:
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]  # as the store
    big = {i for i in ids if in_sample(i, sample_cut(5000, 2000))}
    small = {i for i in ids if in_sample(i, sample_cut(5000, 1000))}
    assert small < big and 1700 < len(big) < 2300 and 800 < len(small) < 1200
    assert all(in_sample(i, sample_cut(5000, 5000)) for i in ids)
    assert in_sample("not-hex", 0)


def test_unit_square_keeps_the_aspect_ratio() -> None:
    xy = unit_square(np.array([[0.0, 0.0], [4.0, 1.0], [2.0, 0.5]]))
    np.testing.assert_allclose(xy, [[0.0, 0.375], [1.0, 0.625], [0.5, 0.5]])
    assert (unit_square(np.ones((3, 2))) == 0.5).all()


def test_the_map_file_round_trips_and_damage_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "map.parquet"
    xy = np.array([[0.5, -1.0], [2.0, 3.0]])
    write_map(path, ["a", "b"], xy, np.array([False, True]))
    got = read_map(path)
    assert got["image_id"] == ["a", "b"] and got["placed"].tolist() == [False, True]
    np.testing.assert_array_equal(got["xy"], xy)
    write_map(path, ["a", "b"], np.array([[0.0, np.inf], [1.0, 1.0]]), np.zeros(2, bool))
    with pytest.raises(LayoutError, match="not finite"):
        read_map(path)
    path.write_bytes(b"PAR1 cut short")
    with pytest.raises(LayoutError, match="cannot be read"):
        read_map(path)
    with pytest.raises(LayoutError, match="needs"):
        write_map(path, ["a"], xy, np.zeros(1, bool))
