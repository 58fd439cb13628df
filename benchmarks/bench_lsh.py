"""LSH quality and cost: recall@5 against exact search vs the share of the index compared.

    .venv/bin/python benchmarks/bench_lsh.py [--quick]

Real embeddings: efficientnet_lite0 on the shared Stanford Cars sample (1,960 photos), cached
under test-output/bench/ (see lsh_data.py). Two kinds of query:

* near-duplicate: 200 reference photos cropped by 10%, flipped, resized x0.5, JPEG q70,
  embedded, searched against the whole index (exact top-5 includes the source photo);
* same-model: 200 reference photos searched against the other 1,959 (leave-one-out), where
  the true top-5 are mostly other cars.

Methods: Spark's textbook BRP (200 tables, bucketLength 2.0), imgsim's defaults (8 tables,
auto bucketLength), the auto-tuner's choice (Spark BRP grid, target 0.95), AND-amplified keys
with multi-probe (NumPy twin, curve over a grid), exact search (NumPy) and FAISS HNSW. Recall
and candidate share come from the NumPy twin (it reproduces Spark's hashes exactly); fit and
lookup times from Spark (local[2]) where stated, else from the twin. Synthetic clustered unit
vectors (10k, 100k, 1M; 128-d) show how the cost grows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PLOTS_DIR, WORK_DIR, md_table, median_time, save_plot, write_result
from lsh_data import load_real, synthetic

from imgsim.ann import BrpParams, hash_vectors, l2_normalize, probe_keys, tuning

K = 5
TARGET = 0.95
NEAR_DUP_TARGET = (0.99, 0.05)  # recall@5 at most this share of the index
AND_GRID = {
    "keys_per_band": (1, 2, 4, 8),
    "probes": (0, 1, 2),
    "width_factors": (0.25, 0.5, 1.0, 2.0, 4.0),
    "tables": (1, 2, 4, 8, 16, 32, 64),
}
HNSW_M = (8, 32)
HNSW_EF = (5, 8, 16, 32, 64, 128)


# -- LSH configurations as NumPy twins ------------------------------------------------------------


def brp(tables: int, width: float, dim: int, seed: int = 42, keys_per_band: int = 1) -> BrpParams:
    return BrpParams(tuning.random_unit_vectors(tables * keys_per_band, dim, seed), width)


def hash_chunked(params: BrpParams, x: np.ndarray, rows: int = 100_000) -> np.ndarray:
    """imgsim.ann.hash_vectors in row chunks (a 1M x 512 float64 product would take 4 GB)."""
    return np.concatenate([hash_vectors(params, x[i : i + rows]) for i in range(0, len(x), rows)])


def candidates(
    params: BrpParams, ref_h: np.ndarray, q: np.ndarray, kb: int = 1, probes: int = 0
) -> np.ndarray:
    """(m, n) bool candidate mask, from the search core (imgsim.ann.BandIndex)."""
    from imgsim.ann import BandIndex

    return BandIndex.build(ref_h, kb).candidates(probe_keys(params, q, kb, probes))


def quality(
    mask: np.ndarray,
    exact: np.ndarray,
    allowed: np.ndarray,
    source: np.ndarray | None = None,
    d: np.ndarray | None = None,
) -> dict[str, float]:
    """recall@k against exact, candidate share, and (near-duplicates) source found in top-k."""
    live = mask & allowed
    rows = np.arange(mask.shape[0])[:, None]
    valid = exact >= 0
    recall = ((live[rows, np.maximum(exact, 0)] & valid).sum(1) / valid.sum(1)).mean()
    out = {
        "recall_at_5": float(recall),
        "candidates_share": float((live.sum(1) / allowed.sum(1)).mean()),
    }
    if source is not None and d is not None:
        dm = np.where(live, d, np.inf)
        top = np.argsort(dm, axis=1, kind="stable")[:, :K]
        hit = [(source[i] in top[i]) and live[i, source[i]] for i in range(len(source))]
        out["source_hit_at_5"] = float(np.mean(hit))
    return out


def twin_lookup_seconds(
    params: BrpParams,
    ref: np.ndarray,
    ref_h: np.ndarray,
    q: np.ndarray,
    c: tuning.LshConfig,
    repeat: int = 3,
) -> float:
    """Median time to answer the queries one by one with the search core's LSH (the scan rule
    off; imgsim.query.lookup's default scans where that is cheaper: bench_search.py)."""
    from imgsim.ann import LshIndex

    index = LshIndex.build(
        ref,
        ref_h,
        params,
        keys_per_band=c.keys_per_band,
        probes=c.probes,
        scan_share=1.0,
        scan_below=0,
    )

    def run() -> None:
        for i in range(q.shape[0]):
            index.search(q[i], K)

    return median_time(run, repeat=repeat, warmup=0 if repeat == 1 else 1)


