"""Real and synthetic vectors for the LSH benchmarks, cached under test-output/bench/.

Real: efficientnet_lite0 embeddings of the shared Stanford Cars sample (1,960 photos, 196
classes), plus near-duplicate queries: a reference photo cropped by 10%, flipped
horizontally, resized x0.5 and re-encoded as JPEG (quality 70), then embedded. Computed once
(a few minutes on 2 cores) and reused by bench_lsh.py and bench_latency.py.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import WORK_DIR, require_sample

BACKBONE = "efficientnet_lite0"
NEAR_DUP_QUERIES = 200
CACHE = WORK_DIR / f"lsh_real_{BACKBONE}.npz"


@dataclass(frozen=True)
class RealSet:
    files: list[str]  # reference file names, in row order
    labels: np.ndarray  # (n,) class id per reference
    vectors: np.ndarray  # (n, 1280) float32, raw (not normalised)
    dup_source: np.ndarray  # (m,) reference row each near-duplicate query was made from
    dup_vectors: np.ndarray  # (m, 1280) float32, raw


def near_duplicate(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """Crop 10% (random offset), flip horizontally, resize x0.5, JPEG quality 70."""
    from PIL import Image, ImageOps

    with Image.open(src) as im:
        img = ImageOps.exif_transpose(im).convert("RGB")
    w, h = img.size
    cw, ch = round(w * 0.9), round(h * 0.9)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((max(1, cw // 2), max(1, ch // 2)), Image.Resampling.BICUBIC)
    img.save(dst, "JPEG", quality=70)


def _embed(paths: list[Path]) -> np.ndarray:
    from imgsim.embedding.backbones import load_backbone
    from imgsim.embedding.infer import embed_paths

    backbone = load_backbone(BACKBONE, device="cpu")
    vectors, bad = embed_paths(paths, backbone, batch_size=32)
    if bad:
        raise RuntimeError(f"{len(bad)} sample photos could not be embedded: {bad[:3]}")
    return vectors


def load_real(seed: int = 0) -> RealSet:
    """The cached real set, computing it first if absent."""
    if CACHE.exists():
        z = np.load(CACHE, allow_pickle=False)
        return RealSet(
            [str(f) for f in z["files"]],
            z["labels"],
            z["vectors"],
            z["dup_source"],
            z["dup_vectors"],
        )
    sample = require_sample()
    with open(sample / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    files = [r["image"] for r in rows]
    labels = np.array([int(r["Class"]) for r in rows], np.int64)
    print(
        f"embedding {len(files)} sample photos with {BACKBONE} (cached in {CACHE}) ...", flush=True
    )
    vectors = _embed([sample / "images" / f for f in files])
    rng = np.random.default_rng(seed)
    source = np.sort(rng.choice(len(files), size=min(NEAR_DUP_QUERIES, len(files)), replace=False))
    dup_dir = WORK_DIR / "near_duplicates"
    dup_dir.mkdir(parents=True, exist_ok=True)
    dup_paths = []
    for i in source:
        dst = dup_dir / f"dup-{files[i]}"
        near_duplicate(sample / "images" / files[i], dst, rng)
        dup_paths.append(dst)
    print(f"embedding {len(dup_paths)} near-duplicate queries ...", flush=True)
    dup_vectors = _embed(dup_paths)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        files=np.array(files),
        labels=labels,
        vectors=vectors,
        dup_source=source,
        dup_vectors=dup_vectors,
    )
    tmp.replace(CACHE)
    return RealSet(files, labels, vectors, source, dup_vectors)


def synthetic(n: int, dim: int, seed: int, clusters: int = 0, spread: float = 0.35) -> np.ndarray:
    """n unit vectors: Gaussian, or around ``clusters`` random centres (noise of norm about
    ``spread`` before normalising)."""
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.normal(size=(clusters, dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, clusters, n)]
        x = x + rng.normal(scale=spread / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    else:
        x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


if __name__ == "__main__":
    s = load_real()
    print(s.vectors.shape, s.dup_vectors.shape)
