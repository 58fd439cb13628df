"""Train the embedding on the labelled references and publish it as an embedder version.

One run (``imgsim train``, the ``imgsim_train`` DAG's ``train`` task):

1. **references**: the catalog's live, labelled images whose thumbnail exists (the 224 x 224
   picture the embed task feeds the network, so training sees what indexing sees);
2. **split**: per class, a seeded share (``IMGSIM_TRAIN_HOLDOUT``, 10%) of the photos is held
   out: it picks the epoch and gives the published metrics, and is never trained on. Images
   that ``imgsim evaluate`` queries with are not references, so they are never trained on;
3. **cache** (mode ``top``, the CPU default): the frozen stages' outputs of every reference,
   computed once in batches and streamed to a temporary float16 file (never the whole set in
   memory); the same pass gives the frozen backbone's own vectors for the baseline;
4. **train**: the top stages and a linear head to ``IMGSIM_TRAIN_DIM`` (512) with a normalised
   softmax loss (cosine to one weight per class, temperature 0.05, label smoothing 0.1), AdamW
   with a one-cycle schedule, horizontal flips of the cached maps. Mode ``full`` (the default on
   a GPU) trains every layer on the images with random-resized-crop and flip augmentation;
5. **compare**: held-out hit@1 of the best epoch, with and without an LDA learned on the
   trained vectors, against the frozen backbone + LDA on the same split. Only an embedder that
   beats it is published (else the run says so, and the frozen backbone stays);
6. **publish**: ``models/embedder/<version>/`` (weights, ONNX export, the spec, the curve, the
   metrics) under a staging name, renamed when complete; CURRENT then names it.

A NaN loss stops the run with its epoch (:class:`TrainingDiverged`); too few labelled photos
stop it before any work (:class:`TrainingDataError`). Both are permanent errors.
torch is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import Layout, Settings
from imgsim.errors import PermanentError
from imgsim.fsutil import TMP_PREFIX, atomic_write_json

log = logging.getLogger(__name__)

#: the loss, as the spec records it
TEMPERATURE = 0.05
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-4
#: the head and the class weights learn this much faster than the pretrained top stages
HEAD_LR_FACTOR = 10.0
#: retrieval metrics at this k (precision@5, hit@5)
K = 5


class TrainingError(RuntimeError):
    """Training could not run or finish; nothing was published."""


class TrainingDataError(TrainingError, ValueError, PermanentError):
    """Too few labelled references to train on."""


class TrainingDiverged(TrainingError, PermanentError):
    """The loss became NaN or infinite."""


class TrainingBusy(TrainingError):
    """Another training run holds this data root's training lock."""


@dataclass(frozen=True)
class TrainConfig:
    base: str = "efficientnet_lite0"
    dim: int = 512
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.002
    holdout: float = 0.1
    seed: int = 0
    mode: str = "auto"  # auto, top, full
    device: str = "auto"
    min_images: int = 20
    weights_path: str = ""
    temperature: float = TEMPERATURE
    label_smoothing: float = LABEL_SMOOTHING
    #: ``better``: publish only an embedder that beats the frozen backbone + LDA on the held-out
    #: photos (always, outside tests); ``always``: publish regardless (tests of the publishing)
    publish: str = "better"

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> TrainConfig:
        from imgsim.embedding.trained import base_of

        values: dict[str, Any] = {
            "base": base_of(settings.backbone),
            "dim": settings.train_dim,
            "epochs": settings.train_epochs,
            "batch_size": settings.train_batch_size,
            "lr": settings.train_lr,
            "holdout": settings.train_holdout,
            "seed": settings.train_seed,
            "mode": settings.train_mode,
            "device": settings.device,
            "min_images": settings.train_min_images,
            "weights_path": settings.weights_path,
            "publish": settings.train_publish,
        }
        values.update({k: v for k, v in changes.items() if v is not None})
        return cls(**values)


@dataclass(frozen=True)
class Reference:
    image_id: str
    thumb: Path
    class_id: int


