"""The ONNX Runtime path: configuration, export, agreement with torch, runtime recorded/refused.

Fast tests check the settings and the records; exports (several seconds each) are marked slow.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsim.config import ConfigError, Layout, Settings, check_setting
from imgsim.embedding.backbones import comparable_spec, spec_runtime
from imgsim.embedding.onnx_runtime import CALIBRATION, model_file
from imgsim.fsutil import atomic_write_json, read_json
from imgsim.index import pipeline

SPEC = {
    "name": "random",
    "dim": 512,
    "weights": "random(seed=0)",
    "weights_sha256": "",
    "preprocessing": "p",
}


# --- configuration ----------------------------------------------------------------------------


def test_runtime_setting_defaults_to_auto_and_accepts_each_runtime(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMGSIM_RUNTIME", raising=False)
    assert Settings.from_env().runtime == "auto"
    for value, expected in (("onnx", "onnx"), ("ONNX-INT8", "onnx-int8"), (" torch ", "torch")):
        monkeypatch.setenv("IMGSIM_RUNTIME", value)
        assert Settings.from_env().runtime == expected


def test_auto_keeps_the_stores_runtime_else_onnx_on_a_cpu_and_torch_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from imgsim.embedding import backbones

    resolve = backbones.resolve_runtime
    assert resolve("auto", "cpu", None) == "onnx"  # a new store, on a CPU
    assert resolve("auto", "cpu", {**SPEC, "runtime": "onnx-int8"}) == "onnx-int8"
    assert resolve("auto", "cpu", SPEC) == "torch"  # a store from before runtimes existed
    assert resolve("onnx", "cpu", SPEC) == "onnx"  # asked for: the store check refuses it later
    monkeypatch.setattr(backbones, "choose_device", lambda device: torch.device("cuda"))
    assert resolve("auto", "auto", None) == "torch"  # a GPU runs torch


def test_a_bad_runtime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSIM_RUNTIME", "openvino")
    with pytest.raises(ConfigError, match=r"IMGSIM_RUNTIME='openvino'.*torch, onnx, onnx-int8"):
        Settings.from_env()
    with pytest.raises(ConfigError, match="runtime='tensorrt'"):
        check_setting("runtime", "tensorrt", "runtime")


def test_onnx_runtimes_refuse_a_gpu_device() -> None:
    from imgsim.embedding.backbones import load_backbone

    with pytest.raises(ValueError, match="runs on the CPU"):
        load_backbone("random", device="cuda", runtime="onnx")
    with pytest.raises(ConfigError, match="choose one of"):
        load_backbone("random", device="cpu", runtime="tflite")


def test_cached_model_files_are_keyed_by_weights_and_variant(tmp_path: Path) -> None:
    a = model_file(tmp_path, "resnet18", "ab" * 32, "onnx")
    b = model_file(tmp_path, "resnet18", "cd" * 32, "onnx")
    q = model_file(tmp_path, "resnet18", "ab" * 32, "onnx-int8")
    assert len({a, b, q}) == 3
    assert "abababab" in a.name and "fp32" in a.name
    assert CALIBRATION in q.name and "int8" in q.name


def test_one_export_cache_per_machine_shared_by_every_data_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Settings(data_root=tmp_path / "a").model_cache == tmp_path / "xdg" / "imgsim" / "models"
    assert Settings(data_root=tmp_path / "b").model_cache == Settings().model_cache
    monkeypatch.setenv("IMGSIM_MODEL_CACHE", str(tmp_path / "models"))
    assert Settings.from_env().model_cache == tmp_path / "models"


# --- the runtime in the records ---------------------------------------------------------------


def test_a_record_without_runtime_means_torch() -> None:
    assert spec_runtime(SPEC) == "torch"
    assert comparable_spec(SPEC) == comparable_spec({**SPEC, "runtime": "torch"})
    assert comparable_spec(SPEC) != comparable_spec({**SPEC, "runtime": "onnx-int8"})


def test_the_store_refuses_vectors_of_another_runtime(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    record = layout.embeddings("random") / "BACKBONE.json"
    atomic_write_json(record, SPEC)  # written before runtimes existed
    pipeline.check_backbone_record(layout, {**SPEC, "runtime": "torch"})  # same thing
    with pytest.raises(pipeline.PipelineError, match="runtime"):
        pipeline.check_backbone_record(layout, {**SPEC, "runtime": "onnx-int8"})
    assert read_json(record) == SPEC  # untouched


def test_a_query_backbone_on_another_runtime_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's runtime is the one loaded; a spec that still differs is refused."""
    from imgsim.embedding import backbones
    from imgsim.query import lookup

    seen: dict[str, Any] = {}

    def fake_load(name: str, **kw: Any) -> Any:
        seen.update(kw)
        spec = backbones.BackboneSpec(name, 512, "random(seed=0)", "", "p", runtime="torch")
        return backbones.Backbone(
            spec=spec,
            model=None,
            preprocess=None,  # type: ignore[arg-type]
            device=None,
        )  # type: ignore[arg-type]

    monkeypatch.setattr(backbones, "load_backbone", fake_load)
    manifest = {"version": "v1", "backbone": {**SPEC, "runtime": "onnx-int8"}}
    with pytest.raises(lookup.BackboneMismatch, match="runtime"):
        lookup.load_query_backbone(manifest, cache_dir=Path("/nonexistent"))
    assert seen["runtime"] == "onnx-int8" and seen["device"] == "cpu"
    old = {"version": "v0", "backbone": SPEC}  # no runtime recorded: torch
    lookup.load_query_backbone(old, device="cpu")
    assert seen["runtime"] == "torch"


