"""Neighbour-graph cost: how the fit job's graph stage grows with the number of references.

    .venv/bin/python benchmarks/bench_graph.py [--sizes 16000,100000,1000000]
        [--space lda|none] [--driver-memory 8g] [--timeout-s 0]

Each size n is a store of n efficientnet_lite0 vectors: the 1,960 real embeddings of the
shared Stanford Cars sample (cached by lsh_data.py) plus n - 1,960 synthetic ones of the same
shape and spread (:class:`Generator`: a real vector pulled towards the mean plus Gaussian
noise of the real vectors' covariance, so the covariance stays the real one; label: the
source's class), stored in the search space: by default the LDA the index DAG learns from the
labelled real sample (195-d, L2-normalised, as the fit job's projection step leaves them),
with ``--space none`` the raw 1280-d embeddings. Ids are sha256 hex strings. The stores are
kept under test-output/bench/graph-stores/ and reused.

For every size the fit job (``spark_jobs/fit_lsh.py``) runs under ``spark-submit --master
local[*]`` with the same explicit query LSH (:data:`LSH`), ``--scan-below 0`` (the graph's
cells at every size), the graph's defaults (k=10, cap 1,000; its own k-means cells trained by
the job per size) and the space's duplicate distance (bench_duplicates.py). The numbers come
from the version's manifest (``neighbours``, ``metrics``, ``duplicates``). Peak memory: the
largest sum of the RSS of the job's process tree (the driver JVM, which runs the executor in
local mode, the Python driver and the Python workers), sampled every 0.5 s with psutil (forked
Python workers share pages, so the sum is an upper bound). Results of earlier invocations with
the same settings are kept, so the largest size can run on its own (``--sizes 1000000``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PLOTS_DIR,
    PROJECT_ROOT,
    RESULTS_DIR,
    WORK_DIR,
    catalog_row,
    md_table,
    save_plot,
    write_result,
)
from lsh_data import BACKBONE, load_real

from imgsim.ann import l2_normalize
from imgsim.ann.tuning import data_scale

NAME = "graph"
DEFAULT_SIZES = (16_000, 100_000, 1_000_000)
RAW_DIM = 1280
#: share of a synthetic vector's deviation from the mean that is fresh noise (the rest is its
#: real source's deviation, scaled by sqrt(1 - MIX**2)): the covariance stays the real one
MIX = 0.6
SEED = 7
#: the version's query LSH of every size (the graph tunes its own): 8 bands of 2 keys;
#: bucketLength = BUCKET_FACTOR x the real sample's median pair distance / sqrt(dim) (the fit
#: job's own rule for --bucket-length 0, computed once on the real vectors)
LSH = {"bands": 8, "keys_per_band": 2}
#: the graph's probes assumed by the disk estimate (the job's tuning decides: 1-4 measured)
GRAPH_PROBES = 4
BUCKET_FACTOR = 0.5
GRAPH_K = 10
BUCKET_CAP = 1000
#: bench_duplicates.py's distances per search space
DUPLICATE_DISTANCE = {"lda": 0.51, "none": 0.41}
VALIDATION_SAMPLE = 200
ROWS_PER_SHARD = 50_000
STORES = WORK_DIR / "graph-stores"
LOGS = WORK_DIR / "graph-logs"
#: the jobs' shuffle and spill files (removed after each run)
SPARK_LOCAL = WORK_DIR / "graph-spark-local"


# -- data ------------------------------------------------------------------------------------------


def image_id(i: int) -> str:
    return hashlib.sha256(f"imgsim-bench-graph-{i}".encode()).hexdigest()


class Generator:
    """Synthetic vectors of the real set's shape and spread: x = mean + sqrt(1 - MIX^2) *
    (real_i - mean) + MIX * g, g ~ N(0, covariance of the real unit vectors), then L2
    normalised (as the fit job does)."""

    def __init__(self, real: np.ndarray, projection: Any = None) -> None:
        self.real = l2_normalize(real.astype(np.float32))
        self.mean = self.real.mean(0)
        centred = self.real - self.mean
        _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
        self.centred = centred
        self.basis = ((s / math.sqrt(len(centred) - 1))[:, None] * vt).astype(np.float32)
        #: the search space the store holds: the embeddings, or their projection (LDA)
        self.projection = projection
        self.dim = int(projection.dims) if projection is not None else RAW_DIM
        self.real_space = self.to_space(self.real)

    def to_space(self, x: np.ndarray) -> np.ndarray:
        if self.projection is None:
            return x
        return np.asarray(self.projection.apply(x), np.float32)

    def draw(self, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(count, dim) unit vectors of the search space, and the real row each was drawn
        around."""
        src = rng.integers(0, len(self.real), count)
        z = rng.standard_normal((count, self.basis.shape[0]), dtype=np.float32)
        x = self.mean + math.sqrt(1 - MIX * MIX) * self.centred[src] + MIX * (z @ self.basis)
        return self.to_space(l2_normalize(x.astype(np.float32))), src


