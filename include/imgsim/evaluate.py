"""Evaluation of a published model version with a labelled query set.

For each query image (with its class): the k neighbours the published LSH returns (the NumPy
twin of the Spark model, same hashes) and the exact k nearest references. Reports
precision@k and hit@k by class label (LSH and exact), recall@k of the LSH answers against
exact search, and the share of the reference set the LSH compared per query.

``evaluate_sample`` reproduces the README's figures from the shared Stanford Cars sample:
it splits the photos by a fixed seed into reference and query sets, builds a model version
from the reference set with the same code the DAG runs (catalog, embed, spark-submit fit,
validate, publish) in a scratch data root, and evaluates the query set against it.
"""

from __future__ import annotations

import csv
import logging
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import PROJECT_ROOT, Settings
from imgsim.fsutil import atomic_copy, atomic_open, atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    class_id: int


def read_query_set(images: Path, labels_csv: Path) -> list[LabelledImage]:
    """Images listed in a labels CSV (columns Class, image) that exist under ``images``."""
    from imgsim.sources.labels import read_labels_csv

    labels = read_labels_csv(labels_csv)
    out = [LabelledImage(images / name, rec.class_id) for name, rec in sorted(labels.items())
           if (images / name).is_file()]
    if not out:
        raise ValueError(f"no image listed in {labels_csv} exists under {images}")
    return out


