"""The version map on a real index: islands (t-SNE) against the principal plane, and what a
daily update costs (placing new references) against laying the map out anew.

    make bench-map      # both steps: the 8,144 training photos indexed, then this script
    # or by hand: index the 8,144 training photos (README, "Indexing the real dataset"), e.g.
    export IMGSIM_DATA_ROOT=/tmp/k8/data AIRFLOW_HOME=/tmp/k8/airflow
    IMGSIM_ARCHIVE_URL=../shared/data/stanford_cars_train/cars_train.tgz \
      IMGSIM_LABELS_URL=../shared/data/stanford_cars_labels/cardatasettrain.csv \
      IMGSIM_CLASS_NAMES_URL=../shared/data/stanford_cars_labels/cars_meta.mat make demo
    .venv/bin/python benchmarks/bench_map.py --data-root /tmp/k8/data [--seed 42]

Reads the CURRENT version's reference table (the search-space vectors the fit job lays out,
i.e. the LDA space the index learned from the labels) and measures, with the code the fit job
runs (:mod:`imgsim.ann.layout`):

* **islands**: the share of labelled points whose nearest other point on the map is of the
  same class, for the principal plane (the map before t-SNE) and for t-SNE, on the default
  sample (``MAP_POINTS``, chosen by image id as the fit job does) and on every reference; the
  same share in the search space itself (the ceiling a map can show);
* **a daily update**: the map of the sample without a seeded 5%, 10% or 20% of it, then those
  points placed into it (:func:`imgsim.ann.layout.place`: each at the median of its nearest
  old points, the others kept), against a layout of the whole sample: seconds, the islands
  after placing, and the share of placed points whose nearest old point on the map is of their
  class, beside the same share in the search space (the most placing can reach). Ratios in
  one run: timings swing 2-3x on these machines.

Writes ``results/map.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PROJECT_ROOT, md_table, write_result

sys.path.insert(0, str(PROJECT_ROOT / "include"))

SHARES = (0.05, 0.10, 0.20)


def references(data_root: Path) -> tuple[str, list[str], np.ndarray, list[int | None]]:
    """CURRENT's version, ids (sorted), vectors and labels."""
    import pyarrow.parquet as pq

    from imgsim.config import Layout
    from imgsim.versions.models import current_version, version_dir

    layout = Layout(data_root)
    version = current_version(layout)
    if version is None:
        raise SystemExit(f"no CURRENT version under {layout.models}: index the set first")
    table = pq.read_table(
        version_dir(layout, version) / "reference", columns=["image_id", "class_id", "vector"]
    ).to_pandas()
    table = table.sort_values("image_id", ignore_index=True)
    x = np.stack(table["vector"].map(lambda v: np.asarray(v, np.float64)).to_list())
    labels = [None if c != c else int(c) for c in table["class_id"]]
    return version, table["image_id"].tolist(), x, labels


