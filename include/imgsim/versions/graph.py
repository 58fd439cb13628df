"""Reading a published version's neighbour graph and near-duplicate groups (no Spark, no model).

The fit job writes them (:mod:`imgsim.jobs.neighbour_graph`, and the map:
:mod:`imgsim.jobs.version_map`): ``neighbours/`` (image_id, rank,
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
from imgsim.versions.models import VersionDamaged, read_manifest, reading_version, version_dir

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


class NoMap(LookupError):
    """The version has no stored map (fitted before maps, or with IMGSIM_MAP_POINTS=0)."""


#: a class is an island on the map when at least this share of its points lie within
#: :data:`ISLAND_RADIUS` (of the map's width) of its median point
ISLAND_SHARE = 0.5
ISLAND_RADIUS = 0.05


@dataclass(frozen=True)
class MapPoints:
    """The stored 2-D map of (a sample of) a version's references (imgsim.jobs.version_map)."""

    version: str
    total: int  # references in the version
    image_id: list[str]
    class_id: list[int | None]
    class_name: list[str | None]
    xy: Any  # (n, 2) float64 in [0, 1], the aspect ratio kept
    placed: list[bool]  # placed into an earlier version's layout, not laid out with the rest
    entry: dict[str, Any]  # the manifest's ``map``: method, counts, how it was made


@dataclass(frozen=True)
class MapClass:
    """One class on the map: where its points are and whether they form an island."""

    class_id: int
    name: str | None
    count: int
    x: float  # the median point, in [0, 1]
    y: float
    near: float  # share of its points within ISLAND_RADIUS of the median point

    @property
    def island(self) -> bool:
        return self.count >= 3 and self.near >= ISLAND_SHARE


def map_points(layout: Layout, version: str) -> MapPoints:
    """The version's stored map with each point's class; NoMap when it has none. The map's
    file is read through :func:`imgsim.versions.models.reading_version` (a damaged file is
    reported as damage), the classes from the reference table (only the map's rows)."""
    from imgsim.ann.layout import LayoutError, read_map, unit_square

    with reading_version(layout, version):
        manifest = read_manifest(layout, version)
        entry = manifest.get("map") or {}
        name = (manifest.get("files") or {}).get("map")
        if not entry or not name:
            raise NoMap(
                f"version {version} has no stored map (fitted before maps, with "
                "IMGSIM_MAP_POINTS=0, or with fewer than 3 references); the next index run "
                "lays one out"
            )
        try:
            stored = read_map(version_dir(layout, version) / str(name))
        except LayoutError as exc:
            raise VersionDamaged(version, [str(exc)]) from exc
        ids = stored["image_id"]
        refs = reference_rows(layout, version, ids)
    missing = [i for i in ids if i not in refs]
    if missing:
        raise VersionDamaged(
            version, [f"its map names {len(missing)} image(s) that are not references"]
        )
    total = int((manifest.get("counts") or {}).get("indexed") or 0)
    return MapPoints(
        version,
        total,
        ids,
        [refs[i].get("class_id") for i in ids],
        [refs[i].get("class_name") for i in ids],
        unit_square(stored["xy"]),
        [bool(p) for p in stored["placed"]],
        dict(entry),
    )


def map_classes(points: MapPoints) -> list[MapClass]:
    """The labelled classes on the map, most points first: their median point and how much
    of the class lies around it (:attr:`MapClass.island`)."""
    import numpy as np

    members: dict[int, list[int]] = {}
    for i, cid in enumerate(points.class_id):
        if cid is not None:
            members.setdefault(int(cid), []).append(i)
    out = []
    for cid, rows in members.items():
        xy = points.xy[rows]
        centre = np.median(xy, axis=0)
        near = float((np.linalg.norm(xy - centre, axis=1) <= ISLAND_RADIUS).mean())
        out.append(
            MapClass(
                cid,
                points.class_name[rows[0]],
                len(rows),
                float(centre[0]),
                float(centre[1]),
                round(near, 3),
            )
        )
    return sorted(out, key=lambda c: (-c.count, c.class_id))