def evaluate(settings: Settings, queries: list[LabelledImage], *, version: str | None = None,
             k: int = 5) -> dict[str, Any]:
    from imgsim.lookup import embed_files, load_model, load_query_backbone, lookup
    from imgsim.lsh import exact_search, l2_normalize

    model = load_model(settings.layout, version)
    backbone = load_query_backbone(model.manifest, weights_path=settings.weights_path,
                                   device=settings.device)
    good, bad = embed_files(backbone, [q.path for q in queries], batch_size=settings.batch_size)
    usable = [q for q in queries if str(q.path) in good]
    vectors = l2_normalize(np.stack([good[str(q.path)] for q in usable]))
    answers = lookup(model, vectors, k)
    ref_class = np.array([m["class_id"] if m["class_id"] is not None else -1
                          for m in model.meta])
    n_ref = len(model.ids)
    per_k = {"lsh_precision": np.zeros(k), "lsh_hit": np.zeros(k),
             "exact_precision": np.zeros(k), "exact_hit": np.zeros(k)}
    recalls, shares, short = [], [], 0
    for q, vec, ans in zip(usable, vectors, answers, strict=True):
        exact = exact_search(vec, model.vectors, k).indices
        approx_ids = [n.image_id for n in ans.neighbours]
        index_of = {iid: i for i, iid in enumerate(model.ids)}
        approx = np.array([index_of[i] for i in approx_ids], dtype=int)
        recalls.append(len(set(exact.tolist()) & set(approx.tolist())) / k)
        shares.append(ans.candidates / n_ref)
        short += int(len(approx) < k)
        for name, idx in (("lsh", approx), ("exact", exact)):
            same = np.zeros(k)
            same[: len(idx)] = ref_class[idx] == q.class_id
            cum = np.cumsum(same)
            per_k[f"{name}_precision"] += cum / np.arange(1, k + 1)
            per_k[f"{name}_hit"] += cum > 0
    n = max(len(usable), 1)
    curves = {key: (val / n).round(4).tolist() for key, val in per_k.items()}
    return {
        "model_version": model.version,
        "backbone": model.manifest["backbone"].get("name"),
        "lsh": model.manifest["lsh"],
        "reference_images": n_ref,
        "queries": len(usable),
        "rejected_queries": {str(p): r.reason for p, r in bad.items()},
        "k": k,
        f"precision_at_{k}": curves["lsh_precision"][-1],
        f"hit_at_{k}": curves["lsh_hit"][-1],
        "hit_at_1": curves["lsh_hit"][0],
        f"exact_precision_at_{k}": curves["exact_precision"][-1],
        f"exact_hit_at_{k}": curves["exact_hit"][-1],
        f"recall_at_{k}_vs_exact": round(float(np.mean(recalls)), 4) if recalls else None,
        "candidates_share_mean": round(float(np.mean(shares)), 4) if shares else None,
        "short_answers": short,
        "curves": curves,
        "chance_precision": round(1.0 / max(len(set(ref_class.tolist()) - {-1}), 1), 4),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """precision@i and hit@i for i = 1..k, LSH against exact search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    xs = list(range(1, k + 1))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("lsh_precision", "-o"), ("exact_precision", "--o"),
                       ("lsh_hit", "-s"), ("exact_hit", "--s")):
        ax.plot(xs, report["curves"][key], style, label=key.replace("_", " "))
    ax.axhline(report["chance_precision"], color="grey", lw=0.8, label="chance precision")
    ax.set_xlabel("k")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['backbone']} {report['model_version']}: {report['queries']} queries, "
                 f"LSH compares {100 * (report['candidates_share_mean'] or 0):.0f}%",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    paths = {"json": out_dir / "evaluation.json", "png": out_dir / "evaluation.png"}
    atomic_write_json(paths["json"], report)
    plot(report, paths["png"])
    return paths


# -- the shared sample, end to end --------------------------------------------------------------

def split_sample(sample: Path, seed: int, query_share: float
                 ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Per class, a seeded share of the photos becomes queries; the rest is the reference set."""
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_class.setdefault(row["Class"], []).append(row)
    rng = random.Random(seed)
    reference, queries = [], []
    for cls in sorted(by_class, key=int):
        members = sorted(by_class[cls], key=lambda r: r["image"])
        rng.shuffle(members)
        n_q = max(1, round(len(members) * query_share))
        queries += members[:n_q]
        reference += members[n_q:]
    return reference, queries


def build_reference_index(settings: Settings, sample: Path, reference: list[dict[str, str]],
                          backbone: str, run_id: str = "evaluate") -> str:
    """Index ``reference`` photos with the DAG's own task functions; returns the version."""
    from imgsim import pipeline
    from imgsim.envsetup import embedded_environment

    layout = settings.layout
    src = layout.images / "reference"
    src.mkdir(parents=True, exist_ok=True)
    for row in reference:
        target = src / row["image"]
        if not target.exists():
            atomic_copy(sample / "images" / row["image"], target)
    labels_csv = layout.raw / "reference_labels.csv"
    labels_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(labels_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Class", "image", "class_name"])
        w.writerows([r["Class"], r["image"], r["class_name"]] for r in reference)
    cat = pipeline.catalog(settings, str(src), str(labels_csv), "2026-01-01", run_id, backbone)
    for shard in pipeline.plan_shards(settings, cat["to_embed_file"], run_id):
        pipeline.embed_shard(settings, shard["spec"], backbone)
    plan = pipeline.fit_plan(settings, backbone, settings.lsh_num_hash_tables,
                             settings.lsh_bucket_length)
    if plan:
        env = embedded_environment()
        cmd = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[*]",
               str(PROJECT_ROOT / "spark_jobs" / "fit_lsh.py"), "--data-root", str(layout.root),
               "--backbone", backbone, "--version", plan["version"],
               "--num-hash-tables", str(plan["num_hash_tables"]),
               "--bucket-length", str(plan["bucket_length"]), "--run-id", run_id]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"fit_lsh failed:\n{proc.stderr[-4000:]}")
        pipeline.validate(settings, plan)
        pipeline.publish(settings, plan["version"])
        return str(plan["version"])
    from imgsim.models import current_version

    return str(current_version(layout))


def evaluate_sample(sample: Path, data_root: Path, out_dir: Path, *, seed: int = 0,
                    query_share: float = 0.2, k: int = 5,
                    backbone: str = "efficientnet_lite0") -> dict[str, Any]:
    from dataclasses import replace

    settings = replace(Settings.from_env(), data_root=data_root.resolve(), backbone=backbone)
    reference, queries = split_sample(sample, seed, query_share)
    version = build_reference_index(settings, sample, reference, backbone)
    query_set = [LabelledImage(sample / "images" / r["image"], int(r["Class"])) for r in queries]
    report = evaluate(settings, query_set, version=version, k=k)
    report["split"] = {"seed": seed, "query_share": query_share, "reference": len(reference),
                       "queries": len(queries), "sample": str(sample)}
    write_report(report, out_dir)
    return report
