"""Fit BucketedRandomProjectionLSH on all live embeddings and write a new model version.

    spark-submit --master 'local[*]' spark_jobs/fit_lsh.py \
        --data-root data --backbone resnet18 --version v20261122T170000Z-ab12cd \
        --num-hash-tables 8 --bucket-length 0 --seed 42 --run-id manual

``--num-hash-tables 0`` asks for automatic parameters: the auto-tuner (:mod:`imgsim.ann.tuning`)
measures, on a seeded driver-side sample of at most ``--tune-sample`` reference vectors, the
leave-one-out recall@k against exact search of a grid of (numHashTables, bucketLength) and
picks the cheapest one (fewest candidates compared) that reaches ``--target-recall`` (default
``IMGSIM_TARGET_RECALL``, 0.95). A non-zero ``--bucket-length`` then fixes the width and only
the number of tables is tuned. The manifest keeps the curve and the choice (``tuning``).

``--keys-per-band K`` (AND-amplified keys) fits ``numHashTables = bands x K`` projections and
searches bands of K consecutive hash values; ``--probes P`` also looks up, per band, P
neighbouring buckets of the projections nearest a bucket boundary (multi-probe). Both are
recorded in the manifest (``lsh.bands``, ``lsh.keys_per_band``, ``lsh.probes``), and
``spark_jobs/query_lsh.py`` and ``imgsim.query.lookup`` search that way. The auto-tuner's grid
includes them (``--tune-keys-per-band``, ``--tune-probes``).

Reads ``catalog/catalog.parquet`` (live images) and ``embeddings/<backbone>/part-*.parquet``
(newest vector per image id) and L2-normalises the vectors. With ``--projection-dir`` (what
``spark_jobs/learn_projection.py`` or the DAG's learn_projection task wrote) they are mapped
into the learned space, the version keeps the projection (``projection/``), and, when
auto-tuning, the LSH takes the learn step's held-out tuning (it pulls its training vectors together,
so leave-one-out tuning on them would overstate recall). Then it fits the LSH, hashes the
reference set and writes, into ``models/lsh/.staging/<version>/``:

* ``model/``      the Spark model (``BucketedRandomProjectionLSHModel.load``)
* ``reference/``  the hashed reference table: image_id, path, class_id, class_name,
                  vector (array<float>, unit length), hashes (array<bigint>, one per table)
* ``projection/``  the learned projection, when there is one
* ``neighbours/``, ``duplicates/`` the neighbour graph and near-duplicate groups
  (:mod:`imgsim.jobs.neighbour_graph`)
* ``map.parquet`` the 2-D map of (a sample of) the references (:mod:`imgsim.jobs.version_map`)
* ``manifest.json`` written last: backbone, projection, LSH parameters, the fit settings it
  received (``fit_settings``), snapshot (ids and labels fingerprints), counts and metrics
  (leave-one-out recall@k against exact search on a sample, computed partition by partition).

The version is published by the DAG's validate/publish tasks, never by this job.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from pyspark.ml.feature import (
    BucketedRandomProjectionLSH,
    BucketedRandomProjectionLSHModel,
)
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from imgsim.config import DUPLICATE_VERIFIERS, Layout, setting_default
from imgsim.fsutil import atomic_write_json, read_json
from imgsim.jobs import run_application
from imgsim.jobs.bases import previous_graph, previous_map, space_fingerprint
from imgsim.jobs.spark_io import live_vectors, read_embeddings, read_live_catalog
from imgsim.jobs.version_map import build_map
from imgsim.store import labels_fingerprint, snapshot_fingerprint

log = logging.getLogger("imgsim.fit_lsh")

MANIFEST_FORMAT = 1
#: auto bucketLength = factor * median pair distance / sqrt(dim). Spark projects onto random
#: *unit* vectors, so a difference of length d projects to about d / sqrt(dim): with 1,280-d
#: unit-length embeddings a bucketLength of 1.0 puts every image in one bucket per table.
AUTO_BUCKET_FACTOR = 0.5
#: the auto-tuner works on at most this many reference vectors, collected on the driver.
MAX_TUNE_SAMPLE = 4000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--backbone", required=True)
    p.add_argument("--version", required=True)
    p.add_argument(
        "--num-hash-tables",
        type=int,
        default=setting_default("lsh_num_hash_tables"),
        help="number of hash tables (bands); 0 = auto-tune (with bucketLength)",
    )
    p.add_argument(
        "--keys-per-band",
        type=int,
        default=1,
        help="projections ANDed into one band key (1 = Spark's plain BRP)",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=0,
        help="extra buckets looked up per band (multi-probe), <= keys per band",
    )
    p.add_argument(
        "--bucket-length",
        type=float,
        default=setting_default("lsh_bucket_length"),
        help="bucket width on unit vectors; 0 = auto (see estimate_bucket_length)",
    )
    p.add_argument("--auto-bucket-factor", type=float, default=AUTO_BUCKET_FACTOR)
    p.add_argument("--seed", type=int, default=setting_default("lsh_seed"))
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--sample-size", type=int, default=setting_default("validation_sample"))
    p.add_argument("--run-id", default="manual")
    p.add_argument(
        "--base",
        default="current",
        help="the published version this fit may build on (update its graph), checked whole "
        "first: 'current' (CURRENT), a version, or 'none' for a full build (the fit plan's)",
    )
    p.add_argument(
        "--base-reason", default="", help="why the fit plan chose --base (kept in the manifest)"
    )
    p.add_argument(
        "--graph-k",
        type=int,
        default=setting_default("graph_k"),
        help="neighbours per reference in the version's neighbour graph; 0 = no graph",
    )
    p.add_argument(
        "--graph-bucket-cap",
        type=int,
        default=setting_default("graph_bucket_cap"),
        help="graph buckets larger than this are split at projection medians (leaves <= cap)",
    )
    p.add_argument(
        "--scan-below",
        type=int,
        default=setting_default("scan_below"),
        help="references x dims below which the graph is computed by exact search",
    )
    p.add_argument(
        "--map-points",
        type=int,
        default=setting_default("map_points"),
        help="references on the version's 2-D map (t-SNE of a sample chosen by image id, "
        "imgsim.jobs.version_map); 0: no map",
    )
    p.add_argument(
        "--duplicate-distance",
        type=float,
        default=setting_default("duplicate_distance"),
        help="pairs at or under this distance between the L2-normalised embeddings form "
        "near-duplicate groups (each image's first graph edges, rescored where the search "
        "space is a projection); 0: the distance measured on copies of sample photos",
    )
    p.add_argument(
        "--duplicate-verifier",
        choices=DUPLICATE_VERIFIERS,
        default=setting_default("duplicate_verifier"),
        help="orb: keep a candidate pair only when the thumbnails are the same photo "
        "(imgsim.ann.copies); none: every pair under the distance",
    )
    p.add_argument(
        "--duplicate-min-inliers",
        type=int,
        default=setting_default("duplicate_min_inliers"),
        help="RANSAC inliers from which a pair is one photo; 0: the measured default",
    )
    p.add_argument(
        "--projection-dir",
        type=Path,
        default=None,
        help="a learned projection (spark_jobs/learn_projection.py --out); the LSH "
        "is fitted in its space and the version keeps it",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="recall@k the auto-tuner aims for (default: IMGSIM_TARGET_RECALL)",
    )
    p.add_argument(
        "--tune-sample",
        type=int,
        default=MAX_TUNE_SAMPLE,
        help="reference vectors the auto-tuner samples (at most)",
    )
    p.add_argument(
        "--tune-queries",
        type=int,
        default=200,
        help="sampled references that query the rest while tuning",
    )
    p.add_argument(
        "--tune-keys-per-band",
        type=_int_list,
        default=(1, 2, 4, 8),
        help="keys-per-band values the auto-tuner tries, comma-separated",
    )
    p.add_argument(
        "--tune-probes",
        type=_int_list,
        default=(0, 1, 2),
        help="probe counts the auto-tuner tries, comma-separated",
    )
    args = p.parse_args(argv)
    if args.num_hash_tables < 0:
        p.error("--num-hash-tables must be >= 1, or 0 for auto-tuning")
    if args.target_recall is not None and not 0.0 < args.target_recall <= 1.0:
        p.error(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.tune_sample < 2 or args.tune_queries < 1:
        p.error("--tune-sample must be >= 2 and --tune-queries >= 1")
    if args.keys_per_band < 1 or not 0 <= args.probes <= args.keys_per_band:
        p.error("--keys-per-band must be >= 1 and --probes between 0 and --keys-per-band")
    if min(args.tune_keys_per_band) < 1 or min(args.tune_probes) < 0:
        p.error("--tune-keys-per-band values must be >= 1 and --tune-probes values >= 0")
    if args.bucket_length < 0:
        p.error("--bucket-length must be >= 0 (0 = auto)")
    if args.graph_k < 0 or args.graph_bucket_cap < 2 or args.duplicate_distance < 0:
        p.error("--graph-k must be >= 0, --graph-bucket-cap >= 2, --duplicate-distance >= 0")
    if args.auto_bucket_factor <= 0:
        p.error("--auto-bucket-factor must be > 0")
    if not args.version or "/" in args.version or args.version.startswith("."):
        p.error(f"--version {args.version!r} is not a valid version name")
    return args


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from exc
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def flatten_hashes(hashed: DataFrame) -> DataFrame:
    """Spark's array<vector(1)> hashes -> array<bigint>, one bucket id per table."""
    return hashed.withColumn(
        "hashes", F.transform("hashes", lambda h: vector_to_array(h)[0].cast("long"))
    )