def lda_projection(real: np.ndarray, labels: np.ndarray) -> Any:
    """The LDA the index DAG would learn from the real sample (imgsim.ann.projection.choose)."""
    from imgsim.ann.projection import choose, stats_from_arrays

    unit = l2_normalize(real)
    return choose(
        stats_from_arrays(unit, labels), "lda", cv_vectors=unit, cv_labels=labels
    ).projection


def spread(x: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Median pair distance, the per-projection scale, mean vector norm of the centred rows."""
    from imgsim.ann.tuning import median_pair_distance

    return {
        "median_pair_distance": round(median_pair_distance(x, seed, 20_000), 4),
        "scale": round(data_scale(x, seed), 5),
        "centred_norm": round(float(np.linalg.norm(x - x.mean(0), axis=1).mean()), 4),
    }


def build_store(n: int, root: Path, gen: Generator, labels: np.ndarray) -> dict[str, Any]:
    """The store of ``n`` vectors under ``root`` (reused when its record matches)."""
    from imgsim.config import Layout
    from imgsim.fsutil import atomic_write_json
    from imgsim.store import write_catalog, write_shard

    record = {
        "n": n,
        "real": len(gen.real),
        "mix": MIX,
        "seed": SEED,
        "backbone": BACKBONE,
        "space": "none" if gen.projection is None else gen.projection.kind,
        "dim": gen.dim,
    }
    marker = root / "bench-store.json"
    if marker.exists() and json.loads(marker.read_text()).get("store") == record:
        return json.loads(marker.read_text())
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    layout = Layout(root)
    rng = np.random.default_rng(SEED)
    real_n = min(n, len(gen.real))
    classes = np.empty(n, np.int64)
    classes[:real_n] = labels[:real_n]
    shard, start = 0, 0
    sample: list[np.ndarray] = []
    while start < n:
        stop = min(n, start + ROWS_PER_SHARD)
        x = np.empty((stop - start, gen.dim), np.float32)
        lo = max(0, min(real_n, stop) - start)  # real rows in this shard
        if lo:
            x[:lo] = gen.real_space[start : start + lo]
        if stop - start > lo:
            x[lo:], src = gen.draw(stop - start - lo, rng)
            classes[start + lo : stop] = labels[src]
        if len(sample) < 2:
            sample.append(x[:5000])
        ids = [image_id(i) for i in range(start, stop)]
        write_shard(layout, BACKBONE, "bench", shard, list(zip(ids, x, strict=True)), gen.dim)
        shard, start = shard + 1, stop
    write_catalog(
        layout,
        (catalog_row(image_id(i), f"images/bench/{i}.jpg", classes[i], "bench") for i in range(n)),
    )
    atomic_write_json(layout.backbone_record(BACKBONE), {"name": BACKBONE, "dim": gen.dim})
    mixed = np.concatenate(sample)
    info = {
        "store": record,
        "shards": shard,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "spread_first_rows": spread(mixed),
    }
    atomic_write_json(marker, info)
    return info


# -- the fit job under spark-submit, with its memory sampled -------------------------------------


class TreeSampler(threading.Thread):
    """Peak RSS of a process tree (sum, and by kind: JVM, Python driver, Python workers)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"tree": 0, "jvm": 0, "python_driver": 0, "python_workers": 0}
        self.samples = 0
        self.stop_event = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        now = {"tree": 0, "jvm": 0, "python_driver": 0, "python_workers": 0}
        daemon_pids: set[int] = set()
        for p in procs:
            try:
                rss = p.memory_info().rss
                cmd = " ".join(p.cmdline())
                ppid = p.ppid()
            except psutil.Error:
                continue
            now["tree"] += rss
            if "java" in p.name():
                now["jvm"] += rss
            elif "pyspark.daemon" in cmd or "pyspark.worker" in cmd or ppid in daemon_pids:
                now["python_workers"] += rss
                daemon_pids.add(p.pid)
            elif "python" in p.name() or "python" in cmd.split(" ")[0]:
                now["python_driver"] += rss
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def job_env() -> dict[str, str]:
    from imgsim.envsetup import embedded_environment

    env = dict(os.environ)
    for key in ("SPARK_LOCAL_IP", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
        env.setdefault(key, embedded_environment()[key])
    include = str(PROJECT_ROOT / "include")
    if include not in env.get("PYTHONPATH", "").split(os.pathsep):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (include, env.get("PYTHONPATH")) if p)
    return env


