"""In-process lookup latency: the search core's LSH against exact search, single and batched.

    .venv/bin/python benchmarks/bench_search.py [--quick]

Index sizes: the shared sample (1,960 real efficientnet_lite0 vectors, 1280-d, cached by
lsh_data.py), 100k and 1M synthetic clustered unit vectors (128-d, n/20 centres, as
bench_lsh.py). The LSH is the auto-tuner's choice (target recall@5 0.95, AND + multi-probe
grid) on a 4,000-vector sample of each index, over NumPy-drawn projections (Spark's BRP
family). 100 queries: references plus noise. Methods, all through
:class:`imgsim.ann.LshIndex` (``k = 5``):

* **exact**: an exact scan (one matrix product per batch; ``scan_below`` above the index);
* **LSH only**: the tuned LSH with the scan rule off (``scan_share 1, scan_below 0``);
* **imgsim default**: the scan rule at its defaults (IMGSIM_SCAN_SHARE, IMGSIM_SCAN_BELOW):
  the LSH where it compared a small share of a large index (the tuner's measured share stands
  for the version's validation share), else the scan.

Single: the 100 queries one call each; batch: one call with all 100. Median of 3 rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, median_time, write_result
from lsh_data import load_real, synthetic

from imgsim.ann import BrpParams, LshIndex, hash_vectors, l2_normalize, random_unit_vectors
from imgsim.ann.tuning import MAX_SAMPLE, sample_rows, tune
from imgsim.config import SCAN_BELOW, SCAN_SHARE

K = 5
QUERIES = 100


def hashes_in_chunks(params: BrpParams, x: np.ndarray, rows: int = 50_000) -> np.ndarray:
    return np.concatenate([hash_vectors(params, x[s:s + rows])
                           for s in range(0, x.shape[0], rows)])


def build(x: np.ndarray, seed: int = 42) -> tuple[dict[str, Any], dict[str, LshIndex]]:
    t0 = time.perf_counter()
    sample = x[sample_rows(x.shape[0], MAX_SAMPLE, seed)]
    choice = tune(sample, target=0.95, k=K, seed=seed, keys_per_band=(1, 2, 4, 8),
                  probes=(0, 1, 2)).choice
    cfg = choice.config
    params = BrpParams(random_unit_vectors(cfg.projections, x.shape[1], seed), cfg.bucket_length)
    hashes = hashes_in_chunks(params, x)
    base = LshIndex.build(x, hashes, params, keys_per_band=cfg.keys_per_band, probes=cfg.probes,
                          scan_share=1.0, scan_below=0)
    info = {"n": int(x.shape[0]), "dim": int(x.shape[1]), "lsh": cfg.as_dict(),
            "tuned_recall": round(choice.recall_at_k, 4),
            "tuned_share": round(choice.candidates_share, 4),
            "build_seconds": round(time.perf_counter() - t0, 2)}
    variants = {
        "exact": LshIndex(x, base.bands, params, cfg.probes, 1.0, 2 ** 62),
        "LSH only": base,
        # the share measured in tuning stands for the version's validation share
        "imgsim default": LshIndex(x, base.bands, params, cfg.probes, SCAN_SHARE, SCAN_BELOW,
                                   choice.candidates_share),
    }
    return info, variants


def measure(name: str, x: np.ndarray, repeat: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    pick = rng.choice(x.shape[0], QUERIES, replace=False)
    q = l2_normalize(x[pick] + rng.normal(scale=0.2 / np.sqrt(x.shape[1]),
                                          size=(QUERIES, x.shape[1])).astype(np.float32))
    info, variants = build(x)
    truth = [set(a.indices.tolist()) for a in variants["exact"].search(q, K)]
    rows = []
    for method, index in variants.items():
        answers = index.search(q, K)
        single = median_time(lambda index=index: [index.search(q[i], K)
                                                  for i in range(QUERIES)], repeat=repeat)
        batch = median_time(lambda index=index: index.search(q, K), repeat=repeat)
        recall = np.mean([len(t & set(a.indices.tolist())) / K
                          for t, a in zip(truth, answers, strict=True)])
        used = {m: sum(a.method == m for a in answers) for m in {a.method for a in answers}}
        rows.append({"index": name, **info, "method": method,
                     "single_ms": 1000 * single / QUERIES, "batch_ms": 1000 * batch / QUERIES,
                     "recall_at_5": float(recall),
                     "share": float(np.mean([a.candidates for a in answers]) / x.shape[0]),
                     "answered_by": used})
        print(f"{name:>8} {method:>15}: single {rows[-1]['single_ms']:.3f} ms, batch "
              f"{rows[-1]['batch_ms']:.3f} ms/query, recall {recall:.3f}, "
              f"share {rows[-1]['share']:.3f}, {used}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k at most, one round")
    args = ap.parse_args()
    repeat = 1 if args.quick else 3
    sets = [("sample", lambda: load_real().vectors.astype(np.float32)),
            ("100k", lambda: synthetic(100_000, 128, 3, clusters=5_000))]
    if not args.quick:
        sets.append(("1M", lambda: synthetic(1_000_000, 128, 4, clusters=50_000)))
    rows: list[dict[str, Any]] = []
    for name, make in sets:
        rows.extend(measure(name, l2_normalize(make()), repeat))
    exact = {(r["index"]): r for r in rows if r["method"] == "exact"}
    table = md_table(
        ["index", "n x dim", "method", "single ms/query", "batch ms/query", "vs exact (single)",
         "vs exact (batch)", "recall@5", "share compared", "answered by"],
        [[r["index"], f"{r['n']:,} x {r['dim']}", r["method"], r["single_ms"], r["batch_ms"],
          f"{exact[r['index']]['single_ms'] / r['single_ms']:.2f}x",
          f"{exact[r['index']]['batch_ms'] / r['batch_ms']:.2f}x", r["recall_at_5"],
          f"{100 * r['share']:.1f}%",
          ", ".join(f"{m} {c}" for m, c in sorted(r["answered_by"].items()))] for r in rows])
    lsh = "; ".join(f"{r['index']}: {r['lsh']['tables']} bands x {r['lsh']['keys_per_band']} "
                    f"keys, {r['lsh']['probes']} probes (tuned share {100 * r['tuned_share']:.1f}%)"
                    for r in rows if r["method"] == "exact")
    md = f"""## Lookup latency: LSH against exact search (`bench_search.py`)

In-process lookups through `imgsim.ann.LshIndex`, k = 5, {QUERIES} queries (references plus
noise): one call per query (single) or one call for all (batch). **exact**: the exact scan (one
matrix product per batch); **LSH only**: the auto-tuned LSH with the scan rule off;
**imgsim default**: the scan rule at its defaults (scan when the LSH compared more than
{100 * SCAN_SHARE:.0f}% of the index in validation (here: in tuning), or when references x dims
< {SCAN_BELOW:,}). "vs exact" >
1 means faster than exact. Real vectors at the sample size (1280-d, raw efficientnet_lite0);
synthetic clustered 128-d vectors at 100k and 1M.

{table}

LSH configurations (auto-tuner, target recall@5 0.95 on a 4,000-vector sample): {lsh}.
"""
    write_result("search", {"rows": rows, "scan_share": SCAN_SHARE, "scan_below": SCAN_BELOW},
                 md)


if __name__ == "__main__":
    main()
