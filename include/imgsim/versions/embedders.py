"""Trained embedder versions: staging, atomic publish, CURRENT, integrity, rollback.

An embedder version is written whole in ``models/embedder/.staging/<version>/`` by a training
run (:mod:`imgsim.training`), then renamed into ``models/embedder/<version>/`` with every
file's size and sha256 recorded in its ``manifest.json``; ``models/embedder/CURRENT`` names the
embedder new index runs embed with (replaced atomically, under a lock). A training run killed
halfway leaves only a staging directory, which is never read and is removed by the next run.

``CURRENT`` may also say ``frozen``: the base backbone without training (what a rollback to an
index version built with the frozen backbone writes, so that the next daily run does not
re-embed everything with the newer embedder). Embedder versions are never pruned automatically:
index versions name them, and a rollback must find them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from imgsim.config import Layout
from imgsim.embedding.trained import (  # noqa: F401 (the names readers import from here)
    CURVE,
    EMBEDDER_VERSION_RE,
    LABELS,
    ONNX,
    WEIGHTS,
    EmbedderDamaged,
    EmbedderNotFound,
    parse_trained_name,
    read_embedder_dir,
)
from imgsim.fsutil import (
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    fsync_dir,
    read_json,
)
from imgsim.versions.models import MANIFEST, file_checksums, new_version

log = logging.getLogger(__name__)

FROZEN = "frozen"


def new_embedder_version(now: datetime | None = None) -> str:
    return new_version(now, prefix="e")


def check_embedder_version(version: str) -> str:
    if not EMBEDDER_VERSION_RE.match(version):
        raise EmbedderNotFound(
            f"{version!r} is not an embedder version (expected like e20261207T081500Z-3fa9c2)"
        )
    return version


def staging_dir(layout: Layout) -> Path:
    return layout.embedders / ".staging"


def embedder_dir(layout: Layout, version: str) -> Path:
    return layout.embedders / check_embedder_version(version)


@contextmanager
def embedders_lock(layout: Layout) -> Iterator[None]:
    with exclusive_lock(layout.embedders / ".lock"):
        yield


def published_embedders(layout: Layout) -> list[str]:
    """Published embedder versions, oldest first."""
    if not layout.embedders.exists():
        return []
    return sorted(
        p.name
        for p in layout.embedders.iterdir()
        if p.is_dir() and EMBEDDER_VERSION_RE.match(p.name) and (p / MANIFEST).exists()
    )


def current_embedder(layout: Layout) -> str | None:
    """The embedder version CURRENT names; None when there is none or it says ``frozen``."""
    try:
        text = (layout.embedders / "CURRENT").read_text().strip()
    except FileNotFoundError:
        return None
    return text if text and text != FROZEN else None


def read_embedder(layout: Layout, version: str, *, hashes: bool = False) -> dict[str, Any]:
    """The manifest of a published embedder, its files checked (sizes; sha256 with ``hashes``)."""
    folder = embedder_dir(layout, version)
    if not (folder / MANIFEST).exists():
        raise EmbedderNotFound(
            f"embedder {version} is not published under {layout.embedders}; "
            f"published: {published_embedders(layout) or 'none'}"
        )
    return read_embedder_dir(folder, hashes=hashes)


def publish_embedder(layout: Layout, version: str, *, make_current: bool = True) -> Path:
    """Record the staged version's checksums, rename it into place, point CURRENT at it."""
    staged = staging_dir(layout) / check_embedder_version(version)
    final = layout.embedders / version
    with embedders_lock(layout):
        manifest = read_json(staged / MANIFEST)
        manifest["files"] = file_checksums(staged)
        atomic_write_json(staged / MANIFEST, manifest)
        os.rename(staged, final)
        fsync_dir(layout.embedders)
        if make_current:
            atomic_write_text(layout.embedders / "CURRENT", version + "\n")
    log.info("published embedder %s%s", version, " (CURRENT)" if make_current else "")
    return final


def set_current_embedder(layout: Layout, backbone_name: str) -> str:
    """CURRENT for the embedder of an index version's backbone (``frozen`` for a plain one)."""
    parsed = parse_trained_name(backbone_name)
    target = parsed.version if parsed else FROZEN
    if parsed:
        read_embedder(layout, parsed.version, hashes=True)
    with embedders_lock(layout):
        atomic_write_text(layout.embedders / "CURRENT", target + "\n")
    log.info("embedder CURRENT -> %s", target)
    return target


def clean_embedder_staging(layout: Layout) -> None:
    """Remove what killed training runs left in staging (never read; safe at any time the
    caller holds the training lease)."""
    root = staging_dir(layout)
    if root.exists():
        for p in root.iterdir():
            shutil.rmtree(p, ignore_errors=True)
