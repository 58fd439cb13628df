"""The Spark embedding engine (spark_jobs/embed_images.py) against the in-task path.

Both engines embed the same real photos (and one corrupt file) into two data roots; the store
files, the vectors, the quarantine and the shard results must agree. A DAG run with the Param
``embed_engine=spark`` must complete and publish.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsim.config import ConfigError, Layout, Settings
from imgsim.fsutil import atomic_write_json, read_json, run_key, sha256_file
from imgsim.index import pipeline

PROJECT = Path(__file__).resolve().parents[1]
JOB = PROJECT / "spark_jobs" / "embed_images.py"
RUN_ID = "manual__2026-01-01T00:00:00+00:00"
N_PHOTOS = 40


# -- configuration (fast) -----------------------------------------------------------------------


def test_embed_engine_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSIM_EMBED_ENGINE", raising=False)
    assert Settings.from_env().embed_engine == "tasks"
    monkeypatch.setenv("IMGSIM_EMBED_ENGINE", "Spark")
    assert Settings.from_env().embed_engine == "spark"
    monkeypatch.setenv("IMGSIM_EMBED_ENGINE", "dask")
    with pytest.raises(ConfigError, match=r"IMGSIM_EMBED_ENGINE='dask'.*tasks, spark"):
        Settings.from_env()


def test_embed_route(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path, batch_size=8)
    shards = [{"spec": str(tmp_path / "runs/r/shards/shard-00000.json"), "shard": 0, "images": 3}]
    assert pipeline.embed_route(settings, "tasks", [], "r", "random") == ("none", "")
    assert pipeline.embed_route(settings, "spark", [], "r", "random") == ("none", "")
    assert pipeline.embed_route(settings, "tasks", shards, "r", "random") == ("tasks", "")
    route, job = pipeline.embed_route(settings, "spark", shards, "r", "random")
    assert route == "spark"
    assert job == str(tmp_path / "runs" / "r" / "spark_embed.json")
    written = read_json(job)
    assert written["shards"] == [shards[0]["spec"]]
    assert written["batch_size"] == 8 and written["run_key"] == "r"
    assert written["data_root"] == str(tmp_path)
    with pytest.raises(ConfigError, match="Param embed_engine"):
        pipeline.embed_route(settings, "gpu", shards, "r", "random")


def test_embed_summary_names_a_missing_shard(tmp_path: Path) -> None:
    spec = tmp_path / "runs" / "r" / "shards" / "shard-00000.json"
    with pytest.raises(pipeline.PipelineError, match=r"shard 0 .* has no result"):
        pipeline.embed_summary([{"spec": str(spec), "shard": 0, "images": 2}], "spark")
    part = tmp_path / "part.parquet"
    part.write_bytes(b"x")
    atomic_write_json(
        pipeline.shard_result_path(spec),
        {"shard": 0, "embedded": 1, "quarantined": {}, "file": str(part)},
    )
    with pytest.raises(
        pipeline.PipelineError, match=r"1 embedded \+ 0 quarantined \+ 0 to retry != 2"
    ):
        pipeline.embed_summary([{"spec": str(spec), "shard": 0, "images": 2}], "spark")


def test_a_shard_counts_images_left_for_a_later_run_apart(tmp_path: Path) -> None:
    """An image whose read failed for the file system's reason is neither embedded nor
    quarantined: the shard's result and the summary count it as ``retry_later``."""
    layout = Layout(tmp_path)
    spec = tmp_path / "runs" / "r" / "shards" / "shard-00000.json"
    vector = np.ones(4, np.float32)
    result = pipeline.finish_shard(
        layout,
        spec,
        "random",
        "r",
        0,
        [("a" * 64, vector)],
        {"retry:unreadable": 1, "corrupt": 1},
        4,
    )
    assert result["quarantined"] == {"corrupt": 1}
    assert result["retry_later"] == {"unreadable": 1}
    summary = pipeline.embed_summary([{"spec": str(spec), "shard": 0, "images": 3}], "tasks")
    assert summary["retry_later"] == 1 and summary["quarantined_total"] == 1


# -- the Spark job against the in-task path ---------------------------------------------------


def make_root(root: Path, photos: list[Path], corrupt: bytes) -> list[dict[str, Any]]:
    """Copy the photos (and one corrupt .jpg) under ``images/cars``; plan shards of 16."""
    cars = root / "images" / "cars"
    cars.mkdir(parents=True)
    for p in photos:
        (cars / p.name).write_bytes(p.read_bytes())
    (cars / "corrupt.jpg").write_bytes(corrupt)
    todo = [
        {"image_id": sha256_file(p), "path": str(p.relative_to(root))}
        for p in sorted(cars.glob("*.jpg"))
    ]
    todo_file = root / "runs" / run_key(RUN_ID) / "to_embed.json"
    atomic_write_json(todo_file, todo)
    settings = Settings(data_root=root, shard_size=16)
    return pipeline.plan_shards(settings, str(todo_file), RUN_ID)


