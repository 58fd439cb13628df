"""Near-duplicate distance: how far copies of a photo lie from it, and distinct photos from it.

    .venv/bin/python benchmarks/bench_duplicates.py [--seed 0] [--originals 300]

Measures the default of ``IMGSIM_DUPLICATE_DISTANCE`` (near-duplicate groups are the neighbour
graph's edges at or under it, the distance taken between the L2-normalised embeddings) and how
many of each image's nearest in the graph must be rescored to meet every copy. All 1,960 photos
of the shared Stanford Cars sample are the references: embedded with efficientnet_lite0 on the
default runtime (the embed task's code, ``imgsim.embedding.infer``) and the search space learned
from them and their labels as the index learns it by default (``imgsim.ann.projection.choose``
with ``IMGSIM_PROJECTION``, auto: Fisher LDA when labels cover the references). ``--originals``
photos (seeded) are copied with PIL: JPEG re-encode at quality 40 and 70, resized to 50%, centre
crop keeping 90% and 80% of each side, horizontal flip, and crop 90% + flip + JPEG 70 (lossless
PNG unless the copy is a JPEG one, written to a temporary folder outside the repository), and
each copy embedded the same way. Distances are Euclidean between unit vectors, in the search
space (what the graph compares) and, for comparison, in the raw L2-normalised embedding space:

* copy to its original, per transformation (median, 95th percentile, max);
* each original to its nearest other original, and to its nearest other original of the same
  class (1st and 5th percentile, median). Pairs of the sample that are the same photo
  (:data:`SAMPLE_DUPLICATES`, found by eye among the closest pairs) are not distinct photos:
  they are left out of these and reported on their own;
* the threshold (:func:`choose_threshold`): the smallest distance that keeps
  :data:`KEEP_COPIES` of the copies of every mild transformation (the re-encodes, the resize,
  the 90% crop and the flip), if at most :data:`MAX_FALSE` of the originals then have a
  distinct photo within it; else the largest distance that keeps that false-pair bound. Recall
  of copies per transformation and false pairs at it, and the trade-off at other bounds.

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
#: (name, what it does, mild: a copy the default threshold should group with its original)
TRANSFORMS = (
    ("jpeg_q40", "JPEG re-encode, quality 40", True),
    ("jpeg_q70", "JPEG re-encode, quality 70", True),
    ("resize_50", "resized to 50% (bicubic)", True),
    ("crop_90", "centre crop, 90% of each side", True),
    ("flip", "horizontal flip", True),
    ("crop_80", "centre crop, 80% of each side", False),
    ("crop_90_flip_q70", "crop 90% + flip + JPEG 70", False),
)
#: Pairs of sample files that are one photo: mirrored, re-cropped or re-coloured copies (four
#: of them under different labels). Found by eye among the 45 closest pairs in each space
#: (efficientnet_lite0, seed 0); every other pair there is two distinct photos.
SAMPLE_DUPLICATES = (
    ("02952.jpg", "03437.jpg"),  # the same photo, labelled Suzuki SX4 2012 and Aerio 2007
    ("03268.jpg", "04118.jpg"),  # the same photo, labelled Dodge Caliber 2007 and 2012
    ("03741.jpg", "07909.jpg"),  # mirrored (FIAT 500 Convertible)
    ("00648.jpg", "03569.jpg"),  # mirrored (Hyundai Accent)
    ("02164.jpg", "04584.jpg"),  # mirrored (BMW 6 Series Convertible)
    ("00849.jpg", "06167.jpg"),  # mirrored (Chevrolet HHR SS)
    ("01958.jpg", "07565.jpg"),  # mirrored, re-cropped and re-coloured (Dodge Caravan)
    ("01586.jpg", "02955.jpg"),  # re-cropped (Lamborghini Aventador)
    ("04248.jpg", "06601.jpg"),  # re-cropped, re-coloured; labelled HUMMER H3T and H2 SUT
    ("03175.jpg", "06072.jpg"),  # re-cropped, re-coloured; labelled Bentley GT 2007 and 2012
)
#: the threshold rule: keep this share of every mild transformation's copies ...
KEEP_COPIES = 0.99
#: ... while at most this share of the originals has a distinct photo within the threshold
MAX_FALSE = 0.005
#: other false-pair bounds whose largest threshold and recalls are reported (the trade-off)
FALSE_BOUNDS = (0.0, 0.005, 0.01, 0.02, 0.05)
#: thresholds scanned into the JSON, and the rounding of the chosen one
GRID = np.round(np.arange(0.0, 1.4001, 0.01), 2)
ROUND_TO = 0.01


# -- copies ----------------------------------------------------------------------------------------


def make_copy(src: Path, name: str, dst_dir: Path) -> Path:
    """Write the ``name`` copy of ``src`` (a :data:`TRANSFORMS` name) into ``dst_dir``."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    w, h = img.size

    def centre_crop(im: Image.Image, keep: float) -> Image.Image:
        cw, ch = round(w * keep), round(h * keep)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        return im.crop((x0, y0, x0 + cw, y0 + ch))

    quality = None
    if name in ("jpeg_q40", "jpeg_q70"):
        quality = int(name[-2:])
    elif name == "resize_50":
        img = img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    elif name in ("crop_90", "crop_80"):
        img = centre_crop(img, int(name[-2:]) / 100)
    elif name == "flip":
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    elif name == "crop_90_flip_q70":
        img = centre_crop(img, 0.9).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        quality = 70
    else:
        raise ValueError(f"unknown transformation {name!r}")
    if quality is not None:
        dst = dst_dir / f"{src.stem}-{name}.jpg"
        img.save(dst, "JPEG", quality=quality)
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
    """The projection the index learns by default from these references and their labels (the
    local engine's ``choose`` call, ``imgsim.index.pipeline._learn_projection_local``)."""
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
    """Euclidean distances between the unit rows of ``a`` and ``b``."""
    sims = a.astype(np.float64) @ b.astype(np.float64).T
    return np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))


