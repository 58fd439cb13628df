"""Batched embedding: reader (decode, in threads) -> mapper (model, batched) -> writer (caller).

Decoding runs in a small thread pool (PIL releases the GIL while decoding) and overlaps with
inference on the previous batch. An unreadable image is set aside with its reason; it never
fails the batch. One loop serves one image and a million.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgsim.config import setting_default
from imgsim.imaging import ImageRejected, load_rgb, resize_square, save_thumbnail

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from imgsim.embedding.backbones import Backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedItem:
    key: str  # the caller's identifier (an image id)
    path: Path
    thumb_path: Path | None = None


@dataclass(frozen=True)
class Embedded:
    key: str
    vector: np.ndarray  # float32, shape (dim,)


@dataclass(frozen=True)
class Rejected:
    key: str
    path: Path
    reason: str
    detail: str
    transient: bool = False  # a read error: retried by a later run, never quarantined


#: A read error of the file system is tried again this often, after these pauses (seconds).
READ_RETRY_PAUSES_S = (0.2, 1.0)


def configure_threads(num_threads: int) -> None:
    """Use ``num_threads`` intra-op threads (0: one per core)."""
    import os

    import torch

    n = num_threads or (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def _prepare(item: EmbedItem, backbone: Backbone, max_pixels: int) -> torch.Tensor | Rejected:
    for pause in (*READ_RETRY_PAUSES_S, None):
        try:
            decoded = load_rgb(item.path, max_pixels=max_pixels)
            break
        except ImageRejected as exc:
            if not exc.transient or pause is None:
                return Rejected(item.key, item.path, exc.reason, exc.detail, exc.transient)
            log.info("reading %s failed (%s); trying again in %.1f s", item.path, exc, pause)
            time.sleep(pause)
    image: Image = decoded.image
    if item.thumb_path is not None and not item.thumb_path.exists():
        thumb = resize_square(image)
        save_thumbnail(thumb, item.thumb_path)
        if backbone.square_input:  # the backbone's own first step: resize once, not twice
            image = thumb
    return backbone.preprocess(image)


def _batches(items: Sequence[EmbedItem], size: int) -> Iterator[Sequence[EmbedItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_items(
    items: Sequence[EmbedItem],
    backbone: Backbone,
    *,
    batch_size: int = setting_default("batch_size"),
    max_pixels: int = setting_default("max_image_pixels"),
    decode_workers: int = 2,
) -> Iterator[Embedded | Rejected]:
    """Yield one result per item, in input order: an :class:`Embedded` or a :class:`Rejected`."""
    import torch

    total = len(items)
    done = 0
    started = time.monotonic()
    last_log = started
    Pending = tuple[Sequence[EmbedItem], list[Future[torch.Tensor | Rejected]]]
    with ThreadPoolExecutor(max_workers=max(1, decode_workers)) as pool:
        # Decode of batch i+1 is submitted before the forward pass of batch i.
        batch_iter = iter(_batches(items, batch_size))

        def submit(chunk: Sequence[EmbedItem] | None) -> Pending | None:
            if chunk is None:
                return None
            return chunk, [pool.submit(_prepare, it, backbone, max_pixels) for it in chunk]

        pending = submit(next(batch_iter, None))
        while pending is not None:
            batch, futures = pending
            prepared = [f.result() for f in futures]
            pending = submit(next(batch_iter, None))
            tensors = [p for p in prepared if not isinstance(p, Rejected)]
            vectors: np.ndarray | None = None
            if tensors:
                vectors = backbone.embed_batch(torch.stack(tensors))
            vi = 0
            for item, prep in zip(batch, prepared, strict=True):
                if isinstance(prep, Rejected):
                    log.warning("rejected %s: %s (%s)", prep.path, prep.reason, prep.detail)
                    yield prep
                else:
                    assert vectors is not None
                    yield Embedded(item.key, vectors[vi].copy())
                    vi += 1
            done += len(batch)
            now = time.monotonic()
            if now - last_log > 10 or done == total:
                rate = done / max(now - started, 1e-9)
                log.info("embedded %d/%d images (%.1f images/s)", done, total, rate)
                last_log = now


def embed_paths(
    paths: Iterable[str | Path],
    backbone: Backbone,
    *,
    batch_size: int = setting_default("batch_size"),
) -> tuple[np.ndarray, list[Rejected]]:
    """Embed files in order; returns (vectors of the good ones, rejections)."""
    items = [EmbedItem(str(p), Path(p)) for p in paths]
    good: list[np.ndarray] = []
    bad: list[Rejected] = []
    for res in embed_items(items, backbone, batch_size=batch_size):
        if isinstance(res, Rejected):
            bad.append(res)
        else:
            good.append(res.vector)
    dim = backbone.spec.dim
    return (np.stack(good) if good else np.zeros((0, dim), np.float32)), bad