def spark_submit(job: str, *extra: str) -> tuple[str, str]:
    """Run the job on local[2] in 4 tasks (41 images, 12 per task); (stdout, stderr)."""
    from imgsim.envsetup import embedded_environment

    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        "--conf",
        "spark.ui.enabled=false",
        *extra,
        str(JOB),
        "--job",
        job,
        "--images-per-task",
        "12",
    ]
    proc = subprocess.run(
        cmd, env=embedded_environment(), capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return proc.stdout, proc.stderr


def executor_loads(stderr: str) -> int:
    """How many executor processes loaded the backbone (imgsim.index.spark_embed logs each load)."""
    return len(re.findall(r"executor process \d+ on .* loaded the efficientnet_lite0", stderr))


def store(layout: Layout) -> dict[str, Any]:
    import pyarrow.parquet as pq

    files = {
        p.name: pq.read_table(p)
        for p in sorted(layout.embeddings("efficientnet_lite0").glob("part-*.parquet"))
    }
    return {
        "files": files,
        "schema": {n: t.schema for n, t in files.items()},
        "ids": {n: t.column("image_id").to_pylist() for n, t in files.items()},
        "vectors": {
            iid: np.asarray(v, np.float32)
            for t in files.values()
            for iid, v in zip(
                t.column("image_id").to_pylist(), t.column("vector").to_pylist(), strict=True
            )
        },
    }


def quarantine_records(layout: Layout) -> dict[str, dict[str, Any]]:
    out = {}
    for f in layout.quarantine.glob("*.json"):
        rec = read_json(f)
        rec.pop("quarantined_at")
        rec["source_path"] = str(Path(rec["source_path"]).relative_to(layout.root))
        out[f.name] = rec
    return out


def shard_results(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in shards:
        rec = read_json(pipeline.shard_result_path(s["spec"]))
        rec["file"] = Path(rec["file"]).name
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def engines(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    photos = sorted((sample_dir / "images").glob("*.jpg"))[:N_PHOTOS]
    corrupt = photos[0].read_bytes()[:2500]  # a truncated JPEG
    tasks_root = tmp_path_factory.mktemp("tasks") / "data"
    spark_root = tmp_path_factory.mktemp("spark") / "data"
    out: dict[str, Any] = {}
    for name, root in (("tasks", tasks_root), ("spark", spark_root)):
        out[name] = {"layout": Layout(root), "shards": make_root(root, photos, corrupt)}
    settings = Settings(data_root=tasks_root, batch_size=8, shard_size=16)
    for shard in out["tasks"]["shards"]:
        pipeline.embed_shard(settings, shard["spec"], "efficientnet_lite0")
    out["tasks"]["summary"] = pipeline.embed_summary(out["tasks"]["shards"], "tasks")

    settings = settings.replace(data_root=spark_root)
    route, job = pipeline.embed_route(
        settings, "spark", out["spark"]["shards"], RUN_ID, "efficientnet_lite0"
    )
    assert route == "spark"
    stdout, stderr = spark_submit(job)
    out["spark"]["loads"] = executor_loads(stderr)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("IMGSIM_EMBED_SUMMARY "))
    out["spark"]["printed"] = json.loads(line.split(" ", 1)[1])
    out["spark"]["summary"] = pipeline.embed_summary(out["spark"]["shards"], "spark")
    out["job"] = job
    return out


@pytest.mark.spark
@pytest.mark.slow
def test_same_store_files_and_vectors(engines: dict[str, Any]) -> None:
    a, b = store(engines["tasks"]["layout"]), store(engines["spark"]["layout"])
    assert len(a["files"]) == 3  # 41 inputs in shards of 16
    assert a["files"].keys() == b["files"].keys()
    assert a["schema"] == b["schema"]  # same columns, types, fixed-size list
    assert a["ids"] == b["ids"]  # same ids, same order in every shard
    assert len(a["vectors"]) == N_PHOTOS
    for iid, va in a["vectors"].items():
        vb = b["vectors"][iid]
        assert va.dtype == vb.dtype == np.float32 and va.shape == vb.shape == (1280,)
        assert float(np.max(np.abs(va - vb))) < 1e-4, iid
    for t in b["files"].values():
        assert set(t.column("backbone").to_pylist()) == {"efficientnet_lite0"}
        assert set(t.column("run_key").to_pylist()) == {run_key(RUN_ID)}


@pytest.mark.spark
@pytest.mark.slow
def test_same_quarantine_thumbnails_and_summary(engines: dict[str, Any]) -> None:
    ta, tb = engines["tasks"], engines["spark"]
    qa, qb = quarantine_records(ta["layout"]), quarantine_records(tb["layout"])
    assert len(qa) == 1 and qa == qb
    (rec,) = qb.values()
    assert rec["reason"] == "corrupt" and rec["source_path"] == "images/cars/corrupt.jpg"
    copies = sorted(p.name for p in tb["layout"].quarantine.iterdir())
    assert copies == sorted(p.name for p in ta["layout"].quarantine.iterdir())
    thumbs_a = {p.name: p.read_bytes() for p in ta["layout"].thumbs.glob("*.jpg")}
    thumbs_b = {p.name: p.read_bytes() for p in tb["layout"].thumbs.glob("*.jpg")}
    assert len(thumbs_a) == N_PHOTOS and thumbs_a == thumbs_b
    assert shard_results(ta["shards"]) == shard_results(tb["shards"])
    sa, sb = dict(ta["summary"]), dict(tb["summary"])
    assert (sa.pop("engine"), sb.pop("engine")) == ("tasks", "spark")
    assert sa == sb
    assert sb["embedded"] == N_PHOTOS and sb["quarantined"] == {"corrupt": 1}
    printed = dict(tb["printed"])
    printed.pop("engine")
    assert printed == sb
    assert read_json(ta["layout"].embeddings("efficientnet_lite0") / "BACKBONE.json") == read_json(
        tb["layout"].embeddings("efficientnet_lite0") / "BACKBONE.json"
    )


@pytest.mark.spark
@pytest.mark.slow
def test_the_model_is_loaded_once_per_python_worker(engines: dict[str, Any]) -> None:
    # local[2] runs the 4 embedding tasks in 2 reused Python workers: at most 2 loads.
    assert 1 <= engines["spark"]["loads"] <= 2


def test_the_backbone_cache_returns_the_loaded_model() -> None:
    from imgsim.index.spark_embed import cached_backbone

    assert cached_backbone("random", "", "cpu") is cached_backbone("random", "", "cpu")


@pytest.mark.spark
@pytest.mark.slow
def test_a_retry_replaces_the_shards(engines: dict[str, Any]) -> None:
    """Re-running the job (Spark worker reuse off: a fresh Python per task) duplicates nothing."""
    layout = engines["spark"]["layout"]
    before = store(layout)
    _, stderr = spark_submit(engines["job"], "--conf", "spark.python.worker.reuse=false")
    assert executor_loads(stderr) == 4  # a fresh Python worker per task
    after = store(layout)
    assert after["files"].keys() == before["files"].keys()
    assert after["ids"] == before["ids"]
    for iid, v in before["vectors"].items():
        assert float(np.max(np.abs(v - after["vectors"][iid]))) < 1e-4
    assert not [
        p for p in layout.embeddings("efficientnet_lite0").iterdir() if p.name.startswith(".tmp-")
    ]


@pytest.mark.spark
def test_a_job_for_another_run_is_refused(tmp_path: Path) -> None:
    from imgsim.index.spark_embed import EmbedJob, EmbedJobError, read_shards

    spec = tmp_path / "runs" / "a" / "shards" / "shard-00000.json"
    atomic_write_json(spec, {"run_key": "a", "shard": 0, "items": []})
    job_file = tmp_path / "job.json"
    atomic_write_json(
        job_file,
        {"data_root": str(tmp_path), "backbone": "random", "run_key": "b", "shards": [str(spec)]},
    )
    with pytest.raises(EmbedJobError, match="run key 'a', the job is for 'b'"):
        read_shards(EmbedJob.from_file(job_file))
    atomic_write_json(job_file, {"data_root": str(tmp_path), "backbone": "random"})
    with pytest.raises(EmbedJobError, match="missing run_key, shards"):
        EmbedJob.from_file(job_file)


# -- the DAG with embed_engine=spark ------------------------------------------------------------

WIRING = r"""
import json
from airflow.dag_processing.dagbag import DagBag
dag = DagBag(dag_folder=PATH).get_dag("imgsim_index")
t = dag.task_dict
print("RESULT" + json.dumps({
    "branch": sorted(t["choose_embed_engine"].downstream_task_ids),
    "summary_up": sorted(t["embed_summary"].upstream_task_ids),
    "summary_rule": getattr(t["embed_summary"].trigger_rule, "value", None),
    "fit_plan_up": sorted(t["fit_plan"].upstream_task_ids),
    "engine_param": dag.params.get_param("embed_engine").schema.get("enum"),
    "engine_default": dag.params["embed_engine"],
}))
"""


@pytest.mark.airflow
def test_the_dag_wires_both_engines(airflow_env: dict[str, str]) -> None:
    code = f"PATH = {str(PROJECT / 'dags' / 'imgsim_index.py')!r}\n" + WIRING
    env = {**airflow_env, "IMGSIM_EMBED_ENGINE": "spark"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    wiring = json.loads(line[len("RESULT") :])
    assert wiring["branch"] == ["embed", "embed_spark", "embed_summary"]
    assert wiring["summary_up"] == ["choose_embed_engine", "embed", "embed_spark", "plan_shards"]
    assert wiring["summary_rule"] == "none_failed_min_one_success"
    # fit_plan takes the embedder catalog chose (imgsim.index.pipeline.resolve_embedder)
    assert wiring["fit_plan_up"] == ["catalog", "embed_summary"]
    assert wiring["engine_param"] == ["tasks", "spark"]
    assert wiring["engine_default"] == "spark"  # IMGSIM_EMBED_ENGINE sets the default


# The index DAG with the Spark engine, end to end, runs in tests/test_distributed.py (on a
# Spark standalone cluster, where the embedding executors must run on the worker).
