"""Training the embedding: frozen + LDA vs trained vs trained + LDA on unseen photos.

    .venv/bin/python benchmarks/bench_training.py [--set train|sample] [--epochs 8]

``--set train`` (the default): the whole Stanford Cars training split
(``../shared/data/stanford_cars_train/cars_train.tgz``, 8,144 photos, labels
``cardatasettrain.csv``). Per class, 2 photos (seed 0) become the evaluation queries and are
never indexed nor trained on; the rest are the references. ``--set sample``: the 1,960-photo
sample's seed-0 split of ``imgsim evaluate --sample`` (2 queries and 8 references per class).

The references go through the index DAG's own task bodies (catalog, embed with the frozen
efficientnet_lite0 on the default ONNX runtime), then ``imgsim.training.train.run_training``
(the ``imgsim train`` code: held-out split of the references, cached frozen stages, the top
trained, published only if it beats frozen + LDA on the held-out photos), then the references
are embedded again with the trained embedder through the same embed task (the daily run's
code path) and the queries with both. Exact search, label hit@1 / precision@5 / hit@5 of the
queries for: frozen, frozen + LDA, trained, trained + LDA (each LDA learned from the
references' labels as the index learns it). Also the time of each stage, peak memory, and the
embed throughput of the frozen and the trained embedder measured in the same run. Writes
``results/training.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import resource
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, WORK_DIR, md_table, require_sample, write_result

SHARED = PROJECT_ROOT.parent / "shared" / "data"
TRAIN_TGZ = SHARED / "stanford_cars_train" / "cars_train.tgz"
TRAIN_LABELS = SHARED / "stanford_cars_labels" / "cardatasettrain.csv"
QUERIES_PER_CLASS = 2


def _rows_train(work: Path) -> tuple[Path, list[dict[str, str]]]:
    if not TRAIN_TGZ.exists():
        sys.exit(f"benchmark needs {TRAIN_TGZ} (the shared Stanford Cars training split)")
    folder = work / "extracted"
    if not (folder / "cars_train").is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        with tarfile.open(TRAIN_TGZ) as tar:
            tar.extractall(folder, filter="data")
    with open(TRAIN_LABELS, newline="") as fh:
        rows = [{"Class": r["Class"], "image": r["image"]} for r in csv.DictReader(fh)]
    return folder / "cars_train", rows


def _rows_sample() -> tuple[Path, list[dict[str, str]]]:
    sample = require_sample()
    with open(sample / "labels.csv", newline="") as fh:
        rows = [{"Class": r["Class"], "image": r["image"]} for r in csv.DictReader(fh)]
    return sample / "images", rows


def split(
    rows: list[dict[str, str]], seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Per class, ``QUERIES_PER_CLASS`` seeded photos are queries, the rest references."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_class.setdefault(r["Class"], []).append(r)
    rng = random.Random(seed)
    refs, queries = [], []
    for cls in sorted(by_class, key=int):
        members = sorted(by_class[cls], key=lambda r: r["image"])
        rng.shuffle(members)
        queries += members[:QUERIES_PER_CLASS]
        refs += members[QUERIES_PER_CLASS:]
    return refs, queries


def _embed_store(settings: Any, cat: dict[str, Any], backbone: str, run_id: str) -> float:
    from imgsim.index import pipeline

    t0 = time.perf_counter()
    for shard in pipeline.plan_shards(settings, cat["to_embed_file"], run_id):
        pipeline.embed_shard(settings, shard["spec"], backbone)
    return time.perf_counter() - t0


def _metrics(q: np.ndarray, qy: np.ndarray, r: np.ndarray, ry: np.ndarray) -> dict[str, float]:
    from imgsim.training.train import retrieval_metrics

    return retrieval_metrics(q, qy, r, ry)


def _lda(r: np.ndarray, ry: np.ndarray, seed: int) -> Any:
    from imgsim.ann.projection import choose, stats_from_arrays

    return choose(
        stats_from_arrays(r, ry), "lda", cv_vectors=r, cv_labels=ry, seed=seed, min_coverage=0.0
    ).projection


def _query_vectors(backbone: str, settings: Any, paths: list[Path]) -> tuple[np.ndarray, float]:
    from imgsim.embedding.backbones import load_backbone
    from imgsim.query.lookup import embed_files

    bb = load_backbone(
        backbone,
        runtime="onnx",
        cache_dir=settings.model_cache,
        embedders=settings.layout.embedders,
    )
    t0 = time.perf_counter()
    good, bad = embed_files(bb, paths, batch_size=settings.batch_size)
    if bad:
        raise SystemExit(f"{len(bad)} queries could not be embedded: {bad}")
    return np.stack([good[str(p)] for p in paths]), time.perf_counter() - t0


def render(data: dict[str, Any], argv: list[str]) -> str:
    """The Markdown section of a result (``--report-only`` re-renders it from the JSON)."""
    table = data["queries"]
    emb = data["embedder"]
    sec = data["seconds"]
    rows_md = [
        [name, m["dims"], m["hit_at_1"], m["precision_at_5"], m["hit_at_5"]]
        for name, m in table.items()
    ]
    label = (
        "the 8,144-photo training split (2 queries per class, seed 0, never indexed or trained on)"
        if data["set"] == "train"
        else "the 1,960-photo sample's seed-0 split (2 queries, 8 references per class)"
    )
    curve_md = md_table(
        ["epoch", "loss", "held-out hit@1", "held-out P@5", "s"],
        [
            [c["epoch"], c["loss"], c["held_hit_at_1"], c["held_precision_at_5"], c["seconds"]]
            for c in emb["curve"]
        ],
    )
    q = data["query_embed_images_per_s"]
    store = data["embed_store_images_per_s"]
    frozen_store = f"{store['frozen']} images/s" if store.get("frozen") else "not measured (--keep)"
    split = data["split"]
    return f"""## Training the embedding ({data["set"]})

