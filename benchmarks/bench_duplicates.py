"""Near-duplicate distance: how far a copy of a photo lies from it, and how near distinct photos.

    .venv/bin/python benchmarks/bench_duplicates.py [--seed 0] [--originals 300]

Measures the default of ``IMGSIM_DUPLICATE_DISTANCE`` (near-duplicate groups are the graph's
edges at or under it). All 1,960 photos of the shared Stanford Cars sample are the reference
set: embedded with efficientnet_lite0 on the default runtime (the embed task's own code,
``imgsim.embedding.infer``), and the search space learned from them and their labels as the
index learns it by default (``imgsim.ann.projection.choose`` with ``IMGSIM_PROJECTION``:
auto, so Fisher LDA when labels cover the references). A seeded subset of ``--originals``
photos is copied with PIL (JPEG re-encode at quality 40 and 70, resized to 50%, centre crop
keeping 90% and 80% of each side, horizontal flip, and crop 90% + flip + JPEG 70; written to a
temporary folder outside the repository, lossless PNG unless the copy is a JPEG one) and each
copy embedded the same way. Distances are Euclidean between unit vectors, in the search space
(projected, what the graph compares) and in the raw L2-normalised embedding space for
comparison:

* copy to its original, per transformation (median, 95th percentile, max);
* each of the 1,960 originals to its nearest other original, and to its nearest other original
  of the same class (1st and 5th percentile, median);
* the threshold: the smallest distance that keeps 99% of the copies of every mild
  transformation (re-encodes, resize, 90% crop, flip), if no more than 0.5% of the originals
  then have a distinct photo within it (else the largest distance that keeps that false-pair
  rate); then recall per transformation and false pairs at it.

Writes ``results/duplicates.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, require_sample, write_result

BACKBONE = "efficientnet_lite0"
#: (name, what it does, mild: a copy the default threshold must group with its original)
TRANSFORMS = (
    ("jpeg_q40", "JPEG re-encode, quality 40", True),
    ("jpeg_q70", "JPEG re-encode, quality 70", True),
    ("resize_50", "resized to 50% (bicubic)", True),
    ("crop_90", "centre crop, 90% of each side", True),
    ("flip", "horizontal flip", True),
    ("crop_80", "centre crop, 80% of each side", False),
    ("crop_90_flip_q70", "crop 90% + flip + JPEG 70", False),
)
#: the threshold rule: keep this share of every mild transformation's copies ...
KEEP_COPIES = 0.99
#: ... while at most this share of the originals has a distinct photo within the threshold
MAX_FALSE = 0.005
#: thresholds scanned (and reported), distance units
GRID = np.round(np.arange(0.0, 1.2001, 0.005), 3)
ROUND_TO = 0.01


# -- copies ----------------------------------------------------------------------------------------


def make_copy(src: Path, name: str, dst_dir: Path) -> Path:
    """Write the ``name`` copy of ``src`` into ``dst_dir``; its path."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    w, h = img.size

    def centre_crop(im: Image.Image, keep: float) -> Image.Image:
        cw, ch = round(w * keep), round(h * keep)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return im.crop((x0, y0, x0 + cw, y0 + ch))

    jpeg_quality = None
    if name == "jpeg_q40":
        jpeg_quality = 40
    elif name == "jpeg_q70":
        jpeg_quality = 70
    elif name == "resize_50":
        img = img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    elif name == "crop_90":
        img = centre_crop(img, 0.9)
    elif name == "crop_80":
        img = centre_crop(img, 0.8)
    elif name == "flip":
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif name == "crop_90_flip_q70":
        img = centre_crop(img, 0.9).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        jpeg_quality = 70
    else:
        raise ValueError(f"unknown transformation {name!r}")
    if jpeg_quality is not None:
        dst = dst_dir / f"{src.stem}-{name}.jpg"
        img.save(dst, "JPEG", quality=jpeg_quality)
    else:
        dst = dst_dir / f"{src.stem}-{name}.png"
        img.save(dst, "PNG")
    return dst


# -- embedding and the search space ------------------------------------------------------------


def load_default_backbone() -> tuple[Any, str]:
    """efficientnet_lite0 as a new store's embed task loads it (runtime auto: onnx on a CPU)."""
    from imgsim.config import Settings
    from imgsim.embedding.backbones import load_backbone, resolve_runtime
    from imgsim.embedding.infer import configure_threads

    settings = Settings.from_env()
    runtime = resolve_runtime(settings.runtime, settings.device, None)
    configure_threads(settings.num_threads)
    backbone = load_backbone(
        BACKBONE,
        weights_path=settings.weights_path,
        device=settings.device,
        runtime=runtime,
        cache_dir=settings.model_cache,
    )
    return backbone, runtime