def exact_lookup_seconds(ref: np.ndarray, q: np.ndarray) -> float:
    """One NumPy distance matrix for the batch, then the k smallest per row."""
    norms = (ref * ref).sum(1)

    def run() -> None:
        d = norms[None, :] - 2.0 * (q @ ref.T)
        np.argpartition(d, K, axis=1)

    return median_time(run, repeat=3, warmup=1)


# -- FAISS HNSW ----------------------------------------------------------------------------------


def hnsw_curve(
    ref: np.ndarray,
    q: np.ndarray,
    exact: np.ndarray,
    exclude: np.ndarray | None,
    source: np.ndarray | None,
) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    build = {}
    for m in HNSW_M:
        build[m], pts = hnsw_points(m, ref, q, exact, exclude, source)
        points += pts
    return {"efConstruction": 200, "build_seconds": build, "points": points}


def hnsw_points(
    m: int,
    ref: np.ndarray,
    q: np.ndarray,
    exact: np.ndarray,
    exclude: np.ndarray | None,
    source: np.ndarray | None,
) -> tuple[float, list[dict[str, Any]]]:
    import faiss

    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(ref.shape[1], m)
    index.hnsw.efConstruction = 200
    index.add(np.ascontiguousarray(ref, np.float32))
    build_s = time.perf_counter() - t0
    points = []
    for ef in HNSW_EF:
        index.hnsw.efSearch = ef
        faiss.cvar.hnsw_stats.reset()
        t0 = time.perf_counter()
        _, idx = index.search(np.ascontiguousarray(q, np.float32), K + 1)
        secs = time.perf_counter() - t0
        ndis = int(faiss.cvar.hnsw_stats.ndis)
        rec, src = [], []
        for i in range(q.shape[0]):
            got = [j for j in idx[i] if j >= 0 and (exclude is None or j != exclude[i])][:K]
            want = [j for j in exact[i] if j >= 0]
            rec.append(len(set(got) & set(want)) / len(want))
            if source is not None:
                src.append(float(source[i] in got))
        point = {
            "M": m,
            "efSearch": ef,
            "recall_at_5": float(np.mean(rec)),
            "candidates_share": ndis / (q.shape[0] * ref.shape[0]),
            "batch_seconds": round(secs, 5),
        }
        if source is not None:
            point["source_hit_at_5"] = float(np.mean(src))
        points.append(point)
    return round(build_s, 3), points


# -- Spark timings ---------------------------------------------------------------------------------


def spark_session() -> Any:
    from imgsim.envsetup import embedded_environment

    for key in ("SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
        os.environ.setdefault(key, embedded_environment()[key])
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master("local[2]")
        .appName("imgsim-bench-lsh")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .getOrCreate()
    )


