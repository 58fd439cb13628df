"""The embedding store (Parquet shards per backbone), the catalog table and the quarantine.

Shard files are named by run and shard index, so re-running a shard replaces its file instead
of adding a copy. Readers deduplicate by image id, keeping the newest row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgsim.config import Layout
from imgsim.fsutil import TMP_PREFIX, atomic_open, atomic_write_json
from imgsim.imaging import SIZE_REASONS

log = logging.getLogger(__name__)

CATALOG_COLUMNS = (
    "image_id",
    "path",
    "source",
    "file_name",
    "class_id",
    "class_name",
    "size",
    "mtime_ns",
    "first_seen",
    "last_seen",
    "status",
    "n_paths",
)


def _pa() -> Any:
    import pyarrow as pa

    return pa


def catalog_schema() -> Any:
    pa = _pa()
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("path", pa.string()),
            ("source", pa.string()),
            ("file_name", pa.string()),
            ("class_id", pa.int32()),
            ("class_name", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("first_seen", pa.string()),
            ("last_seen", pa.string()),
            ("status", pa.string()),
            ("n_paths", pa.int32()),
        ]
    )


def embedding_schema(dim: int | None = None) -> Any:
    pa = _pa()
    vec = pa.list_(pa.float32(), dim) if dim else pa.list_(pa.float32())
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("vector", vec),
            ("backbone", pa.string()),
            ("run_key", pa.string()),
            ("shard", pa.int32()),
            ("embedded_at", pa.timestamp("us", "UTC")),
        ]
    )


def write_parquet_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def read_catalog(layout: Layout) -> list[dict[str, Any]]:
    """All catalog rows (live and gone); empty when no catalog was written yet."""
    import pyarrow.parquet as pq

    if not layout.catalog.exists():
        return []
    return pq.read_table(layout.catalog).to_pylist()  # type: ignore[no-any-return]


def write_catalog(layout: Layout, rows: Iterable[dict[str, Any]]) -> None:
    pa = _pa()
    table = pa.Table.from_pylist(sorted(rows, key=lambda r: r["image_id"]), schema=catalog_schema())
    write_parquet_atomic(table, layout.catalog)


def shard_files(layout: Layout, backbone: str) -> list[Path]:
    root = layout.embeddings(backbone)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("part-*.parquet") if not p.name.startswith(TMP_PREFIX))


def shard_path(layout: Layout, backbone: str, run_key: str, shard: int) -> Path:
    return layout.embeddings(backbone) / f"part-{run_key}-{shard:05d}.parquet"


def embedded_ids(layout: Layout, backbone: str) -> set[str]:
    """Ids that have a vector in the store for ``backbone``."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for f in shard_files(layout, backbone):
        ids.update(pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist())
    return ids


def write_shard(
    layout: Layout, backbone: str, run_key: str, shard: int, rows: list[tuple[str, Any]], dim: int
) -> Path:
    """Write one shard (image id, float32 vector) atomically; returns its path."""
    import numpy as np

    pa = _pa()
    now = datetime.now(UTC)
    ids = [r[0] for r in rows]
    flat = (
        np.stack([np.asarray(r[1], dtype=np.float32) for r in rows]).reshape(-1)
        if rows
        else np.zeros(0, np.float32)
    )
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim)
    n = len(rows)
    table = pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            vectors,
            pa.array([backbone] * n, pa.string()),
            pa.array([run_key] * n, pa.string()),
            pa.array([shard] * n, pa.int32()),
            pa.array([now] * n, pa.timestamp("us", "UTC")),
        ],
        schema=embedding_schema(dim),
    )
    path = shard_path(layout, backbone, run_key, shard)
    write_parquet_atomic(table, path)
    return path


def load_vectors(
    layout: Layout,
    backbone: str,
    ids: set[str] | None = None,
) -> tuple[list[str], Any]:
    """Newest vector per image id (optionally only ``ids``), sorted by id: (ids, float32 matrix)."""
    import numpy as np
    import pyarrow.parquet as pq

    newest: dict[str, tuple[Any, Any]] = {}
    for f in shard_files(layout, backbone):
        t = pq.read_table(f, columns=["image_id", "vector", "embedded_at"])
        col_ids = t.column("image_id").to_pylist()
        col_at = t.column("embedded_at").to_pylist()
        vecs = t.column("vector").combine_chunks()
        dim = vecs.type.list_size if hasattr(vecs.type, "list_size") else None
        mat = vecs.flatten().to_numpy().reshape(len(col_ids), dim or -1)
        for i, (iid, at) in enumerate(zip(col_ids, col_at, strict=True)):
            if ids is not None and iid not in ids:
                continue
            prev = newest.get(iid)
            if prev is None or at >= prev[0]:
                newest[iid] = (at, mat[i])
    keys = sorted(newest)
    if not keys:
        return [], np.zeros((0, 0), np.float32)
    return keys, np.stack([newest[k][1] for k in keys]).astype(np.float32, copy=False)


