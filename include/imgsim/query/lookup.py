"""Queries against a published model version: embed with the manifest's backbone, look up.

The in-process lookup reads the version's saved Spark model (random unit vectors and
bucketLength) and its hashed reference table, and answers like Spark's approximate nearest
neighbour search (candidates share a bucket in at least one table; exact distances among
them), in milliseconds and without a JVM. A version whose manifest records AND-amplified bands
(``lsh.keys_per_band`` > 1) or multi-probe (``lsh.probes`` > 0) is searched the same way as
``spark_jobs/query_lsh.py`` does: candidates share a band key with one of the query's probe
keys (:func:`imgsim.ann.probe_keys`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import Layout, Settings, setting_default
from imgsim.errors import PermanentError
from imgsim.versions.models import (
    banding,
    measured_share,
    read_manifest,
    reading_version,
    version_dir,
)

log = logging.getLogger(__name__)


class BackboneMismatch(RuntimeError, PermanentError):
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
    candidates: int  # references compared
    method: str = "lsh"  # imgsim.ann.METHODS

    def fields(self, k: int, indexed: int) -> dict[str, Any]:
        """This answer as a results entry (:func:`answer_fields`)."""
        return answer_fields(
            [n.__dict__ for n in self.neighbours], self.candidates, self.method, k, indexed
        )


def answer_fields(
    neighbours: list[dict[str, Any]], candidates: int, method: str, k: int, indexed: int
) -> dict[str, Any]:
    """An answered query's entry in ``results.json`` (and the UI's answer), built one way for
    the CLI, the UI upload and the query DAG: neighbours, counts, method and the note."""
    return {
        "status": "answered",
        "neighbours": neighbours,
        "candidates": int(candidates),
        "found": len(neighbours),
        "method": method,
        "note": answer_note(method, len(neighbours), k, indexed),
    }


@dataclass
class LoadedModel:
    version: str
    manifest: dict[str, Any]
    ids: list[str]
    vectors: np.ndarray  # (n, dim) float32, unit length
    hashes: np.ndarray  # (n, tables) int64
    meta: list[dict[str, Any]]  # path, class_id, class_name per row
    params: Any  # imgsim.ann.BrpParams
    projection: Any = None  # imgsim.ann.projection.Projection; None: vectors only normalised
    scan: tuple[float, int] | None = None  # (scan_share, scan_below); None: the settings'
    _index: Any = None  # imgsim.ann.LshIndex, built on the first lookup

    def set_scan(self, scan_share: float, scan_below: int) -> None:
        """Pin the scan rule (a query run's plan); the search index is rebuilt on next use."""
        self.scan, self._index = (scan_share, scan_below), None

    def index(self) -> Any:
        """The version's :class:`imgsim.ann.LshIndex` (built once, on the first lookup)."""
        if self._index is None:
            from imgsim.ann import LshIndex

            if self.scan is None:
                from imgsim.config import Settings

                settings = Settings.from_env()
                self.scan = (settings.scan_share, settings.scan_below)
            keys_per_band, probes = banding(self.manifest)
            self._index = LshIndex.build(
                self.vectors,
                self.hashes,
                self.params,
                keys_per_band=keys_per_band,
                probes=probes,
                scan_share=self.scan[0],
                scan_below=self.scan[1],
                expected_share=measured_share(self.manifest),
            )
        return self._index

    def to_search_space(self, queries: np.ndarray) -> np.ndarray:
        """Raw query vectors -> the version's search space (projected, unit length)."""
        from imgsim.ann import l2_normalize

        q = np.atleast_2d(queries)
        raw_dim = int(self.manifest.get("embedding_dim") or self.vectors.shape[1])
        if q.shape[1] != raw_dim:
            raise BackboneMismatch(
                f"query vectors have {q.shape[1]} dimensions, model "
                f"{self.version} was built from {raw_dim}-d embeddings"
            )
        return self.projection.apply(q) if self.projection is not None else l2_normalize(q)


def load_model(layout: Layout, version: str | None = None) -> LoadedModel:
    """Load a published version (default: CURRENT) for in-process lookups."""
    import pyarrow.parquet as pq

    from imgsim.ann import load_brp_model
    from imgsim.ann.projection import load as load_projection

    manifest = read_manifest(layout, version)
    vdir = version_dir(layout, manifest["version"])
    with reading_version(layout, manifest["version"]):  # damage: VersionDamaged, not a traceback
        # Spark writes a CRC per Parquet page; checking them turns silent damage into a failed
        # read (and so a sha256 check), at the cost of a CRC32 over bytes read anyway.
        table = pq.read_table(
            vdir / manifest["files"]["reference"], page_checksum_verification=True
        )
        n = table.num_rows
        vec = table.column("vector").combine_chunks()
        vectors = np.asarray(vec.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(
            n, -1
        )
        hashes = np.asarray(
            table.column("hashes").combine_chunks().flatten().to_numpy(zero_copy_only=False),
            np.int64,
        ).reshape(n, -1)
        meta = table.select(["path", "class_id", "class_name"]).to_pylist()
        params = load_brp_model(vdir / manifest["files"]["model"])
        projection = load_projection(vdir, manifest.get("projection"))  # sha256-checked
    return LoadedModel(
        manifest["version"],
        manifest,
        table.column("image_id").to_pylist(),
        vectors,
        hashes,
        meta,
        params,
        projection=projection,
    )


def lookup(model: LoadedModel, queries: np.ndarray, k: int, expansion: int = 0) -> list[Answer]:
    """k nearest references per (raw) query vector, through the search core's ladder.

    The queries are mapped into the version's search space first (its projection), then
    answered together by :meth:`imgsim.ann.LshIndex.search`: the version's LSH; with every
    probe, then exactly, when it finds fewer than k candidates (so a query always gets
    ``min(k, index size)`` answers); or an exact scan where that costs less than the LSH.
    :attr:`Answer.method` says which. ``expansion`` > 0 searches a second time with each query
    plus its first ``expansion`` answers (:func:`imgsim.ann.expand_queries`) and orders what
    that finds by distance to the query.
    """
    from imgsim.ann import METHODS, Neighbours, expand_queries, refine

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if expansion < 0:
        raise ValueError(f"expansion must be >= 0, got {expansion}")
    q = model.to_search_space(queries)
    index = model.index()
    found = index.search(q, k) if q.shape[0] else []
    n = min([expansion, *(f.indices.size for f in found)]) if found else 0
    if n:
        first = np.stack([model.vectors[f.indices[:n]] for f in found])
        again = index.search(expand_queries(q, first), k)
        expanded = []
        for i, hit in enumerate(again):
            idx, dist = refine(q[i], model.vectors, hit.indices)  # by distance to the query
            method = max(hit.method, found[i].method, key=METHODS.index)
            expanded.append(Neighbours(idx, dist, hit.candidates, method))
        found = expanded
    answers = []
    for hit in found:
        neighbours = [
            Neighbour(
                rank + 1,
                model.ids[j],
                model.meta[j]["path"],
                model.meta[j]["class_id"],
                model.meta[j]["class_name"],
                float(d),
            )
            for rank, (j, d) in enumerate(zip(hit.indices, hit.distances, strict=True))
        ]
        answers.append(Answer(neighbours, hit.candidates, hit.method))
    return answers


def answer_note(method: str, found: int, k: int, indexed: int) -> str | None:
    """What a person should know about how a query was answered (None: nothing unusual).

    ``scan`` (an exact scan, cheaper than the LSH) is usual and better than the LSH: the
    answer's ``method`` says it, no note."""
    notes = []
    if method == "widened":
        notes.append(f"the LSH found fewer than {k} candidates; searched again with every probe")
    elif method == "exact":
        notes.append(
            f"the LSH found fewer than {k} candidates; answered by an exact scan of the index"
        )
    if found < min(k, indexed):
        notes.append(
            f"only {found} of {k} neighbours were found, although the index holds {indexed} images"
        )
    elif found < k:
        notes.append(f"{found} of {k} neighbours: the index holds {indexed} images")
    return "; ".join(notes) or None


def load_query_backbone(
    manifest: dict[str, Any],
    *,
    weights_path: str = "",
    device: str = "auto",
    cache_dir: Path | None = None,
    embedders: Path | None = None,
) -> Any:
    """Build the backbone recorded in ``manifest`` and check it is exactly the same one.

    A trained embedder (``<base>@<version>``) is loaded from ``embedders`` (the data root's
    ``models/embedder/``), so every query embeds with the embedder of the version it searches.

    It runs on the runtime the manifest records (torch when it names none), whatever
    IMGSIM_RUNTIME says; ``cache_dir`` holds the ONNX files (default: IMGSIM_MODEL_CACHE, where
    the index's embed tasks on this machine put them; exported here if absent).
    """
    from imgsim.config import Settings
    from imgsim.embedding.backbones import comparable_spec, load_backbone, spec_runtime

    recorded = comparable_spec(manifest["backbone"])
    runtime = spec_runtime(recorded)
    if cache_dir is None and runtime != "torch":
        cache_dir = Settings.from_env().model_cache
    backbone = load_backbone(
        recorded["name"],
        weights_path=weights_path,
        device="cpu" if runtime != "torch" else device,
        runtime=runtime,
        cache_dir=cache_dir,
        embedders=embedders,
    )
    have = backbone.spec.as_dict()
    diffs = {k: (recorded.get(k), have[k]) for k in have if recorded.get(k) != have[k]}
    if diffs:
        raise BackboneMismatch(
            f"model {manifest['version']} was built with backbone {recorded}, but the backbone "
            f"loaded here differs in {sorted(diffs)}: {diffs}. Answers would be wrong; use the "
            "same weights file (IMGSIM_WEIGHTS) or query another version."
        )
    return backbone


def query_backbone(settings: Settings, manifest: dict[str, Any]) -> Any:
    """:func:`load_query_backbone` per ``settings`` (imgsim.config): its weights file, device
    and embedders, with IMGSIM_NUM_THREADS intra-op threads (the CLI, the upload and the query
    DAG all load their backbone here)."""
    from imgsim.embedding.infer import configure_threads

    configure_threads(settings.num_threads)
    return load_query_backbone(
        manifest,
        weights_path=settings.weights_path,
        device=settings.device,
        embedders=settings.layout.embedders,
    )


@dataclass
class Searcher:
    """A published version and the backbone it was built with: image files in, answers out.

    The CLI (``imgsim query``) and the UI upload search through it; the query DAG embeds and
    looks up in separate tasks with the same two calls (:func:`embed_files`, :func:`lookup`).
    """

    model: LoadedModel
    backbone: Any
    batch_size: int = setting_default("batch_size")
    max_pixels: int = setting_default("max_image_pixels")
    expansion: int = setting_default("query_expansion")

    @classmethod
    def load(
        cls,
        settings: Any,
        version: str | None = None,
        *,
        batch_size: int | None = None,
        model: LoadedModel | None = None,
        backbone: Any = None,
    ) -> Searcher:
        """``version`` (default CURRENT) with its backbone, per ``settings`` (imgsim.config)."""
        model = model or load_model(settings.layout, version)
        backbone = backbone or query_backbone(settings, model.manifest)
        return cls(
            model,
            backbone,
            batch_size or settings.batch_size,
            settings.max_image_pixels,
            settings.query_expansion,
        )

    @property
    def indexed(self) -> int:
        return len(self.model.ids)

    def search_files(self, paths: list[Path], k: int) -> dict[str, Any]:
        """{str(path): Answer, or the file's Rejected (imgsim.embedding.infer)}."""
        good, bad = embed_files(
            self.backbone, paths, batch_size=self.batch_size, max_pixels=self.max_pixels
        )
        found = lookup(self.model, np.stack(list(good.values())), k, self.expansion) if good else []
        return {**bad, **dict(zip(good, found, strict=True))}


def embed_files(
    backbone: Any,
    paths: list[Path],
    *,
    batch_size: int = setting_default("batch_size"),
    max_pixels: int = setting_default("max_image_pixels"),
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
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