def embed(backbone: Any, paths: list[Path]) -> np.ndarray:
    from imgsim.config import Settings
    from imgsim.embedding.infer import embed_paths

    vectors, bad = embed_paths(paths, backbone, batch_size=Settings.from_env().batch_size)
    if bad:
        raise RuntimeError(f"{len(bad)} images could not be embedded: {bad[:3]}")
    return vectors


def learn_search_space(x: np.ndarray, y: np.ndarray) -> Any:
    """The projection the index learns by default from these references and labels (the
    local engine's ``choose`` call in ``imgsim.index.pipeline``)."""
    from imgsim.ann.projection import choose, stats_from_arrays
    from imgsim.config import Settings

    settings = Settings.from_env()
    return choose(
        stats_from_arrays(x, y),
        settings.projection,
        cv_vectors=x,
        cv_labels=y,
        seed=settings.lsh_seed,
        min_coverage=settings.projection_min_coverage,
    )


# -- distances -------------------------------------------------------------------------------------


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between unit rows of ``a`` and ``b``."""
    sims = a.astype(np.float64) @ b.astype(np.float64).T
    return np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))


def pct(values: np.ndarray, qs: tuple[float, ...]) -> dict[str, float]:
    return {f"p{q:g}": round(float(np.percentile(values, q)), 4) for q in qs}


def measure_space(
    apply: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    chosen: np.ndarray,
    copies: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Copy-to-original and nearest-distinct distances in one space, and the threshold scan."""
    o = apply(x)
    d = pairwise(o, o)
    np.fill_diagonal(d, np.inf)
    nearest = d.min(1)
    same = np.where(y[:, None] == y[None, :], d, np.inf)
    nearest_same = same.min(1)
    iu = np.triu_indices(len(o), 1)
    pair_d = np.sort(d[iu])
    out: dict[str, Any] = {
        "nearest_other": {
            **pct(nearest, (1, 5, 50)),
            "min": round(float(nearest.min()), 4),
        },
        "nearest_other_same_class": {
            **pct(nearest_same, (1, 5, 50)),
            "min": round(float(nearest_same.min()), 4),
        },
        "nearest_other_is_same_class": round(
            float((y[d.argmin(1)] == y).mean()), 4
        ),  # label hit@1
        "closest_distinct_pairs": [],
        "copies": {},
    }
    order = np.argsort(d[iu])[:5]
    out["closest_distinct_pairs"] = [
        {"a": int(iu[0][i]), "b": int(iu[1][i]), "distance": round(float(d[iu][i]), 4)}
        for i in order
    ]
    copy_d: dict[str, np.ndarray] = {}
    for name, vecs in copies.items():
        c = apply(vecs)
        dc = pairwise(c, o)  # (copies, originals)
        own = dc[np.arange(len(chosen)), chosen]
        others = dc.copy()
        others[np.arange(len(chosen)), chosen] = np.inf
        copy_d[name] = own
        out["copies"][name] = {
            "median": round(float(np.median(own)), 4),
            "p95": round(float(np.percentile(own, 95)), 4),
            "max": round(float(own.max()), 4),
            "own_photo_nearest": round(float((own < others.min(1)).mean()), 4),
            "_distances": own,
            "_nearest_distinct": others.min(1),
        }
    out["scan"] = [
        {
            "threshold": float(t),
            "false_originals": round(float((nearest <= t).mean()), 5),
            "false_pairs": int(np.searchsorted(pair_d, t, side="right")),
            **{f"recall_{n}": round(float((v <= t).mean()), 4) for n, v in copy_d.items()},
        }
        for t in GRID
    ]
    out["_nearest"] = nearest
    out["_nearest_same"] = nearest_same
    out["_pairs"] = pair_d
    return out


def at_threshold(space: dict[str, Any], t: float, n: int) -> dict[str, Any]:
    """Recall of copies per transformation and false pairs among distinct photos at ``t``."""
    pairs = int(np.searchsorted(space["_pairs"], t, side="right"))
    return {
        "threshold": t,
        "recall": {
            name: round(float((c["_distances"] <= t).mean()), 4)
            for name, c in space["copies"].items()
        },
        # a copy that also lies within t of a photo other than its own (a wrong edge)
        "copies_near_a_distinct_photo": {
            name: round(float((c["_nearest_distinct"] <= t).mean()), 4)
            for name, c in space["copies"].items()
        },
        "false_originals": round(float((space["_nearest"] <= t).mean()), 5),
        "false_originals_same_class": round(float((space["_nearest_same"] <= t).mean()), 5),
        "false_pairs": pairs,
        "false_pair_rate": pairs / (n * (n - 1) / 2),
    }