def snapshot_fingerprint(ids: Iterable[str]) -> str:
    """The identity of an embedding snapshot: sha256 of the sorted ids, one per line."""
    digest = hashlib.sha256()
    for iid in sorted(ids):
        digest.update(iid.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def labels_fingerprint(labels: Iterable[tuple[str, Any]]) -> str:
    """The identity of the labels of a snapshot: sha256 of sorted ``image_id:class_id`` lines.

    A change of any label (new, removed, different class) changes it, so the projection
    learned from the labels is refitted (:func:`imgsim.index.pipeline.fit_plan`).
    """
    digest = hashlib.sha256()
    for iid, cls in sorted((str(i), "" if c is None else str(c)) for i, c in labels):
        digest.update(f"{iid}:{cls}\n".encode())
    return digest.hexdigest()


# -- quarantine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineRecord:
    image_id: str
    source_path: str
    reason: str
    detail: str
    run_key: str
    quarantined_at: str
    settings: dict[str, Any] | None = None  # what it was decided under (max_image_pixels)


#: Reasons of quarantine records that never bind: an older version's transient read error.
TRANSIENT_REASONS = frozenset({"unreadable"})
#: What a record without ``settings`` was decided under (the setting's default then).
LEGACY_MAX_IMAGE_PIXELS = 90_000_000
#: An image counted under this prefix in a shard's result was not quarantined: retried later.
RETRY_PREFIX = "retry:"


def quarantine(
    layout: Layout,
    image_id: str,
    source: Path,
    reason: str,
    detail: str,
    run_key: str,
    settings: dict[str, Any] | None = None,
) -> QuarantineRecord:
    """Copy a rejected input into quarantine/ with a reason file (the original is not touched);
    ``settings``: those the rejection was decided under (``max_image_pixels``)."""
    record = QuarantineRecord(
        image_id, str(source), reason, detail, run_key, datetime.now(UTC).isoformat(), settings
    )
    layout.quarantine.mkdir(parents=True, exist_ok=True)
    copy = layout.quarantine / f"{image_id}{source.suffix.lower()}"
    if source.exists() and not copy.exists():
        with open(source, "rb") as fin, atomic_open(copy, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    atomic_write_json(layout.quarantine / f"{image_id}.json", record.__dict__)
    return record


def set_aside(layout: Layout, rejected: Any, run_key: str, max_image_pixels: int) -> str:
    """An image the embed step could not use (``imgsim.embedding.infer.Rejected``): quarantined
    with the setting it was decided under, or, for a transient read error, left for a later
    run (not quarantined). Returns the key it is counted under in the shard's result (the
    reason, or ``retry:<reason>``)."""
    if getattr(rejected, "transient", False):
        log.warning(
            "could not read %s (%s): not quarantined, the next run tries again",
            rejected.path,
            rejected.detail,
        )
        return RETRY_PREFIX + rejected.reason
    quarantine(
        layout,
        rejected.key,
        rejected.path,
        rejected.reason,
        rejected.detail,
        run_key,
        {"max_image_pixels": int(max_image_pixels)},
    )
    return str(rejected.reason)


def release_from_quarantine(layout: Layout, image_ids: Iterable[str]) -> int:
    """Forget the quarantine records (and copies) of images that embedded after all (a
    re-try under a larger limit, a full rebuild); returns how many there were."""
    if not layout.quarantine.exists():
        return 0
    released = 0
    for iid in image_ids:
        record = layout.quarantine / f"{iid}.json"
        if record.exists():
            for copy in layout.quarantine.glob(f"{iid}.*"):
                copy.unlink(missing_ok=True)
            released += 1
    if released:
        log.info("%d image(s) embedded after all: released from quarantine", released)
    return released


def binding_quarantine(
    layout: Layout, max_image_pixels: int, *, full_rebuild: bool = False
) -> dict[str, dict[str, Any]]:
    """The quarantine records that still exclude their image from this run: none on a full
    rebuild; never an old transient read error; a size rejection only while the limit is at
    most the one it was decided under (raising IMGSIM_MAX_IMAGE_PIXELS re-admits it)."""
    if full_rebuild:
        return {}
    binding = {}
    for iid, rec in quarantined_ids(layout).items():
        reason = rec.get("reason")
        if reason in TRANSIENT_REASONS:
            continue
        if reason in SIZE_REASONS:
            decided = (rec.get("settings") or {}).get("max_image_pixels", LEGACY_MAX_IMAGE_PIXELS)
            if max_image_pixels > int(decided):
                continue
        binding[iid] = rec
    return binding


def quarantined_ids(layout: Layout) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not layout.quarantine.exists():
        return out
    for f in layout.quarantine.glob("*.json"):
        if f.name.startswith(TMP_PREFIX):
            continue
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("unreadable quarantine record %s", f)
            continue
        out[rec["image_id"]] = rec
    return out
