"""Quality: are the answers the same car? Every search space side by side on the sample split.

    .venv/bin/python benchmarks/bench_quality.py [--seed 0]

Runs ``imgsim evaluate --sample`` (the same code): the seed's split of the shared Stanford Cars
sample (8 references and 2 queries per class), a version built by the index DAG's task bodies
and a real ``spark-submit`` of the fit job, then the published version and each projection kind
(none, whiten, lda; without and with query expansion) scored by label precision@k and hit@k,
LSH recall against exact search in that space, share of the index compared and time. Writes
``results/quality.{json,md}`` and ``plots/quality.png`` (precision@k per kind).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PLOTS_DIR, WORK_DIR, md_table, require_sample, write_result


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = report["k"]
    xs = list(range(1, k + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for row in report["kinds"]:
        if "curves" not in row or "dims" not in row:
            continue
        style = "-o" if row["expansion"] else "--o"
        qe = " + query expansion" if row["expansion"] else ""
        ax.plot(
            xs,
            row["curves"]["lsh_precision"],
            style,
            ms=3,
            label=f"{row['kind']} ({row['dims']}-d){qe}",
        )
    ax.axhline(report["chance_precision"], color="grey", lw=0.8, label="chance")
    ax.set_xticks(xs)
    ax.set_xlabel("i (rank)")
    ax.set_ylabel("label precision@i (LSH answers)")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"{report['backbone']}, sample split seed {report['split']['seed']}: "
        f"{report['reference_images']} references, {report['queries']} queries",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    from imgsim.evaluate import evaluate_sample

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sample = require_sample()
    root = WORK_DIR / "quality"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    report = evaluate_sample(sample, root / "data", root / "eval", seed=args.seed)
    total = time.perf_counter() - t0
    timings = report["build_seconds"]
    share = timings.get("projection", 0) / max(sum(timings.values()), 1e-9)
    k = report["k"]
    rows = []
    for r in report["kinds"]:
        if "skipped" in r:
            rows.append([r["kind"], "-", "skipped", r["skipped"], "", "", "", "", "", ""])
            continue
        rows.append(
            [
                r["kind"],
                r.get("dims", report["projection"].get("dims")),
                r["expansion"],
                r[f"precision_at_{k}"],
                r["hit_at_1"],
                r[f"hit_at_{k}"],
                r[f"exact_precision_at_{k}"],
                r[f"recall_at_{k}_vs_exact"],
                f"{100 * r['candidates_share_mean']:.1f}%",
                r["query_ms"],
            ]
        )
    proj = report["projection"]
    md = "\n".join(
        [
            "## Quality: the same car? (label precision by search space)",
            "",
            f"`imgsim evaluate --sample` on the seed-{args.seed} split of the shared sample: "
            f"{report['reference_images']} references (8 per class) and {report['queries']} "
            f"queries (2 per class, never seen by the index or its projection), "
            f"{report['backbone']}, k={k}. The first rows are the **published version with the "
            "default settings** (Spark's LSH in the learned space); the others are each kind "
            "learned the same way on the same references, with the LSH auto-tuned in its space "
            "over NumPy-drawn projections (the twin of Spark's). QE: query expansion (the query "
            "searched again with its first answer, `IMGSIM_QUERY_EXPANSION`).",
            "",
            md_table(
                [
                    "search space",
                    "dims",
                    "QE",
                    f"precision@{k}",
                    "hit@1",
                    f"hit@{k}",
                    f"exact precision@{k}",
                    f"LSH recall@{k} vs exact",
                    "index compared",
                    "ms/query",
                ],
                rows,
            ),
            "",
            f"Default: **precision@{k} {report[f'precision_at_{k}']:.3f}, hit@1 "
            f"{report['hit_at_1']:.3f}** (exact search in the same space: "
            f"{report[f'exact_precision_at_{k}']:.3f}); chance {report['chance_precision']:.3f}. "
            f"The projection chosen: {proj['kind']} {proj.get('dim')} -> {proj.get('dims')} dims, "
            f"{proj.get('reason')}.",
            "",
            f"Cost: learning the projection (in the task, cross-validation included) took "
            f"{timings.get('projection', 0):.1f} s, {100 * share:.1f}% of the index build "
            f"({sum(timings.values()):.0f} s: catalog and embedding "
            f"{timings.get('catalog_and_embed', 0):.0f} s, Spark fit "
            f"{timings.get('fit_spark_submit', 0):.0f} s, validate and publish "
            f"{timings.get('validate_and_publish', 0):.1f} s). The whole evaluation took "
            f"{total:.0f} s. Query expansion costs a second search per query (the ms/query "
            "column).",
            "",
            "![precision@k per search space](plots/quality.png)",
        ]
    )
    plot(report, PLOTS_DIR / "quality.png")
    write_result(
        "quality",
        {"report": report, "build_seconds": timings, "total_seconds": round(total, 1)},
        md,
    )
    print(md)


if __name__ == "__main__":
    main()