@dataclass
class Split:
    train: list[Reference]
    held: list[Reference]
    classes: list[int]  # class ids, index = the class weight's row

    def labels(self, refs: list[Reference]) -> np.ndarray:
        row = {c: i for i, c in enumerate(self.classes)}
        return np.array([row[r.class_id] for r in refs], np.int64)


@dataclass
class TrainResult:
    published: bool
    version: str | None
    reason: str
    metrics: dict[str, Any]
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the references and the split ---------------------------------------------------------------


def labelled_references(layout: Layout) -> list[Reference]:
    """The catalog's live labelled images that have a thumbnail, sorted by id."""
    from imgsim.store import read_catalog

    out = []
    for row in read_catalog(layout):
        if row["status"] != "live" or row["class_id"] is None:
            continue
        thumb = layout.thumbs / f"{row['image_id']}.jpg"
        if thumb.is_file():
            out.append(Reference(row["image_id"], thumb, int(row["class_id"])))
    return sorted(out, key=lambda r: r.image_id)


def check_enough(refs: list[Reference], min_images: int) -> None:
    """Refuse to train on too few labelled photos (a clear message; the frozen backbone stays)."""
    counts: dict[int, int] = {}
    for r in refs:
        counts[r.class_id] = counts.get(r.class_id, 0) + 1
    if len(refs) < min_images:
        raise TrainingDataError(
            f"{len(refs)} labelled references with a thumbnail: at least {min_images} are "
            "needed to train the embedding (IMGSIM_TRAIN_MIN_IMAGES). Index labelled photos "
            "first (imgsim_index with a labels file); the frozen backbone stays in use."
        )
    if len(counts) < 2:
        raise TrainingDataError(
            f"the labelled references hold {len(counts)} class: training needs at least 2; "
            "the frozen backbone stays in use."
        )
    few = sum(1 for n in counts.values() if n < 2)
    if few * 2 > len(counts):
        raise TrainingDataError(
            f"{few} of {len(counts)} classes have fewer than 2 labelled photos: a held-out "
            "split needs 2 per class for most classes; the frozen backbone stays in use."
        )


