"""Queries against a published model version: embed with the manifest's backbone, look up.

The in-process lookup reads the version's saved Spark model (random unit vectors and
bucketLength) and its hashed reference table, and answers like Spark's approximate nearest
neighbour search (candidates share a bucket in at least one table; exact distances among
them), in milliseconds and without a JVM. A version whose manifest records AND-amplified bands
(``lsh.keys_per_band`` > 1) or multi-probe (``lsh.probes`` > 0) is searched the same way as
``spark_jobs/query_lsh.py`` does: candidates share a band key with one of the query's probe
keys (:func:`imgsim.lsh.probe_keys`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import Layout
from imgsim.models import read_manifest, reading_version, version_dir

log = logging.getLogger(__name__)


class BackboneMismatch(RuntimeError):
    """The embedder at hand differs from the one the model version was built with."""


@dataclass(frozen=True)
class Neighbour:
    rank: int
    image_id: str
    path: str
    class_id: int | None
    class_name: str | None
    distance: float


@dataclass(frozen=True)
class Answer:
    neighbours: list[Neighbour]
    candidates: int            # references compared


@dataclass
class LoadedModel:
    version: str
    manifest: dict[str, Any]
    ids: list[str]
    vectors: np.ndarray        # (n, dim) float32, unit length
    hashes: np.ndarray         # (n, tables) int64
    meta: list[dict[str, Any]]  # path, class_id, class_name per row
    params: Any                # imgsim.lsh.BrpParams
    band_index: Any = None     # imgsim.lsh.BandIndex, built on the first banded lookup


def load_model(layout: Layout, version: str | None = None) -> LoadedModel:
    """Load a published version (default: CURRENT) for in-process lookups."""
    import pyarrow.parquet as pq

    from imgsim.lsh import load_brp_model

    manifest = read_manifest(layout, version)
    vdir = version_dir(layout, manifest["version"])
    with reading_version(layout, manifest["version"]):   # damage: VersionDamaged, not a traceback
        # Spark writes a CRC per Parquet page; checking them turns silent damage into a failed
        # read (and so a sha256 check), at the cost of a CRC32 over bytes read anyway.
        table = pq.read_table(vdir / manifest["files"]["reference"],
                              page_checksum_verification=True)
        n = table.num_rows
        vec = table.column("vector").combine_chunks()
        vectors = np.asarray(vec.flatten().to_numpy(zero_copy_only=False),
                             np.float32).reshape(n, -1)
        hashes = np.asarray(table.column("hashes").combine_chunks().flatten()
                            .to_numpy(zero_copy_only=False), np.int64).reshape(n, -1)
        meta = table.select(["path", "class_id", "class_name"]).to_pylist()
        params = load_brp_model(vdir / manifest["files"]["model"])
    return LoadedModel(manifest["version"], manifest, table.column("image_id").to_pylist(),
                       vectors, hashes, meta, params)


def lookup(model: LoadedModel, queries: np.ndarray, k: int) -> list[Answer]:
    """k nearest references per (raw) query vector, as the published LSH answers them."""
    from imgsim.lsh import (
        BandIndex,
        amplified_search,
        hash_vectors,
        l2_normalize,
        lsh_search,
        probe_keys,
    )

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = l2_normalize(np.atleast_2d(queries))
    if q.shape[1] != model.vectors.shape[1]:
        raise BackboneMismatch(f"query vectors have {q.shape[1]} dimensions, model "
                               f"{model.version} has {model.vectors.shape[1]}")
    keys_per_band, probes = banding(model.manifest)
    plain = keys_per_band == 1 and probes == 0
    qh = hash_vectors(model.params, q) if plain else probe_keys(model.params, q, keys_per_band,
                                                                 probes)
    if not plain and model.band_index is None:
        model.band_index = BandIndex.build(model.hashes, keys_per_band)
    answers = []
    for i in range(q.shape[0]):
        found = (lsh_search(q[i], qh[i], model.vectors, model.hashes, k) if plain
                 else amplified_search(q[i], qh[i], model.vectors, model.hashes, k,
                                       index=model.band_index))
        neighbours = [
            Neighbour(rank + 1, model.ids[j], model.meta[j]["path"], model.meta[j]["class_id"],
                      model.meta[j]["class_name"], float(d))
            for rank, (j, d) in enumerate(zip(found.indices, found.distances, strict=True))]
        answers.append(Answer(neighbours, found.candidates))
    return answers


def banding(manifest: dict[str, Any]) -> tuple[int, int]:
    """(keys_per_band, probes) of a version; older manifests: (1, 0), Spark's plain OR."""
    lsh = manifest.get("lsh", {})
    return int(lsh.get("keys_per_band") or 1), int(lsh.get("probes") or 0)


def load_query_backbone(manifest: dict[str, Any], *, weights_path: str = "",
                        device: str = "auto", cache_dir: Path | None = None) -> Any:
    """Build the backbone recorded in ``manifest`` and check it is exactly the same one.

    It runs on the runtime the manifest records (torch when it names none), whatever
    IMGSIM_RUNTIME says; ``cache_dir`` holds the ONNX files (default: the configured data
    root's ``cache/models``, where the index's embed tasks put them).
    """
    from imgsim.config import Settings
    from imgsim.embedding.backbones import comparable_spec, load_backbone, spec_runtime

    recorded = comparable_spec(manifest["backbone"])
    runtime = spec_runtime(recorded)
    if cache_dir is None and runtime != "torch":
        cache_dir = Settings.from_env().layout.model_cache
    backbone = load_backbone(recorded["name"], weights_path=weights_path,
                             device="cpu" if runtime != "torch" else device,
                             runtime=runtime, cache_dir=cache_dir)
    have = backbone.spec.as_dict()
    diffs = {k: (recorded.get(k), have[k]) for k in have if recorded.get(k) != have[k]}
    if diffs:
        raise BackboneMismatch(
            f"model {manifest['version']} was built with backbone {recorded}, but the backbone "
            f"loaded here differs in {sorted(diffs)}: {diffs}. Answers would be wrong; use the "
            "same weights file (IMGSIM_WEIGHTS) or query another version.")
    return backbone


def embed_files(backbone: Any, paths: list[Path], *, batch_size: int = 32,
                max_pixels: int = 90_000_000) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Embed files: ({path: vector}, {path: Rejected})."""
    from imgsim.embedding.infer import EmbedItem, Rejected, embed_items

    items = [EmbedItem(str(p), Path(p)) for p in paths]
    good: dict[str, np.ndarray] = {}
    bad: dict[str, Any] = {}
    for res in embed_items(items, backbone, batch_size=batch_size, max_pixels=max_pixels):
        if isinstance(res, Rejected):
            bad[res.key] = res
        else:
            good[res.key] = res.vector
    return good, bad