def spark_frames(spark: Any, ref: np.ndarray, q: np.ndarray) -> tuple[Any, Any, Any]:
    """Cached reference (with ml vectors) and query frames (ml vectors, and arrays)."""
    import pandas as pd
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    rdf = pd.DataFrame(
        {"image_id": [f"r{i:07d}" for i in range(len(ref))], "vector": list(ref.astype(np.float32))}
    )
    reference = (
        spark.createDataFrame(rdf, "image_id string, vector array<float>")
        .select(
            "image_id",
            F.lit("p").alias("path"),
            F.lit(0).cast("int").alias("class_id"),
            F.lit("c").alias("class_name"),
            array_to_vector("vector").alias("features"),
        )
        .repartition(4)
        .cache()
    )
    reference.count()
    qdf = pd.DataFrame(
        {"query_id": [f"q{i:04d}" for i in range(len(q))], "vector": list(q.astype(np.float32))}
    )
    qvec = spark.createDataFrame(qdf, "query_id string, vector array<float>").cache()
    queries = qvec.select("query_id", array_to_vector("vector").alias("features")).cache()
    queries.count()
    return reference, queries, qvec


def spark_costs(
    frames: tuple[Any, Any, Any], c: tuning.LshConfig, joins: tuple[str, ...]
) -> dict[str, Any]:
    """Spark BRP fit + transform (+count), then the query job's joins for the queries:
    ``similarity`` = approxSimilarityJoin (``query_lsh.nearest``), ``band`` = the band-key
    join (``query_lsh.nearest_banded``: ids only, distances once per candidate pair)."""
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.functions import vector_to_array

    from imgsim.ann import load_brp_model
    from imgsim.jobs import fit_lsh, query_lsh

    reference, queries, qvec = frames
    t0 = time.perf_counter()
    model = BucketedRandomProjectionLSH(
        inputCol="features",
        outputCol="hashes",
        bucketLength=c.bucket_length,
        numHashTables=c.projections,
        seed=42,
    ).fit(reference)
    hashed = fit_lsh.flatten_hashes(model.transform(reference)).cache()
    hashed.count()
    out: dict[str, Any] = {"spark_fit_transform_seconds": round(time.perf_counter() - t0, 3)}
    if "similarity" in joins:
        t0 = time.perf_counter()
        query_lsh.nearest(model, queries, reference, K).collect()
        out["spark_similarity_join_seconds"] = round(time.perf_counter() - t0, 3)
    if "band" in joins:
        tmp = WORK_DIR / "bench-brp-model"
        model.write().overwrite().save(str(tmp))
        params = load_brp_model(tmp)
        ref_tbl = hashed.select(
            "image_id",
            "path",
            "class_id",
            "class_name",
            vector_to_array("features", "float32").alias("vector"),
            "hashes",
        )
        t0 = time.perf_counter()
        query_lsh.nearest_banded(params, qvec, ref_tbl, K, c.keys_per_band, c.probes).collect()
        out["spark_band_join_seconds"] = round(time.perf_counter() - t0, 3)
    hashed.unpersist()
    return out


# -- the data sets -------------------------------------------------------------------------------

TEXTBOOK, DEFAULTS = "textbook (200, 2.0)", "imgsim defaults (8, auto)"
TUNED_PLAIN, TUNED_AND = "auto-tuned, plain BRP grid", "auto-tuned, AND+probe grid"


def configs(ref: np.ndarray, quick: bool) -> tuple[dict[str, tuning.LshConfig], dict[str, Any]]:
    """The compared configurations, and the tuner runs (as fit_lsh.py's auto mode does them:
    leave-one-out on a seeded sample of at most 4,000 references, target 0.95)."""
    sample = ref[tuning.sample_rows(ref.shape[0], tuning.MAX_SAMPLE, 42)]
    auto_w = 0.5 * tuning.median_pair_distance(sample, 42) / math.sqrt(ref.shape[1])
    out = {TEXTBOOK: tuning.LshConfig(200, 1, 2.0), DEFAULTS: tuning.LshConfig(8, 1, auto_w)}
    runs: dict[str, Any] = {}
    for name, kb, probes in (
        (TUNED_PLAIN, (1,), (0,)),
        (TUNED_AND, AND_GRID["keys_per_band"], AND_GRID["probes"]),
    ):
        t0 = time.perf_counter()
        tables = (1, 4, 16, 64) if quick else tuning.DEFAULT_TABLES
        res = tuning.tune(
            sample,
            target=TARGET,
            k=K,
            max_queries=200,
            seed=42,
            tables=tables,
            keys_per_band=kb,
            probes=probes,
        )
        out[name] = res.choice.config
        runs[name] = {
            "seconds": round(time.perf_counter() - t0, 2),
            "sample": res.sample_size,
            "choice": res.choice.as_dict(),
            "target_met": res.target_met,
        }
    return out, runs


