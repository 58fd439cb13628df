"""The index pipeline's task bodies: small typed functions that the DAG wraps and tests call.

Each takes plain values (paths, strings, numbers) and returns a small JSON-able dict, so it
runs the same from Airflow, from the CLI and from a test.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from imgsim.config import Layout, Settings
from imgsim.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


class PipelineError(RuntimeError):
    pass


def run_key(run_id: str) -> str:
    """A file-name-safe key for an Airflow run id (stable across task retries)."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-.")
    if not key:
        raise ValueError(f"run id {run_id!r} gives an empty key")
    return key[:120]


# -- download / extract -------------------------------------------------------------------------

def download_sources(settings: Settings, archive_url: str, labels_url: str,
                     archive_sha256: str = "", labels_sha256: str = "") -> dict[str, Any]:
    """Fetch the archive and the labels file into ``raw/`` (no-op when current)."""
    from imgsim.sources.download import fetch

    raw = settings.layout.raw
    out: dict[str, Any] = {}
    for name, url, digest in (("archive", archive_url, archive_sha256),
                              ("labels", labels_url, labels_sha256)):
        if not url:
            raise PipelineError(f"no {name} URL given (Param {name}_url or IMGSIM_"
                                f"{name.upper()}_URL)")
        res = fetch(url, raw, sha256=digest, timeout_s=settings.download_timeout_s,
                    retries=settings.download_retries)
        log.info("%s: %s (%d bytes, sha256 %s, %s)", name, res.path, res.size, res.sha256,
                 "downloaded" if res.downloaded else "already current")
        out[name] = {"path": str(res.path), "sha256": res.sha256, "size": res.size,
                     "downloaded": res.downloaded}
    return out


def archive_folder_name(archive: Path) -> str:
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "archive"
    return archive.stem or "archive"


def extract(settings: Settings, archive_path: str) -> dict[str, Any]:
    """Safely extract the archive into ``images/<archive name>/`` (no-op when done before)."""
    from imgsim.sources.archive import safe_extract

    archive = Path(archive_path)
    target = settings.layout.images / archive_folder_name(archive)
    res = safe_extract(archive, target)
    log.info("extract %s -> %s: %d files, %d bytes (%s)", archive, target, res.files,
             res.total_bytes, "extracted" if res.extracted else "already extracted")
    return {"root": str(res.target), "files": res.files, "extracted": res.extracted}


# -- catalog / shards ---------------------------------------------------------------------------

def run_day(ds: str | None, run_after: Any = None) -> str:
    """The day whose drop folder a run reads: its logical date, else the day it was run for.

    Runs triggered without a logical date (the REST API's default in Airflow 3) have no ``ds``.
    """
    if ds:
        return ds
    if run_after is None:
        raise PipelineError("the run has neither a logical date nor a run_after date")
    return str(run_after.date().isoformat())


def catalog(settings: Settings, image_root: str, labels_path: str, run_date: str,
            run_id: str, backbone: str, full_rebuild: bool = False) -> dict[str, Any]:
    """Update the catalog from the archive and ``incoming/<run_date>/``; save what to embed."""
    from imgsim.catalog import Source, incoming_source, update_catalog
    from imgsim.sources.labels import read_labels

    layout = settings.layout
    labels = read_labels(Path(labels_path))
    sources = [Source(f"archive:{Path(image_root).name}", Path(image_root), labels)]
    daily = incoming_source(layout, run_date)
    if daily is not None:
        sources.append(daily)
    else:
        log.info("no drop folder %s for this run", layout.incoming_day(run_date))
    diff = update_catalog(layout, sources, run_date, backbone, full_rebuild=full_rebuild)
    todo = layout.runs / run_key(run_id) / "to_embed.json"
    atomic_write_json(todo, diff.to_embed)
    return {**diff.summary(), "to_embed_file": str(todo)}


def plan_shards(settings: Settings, to_embed_file: str, run_id: str) -> list[dict[str, Any]]:
    """Split the images to embed into shard files; one mapped embed task per shard."""
    todo: list[dict[str, str]] = read_json(to_embed_file)
    key = run_key(run_id)
    shard_dir = settings.layout.runs / key / "shards"
    size = settings.shard_size
    shards = []
    for i, start in enumerate(range(0, len(todo), size)):
        spec = shard_dir / f"shard-{i:05d}.json"
        atomic_write_json(spec, {"run_key": key, "shard": i, "items": todo[start:start + size]})
        shards.append({"spec": str(spec), "shard": i, "images": len(todo[start:start + size])})
    log.info("%d images to embed in %d shard(s) of at most %d", len(todo), len(shards), size)
    return shards


# -- embed --------------------------------------------------------------------------------------