def driver_sample(data: DataFrame, size: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """One seeded sample of at most ``size`` rows on the driver (image_id, class_id) and their
    vectors (n, dim) float32, ordered by a seeded hash of the id: every smaller sample the job
    needs (tuning, bucket width, validation queries) is a prefix of it."""
    rows = cast(
        pd.DataFrame,
        data.select("image_id", "class_id", "vector")
        .orderBy(F.xxhash64(F.col("image_id"), F.lit(seed)))
        .limit(size)
        .toPandas(),
    )
    x = np.stack(rows["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
    return rows.drop(columns="vector"), x


def target_recall(args: argparse.Namespace) -> float:
    """--target-recall, else IMGSIM_TARGET_RECALL (default 0.95)."""
    if args.target_recall is not None:
        return float(args.target_recall)
    from imgsim.config import Settings

    return Settings.from_env().target_recall


def auto_tune(x: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Run the auto-tuner on the driver-side sample ``x``; the manifest's ``tuning`` entry."""
    from imgsim.ann.tuning import DEFAULT_WIDTH_FACTORS, data_scale, tune

    t0 = time.perf_counter()
    scale = data_scale(x, args.seed)
    factors = (args.bucket_length / scale,) if args.bucket_length > 0 else DEFAULT_WIDTH_FACTORS
    result = tune(
        x,
        target=target_recall(args),
        k=args.k,
        max_queries=args.tune_queries,
        seed=args.seed,
        width_factors=factors,
        keys_per_band=args.tune_keys_per_band,
        probes=args.tune_probes,
    )
    tuning = result.as_dict()
    tuning.update(
        seconds=round(time.perf_counter() - t0, 3),
        method="leave-one-out on a seeded sample; grid of bands x keys per band x "
        "bucketLength x probes over BRP projections",
    )
    log.info(
        "auto-tuned LSH on %d vectors: %s (target %.3f met: %s) in %.1f s",
        result.sample_size,
        result.choice.as_dict(),
        result.target,
        result.target_met,
        tuning["seconds"],
    )
    return tuning


def held_out_tuning(
    x: np.ndarray, args: argparse.Namespace, learned: dict[str, Any]
) -> dict[str, Any]:
    """The learn step's held-out tuning (imgsim.ann.projection.holdout_tuning), its width factor
    applied to the scale of this data. (A fixed --bucket-length is tuned by auto_tune.)"""
    from imgsim.ann.tuning import data_scale

    choice = dict(learned["choice"])
    scale = data_scale(x, args.seed)
    choice["bucket_length"] = float(choice["width_factor"]) * scale
    log.info("LSH from the held-out tuning of the learned space: %s", choice)
    return {**learned, "choice": choice, "scale_of_this_data": scale}


#: vectors of the driver sample that estimate a fixed-table bucketLength
ESTIMATE_SAMPLE = 2000


def estimate_bucket_length(
    x: np.ndarray, dim: int, factor: float, seed: int
) -> tuple[float, float]:
    """(bucketLength, median distance) from 4 random pairs per row of the sample ``x``."""
    from imgsim.ann.tuning import median_pair_distance

    median = median_pair_distance(x, seed, pairs=4 * len(x))
    return factor * median / float(np.sqrt(dim)), median


def apply_projection(
    data: DataFrame, projection_dir: Path, out_dir: Path
) -> tuple[DataFrame, dict[str, Any]]:
    """The live vectors mapped into the learned space; the projection copied into the version."""
    from pyspark.ml.functions import array_to_vector

    from imgsim.ann.projection import PROJECTION_DIR, read_choice
    from imgsim.jobs.spark_projection import project

    entry, proj = read_choice(projection_dir)
    if proj is None:
        return data, entry
    entry = {**entry, **proj.save(out_dir / PROJECTION_DIR)}
    projected = (
        project(data.drop("features"), proj)
        .withColumn("features", array_to_vector(F.col("vector")))
        .cache()
    )
    log.info(
        "vectors projected: %s %d -> %d dims (%s)",
        proj.kind,
        proj.dim,
        proj.dims,
        entry.get("reason"),
    )
    return projected, entry


# -- metrics ------------------------------------------------------------------------------------


def partial_neighbours(
    ref: DataFrame,
    queries: pd.DataFrame,
    q_vec: np.ndarray,
    k: int,
    probe_keys: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per partition: each query's k+1 nearest (exact) and nearest among LSH candidates.

    Candidates share a band key with one of the query's ``probe_keys`` (m, bands,
    probes + 1, keys per band; :func:`imgsim.ann.probe_keys`), found and scored with the
    search core (:class:`imgsim.ann.BandIndex`, :func:`imgsim.ann.smallest_k`). Without
    ``probe_keys``, only the exact rows.
    """
    q_ids = queries["image_id"].tolist()
    bq = ref.sparkSession.sparkContext.broadcast((q_ids, q_vec, probe_keys))
    kk = k + 1  # the query itself is in the reference set

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from imgsim.ann import BandIndex, smallest_k, squared_distances
        from imgsim.ann.search import MAX_BATCH_CELLS, refine

        ids_, qv, qkeys = bq.value
        for b in batches:
            if b.empty:
                continue
            ids = b["image_id"].to_numpy()
            x = np.stack(b["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())
            index = None
            if qkeys is not None:
                h = np.stack(b["hashes"].map(lambda v: np.asarray(v, np.int64)).to_list())
                index = BandIndex.build(h, qkeys.shape[3])
            out: list[tuple[str, str | None, str | None, float, int]] = []
            step = max(1, MAX_BATCH_CELLS // len(x))  # queries scored together
            for s in range(0, len(ids_), step):
                d = squared_distances(qv[s : s + step], x)
                exact = smallest_k(d, kk)
                for r, row in enumerate(exact):  # exact distances in float64
                    idx, dd = refine(qv[s + r], x, row)
                    out.extend(
                        (ids_[s + r], "exact", ids[j], float(v), 0)
                        for j, v in zip(idx, dd, strict=True)
                    )
                if index is None or qkeys is None:
                    continue
                cand = index.candidates(qkeys[s : s + step])
                approx = smallest_k(np.where(cand, d, np.inf), kk)
                dist = np.sqrt(d)
                for r in range(len(d)):
                    qid = ids_[s + r]
                    out.extend(
                        (qid, "lsh", ids[j], float(dist[r, j]), 0) for j in approx[r] if cand[r, j]
                    )
                    out.append((qid, "count", None, 0.0, int(cand[r].sum())))
            yield pd.DataFrame(out, columns=["query_id", "kind", "image_id", "distance", "n"])

    schema = T.StructType(
        [
            T.StructField("query_id", T.StringType()),
            T.StructField("kind", T.StringType()),
            T.StructField("image_id", T.StringType()),
            T.StructField("distance", T.DoubleType()),
            T.StructField("n", T.LongType()),
        ]
    )
    return ref.select("image_id", "vector", "hashes").mapInPandas(run, schema).toPandas()


def recall_metrics(
    parts: pd.DataFrame, queries: pd.DataFrame, labels: dict[str, Any], total: int, k: int
) -> dict[str, Any]:
    """Merge partition results: recall@k of the LSH against exact, share compared, label hits."""
    recalls, shares, precisions, hits, short = [], [], [], [], 0
    for qid, qclass in zip(queries["image_id"], queries["class_id"], strict=True):
        rows = parts[parts["query_id"] == qid]

        def best(kind: str, _rows: pd.DataFrame = rows, _qid: str = qid) -> list[str]:
            r = _rows[(_rows["kind"] == kind) & (_rows["image_id"] != _qid)]
            return r.sort_values(["distance", "image_id"])["image_id"].head(k).tolist()

        exact, approx = best("exact"), best("lsh")
        recalls.append(len(set(exact) & set(approx)) / max(len(exact), 1))
        compared = int(rows.loc[rows["kind"] == "count", "n"].sum()) - 1
        shares.append(max(compared, 0) / max(total - 1, 1))
        short += int(len(approx) < min(k, total - 1))
        if qclass is not None and not pd.isna(qclass):
            same = [labels.get(i) == qclass for i in approx]
            precisions.append(sum(same) / k)
            hits.append(float(any(same)))
    n = len(recalls)
    return {
        "k": k,
        "queries": n,
        "recall_at_k": float(np.mean(recalls)) if n else None,
        "candidates_share": float(np.mean(shares)) if n else None,
        "short_answers": short,
        "label_precision_at_k": float(np.mean(precisions)) if precisions else None,
        "label_hit_at_k": float(np.mean(hits)) if hits else None,
    }


# -- write --------------------------------------------------------------------------------------


def write_version(
    model: BucketedRandomProjectionLSHModel, reference: DataFrame, out_dir: Path
) -> None:
    model.write().overwrite().save(str(out_dir / "model"))
    (
        reference.select("image_id", "path", "class_id", "class_name", "vector", "hashes")
        .orderBy("image_id")
        .write.mode("overwrite")
        .parquet(str(out_dir / "reference"))
    )


def graph_pairs(
    reference: DataFrame, exact_rows: pd.DataFrame, queries: list[str], q_vec: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The validation queries' exact k nearest other references as (query, neighbour) vector
    pairs (the neighbours' vectors read from ``reference``)."""
    rows = exact_rows[exact_rows["image_id"] != exact_rows["query_id"]]
    rows = rows.sort_values(["query_id", "distance", "image_id"]).groupby("query_id").head(k)
    wanted = sorted(set(rows["image_id"]))
    spark = reference.sparkSession
    found = cast(
        pd.DataFrame,
        reference.select("image_id", "vector")
        .join(
            F.broadcast(spark.createDataFrame([(i,) for i in wanted], "image_id string")),
            "image_id",
        )
        .toPandas(),
    )
    vec = dict(zip(found["image_id"], found["vector"], strict=True))
    at = {q: i for i, q in enumerate(queries)}
    keep = rows[rows["query_id"].isin(at) & rows["image_id"].isin(vec)]
    if not len(keep):
        raise ValueError("no validation query has an exact neighbour to tune the graph on")
    return (
        q_vec[keep["query_id"].map(at).to_numpy()],
        np.stack([np.asarray(vec[i], np.float32) for i in keep["image_id"]]),
    )


def graph_train(reference: DataFrame, n: int, size: int, seed: int) -> np.ndarray:
    """A seeded sample of about ``size`` reference vectors (the graph's k-means training set)."""
    part = reference.select("vector")
    if size < n:
        part = part.sample(fraction=min(1.0, 1.1 * size / n), seed=seed).limit(size)
    rows = cast(pd.DataFrame, part.toPandas())
    return np.stack(rows["vector"].map(lambda v: np.asarray(v, np.float32)).to_list())


def neighbour_graph(
    reference: DataFrame,
    args: argparse.Namespace,
    out_dir: Path,
    exact_rows: pd.DataFrame,
    queries: list[str],
    sample: np.ndarray,
    n: int,
    raw: DataFrame | None,
    previous: dict[str, Any] | str,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The version's neighbour graph and near-duplicate groups (imgsim.jobs.neighbour_graph),
    written into ``out_dir``; their manifest entries (None, None with --graph-k 0).

    ``exact_rows``: the validation ``queries``' exact neighbours over the whole index
    (query_id, image_id, distance); the queries' vectors are the first rows of ``sample``.
    They choose the graph cells' probes. ``raw``: (image_id, vector) of the L2-normalised
    embeddings where the search space is a projection of them (None: the search space is
    the embeddings): near-duplicates are decided there. ``previous``: CURRENT's graph where
    it can be updated (:func:`previous_graph`), else why not."""
    if args.graph_k == 0:
        return None, None
    from imgsim.ann.search import scan_is_cheaper
    from imgsim.jobs import neighbour_graph as ng

    def exact(q: pd.DataFrame, q_vec: np.ndarray, k: int) -> pd.DataFrame:
        rows = partial_neighbours(reference, q, q_vec, k)
        return rows[rows["kind"] == "exact"][["query_id", "image_id", "distance"]]

    t0 = time.perf_counter()
    dim = int(sample.shape[1])
    spark = reference.sparkSession
    kind = "scan" if scan_is_cheaper(None, n, dim, 1.0, args.scan_below) else "cells"
    mode: dict[str, Any] = {"mode": "full", "mode_reason": previous}
    changes: dict[str, list[str]] | None = None
    before: DataFrame | None = None  # CURRENT's graph, read once
    if isinstance(previous, dict):
        if previous["method"] != kind:
            mode["mode_reason"] = (
                f"CURRENT's graph ({previous['version']}) is {previous['method']}, this one {kind}"
            )
        else:
            before = spark.read.parquet(str(previous["dir"] / "neighbours"))
            changes = ng.graph_changes(before, reference)
            mode.update(
                previous=previous["version"],
                changes={key: len(v) for key, v in changes.items()},
            )
    again = sorted(set(changes["new"]) | set(changes["lost"])) if changes else []
    counts = (
        f"{len(changes['new'])} new, {len(changes['gone'])} gone and {len(changes['lost'])} "
        f"that lost a neighbour since {mode.get('previous')}: "
        if changes
        else ""
    )
    if kind == "scan":
        if changes is not None:
            cheaper = 2 * len(again) <= n
            mode.update(
                mode="incremental" if cheaper else "full",
                mode_reason=counts
                + (
                    f"{len(again)} of {n} scanned afresh, the others keep their lists plus "
                    "the new images"
                    if cheaper
                    else f"{len(again)} of {n} to scan afresh: a full scan costs about as much"
                ),
            )
        if mode["mode"] == "incremental" and before is not None and changes:
            graph = ng.incremental_scan_graph(
                reference,
                before,
                changes,
                args.graph_k,
                exact,
            )
            entry = {"k": args.graph_k, "short": 0, "filled": 0}
        else:
            graph, entry = ng.scan_graph(reference, args.graph_k, n, exact)
        entry["method"] = (
            f"scan: exact search of every reference ({n} x {dim} is below IMGSIM_SCAN_BELOW "
            f"{args.scan_below}, where a scan costs less than the cells)"
        )
    else:
        from imgsim.ann.graph import GraphCells, train_size, tune_graph_cells

        cap = args.graph_bucket_cap
        t_tune = time.perf_counter()
        touched: list[int] = []
        if changes is not None and isinstance(previous, dict):
            cells = GraphCells.load(
                previous["dir"] / previous["entry"]["file"], previous["entry"]["cells"]
            )
            touched = ng.touched_cells(reference, again, cells)
            cheaper = 2 * len(touched) <= cells.cells
            mode.update(
                mode="incremental" if cheaper else "full",
                mode_reason=counts
                + f"their cells are {len(touched)} of {cells.cells}"
                + (
                    ": only those are scored again, with CURRENT's cells"
                    if cheaper
                    else ": the cells are learned and scored anew"
                ),
            )
        if (
            mode["mode"] == "incremental"
            and isinstance(previous, dict)
            and before is not None
            and changes
        ):
            tuning = {
                **(previous["entry"].get("tuning") or {}),
                "kept_from": previous["version"],
                "seconds": 0.0,
            }
            cells.save(out_dir / ng.CELLS_FILE)
            graph, entry = ng.incremental_cell_graph(
                reference,
                before,
                changes,
                cells,
                touched,
                k=args.graph_k,
                cap=cap,
            )
        else:
            if not isinstance(previous, dict) or changes is None:
                mode["mode_reason"] = (
                    f"{mode['mode_reason']}: the cells are learned and scored anew"
                )
            cells, tuning = tune_graph_cells(
                graph_train(reference, n, train_size(n, cap), args.seed),
                *graph_pairs(reference, exact_rows, queries, sample, args.graph_k),
                n,
                target=target_recall(args),
                cap=cap,
                seed=args.seed,
            )
            tuning["seconds"] = round(time.perf_counter() - t_tune, 3)
            cells.save(out_dir / ng.CELLS_FILE)
            log.info("graph cells %s: %s", cells.entry(), tuning)
            graph, entry = ng.build_graph(reference, cells, k=args.graph_k, cap=cap)
        graph, fill = ng.fill_short(graph, reference, args.graph_k, n, exact)
        entry.update(
            **fill,
            tuning=tuning,
            file=ng.CELLS_FILE,
            method="cells: k-means cells of the index, each reference stored in its nearest "
            "and probing its nearest few (as many as the recall target needs), each cell's "
            "rows scored against its homes in float64 (cells over the cap split at "
            "projection medians), top-k per image; images left short filled by exact search",
        )
    edges = ng.write_graph(graph, out_dir / "neighbours")
    graph = reference.sparkSession.read.parquet(str(out_dir / "neighbours")).cache()
    need = min(args.graph_k, n - 1)
    full = graph.groupBy("image_id").count().filter(F.col("count") >= need).count()
    entry.update(
        edges=edges,
        images=n,
        short_lists=n - int(full),  # references with fewer than min(k, n - 1) neighbours
        short_share=round((n - int(full)) / max(n, 1), 6),
        **ng.graph_recall(graph, exact_rows, queries, args.graph_k, n),
        **mode,
        seconds=round(time.perf_counter() - t0, 3),
    )
    from imgsim.ann.graph import DUPLICATE_DISTANCE

    threshold = args.duplicate_distance or DUPLICATE_DISTANCE
    duplicates = ng.write_duplicates(
        graph,
        reference,
        threshold,
        out_dir / "duplicates",
        raw=raw,
        thumbs=Layout(args.data_root.resolve()).thumbs
        if args.duplicate_verifier == "orb"
        else None,
        min_inliers=args.duplicate_min_inliers,
    )
    duplicates["distance_source"] = (
        "IMGSIM_DUPLICATE_DISTANCE"
        if args.duplicate_distance
        else "measured on copies of sample photos (benchmarks/bench_duplicates.py)"
    )
    log.info("neighbour graph: %s; duplicates: %s", entry, duplicates)
    return entry, duplicates


def run(spark: SparkSession, args: argparse.Namespace) -> dict[str, Any]:
    layout = Layout(args.data_root.resolve())
    out_dir = layout.staging / args.version
    if out_dir.exists():  # a retry of the same run: start clean
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    catalog = read_live_catalog(spark, layout).cache()
    embeddings, files = read_embeddings(spark, layout, args.backbone)
    data = live_vectors(catalog, embeddings).cache()
    n_live = catalog.count()
    rows = data.select("image_id", "class_id", F.size("vector").alias("d")).collect()  # one pass
    n = len(rows)
    if n == 0:
        raise ValueError("no live image has an embedding: nothing to index")
    dims = sorted({int(r.d) for r in rows})
    if len(dims) != 1:
        raise ValueError(f"embeddings of mixed dimensions {dims} in {files}")
    labels = {r.image_id: r.class_id for r in rows}
    ids = list(labels)

    raw_dim = dims[0]
    projection_entry: dict[str, Any] | None = None
    raw: DataFrame | None = None  # the embeddings, where a projection replaces them
    if args.projection_dir is not None:
        embedded = data
        data, projection_entry = apply_projection(data, args.projection_dir, out_dir)
        raw = None if data is embedded else embedded.select("image_id", "vector")
    dim = int(projection_entry["dims"]) if projection_entry else raw_dim
    bucket_length, median_distance = args.bucket_length, None
    bands, tuning = args.num_hash_tables, None
    keys_per_band, probes = args.keys_per_band, args.probes
    need = max(
        args.sample_size,
        args.tune_sample if bands == 0 else 0,
        ESTIMATE_SAMPLE if bands and bucket_length == 0 else 0,
    )
    sample, x = driver_sample(data, need, args.seed)  # one pass over the data for all
    if (
        bands == 0
        and args.bucket_length == 0
        and projection_entry
        and projection_entry.get("lsh_tuning")
    ):
        tuning = held_out_tuning(x[: args.tune_sample], args, projection_entry["lsh_tuning"])
    elif bands == 0:
        tuning = auto_tune(x[: args.tune_sample], args)
    elif bucket_length == 0:
        bucket_length, median_distance = estimate_bucket_length(
            x[:ESTIMATE_SAMPLE], dim, args.auto_bucket_factor, args.seed
        )
        log.info(
            "auto bucketLength %.6f (median pair distance %.4f, dim %d)",
            bucket_length,
            median_distance,
            dim,
        )
    if tuning is not None:
        bands = int(tuning["choice"]["tables"])
        keys_per_band = int(tuning["choice"]["keys_per_band"])
        probes = int(tuning["choice"]["probes"])
        bucket_length = float(tuning["choice"]["bucket_length"])
    t0 = time.perf_counter()
    lsh = BucketedRandomProjectionLSH(
        inputCol="features",
        outputCol="hashes",
        bucketLength=bucket_length,
        numHashTables=bands * keys_per_band,
        seed=args.seed,
    )
    model = lsh.fit(data)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = flatten_hashes(model.transform(data)).drop("features").cache()
    write_version(model, reference, out_dir)  # hashes every vector once (cached)
    write_s = time.perf_counter() - t0
    from imgsim.ann import load_brp_model, probe_keys

    t0 = time.perf_counter()
    queries, q_vec = sample.head(args.sample_size), x[: args.sample_size]
    qkeys = probe_keys(load_brp_model(out_dir / "model"), q_vec, keys_per_band, probes)
    parts = partial_neighbours(reference, queries, q_vec, max(args.k, args.graph_k), qkeys)
    metrics = recall_metrics(parts, queries, labels, n, args.k)
    metrics.update(
        fit_seconds=round(fit_s, 3),
        hash_and_write_seconds=round(write_s, 3),
        evaluation_seconds=round(time.perf_counter() - t0, 3),
    )
    backbone_file = layout.backbone_record(args.backbone)
    backbone = read_json(backbone_file) if backbone_file.exists() else {"name": args.backbone}
    space = space_fingerprint(out_dir, (projection_entry or {}).get("file"))
    graph_entry, duplicates_entry = neighbour_graph(
        reference,
        args,
        out_dir,
        parts[parts["kind"] == "exact"],
        queries["image_id"].tolist(),
        x,
        n,
        raw,
        previous_graph(layout, args.graph_k, backbone, space, args.base),
    )
    map_entry = build_map(
        reference,
        n,
        out_dir,
        version=args.version,
        max_points=args.map_points,
        seed=args.seed,
        previous=previous_map(layout, backbone, space, args.base),
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": args.version,
        "created_at": datetime.now(UTC).isoformat(),
        "run_id": args.run_id,
        "base": {
            "version": None if args.base == "none" else args.base,
            "reason": args.base_reason or None,
        },
        "backbone": backbone,
        "embedding_dim": raw_dim,
        "search_dim": dim,
        "normalize": "l2",
        "distance": "euclidean on unit vectors"
        + (" of the projection" if projection_entry else ""),
        "projection": projection_entry or {"kind": "none", "dim": raw_dim, "dims": raw_dim},
        "lsh": {
            "algorithm": "BucketedRandomProjectionLSH",
            "numHashTables": bands * keys_per_band,
            "bucketLength": bucket_length,
            "seed": args.seed,
            "bands": bands,
            "keys_per_band": keys_per_band,
            "probes": probes,
            "requested_num_hash_tables": args.num_hash_tables,
            "requested_bucket_length": args.bucket_length,
            "auto_bucket_factor": args.auto_bucket_factor
            if args.bucket_length == 0 and tuning is None
            else None,
            "median_pair_distance": median_distance,
        },
        "tuning": tuning,
        "fit_settings": {
            "num_hash_tables": args.num_hash_tables,
            "bucket_length": args.bucket_length,
            "seed": args.seed,
            "validation_sample": args.sample_size,
            "target_recall": target_recall(args),
            "projection": (projection_entry or {}).get("requested", "none"),
            "projection_min_coverage": (projection_entry or {}).get("min_coverage"),
            "graph_k": args.graph_k,
            "graph_bucket_cap": args.graph_bucket_cap,
            "duplicate_distance": args.duplicate_distance,
            "duplicate_verifier": args.duplicate_verifier,
            "duplicate_min_inliers": args.duplicate_min_inliers,
            "scan_below": args.scan_below,
            "map_points": args.map_points,
        },
        "snapshot": {
            "fingerprint": snapshot_fingerprint(ids),
            "labels_fingerprint": labels_fingerprint(labels.items()),
            "count": n,
            "shard_files": [Path(f).name for f in files],
        },
        "counts": {"catalog_live": n_live, "indexed": n, "without_embedding": n_live - n},
        "metrics": metrics,
        "neighbours": graph_entry,
        "duplicates": duplicates_entry,
        "map": map_entry,
        "spark": {"version": spark.version, "master": spark.sparkContext.master},
        "files": {
            "model": "model",
            "reference": "reference",
            **({"neighbours": "neighbours", "duplicates": "duplicates"} if graph_entry else {}),
            **(
                {"neighbours_cells": graph_entry["file"]}
                if graph_entry and "file" in graph_entry
                else {}
            ),
            **({"map": map_entry["file"]} if map_entry else {}),
            **(
                {"projection": projection_entry["file"]}
                if projection_entry and "file" in projection_entry
                else {}
            ),
        },
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    log.info("wrote %s: %d images, recall@%d=%s", out_dir, n, args.k, metrics["recall_at_k"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_application(f"imgsim-fit-lsh-{args.version}", lambda spark: run(spark, args))