def fit_command(
    root: Path, version: str, bucket_length: float, driver_memory: str, duplicate_distance: float
) -> list[str]:
    return [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[*]",
        "--driver-memory",
        driver_memory,
        "--conf",
        "spark.ui.enabled=false",
        "--conf",
        "spark.ui.showConsoleProgress=false",
        "--conf",
        f"spark.local.dir={SPARK_LOCAL}",
        str(PROJECT_ROOT / "spark_jobs" / "fit_lsh.py"),
        "--data-root",
        str(root),
        "--backbone",
        BACKBONE,
        "--version",
        version,
        "--num-hash-tables",
        str(LSH["bands"]),
        "--keys-per-band",
        str(LSH["keys_per_band"]),
        "--bucket-length",
        repr(bucket_length),
        "--seed",
        "42",
        "--sample-size",
        str(VALIDATION_SAMPLE),
        "--graph-k",
        str(GRAPH_K),
        "--scan-below",
        "0",
        "--graph-bucket-cap",
        str(BUCKET_CAP),
        "--duplicate-distance",
        str(duplicate_distance),
        "--run-id",
        "bench-graph",
    ]


def code_state() -> dict[str, str]:
    """The commit and the uncommitted changes of the job's code (others edit this tree)."""

    def git(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    diff = git("diff", "HEAD", "--", "include", "spark_jobs")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:10] if diff else "",
    }


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def kill_tree(pid: int) -> None:
    """Stop the job this script started: its process and every descendant, by pid."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:  # SIGTERM first: the JVM's shutdown hook deletes its shuffle files
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)


def run_fit(
    n: int,
    root: Path,
    bucket_length: float,
    driver_memory: str,
    timeout_s: float,
    duplicate_distance: float,
) -> dict[str, Any]:
    version = f"vbench-graph-{n}"
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"fit-{n}.log"
    cmd = fit_command(root, version, bucket_length, driver_memory, duplicate_distance)
    code = code_state()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=job_env())
        sampler = TreeSampler(proc.pid)
        sampler.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout_s or None)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_tree(proc.pid)
            rc = proc.wait()
        except BaseException:  # SIGTERM (an outer `timeout`), Ctrl-C: stop the job too
            kill_tree(proc.pid)
            raise
        finally:
            sampler.stop_event.set()
            sampler.join()
            shutil.rmtree(SPARK_LOCAL, ignore_errors=True)
    wall = time.perf_counter() - t0
    gib = {k: round(v / 2**30, 2) for k, v in sampler.peak.items()}
    out: dict[str, Any] = {
        "n": n,
        "wall_seconds": round(wall, 1),
        "returncode": rc,
        "timed_out": timed_out,
        "peak_rss_gib": gib,
        "memory_samples": sampler.samples,
        "log": str(log_path.relative_to(PROJECT_ROOT)),
        "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "code": code,
    }
    if code_state() != code:
        out["code_changed_during_run"] = True
    manifest_path = root / "models" / "lsh" / ".staging" / version / "manifest.json"
    if rc != 0 or not manifest_path.exists():
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        out["status"] = "timed out" if timed_out else "failed"
        out["log_tail"] = [line for line in tail if line.strip()][-25:]
        return out
    out["spark_stage_seconds"] = stage_seconds(log_path)
    m = json.loads(manifest_path.read_text())
    g, met, dup = m["neighbours"], m["metrics"], m["duplicates"] or {}
    out.update(
        status="ok",
        lsh={k: m["lsh"][k] for k in ("bands", "keys_per_band", "bucketLength", "probes")},
        graph_method=str(g.get("method", "")).split(":")[0],
        graph_seconds=g["seconds"],
        fit_seconds=met["fit_seconds"],
        hash_and_write_seconds=met["hash_and_write_seconds"],
        evaluation_seconds=met["evaluation_seconds"],
        duplicates_seconds=dup.get("seconds"),
        graph_recall_at_10=g["recall_at_k"],
        graph_recall_queries=g["queries"],
        lsh_recall_at_5=met["recall_at_k"],
        lsh_candidates_share=met["candidates_share"],
        label_precision_at_5=met["label_precision_at_k"],
        neighbours=g,
        duplicates=dup,
    )
    out["other_seconds"] = round(
        wall
        - g["seconds"]
        - met["fit_seconds"]
        - met["hash_and_write_seconds"]
        - met["evaluation_seconds"]
        - (dup.get("seconds") or 0.0),
        1,
    )
    shutil.rmtree(manifest_path.parent, ignore_errors=True)  # the version itself is not needed
    return out


def stage_seconds(log_path: Path) -> dict[str, float]:
    """Spark stage time per call site of the job (summed over the stages a call ran), from the
    driver log's "Stage N (what at file:line) finished in X ms" lines."""
    import re

    pattern = re.compile(r"Stage \d+ \((.+) at (\S+?):(\d+)\) finished in (\d+) ms")
    out: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = pattern.search(line)
        if not m:
            continue
        what, where, lineno, ms = m.groups()
        key = (
            f"{Path(where).name}:{lineno} {what}"
            if where.endswith(".py")
            else "no Python call site (parquet writes, AQE sub-jobs)"
        )
        out[key] = out.get(key, 0.0) + int(ms) / 1000
    return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def disk_need(n: int, dim: int) -> int:
    """Bytes of local disk a size needs, roughly: its store, the cached and shuffled vector
    tables the job spills (4 x n x dim x 4 bytes) and the cell stage's shuffle twice (map
    output, then the sort's spills). A 1M run of 1280-d vectors in 8 LSH bands (the design
    before the cells) filled 66 GB."""
    vectors = n * dim * 4
    return 5 * vectors + 2 * shuffle_estimate(n, dim)["bytes"]