`{" ".join(["benchmarks/bench_training.py", *argv])}`: {label};
{split["references"]} references, {split["queries"]} queries, exact search, label metrics of
the queries (frozen: efficientnet_lite0 as it is; trained: its top trained by `imgsim train`).

{md_table(["embedding", "dims", "hit@1", "precision@5", "hit@5"], rows_md)}

Trained hit@1 minus frozen + LDA: **{data["trained_minus_frozen_lda_hit_at_1"]:+.3f}**. Training
({emb["mode"]} mode, {emb["epochs"]} epochs, best {emb["best_epoch"]} by held-out hit@1 on
{emb["held_out"]["held_out"]} photos): cache of the frozen stages {sec.get("training_cache")} s,
epochs {sec.get("training_train")} s, the whole run {sec.get("training_total")} s; peak RSS
{data["peak_rss_mib_training"] / 1024:.1f} GiB. Embedding with the default runtime (ONNX fp32),
the same {split["queries"]} query photos one after the other in one process: frozen
{q["frozen"]} images/s, trained {q["trained"]} images/s; the embed tasks over the references:
frozen {frozen_store}, trained {store["trained"]} images/s.

{curve_md}
"""


def main() -> None:
    from imgsim.config import Settings
    from imgsim.index import pipeline
    from imgsim.store import load_vectors, read_catalog
    from imgsim.training.train import TrainConfig, run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=("train", "sample"), default="train")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="reuse the data root of an earlier run")
    p.add_argument(
        "--report-only", action="store_true", help="re-render the .md from results/*.json"
    )
    args = p.parse_args()
    if args.report_only:
        from common import RESULTS_DIR

        data = json.loads((RESULTS_DIR / f"training_{args.set}.json").read_text())
        md = render(data, data["command"].split()[1:])
        (RESULTS_DIR / f"training_{args.set}.md").write_text(md.rstrip() + "\n")
        print(md)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = WORK_DIR / f"training-{args.set}"
    images, rows = _rows_train(work) if args.set == "train" else _rows_sample()
    refs, queries = split(rows, args.seed)
    root = work / "data"
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    settings = Settings.from_env().replace(
        data_root=root, backbone="efficientnet_lite0", runtime="onnx", train_epochs=args.epochs
    )
    layout = settings.layout
    src = layout.images / "reference"
    src.mkdir(parents=True, exist_ok=True)
    for r in refs:
        target = src / r["image"]
        if not target.exists():
            shutil.copyfile(images / r["image"], target)
    labels = layout.raw / "reference_labels.csv"
    labels.parent.mkdir(parents=True, exist_ok=True)
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Class", "image"])
        w.writerows([r["Class"], r["image"]] for r in refs)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    cat = pipeline.catalog(
        settings, str(src), str(labels), "2026-01-01", "bench", "efficientnet_lite0"
    )
    seconds["catalog"] = time.perf_counter() - t0
    n_frozen = int(cat.get("to_embed", cat.get("new", 0)) or 0)
    seconds["embed_frozen"] = _embed_store(settings, cat, "efficientnet_lite0", "bench")

    t0 = time.perf_counter()
    result = run_training(settings, TrainConfig.from_settings(settings), run_id="bench")
    seconds["train_total"] = time.perf_counter() - t0
    train_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logging.info("training: %s", result.reason)
    if not result.published:
        raise SystemExit(f"the trained embedder was not published: {result.reason}")
    trained = result.manifest["name"] if result.manifest else ""

    # the index follows the embedder: every reference embedded again through the embed task
    cat2 = pipeline.catalog(settings, str(src), str(labels), "2026-01-01", "bench2", trained)
    seconds["embed_trained"] = _embed_store(settings, cat2, trained, "bench2")

    live = {r["image_id"]: r for r in read_catalog(layout) if r["status"] == "live"}
    qpaths = [images / q["image"] for q in queries]
    qy = np.array([int(q["Class"]) for q in queries])
    table: dict[str, dict[str, Any]] = {}
    per_image: dict[str, float] = {}
    for name, backbone in (("frozen", "efficientnet_lite0"), ("trained", trained)):
        ids, vecs = load_vectors(layout, backbone, ids=set(live))
        ry = np.array([int(live[i]["class_id"]) for i in ids])
        qv, q_s = _query_vectors(backbone, settings, qpaths)
        per_image[name] = len(qpaths) / q_s
        table[name] = {**_metrics(qv, qy, vecs, ry), "dims": int(vecs.shape[1])}
        t0 = time.perf_counter()
        proj = _lda(vecs, ry, args.seed)
        table[f"{name} + LDA"] = {
            **_metrics(proj.apply(qv), qy, proj.apply(vecs), ry),
            "dims": proj.dims,
            "lda_seconds": round(time.perf_counter() - t0, 2),
        }
    seconds = {k: round(v, 1) for k, v in seconds.items()}
    gain = table["trained"]["hit_at_1"] - table["frozen + LDA"]["hit_at_1"]
    best_trained = max(("trained", "trained + LDA"), key=lambda k: table[k]["hit_at_1"])
    data = {
        "set": args.set,
        "split": {
            "seed": args.seed,
            "queries_per_class": QUERIES_PER_CLASS,
            "references": len(refs),
            "queries": len(queries),
            "classes": len({r["Class"] for r in rows}),
        },
        "embedder": {
            "version": result.version,
            "mode": result.manifest["mode"] if result.manifest else None,
            "epochs": args.epochs,
            "best_epoch": result.manifest["best_epoch"] if result.manifest else None,
            "held_out": result.metrics,
            "curve": result.curve,
        },
        "queries": table,
        "trained_minus_frozen_lda_hit_at_1": round(gain, 4),
        "best_trained": best_trained,
        "seconds": {**seconds, **{f"training_{k}": v for k, v in result.seconds.items()}},
        "peak_rss_mib_training": round(train_rss, 1),
        "embedded_references": n_frozen,
        "query_embed_images_per_s": {k: round(v, 1) for k, v in per_image.items()},
        "embed_store_images_per_s": {  # None: embedded by an earlier run (--keep)
            "frozen": round(n_frozen / seconds["embed_frozen"], 1) if n_frozen else None,
            "trained": round(len(live) / max(seconds["embed_trained"], 1e-9), 1),
        },
        "threads": os.cpu_count(),
    }
    md = render(data, sys.argv[1:])
    write_result(f"training_{args.set}", data, md)
    print(md)


if __name__ == "__main__":
    main()
