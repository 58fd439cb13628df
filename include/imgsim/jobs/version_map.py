"""The version's 2-D map of its references, on the fit job's driver (a stage of the fit job).

A sample of the references chosen by image id (at most ``--map-points``,
:func:`imgsim.ann.layout.sample_cut`) is collected with its search-space vectors and laid out
by t-SNE (:func:`imgsim.ann.layout.lay_out`), or, where the base version's map is of the same
search space (:func:`imgsim.jobs.bases.previous_map`), the base's coordinates are kept and
only the new references are placed among them (:func:`imgsim.ann.layout.place`) until the
placed points reach :data:`imgsim.ann.layout.RELAYOUT_SHARE` of the map. Written into the
version as ``map.parquet`` (image_id, x, y, placed: t-SNE units, sorted by image id); its
sha256 is recorded at publish like every file's, and the UI draws it without recomputing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from imgsim.ann.layout import (
    MAP_FILE,
    MIN_TSNE_POINTS,
    PLACE_NEIGHBOURS,
    RELAYOUT_SHARE,
    lay_out,
    place,
    read_map,
    same_class_neighbours,
    sample_cut,
    write_map,
)

log = logging.getLogger("imgsim.version_map")

#: at most this many points are compared by class in the search space (a brute-force scan)
AGREEMENT_POINTS = 4000
METHOD = (
    "t-SNE (openTSNE, PCA initialisation, seeded) of the search-space vectors of a sample "
    "chosen by image id; new references are placed into the previous layout (each at "
    f"the median of its {PLACE_NEIGHBOURS} nearest, the others kept) until they are "
    f"{RELAYOUT_SHARE:.0%} of it"
)


def map_sample(reference: DataFrame, n: int, max_points: int) -> pd.DataFrame:
    """image_id, class_id, vector of the references on the map (the first 8 hex digits of
    the id at or under :func:`imgsim.ann.layout.sample_cut`), sorted by image id."""
    cut = sample_cut(n, max_points)
    prefix = F.conv(F.substring("image_id", 1, 8), 16, 10).cast("long")
    keep = F.when(F.col("image_id").rlike("^[0-9a-fA-F]{8}"), prefix <= F.lit(cut)).otherwise(True)
    rows = cast(
        pd.DataFrame,
        reference.filter(keep).select("image_id", "class_id", "vector").toPandas(),
    )
    return rows.sort_values("image_id", ignore_index=True)


def _vectors(rows: pd.DataFrame) -> np.ndarray:
    if rows.empty:
        return np.zeros((0, 0), np.float64)
    return np.stack(rows["vector"].map(lambda v: np.asarray(v, np.float64)).to_list())


def _labels(rows: pd.DataFrame) -> list[int | None]:
    return [None if pd.isna(c) else int(c) for c in rows["class_id"]]


def build_map(
    reference: DataFrame,
    n: int,
    out_dir: Path,
    *,
    version: str,
    max_points: int,
    seed: int,
    previous: dict[str, Any] | str,
) -> dict[str, Any] | None:
    """Lay out (or update) the map and write it into ``out_dir``; its manifest entry (None
    with ``max_points`` 0 or fewer than 3 references). ``previous``: the base's map where
    new references can be placed into it (:func:`imgsim.jobs.bases.previous_map`), else why
    not."""
    if max_points <= 0:
        return None
    t0 = time.perf_counter()
    rows = map_sample(reference, n, max_points)
    if len(rows) < 3:
        log.info("no map: %d reference(s) on it, 3 are needed", len(rows))
        return None
    ids: list[str] = rows["image_id"].tolist()
    x = _vectors(rows)
    mode: dict[str, Any] = {"mode": "full", "mode_reason": previous}
    laid_out_in = version
    xy: np.ndarray | None = None
    placed = np.zeros(len(ids), bool)
    extra: dict[str, Any] = {}
    if isinstance(previous, dict):
        stored = read_map(previous["file"])  # sha256 checked by previous_map
        old = pd.DataFrame(
            {
                "x": stored["xy"][:, 0],
                "y": stored["xy"][:, 1],
                "placed": stored["placed"],
            },
            index=pd.Index(stored["image_id"], name="image_id"),
        )
        kept = old.index.intersection(pd.Index(ids))
        at = {iid: i for i, iid in enumerate(ids)}
        new = [iid for iid in ids if iid not in old.index]
        placed_share = (int(old.loc[kept, "placed"].sum()) + len(new)) / len(ids)
        since = previous["version"]
        counts = f"{len(new)} new and {len(old) - len(kept)} gone since {since}"
        if len(kept) < MIN_TSNE_POINTS:
            mode["mode_reason"] = f"{counts}: {len(kept)} kept points are too few to place among"
        elif placed_share > RELAYOUT_SHARE:
            mode["mode_reason"] = (
                f"{counts}: {placed_share:.0%} of the map would be placed rather than laid out "
                f"(more than {RELAYOUT_SHARE:.0%}), so it is laid out anew"
            )
        else:
            laid_out_in = previous["entry"].get("laid_out_in") or since
            extra = {
                k: previous["entry"][k]
                for k in ("perplexity", "kl_divergence", "layout")
                if k in previous["entry"]
            }
            xy = np.zeros((len(ids), 2), np.float64)
            keep_rows = np.array([at[iid] for iid in kept], np.int64)
            xy[keep_rows] = old.loc[kept, ["x", "y"]].to_numpy(np.float64)
            placed[keep_rows] = old.loc[kept, "placed"].to_numpy(bool)
            if new:
                new_rows = np.array([at[iid] for iid in new], np.int64)
                xy[new_rows] = place(x[keep_rows], xy[keep_rows], x[new_rows], seed=seed)
                placed[new_rows] = True
            mode = {
                "mode": "incremental" if new else "kept",
                "mode_reason": f"{counts}: "
                + (
                    f"the new ones placed into {since}'s layout, the others kept where they were"
                    if new
                    else f"{since}'s layout kept as it was"
                ),
                "previous": since,
            }
    if xy is None:
        laid = lay_out(x, seed=seed)
        xy, laid_out_in = laid.xy, version
        extra = {"layout": laid.method, **laid.info}
    write_map(out_dir / MAP_FILE, ids, xy, placed)
    labels = _labels(rows)
    head = slice(0, AGREEMENT_POINTS)  # the ids are uniform: the first ones are a sample too
    entry = {
        "method": METHOD,
        "file": MAP_FILE,
        "points": len(ids),
        "references": n,
        "max_points": max_points,
        "seed": seed,
        **extra,
        **mode,
        "laid_out_in": laid_out_in,
        "placed": int(placed.sum()),
        "same_class_nearest_on_map": same_class_neighbours(xy[head], labels[head]),
        "same_class_nearest_in_space": same_class_neighbours(x[head], labels[head]),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info("map: %s", entry)
    return entry
