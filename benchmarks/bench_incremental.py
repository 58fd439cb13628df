"""Incremental cost: a daily run that adds 1% new photos, against a full rebuild of the index.

The index DAG's task bodies run in order, in this process, with the functions the DAG calls
(``imgsim.index.pipeline``: catalog, plan_shards, embed_shard per shard, fit_plan, validate,
publish) and a real ``spark-submit spark_jobs/fit_lsh.py`` for the fit, as the
SparkSubmitOperator runs it. Airflow's own scheduling overhead is not included.

Runs on one data root (efficientnet_lite0, real weights):

1. initial build: the shared sample minus 1% (1,940 photos);
2. incremental: 20 new photos (1%) in ``incoming/<date>/`` (mirror images of sample photos);
3. nothing new: the next day, no new photo (must embed nothing and skip the refit);
4. full rebuild of the same 1,960 photos (Param ``full_rebuild``: re-embed all, refit).

    .venv/bin/python benchmarks/bench_incremental.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PLOTS_DIR, WORK_DIR, md_table, require_sample, write_result

log = logging.getLogger("bench_incremental")

BACKBONE = "efficientnet_lite0"
STAGES = (
    "catalog",
    "plan_shards",
    "embed",
    "fit_plan",
    "learn_projection",
    "fit_lsh",
    "validate",
    "publish",
)


def prepare_root(
    sample: Path, root: Path, n_indexed: int, n_new: int, new_day: str
) -> tuple[Path, Path]:
    """A fresh data root: ``images/cars_train/`` with the first photos and their labels CSV,
    ``incoming/<new_day>/`` with ``n_new`` mirrored photos; returns (image root, labels)."""
    from PIL import Image, ImageOps

    shutil.rmtree(root, ignore_errors=True)
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if n_indexed + n_new > len(rows):
        sys.exit(f"the sample has {len(rows)} photos, fewer than {n_indexed} + {n_new}")
    images = root / "images" / "cars_train"
    images.mkdir(parents=True)
    indexed = rows[:n_indexed]
    for r in indexed:
        try:
            os.link(sample / "images" / r["image"], images / r["image"])
        except OSError:  # another file system
            shutil.copyfile(sample / "images" / r["image"], images / r["image"])
    labels = root / "raw" / "cars_train_labels.csv"
    labels.parent.mkdir(parents=True)
    with open(labels, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "Class"])
        writer.writerows([[r["image"], r["Class"]] for r in indexed])
    day = root / "incoming" / new_day
    day.mkdir(parents=True)
    with open(day / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "Class"])
        for r in rows[n_indexed : n_indexed + n_new]:
            name = f"new_{r['image']}"
            with Image.open(sample / "images" / r["image"]) as im:
                ImageOps.mirror(im.convert("RGB")).save(day / name, quality=92)
            writer.writerow([name, r["Class"]])
    return images, labels


def index_run(
    settings: Any, image_root: Path, labels: Path, day: str, full_rebuild: bool = False
) -> dict[str, Any]:
    """One index run, task by task as the DAG chains them; per-stage seconds and counts."""
    from imgsim.index import pipeline

    run_id = f"bench__{day}{'_full' if full_rebuild else ''}"
    times: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
        return out

    cataloged = stage(
        "catalog",
        lambda: pipeline.catalog(
            settings, str(image_root), str(labels), day, run_id, BACKBONE, full_rebuild
        ),
    )
    shards = stage(
        "plan_shards", lambda: pipeline.plan_shards(settings, cataloged["to_embed_file"], run_id)
    )
    embedded = 0
    times["embed"] = 0.0
    for shard in shards:
        embedded += stage(
            "embed", functools.partial(pipeline.embed_shard, settings, shard["spec"], BACKBONE)
        )["embedded"]
    plan = stage(
        "fit_plan",
        lambda: pipeline.fit_plan(
            settings,
            BACKBONE,
            settings.lsh_num_hash_tables,
            settings.lsh_bucket_length,
            full_rebuild,
        ),
    )
    published, learned, graph = None, None, None
    if plan:
        learned = stage("learn_projection", lambda: pipeline.learn_projection(settings, plan))
        stage("fit_lsh", lambda: pipeline.submit_fit(plan, run_id))
        stage("validate", lambda: pipeline.validate(settings, plan))
        published = stage("publish", lambda: pipeline.publish(settings, plan["version"]))
        from imgsim.versions.models import read_manifest

        graph = read_manifest(settings.layout, plan["version"]).get("neighbours") or {}
    total = sum(times.values())
    log.info(
        "%s: %d shard(s), %d embedded, %s, %.1f s",
        run_id,
        len(shards),
        embedded,
        f"published {published['version']}" if published else "no refit",
        total,
    )
    return {
        "day": day,
        "full_rebuild": full_rebuild,
        "shards": len(shards),
        "embedded": embedded,
        "refit": bool(plan),
        "version": published["version"] if published else None,
        "indexed": published["indexed"] if published else None,
        "stages_s": times,
        "total_s": total,
        # the projection learned or kept (CURRENT's), the graph built or updated
        "projection": learned["engine"] if learned else None,
        "graph_mode": graph.get("mode") if graph else None,
        "graph_mode_reason": graph.get("mode_reason") if graph else None,
    }


def plot(runs: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(8, 4.0))
    left = [0.0] * len(names)
    colours = plt.get_cmap("tab10")
    for i, stage_name in enumerate(STAGES):
        vals = [runs[n]["stages_s"].get(stage_name, 0.0) for n in names]
        ax.barh(names, vals, left=left, color=colours(i), label=stage_name)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.0f} s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (lower is better)")
    ax.set_xlim(0, max(left) * 1.15)
    ax.legend(fontsize=7, ncol=len(STAGES), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    ax.set_title("index run cost per stage", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def section(data: dict[str, Any]) -> str:
    runs = data["runs"]
    inc, full, none = runs["incremental"], runs["full rebuild"], runs["nothing new"]
    rows = [
        [
            name,
            r["embedded"],
            "yes" if r["refit"] else "no",
            *[r["stages_s"].get(s, 0.0) for s in STAGES],
            r["total_s"],
        ]
        for name, r in runs.items()
    ]
    return "\n".join(
        [
            "## Incremental cost",
            "",
            f"One data root, {BACKBONE} (real weights), runtime `{data['runtime']}`; the index "
            "DAG's task bodies (`imgsim.index.pipeline`) run in order in one process, and the "
            "fit is a real `spark-submit spark_jobs/fit_lsh.py` (Spark `local[*]`), as the DAG "
            "runs them (Airflow's scheduling overhead not included). Seconds per stage:",
            "",
            md_table(["run", "embedded", "refit", *STAGES, "total s"], rows),
            "",
            f"- **incremental / full rebuild: {inc['total_s'] / full['total_s']:.2f}** "
            f"({inc['embedded']} new photos = {data['new_share']:.1%} of {data['total_images']}; "
            f"the full rebuild re-embeds all {full['embedded']}). The Spark fit is "
            f"{inc['stages_s'].get('fit_lsh', 0.0) / inc['total_s']:.0%} of the incremental run: "
            "it starts a JVM, reads every vector, refits and measures recall, whatever the number "
            "of new photos; embedding is "
            f"{inc['stages_s'].get('embed', 0.0) / inc['total_s']:.0%}.",
            "- The projection and the graph per run: "
            + "; ".join(
                f"{name}: projection {r.get('projection') or '-'}, graph "
                f"{r.get('graph_mode') or '-'}"
                for name, r in runs.items()
            )
            + f". The incremental run's graph: {inc.get('graph_mode_reason') or '-'}.",
            f"- **nothing new: {none['total_s']:.1f} s**, embedded {none['embedded']}, refit: "
            f"{'yes' if none['refit'] else 'no'} (`fit_plan` short-circuits: the set of live "
            "embedded images, backbone and LSH parameters equal the current version's).",
            "",
            f"![incremental](plots/{data['plot']})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="396 + 4 photos instead of 1,940 + 20")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("imgsim", "py4j"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sample = require_sample()
    n_indexed, n_new = (396, 4) if args.quick else (1940, 20)

    from imgsim.config import Settings
    from imgsim.embedding.infer import configure_threads

    root = WORK_DIR / "incremental-root"
    image_root, labels = prepare_root(sample, root, n_indexed, n_new, "2026-01-02")
    settings = Settings.from_env().replace(
        data_root=root.resolve(), backbone=BACKBONE, shard_size=1000
    )
    configure_threads(settings.num_threads)
    started = time.perf_counter()
    runs = {
        "initial build": index_run(settings, image_root, labels, "2026-01-01"),
        "incremental": index_run(settings, image_root, labels, "2026-01-02"),
        "nothing new": index_run(settings, image_root, labels, "2026-01-03"),
        "full rebuild": index_run(settings, image_root, labels, "2026-01-03", full_rebuild=True),
    }
    if runs["nothing new"]["embedded"] or runs["nothing new"]["refit"]:
        raise SystemExit(f"a run with nothing new embedded or refit: {runs['nothing new']}")
    if runs["incremental"]["embedded"] != n_new:
        raise SystemExit(
            f"the incremental run embedded {runs['incremental']['embedded']}, "
            f"not the {n_new} new photos"
        )
    data = {
        "indexed_before": n_indexed,
        "new": n_new,
        "total_images": n_indexed + n_new,
        "new_share": n_new / (n_indexed + n_new),
        "runtime": settings.runtime,
        "runs": runs,
        "ratio_incremental_to_full": runs["incremental"]["total_s"]
        / runs["full rebuild"]["total_s"],
        "wall_s": time.perf_counter() - started,
        "plot": "incremental_stages.png",
    }
    plot(runs, PLOTS_DIR / data["plot"])
    write_result("incremental", data, section(data))
    print(section(data))


if __name__ == "__main__":
    main()