def shuffle_estimate(n: int, dim: int, probes: int = GRAPH_PROBES) -> dict[str, Any]:
    """The cell stage's exploded rows, by neighbour_graph.build_graph's own formula
    (n x probes x (dim x 4 + 64) bytes, 64 MiB per partition; probes: the graph's tuning
    decides)."""
    rows = n * probes
    total = rows * (dim * 4 + 64)
    return {
        "exploded_rows": rows,
        "bytes": total,
        "gib": round(total / 2**30, 2),
        "partitions": max(os.cpu_count() or 1, total // (64 << 20)),
    }


# -- results ---------------------------------------------------------------------------------------


def real_only(gen: Generator, seed: int = 0) -> dict[str, Any]:
    """The graph of the real photos alone (the search space's real vectors) in one process,
    as the job would build it (:func:`imgsim.ann.graph.local_graph`, the job's tuning and
    defaults): the synthetic stores are drawn around these, which suits k-means cells; this
    is the check on real structure."""
    from imgsim.ann.graph import exact_neighbours, local_graph, train_size, tune_graph_cells

    x = np.asarray(gen.real_space, np.float32)
    n = len(x)
    idx, _ = exact_neighbours(x, GRAPH_K)
    q = np.random.default_rng(seed).choice(n, min(n, VALIDATION_SAMPLE), replace=False)
    train = x[np.random.default_rng(seed).permutation(n)[: train_size(n, BUCKET_CAP)]]
    cells, tuning = tune_graph_cells(
        train,
        np.repeat(x[q], GRAPH_K, axis=0),
        x[idx[q].ravel()],
        n,
        target=0.95,
        cap=BUCKET_CAP,
        seed=seed,
    )
    ids = list(range(n))
    graph, work = local_graph(ids, x, cells, GRAPH_K, BUCKET_CAP)
    recall = np.mean([len({t for _, t in graph[i]} & set(idx[i].tolist())) / GRAPH_K for i in ids])
    return {
        "n": n,
        "cells": cells.cells,
        "probes": cells.probes,
        "predicted_recall": tuning["predicted_recall"],
        "recall_at_10_all_images": round(float(recall), 4),
        "pairs_share": round(work["pairs"] / (n * (n - 1) / 2), 4),
        "split": work["split"],
    }


def cluster_estimate(n: int, r: dict[str, Any], dim: int) -> str:
    """What the ``n`` run would need on docker-compose.yaml's Spark cluster (2 workers x 2
    cores, 4 GiB each by default), from this run's measured figures: an estimate, not a
    measurement (no Docker engine on the machine that measured)."""
    g = r["neighbours"]
    stages = r.get("spark_stage_seconds", {})
    cell = next((v for k, v in stages.items() if "neighbour_graph.py" in k), 0.0)
    tune = float((g.get("tuning") or {}).get("seconds") or 0.0)
    gib = g["shuffled_rows"] * (dim * 4 + 64) / 2**30
    workers_gib = r["peak_rss_gib"].get("python_workers", 0.0)
    rest = max(r["graph_seconds"] - tune, 0.0)
    return (
        f"On the compose cluster (two workers of 2 cores and 4 GiB each, `SPARK_WORKER_CORES`, "
        f"`SPARK_WORKER_MEMORY`), the n={n:,} graph would need about {gib:.1f} GiB of shuffle "
        f"files spread over the workers' local disks (written once, read once), Python "
        f"workers of about {workers_gib:.1f} GiB per 2 cores here (a cell of up to the cap "
        "in homes and its probes, plus the Arrow batches), and the driver the k-means "
        f"training set ({g.get('tuning', {}).get('train_vectors', '-')} vectors; "
        f"{tune:.0f} s here, on the driver whatever the cluster). The partition-parallel "
        f"rest ({rest:.0f} s here on 2 cores, the longest stage {cell} s) would take about "
        f"{rest / 2:.0f} s on the cluster's 4 cores if it scales with cores, so about "
        f"{tune + rest / 2:.0f} s for the graph: an estimate from this run, not a measurement "
        "(this machine has no Docker engine)."
    )


def slope(points: list[tuple[int, float]]) -> float | None:
    pts = [(n, v) for n, v in points if v and v > 0]
    if len(pts) < 2:
        return None
    a = np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]
    return round(float(a), 3)