def cfg_row(c: tuning.LshConfig) -> dict[str, Any]:
    return {
        "tables": c.tables,
        "keys_per_band": c.keys_per_band,
        "probes": c.probes,
        "bucket_length": c.bucket_length,
    }


def twin(c: tuning.LshConfig, dim: int) -> BrpParams:
    return brp(c.tables, c.bucket_length, dim, keys_per_band=c.keys_per_band)


def evaluate_queries(
    ref: np.ndarray,
    q: np.ndarray,
    exclude: np.ndarray | None,
    source: np.ndarray | None,
    cfgs: dict[str, tuning.LshConfig],
    quick: bool,
) -> dict[str, Any]:
    exact, d = tuning.exact_top_k(ref, q, K, exclude)
    allowed = np.isfinite(d)
    res: dict[str, Any] = {"queries": int(q.shape[0]), "methods": {}}
    for name, c in cfgs.items():
        params = twin(c, ref.shape[1])
        mask = candidates(params, hash_vectors(params, ref), q, c.keys_per_band, c.probes)
        res["methods"][name] = {**cfg_row(c), **quality(mask, exact, allowed, source, d)}
    grid = {**AND_GRID, **({"tables": (1, 4, 16, 64)} if quick else {})}
    t0 = time.perf_counter()
    curve, _ = tuning.evaluate_grid(ref, q, k=K, exclude=exclude, seed=42, **grid)
    res["grid_seconds"] = round(time.perf_counter() - t0, 2)
    res["curve"] = [p.as_dict() for p in curve]
    plain = [p for p in curve if p.config.keys_per_band == 1 and p.config.probes == 0]
    res["frontier_plain_brp"] = [p.as_dict() for p in tuning.pareto_front(plain)]
    res["frontier_and_probe"] = [p.as_dict() for p in tuning.pareto_front(curve)]
    if source is not None:  # finding the exact nearest neighbour (mostly the source photo)
        at1, _ = tuning.evaluate_grid(ref, q, k=1, exclude=exclude, seed=42, **grid)
        res["frontier_recall_at_1"] = [p.as_dict() for p in tuning.pareto_front(at1)]
    for label, pts in (
        ("plain BRP frontier at 0.95 (in-sample)", plain),
        ("AND+probe frontier at 0.95 (in-sample)", curve),
    ):
        best, met = tuning.choose(pts, TARGET)
        c = best.config
        params = twin(c, ref.shape[1])
        mask = candidates(params, hash_vectors(params, ref), q, c.keys_per_band, c.probes)
        res["methods"][label] = {
            **cfg_row(c),
            "target_met": met,
            **quality(mask, exact, allowed, source, d),
        }
    res["methods"]["exact (NumPy)"] = {
        "recall_at_5": 1.0,
        "candidates_share": 1.0,
        **(
            {
                "source_hit_at_5": quality(np.ones_like(allowed), exact, allowed, source, d)[
                    "source_hit_at_5"
                ]
            }
            if source is not None
            else {}
        ),
    }
    res["hnsw"] = hnsw_curve(ref, q, exact, exclude, source)
    return res


