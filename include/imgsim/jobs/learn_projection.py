"""Learn the index's projection (LDA from the labels, or whitening) where the vectors are.

    spark-submit --master 'local[*]' spark_jobs/learn_projection.py \
        --data-root data --backbone resnet18 --kind auto --out data/runs/<run>/projection

Reads the live catalog and the newest vector per image (as ``fit_lsh.py`` does), reduces them
to counts, sums and scatter per class on the executors
(:func:`imgsim.jobs.spark_projection.stats_of`),
collects a seeded sample of at most ``--cv-sample`` labelled vectors for the cross-validation,
and solves the small eigenproblem on the driver (:func:`imgsim.ann.projection.choose`). Writes
``projection.npz`` and ``projection.json`` into ``--out``; ``fit_lsh.py --projection-dir`` puts
them into the version and fits the LSH in the projected space.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pyspark.sql import SparkSession

from imgsim.ann.projection import CV_SAMPLE, KINDS, choose, holdout_tuning, write_choice
from imgsim.config import Layout, setting_default
from imgsim.jobs import run_application
from imgsim.jobs.spark_io import live_vectors, read_embeddings, read_live_catalog
from imgsim.jobs.spark_projection import labelled_sample, stats_of

log = logging.getLogger("imgsim.learn_projection")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--backbone", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--kind", default=setting_default("projection"), choices=KINDS)
    p.add_argument("--min-coverage", type=float, default=setting_default("projection_min_coverage"))
    p.add_argument(
        "--cv-sample",
        type=int,
        default=CV_SAMPLE,
        help="labelled vectors collected for the cross-validation (at most)",
    )
    p.add_argument("--seed", type=int, default=setting_default("lsh_seed"))
    p.add_argument(
        "--target-recall",
        type=float,
        default=setting_default("target_recall"),
        help="recall@5 the LSH is tuned for in the learned space (held out)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.min_coverage <= 1.0:
        p.error("--min-coverage must be in [0, 1]")
    if args.cv_sample < 10:
        p.error("--cv-sample must be >= 10")
    return args


def run(spark: SparkSession, args: argparse.Namespace) -> dict[str, object]:
    layout = Layout(args.data_root.resolve())
    embeddings, _ = read_embeddings(spark, layout, args.backbone)
    data = (
        live_vectors(read_live_catalog(spark, layout), embeddings)
        .select("image_id", "vector", "class_id")
        .cache()
    )
    first = data.select("vector").first()
    if first is None:
        raise ValueError("no live image has an embedding: nothing to learn a projection from")
    stats = stats_of(data, len(first.vector))
    x, y = labelled_sample(data, args.cv_sample, args.seed)
    choice = choose(
        stats,
        args.kind,
        cv_vectors=x if len(x) else None,
        cv_labels=y if len(y) else None,
        seed=args.seed,
        min_coverage=args.min_coverage,
    )
    # Held-out LSH tuning for a map learned from labels, on the labelled sample (as the task's
    # engine does; a whitened space is tuned by the fit job).
    tuning = (
        holdout_tuning(choice, x, y, target=args.target_recall, seed=args.seed)
        if choice.projection.kind == "lda"
        else None
    )
    entry = write_choice(choice, args.out, tuning)
    log.info(
        "projection %s (%s -> %s dims): %s",
        entry["kind"],
        entry["dim"],
        entry["dims"],
        choice.reason,
    )
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_application("imgsim-learn-projection", lambda spark: run(spark, args))
