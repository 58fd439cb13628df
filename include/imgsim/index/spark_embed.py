"""The executor side of ``spark_jobs/embed_images.py``: embed rows of images, write shards.

The functions live in the package, not in the job file, so that the backbone cache below is a
real module global: a Python worker that Spark reuses (``spark.python.worker.reuse``, on by
default) loads the model once and keeps it for every later partition it runs. Functions defined
in the job's ``__main__`` are pickled by value with a copy of their globals, so a cache there
would start empty in every task.

Decoding, resizing, thumbnails, quarantine and the shard files are the in-task path's own
functions (:mod:`imgsim.embedding.infer`, :mod:`imgsim.store`, :func:`imgsim.index.pipeline.
finish_shard`), so both engines write the same store. Weights come from the local file or cache
exactly as :func:`imgsim.embedding.backbones.load_backbone` finds them; nothing is downloaded.

Only pandas and numpy are imported at module level; torch when a backbone is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imgsim.config import Layout, Settings, setting_default
from imgsim.errors import PermanentError
from imgsim.fsutil import read_json

if TYPE_CHECKING:
    from imgsim.embedding.backbones import Backbone

log = logging.getLogger(__name__)

#: Input rows: one per image, ``pos`` is its place in the shard (the in-task order).
ITEM_SCHEMA = "shard int, pos int, image_id string, path string"
#: Embedding stage output: ``vector`` is null and ``reason`` set for a quarantined image.
EMBEDDED_SCHEMA = "shard int, pos int, image_id string, vector array<float>, reason string"
#: One row per written shard (``quarantined``: JSON object reason -> count).
RESULT_SCHEMA = "shard int, embedded int, quarantined string, file string"


class EmbedJobError(ValueError, PermanentError):
    """The job file or a shard spec is unusable; the message names the file."""


@dataclass(frozen=True)
class EmbedJob:
    """What one Spark embedding run does (``runs/<run>/spark_embed.json``); the settings it
    carries default to imgsim.config's (a job file written by imgsim.index.pipeline has them
    all)."""

    data_root: str
    backbone: str
    run_key: str
    shards: tuple[str, ...]
    weights_path: str = setting_default("weights_path")
    device: str = setting_default("device")
    runtime: str = setting_default("runtime")
    batch_size: int = setting_default("batch_size")
    num_threads: int = setting_default("num_threads")
    max_image_pixels: int = setting_default("max_image_pixels")
    model_cache: str = ""  # where the ONNX runtimes' files are ("": the machine's default)

    @classmethod
    def of(
        cls,
        settings: Settings,
        backbone: str,
        run_key: str,
        shards: Sequence[str],
    ) -> EmbedJob:
        """The job for ``shards``, with ``settings``' value of every setting a job carries."""
        carried = {
            f.name: getattr(settings, f.name) for f in fields(cls) if f.default is not MISSING
        }
        return cls(
            str(settings.data_root),
            backbone,
            run_key,
            tuple(shards),
            **{**carried, "model_cache": str(settings.model_cache)},
        )

    @property
    def cache_dir(self) -> Path | None:
        return Path(self.model_cache) if self.model_cache else None

    @classmethod
    def from_file(cls, path: str | Path) -> EmbedJob:
        try:
            raw = read_json(path)
        except (OSError, json.JSONDecodeError) as exc:
            raise EmbedJobError(f"cannot read the embedding job file {path}: {exc}") from exc
        known = {f.name for f in fields(cls)}
        missing = {"data_root", "backbone", "run_key", "shards"} - set(raw)
        if missing:
            raise EmbedJobError(f"{path}: missing {', '.join(sorted(missing))}")
        unknown = set(raw) - known
        if unknown:
            raise EmbedJobError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
        if not raw["shards"]:
            raise EmbedJobError(f"{path}: no shards to embed")
        if int(raw.get("batch_size", cls.batch_size)) < 1:
            raise EmbedJobError(f"{path}: batch_size must be >= 1")
        return cls(**{**raw, "shards": tuple(str(s) for s in raw["shards"])})

    @property
    def layout(self) -> Layout:
        return Layout(Path(self.data_root))


@dataclass(frozen=True)
class PlannedShard:
    spec: str
    shard: int
    items: list[dict[str, str]]

    def as_plan(self) -> dict[str, Any]:
        """The shape ``plan_shards`` returns (what :func:`pipeline.embed_summary` reads)."""
        return {"spec": self.spec, "shard": self.shard, "images": len(self.items)}


def read_shards(job: EmbedJob) -> list[PlannedShard]:
    """The job's shard specs, checked: same run key, distinct shard numbers, non-empty."""
    shards: dict[int, PlannedShard] = {}
    for spec_path in job.shards:
        try:
            spec = read_json(spec_path)
        except (OSError, json.JSONDecodeError) as exc:
            raise EmbedJobError(f"cannot read shard spec {spec_path}: {exc}") from exc
        if spec.get("run_key") != job.run_key:
            raise EmbedJobError(
                f"{spec_path}: run key {spec.get('run_key')!r}, the job is for {job.run_key!r}"
            )
        shard = int(spec["shard"])
        if shard in shards:
            raise EmbedJobError(f"{spec_path}: shard {shard} is also {shards[shard].spec}")
        shards[shard] = PlannedShard(str(spec_path), shard, list(spec["items"]))
    return [shards[k] for k in sorted(shards)]