def near_dup_verdict(res: dict[str, Any]) -> dict[str, Any]:
    """Is recall@5 >= 0.99 reached at <= 5% of the index, and by what?"""
    want_r, max_share = NEAR_DUP_TARGET
    best = max(
        (p for p in res["curve"] if p["candidates_share"] <= max_share),
        key=lambda p: p["recall_at_5"] if "recall_at_5" in p else p["recall_at_k"],
        default=None,
    )
    hnsw = max(
        (p for p in res["hnsw"]["points"] if p["candidates_share"] <= max_share),
        key=lambda p: p["recall_at_5"],
        default=None,
    )
    lsh_r = best["recall_at_k"] if best else 0.0
    at1 = max(
        (p for p in res.get("frontier_recall_at_1", []) if p["candidates_share"] <= max_share),
        key=lambda p: p["recall_at_k"],
        default=None,
    )
    return {
        "target_recall": want_r,
        "max_share": max_share,
        "lsh_best_recall_within_share": lsh_r,
        "lsh_best_config": best,
        "lsh_met": lsh_r >= want_r,
        "lsh_best_recall_at_1_within_share": at1["recall_at_k"] if at1 else None,
        "lsh_best_recall_at_1_config": at1,
        "hnsw_best_recall_within_share": hnsw["recall_at_5"] if hnsw else None,
        "hnsw_met": bool(hnsw and hnsw["recall_at_5"] >= want_r),
    }


def real_set(spark: Any, quick: bool) -> dict[str, Any]:
    s = load_real()
    ref = l2_normalize(s.vectors)
    m = 50 if quick else len(s.dup_source)
    dup_q, src = l2_normalize(s.dup_vectors)[:m], s.dup_source[:m]
    cfgs, runs = configs(ref, quick)
    print(f"tuned: {runs}", flush=True)
    out: dict[str, Any] = {
        "n": int(ref.shape[0]),
        "dim": int(ref.shape[1]),
        "tuner": runs,
        "near_duplicate": evaluate_queries(ref, dup_q, None, src, cfgs, quick),
        "same_model": evaluate_queries(ref, ref[src], src, None, cfgs, quick),
    }
    out["near_duplicate"]["verdict"] = near_dup_verdict(out["near_duplicate"])
    joins: dict[str, tuple[str, ...]] = {
        DEFAULTS: ("similarity", "band"),
        TUNED_PLAIN: ("band",),
        TUNED_AND: ("band",),
    }
    out["costs"] = costs(spark, ref, dup_q[:100], cfgs, joins)
    return out


def costs(
    spark: Any,
    ref: np.ndarray,
    q: np.ndarray,
    cfgs: dict[str, tuning.LshConfig],
    joins: dict[str, tuple[str, ...]],
) -> dict[str, Any]:
    """Quality, NumPy hash/lookup times and, with Spark, fit+transform and the named joins."""
    res: dict[str, Any] = {"queries": int(q.shape[0])}
    frames = spark_frames(spark, ref, q) if spark is not None else None
    exact, d = tuning.exact_top_k(ref, q, K)
    allowed = np.isfinite(d)
    repeat = 3 if ref.shape[0] < 10_000 else 1  # keep the synthetic runs within budget
    for name, c in cfgs.items():
        params = twin(c, ref.shape[1])
        t0 = time.perf_counter()
        ref_h = hash_chunked(params, ref)
        hash_s = time.perf_counter() - t0
        qual = quality(candidates(params, ref_h, q, c.keys_per_band, c.probes), exact, allowed)
        row: dict[str, Any] = {
            **cfg_row(c),
            **qual,
            "twin_hash_seconds": round(hash_s, 4),
            "twin_batch_lookup_seconds": round(
                twin_lookup_seconds(params, ref, ref_h, q, c, repeat=repeat), 4
            ),
        }
        if frames is not None:
            row.update(spark_costs(frames, c, joins.get(name, ())))
        res[name] = row
        print(f"  {name}: {row}", flush=True)
    res["exact (NumPy)"] = {
        "recall_at_5": 1.0,
        "candidates_share": 1.0,
        "twin_batch_lookup_seconds": round(exact_lookup_seconds(ref, q), 4),
    }
    if frames is not None:
        for f in frames:
            f.unpersist()
    return res


