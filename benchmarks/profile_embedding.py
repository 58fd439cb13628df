"""Where one embed task's CPU time goes: decode, preprocess, thumbnail, forward, the whole task.

    .venv/bin/python benchmarks/profile_embedding.py [N]   (default 128 photos)

ResNet-18 (random weights: the ImageNet file is not available offline) on the default CPU
runtime (ONNX Runtime fp32), on N of bench_embedding.py's full-size JPEGs. Each step is timed
alone (wall and process CPU time per photo); ``embed_shard`` is the index DAG's embed task
(decode threads overlapping batched inference, thumbnails, Parquet), timed after one warm-up
run. On 2 cores the task cannot beat (CPU per photo) / 2 of wall time.
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embedding import WORK_DIR, full_size_images, pipeline_root, run_pipeline
from common import require_sample

BACKBONE = "random"  # ResNet-18's architecture


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(f: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    f()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> int:
    import torch

    from imgsim.embedding.backbones import load_backbone
    from imgsim.embedding.infer import EmbedItem, _prepare
    from imgsim.imaging import load_rgb

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    paths = full_size_images(require_sample(), 300)[:n]
    cache = WORK_DIR / "model-cache"
    settings, spec = pipeline_root(paths, BACKBONE, "onnx", cache)
    bb = load_backbone(BACKBONE, device="cpu", runtime="onnx", cache_dir=cache)
    thumbs = WORK_DIR / "profile-thumbs"

    def prepare(thumb: bool) -> list:
        shutil.rmtree(thumbs, ignore_errors=True)
        thumbs.mkdir(parents=True)
        return [
            _prepare(EmbedItem(str(p), p, thumbs / f"{i}.jpg" if thumb else None), bb, 10**9)
            for i, p in enumerate(paths)
        ]

    x = torch.stack(prepare(False))

    def forward() -> None:
        for s in range(0, len(x), 32):
            bb.embed_batch(x[s : s + 32])

    forward()  # warm-up
    run_pipeline(settings, spec, BACKBONE)  # warm-up
    steps = {
        "decode": lambda: [load_rgb(p) for p in paths],
        "decode + preprocess": lambda: prepare(False),
        "decode + preprocess + thumbnail": lambda: prepare(True),
        "forward, batches of 32": forward,
        "embed_shard (the embed task)": lambda: run_pipeline(settings, spec, BACKBONE),
    }
    print(f"{n} photos, {torch.get_num_threads()} threads")
    for name, f in steps.items():
        wall, cpu = timed(f)
        print(
            f"{name:34s} wall {1000 * wall / n:6.2f} ms/photo  cpu {1000 * cpu / n:6.2f} "
            f"ms/photo  ({n / wall:6.1f} photos/s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