def exponents(sizes: dict[str, Any]) -> dict[str, Any]:
    ok = sorted((int(n), r) for n, r in sizes.items() if r.get("status") == "ok")
    out: dict[str, Any] = {"sizes": [n for n, _ in ok]}
    for key in ("graph_seconds", "wall_seconds", "fit_seconds", "evaluation_seconds"):
        out[key] = slope([(n, r[key]) for n, r in ok])
    out["pairs_compared"] = slope([(n, r["neighbours"]["pairs_compared"]) for n, r in ok])
    out["peak_rss"] = slope([(n, r["peak_rss_gib"]["tree"]) for n, r in ok])
    out["graph_seconds_local"] = {  # the slope between consecutive sizes
        f"{a}-{b}": slope([(a, ra["graph_seconds"]), (b, rb["graph_seconds"])])
        for (a, ra), (b, rb) in itertools.pairwise(ok)
    }
    out["pairs_compared_local"] = {
        f"{a}-{b}": slope(
            [(a, ra["neighbours"]["pairs_compared"]), (b, rb["neighbours"]["pairs_compared"])]
        )
        for (a, ra), (b, rb) in itertools.pairwise(ok)
    }
    return out


def plot(sizes: dict[str, Any]) -> str | None:
    ok = sorted((int(n), r) for n, r in sizes.items() if r.get("status") == "ok")
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    ns = np.array([n for n, _ in ok], float)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, style, label in (
        ("graph_seconds", "ro-", "graph (neighbours.seconds)"),
        ("wall_seconds", "ks-", "whole fit job (spark-submit wall)"),
        ("hash_and_write_seconds", "b^-", "hash + write the reference table"),
        ("evaluation_seconds", "gv-", "LSH recall evaluation"),
    ):
        ax.plot(ns, [r[key] for _, r in ok], style, label=label)
    g0 = ok[0][1]["graph_seconds"]
    for power, ls in ((1, ":"), (2, "--")):
        ax.plot(ns, g0 * (ns / ns[0]) ** power, color="0.6", ls=ls, lw=1, label=f"~ n^{power}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("references n (1,960 real + synthetic)")
    ax.set_ylabel("seconds")
    ax.set_title("fit job stages vs n (log-log)")
    ax.legend(fontsize=7)
    ax2.plot(ns, [r["graph_recall_at_10"] for _, r in ok], "ro-", label="graph recall@10")
    ax2.plot(
        ns,
        [r["neighbours"]["pairs_share"] for _, r in ok],
        "bs-",
        label="share of all pairs compared",
    )
    ax2.plot(ns, [r["lsh_recall_at_5"] for _, r in ok], "g^-", label="LSH lookup recall@5")
    ax2.set_xscale("log")
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("references n")
    ax2.set_title("quality and share compared")
    ax2.legend(fontsize=7)
    return save_plot(fig, "graph_growth.png")


def section(data: dict[str, Any]) -> str:
    cfg = data["config"]
    rows = []
    for n, r in sorted(data["sizes"].items(), key=lambda kv: int(kv[0])):
        if r.get("status") != "ok":
            rows.append([f"{int(n):,}", r.get("status")] + ["-"] * 11 + [r["wall_seconds"]])
            continue
        g = r["neighbours"]
        cells, tuning = g.get("cells") or {}, g.get("tuning") or {}
        rows.append(
            [
                f"{int(n):,}",
                f"ok ({r.get('graph_method', '?')})",
                r["graph_seconds"],
                r["hash_and_write_seconds"],
                r["evaluation_seconds"],
                r["peak_rss_gib"]["tree"],
                f"{cells.get('cells', '-'):,} x {cells.get('probes', '-')}",
                tuning.get("predicted_recall", "-"),
                r["graph_recall_at_10"],
                f"{100 * g['pairs_share']:.2f}%",
                f"{g.get('split_cells', '-')} / {g.get('cells_used', 0):,}",
                f"{g.get('largest_cell', 0):,} / {g.get('largest_leaf', '-')}",
                f"{g['short']} / {g['filled']}",
                r["wall_seconds"],
            ]
        )
    table = md_table(
        [
            "n",
            "status",
            "graph s",
            "hash+write s",
            "evaluation s",
            "peak RSS GiB",
            "graph cells x probes",
            "predicted recall@10",
            "graph recall@10",
            "pairs scored / all pairs",
            "split / used cells",
            "largest cell (rows) / leaf",
            "short / filled",
            "job wall s",
        ],
        rows,
    )
    e = data["exponents"]
    lines = [
        "## Neighbour graph cost (`bench_graph.py`)",
        "",
        f"Stores of n efficientnet_lite0 vectors in the {cfg['projection']} search space "
        f"({cfg['dim']}-d"
        + (
            ": the LDA the index DAG learns from the labelled real sample, applied to every "
            "vector and L2-normalised, as the fit job's projection step does"
            if cfg["projection"] == "lda"
            else ""
        )
        + f"): the {cfg['real']:,} real embeddings "
        "of the shared sample plus synthetic ones of the same covariance (a real 1280-d "
        f"vector's deviation from the mean scaled by sqrt(1 - {MIX}^2) plus {MIX} x Gaussian "
        "noise of the real covariance; label: the source's class). The fit job under "
        "`spark-submit --master local[*] --driver-memory` (per size: "
        + ", ".join(
            f"{int(n):,}: {r.get('driver_memory')}"
            for n, r in sorted(data["sizes"].items(), key=lambda kv: int(kv[0]))
        )
        + "); the version's query LSH the same for every size "
        f"({cfg['bands']} bands x {cfg['keys_per_band']} keys, bucketLength "
        f"{cfg['bucket_length']:.5g}); the graph's own cells trained by the job for each size "
        "(`imgsim.ann.graph.tune_graph_cells`: k-means of a sample, about cap / 4 references "
        "per cell; the fewest probes whose share of the validation queries' exact neighbours "
        "in a probed cell reaches the target recall 0.95); graph k="
        f"{GRAPH_K}, cap {cfg['bucket_cap']} homes per leaf (larger cells split at projection "
        f"medians), duplicate distance {cfg['duplicate_distance']}, validation sample "
        f"{VALIDATION_SAMPLE}, `--scan-below 0` (the cells at every size; the job's "
        "default would scan the smaller stores exactly). Peak RSS: the largest sum of the "
        "RSS of the job's process tree (JVM + Python driver + Python workers; psutil every "
        "0.5 s; shared pages of forked workers counted twice). Pairs scored: a reference "
        "against the homes of each cell it probes (a pair that meets in several cells is "
        "scored in each).",
        "",
        table,
        "",
        f"Growth exponent (log-log slope over n = {', '.join(f'{n:,}' for n in e['sizes'])}): "
        f"graph seconds **{e['graph_seconds']}**, pairs compared {e['pairs_compared']}, "
        f"whole job {e['wall_seconds']}, peak RSS {e['peak_rss']}. Between consecutive sizes: "
        "graph seconds "
        + ", ".join(f"{k} {v}" for k, v in e.get("graph_seconds_local", {}).items())
        + "; pairs compared "
        + ", ".join(f"{k} {v}" for k, v in e.get("pairs_compared_local", {}).items())
        + ".",
        "",
    ]
    real = data.get("real_only")
    if real:
        lines += [
            f"The real photos alone ({real['n']:,} vectors, the same tuning and defaults, the "
            "job's NumPy twin `imgsim.ann.graph.local_graph`, recall over every image): "
            f"{real['cells']} cells x {real['probes']} probes, predicted recall@10 "
            f"{real['predicted_recall']}, measured {real['recall_at_10_all_images']}, "
            f"{100 * real['pairs_share']:.1f}% of the pairs scored, {real['split']} cells "
            "split. The synthetic vectors are drawn around these, which suits k-means cells: "
            "this row checks the tuning on real structure.",
            "",
        ]
    for n, r in sorted(data["sizes"].items(), key=lambda kv: int(kv[0])):
        if r.get("status") == "ok":
            g, stages = r["neighbours"], r.get("spark_stage_seconds", {})
            bucket = next((v for k, v in stages.items() if "neighbour_graph.py" in k), None)
            gib = g["shuffled_rows"] * (cfg["dim"] * 4 + 64) / 2**30
            lines.append(
                f"* n={int(n):,}: {g['shuffled_rows']:,} exploded rows through the cell "
                f"shuffle (about {gib:.1f} GiB, {g['partitions']} partitions), "
                f"{g['pairs_compared']:,} pairs scored; the graph's tuning "
                f"{(g.get('tuning') or {}).get('seconds', '-')} s; the longest graph stage "
                f"(explode, shuffle, cell walk) {bucket} s of the graph's "
                f"{r['graph_seconds']} s; peak RSS by kind: {r['peak_rss_gib']}; "
                f"measured with code {r['code']}."
            )
            continue
        if r.get("status") != "ok":
            est = r.get("shuffle_estimate", {})
            lines.append(
                f"* n={int(n):,}: {r['status']} after {r['wall_seconds']} s "
                f"(cell stage: {est.get('exploded_rows', 0):,} exploded rows, about "
                f"{est.get('gib')} GiB to shuffle). {r.get('reason', '')} Log tail: `"
                + " | ".join(r.get("log_tail", [])[-3:])[:400]
                + "`"
            )
    largest = max((int(n) for n, r in data["sizes"].items() if r.get("status") == "ok"), default=0)
    if largest:
        lines += ["", cluster_estimate(largest, data["sizes"][str(largest)], cfg["dim"])]
    lines += [
        "",
        "Measured by: "
        + "; ".join(
            f"n={int(n):,}: `{r.get('command')}` at {r.get('measured_utc')}"
            for n, r in sorted(data["sizes"].items(), key=lambda kv: int(kv[0]))
        )
        + ".",
    ]
    if data.get("plot"):
        lines += ["", f"![graph cost vs n]({data['plot']})"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        default=",".join(str(n) for n in DEFAULT_SIZES),
        help="comma-separated store sizes (default 16000,100000,1000000)",
    )
    ap.add_argument("--quick", action="store_true", help="16,000 vectors only")
    ap.add_argument(
        "--space",
        choices=("lda", "none"),
        default="lda",
        help="search space of the stores: the LDA of the real sample (default) or the raw "
        "1280-d embeddings",
    )
    ap.add_argument("--driver-memory", default="8g", help="spark-submit --driver-memory")
    ap.add_argument(
        "--timeout-s", type=float, default=0, help="stop a size's fit job after this (0: none)"
    )
    ap.add_argument(
        "--force", action="store_true", help="run a size even when the disk looks too small"
    )
    ap.add_argument(
        "--build-only", action="store_true", help="build (or check) the stores, run nothing"
    )
    ap.add_argument("--keep-stores", action="store_true", help="keep the stores after the runs")
    ap.add_argument(
        "--report-only", action="store_true", help="re-render results/graph.* from the JSON"
    )
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the job on `timeout`
    sizes = [16_000] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    started = time.perf_counter()
    real = load_real()
    gen = Generator(
        real.vectors, lda_projection(real.vectors, real.labels) if args.space == "lda" else None
    )
    bucket_length = BUCKET_FACTOR * data_scale(gen.real_space, 42)
    duplicate_distance = DUPLICATE_DISTANCE[args.space]
    probe_rng = np.random.default_rng(1)
    config = {
        "real": len(gen.real),
        "dim": gen.dim,
        "mix": MIX,
        "bands": LSH["bands"],
        "keys_per_band": LSH["keys_per_band"],
        "bucket_length": bucket_length,
        "graph_k": GRAPH_K,
        "bucket_cap": BUCKET_CAP,
        "duplicate_distance": duplicate_distance,
        "validation_sample": VALIDATION_SAMPLE,
        "projection": args.space,
        "graph_partition": "k-means cells, probes tuned per size",
        "master": "local[*]",
    }
    spread_info = {
        "real": spread(gen.real_space),
        "synthetic": spread(gen.draw(5000, probe_rng)[0]),
    }
    previous = RESULTS_DIR / f"{NAME}.json"
    results: dict[str, Any] = {}
    if previous.exists():
        old = json.loads(previous.read_text())
        old_config = dict(old.get("config", {}))
        memory = old_config.pop("driver_memory", None)  # per size since the 1M run
        if old_config == config:
            results = old.get("sizes", {})
            for r in results.values():
                r.setdefault("driver_memory", memory)
    for n in [] if args.report_only else sizes:
        root = STORES / f"n{n}"
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(WORK_DIR).free + (_du(root) if root.exists() else 0)
        if disk_need(n, gen.dim) > free and not args.force:
            print(
                f"skipping {n:,}: needs about {disk_need(n, gen.dim) / 2**30:.0f} GiB of disk, "
                f"{free / 2**30:.0f} GiB free (--force runs it anyway)",
                flush=True,
            )
            continue
        print(f"store of {n:,} vectors ...", flush=True)
        store = build_store(n, root, gen, real.labels)
        print(f"  {store}", flush=True)
        if args.build_only:
            continue
        print(f"fit job on {n:,} vectors ...", flush=True)
        r = run_fit(n, root, bucket_length, args.driver_memory, args.timeout_s, duplicate_distance)
        r["store"] = store
        r["driver_memory"] = args.driver_memory
        probes = ((r.get("neighbours") or {}).get("cells") or {}).get("probes")
        r["shuffle_estimate"] = shuffle_estimate(n, gen.dim, *([probes] if probes else []))
        r["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        results[str(n)] = r
        print(
            "  " + json.dumps({k: v for k, v in r.items() if k not in ("neighbours", "store")}),
            flush=True,
        )
        if not args.keep_stores and n >= 1_000_000:
            shutil.rmtree(root, ignore_errors=True)
    if args.build_only:
        return 0
    for r in results.values():  # runs recorded before the stage breakdown existed
        log_path = PROJECT_ROOT / r.get("log", "-")
        if r.get("status") == "ok" and "spark_stage_seconds" not in r and log_path.is_file():
            r["spark_stage_seconds"] = stage_seconds(log_path)
    data: dict[str, Any] = {
        "config": config,
        "spread": spread_info,
        "real_only": real_only(gen),
        "sizes": results,
        "exponents": exponents(results),
    }
    data["plot"] = plot(results)
    data["seconds"] = round(time.perf_counter() - started, 1)
    if args.report_only and previous.exists():  # keep the measuring run's time and command
        old = json.loads(previous.read_text())
        data["seconds"] = old.get("seconds")
        sys.argv = [sys.argv[0], *str(old.get("command", "")).split()[1:]]
    out = write_result(NAME, data, section(data))
    print(f"exponents: {data['exponents']}")
    print(f"wrote {out} in {data['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