def check_backbone_record(layout: Layout, spec: dict[str, Any]) -> None:
    """The store of a backbone holds vectors of one weights file and runtime; record or compare.

    A record without a runtime was written before runtimes existed: it means ``torch``.
    """
    from imgsim.embedding.backbones import comparable_spec

    record = layout.embeddings(spec["name"]) / "BACKBONE.json"
    if not record.exists():
        atomic_write_json(record, spec)
        return
    stored = read_json(record)
    if comparable_spec(stored) != comparable_spec(spec):
        raise PipelineError(
            f"{record} says the store was built with {stored}, but this run loads {spec}. "
            f"Vectors from different weights, preprocessing or runtime (IMGSIM_RUNTIME) must "
            f"not be mixed: use the store's runtime, or move {record.parent} aside to rebuild "
            f"it.")


def embed_shard(settings: Settings, spec_path: str, backbone_name: str) -> dict[str, Any]:
    """Embed one shard: decode, resize, batched inference, one Parquet file; quarantine bad."""
    from imgsim.embedding.backbones import load_backbone
    from imgsim.embedding.infer import EmbedItem, Rejected, configure_threads, embed_items
    from imgsim.store import quarantine

    layout = settings.layout
    spec = read_json(spec_path)
    configure_threads(settings.num_threads)
    backbone = load_backbone(backbone_name, weights_path=settings.weights_path,
                             device=settings.device, runtime=settings.runtime,
                             cache_dir=layout.model_cache)
    check_backbone_record(layout, backbone.spec.as_dict())
    items = [EmbedItem(it["image_id"], layout.root / it["path"],
                       layout.thumbs / f"{it['image_id']}.jpg") for it in spec["items"]]
    good: list[tuple[str, Any]] = []
    rejected: dict[str, int] = {}
    for res in embed_items(items, backbone, batch_size=settings.batch_size,
                           max_pixels=settings.max_image_pixels):
        if isinstance(res, Rejected):
            quarantine(layout, res.key, res.path, res.reason, res.detail, spec["run_key"])
            rejected[res.reason] = rejected.get(res.reason, 0) + 1
        else:
            good.append((res.key, res.vector))
    return finish_shard(layout, spec_path, backbone_name, spec["run_key"], spec["shard"], good,
                        rejected, backbone.spec.dim)


def shard_result_path(spec_path: str | Path) -> Path:
    """Where an embedded shard's result is recorded: ``runs/<run>/embedded/shard-NNNNN.json``."""
    spec = Path(spec_path)
    return spec.parent.parent / "embedded" / spec.name


def finish_shard(layout: Layout, spec_path: str | Path, backbone_name: str, run_key: str,
                 shard: int, good: list[tuple[str, Any]], rejected: dict[str, int],
                 dim: int) -> dict[str, Any]:
    """Write one shard's Parquet file, then its result record (both engines end here)."""
    from imgsim.store import write_shard

    path = write_shard(layout, backbone_name, run_key, shard, good, dim)
    log.info("shard %s: %d embedded, %d quarantined %s -> %s", shard, len(good),
             sum(rejected.values()), rejected, path)
    result = {"shard": shard, "embedded": len(good), "quarantined": dict(sorted(rejected.items())),
              "file": str(path)}
    atomic_write_json(shard_result_path(spec_path), result)
    return result


def embed_route(settings: Settings, engine: str, shards: list[dict[str, Any]], run_id: str,
                backbone: str) -> tuple[str, str]:
    """(route, Spark job file): route ``none`` (nothing to embed), ``tasks`` or ``spark``.

    For ``spark`` the job's input is written first: ``runs/<run>/spark_embed.json``.
    """
    from imgsim.config import check_embed_engine

    engine = check_embed_engine(engine, "embed engine (Param embed_engine or "
                                        "IMGSIM_EMBED_ENGINE)")
    if not shards:
        log.info("nothing to embed: no shard for the %s engine", engine)
        return "none", ""
    if engine == "tasks":
        return "tasks", ""
    return "spark", str(write_spark_embed_job(settings, shards, run_id, backbone))


def write_spark_embed_job(settings: Settings, shards: list[dict[str, Any]], run_id: str,
                          backbone: str) -> Path:
    """Write what ``spark_jobs/embed_images.py --job FILE`` embeds, and with which settings."""
    job = {"data_root": str(settings.data_root), "backbone": backbone,
           "run_key": run_key(run_id), "shards": [str(s["spec"]) for s in shards],
           "weights_path": settings.weights_path, "device": settings.device,
           "runtime": settings.runtime, "batch_size": settings.batch_size,
           "num_threads": settings.num_threads, "max_image_pixels": settings.max_image_pixels}
    path = settings.layout.runs / run_key(run_id) / "spark_embed.json"
    atomic_write_json(path, job)
    log.info("Spark embedding job: %d shard(s), %d images -> %s", len(shards),
             sum(int(s["images"]) for s in shards), path)
    return path