def run(data_root: Path, seed: int) -> None:
    from imgsim.ann.layout import (
        MAP_POINTS,
        in_sample,
        lay_out,
        layout_threads,
        place,
        principal_plane,
        same_class_neighbours,
        sample_cut,
    )

    version, ids, x, labels = references(data_root)
    cut = sample_cut(len(ids), MAP_POINTS)
    keep = np.array([in_sample(i, cut) for i in ids])
    rows: list[dict[str, Any]] = []
    layouts: dict[str, np.ndarray] = {}
    for name, mask in (("sample", keep), ("all", np.ones(len(ids), bool))):
        xs, ls = x[mask], [lab for lab, m in zip(labels, mask, strict=True) if m]
        t0 = time.perf_counter()
        plane = principal_plane(xs)
        plane_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        laid = lay_out(xs, seed=seed)
        tsne_s = time.perf_counter() - t0
        layouts[name] = laid.xy
        rows.append(
            {
                "points": int(mask.sum()),
                "set": name,
                "in_space": same_class_neighbours(xs, ls),
                "principal_plane": same_class_neighbours(plane, ls),
                "principal_plane_seconds": round(plane_s, 3),
                "tsne": same_class_neighbours(laid.xy, ls),
                "tsne_seconds": round(tsne_s, 2),
                "kl_divergence": laid.info.get("kl_divergence"),
            }
        )
        print(rows[-1], flush=True)
    xs = x[keep]
    ls = [lab for lab, m in zip(labels, keep, strict=True) if m]
    full_s = next(r["tsne_seconds"] for r in rows if r["set"] == "sample")
    updates = []
    rng = np.random.default_rng(seed)
    for share in SHARES:
        new = np.sort(rng.choice(len(xs), size=round(share * len(xs)), replace=False))
        old = np.setdiff1d(np.arange(len(xs)), new)
        before = lay_out(xs[old], seed=seed)
        t0 = time.perf_counter()
        placed = place(xs[old], before.xy, xs[new], seed=seed)
        place_s = time.perf_counter() - t0
        xy = np.zeros((len(xs), 2))
        xy[old], xy[new] = before.xy, placed
        lab_new = np.asarray([ls[i] for i in new])
        d = ((placed[:, None, :] - before.xy[None, :, :]) ** 2).sum(axis=2)
        nearest_old = np.asarray([ls[i] for i in old])[d.argmin(axis=1)]
        g = ((xs[new][:, None, :] - xs[old][None, :, :]) ** 2).sum(axis=2)
        in_space = np.asarray([ls[i] for i in old])[g.argmin(axis=1)]
        updates.append(
            {
                "new_share": share,
                "new": len(new),
                "place_seconds": round(place_s, 2),
                "layout_seconds": full_s,
                "place_over_layout": round(place_s / full_s, 3),
                "islands_after_placing": same_class_neighbours(xy, ls),
                "new_next_to_own_class": round(float((nearest_old == lab_new).mean()), 4),
                "new_next_to_own_class_in_space": round(float((in_space == lab_new).mean()), 4),
            }
        )
        print(updates[-1], flush=True)
    data = {
        "data_root": str(data_root),
        "version": version,
        "references": len(ids),
        "map_points": MAP_POINTS,
        "seed": seed,
        "threads": layout_threads(),
        "islands": rows,
        "updates": updates,
    }
    write_result("map", data, section(data))


def section(data: dict[str, Any]) -> str:
    rows = [
        [
            r["set"],
            r["points"],
            r["in_space"],
            r["principal_plane"],
            r["tsne"],
            r["tsne_seconds"],
        ]
        for r in data["islands"]
    ]
    ups = [
        [
            f"{u['new_share']:.0%}",
            u["new"],
            u["place_seconds"],
            u["place_over_layout"],
            u["islands_after_placing"],
            u["new_next_to_own_class"],
            u.get("new_next_to_own_class_in_space"),
        ]
        for u in data["updates"]
    ]
    return (
        f"## The version map (`bench_map.py`)\n\n"
        f"CURRENT `{data['version']}` of `{data['data_root']}`: {data['references']:,} "
        f"references, the search space the index learned (LDA on their labels). Share of "
        f"labelled points whose nearest other point is of the same class (the islands), "
        f"{data['threads']} threads, seed {data['seed']}:\n\n"
        + md_table(
            [
                "points",
                "n",
                "in the search space",
                "principal plane (before)",
                "t-SNE map",
                "t-SNE seconds",
            ],
            rows,
        )
        + "\n\nA daily update on the default sample: a seeded share of it left out, the rest laid "
        "out, then the left-out points placed into that layout (the others kept), against "
        "laying out the whole sample:\n\n"
        + md_table(
            [
                "new",
                "points",
                "place seconds",
                "place / full layout",
                "islands after placing",
                "placed point next to its class (map)",
                "(search space)",
            ],
            ups,
        )
        + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    run(args.data_root, args.seed)


if __name__ == "__main__":
    main()
