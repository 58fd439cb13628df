"""Shared helpers for the benchmark scripts: machine facts, timing, result files.

Every benchmark script writes ``results/<name>.json`` (numbers + machine + command) and
``results/<name>.md`` (its section of the report, rendered from that JSON). ``report.py``
assembles ``benchmarks/README.md`` from the sections. Figures are compared as ratios
measured side by side in one run; never use them as thresholds in tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
PLOTS_DIR = BENCH_DIR / "plots"
WORK_DIR = PROJECT_ROOT / "test-output" / "bench"  # scratch (ignored by git)
SAMPLE_DIR = Path(
    os.environ.get(
        "IMGSIM_SAMPLE_DIR", PROJECT_ROOT.parent / "shared" / "data" / "stanford_cars_sample"
    )
)


def require_sample() -> Path:
    """The shared real Stanford Cars sample, or exit with the reason."""
    if not (SAMPLE_DIR / "labels.csv").exists():
        sys.exit(
            f"benchmark needs the shared Stanford Cars sample at {SAMPLE_DIR} "
            "(set IMGSIM_SAMPLE_DIR)"
        )
    return SAMPLE_DIR


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def machine_info() -> dict[str, Any]:
    """What the figures were measured on (kept next to every result)."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for mod in ("numpy", "torch", "torchvision", "pyspark", "onnxruntime", "faiss"):
        with contextlib.suppress(Exception):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return info


def median_time(fn: Callable[[], Any], *, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_result(name: str, data: dict[str, Any], section_md: str) -> Path:
    """Write results/<name>.json (with machine facts and the command) and results/<name>.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine_info(),
        **data,
    }
    out = RESULTS_DIR / f"{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out)
    md = RESULTS_DIR / f"{name}.md"
    tmp_md = md.with_suffix(".md.tmp")
    tmp_md.write_text(section_md.rstrip() + "\n")
    os.replace(tmp_md, md)
    return out


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats get 3 significant decimals."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def catalog_row(image_id: str, path: str, class_id: int, source: str) -> dict[str, Any]:
    """A live catalog row for a benchmark store (imgsim.store.write_catalog's columns)."""
    return {
        "image_id": image_id,
        "path": path,
        "source": source,
        "file_name": Path(path).name,
        "class_id": int(class_id),
        "class_name": f"class {int(class_id)}",
        "size": 1,
        "mtime_ns": 1,
        "first_seen": "2026-01-01",
        "last_seen": "2026-01-01",
        "status": "live",
        "n_paths": 1,
    }


def save_plot(fig: Any, name: str) -> str:
    """Save a matplotlib figure as plots/<name> (closed afterwards); its path from benchmarks/."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    path = PLOTS_DIR / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path.relative_to(PLOTS_DIR.parent))