def embed_summary(shards: list[dict[str, Any]], engine: str) -> dict[str, Any]:
    """Totals over the shards' result records; the same for both engines.

    Fails, naming the shard, when a planned shard has no result, when its file is missing,
    or when its counts do not add up to the images planned for it.
    """
    embedded, images = 0, 0
    reasons: dict[str, int] = {}
    files: list[str] = []
    for shard in shards:
        path = shard_result_path(shard["spec"])
        if not path.exists():
            raise PipelineError(f"shard {shard['shard']} ({shard['spec']}) has no result at "
                                f"{path}: the {engine} engine did not finish it")
        result = read_json(path)
        quarantined = sum(result["quarantined"].values())
        if result["embedded"] + quarantined != shard["images"]:
            raise PipelineError(f"shard {shard['shard']}: {result['embedded']} embedded + "
                                f"{quarantined} quarantined != {shard['images']} planned ({path})")
        if not Path(result["file"]).exists():
            raise PipelineError(f"shard {shard['shard']}: {result['file']} is missing")
        embedded += result["embedded"]
        images += shard["images"]
        files.append(Path(result["file"]).name)
        for reason, n in result["quarantined"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    summary = {"engine": engine, "shards": len(shards), "images": images, "embedded": embedded,
               "quarantined": dict(sorted(reasons.items())),
               "quarantined_total": sum(reasons.values()), "files": files}
    log.info("embedded with %s: %d shard(s), %d of %d images, quarantined %s", engine,
             len(shards), embedded, images, summary["quarantined"] or "none")
    return summary


# -- fit gate / validate / publish ----------------------------------------------------------------

def fit_plan(settings: Settings, backbone: str, num_hash_tables: int, bucket_length: float,
             full_rebuild: bool = False, embedded: dict[str, Any] | None = None,
             ) -> dict[str, Any]:
    """Decide whether a new version is needed; if so, name it.

    ``embedded`` is this run's embed summary (:func:`embed_summary`, either engine); a plan
    carries it on to the later tasks.

    A refit is needed when the set of live, embedded images differs from the CURRENT model's
    snapshot, when the LSH parameters or backbone differ, or when a full rebuild is asked for.
    Returns ``{}`` (falsy: skip fit, validate and publish) when nothing changed.
    """
    from imgsim.catalog import live_rows
    from imgsim.models import VersionNotFound, new_version, read_manifest
    from imgsim.store import embedded_ids, snapshot_fingerprint

    layout = settings.layout
    live = {r["image_id"] for r in live_rows(layout)}
    indexed = live & embedded_ids(layout, backbone)
    if not indexed:
        raise PipelineError(f"no live image has a {backbone} embedding under "
                            f"{layout.embeddings(backbone)}: nothing to index")
    fingerprint = snapshot_fingerprint(indexed)
    plan = {"version": new_version(), "data_root": str(layout.root), "backbone": backbone,
            "expected_count": len(indexed), "fingerprint": fingerprint,
            "num_hash_tables": int(num_hash_tables), "bucket_length": float(bucket_length),
            "embedded": embedded or {}}
    try:
        current = read_manifest(layout)
    except VersionNotFound:
        log.info("no current model: fitting %s", plan["version"])
        return plan
    same = (current["snapshot"]["fingerprint"] == fingerprint
            and current["backbone"].get("name") == backbone
            and int(current["lsh"].get("requested_num_hash_tables",
                                       current["lsh"]["numHashTables"])) == int(num_hash_tables)
            and float(current["lsh"].get("requested_bucket_length",
                                         current["lsh"]["bucketLength"])) == float(bucket_length))
    if same and not full_rebuild:
        log.info("nothing changed since %s (%d images): no refit", current["version"],
                 len(indexed))
        return {}
    return plan


def validate(settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    from imgsim.models import validate_staged

    report = validate_staged(settings.layout, plan["version"],
                             expected_count=plan["expected_count"],
                             expected_fingerprint=plan["fingerprint"],
                             backbone=plan["backbone"], recall_floor=settings.recall_floor)
    return report.as_dict()


def publish(settings: Settings, version: str, run_id: str | None = None) -> dict[str, Any]:
    """Make ``version`` current. With ``run_id``, only while that run holds the index lease."""
    from imgsim.models import clean_staging, publish, read_manifest
    from imgsim.runlease import ensure_held

    if run_id is not None:
        ensure_held(settings.layout, run_id)
    publish(settings.layout, version, keep=settings.keep_versions)
    clean_staging(settings.layout)
    manifest = read_manifest(settings.layout, version)
    return {"version": version, "indexed": manifest["counts"]["indexed"],
            "recall_at_k": manifest["metrics"]["recall_at_k"]}