def choose_threshold(space: dict[str, Any]) -> tuple[float, str]:
    """The rule in the module docstring, rounded up to ROUND_TO when that keeps the bound."""
    mild = [name for name, _, is_mild in TRANSFORMS if is_mild]
    need = max(float(np.quantile(space["copies"][m]["_distances"], KEEP_COPIES)) for m in mild)
    nearest = np.sort(space["_nearest"])
    allowed = float(np.quantile(nearest, MAX_FALSE, method="lower"))  # largest t at the bound
    # the largest t with at most MAX_FALSE of the originals within t of a distinct photo
    k = int(np.floor(MAX_FALSE * len(nearest)))
    allowed = float(np.nextafter(nearest[k], 0)) if k < len(nearest) else float(nearest[-1])
    if need <= allowed:
        t = float(np.ceil(need / ROUND_TO) * ROUND_TO)
        if t > allowed:
            t = need
        rule = (
            f"{100 * KEEP_COPIES:g}% of every mild transformation's copies need "
            f"{need:.3f}; distinct photos start at {nearest[0]:.3f} and {100 * MAX_FALSE:g}% "
            f"of the originals have one within {allowed:.3f}: the need, rounded up to "
            f"{ROUND_TO:g}"
        )
    else:
        t = float(np.floor(allowed / ROUND_TO) * ROUND_TO)
        rule = (
            f"{100 * KEEP_COPIES:g}% of every mild transformation's copies need "
            f"{need:.3f}, but {100 * MAX_FALSE:g}% of the originals already have a distinct "
            f"photo within {allowed:.3f}: the largest distance that keeps that false-pair "
            f"bound, rounded down to {ROUND_TO:g}"
        )
    return round(t, 4), rule


def public(space: dict[str, Any]) -> dict[str, Any]:
    """The space's measurements without the arrays."""
    out = {k: v for k, v in space.items() if not k.startswith("_")}
    out["copies"] = {
        name: {k: v for k, v in c.items() if not k.startswith("_")}
        for name, c in space["copies"].items()
    }
    return out


# -- report ----------------------------------------------------------------------------------------


def section(data: dict[str, Any]) -> str:
    spaces = data["spaces"]
    s, r = spaces["search"], spaces["raw"]
    t = data["threshold"]
    tr = data["raw_threshold"]
    rows = []
    for name, what, mild in TRANSFORMS:
        cs, cr = s["copies"][name], r["copies"][name]
        rows.append(
            [
                f"{what}{'' if mild else ' (not mild)'}",
                cs["median"],
                cs["p95"],
                cs["max"],
                f"{100 * t['search']['recall'][name]:.1f}%",
                cr["median"],
                cr["p95"],
                cr["max"],
                f"{100 * tr['search']['recall'][name]:.1f}%",
            ]
        )
    for key, what in (
        ("nearest_other", "nearest other original"),
        ("nearest_other_same_class", "nearest other original, same class"),
    ):
        rows.append(
            [
                f"{what}: p1 / p5 / median (min)",
                s[key]["p1"],
                s[key]["p5"],
                f"{s[key]['p50']} ({s[key]['min']})",
                "",
                r[key]["p1"],
                r[key]["p5"],
                f"{r[key]['p50']} ({r[key]['min']})",
                "",
            ]
        )
    proj = data["projection"]
    n = data["references"]
    ts, trr = t["search"], tr["search"]
    return "\n".join(
        [
            "## Near-duplicate distance (`bench_duplicates.py`)",
            "",
            f"{data['originals']} photos of the shared sample (seed {data['seed']}) copied "
            f"with PIL and embedded ({BACKBONE}, runtime {data['runtime']}); all {n:,} "
            f"photos are the references the search space is learned from ({proj['kind']} "
            f"{proj['dim']} -> {proj['dims']} dims: {proj['reason']}). Euclidean distances "
            "between unit vectors, in the search space (what the neighbour graph compares) "
            "and in the raw L2-normalised embedding space. Copy rows: the copy to its "
            "original (median, 95th percentile, max; recall at the threshold below); "
            "nearest-other rows: each original to its nearest distinct original (1st, 5th "
            "percentile, median, min).",
            "",
            md_table(
                [
                    "copy / distance",
                    "search median",
                    "search p95",
                    "search max",
                    f"search recall @ {ts['threshold']:g}",
                    "raw median",
                    "raw p95",
                    "raw max",
                    f"raw recall @ {trr['threshold']:g}",
                ],
                rows,
            ),
            "",
            f"Default `IMGSIM_DUPLICATE_DISTANCE` = **{ts['threshold']:g}** (search space). "
            f"Rule: {data['threshold_rule']}. At it {100 * ts['false_originals']:.2f}% of the "
            f"originals ({100 * ts['false_originals_same_class']:.2f}% by one of their own "
            f"class) have a distinct photo within the threshold: {ts['false_pairs']} false "
            f"pairs of {n * (n - 1) // 2:,} ({ts['false_pair_rate']:.2e}). Copies that also lie "
            "within it of a photo other than their own: "
            + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in ts["copies_near_a_distinct_photo"].items()
            )
            + ".",
            "",
            f"The same rule in the raw space gives {trr['threshold']:g}, with "
            f"{100 * trr['false_originals']:.2f}% of the originals in a false pair "
            f"({trr['false_pairs']} pairs). {data['verdict']}",
        ]
    )


