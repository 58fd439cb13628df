"""The catalog: every reference image, identified by the sha256 of its bytes.

Sources are the extracted archive(s) under ``images/`` and the daily drop folder
``incoming/<date>/``. A run re-hashes only files whose size or mtime changed, marks images whose
files disappeared as ``gone`` (they are never silently kept), and diffs the live set against
the embedding store to say what must be embedded.

Labels are matched to images by path (:func:`imgsim.sources.labels.match_labels`), and how many
live images carry a label is a first-class figure: :func:`label_coverage`. A labels file that
matches too few of a source's images is refused by :func:`check_label_coverage`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgsim.config import Layout, setting_default
from imgsim.errors import PermanentError
from imgsim.fsutil import sha256_file
from imgsim.sources.labels import LabelMatch, LabelRecord, find_images, match_labels, read_labels
from imgsim.store import binding_quarantine, embedded_ids, read_catalog, write_catalog

log = logging.getLogger(__name__)

LIVE = "live"
GONE = "gone"
INCOMING_LABELS = "labels.csv"
EXAMPLES = 3  # example names shown from each side when labels do not match


class LabelCoverageError(ValueError, PermanentError):
    """The labels match too few images; the message shows examples from both sides and the fix."""


@dataclass(frozen=True)
class Source:
    """A folder of reference images and the labels that go with it."""

    name: str  # "archive:<folder>" or "incoming:<date>"
    root: Path
    labels: Mapping[str, LabelRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class CatalogDiff:
    live: int
    new_images: int  # ids first seen this run
    gone: int  # ids that went from live to gone this run
    changed_paths: int  # files whose bytes changed at the same path
    unlabelled: int  # live images without a class
    to_embed: list[dict[str, str]]  # [{"image_id", "path"}], sorted by id
    quarantined_skipped: int
    label_coverage: dict[str, Any] = field(default_factory=dict)  # see label_coverage()

    def summary(self) -> dict[str, int]:
        return {
            "live": self.live,
            "new_images": self.new_images,
            "gone": self.gone,
            "changed_paths": self.changed_paths,
            "unlabelled": self.unlabelled,
            "to_embed": len(self.to_embed),
            "quarantined_skipped": self.quarantined_skipped,
        }


def incoming_source(layout: Layout, day: str) -> Source | None:
    """``incoming/<day>/`` as a source (with its optional labels.csv), or None if absent."""
    folder = layout.incoming_day(day)
    if not folder.is_dir():
        return None
    labels_file = folder / INCOMING_LABELS
    labels = read_labels(labels_file) if labels_file.exists() else {}
    return Source(f"incoming:{day}", folder, labels)


def _rel(layout: Layout, path: Path) -> str:
    # Not resolved: a source may be a link under images/ to a folder elsewhere (a local folder
    # location), and its images are read through the link.
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(layout.root)).as_posix()
    except ValueError:  # the data root given through a link, the source by its real path
        return path.resolve().relative_to(layout.root.resolve()).as_posix()


def label_coverage(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """How many live images carry a label: ``labelled_images``, ``images``, ``classes``, ``share``.

    ``share`` is ``labelled_images / images`` rounded to 4 digits (0.0 for no image).
    """
    live = [r for r in rows if r.get("status", LIVE) == LIVE]
    labelled = [r for r in live if r.get("class_id") is not None]
    return {
        "labelled_images": len(labelled),
        "images": len(live),
        "classes": len({r["class_id"] for r in labelled}),
        "share": round(len(labelled) / len(live), 4) if live else 0.0,
    }


def check_label_coverage(
    match: LabelMatch, minimum: float, labels_name: str, images_name: str
) -> dict[str, Any]:
    """Coverage of one source by its labels; LabelCoverageError when under ``minimum``.

    ``minimum`` 0 never fails. The message shows example names from both sides and the fix.
    """
    share = len(match.labels) / match.images if match.images else 0.0
    coverage = {
        "labelled_images": len(match.labels),
        "images": match.images,
        "classes": len({r.class_id for r in match.labels.values()}),
        "share": round(share, 4),
    }
    if minimum <= 0 or not match.images or share >= minimum:
        return coverage

    def show(names: list[str]) -> str:
        return ", ".join(names[:EXAMPLES]) + (", ..." if len(names) > EXAMPLES else "")

    lines = [
        f"the labels {labels_name} match {len(match.labels)} of the {match.images} images "
        f"in {images_name} ({share:.0%}; at least {minimum:.0%} required).",
        f"  images without a label, e.g.: {show(match.unmatched)}",
        f"  label names without an image, e.g.: {show(match.unused)}",
    ]
    if match.ambiguous:
        lines.append(
            f"  {len(match.ambiguous)} label name(s) fit several images (one file name "
            f"in several folders), so they label none: {show(match.ambiguous)}"
        )
    raise LabelCoverageError(
        "\n".join(lines)
        + "\n"
        + "Fix: give the labels file that belongs to these images (IMGSIM_LABELS_URL or the Param "
        "labels_url), e.g. the Kaggle CSV whose 'image' column names the cars_train files, with "
        "the class names from IMGSIM_CLASS_NAMES_URL (cars_meta.mat or names.csv); or index "
        "without labels by setting IMGSIM_MIN_LABEL_COVERAGE=0 (Param min_label_coverage)."
    )


def update_catalog(
    layout: Layout,
    sources: Iterable[Source],
    run_date: str,
    backbone: str,
    *,
    full_rebuild: bool = False,
    max_image_pixels: int = setting_default("max_image_pixels"),
) -> CatalogDiff:
    """Scan ``sources``, update the catalog atomically and return what must be embedded.

    Quarantined images are left out while their record binds
    (:func:`imgsim.store.binding_quarantine`: not on a full rebuild, not for a transient read
    error, not for a size rejection once ``max_image_pixels`` is larger than it was).
    Runs under an exclusive lock on the catalog, so two runs at once cannot lose an update.
    """
    from imgsim.fsutil import exclusive_lock

    layout.catalog_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(layout.catalog_dir / ".lock"):
        return _update_catalog(layout, sources, run_date, backbone, full_rebuild, max_image_pixels)


def _name_classes(rows: Iterable[dict[str, Any]]) -> None:
    """Rows whose labels gave a class id but no name (a day's labels.csv with only ``Class``)
    take the name other rows give that id (the archive's labels, another day's)."""
    rows = list(rows)
    names = {r["class_id"]: r["class_name"] for r in rows if r["class_name"]}
    for row in rows:
        if row["class_name"] is None and row["class_id"] in names:
            row["class_name"] = names[row["class_id"]]


def _update_catalog(
    layout: Layout,
    sources: Iterable[Source],
    run_date: str,
    backbone: str,
    full_rebuild: bool,
    max_image_pixels: int,
) -> CatalogDiff:
    previous = read_catalog(layout)
    # Only live rows vouch for a path's bytes: a gone row may share its path with the live row
    # of the file that replaced it.
    by_path: dict[str, dict[str, Any]] = {r["path"]: r for r in previous if r["status"] == LIVE}
    prev_status = {r["image_id"]: r["status"] for r in previous}
    prev_first_seen = {r["image_id"]: r["first_seen"] for r in previous}

    rows: dict[str, dict[str, Any]] = {}  # image_id -> row
    changed = 0
    seen_paths: set[str] = set()

    def add(path: Path, source: str, label: LabelRecord | None) -> str:
        nonlocal changed
        rel = _rel(layout, path)
        seen_paths.add(rel)
        st = path.stat()
        old = by_path.get(rel)
        if old is not None and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            image_id = old["image_id"]
        else:
            image_id = sha256_file(path)
            if old is not None and old["image_id"] != image_id:
                changed += 1
        row = rows.get(image_id)
        if row is not None:  # the same bytes at several paths: one image
            row["n_paths"] += 1
            if row["class_id"] is None and label is not None:
                row["class_id"], row["class_name"] = label.class_id, label.class_name
            return image_id
        first_seen = prev_first_seen.get(image_id, run_date)
        rows[image_id] = {
            "image_id": image_id,
            "path": rel,
            "source": source,
            "file_name": path.name,
            "class_id": label.class_id if label else None,
            "class_name": label.class_name if label else None,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "first_seen": first_seen,
            "last_seen": run_date,
            "status": LIVE,
            "n_paths": 1,
        }
        return image_id

    for source in sources:
        images = find_images(source.root)
        matched = match_labels(source.root, images, source.labels).labels
        for path in images:
            add(path, source.name, matched.get(path))

    # Images catalogued by earlier runs from sources not scanned now (other days' drops):
    # still live while their file exists unchanged; otherwise gone.
    for old in previous:
        if old["image_id"] in rows:
            continue
        path = layout.root / old["path"]
        # A path scanned this run that no longer holds these bytes: the old image is gone.
        if old["status"] == LIVE and old["path"] not in seen_paths and path.is_file():
            st = path.stat()
            if st.st_size == old["size"] and st.st_mtime_ns == old["mtime_ns"]:
                rows[old["image_id"]] = dict(old)
                continue
            # Touched or changed in place outside a scanned source: re-identify it. The same
            # bytes are the same image, with the label it had.
            if add(path, old["source"], None) == old["image_id"]:
                row = rows[old["image_id"]]
                if row["class_id"] is None and old["class_id"] is not None:
                    row["class_id"], row["class_name"] = old["class_id"], old["class_name"]
                continue
        gone_row = dict(old, status=GONE)
        rows.setdefault(old["image_id"], gone_row)

    _name_classes(rows.values())
    gone_now = sum(
        1 for iid, r in rows.items() if r["status"] == GONE and prev_status.get(iid) == LIVE
    )
    new_now = sum(1 for iid in rows if iid not in prev_status)
    write_catalog(layout, rows.values())

    live = {iid: r for iid, r in rows.items() if r["status"] == LIVE}
    have = set() if full_rebuild else embedded_ids(layout, backbone)
    bad = binding_quarantine(layout, max_image_pixels, full_rebuild=full_rebuild)
    to_embed = [
        {"image_id": iid, "path": live[iid]["path"]}
        for iid in sorted(live)
        if iid not in have and iid not in bad
    ]
    diff = CatalogDiff(
        live=len(live),
        new_images=new_now,
        gone=gone_now,
        changed_paths=changed,
        unlabelled=sum(1 for r in live.values() if r["class_id"] is None),
        to_embed=to_embed,
        quarantined_skipped=sum(1 for iid in live if iid in bad),
        label_coverage=label_coverage(live.values()),
    )
    log.info("catalog for %s: %s; label coverage %s", run_date, diff.summary(), diff.label_coverage)
    return diff


def live_rows(layout: Layout) -> list[dict[str, Any]]:
    return [r for r in read_catalog(layout) if r["status"] == LIVE]
