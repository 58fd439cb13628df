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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import Settings
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
    out = [
        LabelledImage(images / name, rec.class_id)
        for name, rec in sorted(labels.items())
        if (images / name).is_file()
    ]
    if not out:
        raise ValueError(f"no image listed in {labels_csv} exists under {images}")
    return out


def score(
    model: Any, queries: list[LabelledImage], raw: np.ndarray, k: int, expansion: int = 0
) -> dict[str, Any]:
    """Label precision/hit@i (i = 1..k) of ``model``'s answers (LSH as published, with
    ``expansion``) and of exact search in the same space; recall@k of the LSH against exact
    search, share of the index compared, milliseconds per query."""
    import time

    from imgsim.ann import METHODS, exact_search
    from imgsim.query.lookup import lookup

    t0 = time.perf_counter()
    answers = lookup(model, raw, k, expansion)
    query_ms = 1000 * (time.perf_counter() - t0) / max(len(queries), 1)
    space = model.to_search_space(raw)
    ref_class = np.array([m["class_id"] if m["class_id"] is not None else -1 for m in model.meta])
    index_of = {iid: i for i, iid in enumerate(model.ids)}
    n_ref = len(model.ids)
    per_k = {
        "lsh_precision": np.zeros(k),
        "lsh_hit": np.zeros(k),
        "exact_precision": np.zeros(k),
        "exact_hit": np.zeros(k),
    }
    recalls, shares, methods = [], [], {m: 0 for m in METHODS}
    for q, vec, ans in zip(queries, space, answers, strict=True):
        exact = exact_search(vec, model.vectors, k).indices
        approx = np.array([index_of[n.image_id] for n in ans.neighbours], dtype=int)
        recalls.append(len(set(exact.tolist()) & set(approx.tolist())) / max(len(exact), 1))
        shares.append(ans.candidates / n_ref)
        methods[ans.method] += 1
        for name, idx in (("lsh", approx), ("exact", exact)):
            same = np.zeros(k)
            same[: len(idx)] = ref_class[idx] == q.class_id
            cum = np.cumsum(same)
            per_k[f"{name}_precision"] += cum / np.arange(1, k + 1)
            per_k[f"{name}_hit"] += cum > 0
    n = max(len(queries), 1)
    curves = {key: (val / n).round(4).tolist() for key, val in per_k.items()}
    return {
        f"precision_at_{k}": curves["lsh_precision"][-1],
        "hit_at_1": curves["lsh_hit"][0],
        f"hit_at_{k}": curves["lsh_hit"][-1],
        f"exact_precision_at_{k}": curves["exact_precision"][-1],
        "exact_hit_at_1": curves["exact_hit"][0],
        f"exact_hit_at_{k}": curves["exact_hit"][-1],
        f"recall_at_{k}_vs_exact": round(float(np.mean(recalls)), 4) if recalls else None,
        "candidates_share_mean": round(float(np.mean(shares)), 4) if shares else None,
        "answered_by": methods,
        "query_ms": round(query_ms, 3),
        "curves": curves,
    }


def evaluate(
    settings: Settings,
    queries: list[LabelledImage],
    *,
    version: str | None = None,
    k: int = 5,
    compare: bool = True,
) -> dict[str, Any]:
    """The published version's answers (default settings at the top level) and, with
    ``compare``, every projection kind side by side (:func:`compare_kinds`)."""
    from imgsim.query.lookup import embed_files, load_model, load_query_backbone

    model = load_model(settings.layout, version)
    backbone = load_query_backbone(
        model.manifest,
        weights_path=settings.weights_path,
        device=settings.device,
        embedders=settings.layout.embedders,
    )
    good, bad = embed_files(
        backbone,
        [q.path for q in queries],
        batch_size=settings.batch_size,
        max_pixels=settings.max_image_pixels,
    )
    usable = [q for q in queries if str(q.path) in good]
    if not usable:
        raise ValueError(
            f"none of the {len(queries)} query images could be embedded: "
            f"{sorted({r.reason for r in bad.values()})}"
        )
    raw = np.stack([good[str(q.path)] for q in usable])
    ref_class = [m["class_id"] for m in model.meta if m["class_id"] is not None]
    expansion = settings.query_expansion
    report = {
        "model_version": model.version,
        "backbone": model.manifest["backbone"].get("name"),
        "lsh": model.manifest["lsh"],
        "projection": _projection_summary(model.manifest.get("projection")),
        "query_expansion": expansion,
        "reference_images": len(model.ids),
        "queries": len(usable),
        "rejected_queries": {str(p): r.reason for p, r in bad.items()},
        "k": k,
        **score(model, usable, raw, k, expansion),
        "chance_precision": round(1.0 / max(len(set(ref_class)), 1), 4),
    }
    if compare:
        report["kinds"] = compare_kinds(settings, model, usable, raw, k)
    return report


def _projection_summary(entry: dict[str, Any] | None) -> dict[str, Any]:
    entry = entry or {"kind": "none"}
    return {
        key: entry.get(key)
        for key in ("kind", "dim", "dims", "reason", "coverage", "params", "seconds")
    }


