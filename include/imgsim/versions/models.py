"""Model versions: naming, validation, atomic publish, rollback and retention.

A version is built in ``models/lsh/.staging/<version>/`` by the Spark job, validated, then
renamed into ``models/lsh/<version>/`` (a directory rename is atomic on one filesystem) and
``CURRENT`` is replaced atomically to name it. A published version directory is never modified.

At publish, the size and sha256 of every file of the version (all but ``manifest.json`` itself)
are recorded in the manifest's ``checksums``. Loading a version checks the sizes (a few stats);
the hashes are checked by ``imgsim versions --verify`` and whenever a read of the version fails,
so damage is reported as :class:`VersionDamaged` (naming the version, the file and
``imgsim rollback``) rather than as a reader's traceback. The result of the last hash check is
kept in ``models/lsh/.checks/<version>.json``; a version found damaged stays marked damaged
until a later check finds it whole. Versions published before checksums existed have none
("not recorded") and are not checked.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgsim.config import Layout
from imgsim.errors import PermanentError
from imgsim.fsutil import (
    atomic_write_json,
    atomic_write_text,
    exclusive_lock,
    fsync_dir,
    fsync_tree,
    read_json,
    sha256_file,
)

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v\d{8}T\d{6}Z-[0-9a-f]{6}$")
MANIFEST = "manifest.json"


class ValidationFailed(RuntimeError, PermanentError):
    """A fitted version did not pass validation; CURRENT was left unchanged."""


class VersionNotFound(LookupError, PermanentError):
    pass


class VersionDamaged(RuntimeError, PermanentError):
    """A published version's files differ from those recorded in its manifest at publish."""

    def __init__(self, version: str, problems: list[str], where: Path | None = None) -> None:
        self.version, self.problems = version, list(problems)
        shown = "; ".join(self.problems[:3])
        if len(self.problems) > 3:
            shown += f" (and {len(self.problems) - 3} more)"
        place = f" under {where}" if where else ""
        super().__init__(
            f"model version {version} is damaged: {shown}. Its files{place} are not those "
            "recorded when it was published. Make an intact version current with "
            "`imgsim rollback VERSION` (`imgsim versions --verify` checks them all), or refit "
            "with the imgsim_index DAG."
        )


def new_version(now: datetime | None = None, prefix: str = "v") -> str:
    """A sortable, unique version name such as ``v20261122T171400Z-3fa9c2`` (``prefix`` e for
    an embedder version)."""
    now = now or datetime.now(UTC)
    return f"{prefix}{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_version_name(version: str) -> str:
    if not VERSION_RE.match(version):
        raise ValueError(
            f"{version!r} is not a version name (expected like v20261122T171400Z-3fa9c2)"
        )
    return version


@contextmanager
def models_lock(layout: Layout) -> Iterator[None]:
    """An exclusive lock over CURRENT changes (publish, rollback, prune) on this data root."""
    with exclusive_lock(layout.models / ".lock"):
        yield


def current_version(layout: Layout) -> str | None:
    try:
        text = layout.current_pointer.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def version_dir(layout: Layout, version: str) -> Path:
    return layout.models / check_version_name(version)


def published_versions(layout: Layout) -> list[str]:
    """Published versions, oldest first (names sort by creation time)."""
    if not layout.models.exists():
        return []
    return sorted(
        p.name
        for p in layout.models.iterdir()
        if p.is_dir() and VERSION_RE.match(p.name) and (p / "manifest.json").exists()
    )


def read_manifest(layout: Layout, version: str | None = None) -> dict[str, Any]:
    """The manifest of ``version`` (default: CURRENT)."""
    version = version or current_version(layout)
    if version is None:
        raise VersionNotFound(
            f"no published model under {layout.models} (CURRENT is missing); "
            "run the imgsim_index DAG first"
        )
    path = version_dir(layout, version) / MANIFEST
    if not path.exists():
        raise VersionNotFound(f"model version {version} not found under {layout.models}")
    try:
        manifest: dict[str, Any] = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VersionDamaged(
            version, [f"{MANIFEST} is not valid JSON ({exc})"], path.parent
        ) from exc
    if not isinstance(manifest, dict):
        raise VersionDamaged(version, [f"{MANIFEST} is not a JSON object"], path.parent)
    return manifest


