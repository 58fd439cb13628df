"""A 2-D map of a version's references that keeps neighbours together (t-SNE, openTSNE).

The fit job lays out a sample of the references once per version and stores the layout with
it (:mod:`imgsim.jobs.version_map`); the UI only draws it. t-SNE keeps each point's nearest
neighbours near it, so the models of the search space form islands, where the two leading
principal components (the map before this one) showed 5% and 2% of the LDA space's variance
as one fog.

* The sample is chosen by image id (the first 8 hex digits of a sha256 id are uniform): the
  same references every time, and an image stays on the map until the set outgrows the cap.
* A daily update does not lay out the map anew: the new references are placed into the
  previous layout (:func:`place`: each at the median of its nearest old points, the old
  points stay put), so the islands a user knows keep their places. When the placed points
  reach :data:`RELAYOUT_SHARE` of the map, or the search space changed, the whole map is
  laid out anew.
* :func:`same_class_neighbours` measures the islands: the share of labelled points whose
  nearest other point carries the same label, on the map and in the search space.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.errors import PermanentError

#: points on the map at most (a sample chosen by image id beyond that); IMGSIM_MAP_POINTS
MAP_POINTS = 4000
#: t-SNE's perplexity (about the number of neighbours each point keeps close), capped at
#: a third of the points for small maps
PERPLEXITY = 30.0
#: below this many points, t-SNE has too few neighbours to work with: the two leading
#: principal components instead
MIN_TSNE_POINTS = 8
#: the share of a map's points placed into earlier layouts from which it is laid out anew
RELAYOUT_SHARE = 0.25
#: a new point is placed at the median of this many nearest old points (measured:
#: benchmarks/bench_map.py; 3 reached the search space's own share of same-class nearest)
PLACE_NEIGHBOURS = 3

#: the map's file in a version: image_id, x, y (t-SNE units), placed; sorted by image id
MAP_FILE = "map.parquet"
MAP_COLUMNS = ("image_id", "x", "y", "placed")


class LayoutError(PermanentError, ValueError):
    """The vectors cannot be laid out (too few, not finite, mismatched)."""


def sample_cut(total: int, max_points: int) -> int:
    """The largest 8-hex-digit id prefix kept when about ``max_points`` of ``total`` are."""
    return int(min(1.0, max_points / max(total, 1)) * 0xFFFFFFFF)


def in_sample(image_id: str, cut: int) -> bool:
    """Whether ``image_id`` is on a map with this :func:`sample_cut` (ids that are not hex are
    always kept: there are few, and the choice stays stable)."""
    try:
        return int(image_id[:8], 16) <= cut
    except ValueError:
        return True


def layout_threads() -> int:
    """The CPU threads t-SNE may use: IMGSIM_NUM_THREADS, else the CPUs this process has."""
    wanted = os.environ.get("IMGSIM_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    return max(1, len(os.sched_getaffinity(0)))


def perplexity_for(n: int) -> float:
    """:data:`PERPLEXITY`, or a third of the other points on a small map."""
    return float(min(PERPLEXITY, max(1.0, (n - 1) / 3.0)))


def _checked(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise LayoutError(f"{what}: expected a (points, dims) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise LayoutError(f"{what}: {int((~np.isfinite(x)).sum())} values are not finite")
    return x


def principal_plane(x: np.ndarray) -> np.ndarray:
    """The points on their two leading principal components (n, 2)."""
    x = _checked(x, "principal_plane") - np.asarray(x, np.float64).mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    if xy.shape[1] < 2:  # one dimension: a line
        xy = np.hstack([xy, np.zeros((xy.shape[0], 2 - xy.shape[1]))])
    return xy


@dataclass(frozen=True)
class Layout2D:
    """Map coordinates (t-SNE units, not scaled) and how they were made."""

    xy: np.ndarray  # (n, 2) float64
    method: str  # "tsne" or "pca"
    info: dict[str, Any]


def lay_out(x: np.ndarray, *, seed: int, threads: int | None = None) -> Layout2D:
    """The points (rows of ``x``) laid out anew: t-SNE (openTSNE, PCA initialisation, seeded),
    or the principal plane below :data:`MIN_TSNE_POINTS`."""
    x = _checked(x, "lay_out")
    n = x.shape[0]
    if n < MIN_TSNE_POINTS:
        return Layout2D(principal_plane(x), "pca", {"reason": f"{n} points: too few for t-SNE"})
    import openTSNE

    perplexity = perplexity_for(n)
    embedding = openTSNE.TSNE(
        perplexity=perplexity,
        initialization="pca",
        n_jobs=threads or layout_threads(),
        random_state=seed,
        verbose=False,
    ).fit(x)
    xy = np.asarray(embedding, np.float64)
    if not np.isfinite(xy).all():
        raise LayoutError(f"t-SNE of {n} points gave coordinates that are not finite")
    return Layout2D(
        xy,
        "tsne",
        {"perplexity": round(perplexity, 3), "kl_divergence": _kl(embedding)},
    )


def place(
    old_x: np.ndarray,
    old_xy: np.ndarray,
    new_x: np.ndarray,
    *,
    seed: int,
    k: int | None = None,
) -> np.ndarray:
    """Coordinates for ``new_x`` in an existing layout (``old_x`` at ``old_xy``), the old points
    left where they are: each new point at the median of its ``k`` (:data:`PLACE_NEIGHBOURS`)
    nearest old points in the search space (exact), nudged by a seeded tenth of the layout's
    typical spacing so that two copies do not hide each other.

    openTSNE's own ``transform`` (median start, then optimised against the fixed points) was
    measured first and put only 23% of new training photos next to a point of their class,
    against 84-89% for this, as many as in the search space (``benchmarks/bench_map.py``)."""
    old_x, old_xy = _checked(old_x, "place: old points"), _checked(old_xy, "place: old layout")
    new_x = _checked(new_x, "place: new points")
    if old_x.shape[0] != old_xy.shape[0] or old_xy.shape[1] != 2:
        raise LayoutError(
            f"place: {old_x.shape[0]} old points but a layout of shape {old_xy.shape}"
        )
    if old_x.shape[1] != new_x.shape[1]:
        raise LayoutError(f"place: old points are {old_x.shape[1]}-d, new {new_x.shape[1]}-d")
    n_old = old_x.shape[0]
    if n_old < MIN_TSNE_POINTS:
        raise LayoutError(f"place: {n_old} old points are too few to place new ones among")
    from imgsim.ann.graph import exact_neighbours
    from imgsim.ann.search import smallest_k, squared_distances

    k = min(k or PLACE_NEIGHBOURS, n_old)
    placed = np.empty((new_x.shape[0], 2))
    for lo in range(0, new_x.shape[0], 1024):  # exact, in blocks of rows
        nearest = smallest_k(squared_distances(new_x[lo : lo + 1024], old_x), k)
        placed[lo : lo + 1024] = np.median(old_xy[nearest], axis=1)
    spacing = float(np.median(exact_neighbours(old_xy, 1)[1][:, 0]))
    rng = np.random.default_rng(seed)
    return placed + 0.1 * spacing * rng.standard_normal(placed.shape)


def _kl(embedding: Any) -> float | None:
    value = getattr(embedding, "kl_divergence", None)
    return None if value is None else round(float(value), 4)


def same_class_neighbours(points: np.ndarray, labels: Sequence[int | None]) -> float | None:
    """The share of labelled points whose nearest other labelled point has the same label
    (None with fewer than two labelled points). On the map it says how much the islands are
    models; in the search space, how much there is to show."""
    from imgsim.ann.graph import exact_neighbours

    keep = np.array([label is not None for label in labels], bool)
    if int(keep.sum()) < 2:
        return None
    lab = np.asarray([label for label in labels if label is not None])
    nearest = exact_neighbours(np.asarray(points, np.float64)[keep], 1)[0][:, 0]
    return round(float((lab[nearest] == lab).mean()), 4)


def unit_square(xy: np.ndarray) -> np.ndarray:
    """Coordinates scaled into [0, 1] on both axes, keeping the aspect ratio (the longer side
    spans the square, the shorter one is centred)."""
    xy = np.asarray(xy, np.float64)
    if xy.shape[0] == 0:
        return xy.reshape(0, 2)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = float((hi - lo).max())
    if span <= 0:
        return np.full_like(xy, 0.5)
    return (xy - lo) / span + (1.0 - (hi - lo) / span) / 2.0


def write_map(path: Path, ids: Sequence[str], xy: np.ndarray, placed: np.ndarray) -> None:
    """Write a map file (:data:`MAP_COLUMNS`); ``placed``: placed into an earlier layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    xy = np.asarray(xy, np.float64)
    if xy.shape != (len(ids), 2) or len(placed) != len(ids):
        raise LayoutError(
            f"a map of {len(ids)} ids needs ({len(ids)}, 2) coordinates, not {xy.shape}"
        )
    table = pa.table(
        {
            "image_id": pa.array(list(ids), pa.string()),
            "x": pa.array(xy[:, 0], pa.float64()),
            "y": pa.array(xy[:, 1], pa.float64()),
            "placed": pa.array(np.asarray(placed, bool), pa.bool_()),
        }
    )
    pq.write_table(table, path)


def read_map(path: Path) -> dict[str, Any]:
    """A map file's columns: image_id (list of str), xy ((n, 2) float64), placed (bool array).
    A file that cannot be read, lacks a column or holds coordinates that are not finite
    raises :class:`LayoutError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(MAP_COLUMNS))
    except (OSError, pa.ArrowException, KeyError) as exc:
        raise LayoutError(f"the map {path.name} cannot be read: {exc}") from exc
    xy = np.column_stack(
        [table.column(c).to_numpy(zero_copy_only=False) for c in ("x", "y")]
    ).astype(np.float64)
    if not np.isfinite(xy).all():
        raise LayoutError(f"the map {path.name} has coordinates that are not finite")
    return {
        "image_id": table.column("image_id").to_pylist(),
        "xy": xy.reshape(-1, 2),
        "placed": np.asarray(table.column("placed").to_pylist(), bool),
    }