# --- real exports (slow) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


def _images(folder: Path, n: int) -> Iterator[Path]:
    from PIL import Image

    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (180 + 10 * i, 260, 3), dtype=np.uint8)
        arr[: 60 + 5 * i] //= 3
        path = folder / f"img{i}.jpg"
        Image.fromarray(arr, "RGB").save(path, quality=90)
        yield path


@pytest.mark.slow
def test_onnx_fp32_matches_torch_and_is_cached(cache: Path, tmp_path: Path) -> None:
    from imgsim.embedding.backbones import load_backbone
    from imgsim.embedding.infer import embed_paths

    paths = list(_images(tmp_path / "img", 5))
    torch_bb = load_backbone("random", device="cpu")
    onnx_bb = load_backbone("random", device="cpu", runtime="onnx", cache_dir=cache)
    assert onnx_bb.spec.runtime == "onnx" and onnx_bb.spec.as_dict()["runtime"] == "onnx"
    onnx_file = Path(onnx_bb.extra["onnx_file"])
    assert onnx_file.parent == cache and onnx_file.is_file()
    assert not list(cache.glob(".tmp-*")) and not list(cache.glob("*.data"))
    want, bad = embed_paths(paths, torch_bb, batch_size=2)
    got, bad2 = embed_paths(paths, onnx_bb, batch_size=3)  # another batch size: dynamic axis
    assert not bad and not bad2 and got.shape == want.shape == (5, 512)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    mtime = onnx_file.stat().st_mtime_ns
    again = load_backbone("random", device="cpu", runtime="onnx", cache_dir=cache)
    assert Path(again.extra["onnx_file"]).stat().st_mtime_ns == mtime  # reused, not re-exported


@pytest.mark.slow
def test_the_runtime_is_recorded_and_a_switch_is_refused(cache: Path, tmp_path: Path) -> None:
    from imgsim.store import load_vectors

    layout = Layout(tmp_path / "data")
    folder = layout.images / "a"
    items = [
        {"image_id": f"{i:064d}", "path": str(p.relative_to(layout.root))}
        for i, p in enumerate(_images(folder, 3))
    ]
    spec = layout.runs / "r" / "shards" / "shard-00000.json"
    atomic_write_json(spec, {"run_key": "r", "shard": 0, "items": items})
    exported = {f: f.stat().st_mtime_ns for f in cache.glob("random-*-fp32-*.onnx")}
    assert exported  # by the test above, for another "data root"
    settings = Settings(data_root=layout.root, device="cpu", model_cache=cache)  # runtime auto
    out = pipeline.embed_shard(settings, str(spec), "random")
    assert out["embedded"] == 3
    assert {f: f.stat().st_mtime_ns for f in exported} == exported  # not exported again
    assert read_json(layout.embeddings("random") / "BACKBONE.json")["runtime"] == "onnx"
    assert len(load_vectors(layout, "random")[0]) == 3
    with pytest.raises(pipeline.PipelineError, match="runtime"):
        pipeline.embed_shard(settings.replace(runtime="torch"), str(spec), "random")


@pytest.mark.slow
def test_int8_neighbours_agree_with_torch_on_real_photos(sample_dir: Path, cache: Path) -> None:
    """efficientnet_lite0 (real weights) on 40 sample photos: int8 vectors stay close to fp32."""
    from imgsim.embedding.backbones import load_backbone
    from imgsim.embedding.infer import embed_paths

    with open(sample_dir / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:40]
    paths = [sample_dir / "images" / r["image"] for r in rows]
    ref, _ = embed_paths(paths, load_backbone("efficientnet_lite0", device="cpu"))
    int8 = load_backbone("efficientnet_lite0", device="cpu", runtime="onnx-int8", cache_dir=cache)
    assert int8.spec.runtime == "onnx-int8"
    got, _ = embed_paths(paths, int8)
    cos = np.sum(got * ref, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.95, cos.min()

    def top5(v: np.ndarray) -> np.ndarray:
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        s = u @ u.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :5]

    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5(ref), top5(got), strict=True)])
    assert overlap > 0.7, overlap
