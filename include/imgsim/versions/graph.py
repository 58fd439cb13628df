"""Reading a published version's neighbour graph and near-duplicate groups (no Spark, no model).

The fit job writes them (:mod:`imgsim.jobs.neighbour_graph`): ``neighbours/`` (image_id, rank,
neighbour_id, distance) and ``duplicates/`` (group, size, image_id, path, class_id, class_name,
nearest_id, nearest_distance). Reads go through :func:`imgsim.versions.models.reading_version`,
so a damaged version is reported as damaged. Parquet filters read only the row groups that can
hold the asked ids (the tables are sorted by image id / group).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from imgsim.config import Layout
from imgsim.versions.models import read_manifest, reading_version, version_dir

REFERENCE_COLUMNS = ["image_id", "path", "class_id", "class_name"]


class NoGraph(LookupError):
    """The version has no neighbour graph (fitted with IMGSIM_GRAPH_K=0, or before graphs)."""


@dataclass(frozen=True)
class Similar:
    """A reference and its nearest references from the version's graph."""

    version: str
    reference: dict[str, Any]
    neighbours: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class DuplicateGroup:
    group: int
    members: list[dict[str, Any]]


def _require_graph(layout: Layout, version: str) -> dict[str, Any]:
    manifest = read_manifest(layout, version)
    if not manifest.get("neighbours"):
        raise NoGraph(
            f"version {version} has no neighbour graph (fitted before graphs existed, or with "
            "IMGSIM_GRAPH_K=0); the next index run with a graph setting builds one"
        )
    return manifest


def reference_rows(layout: Layout, version: str, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """image_id -> path, class_id, class_name of these references of the version."""
    import pyarrow.parquet as pq

    wanted = sorted(set(ids))
    if not wanted:
        return {}
    table = pq.read_table(
        version_dir(layout, version) / "reference",
        columns=REFERENCE_COLUMNS,
        filters=[("image_id", "in", wanted)],
    )
    return {r["image_id"]: r for r in table.to_pylist()}


def similar_to(layout: Layout, version: str, image_id: str) -> Similar:
    """``image_id``'s neighbours in ``version``'s graph, nearest first, with their paths and
    classes. KeyError when the image is not a reference of the version; NoGraph."""
    import pyarrow.parquet as pq

    with reading_version(layout, version):
        _require_graph(layout, version)
        rows = pq.read_table(
            version_dir(layout, version) / "neighbours",
            filters=[("image_id", "=", image_id)],
        ).to_pylist()
        refs = reference_rows(layout, version, [image_id, *(r["neighbour_id"] for r in rows)])
    if image_id not in refs:
        raise KeyError(f"{image_id} is not a reference of version {version}")
    neighbours = [
        {
            **refs.get(r["neighbour_id"], {}),
            "image_id": r["neighbour_id"],
            "rank": r["rank"],
            "distance": r["distance"],
        }
        for r in sorted(rows, key=lambda r: r["rank"])
    ]
    return Similar(version, refs[image_id], neighbours)


def duplicate_groups(
    layout: Layout, version: str, *, offset: int = 0, limit: int = 50
) -> tuple[list[DuplicateGroup], dict[str, Any]]:
    """Groups ``offset`` .. ``offset + limit`` (largest first) and the manifest's
    ``duplicates`` entry (counts, the distance)."""
    import pyarrow.parquet as pq

    with reading_version(layout, version):
        manifest = _require_graph(layout, version)
        table = pq.read_table(
            version_dir(layout, version) / "duplicates",
            filters=[("group", ">=", offset), ("group", "<", offset + limit)],
        )
    groups: dict[int, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        groups.setdefault(int(row["group"]), []).append(row)
    out = [
        DuplicateGroup(g, sorted(members, key=lambda m: m["image_id"]))
        for g, members in sorted(groups.items())
    ]
    return out, dict(manifest.get("duplicates") or {})


#: points on the 2-D map at most (a seeded sample of the references beyond that)
MAP_POINTS = 4000


@dataclass(frozen=True)
class MapPoints:
    """A 2-D layout of (a sample of) a version's references: PCA of its search-space vectors."""

    version: str
    total: int  # references in the version
    image_id: list[str]
    class_id: list[int | None]
    class_name: list[str | None]
    xy: Any  # (n, 2) float64 in [0, 1]
    explained: tuple[float, float]  # variance share of the two components


def map_points(layout: Layout, version: str, max_points: int = MAP_POINTS) -> MapPoints:
    """The references (a sample of about ``max_points``, chosen by image id: the same every
    time) projected on the two leading principal components of their search-space vectors,
    scaled to the unit square. The reference table is streamed, never read whole."""
    import numpy as np
    import pyarrow.dataset as ds

    with reading_version(layout, version):
        manifest = read_manifest(layout, version)
        total = int((manifest.get("counts") or {}).get("indexed") or 0)
        # the first 8 hex digits of a sha256 id are uniform: keep those under the share
        cut = int(min(1.0, max_points / max(total, 1)) * 0xFFFFFFFF)
        ids: list[str] = []
        classes: list[int | None] = []
        names: list[str | None] = []
        vectors: list[Any] = []
        dataset = ds.dataset(version_dir(layout, version) / "reference", format="parquet")
        for batch in dataset.to_batches(columns=["image_id", "class_id", "class_name", "vector"]):
            rows = batch.to_pydict()
            for i, image_id in enumerate(rows["image_id"]):
                try:
                    keep = int(image_id[:8], 16) <= cut
                except ValueError:
                    keep = True
                if keep:
                    ids.append(image_id)
                    classes.append(rows["class_id"][i])
                    names.append(rows["class_name"][i])
                    vectors.append(rows["vector"][i])
    if len(ids) < 3:
        raise ValueError(f"version {version} has too few references for a map ({len(ids)})")
    x = np.asarray(vectors, np.float64)
    x -= x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    xy = (xy - lo) / np.where(hi > lo, hi - lo, 1.0)
    var = s**2 / max(float((s**2).sum()), 1e-12)
    return MapPoints(version, total, ids, classes, names, xy, (float(var[0]), float(var[1])))