def item_rows(shards: list[PlannedShard]) -> list[tuple[int, int, str, str]]:
    return [
        (s.shard, pos, it["image_id"], it["path"]) for s in shards for pos, it in enumerate(s.items)
    ]


# -- executors ----------------------------------------------------------------------------------

_BACKBONES: dict[tuple[str, str, str, str, str, str], Backbone] = {}


def cached_backbone(
    name: str,
    weights_path: str,
    device: str,
    runtime: str = "torch",
    cache_dir: Path | None = None,
    embedders: Path | None = None,
) -> Backbone:
    """The backbone, loaded at most once per Python worker process."""
    from imgsim.embedding.backbones import load_backbone

    key = (name, weights_path, device, runtime, str(cache_dir), str(embedders))
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(
            name,
            weights_path=weights_path,
            device=device,
            runtime=runtime,
            cache_dir=cache_dir,
            embedders=embedders,
        )
        log.info(
            "%s process %d on %s loaded the %s backbone (kept for its later tasks)",
            "executor" if _in_task() else "driver",
            os.getpid(),
            socket.gethostname(),
            name,
        )
    return _BACKBONES[key]


def _in_task() -> bool:
    from pyspark import TaskContext

    return TaskContext.get() is not None


def worker_logging() -> None:
    """Send imgsim's INFO lines from a Python worker to the executor's stderr (task log)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )


def task_threads(num_threads: int) -> int:
    """Torch threads for one Spark task: the setting, else the task's ``spark.task.cpus``."""
    if num_threads:
        return num_threads
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return max(1, int(ctx.cpus())) if ctx is not None else 1


def embed_partition(
    job: EmbedJob,
    expected_spec: dict[str, Any],
    batches: Iterator[pd.DataFrame],
    flush_every: int = 256,
) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: decode, thumbnail, batched inference; quarantine bad images."""
    from imgsim.embedding.infer import EmbedItem, Rejected, configure_threads, embed_items
    from imgsim.store import set_aside

    worker_logging()
    configure_threads(task_threads(job.num_threads))
    layout = job.layout
    backbone = cached_backbone(
        job.backbone, job.weights_path, job.device, job.runtime, job.cache_dir, layout.embedders
    )
    if backbone.spec.as_dict() != expected_spec:
        raise RuntimeError(
            f"the executor on {socket.gethostname()} loads {backbone.spec.as_dict()}, the driver "
            f"{expected_spec}: install the same weights file on every Spark worker"
        )
    for frame in batches:
        items = [
            EmbedItem(iid, layout.root / path, layout.thumbs / f"{iid}.jpg")
            for iid, path in zip(frame["image_id"], frame["path"], strict=True)
        ]
        places = zip(frame["shard"].tolist(), frame["pos"].tolist(), strict=True)
        rows: list[tuple[int, int, str, np.ndarray | None, str | None]] = []
        results = embed_items(
            items, backbone, batch_size=job.batch_size, max_pixels=job.max_image_pixels
        )
        for (shard, pos), res in zip(places, results, strict=True):
            if isinstance(res, Rejected):
                key = set_aside(layout, res, job.run_key, job.max_image_pixels)
                rows.append((shard, pos, res.key, None, key))
            else:
                rows.append((shard, pos, res.key, res.vector, None))
            if len(rows) >= flush_every:
                yield _embedded_frame(rows)
                rows = []
        if rows:
            yield _embedded_frame(rows)


def _embedded_frame(
    rows: list[tuple[int, int, str, np.ndarray | None, str | None]],
) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["shard", "pos", "image_id", "vector", "reason"])


def write_shard_group(
    job: EmbedJob, spec_paths: dict[int, str], dim: int, frame: pd.DataFrame
) -> pd.DataFrame:
    """``applyInPandas`` body for one shard: its Parquet file and result record, atomically."""
    from imgsim.index.pipeline import finish_shard

    frame = frame.sort_values("pos")
    shard = int(frame["shard"].iloc[0])
    good: list[tuple[str, Any]] = []
    rejected: dict[str, int] = {}
    for iid, vector, reason in zip(
        frame["image_id"], frame["vector"], frame["reason"], strict=True
    ):
        if isinstance(reason, str):
            rejected[reason] = rejected.get(reason, 0) + 1
        else:
            good.append((iid, np.asarray(vector, dtype=np.float32)))
    result = finish_shard(
        job.layout, spec_paths[shard], job.backbone, job.run_key, shard, good, rejected, dim
    )
    return pd.DataFrame(
        [
            {
                "shard": shard,
                "embedded": result["embedded"],
                "quarantined": json.dumps(result["quarantined"]),
                "file": result["file"],
            }
        ]
    )