def r4(v: float) -> float:
    return round(float(v), 4)


#: ranks at which the copy and its original meet in the graph's k nearest (k = 10 by default)
GRAPH_RANKS = (1, 2, 3, 5, 10)


def measure_space(
    apply: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    same_photo: np.ndarray,
    chosen: np.ndarray,
    copies: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Copy-to-original and nearest-distinct distances in one space (keys with ``_``: arrays).

    ``same_photo`` (n x n, bool) marks each original with itself and its sample duplicates:
    those pairs are not distinct photos."""
    o = apply(x)
    d = pairwise(o, o)
    distinct = np.where(same_photo, np.inf, d)
    nearest = distinct.min(1)
    nearest_same = np.where(y[:, None] == y[None, :], distinct, np.inf).min(1)
    iu = np.triu_indices(len(o), 1)
    keep = ~same_photo[iu]
    pairs = np.sort(d[iu][keep])
    dup = np.argwhere(np.triu(same_photo, 1))
    out: dict[str, Any] = {
        "nearest_other": {
            **{f"p{q}": r4(np.percentile(nearest, q)) for q in (1, 5, 50)},
            "min": r4(nearest.min()),
        },
        "nearest_other_same_class": {
            **{f"p{q}": r4(np.percentile(nearest_same, q)) for q in (1, 5, 50)},
            "min": r4(nearest_same.min()),
        },
        # label hit@1 among the references: the nearest distinct photo is the same car model
        "nearest_other_is_same_class": r4((y[distinct.argmin(1)] == y).mean()),
        "sample_duplicates": [r4(d[i, j]) for i, j in dup],
        "copies": {},
        "_nearest": nearest,
        "_nearest_same": nearest_same,
        "_pairs": pairs,
        "_sample_duplicates": np.array([d[i, j] for i, j in dup]),
    }
    rows = np.arange(len(chosen))
    for name, vecs in copies.items():
        dc = pairwise(apply(vecs), o)  # (copies, originals)
        own = dc[rows, chosen]
        others = np.where(same_photo[chosen], np.inf, dc).min(1)
        # the graph meets the pair where the original is among the copy's k nearest or the
        # copy among the original's: the better of the two ranks (distinct photos nearer + 1)
        rank = (
            np.minimum(
                (np.where(same_photo[chosen], np.inf, dc) < own[:, None]).sum(1),
                (distinct[chosen] < own[:, None]).sum(1),
            )
            + 1
        )
        out["copies"][name] = {
            "median": r4(np.median(own)),
            "p95": r4(np.percentile(own, 95)),
            "max": r4(own.max()),
            "own_photo_nearest": r4((own < others).mean()),
            "graph_rank": {f"<={r}": r4((rank <= r).mean()) for r in GRAPH_RANKS},
            "_own": own,
            "_nearest_distinct": others,
        }
    out["scan"] = [at_threshold(out, float(t), len(o), brief=True) for t in GRID]
    return out


def at_threshold(space: dict[str, Any], t: float, n: int, brief: bool = False) -> dict[str, Any]:
    """Recall of copies per transformation and false pairs among distinct photos at ``t``."""
    pairs = int(np.searchsorted(space["_pairs"], t, side="right"))
    out: dict[str, Any] = {
        "threshold": round(t, 4),
        "recall": {name: r4((c["_own"] <= t).mean()) for name, c in space["copies"].items()},
        "false_originals": round(float((space["_nearest"] <= t).mean()), 5),
        "false_pairs": pairs,
    }
    if brief:
        return out
    return {
        **out,
        "false_originals_same_class": round(float((space["_nearest_same"] <= t).mean()), 5),
        "false_pair_rate": pairs / max(len(space["_pairs"]), 1),
        # a copy that is also within t of a distinct photo (a wrong edge in the graph)
        "copies_near_a_distinct_photo": {
            name: r4((c["_nearest_distinct"] <= t).mean()) for name, c in space["copies"].items()
        },
        "sample_duplicates_found": int((space["_sample_duplicates"] <= t).sum()),
    }


def largest_within(space: dict[str, Any], max_false: float) -> float:
    """The largest distance at which at most ``max_false`` of the originals have a distinct
    photo within it."""
    nearest = np.sort(space["_nearest"])
    k = int(np.floor(max_false * len(nearest) + 1e-9))
    return float(np.nextafter(nearest[k], 0.0)) if k < len(nearest) else float(nearest[-1])


def choose_threshold(space: dict[str, Any]) -> tuple[float, str]:
    """The smallest distance that keeps KEEP_COPIES of every mild transformation's copies
    (rounded up to ROUND_TO), if at most MAX_FALSE of the originals then have a distinct photo
    within it; else the largest distance that keeps that bound (rounded down)."""
    mild = [name for name, _, is_mild in TRANSFORMS if is_mild]
    need = {m: float(np.quantile(space["copies"][m]["_own"], KEEP_COPIES)) for m in mild}
    worst = max(need, key=lambda m: need[m])
    allowed = largest_within(space, MAX_FALSE)
    head = (
        f"{100 * KEEP_COPIES:g}% of every mild transformation's copies need "
        f"{need[worst]:.3f} ({worst}; "
        + ", ".join(f"{m} {v:.3f}" for m, v in need.items() if m != worst)
        + f"); at most {100 * MAX_FALSE:g}% of the originals have a distinct photo within "
        f"{allowed:.3f}"
    )
    if need[worst] <= allowed:
        t = float(np.ceil(need[worst] / ROUND_TO - 1e-9) * ROUND_TO)
        if t > allowed:  # rounding up would break the bound
            return round(need[worst], 4), f"{head}: the need"
        return round(t, 4), f"{head}: the need, rounded up"
    t = float(np.floor(allowed / ROUND_TO + 1e-9) * ROUND_TO)
    return round(t, 4), f"{head}: the mild copies cannot all be kept; the bound, rounded down"


def public(space: dict[str, Any]) -> dict[str, Any]:
    """The space's figures without the arrays."""
    out = {k: v for k, v in space.items() if not k.startswith("_")}
    out["copies"] = {
        name: {k: v for k, v in c.items() if not k.startswith("_")}
        for name, c in space["copies"].items()
    }
    return out


# -- report ----------------------------------------------------------------------------------------


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def distance_table(data: dict[str, Any]) -> str:
    s, r = data["spaces"]["search"], data["spaces"]["raw"]
    ts, tr = data["at_threshold"]["search"], data["at_threshold"]["raw"]
    rows: list[list[Any]] = []
    for name, what, mild in TRANSFORMS:
        cs, cr = s["copies"][name], r["copies"][name]
        rows.append(
            [
                f"copy: {what}" + ("" if mild else " (not mild)"),
                cs["median"],
                cs["p95"],
                cs["max"],
                pct(ts["recall"][name]),
                cr["median"],
                cr["p95"],
                cr["max"],
                pct(tr["recall"][name]),
            ]
        )
    for key, share, what in (
        ("nearest_other", "false_originals", "nearest distinct original"),
        (
            "nearest_other_same_class",
            "false_originals_same_class",
            "nearest distinct original, same class",
        ),
    ):
        rows.append(
            [
                f"{what}: p1 / p5 / median (min)",
                s[key]["p1"],
                s[key]["p5"],
                f"{s[key]['p50']} ({s[key]['min']})",
                f"{pct(ts[share])} within",
                r[key]["p1"],
                r[key]["p5"],
                f"{r[key]['p50']} ({r[key]['min']})",
                f"{pct(tr[share])} within",
            ]
        )
    sd, rd = np.array(s["sample_duplicates"]), np.array(r["sample_duplicates"])
    if sd.size:
        rows.append(
            [
                f"same photo twice in the sample ({sd.size} pairs): min / median / max",
                r4(sd.min()),
                r4(np.median(sd)),
                r4(sd.max()),
                f"{ts['sample_duplicates_found']} of {sd.size}",
                r4(rd.min()),
                r4(np.median(rd)),
                r4(rd.max()),
                f"{tr['sample_duplicates_found']} of {rd.size}",
            ]
        )
    return md_table(
        [
            "distance",
            "search: median",
            "search: p95",
            "search: max",
            f"search: at {ts['threshold']:g}",
            "raw: median",
            "raw: p95",
            "raw: max",
            f"raw: at {tr['threshold']:g}",
        ],
        rows,
    )


def rank_table(data: dict[str, Any]) -> str:
    """Per transformation: the share of copies that meet their original within the graph's
    first r neighbours, in each space."""
    rows = []
    for name, what, mild in TRANSFORMS:
        row: list[Any] = [f"{what}" + ("" if mild else " (not mild)")]
        for space in ("search", "raw"):
            ranks = data["spaces"][space]["copies"][name].get("graph_rank", {})
            row += [pct(ranks[f"<={r}"]) if f"<={r}" in ranks else "-" for r in GRAPH_RANKS]
        rows.append(row)
    return md_table(
        ["copy"] + [f"{sp}: rank <= {r}" for sp in ("search", "raw") for r in GRAPH_RANKS],
        rows,
    )


def tradeoff_table(data: dict[str, Any]) -> str:
    names = [name for name, _, _ in TRANSFORMS]
    rows = []
    for space in ("search", "raw"):
        for row in data["tradeoff"][space]:
            rows.append(
                [
                    space,
                    pct(row["max_false_originals"]),
                    row["threshold"],
                    row["false_pairs"],
                    *[pct(row["recall"][n]) for n in names],
                ]
            )
    return md_table(["space", "false originals <=", "threshold", "false pairs", *names], rows)


def verdict(data: dict[str, Any]) -> str:
    """Which mild transformations the threshold loses, in each space, and which space
    separates copies from distinct photos better at the same false-pair bound."""
    ts, tr = data["at_threshold"]["search"], data["at_threshold"]["raw"]
    mild = [name for name, _, is_mild in TRANSFORMS if is_mild]
    lost = [f"{n} ({pct(ts['recall'][n])})" for n in mild if ts["recall"][n] < KEEP_COPIES]
    raw_lost = [f"{n} ({pct(tr['recall'][n])})" for n in mild if tr["recall"][n] < KEEP_COPIES]
    s, r = data["spaces"]["search"], data["spaces"]["raw"]
    ratio = {
        sp: {
            n: v["copies"][n]["p95"] / v["nearest_other"]["p1"]
            for n in ("jpeg_q40", "flip", "crop_90")
        }
        for sp, v in (("search", s), ("raw", r))
    }
    return " ".join(
        [
            "Search space: the threshold keeps fewer than "
            f"{100 * KEEP_COPIES:g}% of the copies of " + ", ".join(lost) + "."
            if lost
            else f"Search space: {100 * KEEP_COPIES:g}%+ of every mild transformation's copies.",
            f"Raw space, at its own threshold for the same bound ({tr['threshold']:g}): "
            + (
                f"fewer than {100 * KEEP_COPIES:g}% of the copies of " + ", ".join(raw_lost)
                if raw_lost
                else f"{100 * KEEP_COPIES:g}%+ of every mild transformation's copies"
            )
            + ".",
            "95th percentile of the copy distance over the 1st percentile of the nearest "
            "distinct photo (below 1 separates): "
            + "; ".join(
                f"{n} {ratio['search'][n]:.2f} in the search space vs {ratio['raw'][n]:.2f} raw"
                for n in ratio["search"]
            )
            + ".",
        ]
    )


def section(data: dict[str, Any]) -> str:
    from imgsim.ann.graph import DUPLICATE_RANK

    proj = data["projection"]
    n = data["references"]
    ts, tr = data["at_threshold"]["search"], data["at_threshold"]["raw"]
    return "\n".join(
        [
            "## Near-duplicate distance (`bench_duplicates.py`)",
            "",
            f"{data['originals']} photos of the shared sample (seed {data['seed']}) copied with "
            f"PIL and embedded ({BACKBONE}, runtime {data['runtime']}); all {n:,} photos are "
            f"the references the search space is learned from ({proj['kind']} {proj['dim']} -> "
            f"{proj['dims']} dims: {proj['reason']}). Euclidean distances between unit vectors "
            "in the search space (what the neighbour graph compares) and in the raw "
            "L2-normalised embedding space. Copy rows: the copy to its original, and the share "
            "of copies at or under the threshold; distinct rows: each original to its nearest "
            "other photo (1st and 5th percentile, median, min), and the share of originals "
            "with one at or under the threshold. The sample holds "
            f"{len(data['sample_duplicates'])} pairs that are one photo (mirrored, re-cropped "
            "or re-coloured, found by eye): "
            "they are not counted as distinct photos, and have their own row. The sample's "
            "photos are 224x224 crops, so the 50% resize and the crops are upscaled again "
            "before embedding (a blur a full-size photo would not suffer).",
            "",
            distance_table(data),
            "",
            f"**Default `IMGSIM_DUPLICATE_DISTANCE` = {tr['threshold']:g}, between the "
            "embeddings** (the fit job rescores each image's "
            f"{DUPLICATE_RANK} nearest in the graph there, wherever the search space is a "
            f"projection; see the ranks below). Rule: {data['raw_threshold_rule']}. At "
            f"{tr['threshold']:g}: {pct(tr['false_originals'])} of the originals have a "
            f"distinct photo within it ({tr['false_pairs']} false pairs of "
            f"{n * (n - 1) // 2:,}, a pair rate of {tr['false_pair_rate']:.1e}); copies also "
            "within it of a distinct photo: "
            + ", ".join(f"{k} {pct(v)}" for k, v in tr["copies_near_a_distinct_photo"].items())
            + ". The same rule in the search space gives "
            f"{ts['threshold']:g} ({pct(ts['false_originals'])} of the originals, "
            f"{ts['false_pairs']} false pairs; the default until this release). "
            f"{data['verdict']}",
            "",
            "Where the graph meets copies: the share of copies whose original is among the "
            "copy's r nearest references or the copy among the original's (the better rank of "
            "the two; a graph of k neighbours holds the pairs within rank k).",
            "",
            rank_table(data),
            "",
            "Trade-off: the largest threshold at which at most the given share of the originals "
            "has a distinct photo within it, and the recall of copies there.",
            "",
            tradeoff_table(data),
        ]
    )


def main() -> None:
    from imgsim.ann.projection import l2_normalize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="which photos are copied (default 0)")
    ap.add_argument(
        "--originals", type=int, default=300, help="photos copied (default 300 of the 1,960)"
    )
    ap.add_argument(
        "--set",
        choices=("sample", "train"),
        default="sample",
        help="sample: the distance threshold on the 1,960-photo sample; train: the copy "
        "verifier against the distance rule on the 8,144 training photos "
        "(benchmarks/duplicates_train.py)",
    )
    args = ap.parse_args()
    if args.set == "train":
        from duplicates_train import run

        run(args.originals, args.seed)
        return
    sample = require_sample()
    started = time.perf_counter()
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = [r["image"] for r in rows]
    files = [sample / "images" / name for name in names]
    y = np.array([int(r["Class"]) for r in rows], np.int64)
    n = len(files)
    if not 0 < args.originals <= n:
        sys.exit(f"--originals must be 1..{n}")
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(n, size=args.originals, replace=False))
    row_of = {name: i for i, name in enumerate(names)}
    same_photo = np.eye(n, dtype=bool)
    for a, b in SAMPLE_DUPLICATES:
        if a in row_of and b in row_of:
            same_photo[row_of[a], row_of[b]] = same_photo[row_of[b], row_of[a]] = True

    backbone, runtime = load_default_backbone()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"embedding {n} references ({BACKBONE}, runtime {runtime}) ...", flush=True)
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
        "search": measure_space(proj.apply, x, y, same_photo, chosen, copies),
        "raw": measure_space(l2_normalize, x, y, same_photo, chosen, copies),
    }
    chosen_t = {sp: choose_threshold(v) for sp, v in spaces.items()}
    dups = np.argwhere(np.triu(same_photo, 1))
    data: dict[str, Any] = {
        "backbone": BACKBONE,
        "runtime": runtime,
        "seed": args.seed,
        "originals": int(args.originals),
        "references": n,
        "sample": str(sample),
        "transforms": [{"name": a, "what": b, "mild": c} for a, b, c in TRANSFORMS],
        "projection": {
            "kind": proj.kind,
            "dim": proj.dim,
            "dims": proj.dims,
            "params": proj.params,
            "reason": choice.reason,
        },
        "rule": {"keep_copies": KEEP_COPIES, "max_false_originals": MAX_FALSE},
        "threshold": chosen_t["search"][0],
        "threshold_rule": chosen_t["search"][1],
        "raw_threshold": chosen_t["raw"][0],
        "raw_threshold_rule": chosen_t["raw"][1],
        "at_threshold": {sp: at_threshold(v, chosen_t[sp][0], n) for sp, v in spaces.items()},
        "tradeoff": {
            sp: [
                {"max_false_originals": b, **at_threshold(v, largest_within(v, b), n, brief=True)}
                for b in FALSE_BOUNDS
            ]
            for sp, v in spaces.items()
        },
        "sample_duplicates": [
            {
                "a": names[i],
                "b": names[j],
                "classes": [rows[i]["class_name"], rows[j]["class_name"]],
                "search": spaces["search"]["sample_duplicates"][k],
                "raw": spaces["raw"]["sample_duplicates"][k],
            }
            for k, (i, j) in enumerate(dups)
        ],
        "spaces": {sp: public(v) for sp, v in spaces.items()},
        "seconds": seconds,
    }
    data["verdict"] = verdict(data)
    seconds["total"] = round(time.perf_counter() - started, 1)
    md = section(data)
    out = write_result("duplicates", data, md)
    print(md)
    print(f"wrote {out} in {seconds['total']} s")


if __name__ == "__main__":
    main()
