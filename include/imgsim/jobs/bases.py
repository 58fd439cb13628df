"""What a fit can take over from its base version (no Spark): the graph to update, the map
to place new references into.

The base is the version the fit plan checked (``--base``), read through
:func:`imgsim.versions.models.base_version`, so a missing or damaged base, or a reused file
whose sha256 differs from the one recorded at publish, means a full build and says why. Both
the graph and the map belong to a search space: they are reused only where the backbone and
the projection's arrays (:func:`space_fingerprint`) are those of the new version.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import Layout
from imgsim.versions.models import Base, base_version


def space_fingerprint(version_dir: Path, projection_file: str | None) -> str:
    """What the search space is: "none" (the embeddings) or the sha256 of the projection's
    arrays (not of the file: a kept projection is saved again, with new zip timestamps)."""
    if not projection_file:
        return "none"
    digest = hashlib.sha256()
    with np.load(version_dir / projection_file, allow_pickle=False) as arrays:
        for name in sorted(arrays.files):
            a = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            digest.update(a.tobytes())
    return digest.hexdigest()


def same_space_base(
    layout: Layout,
    base: str,
    backbone: dict[str, Any],
    space: str,
    reuse: Sequence[str],
) -> Base | str:
    """The base version (``base``: the fit plan's name, ``current`` or ``none``) checked, with
    the sha256 of the ``reuse`` files and of its projection, when its search space is this
    one (same backbone, same projection arrays); else why it cannot be built on."""
    if base == "none":
        return "the fit plan builds in full (no base version)"
    checked = base_version(
        layout, None if base == "current" else base, reuse=(*reuse, "projection")
    )
    if isinstance(checked, str):
        return f"no base to update: {checked}"
    m, version = checked.manifest, checked.version
    if m.get("backbone") != backbone:
        return f"the backbone changed since {version}"
    try:
        before = space_fingerprint(checked.dir, m["files"].get("projection"))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # never block a new fit
        return f"{version}'s projection cannot be read: {exc}"
    if before != space:
        return (
            f"the search space changed since {version} (the projection is learned anew for "
            "every index run)"
        )
    return checked


def previous_graph(
    layout: Layout, k: int, backbone: dict[str, Any], space: str, base: str = "current"
) -> dict[str, Any] | str:
    """The base version's graph (``base``: the fit plan's, or CURRENT) where it can be updated
    instead of built anew (same k, backbone and search space): its version, directory and
    manifest entry; else why not. A graph or cells file whose sha256 differs from the
    recorded one means a full build (:func:`same_space_base`)."""
    checked = same_space_base(layout, base, backbone, space, ("neighbours", "neighbours_cells"))
    if isinstance(checked, str):
        return checked
    m, version, where = checked.manifest, checked.version, checked.dir
    graph = m.get("neighbours") or {}
    neighbours = checked.file("neighbours")
    if not graph or neighbours is None or not neighbours.exists():
        return f"{version} has no neighbour graph"
    if graph.get("k") != k:
        return f"k changed ({graph.get('k')} in {version}, now {k})"
    method = str(graph.get("method", "")).split(":")[0]
    if method == "cells" and not (where / str(graph.get("file", "-"))).exists():
        return f"{version}'s graph cells are missing"
    return {"version": version, "dir": where, "method": method, "entry": graph}


def previous_map(
    layout: Layout, backbone: dict[str, Any], space: str, base: str = "current"
) -> dict[str, Any] | str:
    """The base version's stored map where new references can be placed into it (same
    backbone and search space, the file as recorded): version, file, manifest entry; else
    why the map is laid out anew."""
    checked = same_space_base(layout, base, backbone, space, ("map",))
    if isinstance(checked, str):
        return checked
    entry = checked.manifest.get("map") or {}
    path = checked.file("map")
    if not entry or path is None or not path.is_file():
        return f"{checked.version} has no stored map"
    return {"version": checked.version, "file": path, "entry": entry}
