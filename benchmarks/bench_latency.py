"""Lookup latency for one query: Spark in a running session, the batch query job, in-process.

    .venv/bin/python benchmarks/bench_latency.py [--quick]

Builds a published model version with the real code path: the 1,960 cached efficientnet_lite0
sample embeddings (see lsh_data.py) are written as a catalog and an embedding shard under
test-output/bench/latency/, ``spark_jobs/fit_lsh.py``'s ``run`` fits it in a local Spark
session (imgsim's default parameters: 8 tables, auto bucketLength), then ``validate_staged``
and ``publish``. Then, for one near-duplicate query at a time:

* Spark ``approxNearestNeighbors`` in the running session on the cached, hashed reference table;
* the batch query job, ``spark-submit spark_jobs/query_lsh.py`` for one query, JVM start included;
* the in-process lookup, ``imgsim.query.lookup.lookup`` (model loaded once; load time reported).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, WORK_DIR, catalog_row, md_table, write_result
from lsh_data import BACKBONE, load_real

K = 5


def build_store(root: Path, files: list[str], labels: np.ndarray, vectors: np.ndarray) -> Any:
    """A data root with a catalog and one embedding shard of the given vectors."""
    from imgsim.config import Layout
    from imgsim.fsutil import atomic_write_json
    from imgsim.store import write_catalog, write_shard

    if root.exists():
        shutil.rmtree(root)
    layout = Layout(root)
    ids = [f"{i:064x}" for i in range(len(files))]
    write_catalog(
        layout,
        [
            catalog_row(iid, f"images/sample/{f}", c, "archive:sample")
            for iid, f, c in zip(ids, files, labels, strict=True)
        ],
    )
    write_shard(
        layout, BACKBONE, "bench", 0, list(zip(ids, vectors, strict=True)), vectors.shape[1]
    )
    atomic_write_json(
        layout.embeddings(BACKBONE) / "BACKBONE.json",
        {"name": BACKBONE, "dim": int(vectors.shape[1])},
    )
    return layout


def publish_model(spark: Any, layout: Any, version: str, *extra: str) -> dict[str, Any]:
    from imgsim.jobs import fit_lsh
    from imgsim.store import snapshot_fingerprint
    from imgsim.versions.models import publish, validate_staged

    t0 = time.perf_counter()
    manifest = fit_lsh.run(
        spark,
        fit_lsh.parse_args(
            ["--data-root", str(layout.root), "--backbone", BACKBONE, "--version", version, *extra]
        ),
    )
    fit_s = time.perf_counter() - t0
    n = manifest["counts"]["indexed"]
    validate_staged(
        layout,
        version,
        expected_count=n,
        expected_fingerprint=snapshot_fingerprint([f"{i:064x}" for i in range(n)]),
        backbone=BACKBONE,
        recall_floor=0.0,
    )
    publish(layout, version)
    tuning = manifest.get("tuning")
    return {
        "fit_seconds": round(fit_s, 2),
        "lsh": manifest["lsh"],
        "metrics": manifest["metrics"],
        "tuning": None
        if tuning is None
        else {
            k: tuning[k]
            for k in ("target", "target_met", "choice", "sample_size", "queries", "seconds")
        },
    }


def spark_ann_seconds(spark: Any, layout: Any, version: str, queries: np.ndarray) -> list[float]:
    """approxNearestNeighbors for one query at a time, reference table cached and hashed."""
    from pyspark.ml.linalg import Vectors

    from imgsim.jobs import query_lsh

    model, ref_path = query_lsh.read_model(layout.root, version)
    reference = query_lsh.read_reference(spark, ref_path)
    hashed = model.transform(reference).cache()
    hashed.count()
    times = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        model.approxNearestNeighbors(hashed, Vectors.dense(q.astype(float)), K).collect()
        if i:  # the first one warms up
            times.append(time.perf_counter() - t0)
    hashed.unpersist()
    return times


def spark_submit_seconds(layout: Any, version: str, queries: np.ndarray) -> list[float]:
    """``spark-submit spark_jobs/query_lsh.py`` for one query each time, JVM start included."""
    import pyarrow as pa

    from imgsim.envsetup import embedded_environment
    from imgsim.store import write_parquet_atomic

    env = embedded_environment(dict(os.environ))
    submit = shutil.which("spark-submit", path=env.get("PATH")) or str(
        Path(sys.executable).parent / "spark-submit"
    )
    times = []
    for i, q in enumerate(queries):
        run_dir = WORK_DIR / "latency" / f"run{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_parquet_atomic(
            pa.table(
                {
                    "query_id": ["q0"],
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(q.astype(np.float32)), q.shape[0]
                    ),
                }
            ),
            run_dir / "query_vectors.parquet",
        )
        cmd = [
            submit,
            "--master",
            "local[2]",
            "--conf",
            "spark.ui.enabled=false",
            "--conf",
            "spark.sql.shuffle.partitions=4",
            str(PROJECT_ROOT / "spark_jobs" / "query_lsh.py"),
            "--data-root",
            str(layout.root),
            "--version",
            version,
            "--run-dir",
            str(run_dir),
            "--k",
            str(K),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise RuntimeError(f"spark-submit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return times


def in_process_seconds(
    layout: Any, version: str, queries: np.ndarray
) -> tuple[float, list[float], int]:
    from imgsim.query.lookup import load_model, lookup

    t0 = time.perf_counter()
    model = load_model(layout, version)
    load_s = time.perf_counter() - t0
    lookup(model, queries[:1], K)  # warm-up
    times = []
    for q in queries:
        t0 = time.perf_counter()
        (answer,) = lookup(model, q[None, :], K)
        times.append(time.perf_counter() - t0)
    return load_s, times, answer.candidates


def stats(times: list[float]) -> dict[str, float]:
    return {
        "runs": len(times),
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
    }


def section(data: dict[str, Any]) -> str:
    m, a = data["model"], data["auto_model"]
    t, ch = a["tuning"], a["tuning"]["choice"]
    rows = [
        [
            "in-process `imgsim.query.lookup.lookup` (NumPy, model loaded once)",
            data["in_process"]["median_s"],
            data["in_process"]["runs"],
            f"model load {data['in_process_load_s']} s",
        ],
        [
            "Spark `approxNearestNeighbors`, running session, cached hashed table",
            data["spark_ann"]["median_s"],
            data["spark_ann"]["runs"],
            "session already up",
        ],
        [
            "`spark-submit spark_jobs/query_lsh.py`, one query, JVM start included",
            data["spark_submit"]["median_s"],
            data["spark_submit"]["runs"],
            "what one `imgsim_query` lookup task costs",
        ],
    ]
    return "\n".join(
        [
            "## Lookup latency, one query (`bench_latency.py`)",
            "",
            f"Model: a version published with the real code path (`fit_lsh.run`, validate, "
            f"publish) on the {m['n']:,} cached efficientnet_lite0 sample embeddings, imgsim's "
            f"defaults: {m['lsh']['numHashTables']} tables, bucketLength "
            f"{m['lsh']['bucketLength']:.4g} (recall@5 {m['metrics']['recall_at_k']:.3f}, "
            f"{100 * m['metrics']['candidates_share']:.0f}% of the index compared). Queries: "
            "near-duplicate photos (cropped, flipped, resized, re-encoded), one at a time.",
            "",
            md_table(["path", "median s", "runs", "note"], rows),
            "",
            f"Ratio: spark-submit / in-process = "
            f"{data['spark_submit']['median_s'] / data['in_process']['median_s']:,.0f}x; "
            f"approxNearestNeighbors / in-process = "
            f"{data['spark_ann']['median_s'] / data['in_process']['median_s']:,.0f}x. "
            f"Embedding the query photo (not included) costs more than the in-process lookup.",
            "",
            f"Auto-tuned version (`fit_lsh.py --num-hash-tables 0`, same data, fitted in "
            f"{a['fit_seconds']} s, tuner {t['seconds']} s on {t['sample_size']} vectors / "
            f"{t['queries']} leave-one-out queries, target {t['target']}, met: {t['target_met']}): "
            f"{ch['tables']} bands x {ch['keys_per_band']} keys per band, {ch['probes']} probes, "
            f"bucketLength {ch['bucket_length']:.4g}; the fit job's own leave-one-out check "
            f"(Spark hashes, {a['metrics']['queries']} queries): recall@5 "
            f"{a['metrics']['recall_at_k']:.3f} comparing "
            f"{100 * a['metrics']['candidates_share']:.0f}% of the index. In-process lookup "
            f"median {a['in_process']['median_s']} s per query (model load "
            f"{a['in_process_load_s']} s).",
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    started = time.perf_counter()
    real = load_real()
    dup = real.dup_vectors / np.linalg.norm(real.dup_vectors, axis=1, keepdims=True)
    layout = build_store(WORK_DIR / "latency" / "data", real.files, real.labels, real.vectors)
    version, auto_version = "v20260101T000000Z-be0c11", "v20260101T000000Z-a070c1"

    from bench_lsh import spark_session

    spark = spark_session()
    try:
        auto = publish_model(spark, layout, auto_version, "--num-hash-tables", "0")
        model = publish_model(spark, layout, version)
        model["n"] = len(real.files)
        ann = spark_ann_seconds(spark, layout, version, dup[: 4 if args.quick else 11])
    finally:
        spark.stop()
    submit = spark_submit_seconds(layout, version, dup[: 1 if args.quick else 2])
    load_s, local, cands = in_process_seconds(layout, version, dup[:100])
    auto_load_s, auto_local, _ = in_process_seconds(layout, auto_version, dup[:100])
    auto.update(in_process=stats(auto_local), in_process_load_s=round(auto_load_s, 3))
    data = {
        "quick": args.quick,
        "model": model,
        "auto_model": auto,
        "spark_ann": stats(ann),
        "spark_submit": stats(submit),
        "in_process": stats(local),
        "in_process_load_s": round(load_s, 3),
        "in_process_last_candidates": cands,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = write_result("latency", data, section(data))
    print(section(data))
    print(f"wrote {out} in {data['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