def verdict(data: dict[str, Any]) -> str:
    """Which transformations the search-space threshold cannot separate from distinct
    photos, and whether the raw space would separate them better."""
    ts, tr = data["threshold"]["search"], data["raw_threshold"]["search"]
    lost = [n for n, v in ts["recall"].items() if v < KEEP_COPIES]
    raw_lost = [n for n, v in tr["recall"].items() if v < KEEP_COPIES]
    parts = [
        (
            "In the search space the threshold keeps fewer than "
            f"{100 * KEEP_COPIES:g}% of the copies of: " + ", ".join(lost) + "."
            if lost
            else f"In the search space it keeps {100 * KEEP_COPIES:g}%+ of every copy kind."
        ),
        (
            "In the raw space, of: " + ", ".join(raw_lost) + "."
            if raw_lost
            else f"In the raw space {100 * KEEP_COPIES:g}%+ of every copy kind."
        ),
    ]
    return " ".join(parts)


def main() -> None:
    from imgsim.ann.projection import l2_normalize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="which photos are copied (default 0)")
    ap.add_argument(
        "--originals", type=int, default=300, help="photos copied (default 300 of 1,960)"
    )
    args = ap.parse_args()
    sample = require_sample()
    started = time.perf_counter()
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    files = [sample / "images" / r["image"] for r in rows]
    y = np.array([int(r["Class"]) for r in rows], np.int64)
    if not 0 < args.originals <= len(files):
        sys.exit(f"--originals must be 1..{len(files)}")
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(files), size=args.originals, replace=False))

    backbone, runtime = load_default_backbone()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"embedding {len(files)} references ({BACKBONE}, {runtime}) ...", flush=True)
    x = embed(backbone, files)
    seconds["embed_references"] = round(time.perf_counter() - t0, 1)
    copies: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgsim-bench-duplicates-") as tmp:
        for name, _, _ in TRANSFORMS:
            folder = Path(tmp) / name
            folder.mkdir()
            paths = [make_copy(files[i], name, folder) for i in chosen]
            print(f"embedding {len(paths)} copies: {name} ...", flush=True)
            copies[name] = embed(backbone, paths)
    seconds["copy_and_embed"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    choice = learn_search_space(x, y)
    seconds["learn_projection"] = round(time.perf_counter() - t0, 1)
    proj = choice.projection
    spaces = {
        "search": measure_space(proj.apply, x, y, chosen, copies),
        "raw": measure_space(l2_normalize, x, y, chosen, copies),
    }
    n = len(files)
    threshold, rule = choose_threshold(spaces["search"])
    raw_threshold, raw_rule = choose_threshold(spaces["raw"])
    data: dict[str, Any] = {
        "backbone": BACKBONE,
        "runtime": runtime,
        "seed": args.seed,
        "originals": int(args.originals),
        "references": n,
        "sample": str(sample),
        "transforms": [
            {"name": name, "what": what, "mild": mild} for name, what, mild in TRANSFORMS
        ],
        "projection": {
            "kind": proj.kind,
            "dim": proj.dim,
            "dims": proj.dims,
            "params": proj.params,
            "reason": choice.reason,
        },
        "rule": {"keep_copies": KEEP_COPIES, "max_false_originals": MAX_FALSE},
        "threshold_rule": rule,
        "threshold": {
            "search": at_threshold(spaces["search"], threshold, n),
            "raw": at_threshold(spaces["raw"], threshold, n),
        },
        "raw_threshold_rule": raw_rule,
        "raw_threshold": {
            "search": at_threshold(spaces["raw"], raw_threshold, n),
        },
        "spaces": {k: public(v) for k, v in spaces.items()},
        "closest_distinct_files": {
            k: [
                {**p, "a": files[p["a"]].name, "b": files[p["b"]].name}
                for p in public(v)["closest_distinct_pairs"]
            ]
            for k, v in spaces.items()
        },
        "seconds": seconds,
    }
    data["verdict"] = verdict(data)
    data["seconds"]["total"] = round(time.perf_counter() - started, 1)
    md = section(data)
    out = write_result("duplicates", data, md)
    print(md)
    print(f"wrote {out} in {data['seconds']['total']} s")


if __name__ == "__main__":
    main()