def compare_kinds(
    settings: Settings, model: Any, queries: list[LabelledImage], raw: np.ndarray, k: int
) -> list[dict[str, Any]]:
    """Each projection kind (none, whiten, lda), without and with query expansion, on the
    version's references: the projection learned as the index learns it, the LSH auto-tuned in
    its space (the fit job's tuner and grid) over NumPy-drawn projections (the twin of Spark's).
    The published version's own rows come first."""
    import time
    from dataclasses import replace

    from imgsim.ann import BrpParams, hash_vectors
    from imgsim.ann.projection import (
        TUNE_KEYS_PER_BAND,
        TUNE_PROBES,
        ProjectionError,
        choose,
        holdout_tuning,
        stats_from_arrays,
    )
    from imgsim.ann.tuning import LshConfig, data_scale, random_unit_vectors, tune
    from imgsim.store import load_vectors

    expansions = sorted({0, 1, settings.query_expansion})  # without and with re-ranking
    rows = [
        {
            "kind": f"{model.manifest.get('projection', {}).get('kind', 'none')} "
            "(published version, as lookups answer)",
            "expansion": e,
            **_brief(score(model, queries, raw, k, e), k),
        }
        for e in expansions
    ]
    ids, vectors = load_vectors(
        settings.layout, model.manifest["backbone"]["name"], ids=set(model.ids)
    )
    pos = {iid: i for i, iid in enumerate(ids)}
    order = [pos[i] for i in model.ids]
    x = vectors[order]
    y = np.array([-1 if m["class_id"] is None else int(m["class_id"]) for m in model.meta])
    stats = stats_from_arrays(x, y)
    lab = y >= 0
    for kind in ("none", "whiten", "lda"):
        t0 = time.perf_counter()
        try:
            choice = choose(
                stats,
                kind,
                cv_vectors=x[lab],
                cv_labels=y[lab],
                seed=settings.lsh_seed,
                min_coverage=settings.projection_min_coverage,
            )
        except ProjectionError as exc:
            rows.append({"kind": kind, "skipped": str(exc)})
            continue
        learn_s = time.perf_counter() - t0
        proj = None if choice.projection.kind == "none" else choice.projection
        space = choice.projection.apply(x)
        t0 = time.perf_counter()
        held = (
            holdout_tuning(
                choice, x[lab], y[lab], target=settings.target_recall, seed=settings.lsh_seed
            )
            if choice.projection.kind == "lda"
            else None
        )
        if held is not None:  # as the index does: tuned on held-out references
            c = held["choice"]
            tuned = LshConfig(
                c["tables"],
                c["keys_per_band"],
                c["width_factor"] * data_scale(space, settings.lsh_seed),
                c["probes"],
            )
        else:
            tuned = tune(
                space,
                target=settings.target_recall,
                k=k,
                seed=settings.lsh_seed,
                keys_per_band=TUNE_KEYS_PER_BAND,
                probes=TUNE_PROBES,
            ).choice.config
        params = BrpParams(
            random_unit_vectors(tuned.projections, space.shape[1], settings.lsh_seed),
            tuned.bucket_length,
        )
        manifest = {
            **model.manifest,
            "version": f"twin-{kind}",
            "lsh": {
                "keys_per_band": tuned.keys_per_band,
                "probes": tuned.probes,
                "bands": tuned.tables,
                "numHashTables": tuned.projections,
                "bucketLength": tuned.bucket_length,
            },
        }
        twin = replace(
            model,
            version=f"twin-{kind}",
            manifest=manifest,
            vectors=space,
            hashes=hash_vectors(params, space),
            params=params,
            _index=None,
            projection=proj,
        )
        fit_s = learn_s + time.perf_counter() - t0
        for e in expansions:
            rows.append(
                {
                    "kind": kind,
                    "expansion": e,
                    "dims": choice.projection.dims,
                    "projection_seconds": round(learn_s, 3),
                    "fit_seconds": round(fit_s, 3),
                    "lsh": tuned.as_dict(),
                    **_brief(score(twin, queries, raw, k, e), k),
                }
            )
    return rows


def _brief(result: dict[str, Any], k: int) -> dict[str, Any]:
    return {
        key: result[key]
        for key in (
            f"precision_at_{k}",
            "hit_at_1",
            f"hit_at_{k}",
            f"exact_precision_at_{k}",
            "exact_hit_at_1",
            f"recall_at_{k}_vs_exact",
            "candidates_share_mean",
            "query_ms",
            "answered_by",
            "curves",
        )
    }