# -- integrity: sizes and sha256 recorded at publish ---------------------------------------------


def version_files(directory: Path) -> dict[str, Path]:
    """Every file of a version directory by its relative POSIX path, except the manifest."""
    return {
        p.relative_to(directory).as_posix(): p
        for p in sorted(directory.rglob("*"))
        if not p.is_dir() and p.relative_to(directory).as_posix() != MANIFEST
    }


def file_checksums(directory: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` for every file but the manifest."""
    return {
        rel: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for rel, p in version_files(directory).items()
    }


def record_checksums(directory: Path) -> dict[str, Any]:
    """Write every file's size and sha256 into ``directory``'s manifest (``checksums``)."""
    manifest = read_json(directory / MANIFEST)
    manifest["checksums"] = file_checksums(directory)
    atomic_write_json(directory / MANIFEST, manifest)
    return dict(manifest)


@dataclass(frozen=True)
class Integrity:
    """What a check of a published version's files found."""

    version: str
    recorded: bool  # the manifest lists its files (False for older versions)
    hashed: bool  # sha256 compared too, not only sizes
    problems: list[str]
    checked_at: str | None = None  # when the hash check that found ``problems`` ran

    @property
    def status(self) -> str:
        if self.problems:
            return "damaged"
        if not self.recorded:
            return "not recorded"
        return "ok (sha256)" if self.hashed else "ok (sizes)"


def checks_dir(layout: Layout) -> Path:
    return layout.models / ".checks"


def _remembered(layout: Layout, version: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = read_json(checks_dir(layout) / f"{version}.json")
    except (OSError, ValueError):
        return None
    return record


def _remember(layout: Layout, result: Integrity) -> None:
    try:
        atomic_write_json(
            checks_dir(layout) / f"{result.version}.json",
            {
                "version": result.version,
                "checked_at": result.checked_at,
                "problems": result.problems,
            },
        )
    except OSError as exc:  # a read-only data root: the check itself still stands
        log.warning("could not record the check of %s: %s", result.version, exc)


def check_version(
    layout: Layout, version: str, *, hashes: bool = False, only: Sequence[str] | None = None
) -> Integrity:
    """Compare a published version's files with the sizes (and, with ``hashes``, the sha256)
    recorded at publish; report missing, changed and unexpected files. Never raises for damage.

    ``only``: with ``hashes``, the sha256 of just these files (relative paths; a folder names
    every file under it), the sizes of all. A sizes-only check also reports the problems that
    the last hash check found (kept until a later whole hash check finds the version whole).
    A hash check's result is kept for that purpose (a partial one only when it finds damage).
    """
    vdir = version_dir(layout, version)
    try:
        manifest = read_manifest(layout, version)
    except VersionDamaged as exc:
        return Integrity(version, False, hashes, exc.problems)
    recorded = manifest.get("checksums")
    if not isinstance(recorded, dict):
        return Integrity(version, False, False, [])
    actual = version_files(vdir)
    problems: list[str] = []
    for rel, want in sorted(recorded.items()):
        path = actual.get(rel)
        if path is None:
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want.get("size"):
            problems.append(f"{rel} has {size} bytes, {want.get('size')} were recorded")
        elif hashes and _selected(rel, only) and sha256_file(path) != want.get("sha256"):
            problems.append(f"{rel} has been altered (its sha256 differs from the recorded one)")
    problems += [
        f"{rel} was not part of the version when it was published"
        for rel in sorted(set(actual) - set(recorded))
    ]
    if hashes:
        result = Integrity(version, True, True, problems, datetime.now(UTC).isoformat())
        if only is None or problems:
            _remember(layout, result)
        return result
    if not problems:
        last = _remembered(layout, version)
        if last and last.get("problems"):
            return Integrity(version, True, False, list(last["problems"]), last.get("checked_at"))
    return Integrity(version, True, False, problems)


def _selected(rel: str, only: Sequence[str] | None) -> bool:
    return only is None or any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in only)


def verify_version(layout: Layout, version: str, *, hashes: bool = False) -> Integrity:
    """:func:`check_version`, raising :class:`VersionDamaged` when it finds a problem."""
    result = check_version(layout, version, hashes=hashes)
    if result.problems:
        raise VersionDamaged(version, result.problems, version_dir(layout, version))
    return result


@contextmanager
def reading_version(layout: Layout, version: str) -> Iterator[Integrity]:
    """Guard the reads of a published version: sizes are checked first; if a read inside the
    block fails, the sha256 of every file is checked, and damage raises :class:`VersionDamaged`
    (chained to the reader's error) instead of the reader's error."""
    result = verify_version(layout, version)
    try:
        yield result
    except VersionDamaged:
        raise
    except Exception as exc:
        full = check_version(layout, version, hashes=True)
        if full.problems:
            raise VersionDamaged(version, full.problems, version_dir(layout, version)) from exc
        raise


# -- a published version as the base of a new run -----------------------------------------------

#: What a manifest must hold for a run to build on it (the fit plan compares these).
BASE_KEYS = (
    ("version",),
    ("snapshot", "fingerprint"),
    ("counts", "indexed"),
    ("files", "reference"),
    ("backbone", "name"),
    ("fit_settings",),
)


@dataclass(frozen=True)
class Base:
    """A published version a new run may build on (reuse its projection, update its graph):
    its manifest is complete and its files are those recorded at publish."""

    version: str
    dir: Path
    manifest: dict[str, Any]

    def file(self, key: str) -> Path | None:
        """The path of the manifest's ``files[key]`` (None when the version has none)."""
        name = (self.manifest.get("files") or {}).get(key)
        return self.dir / str(name) if name else None


def base_version(layout: Layout, version: str | None, *, reuse: Sequence[str] = ()) -> Base | str:
    """``version`` (CURRENT when None) checked as the base of a new run, or why it cannot be.

    Checked: the name is a published version, its manifest is JSON with every
    :data:`BASE_KEYS` entry, every file has the size recorded at publish (and no hash check
    found damage), and the files the run will reuse (``reuse``: keys of the manifest's
    ``files``, e.g. ``projection``, ``reference``, ``neighbours``, ``neighbours_cells``) have
    the recorded sha256, so no damaged byte is carried into a new version. Never raises for a
    missing or damaged version: the caller builds in full and says why (the returned text).
    """
    if version is None:
        try:
            version = current_version(layout)
        except OSError as exc:
            return f"CURRENT cannot be read ({exc})"
        if version is None:
            return "no published version"
    if not VERSION_RE.match(version):
        return f"CURRENT names {version[:80]!r}, which is not a version name"
    if version not in published_versions(layout):
        return f"{version} is not published under {layout.models}"
    try:
        manifest = read_manifest(layout, version)
    except (VersionNotFound, VersionDamaged, OSError) as exc:
        problems = getattr(exc, "problems", None) or [str(exc)]
        return f"{version} is damaged: {'; '.join(problems[:3])}"
    missing = [".".join(keys) for keys in BASE_KEYS if _lookup(manifest, keys) is None]
    if missing or manifest["version"] != version:
        what = f"lacks {', '.join(missing)}" if missing else f"names {manifest['version']!r}"
        return f"{version} is damaged: its {MANIFEST} {what}"
    files = manifest.get("files") or {}
    wanted = [str(files[key]) for key in reuse if files.get(key)]
    integrity = check_version(layout, version, hashes=bool(wanted), only=wanted)
    if integrity.problems:
        shown = "; ".join(integrity.problems[:3])
        more = len(integrity.problems) - 3
        return f"{version} is damaged: {shown}" + (f" (and {more} more)" if more > 0 else "")
    return Base(version, version_dir(layout, version), manifest)


def _lookup(mapping: Any, keys: Sequence[str]) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


@dataclass(frozen=True)
class ValidationReport:
    version: str
    checks: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "checks": self.checks}


def validate_staged(
    layout: Layout,
    version: str,
    *,
    expected_count: int,
    expected_fingerprint: str,
    backbone: str,
    recall_floor: float,
    hash_check_rows: int = 1000,
    expected_labels_fingerprint: str | None = None,
) -> ValidationReport:
    """Check a staged version before it may become CURRENT; raise ValidationFailed if not fit.

    Checks: the manifest is complete; the backbone is the configured one; the image count and
    snapshot fingerprint equal what the catalog says; recall@k against exact search (from the
    manifest) is at or above the floor; the reference table has one row per image; and the
    model's hashes, recomputed here in NumPy from the saved random matrix, equal Spark's.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from imgsim.ann import hash_vectors, load_brp_model

    staged = layout.staging / check_version_name(version)
    problems: list[str] = []
    if not (staged / "manifest.json").exists():
        raise ValidationFailed(f"{staged}: no manifest.json; the fit did not complete")
    manifest = read_json(staged / "manifest.json")
    checks: dict[str, Any] = {}

    got_backbone = manifest.get("backbone", {}).get("name")
    checks["backbone"] = got_backbone
    if got_backbone != backbone:
        problems.append(f"backbone {got_backbone!r} != configured {backbone!r}")
    count = manifest.get("counts", {}).get("indexed")
    checks["indexed"] = count
    if count != expected_count:
        problems.append(f"indexed {count} images, the catalog has {expected_count} with vectors")
    fp = manifest.get("snapshot", {}).get("fingerprint")
    if fp != expected_fingerprint:
        problems.append("the embedding snapshot differs from the catalog's (fingerprint mismatch)")
    if (
        expected_labels_fingerprint is not None
        and manifest.get("snapshot", {}).get("labels_fingerprint") != expected_labels_fingerprint
    ):
        problems.append("the labels differ from the catalog's (labels fingerprint mismatch)")
    recall = manifest.get("metrics", {}).get("recall_at_k")
    checks["recall_at_k"] = recall
    checks["recall_floor"] = recall_floor
    if recall is None or recall < recall_floor:
        problems.append(
            f"recall@k {recall} is below the floor {recall_floor} "
            "(raise numHashTables or bucketLength, or lower IMGSIM_RECALL_FLOOR)"
        )

    ref = pq.read_table(staged / "reference", columns=["image_id", "vector", "hashes"])
    checks["reference_rows"] = ref.num_rows
    ids = ref.column("image_id").to_pylist()
    if ref.num_rows != count or len(set(ids)) != len(ids):
        problems.append(
            f"reference table has {ref.num_rows} rows ({len(set(ids))} distinct ids), "
            f"manifest says {count}"
        )
    params = load_brp_model(staged / "model")
    lsh = manifest.get("lsh", {})
    if params.num_hash_tables != lsh.get("numHashTables") or params.bucket_length != lsh.get(
        "bucketLength"
    ):
        problems.append(
            f"saved model ({params.num_hash_tables} tables, bucketLength "
            f"{params.bucket_length}) differs from the manifest's {lsh}"
        )
    bands, (keys_per_band, probes) = lsh.get("bands"), banding(manifest)
    if bands is not None and bands * keys_per_band != params.num_hash_tables:
        problems.append(
            f"{bands} bands x {keys_per_band} keys per band != the saved model's "
            f"{params.num_hash_tables} projections"
        )
    if not 0 <= probes <= keys_per_band:
        problems.append(f"probes {probes} must be between 0 and keys_per_band {keys_per_band}")
    problems += _check_graph(staged, manifest, set(ids), recall_floor, checks)
    problems += _check_map(staged, manifest, set(ids), checks)
    head = ref.slice(0, hash_check_rows)
    if head.num_rows:
        x = np.stack([np.asarray(v, np.float32) for v in head.column("vector").to_pylist()])
        h = np.stack([np.asarray(v, np.int64) for v in head.column("hashes").to_pylist()])
        same = bool((hash_vectors(params, x) == h).all())
        checks["numpy_hashes_match_spark"] = same
        checks["hash_rows_checked"] = head.num_rows
        if not same:
            problems.append("hashes recomputed from the saved model differ from Spark's")
        problems += _check_projection(
            layout, staged, manifest, backbone, head.column("image_id").to_pylist(), x, checks
        )
    checks["problems"] = problems
    report = ValidationReport(version, checks)
    atomic_write_json(staged / "validation.json", report.as_dict())
    if problems:
        raise ValidationFailed(f"version {version} failed validation: " + "; ".join(problems))
    log.info("version %s validated: %s", version, checks)
    return report


def _check_map(
    staged: Path, manifest: dict[str, Any], ids: set[str], checks: dict[str, Any]
) -> list[str]:
    """The stored map (when the version has one): one row per point the manifest counts, each
    a distinct reference of this version, every coordinate finite."""
    from imgsim.ann.layout import LayoutError, read_map

    entry = manifest.get("map")
    if not entry:
        return []
    name = (manifest.get("files") or {}).get("map")
    if not name or not (staged / str(name)).is_file():
        return ["the manifest lists a map but its file is missing"]
    try:
        stored = read_map(staged / str(name))
    except LayoutError as exc:
        return [str(exc)]
    named = stored["image_id"]
    checks["map_points"] = len(named)
    problems = []
    if len(named) != entry.get("points") or len(set(named)) != len(named):
        problems.append(
            f"the map has {len(named)} rows ({len(set(named))} distinct ids), the "
            f"manifest {entry.get('points')}"
        )
    if not set(named) <= ids:
        problems.append(f"the map names {len(set(named) - ids)} image(s) that are not references")
    return problems


def _check_graph(
    staged: Path,
    manifest: dict[str, Any],
    ids: set[str],
    recall_floor: float,
    checks: dict[str, Any],
) -> list[str]:
    """The neighbour graph (when the version has one): its recall against exact search on the
    sample is at or above the floor, its table has the edges the manifest counts, and every
    image and neighbour in it (and in the duplicate groups) is a reference of this version."""
    import pyarrow.parquet as pq

    entry = manifest.get("neighbours")
    if not entry:
        return []
    problems = []
    recall = entry.get("recall_at_k")
    checks["graph_recall_at_k"] = recall
    if recall is None or recall < recall_floor:
        problems.append(
            f"the neighbour graph's recall@{entry.get('k')} {recall} is below the floor "
            f"{recall_floor} (raise IMGSIM_GRAPH_BUCKET_CAP or the LSH's tables)"
        )
    if not (staged / "neighbours").is_dir() or not (staged / "duplicates").is_dir():
        return [
            *problems,
            "the manifest lists a neighbour graph but neighbours/ or duplicates/ is missing",
        ]
    graph = pq.read_table(staged / "neighbours", columns=["image_id", "neighbour_id"])
    checks["graph_edges"] = graph.num_rows
    problems += _check_short_lists(graph, entry, len(ids), checks)
    if graph.num_rows != entry.get("edges"):
        problems.append(
            f"neighbours/ has {graph.num_rows} edges, the manifest {entry.get('edges')}"
        )
    dup = pq.read_table(staged / "duplicates", columns=["image_id", "nearest_id"])
    named = (
        set(graph.column("image_id").to_pylist())
        | set(graph.column("neighbour_id").to_pylist())
        | set(dup.column("image_id").to_pylist())
        | set(dup.column("nearest_id").to_pylist())
    )
    if not named <= ids:
        problems.append(
            f"{len(named - ids)} images in neighbours/ or duplicates/ are not references"
        )
    return problems


#: A version whose graph leaves more than this share of its references with fewer than k
#: neighbours fails validation (a few are filled by exact search; more is a broken graph).
MAX_SHORT_SHARE = 0.01


def _check_short_lists(
    graph: Any, entry: dict[str, Any], n: int, checks: dict[str, Any]
) -> list[str]:
    """Count, per reference, its neighbours in the graph: those with fewer than min(k, n - 1)
    are short. The count must be what the manifest records, and at most MAX_SHORT_SHARE."""
    import pyarrow.compute as pc

    need = min(int(entry.get("k") or 0), n - 1)
    counts = graph.group_by("image_id").aggregate([("neighbour_id", "count")])
    full = int(pc.sum(pc.greater_equal(counts.column("neighbour_id_count"), need)).as_py() or 0)
    short = n - full
    checks["graph_short_lists"] = short
    problems = []
    recorded = entry.get("short_lists")
    if recorded is not None and recorded != short:
        problems.append(
            f"the manifest records {recorded} references with fewer than {need} neighbours, "
            f"the graph has {short}"
        )
    if short > MAX_SHORT_SHARE * n:
        problems.append(
            f"{short} of {n} references ({short / max(n, 1):.1%}) have fewer than {need} "
            f"neighbours in the graph (at most {MAX_SHORT_SHARE:.0%} may): raise "
            "IMGSIM_GRAPH_BUCKET_CAP or lower IMGSIM_GRAPH_K"
        )
    return problems


def _check_projection(
    layout: Layout,
    staged: Path,
    manifest: dict[str, Any],
    backbone: str,
    ids: list[str],
    vectors: Any,
    checks: dict[str, Any],
) -> list[str]:
    """The stored projection loads (sha256 as recorded) and maps the store's raw vectors of
    ``ids`` onto the reference table's ``vectors`` (NumPy twin against Spark)."""
    import numpy as np

    from imgsim.ann.projection import ProjectionError, load
    from imgsim.store import load_vectors

    entry = manifest.get("projection")
    checks["projection"] = (entry or {}).get("kind", "none")
    if not entry or entry.get("kind", "none") == "none":
        return []
    try:
        proj = load(staged, entry)
    except ProjectionError as exc:
        return [str(exc)]
    if proj is None or proj.dims != manifest.get("search_dim"):
        return [
            f"projection has {proj.dims if proj else 0} dims, the manifest's search space "
            f"{manifest.get('search_dim')}"
        ]
    got, raw = load_vectors(layout, backbone, ids=set(ids))
    order = {iid: i for i, iid in enumerate(got)}
    rows = [i for i, iid in enumerate(ids) if iid in order]
    if not rows:
        return ["no raw vector found in the store for the rows checked against the projection"]
    twin = proj.apply(raw[[order[ids[i]] for i in rows]])
    err = float(np.abs(twin - vectors[rows]).max())
    checks["projection_max_abs_diff"] = err
    if err > 1e-4:
        return [
            f"the projection applied in NumPy differs from Spark's projected vectors by {err:.2e}"
        ]
    return []


def publish(layout: Layout, version: str, *, keep: int = 5) -> str:
    """Move a validated staged version into place and point CURRENT at it, atomically."""
    staged = layout.staging / check_version_name(version)
    final = layout.models / version
    with models_lock(layout):
        if not final.exists():
            report = staged / "validation.json"
            if not report.exists() or read_json(report)["checks"].get("problems"):
                raise ValidationFailed(f"{version} has not passed validation; not publishing")
            record_checksums(staged)  # the final staging directory, every file in it
            fsync_tree(staged)  # Spark's files on disk before the rename and CURRENT name them
            os.rename(staged, final)
            fsync_dir(layout.models)
        atomic_write_text(layout.current_pointer, version + "\n")
        log.info("CURRENT -> %s", version)
        prune(layout, keep)
    return version


class IndexRunInFlight(RuntimeError, PermanentError):
    """A rollback refused because an index run holds the lease: it would publish over it."""


def rollback(
    layout: Layout, version: str, *, force: bool = False, ttl_s: float | None = None
) -> str:
    """Point CURRENT at an older published version, atomically, and the CURRENT embedder at
    the one it was built with (``frozen`` for a frozen backbone), so that the next index run
    keeps embedding with it.

    Refused (:class:`IndexRunInFlight`) while an index run holds the lease with a heartbeat
    younger than ``ttl_s`` (IMGSIM_LEASE_TTL_S): that run would publish over the rollback.
    ``force`` rolls back anyway (a run known dead whose lease has not expired yet)."""
    from imgsim.versions.embedders import set_current_embedder
    from imgsim.versions.runlease import LEASE_TTL_S, read_lease

    holder = read_lease(layout)
    if holder is not None and not force and not holder.expired(ttl_s or LEASE_TTL_S):
        raise IndexRunInFlight(
            f"cannot roll back now: index run {holder.run_id!r} (deployment "
            f"{holder.deployment or 'unknown'}, on {holder.host} since {holder.acquired_at}) "
            "holds the index lease and would publish over the rollback. Wait for it to finish "
            "(or mark it failed in Airflow), then roll back; `imgsim rollback --force` if "
            "that run is known dead."
        )
    with models_lock(layout):
        if version not in published_versions(layout):
            raise VersionNotFound(
                f"cannot roll back: version {version} is not published under "
                f"{layout.models}; published: {published_versions(layout)}"
            )
        verify_version(layout, version, hashes=True)  # never roll back onto a damaged one
        backbone = str(read_manifest(layout, version).get("backbone", {}).get("name", ""))
        if "@" in backbone or layout.embedders.exists():
            set_current_embedder(layout, backbone)  # checks the embedder first
        atomic_write_text(layout.current_pointer, version + "\n")
    log.info("rolled back: CURRENT -> %s", version)
    return version


#: A query run's pin of its version lasts at most this long (a crashed run's pin expires).
PIN_MAX_AGE_S = 24 * 3600.0


def pins_dir(layout: Layout) -> Path:
    return layout.models / ".pins"


def pin_version(layout: Layout, version: str, holder: str) -> Path:
    """Keep ``version`` from being pruned while ``holder`` (a query run) reads it."""
    path = pins_dir(layout) / f"{holder}.json"
    atomic_write_json(
        path,
        {
            "version": check_version_name(version),
            "holder": holder,
            "pinned_at": datetime.now(UTC).isoformat(),
        },
    )
    return path


def unpin_version(layout: Layout, holder: str) -> None:
    (pins_dir(layout) / f"{holder}.json").unlink(missing_ok=True)


def pinned_versions(layout: Layout, max_age_s: float = PIN_MAX_AGE_S) -> set[str]:
    """Versions a query run still reads (pins younger than ``max_age_s``; older ones are
    removed: their runs are long gone)."""
    found: set[str] = set()
    folder = pins_dir(layout)
    if not folder.is_dir():
        return found
    now = datetime.now(UTC).timestamp()
    for path in folder.glob("*.json"):
        try:
            age = now - path.stat().st_mtime
            record = read_json(path)
        except (OSError, ValueError):
            continue  # being written or removed right now
        if age > max_age_s:
            path.unlink(missing_ok=True)
            log.warning("removed the expired pin %s (%s)", path.name, record.get("version"))
        elif isinstance(record, dict) and VERSION_RE.match(str(record.get("version", ""))):
            found.add(str(record["version"]))
    return found


def prune(layout: Layout, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` published versions: never CURRENT, never one a
    running query run pinned (:func:`pin_version`). Caller holds the lock."""
    versions = published_versions(layout)
    current = current_version(layout)
    pinned = pinned_versions(layout)
    doomed = [v for v in versions[:-keep] if v != current and v not in pinned] if keep > 0 else []
    for v in sorted(pinned & set(versions[:-keep] if keep > 0 else [])):
        log.info("kept old version %s: a query run reads it", v)
    for v in doomed:
        # Rename first so a half-deleted directory is never seen as a version.
        trash = layout.models / f".trash-{v}"
        os.rename(layout.models / v, trash)
        shutil.rmtree(trash, ignore_errors=True)
        (checks_dir(layout) / f"{v}.json").unlink(missing_ok=True)
        log.info("pruned old version %s", v)
    return doomed


def clean_staging(layout: Layout, keep: str | None = None) -> None:
    """Remove abandoned staged versions (crashed or rejected fits), except ``keep``."""
    if not layout.staging.exists():
        return
    for p in layout.staging.iterdir():
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)


def describe_lsh(lsh: dict[str, Any]) -> str:
    """A short human form of a manifest's LSH keys: '8 tables' or '32 bands x 8 keys, 1 probe'.

    Plain BRP ORs ``numHashTables`` single projections; banded versions AND ``keys_per_band``
    projections per key and may probe neighbouring buckets. ``(auto)`` marks tuned values.
    """
    tables = lsh.get("numHashTables")
    keys = int(lsh.get("keys_per_band") or 1)
    probes = int(lsh.get("probes") or 0)
    if keys <= 1 and probes == 0:
        text = f"{tables} tables"
    else:
        bands = lsh.get("bands") or (int(tables) // keys if tables else "?")
        text = f"{bands} bands x {keys} keys, {probes} probe{'s' if probes != 1 else ''}"
    if lsh.get("requested_num_hash_tables") == 0:
        text += " (auto)"
    return text


def measured_share(manifest: dict[str, Any]) -> float | None:
    """The share of the index the version's LSH compared per query in validation (None:
    not measured)."""
    share = (manifest.get("metrics") or {}).get("candidates_share")
    return None if share is None else float(share)


def banding(manifest: dict[str, Any]) -> tuple[int, int]:
    """(keys_per_band, probes) of a version; older manifests: (1, 0), Spark's plain OR."""
    lsh = manifest.get("lsh", {})
    return int(lsh.get("keys_per_band") or 1), int(lsh.get("probes") or 0)