def split_references(refs: list[Reference], share: float, seed: int) -> Split:
    """Per class (seeded): ``share`` of its photos held out, at least 1 where it has 2 or more."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Reference]] = {}
    for r in refs:
        by_class.setdefault(r.class_id, []).append(r)
    train: list[Reference] = []
    held: list[Reference] = []
    for cls in sorted(by_class):
        members = sorted(by_class[cls], key=lambda r: r.image_id)
        order = rng.permutation(len(members))
        n_held = 0 if len(members) < 2 else max(1, round(share * len(members)))
        held += [members[i] for i in order[:n_held]]
        train += [members[i] for i in order[n_held:]]
    return Split(train, held, sorted(by_class))


# -- the frozen stages, once --------------------------------------------------------------------


def _thumb_batches(
    refs: list[Reference], preprocess: Callable[[Any], Any], batch_size: int
) -> Iterator[Any]:
    """Preprocessed batches (N x 3 x 224 x 224) of the references' thumbnails, decoded by a
    thread pool one batch ahead."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def load(ref: Reference) -> Any:
        return _load_tensor(ref, preprocess)

    chunks = [refs[i : i + batch_size] for i in range(0, len(refs), batch_size)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        # one batch decoding ahead of the one being used: memory stays two batches
        ahead = (
            pool.submit(lambda c: torch.stack([load(r) for r in c]), chunks[0]) if chunks else None
        )
        for i in range(len(chunks)):
            assert ahead is not None
            batch = ahead.result()
            if i + 1 < len(chunks):
                ahead = pool.submit(lambda c: torch.stack([load(r) for r in c]), chunks[i + 1])
            yield batch


def cache_frozen(
    net: Any,
    base: str,
    base_top: Any,
    refs: list[Reference],
    preprocess: Callable[[Any], Any],
    path: Path,
    batch_size: int,
) -> tuple[np.memmap, np.ndarray]:
    """The frozen part's outputs of ``refs`` (float16, streamed into ``path``) and the frozen
    backbone's own vectors (its pretrained top and pooling, float32)."""
    import torch

    from imgsim.embedding.trained import FROZEN_SHAPES

    shape = (len(refs), *FROZEN_SHAPES[base])
    maps = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    frozen_vecs = []
    done = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in _thumb_batches(refs, preprocess, batch_size):
            out = net.frozen(batch.contiguous(memory_format=torch.channels_last))
            maps[done : done + len(batch)] = out.to(torch.float16).numpy()
            frozen_vecs.append(base_top(out).mean(dim=(2, 3)).float().numpy())
            done += len(batch)
            if done == len(refs) or done % (batch_size * 20) == 0:
                log.info(
                    "cached the frozen stages of %d/%d references (%.1f images/s)",
                    done,
                    len(refs),
                    done / max(time.perf_counter() - t0, 1e-9),
                )
    maps.flush()
    return maps, np.concatenate(frozen_vecs).astype(np.float32)


# -- metrics ------------------------------------------------------------------------------------


def retrieval_metrics(
    held: np.ndarray, held_y: np.ndarray, train: np.ndarray, train_y: np.ndarray
) -> dict[str, float]:
    """hit@1, precision@5 and hit@5 of the held-out photos searched among the training ones
    (exact search, L2-normalised vectors)."""
    from imgsim.ann.projection import l2_normalize, label_metrics

    m = label_metrics(l2_normalize(held), held_y, l2_normalize(train), train_y, K)
    return {
        "hit_at_1": round(m["hit_at_1"], 4),
        f"precision_at_{K}": round(m["precision"], 4),
        f"hit_at_{K}": round(m["hit_at_k"], 4),
    }


def with_lda(
    train: np.ndarray, train_y: np.ndarray, held: np.ndarray, held_y: np.ndarray, seed: int
) -> dict[str, Any]:
    """The metrics in an LDA space learned from the training split (as the index learns it:
    shrinkage and dimensions cross-validated inside those references)."""
    from imgsim.ann.projection import ProjectionError, choose, stats_from_arrays

    try:
        choice = choose(
            stats_from_arrays(train, train_y),
            "lda",
            cv_vectors=train,
            cv_labels=train_y,
            seed=seed,
            min_coverage=0.0,
        )
    except ProjectionError as exc:
        return {"skipped": str(exc)}
    proj = choice.projection
    return {
        **retrieval_metrics(proj.apply(held), held_y, proj.apply(train), train_y),
        "dims": proj.dims,
    }


# -- training -----------------------------------------------------------------------------------


def resolve_mode(mode: str, device: Any) -> str:
    if mode == "auto":
        return "full" if device.type == "cuda" else "top"
    return mode


def _embed_maps(net: Any, maps: np.ndarray, batch_size: int, device: Any) -> np.ndarray:
    import torch

    out = []
    net.eval()
    with torch.inference_mode():
        for i in range(0, len(maps), batch_size * 2):
            x = torch.from_numpy(np.asarray(maps[i : i + batch_size * 2], np.float32)).to(device)
            out.append(net.embed_maps(x).float().cpu().numpy())
    return np.concatenate(out)


def _embed_images(
    net: Any, refs: list[Reference], preprocess: Callable[[Any], Any], batch_size: int, device: Any
) -> np.ndarray:
    import torch

    out = []
    net.eval()
    with torch.inference_mode():
        for batch in _thumb_batches(refs, preprocess, batch_size):
            out.append(net(batch.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def train_embedder(
    config: TrainConfig,
    split: Split,
    *,
    workdir: Path,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train on ``split.train``, pick the epoch by held-out hit@1; the best network, the curve,
    the held-out metrics (trained, trained + LDA, frozen + LDA) and the seconds spent."""
    import copy

    import torch
    import torch.nn.functional as F

    from imgsim.embedding.backbones import build_embedder_net, choose_device, preprocess_for

    device = choose_device(config.device)
    mode = resolve_mode(config.mode, device)
    torch.manual_seed(config.seed)
    net = build_embedder_net(config.base, config.dim, config.weights_path, pretrained=True)
    base_top = copy.deepcopy(net.top).eval()  # the frozen backbone's own top, for the baseline
    preprocess = preprocess_for(config.base)
    refs = split.train + split.held
    y_train, y_held = split.labels(split.train), split.labels(split.held)
    n_train = len(split.train)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    maps, frozen_vecs = cache_frozen(
        net, config.base, base_top, refs, preprocess, workdir / "frozen-maps.npy", config.batch_size
    )
    seconds["cache"] = round(time.perf_counter() - t0, 2)
    frozen = {
        "raw": retrieval_metrics(frozen_vecs[n_train:], y_held, frozen_vecs[:n_train], y_train),
        "lda": with_lda(frozen_vecs[:n_train], y_train, frozen_vecs[n_train:], y_held, config.seed),
    }
    log.info("frozen backbone on the held-out split: %s; + LDA: %s", frozen["raw"], frozen["lda"])

    net = net.to(device)
    if mode == "top":
        for p in net.frozen.parameters():
            p.requires_grad_(False)
        trained_params = [*net.top.parameters()]
    else:
        trained_params = [*net.frozen.parameters(), *net.top.parameters()]
    weights = torch.nn.Parameter(torch.randn(len(split.classes), config.dim, device=device) * 0.01)
    optimizer = torch.optim.AdamW(
        [
            {"params": trained_params, "lr": config.lr},
            {"params": [*net.head.parameters(), weights], "lr": config.lr * HEAD_LR_FACTOR},
        ],
        weight_decay=WEIGHT_DECAY,
    )
    steps = max(1, (n_train + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[config.lr, config.lr * HEAD_LR_FACTOR],
        total_steps=steps * config.epochs,
        pct_start=0.25,
    )
    augment = _augmentation() if mode == "full" else None
    rng = np.random.default_rng(config.seed)
    labels = torch.from_numpy(y_train).to(device)
    curve: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    t_train = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t_epoch = time.perf_counter()
        net.train()
        if mode == "top":
            net.frozen.eval()  # its BatchNorm statistics stay the pretrained ones
        order = rng.permutation(n_train)
        losses = []
        for start in range(0, n_train, config.batch_size):
            idx = np.sort(order[start : start + config.batch_size])
            if len(idx) < 2:
                continue
            if mode == "top":
                x = torch.from_numpy(np.asarray(maps[idx], np.float32)).to(device)
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5).to(device)
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
                emb = net.embed_maps(x)
            else:
                assert augment is not None
                batch = torch.stack(
                    [augment(_load_tensor(split.train[i], preprocess)) for i in idx]
                )
                emb = net(batch.to(device))
            logits = emb @ F.normalize(weights, dim=1).T / config.temperature
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=config.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"the training loss became {loss.item()} at epoch {epoch} of "
                    f"{config.epochs} (step {start // config.batch_size + 1}): try a lower "
                    f"IMGSIM_TRAIN_LR (now {config.lr}); nothing was published"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.item()))
        train_s = time.perf_counter() - t_epoch
        if mode == "top":
            vecs = _embed_maps(net, maps, config.batch_size, device)
        else:
            vecs = _embed_images(net, refs, preprocess, config.batch_size, device)
        held = retrieval_metrics(vecs[n_train:], y_held, vecs[:n_train], y_train)
        point = {
            "epoch": epoch,
            "loss": round(float(np.mean(losses)) if losses else float("nan"), 4),
            **{f"held_{k}": v for k, v in held.items()},
            "seconds": round(time.perf_counter() - t_epoch, 1),
            "train_seconds": round(train_s, 1),
        }
        curve.append(point)
        log.info(
            "epoch %d/%d: loss %.4f, held-out hit@1 %.3f, precision@%d %.3f (%.0f s)",
            epoch,
            config.epochs,
            point["loss"],
            held["hit_at_1"],
            K,
            held[f"precision_at_{K}"],
            point["seconds"],
        )
        if progress:
            progress(point)
        if best is None or held["hit_at_1"] > best[0]:
            best = (held["hit_at_1"], epoch, copy.deepcopy(net.state_dict()))
    seconds["train"] = round(time.perf_counter() - t_train, 2)
    assert best is not None
    net.load_state_dict(best[2])
    net = net.to("cpu").eval()
    if mode == "top":
        vecs = _embed_maps(net, maps, config.batch_size, torch.device("cpu"))
    else:
        vecs = _embed_images(net, refs, preprocess, config.batch_size, torch.device("cpu"))
    trained = {
        "raw": retrieval_metrics(vecs[n_train:], y_held, vecs[:n_train], y_train),
        "lda": with_lda(vecs[:n_train], y_train, vecs[n_train:], y_held, config.seed),
    }
    del maps
    return {
        "net": net,
        "mode": mode,
        "device": str(device),
        "best_epoch": best[1],
        "curve": curve,
        "metrics": {"frozen": frozen, "trained": trained},
        "seconds": seconds,
    }


def _augmentation() -> Callable[[Any], Any]:
    """Random-resized crop and horizontal flip of a preprocessed 3 x 224 x 224 tensor."""
    from torchvision.transforms import v2

    return v2.Compose(  # type: ignore[no-any-return]
        [v2.RandomResizedCrop(224, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    )


def _load_tensor(ref: Reference, preprocess: Callable[[Any], Any]) -> Any:
    from PIL import Image

    with Image.open(ref.thumb) as im:
        return preprocess(im.convert("RGB"))


# -- deciding, publishing -----------------------------------------------------------------------


def best_of(metrics: dict[str, Any]) -> tuple[str, float]:
    """(projection, held-out hit@1) of the better of the trained vectors with and without LDA."""
    raw = metrics["trained"]["raw"]["hit_at_1"]
    lda = metrics["trained"]["lda"].get("hit_at_1", -1.0)
    return ("lda", lda) if lda > raw else ("none", raw)


def baseline(metrics: dict[str, Any]) -> tuple[str, float]:
    """(name, held-out hit@1) of the frozen backbone's best: with LDA, else as it is."""
    lda = metrics["frozen"]["lda"].get("hit_at_1")
    if lda is None:
        return "frozen", float(metrics["frozen"]["raw"]["hit_at_1"])
    return "frozen + LDA", float(lda)


@contextlib.contextmanager
def training_lock(layout: Layout) -> Iterator[None]:
    """One training run per data root at a time; a second fails at once, saying so."""
    from imgsim.fsutil import exclusive_lock

    lock = layout.embedders / ".train.lock"
    try:
        with exclusive_lock(lock, wait=False):
            yield
    except BlockingIOError:
        raise TrainingBusy(f"another training run holds {lock}; wait for it to finish") from None


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_training(
    settings: Settings,
    config: TrainConfig | None = None,
    *,
    run_id: str = "manual",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on the data root's labelled references; publish the embedder when it beats the
    frozen backbone + LDA on the held-out split. Nothing is published on any error."""
    import torch

    from imgsim.embedding.backbones import base_model
    from imgsim.embedding.onnx_runtime import export_onnx
    from imgsim.embedding.trained import FROZEN_STAGES, trained_name
    from imgsim.store import labels_fingerprint
    from imgsim.versions.embedders import (
        CURVE,
        LABELS,
        ONNX,
        WEIGHTS,
        clean_embedder_staging,
        new_embedder_version,
        publish_embedder,
        staging_dir,
    )

    config = config or TrainConfig.from_settings(settings)
    layout = settings.layout
    t_all = time.perf_counter()
    refs = labelled_references(layout)
    check_enough(refs, config.min_images)
    split = split_references(refs, config.holdout, config.seed)
    log.info(
        "training %s -> %d-d on %d labelled references in %d classes (%d held out, seed %d)",
        config.base,
        config.dim,
        len(split.train),
        len(split.classes),
        len(split.held),
        config.seed,
    )
    _, base_spec, _ = base_model(config.base, config.weights_path)
    with training_lock(layout):
        clean_embedder_staging(layout)
        layout.runs.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}train-", dir=layout.runs) as tmp:
            out = train_embedder(config, split, workdir=Path(tmp), progress=progress)
        metrics = out["metrics"]
        projection, trained_hit = best_of(metrics)
        base_name, base_hit = baseline(metrics)
        seconds = {**out["seconds"], "total": round(time.perf_counter() - t_all, 2)}
        summary = {
            **metrics,
            "chosen": {"projection": projection, "hit_at_1": trained_hit},
            "baseline": {"name": base_name, "hit_at_1": base_hit},
            "held_out": len(split.held),
            "peak_rss_mib": peak_rss_mib(),
        }
        if trained_hit <= base_hit and config.publish != "always":
            reason = (
                f"not published: the trained embedder's held-out hit@1 {trained_hit:.3f} "
                f"(projection {projection}) does not beat the {base_name} baseline "
                f"{base_hit:.3f} on the same {len(split.held)} held-out photos; the frozen "
                "backbone stays in use"
            )
            log.warning("%s", reason)
            return TrainResult(False, None, reason, summary, out["curve"], seconds)

        version = new_embedder_version()
        staged = staging_dir(layout) / version
        staged.mkdir(parents=True)
        net = out["net"]
        torch.save(net.state_dict(), staged / WEIGHTS)
        export_onnx(net, staged / ONNX)
        atomic_write_json(staged / CURVE, out["curve"])
        atomic_write_json(staged / LABELS, {r.image_id: r.class_id for r in refs})
        manifest = {
            "version": version,
            "name": trained_name(config.base, version),
            "created_at": datetime.now(UTC).isoformat(),
            "run_id": run_id,
            "base": base_spec.as_dict(),
            "dim": config.dim,
            "mode": out["mode"],
            "frozen_stages": FROZEN_STAGES[config.base] if out["mode"] == "top" else "none",
            "preprocessing": base_spec.preprocessing,
            "augmentation": "horizontal flip of the cached maps"
            if out["mode"] == "top"
            else "random-resized crop (0.35-1) and horizontal flip of the images",
            "loss": {
                "kind": "normalised softmax (cosine to one weight per class)",
                "temperature": config.temperature,
                "label_smoothing": config.label_smoothing,
            },
            "optimizer": {
                "kind": "AdamW, one-cycle",
                "lr": config.lr,
                "head_lr": config.lr * HEAD_LR_FACTOR,
                "weight_decay": WEIGHT_DECAY,
                "batch_size": config.batch_size,
            },
            "epochs": config.epochs,
            "best_epoch": out["best_epoch"],
            "seed": config.seed,
            "device": out["device"],
            "threads": torch.get_num_threads(),
            "projection": projection,
            "labels": {
                "images": len(refs),
                "trained_on": len(split.train),
                "held_out": len(split.held),
                "classes": len(split.classes),
                "class_ids": split.classes,
                "fingerprint": labels_fingerprint((r.image_id, r.class_id) for r in refs),
            },
            "held_out_ids": sorted(r.image_id for r in split.held),
            "metrics": summary,
            "seconds": seconds,
        }
        atomic_write_json(staged / "manifest.json", manifest)
        publish_embedder(layout, version)
        reason = (
            f"published {version}: held-out hit@1 {trained_hit:.3f} (projection {projection}) "
            f"against {base_hit:.3f} for the {base_name} baseline"
        )
        log.info("%s", reason)
        return TrainResult(True, version, reason, summary, out["curve"], seconds, manifest)


# -- when to train ------------------------------------------------------------------------------


def training_plan(
    settings: Settings, *, force: bool = False, trigger: str = "schedule"
) -> dict[str, Any]:
    """Whether a training run should train now, and why.

    ``force`` (the Param): always. Otherwise, with no trained embedder for the backbone yet: yes.
    ``trigger="schedule"`` (IMGSIM_TRAIN_SCHEDULE, weekly; also a manual run): when the labelled
    references differ in any way from those the CURRENT embedder was trained on.
    ``trigger="asset"`` (after each index publish): when they grew or changed by more than
    IMGSIM_TRAIN_REFRESH of those, or gained a class. Too few labelled photos: no (the reason
    says so; the frozen backbone stays)."""
    from imgsim.embedding.trained import base_of
    from imgsim.fsutil import read_json
    from imgsim.store import labels_fingerprint
    from imgsim.versions.embedders import (
        LABELS,
        EmbedderDamaged,
        current_embedder,
        embedder_dir,
        read_embedder,
    )

    layout = settings.layout
    refs = labelled_references(layout)
    try:
        check_enough(refs, settings.train_min_images)
    except TrainingDataError as exc:
        return {"train": False, "reason": str(exc), "references": len(refs)}
    base = base_of(settings.backbone)
    out = {"references": len(refs), "trigger": trigger}
    if force:
        return {**out, "train": True, "reason": "asked for (Param force)"}
    version = current_embedder(layout)
    if version is None:
        return {**out, "train": True, "reason": "no trained embedder yet"}
    try:
        manifest = read_embedder(layout, version)
        before = {
            str(k): int(v) for k, v in read_json(embedder_dir(layout, version) / LABELS).items()
        }
    except (EmbedderDamaged, OSError, ValueError) as exc:
        return {**out, "train": True, "reason": f"the CURRENT embedder cannot be used: {exc}"}
    if manifest["base"]["name"] != base:
        return {
            **out,
            "train": True,
            "reason": f"CURRENT embedder is of {manifest['base']['name']}, the backbone is {base}",
        }
    now = {r.image_id: r.class_id for r in refs}
    if labels_fingerprint(now.items()) == manifest["labels"]["fingerprint"]:
        return {
            **out,
            "train": False,
            "reason": f"the labelled references are those {version} was trained on",
        }
    changed = sum(1 for k, v in now.items() if before.get(k) != v) + sum(
        1 for k in before if k not in now
    )
    share = changed / max(len(before), 1)
    new_classes = sorted({r.class_id for r in refs} - set(before.values()))
    out = {**out, "changed": changed, "changed_share": round(share, 4), "new_classes": new_classes}
    if trigger != "asset":
        return {
            **out,
            "train": True,
            "reason": f"{changed} labelled references added, relabelled or gone since {version}",
        }
    if new_classes:
        return {
            **out,
            "train": True,
            "reason": f"{len(new_classes)} new class(es) since {version}: {new_classes[:5]}",
        }
    if share > settings.train_refresh:
        return {
            **out,
            "train": True,
            "reason": f"{share:.1%} of the labelled references changed since {version} "
            f"(more than IMGSIM_TRAIN_REFRESH {settings.train_refresh:.0%})",
        }
    return {
        **out,
        "train": False,
        "reason": f"{share:.1%} of the labelled references changed since {version} (at "
        f"most IMGSIM_TRAIN_REFRESH {settings.train_refresh:.0%}); the next scheduled run "
        "retrains",
    }


def trigger_of(dag_run: Any) -> str:
    """``asset`` for a run started by a published index version, else ``schedule``."""
    run_type = str(getattr(dag_run, "run_type", "") or "")
    return "asset" if "asset" in run_type.lower() else "schedule"


def run_task(
    settings: Settings, epochs: int | None, mode: str | None, run_id: str
) -> dict[str, Any]:
    """The ``imgsim_train`` DAG's ``train`` task: a summary for XCom. Permanent errors (too few
    labels, a NaN loss, another run training, a bad setting) fail the task at once."""
    from imgsim.config import check_setting

    if mode is not None:
        check_setting("train_mode", mode, "training mode (Param mode or IMGSIM_TRAIN_MODE)")
    config = TrainConfig.from_settings(settings, epochs=epochs, mode=mode)
    try:
        result = run_training(settings, config, run_id=run_id)
    except (TrainingError, ValueError) as exc:  # permanent: no retry can fix them
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
    print(result.reason)
    return {
        "published": result.published,
        "version": result.version,
        "reason": result.reason,
        "held_out": {k: result.metrics[k] for k in ("chosen", "baseline", "held_out")},
        "best_epoch": result.manifest["best_epoch"] if result.manifest else None,
        "seconds": result.seconds,
    }