def table(report: dict[str, Any]) -> list[str]:
    """The side-by-side comparison as text lines (the CLI prints them)."""
    k = report["k"]
    lines = [
        f"  {'search space':<44} {'QE':>2} {'P@' + str(k):>6} {'hit@1':>6} "
        f"{'hit@' + str(k):>6} {'exactP@' + str(k):>8} {'recall':>6} {'compared':>8} "
        f"{'ms/q':>6}"
    ]
    for row in report.get("kinds", []):
        if "skipped" in row:
            lines.append(f"  {row['kind']:<44} skipped: {row['skipped']}")
            continue
        name = row["kind"] if "dims" not in row else f"{row['kind']} ({row['dims']}-d, twin)"
        lines.append(
            f"  {name:<44} {row['expansion']:>2} {row[f'precision_at_{k}']:>6.3f} "
            f"{row['hit_at_1']:>6.3f} {row[f'hit_at_{k}']:>6.3f} "
            f"{row[f'exact_precision_at_{k}']:>8.3f} {row[f'recall_at_{k}_vs_exact']:>6.3f} "
            f"{100 * row['candidates_share_mean']:>7.1f}% {row['query_ms']:>6.2f}"
        )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """precision@i and hit@i for i = 1..k, LSH against exact search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    xs = list(range(1, k + 1))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (
        ("lsh_precision", "-o"),
        ("exact_precision", "--o"),
        ("lsh_hit", "-s"),
        ("exact_hit", "--s"),
    ):
        ax.plot(xs, report["curves"][key], style, label=key.replace("_", " "))
    for row in report.get("kinds", []):
        if "curves" in row and "dims" in row:
            ax.plot(
                xs,
                row["curves"]["lsh_precision"],
                ":",
                lw=1,
                label=f"precision {row['kind']}{' +QE' if row['expansion'] else ''} (twin)",
            )
    ax.axhline(report["chance_precision"], color="grey", lw=0.8, label="chance precision")
    ax.set_xlabel("k")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"{report['backbone']} {report['model_version']}: {report['queries']} queries, "
        f"LSH compares {100 * (report['candidates_share_mean'] or 0):.0f}%",
        fontsize=9,
    )
    ax.legend(fontsize=6, ncol=2)
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


def split_sample(
    sample: Path, seed: int, query_share: float
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


def build_reference_index(
    settings: Settings,
    sample: Path,
    reference: list[dict[str, str]],
    backbone: str,
    run_id: str = "evaluate",
) -> tuple[str, dict[str, float]]:
    """Index ``reference`` photos with the DAG's own task functions: (version, seconds per
    stage)."""
    import time

    from imgsim.index import pipeline

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
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    cat = pipeline.catalog(settings, str(src), str(labels_csv), "2026-01-01", run_id, backbone)
    backbone = cat["backbone"]  # the CURRENT trained embedder, once there is one
    for shard in pipeline.plan_shards(settings, cat["to_embed_file"], run_id):
        pipeline.embed_shard(settings, shard["spec"], backbone)
    seconds["catalog_and_embed"] = time.perf_counter() - t0
    plan = pipeline.fit_plan(
        settings, backbone, settings.lsh_num_hash_tables, settings.lsh_bucket_length, run_id=run_id
    )
    if plan:
        t0 = time.perf_counter()
        pipeline.learn_projection(settings, plan)
        seconds["projection"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline.submit_fit(plan, run_id)
        seconds["fit_spark_submit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipeline.validate(settings, plan)
        pipeline.publish(settings, plan["version"])
        seconds["validate_and_publish"] = time.perf_counter() - t0
        return str(plan["version"]), {k: round(v, 2) for k, v in seconds.items()}
    from imgsim.versions.models import current_version

    return str(current_version(layout)), {k: round(v, 2) for k, v in seconds.items()}


def evaluate_sample(
    sample: Path,
    data_root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    query_share: float = 0.2,
    k: int = 5,
    backbone: str = "efficientnet_lite0",
    train_epochs: int | None = None,
) -> dict[str, Any]:
    """The frozen backbone's version, evaluated; with ``train_epochs``, then the embedding
    trained on the reference part (``imgsim train``'s code: the queries are never trained on),
    the index rebuilt with it as the next index run would, and evaluated the same way
    (``report["trained"]``; ``report["training"]``: the held-out comparison)."""
    settings = Settings.from_env().replace(
        data_root=data_root.resolve(), backbone=backbone, embedder="current"
    )
    reference, queries = split_sample(sample, seed, query_share)
    version, seconds = build_reference_index(settings, sample, reference, backbone)
    query_set = [LabelledImage(sample / "images" / r["image"], int(r["Class"])) for r in queries]
    report = evaluate(settings, query_set, version=version, k=k)
    report["build_seconds"] = seconds
    if train_epochs:
        from imgsim.training.train import TrainConfig, run_training

        result = run_training(
            settings, TrainConfig.from_settings(settings, epochs=train_epochs), run_id="evaluate"
        )
        report["training"] = {
            "published": result.published,
            "version": result.version,
            "reason": result.reason,
            "held_out": result.metrics,
            "curve": result.curve,
            "seconds": result.seconds,
        }
        if result.published:
            trained_version, trained_seconds = build_reference_index(
                settings, sample, reference, backbone, run_id="evaluate-trained"
            )
            trained = evaluate(settings, query_set, version=trained_version, k=k)
            trained["build_seconds"] = trained_seconds
            report["trained"] = trained
    report["split"] = {
        "seed": seed,
        "query_share": query_share,
        "reference": len(reference),
        "queries": len(queries),
        "sample": str(sample),
    }
    write_report(report, out_dir)
    return report