def synthetic_sets(spark: Any, quick: bool) -> dict[str, Any]:
    """Cost growth: clustered 128-d unit vectors; Spark fit+transform up to 100k, NumPy all."""
    sizes = (10_000,) if quick else (10_000, 100_000, 1_000_000)
    out: dict[str, Any] = {
        "dim": 128,
        "clusters": "n/20 random centres, Gaussian noise of "
        "norm ~0.35; queries: 100 references plus noise of norm ~0.2",
        "sets": {},
    }
    for n in sizes:
        print(f"synthetic {n:,} x 128 ...", flush=True)
        x = synthetic(n, 128, seed=n, clusters=max(n // 20, 10))
        q = l2_normalize(
            x[:100]
            + np.random.default_rng(1)
            .normal(scale=0.2 / math.sqrt(128), size=(100, 128))
            .astype(np.float32)
        )
        cfgs, runs = configs(x, quick)
        if n >= 100_000:
            cfgs.pop(TEXTBOOK)  # 200 tables x n x 100 queries: minutes, all candidates
        if n >= 1_000_000:
            cfgs.pop(TUNED_PLAIN)  # keep the 1M run within the time budget
        res = costs(spark if n <= 100_000 else None, x, q, cfgs, {})
        res["tuner"] = runs
        out["sets"][str(n)] = res
    return out


# -- report --------------------------------------------------------------------------------------


def plot_curves(real: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    files = []
    for kind, title in (
        ("near_duplicate", "near-duplicate queries"),
        ("same_model", "same-model queries (leave-one-out)"),
    ):
        r = real[kind]
        fig, ax = plt.subplots(figsize=(7.5, 5))
        ax.scatter(
            [p["candidates_share"] for p in r["curve"]],
            [p["recall_at_k"] for p in r["curve"]],
            s=5,
            c="0.8",
            label="grid points",
        )
        for key, style, label in (
            ("frontier_plain_brp", "b.-", "Spark BRP (OR), frontier"),
            ("frontier_and_probe", "g.-", "AND + multi-probe, frontier"),
        ):
            ax.plot(
                [p["candidates_share"] for p in r[key]],
                [p["recall_at_k"] for p in r[key]],
                style,
                label=label,
            )
        for m, style in zip(HNSW_M, ("r^-", "rv--"), strict=True):
            h = [p for p in r["hnsw"]["points"] if p["M"] == m]
            ax.plot(
                [p["candidates_share"] for p in h],
                [p["recall_at_5"] for p in h],
                style,
                label=f"FAISS HNSW M={m} (distance computations)",
            )
        for name, marker in (
            (TEXTBOOK, "ks"),
            (DEFAULTS, "mo"),
            (TUNED_PLAIN, "c*"),
            (TUNED_AND, "y*"),
        ):
            m = r["methods"][name]
            ax.plot(m["candidates_share"], m["recall_at_5"], marker, ms=10, mec="k", label=name)
        ax.axhline(TARGET, color="0.5", ls=":", lw=1)
        if kind == "near_duplicate":
            ax.axvline(NEAR_DUP_TARGET[1], color="0.5", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(1e-3, 1.2)
        ax.set_xlabel("share of the index compared per query (log)")
        ax.set_ylabel("recall@5 against exact search")
        ax.set_title(f"{title}: 1,960 real embeddings")
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = PLOTS_DIR / f"lsh_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path.relative_to(PLOTS_DIR.parent)))
    return files


def plot_growth(syn: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(int(n) for n in syn["sets"])
    for name, col in ((DEFAULTS, "m"), (TUNED_AND, "y"), ("exact (NumPy)", "b")):
        ys = [syn["sets"][str(n)].get(name, {}).get("twin_batch_lookup_seconds") for n in sizes]
        ax.plot(sizes, ys, col + "o-", label=f"{name}: 100 lookups (NumPy)")
        if name != "exact (NumPy)":
            sp = [
                syn["sets"][str(n)].get(name, {}).get("spark_fit_transform_seconds") for n in sizes
            ]
            ax.plot(
                sizes,
                [np.nan if v is None else v for v in sp],
                col + "s--",
                label=f"{name}: Spark fit+transform",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("reference vectors (synthetic, 128-d)")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7)
    return save_plot(fig, "lsh_growth.png")


def fmt_share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def params_text(m: dict[str, Any]) -> str:
    if "tables" not in m:
        return "-"
    text = f"{m['tables']} tables, w={m['bucket_length']:.3g}"
    if m.get("keys_per_band", 1) > 1 or m.get("probes", 0):
        text = (
            f"{m['tables']} bands x {m['keys_per_band']} keys, w={m['bucket_length']:.3g}, "
            f"{m['probes']} probes"
        )
    return text


def quality_table(r: dict[str, Any], near_dup: bool) -> str:
    head = ["method", "parameters", "recall@5", "share compared"]
    if near_dup:
        head.append("source photo in top-5")
    rows = []
    for name, m in r["methods"].items():
        row = [name, params_text(m), m["recall_at_5"], fmt_share(m["candidates_share"])]
        if near_dup:
            row.append(m.get("source_hit_at_5", "-"))
        rows.append(row)
    for p in r["hnsw"]["points"]:
        row = [
            "FAISS HNSW",
            f"M={p['M']}, efSearch={p['efSearch']}",
            p["recall_at_5"],
            fmt_share(p["candidates_share"]),
        ]
        if near_dup:
            row.append(p.get("source_hit_at_5", "-"))
        rows.append(row)
    return md_table(head, rows)


def cost_table(data: dict[str, Any]) -> str:
    head = [
        "data",
        "method",
        "recall@5",
        "share",
        "Spark fit+transform s",
        "Spark approxSimilarityJoin s",
        "Spark band-key join s",
        "NumPy hash s",
        "NumPy lookups s",
    ]
    rows = []
    sets = [("real 1,960 x 1280", data["real"]["costs"])]
    sets += [(f"synthetic {int(n):,} x 128", c) for n, c in data["synthetic"]["sets"].items()]
    for label, c in sets:
        for name, m in c.items():
            if not isinstance(m, dict) or "recall_at_5" not in m:
                continue
            rows.append(
                [
                    label,
                    name,
                    m["recall_at_5"],
                    fmt_share(m["candidates_share"]),
                    m.get("spark_fit_transform_seconds", "-"),
                    m.get("spark_similarity_join_seconds", "-"),
                    m.get("spark_band_join_seconds", "-"),
                    m.get("twin_hash_seconds", "-"),
                    m["twin_batch_lookup_seconds"],
                ]
            )
    return md_table(head, rows)


def section(data: dict[str, Any]) -> str:
    real = data["real"]
    lines = [
        "## LSH quality and cost (`bench_lsh.py`)",
        "",
        f"Real set: {real['n']:,} efficientnet_lite0 embeddings ({real['dim']}-d, "
        "L2-normalised) of the shared Stanford Cars sample. Recall@5 is against exact "
        "search; *share* is the share of the index compared exactly per query (LSH: "
        "candidates; HNSW: distance computations, `hnsw_stats.ndis`). LSH recall and share "
        "come from the NumPy twin of Spark's BRP (it reproduces Spark's hashes exactly). "
        "*Auto-tuned* rows are the tuner's choice as `fit_lsh.py --num-hash-tables 0` "
        "makes it (leave-one-out on the reference sample, target 0.95), evaluated on the "
        "query kind; *frontier (in-sample)* rows are the best grid point for these very "
        "queries (an upper bound for the tuner).",
        "",
    ]
    for kind, title in (
        ("near_duplicate", "Near-duplicate queries (crop 10%, flip, x0.5, JPEG q70)"),
        ("same_model", "Same-model queries (leave-one-out)"),
    ):
        r = real[kind]
        lines += [
            f"### {title}: {r['queries']} queries",
            "",
            quality_table(r, kind == "near_duplicate"),
            "",
            f"Plot: [plots/lsh_{kind}.png](plots/lsh_{kind}.png) (the whole grid: "
            f"{len(r['curve'])} configurations, evaluated in {r['grid_seconds']} s).",
            "",
        ]
    v = real["near_duplicate"]["verdict"]
    hnsw = v["hnsw_best_recall_within_share"]
    lines += [
        "### Targets",
        "",
        f"* Near-duplicates, recall@5 >= {v['target_recall']} comparing <= "
        f"{fmt_share(v['max_share'])}: best LSH grid point within that share reaches "
        f"{v['lsh_best_recall_within_share']:.3f} -> "
        f"**{'met' if v['lsh_met'] else 'not met'}**; FAISS HNSW "
        + (f"{hnsw:.3f}" if hnsw is not None else "(no setting compares that few)")
        + f" -> **{'met' if v['hnsw_met'] else 'not met'}**. Finding just the exact "
        "nearest neighbour (the source photo for most of these queries): best LSH "
        "recall@1 within that share "
        + (
            f"{v['lsh_best_recall_at_1_within_share']:.3f} "
            f"({params_text(v['lsh_best_recall_at_1_config'])})"
            if v["lsh_best_recall_at_1_within_share"] is not None
            else "-"
        )
        + ".",
    ]
    for name, run in real["tuner"].items():
        ch = run["choice"]
        lines.append(
            f"* {name} (target {TARGET}): {params_text(ch)}; recall@5 "
            f"{ch['recall_at_k']:.3f} at {fmt_share(ch['candidates_share'])} of the "
            f"sample; target met: {run['target_met']}; {run['seconds']} s."
        )
    lines += [
        "",
        "### Cost",
        "",
        f"{real['costs']['queries']} near-duplicate queries per batch. Spark: local[2], "
        "BRP `fit` + `transform` + count on a cached table; the query job's two "
        "searches: `approxSimilarityJoin` + top-5 (`query_lsh.nearest`, plain BRP "
        "versions) and the band-key join (`query_lsh.nearest_banded`, AND/multi-probe "
        "versions; ids only, distances once per candidate pair). NumPy: `imgsim.ann` "
        "hashing and one-by-one lookups as `imgsim.query.lookup` does them; exact: one NumPy "
        "distance matrix. '-' = not run (Spark joins only on the real set; no Spark at "
        "1M; the textbook 200 tables not at 100k and 1M). Synthetic: "
        f"{data['synthetic']['clusters']}.",
        "",
        cost_table(data),
        "",
        "Plots: " + ", ".join(f"[{p}]({p})" for p in data["plots"]),
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="50 queries, coarser grid, synthetic 10k only"
    )
    ap.add_argument("--no-spark", action="store_true", help="NumPy/FAISS only")
    args = ap.parse_args()
    started = time.perf_counter()
    spark = None if args.no_spark else spark_session()
    try:
        print("real embeddings ...", flush=True)
        real = real_set(spark, args.quick)
        syn = synthetic_sets(spark, args.quick)
    finally:
        if spark is not None:
            spark.stop()
    data: dict[str, Any] = {
        "quick": args.quick,
        "k": K,
        "target": TARGET,
        "real": real,
        "synthetic": syn,
    }
    data["plots"] = [*plot_curves(real), plot_growth(syn)]
    data["seconds"] = round(time.perf_counter() - started, 1)
    out = write_result("lsh", data, section(data))
    print(f"wrote {out} in {data['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
