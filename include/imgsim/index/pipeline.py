"""The index pipeline's task bodies: small typed functions that the DAG wraps and tests call.

Each takes plain values (paths, strings, numbers) and returns a small JSON-able dict, so it
runs the same from Airflow, from the CLI and from a test.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from imgsim.config import Layout, Settings
from imgsim.errors import PermanentError
from imgsim.fsutil import atomic_write_json, read_json, run_key

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")


class PipelineError(RuntimeError, PermanentError):
    pass


# -- permanent errors ---------------------------------------------------------------------------


def is_permanent(exc: BaseException, *, downloads_retried: bool = False) -> bool:
    """True for errors that no retry can fix (:mod:`imgsim.errors`): a bad URL, HTTP 404,
    wrong bytes, a bad archive, labels that do not fit, a bad setting, a damaged version.

    ``downloads_retried``: every download error is final, because the downloader has already
    retried its transient failures (retries happen at one level only).
    """
    from imgsim.errors import is_permanent as permanent

    return permanent(exc, retried=_retried(downloads_retried))


def fail_fast(*, downloads_retried: bool = False) -> contextlib.AbstractContextManager[None]:
    """For the index DAG's task bodies: :func:`imgsim.errors.fail_fast` (a permanent error
    fails the task at once, without retries); see :func:`is_permanent` for
    ``downloads_retried``."""
    from imgsim.errors import fail_fast as failing_fast

    return failing_fast(retried=_retried(downloads_retried))


def _retried(downloads_retried: bool) -> tuple[type[BaseException], ...]:
    """The error classes a lower level has retried already (the downloader's)."""
    from imgsim.sources.download import DownloadError

    return (DownloadError,) if downloads_retried else ()


@contextlib.contextmanager
def index_task(*, downloads_retried: bool = False) -> Iterator[None]:
    """The body of an imgsim_index task: :func:`fail_fast`, and the run's lease heartbeat
    renewed while it runs (:func:`imgsim.versions.runlease.keep_alive`), so that another
    deployment sharing the data root never takes a live run's lease over."""
    from airflow.sdk import get_current_context

    from imgsim.versions.runlease import deployment_id, keep_alive

    settings = Settings.from_env()
    run_id = str(get_current_context()["run_id"])
    me = deployment_id(settings.deployment_id)
    with (
        fail_fast(downloads_retried=downloads_retried),
        keep_alive(settings.layout, run_id, me, every_s=settings.lease_ttl_s / 6),
    ):
        yield


class SourceError(PipelineError):
    """A source cannot be used as given (permanent)."""


# -- download / extract -------------------------------------------------------------------------

ARCHIVE_HELP = (
    "Get Stanford Cars' car_ims.tgz (md5 d5c8f0aa497503f355e17dc7886c3f14) and cars_annos.mat "
    "(md5 b407c6086d669747186bd1d764ff9dbc) from a mirror, or download and unzip the Kaggle "
    'copy ("stanford-cars-dataset"), then point imgsim at it: IMGSIM_ARCHIVE_URL (Param '
    "archive_url) takes URLs, file:// URLs, paths to an archive or a folder that holds the "
    "images, several separated by spaces (so write a space inside a URL as %20), tried in "
    "order; IMGSIM_ARCHIVE_CHECKSUM takes "
    'md5:<hex> or sha256:<hex>. See README, "Indexing the real dataset".'
)
LABELS_HELP = (
    "Point IMGSIM_LABELS_URL (Param labels_url) at cars_annos.mat or at a CSV with the columns "
    "Class and image that names these images (e.g. the Kaggle CSV), and IMGSIM_CLASS_NAMES_URL "
    'at cars_meta.mat or names.csv for class names. See README, "Indexing the real dataset".'
)


def download_sources(
    settings: Settings,
    archive_url: str | Sequence[str],
    labels_url: str | Sequence[str],
    archive_checksum: str = "",
    labels_checksum: str = "",
    class_names_url: str | Sequence[str] = "",
) -> dict[str, Any]:
    """Fetch the archive, the labels and the optional class names into ``raw/``.

    Each ``*_url`` is a list of locations (or one string of them separated by whitespace),
    tried in order until one gives the right bytes (``*_checksum``: ``md5:<hex>``,
    ``sha256:<hex>`` or a bare sha256). The archive may also be a local folder that already
    holds the images. No-op for files already current. Raises ``SourceUnavailable`` naming
    every location tried when none works.
    """
    from imgsim.sources.download import fetch_first

    raw = settings.layout.raw
    common = {"timeout_s": settings.download_timeout_s, "retries": settings.download_retries}
    out: dict[str, Any] = {}
    for name, what, urls, digest, help_text, folders in (
        ("archive", "image archive", archive_url, archive_checksum, ARCHIVE_HELP, True),
        ("labels", "labels file", labels_url, labels_checksum, LABELS_HELP, False),
        ("class_names", "class-names file", class_names_url, "", LABELS_HELP, False),
    ):
        if name == "class_names" and not _locations(urls):
            urls = names_beside(out["labels"]["url"])
            if not urls:
                log.info(
                    "class names: none given (IMGSIM_CLASS_NAMES_URL) and no %s beside the "
                    "labels: the pages will name classes by number",
                    " or ".join(NAMES_BESIDE_LABELS),
                )
                out[name] = None
                continue
            log.info("class names: %s, found beside the labels", urls[0])
        if not _locations(urls):
            raise SourceError(
                f"no {what} location given (Param {name}_url or "
                f"IMGSIM_{name.upper()}_URL). {help_text}"
            )
        res = fetch_first(
            _locations(urls),
            raw,
            what=what,
            checksum=digest,
            allow_folders=folders,
            help_text=help_text,
            **common,
        )
        log.info(
            "%s: %s (%s%s, from %s)",
            name,
            res.path,
            "a folder of images"
            if res.kind == "folder"
            else f"{res.size} bytes, sha256 {res.sha256}",
            ""
            if res.kind == "folder"
            else (", downloaded" if res.downloaded else ", already current"),
            res.url,
        )
        out[name] = {
            "path": str(res.path),
            "sha256": res.sha256,
            "md5": res.md5,
            "size": res.size,
            "downloaded": res.downloaded,
            "kind": res.kind,
            "url": res.url,
            "failed_locations": list(res.tried),
        }
    return out


#: Class-name files looked for in the labels' folder when none is given (Stanford's own
#: cars_meta.mat first; the names CSVs that copies of the dataset carry).
NAMES_BESIDE_LABELS = ("cars_meta.mat", "class_names.csv", "names.csv")


def names_beside(labels_location: str) -> list[str]:
    """The class-names file beside a local labels file (``cars_meta.mat`` beside
    ``cars_annos.mat`` or the Kaggle CSV), as a one-item location list; [] when the labels are
    not local or nothing is there (remote folders are not probed: a guess is not a request)."""
    from imgsim.sources.download import local_path

    labels = local_path(labels_location)
    if labels is None or not labels.is_file():
        return []
    for name in NAMES_BESIDE_LABELS:
        if (labels.parent / name).is_file():
            return [str(labels.parent / name)]
    return []


def _locations(urls: str | Sequence[str] | None) -> list[str]:
    from imgsim.sources.download import split_locations

    return split_locations(urls or "")


def archive_folder_name(archive: Path) -> str:
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or "archive"
    return archive.stem or "archive"


def extract(
    settings: Settings, archive_path: str, archive_sha256: str = "", kind: str = "file"
) -> dict[str, Any]:
    """Safely extract the archive into ``images/<archive name>/`` (no-op when done before).

    ``archive_sha256`` is the digest the download step computed, so the archive is not read
    twice. A ``kind="folder"`` source is not extracted: ``images/<folder name>`` becomes a
    link to it, and its images are read in place.
    """
    from imgsim.sources.archive import safe_extract

    archive = Path(archive_path)
    if kind == "folder":
        link = link_folder(settings.layout, archive)
        log.info("using the images in %s in place, through %s", archive, link)
        return {"root": str(link), "files": None, "extracted": False}
    target = settings.layout.images / archive_folder_name(archive)
    res = safe_extract(archive, target, archive_sha256=archive_sha256)
    log.info(
        "extract %s -> %s: %d files, %d bytes (%s)",
        archive,
        target,
        res.files,
        res.total_bytes,
        "extracted" if res.extracted else "already extracted",
    )
    return {"root": str(res.target), "files": res.files, "extracted": res.extracted}


def link_folder(layout: Layout, folder: Path) -> Path:
    """``images/<folder name>``: a link to ``folder`` (made or repointed atomically)."""
    import os
    import secrets

    folder = Path(folder).resolve()
    link = layout.images / folder.name
    if link.is_symlink():
        if Path(os.readlink(link)) == folder:
            return link
    elif link.exists():
        raise SourceError(
            f"{link} already exists and is not a link: cannot use the folder "
            f"{folder} under that name; move one of them"
        )
    layout.images.mkdir(parents=True, exist_ok=True)
    tmp = layout.images / f".tmp-link-{folder.name}-{secrets.token_hex(6)}"
    os.symlink(folder, tmp, target_is_directory=True)
    os.replace(tmp, link)
    return link


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


def resolve_embedder(
    settings: Settings, backbone: str, embedder: str | None = None
) -> dict[str, Any]:
    """The backbone name this run embeds with: ``backbone`` itself, or the trained embedder
    ``<backbone>@<version>`` that ``embedder`` (default IMGSIM_EMBEDDER) names.

    ``current``: the data root's CURRENT embedder when it was trained on ``backbone``; none, one
    trained on another backbone, or a damaged one (said in the result and the log) mean the
    frozen backbone. ``frozen``: the backbone as it is. A version: that one, which must be
    published and intact (else :class:`imgsim.versions.embedders.EmbedderNotFound` or
    ``EmbedderDamaged``, permanent errors)."""
    from imgsim.embedding.trained import base_of, trained_name
    from imgsim.versions.embedders import EmbedderDamaged, current_embedder, read_embedder

    choice = embedder if embedder is not None else settings.embedder
    layout = settings.layout
    base = base_of(backbone)
    if choice == "frozen":
        return {"backbone": base, "embedder": None, "reason": "the frozen backbone (asked for)"}
    version = current_embedder(layout) if choice == "current" else choice
    if version is None:
        return {"backbone": base, "embedder": None, "reason": "no trained embedder published"}
    try:
        manifest = read_embedder(layout, version, hashes=True)  # a few MB: cheap, once a run
    except EmbedderDamaged as exc:
        if choice != "current":
            raise
        log.warning("the CURRENT embedder cannot be used, embedding with %s: %s", base, exc)
        return {"backbone": base, "embedder": None, "reason": f"CURRENT embedder damaged: {exc}"}
    trained_base = manifest["base"]["name"]
    if trained_base != base:
        if choice != "current":
            raise PipelineError(
                f"embedder {version} was trained on {trained_base}, not on the backbone "
                f"{base} this run embeds with; set the backbone to {trained_base}"
            )
        return {
            "backbone": base,
            "embedder": None,
            "reason": f"the CURRENT embedder {version} was trained on {trained_base}, not {base}",
        }
    how = "CURRENT" if choice == "current" else "asked for"
    return {
        "backbone": trained_name(base, version),
        "embedder": version,
        "reason": f"trained embedder {version} ({how})",
    }


def catalog(
    settings: Settings,
    image_root: str,
    labels_path: str,
    run_date: str,
    run_id: str,
    backbone: str,
    full_rebuild: bool = False,
    class_names_path: str | None = None,
    min_label_coverage: float | None = None,
    embedder: str | None = None,
) -> dict[str, Any]:
    """Update the catalog from the archive and ``incoming/<run_date>/``; save what to embed.

    The labels must match at least ``min_label_coverage`` (default: the setting) of the
    archive's images, else ``LabelCoverageError`` and nothing is written. Class names missing
    from the labels file come from ``class_names_path``. The result holds
    ``label_coverage`` (all live images) and ``archive_label_coverage``, and ``backbone``: the
    backbone or trained embedder (:func:`resolve_embedder`) the rest of the run embeds and fits
    with. A new embedder has no vectors in its store yet, so every live image is to embed.
    """
    from imgsim.catalog import Source, check_label_coverage, incoming_source, update_catalog
    from imgsim.sources.labels import (
        find_images,
        match_labels,
        read_class_names,
        read_labels,
        with_class_names,
    )

    layout = settings.layout
    chosen = resolve_embedder(settings, backbone, embedder)
    backbone = chosen["backbone"]
    log.info("embedding with %s: %s", backbone, chosen["reason"])
    labels = read_labels(Path(labels_path))
    if class_names_path:
        labels = with_class_names(labels, read_class_names(Path(class_names_path)))
    root = Path(image_root)
    minimum = settings.min_label_coverage if min_label_coverage is None else min_label_coverage
    archive_coverage = check_label_coverage(
        match_labels(root, find_images(root), labels), float(minimum), str(labels_path), str(root)
    )
    sources = [Source(f"archive:{root.name}", root, labels)]
    daily = incoming_source(layout, run_date)
    if daily is not None:
        sources.append(daily)
    else:
        log.info("no drop folder %s for this run", layout.incoming_day(run_date))
    diff = update_catalog(
        layout,
        sources,
        run_date,
        backbone,
        full_rebuild=full_rebuild,
        max_image_pixels=settings.max_image_pixels,
    )
    todo = layout.runs / run_key(run_id) / "to_embed.json"
    atomic_write_json(todo, diff.to_embed)
    log.info(
        "label coverage: %d of %d live images labelled (%.0f%%, %d classes); archive: %s",
        diff.label_coverage["labelled_images"],
        diff.label_coverage["images"],
        100 * diff.label_coverage["share"],
        diff.label_coverage["classes"],
        archive_coverage,
    )
    if diff.to_embed and len(diff.to_embed) == diff.label_coverage["images"] and chosen["embedder"]:
        log.info(
            "every live image (%d) is embedded with %s: its store is new",
            len(diff.to_embed),
            backbone,
        )
    return {
        **diff.summary(),
        "label_coverage": diff.label_coverage,
        "archive_label_coverage": archive_coverage,
        "to_embed_file": str(todo),
        "backbone": backbone,
        "embedder": chosen,
    }


def plan_shards(
    settings: Settings, to_embed_file: str, run_id: str, backbone: str | None = None
) -> list[dict[str, Any]]:
    """Split the images to embed into shard files; one mapped embed task per shard (each
    names ``backbone``, the one catalog chose, when given)."""
    todo: list[dict[str, str]] = read_json(to_embed_file)
    key = run_key(run_id)
    shard_dir = settings.layout.runs / key / "shards"
    size = settings.shard_size
    shards = []
    for i, start in enumerate(range(0, len(todo), size)):
        spec = shard_dir / f"shard-{i:05d}.json"
        atomic_write_json(spec, {"run_key": key, "shard": i, "items": todo[start : start + size]})
        shards.append(
            {
                "spec": str(spec),
                "shard": i,
                "images": len(todo[start : start + size]),
                **({"backbone": backbone} if backbone else {}),
            }
        )
    log.info("%d images to embed in %d shard(s) of at most %d", len(todo), len(shards), size)
    return shards


# -- embed --------------------------------------------------------------------------------------


def backbone_record(layout: Layout, name: str) -> dict[str, Any] | None:
    """What the store of backbone ``name`` was built with (its BACKBONE.json), if anything."""
    record = layout.backbone_record(name)
    return read_json(record) if record.exists() else None


def embed_runtime(settings: Settings, name: str) -> str:
    """IMGSIM_RUNTIME made concrete for the store of ``name`` (``auto``: the store's own)."""
    from imgsim.embedding.backbones import resolve_runtime

    return resolve_runtime(
        settings.runtime, settings.device, backbone_record(settings.layout, name)
    )


def check_backbone_record(layout: Layout, spec: dict[str, Any]) -> None:
    """The store of a backbone holds vectors of one weights file and runtime; record or compare.

    A record without a runtime was written before runtimes existed: it means ``torch``.
    """
    from imgsim.embedding.backbones import comparable_spec

    record = layout.backbone_record(spec["name"])
    if not record.exists():
        atomic_write_json(record, spec)
        return
    stored = read_json(record)
    if comparable_spec(stored) != comparable_spec(spec):
        raise PipelineError(
            f"{record} says the store was built with {stored}, but this run loads {spec}. "
            f"Vectors from different weights, preprocessing or runtime (IMGSIM_RUNTIME) must "
            f"not be mixed: use the store's runtime, or move {record.parent} aside to rebuild "
            f"it."
        )


def embed_shard(settings: Settings, spec_path: str, backbone_name: str) -> dict[str, Any]:
    """Embed one shard: decode, resize, batched inference, one Parquet file; quarantine bad."""
    from imgsim.embedding.backbones import load_backbone
    from imgsim.embedding.infer import EmbedItem, Rejected, configure_threads, embed_items
    from imgsim.store import set_aside

    layout = settings.layout
    spec = read_json(spec_path)
    configure_threads(settings.num_threads)
    backbone = load_backbone(
        backbone_name,
        weights_path=settings.weights_path,
        device=settings.device,
        runtime=embed_runtime(settings, backbone_name),
        cache_dir=settings.model_cache,
        embedders=layout.embedders,
    )
    check_backbone_record(layout, backbone.spec.as_dict())
    items = [
        EmbedItem(it["image_id"], layout.root / it["path"], layout.thumbs / f"{it['image_id']}.jpg")
        for it in spec["items"]
    ]
    good: list[tuple[str, Any]] = []
    rejected: dict[str, int] = {}
    for res in embed_items(
        items, backbone, batch_size=settings.batch_size, max_pixels=settings.max_image_pixels
    ):
        if isinstance(res, Rejected):
            key = set_aside(layout, res, spec["run_key"], settings.max_image_pixels)
            rejected[key] = rejected.get(key, 0) + 1
        else:
            good.append((res.key, res.vector))
    return finish_shard(
        layout,
        spec_path,
        backbone_name,
        spec["run_key"],
        spec["shard"],
        good,
        rejected,
        backbone.spec.dim,
    )


def shard_result_path(spec_path: str | Path) -> Path:
    """Where an embedded shard's result is recorded: ``runs/<run>/embedded/shard-NNNNN.json``."""
    spec = Path(spec_path)
    return spec.parent.parent / "embedded" / spec.name


def finish_shard(
    layout: Layout,
    spec_path: str | Path,
    backbone_name: str,
    run_key: str,
    shard: int,
    good: list[tuple[str, Any]],
    rejected: dict[str, int],
    dim: int,
) -> dict[str, Any]:
    """Write one shard's Parquet file, then its result record (both engines end here).

    ``rejected``: reason -> count of the images set aside (:func:`imgsim.store.set_aside`);
    ``retry:<reason>`` ones were not quarantined (``retry_later``: the next run tries them)."""
    from imgsim.store import RETRY_PREFIX, release_from_quarantine, write_shard

    path = write_shard(layout, backbone_name, run_key, shard, good, dim)
    release_from_quarantine(layout, (iid for iid, _ in good))
    retry = {
        r.removeprefix(RETRY_PREFIX): n for r, n in rejected.items() if r.startswith(RETRY_PREFIX)
    }
    quarantined = {r: n for r, n in rejected.items() if not r.startswith(RETRY_PREFIX)}
    log.info(
        "shard %s: %d embedded, %d quarantined %s, %d to retry later %s -> %s",
        shard,
        len(good),
        sum(quarantined.values()),
        quarantined,
        sum(retry.values()),
        retry,
        path,
    )
    result = {
        "shard": shard,
        "embedded": len(good),
        "quarantined": dict(sorted(quarantined.items())),
        "retry_later": dict(sorted(retry.items())),
        "file": str(path),
    }
    atomic_write_json(shard_result_path(spec_path), result)
    return result


def embed_route(
    settings: Settings, engine: str, shards: list[dict[str, Any]], run_id: str, backbone: str
) -> tuple[str, str]:
    """(route, Spark job file): route ``none`` (nothing to embed), ``tasks`` or ``spark``.

    For ``spark`` the job's input is written first: ``runs/<run>/spark_embed.json``.
    """
    from imgsim.config import check_setting

    engine = check_setting(
        "embed_engine", engine, "embed engine (Param embed_engine or IMGSIM_EMBED_ENGINE)"
    )
    if not shards:
        log.info("nothing to embed: no shard for the %s engine", engine)
        return "none", ""
    if engine == "tasks":
        return "tasks", ""
    return "spark", str(write_spark_embed_job(settings, shards, run_id, backbone))


def write_spark_embed_job(
    settings: Settings, shards: list[dict[str, Any]], run_id: str, backbone: str
) -> Path:
    """Write what ``spark_jobs/embed_images.py --job FILE`` embeds, and with which settings."""
    from dataclasses import asdict, replace

    from imgsim.index.spark_embed import EmbedJob

    job = EmbedJob.of(settings, backbone, run_key(run_id), [str(s["spec"]) for s in shards])
    job = replace(job, runtime=embed_runtime(settings, backbone))  # auto: the store's runtime
    path = settings.layout.runs / run_key(run_id) / "spark_embed.json"
    atomic_write_json(path, asdict(job))
    log.info(
        "Spark embedding job: %d shard(s), %d images -> %s",
        len(shards),
        sum(int(s["images"]) for s in shards),
        path,
    )
    return path


def embed_summary(shards: list[dict[str, Any]], engine: str) -> dict[str, Any]:
    """Totals over the shards' result records; the same for both engines.

    Fails, naming the shard, when a planned shard has no result, when its file is missing,
    or when its counts do not add up to the images planned for it.
    """
    embedded, images, retry_later = 0, 0, 0
    reasons: dict[str, int] = {}
    files: list[str] = []
    for shard in shards:
        path = shard_result_path(shard["spec"])
        if not path.exists():
            raise PipelineError(
                f"shard {shard['shard']} ({shard['spec']}) has no result at "
                f"{path}: the {engine} engine did not finish it"
            )
        result = read_json(path)
        quarantined = sum(result["quarantined"].values())
        later = sum((result.get("retry_later") or {}).values())
        retry_later += later
        if result["embedded"] + quarantined + later != shard["images"]:
            raise PipelineError(
                f"shard {shard['shard']}: {result['embedded']} embedded + "
                f"{quarantined} quarantined + {later} to retry != {shard['images']} planned "
                f"({path})"
            )
        if not Path(result["file"]).exists():
            raise PipelineError(f"shard {shard['shard']}: {result['file']} is missing")
        embedded += result["embedded"]
        images += shard["images"]
        files.append(Path(result["file"]).name)
        for reason, n in result["quarantined"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    summary = {
        "engine": engine,
        "shards": len(shards),
        "images": images,
        "embedded": embedded,
        "quarantined": dict(sorted(reasons.items())),
        "quarantined_total": sum(reasons.values()),
        "retry_later": retry_later,
        "files": files,
    }
    log.info(
        "embedded with %s: %d shard(s), %d of %d images, quarantined %s",
        engine,
        len(shards),
        embedded,
        images,
        summary["quarantined"] or "none",
    )
    return summary


# -- fit gate / validate / publish ----------------------------------------------------------------


def fit_settings(
    settings: Settings, num_hash_tables: int, bucket_length: float, projection: str
) -> dict[str, Any]:
    """Every setting that shapes a fitted version; a change of any of them refits."""
    from imgsim.config import check_setting

    return {
        "num_hash_tables": int(num_hash_tables),
        "bucket_length": float(bucket_length),
        "seed": settings.lsh_seed,
        "validation_sample": settings.validation_sample,
        "target_recall": settings.target_recall,
        "projection": check_setting(
            "projection", projection, "projection (Param projection or IMGSIM_PROJECTION)"
        ),
        "projection_min_coverage": settings.projection_min_coverage,
        "graph_k": settings.graph_k,
        "graph_bucket_cap": settings.graph_bucket_cap,
        "duplicate_distance": settings.duplicate_distance,
        "duplicate_verifier": settings.duplicate_verifier,
        "duplicate_min_inliers": settings.duplicate_min_inliers,
        "scan_below": settings.scan_below,
        "map_points": settings.map_points,
    }


def fit_plan(
    settings: Settings,
    backbone: str,
    num_hash_tables: int,
    bucket_length: float,
    full_rebuild: bool = False,
    embedded: dict[str, Any] | None = None,
    projection: str | None = None,
    run_id: str = "manual",
) -> dict[str, Any]:
    """Decide whether a new version is needed; if so, name it.

    ``embedded`` is this run's embed summary (:func:`embed_summary`, either engine); a plan
    carries it on to the later tasks.

    A refit is needed when the set of live, embedded images or their labels differ from the
    CURRENT model's snapshot, when the backbone's recorded spec (weights, preprocessing,
    runtime) differs from the one the store's vectors were made with, when any fit setting
    (:func:`fit_settings`) differs, or when a full rebuild is asked for. Returns ``{}`` (falsy:
    skip the projection, fit, validate and publish) when nothing changed.
    """
    from imgsim.catalog import live_rows
    from imgsim.store import embedded_ids, labels_fingerprint, snapshot_fingerprint
    from imgsim.versions.models import base_version, new_version

    layout = settings.layout
    rows = live_rows(layout)
    indexed = {r["image_id"] for r in rows} & embedded_ids(layout, backbone)
    if not indexed:
        raise PipelineError(
            f"no live image has a {backbone} embedding under "
            f"{layout.embeddings(backbone)}: nothing to index"
        )
    fingerprint = snapshot_fingerprint(indexed)
    labels = labels_fingerprint(
        (r["image_id"], r["class_id"]) for r in rows if r["image_id"] in indexed
    )
    wanted = fit_settings(
        settings, num_hash_tables, bucket_length, projection or settings.projection
    )
    advised = embedder_projection(layout, backbone)
    if wanted["projection"] == "auto" and advised == "none":
        log.info(
            "projection auto -> none: LDA on %s's vectors did not raise its held-out hit@1 "
            "(measured when it was trained)",
            backbone,
        )
        wanted["projection"] = "none"
    record = layout.backbone_record(backbone)
    spec = read_json(record) if record.exists() else {"name": backbone}
    version = new_version()
    plan = {
        "version": version,
        "data_root": str(layout.root),
        "backbone": backbone,
        "expected_count": len(indexed),
        "fingerprint": fingerprint,
        "labels_fingerprint": labels,
        **wanted,
        "projection_dir": str(layout.runs / run_key(run_id) / "projection" / version),
        "embedded": embedded or {},
    }
    base = base_version(layout, None)
    if base == "no published version":
        log.info("no current model: fitting %s", version)
        return {**plan, "base": "none", "base_reason": "no published version"}
    if isinstance(base, str):
        why = f"CURRENT cannot be built on: {base}"
        log.warning("%s; building %s in full (nothing of it is reused)", why, version)
        return {**plan, "base": "none", "base_reason": why, "refit_because": [why]}
    current = base.manifest
    changed = refit_reasons(current, fingerprint, labels, spec, wanted)
    if not changed and not full_rebuild:
        log.info("nothing changed since %s (%d images): no refit", current["version"], len(indexed))
        return {}
    log.info(
        "fitting %s: %s",
        version,
        "full rebuild asked for" if full_rebuild and not changed else "; ".join(changed),
    )
    if full_rebuild:
        return {
            **plan,
            "base": "none",
            "base_reason": "a full rebuild was asked for",
            "refit_because": [*changed, "full rebuild"],
        }
    return {
        **plan,
        "base": base.version,
        "base_reason": f"builds on CURRENT {base.version} (checked whole)",
        "refit_because": changed,
    }


def embedder_projection(layout: Layout, backbone: str) -> str | None:
    """The projection a trained embedder was measured best with (``lda`` or ``none``); None
    for a frozen backbone."""
    from imgsim.embedding.trained import parse_trained_name
    from imgsim.versions.embedders import read_embedder

    parsed = parse_trained_name(backbone)
    if parsed is None:
        return None
    return str(read_embedder(layout, parsed.version).get("projection") or "lda")


def refit_reasons(
    current: dict[str, Any],
    fingerprint: str,
    labels: str,
    backbone_spec: dict[str, Any],
    wanted: dict[str, Any],
) -> list[str]:
    """Why CURRENT no longer describes the store and the settings (empty: it still does)."""
    from imgsim.embedding.backbones import comparable_spec

    reasons = []
    if current["snapshot"]["fingerprint"] != fingerprint:
        reasons.append("the set of indexed images changed")
    if current["snapshot"].get("labels_fingerprint") != labels:
        reasons.append("labels changed (or CURRENT does not record them)")
    if comparable_spec(current.get("backbone", {})) != comparable_spec(backbone_spec):
        reasons.append(f"backbone {current.get('backbone')} -> {backbone_spec}")
    recorded = current.get("fit_settings") or {}
    for key, value in wanted.items():
        if recorded.get(key) != value:
            reasons.append(f"{key} {recorded.get(key)!r} -> {value!r}")
    return reasons


def fit_job_args(plan: dict[str, Any], run_id: str) -> list[str]:
    """``spark_jobs/fit_lsh.py``'s arguments for a plan (the DAG templates the same ones)."""
    from imgsim.sparktasks import FIT_PLAN_ARGS

    args = [part for flag, key in FIT_PLAN_ARGS.items() for part in (flag, str(plan[key]))]
    return [*args, "--run-id", run_id]


def submit_fit(plan: dict[str, Any], run_id: str, master: str = "local[*]") -> None:
    """The fit job run outside Airflow (``imgsim evaluate``, the benchmarks): ``spark-submit``
    with the DAG task's arguments and configuration, in the embedded environment."""
    import subprocess

    from imgsim.config import PROJECT_ROOT
    from imgsim.envsetup import embedded_environment, venv_bin
    from imgsim.sparktasks import BASE_CONF, FIT_CONF

    conf = [
        part
        for key, value in {**BASE_CONF, **FIT_CONF}.items()
        for part in ("--conf", f"{key}={value}")
    ]
    cmd = [
        str(venv_bin() / "spark-submit"),
        "--master",
        master,
        *conf,
        "--name",
        "imgsim-fit-lsh",
        str(PROJECT_ROOT / "spark_jobs" / "fit_lsh.py"),
        *fit_job_args(plan, run_id),
    ]
    proc = subprocess.run(cmd, env=embedded_environment(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"fit_lsh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def reusable_projection(settings: Settings, plan: dict[str, Any]) -> dict[str, Any] | str:
    """CURRENT's projection entry, with its ``reuse`` record updated, where this run may keep
    it (IMGSIM_PROJECTION_REFRESH): the same projection settings and backbone, no kept
    reference relabelled, no class new to it, and the references added or gone since it was
    learned at most that share of the ones it was learned on. Else why it is learned anew.

    A kept projection keeps the search space, so the fit job can update CURRENT's exact
    neighbour graph instead of rescanning (imgsim.jobs.fit_lsh.previous_graph)."""
    import pyarrow.parquet as pq

    from imgsim.catalog import live_rows
    from imgsim.store import embedded_ids
    from imgsim.versions.models import base_version

    refresh = settings.projection_refresh
    if refresh <= 0:
        return "IMGSIM_PROJECTION_REFRESH is 0: learned anew every run"
    layout = settings.layout
    if plan.get("base", "") == "none":
        return str(plan.get("base_reason") or "the run has no base version")
    base = base_version(layout, plan.get("base") or None, reuse=("projection", "reference"))
    if isinstance(base, str):
        return base
    current, version, where = base.manifest, base.version, base.dir
    entry = dict(current.get("projection") or {})
    if entry.get("kind", "none") == "none" or not entry.get("file"):
        return f"CURRENT ({version}) has no learned projection"
    before = current.get("fit_settings") or {}
    for key in ("projection", "projection_min_coverage", "seed"):
        if before.get(key) != plan.get(key):
            return f"the projection settings changed since {version} ({key})"
    record = layout.backbone_record(plan["backbone"])
    if current.get("backbone") != (read_json(record) if record.exists() else None):
        return f"the backbone changed since {version}"
    if "full rebuild" in plan.get("refit_because", []):
        return "a full rebuild was asked for"
    if not (where / entry["file"]).is_file():
        return f"CURRENT's projection file ({version}) is missing"
    try:
        ref = pq.read_table(where / current["files"]["reference"], columns=["image_id", "class_id"])
    except (OSError, ValueError) as exc:  # pyarrow's errors are ValueErrors or OSErrors
        return f"CURRENT's reference table ({version}) cannot be read: {exc}"
    old = dict(zip(*ref.to_pydict().values(), strict=True))
    rows = live_rows(layout)
    indexed = {r["image_id"] for r in rows} & embedded_ids(layout, plan["backbone"])
    now = {r["image_id"]: r["class_id"] for r in rows if r["image_id"] in indexed}
    relabelled = sum(1 for i, c in now.items() if i in old and old[i] != c)
    if relabelled:
        return f"{relabelled} references were relabelled since {version}"
    classes = {c for c in old.values() if c is not None}
    fresh = {c for i, c in now.items() if i not in old and c is not None} - classes
    if fresh:
        return f"{len(fresh)} classes new since {version}"
    reuse = dict(entry.get("reuse") or {})
    learned_on = int(reuse.get("learned_on", len(old)))
    changed = int(reuse.get("changed", 0)) + len(now.keys() - old.keys()) + len(old.keys() - now)
    if changed > refresh * learned_on:
        return (
            f"{changed} references added or gone since it was learned on {learned_on}: more "
            f"than IMGSIM_PROJECTION_REFRESH {refresh:g} of them"
        )
    entry["reuse"] = {
        "from": reuse.get("from", version),
        "previous": version,
        "learned_on": learned_on,
        "changed": changed,
        "refresh": refresh,
    }
    entry["source"] = where / entry["file"]
    return entry


def learn_projection(settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    """Learn the plan's projection from the live references (:mod:`imgsim.ann.projection`),
    or keep CURRENT's where the change since it was learned is small
    (:func:`reusable_projection`).

    Engine ``local`` (the default up to IMGSIM_PROJECTION_LOCAL_MAX references) computes the
    statistics here from the store, chunk by chunk; ``spark`` submits
    ``spark_jobs/learn_projection.py`` to ``spark_default``, which computes them on the
    executors. Both write ``projection.json`` (+ ``projection.npz``) into the plan's
    ``projection_dir``, which the fit job puts into the version.
    """
    import shutil
    import time

    from imgsim.ann.projection import CHOICE_FILE, MATRIX_FILE, read_choice

    t0 = time.perf_counter()
    out = Path(plan["projection_dir"])
    kept = reusable_projection(settings, plan)
    if isinstance(kept, dict):
        engine = "kept"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept.pop("source"), out / f".{MATRIX_FILE}.tmp")
        (out / f".{MATRIX_FILE}.tmp").replace(out / MATRIX_FILE)
        kept.pop("file", None)  # read_choice names the copy; its sha256 still holds
        atomic_write_json(out / CHOICE_FILE, kept)
    else:
        log.info("projection learned anew: %s", kept)
        engine = settings.projection_engine
        if engine == "auto":
            engine = "local" if plan["expected_count"] <= settings.projection_local_max else "spark"
        if engine == "local":
            _learn_projection_local(settings, plan, out)
        else:
            _learn_projection_spark(plan, out)
    entry, _ = read_choice(out)
    summary = {
        "kind": entry["kind"],
        "dims": entry["dims"],
        "reason": entry.get("reason"),
        "coverage": entry.get("coverage"),
        "engine": engine,
        "kept": entry.get("reuse") if engine == "kept" else None,
        "learned_anew_because": None if engine == "kept" else kept,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "projection: %s (%s -> %s dims) by %s in %.1f s: %s",
        entry["kind"],
        entry["dim"],
        entry["dims"],
        engine,
        summary["seconds"],
        entry.get("reason"),
    )
    return summary


def _learn_projection_local(settings: Settings, plan: dict[str, Any], out: Path) -> None:
    import numpy as np
    from threadpoolctl import threadpool_limits

    from imgsim.ann.projection import (
        CV_SAMPLE,
        Stats,
        choose,
        holdout_tuning,
        stats_from_arrays,
        write_choice,
    )
    from imgsim.catalog import live_rows
    from imgsim.store import load_vectors

    layout = settings.layout
    classes = {r["image_id"]: r["class_id"] for r in live_rows(layout)}
    ids, x = load_vectors(layout, plan["backbone"], ids=set(classes))
    if not ids:
        raise PipelineError("no live image has an embedding: nothing to learn a projection from")
    y = np.array([-1 if classes[i] is None else int(classes[i]) for i in ids], np.int64)
    stats = Stats(x.shape[1])
    for start in range(0, len(ids), 20_000):
        stats = stats.merge(stats_from_arrays(x[start : start + 20_000], y[start : start + 20_000]))
    rng = np.random.default_rng(plan["seed"])
    labelled = np.flatnonzero(y >= 0)
    if labelled.size > CV_SAMPLE:
        labelled = np.sort(rng.choice(labelled, CV_SAMPLE, replace=False))
    choice = choose(
        stats,
        plan["projection"],
        cv_vectors=x[labelled] if labelled.size else None,
        cv_labels=y[labelled] if labelled.size else None,
        seed=plan["seed"],
        min_coverage=plan["projection_min_coverage"],
    )
    # Held-out LSH tuning for a map learned from labels (whitening has no labels to hold
    # out by; the fit job tunes it), on the same sample as the Spark engine's.
    tuning = None
    if choice.projection.kind == "lda":
        with threadpool_limits(limits=1, user_api="blas"):
            tuning = holdout_tuning(
                choice, x[labelled], y[labelled], target=plan["target_recall"], seed=plan["seed"]
            )
    write_choice(choice, out, tuning)


def _learn_projection_spark(plan: dict[str, Any], out: Path) -> None:
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    from imgsim.sparktasks import BASE_CONF, SPARK_JOBS

    hook = SparkSubmitHook(
        conn_id="spark_default",
        name="imgsim-learn-projection",
        conf=dict(BASE_CONF),
        application_args=[
            "--data-root",
            plan["data_root"],
            "--backbone",
            plan["backbone"],
            "--out",
            str(out),
            "--kind",
            plan["projection"],
            "--min-coverage",
            str(plan["projection_min_coverage"]),
            "--seed",
            str(plan["seed"]),
            "--target-recall",
            str(plan["target_recall"]),
        ],
    )
    hook.submit(str(SPARK_JOBS / "learn_projection.py"))


def validate(settings: Settings, plan: dict[str, Any]) -> dict[str, Any]:
    from imgsim.versions.models import validate_staged

    report = validate_staged(
        settings.layout,
        plan["version"],
        expected_count=plan["expected_count"],
        expected_fingerprint=plan["fingerprint"],
        expected_labels_fingerprint=plan.get("labels_fingerprint"),
        backbone=plan["backbone"],
        recall_floor=settings.recall_floor,
    )
    return report.as_dict()


def publish(settings: Settings, version: str, run_id: str | None = None) -> dict[str, Any]:
    """Make ``version`` current. With ``run_id``, only while that run holds the index lease."""
    from imgsim.versions.models import clean_staging, publish, read_manifest
    from imgsim.versions.runlease import deployment_id, ensure_held

    if run_id is not None:
        ensure_held(settings.layout, run_id, deployment=deployment_id(settings.deployment_id))
    publish(settings.layout, version, keep=settings.keep_versions)
    clean_staging(settings.layout)
    manifest = read_manifest(settings.layout, version)
    return {
        "version": version,
        "indexed": manifest["counts"]["indexed"],
        "recall_at_k": manifest["metrics"]["recall_at_k"],
    }
