"""Training the embedding: split, data checks, the training loop, publishing, loading, the
index following the embedder, retraining decisions, rollback bringing the embedder back.

The loop tests train on 4 classes x 10 real sample photos for 1-2 epochs, on the ``random``
backbone (ResNet-18 with seeded random weights: the ResNet path, fast) unless stated.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsim.config import Settings
from imgsim.embedding.trained import EmbedderError, parse_trained_name, trained_name
from imgsim.training.train import (
    Reference,
    TrainConfig,
    TrainingDataError,
    TrainingDiverged,
    baseline,
    best_of,
    check_enough,
    split_references,
    training_plan,
)

CLASSES = (1, 2, 3, 4)


def refs_of(counts: dict[int, int]) -> list[Reference]:
    return [
        Reference(f"{c:03d}{i:061d}", Path(f"/t/{c}-{i}.jpg"), c)
        for c, n in counts.items()
        for i in range(n)
    ]


# -- fast: names, split, checks, decisions ------------------------------------------------------


def test_trained_names_round_trip_and_refuse_bad_ones() -> None:
    name = trained_name("efficientnet_lite0", "e20261207T081500Z-3fa9c2")
    assert name == "efficientnet_lite0@e20261207T081500Z-3fa9c2"
    parsed = parse_trained_name(name)
    assert parsed and parsed.base == "efficientnet_lite0" and parsed.version.startswith("e2026")
    assert parse_trained_name("resnet18") is None
    with pytest.raises(EmbedderError, match="not an embedder version"):
        parse_trained_name("resnet18@v20261207T081500Z-3fa9c2")
    with pytest.raises(EmbedderError, match="cannot be trained"):
        trained_name("vit", "e20261207T081500Z-3fa9c2")


def test_split_is_stratified_seeded_and_disjoint() -> None:
    refs = refs_of({1: 10, 2: 20, 3: 2, 4: 1})
    a = split_references(refs, 0.1, seed=0)
    b = split_references(refs, 0.1, seed=0)
    c = split_references(refs, 0.1, seed=1)
    assert [r.image_id for r in a.held] == [r.image_id for r in b.held]
    assert [r.image_id for r in a.held] != [r.image_id for r in c.held]
    held = {r.image_id for r in a.held}
    assert not held & {r.image_id for r in a.train}
    assert len(held) + len(a.train) == len(refs)
    per_class = {k: sum(r.class_id == k for r in a.held) for k in CLASSES}
    assert per_class == {1: 1, 2: 2, 3: 1, 4: 0}  # a single photo is never held out
    assert a.classes == [1, 2, 3, 4]


def test_too_few_labelled_photos_are_refused_with_the_reason() -> None:
    with pytest.raises(TrainingDataError, match="at least 20 are needed"):
        check_enough(refs_of({1: 5, 2: 5}), 20)
    with pytest.raises(TrainingDataError, match="fewer than 2 labelled photos"):
        check_enough(refs_of({1: 30, 2: 1, 3: 1, 4: 1}), 20)
    with pytest.raises(TrainingDataError, match="at least 2"):
        check_enough(refs_of({1: 30}), 20)
    check_enough(refs_of({1: 10, 2: 10, 3: 1}), 20)  # most classes have 2 or more


def test_publish_rule_compares_the_best_trained_with_the_frozen_baseline() -> None:
    metrics = {
        "frozen": {"raw": {"hit_at_1": 0.3}, "lda": {"hit_at_1": 0.5}},
        "trained": {"raw": {"hit_at_1": 0.55}, "lda": {"hit_at_1": 0.6}},
    }
    assert best_of(metrics) == ("lda", 0.6)
    assert baseline(metrics) == ("frozen + LDA", 0.5)
    metrics["trained"]["lda"] = {"skipped": "no"}
    assert best_of(metrics) == ("none", 0.55)
    metrics["frozen"]["lda"] = {"skipped": "no"}
    assert baseline(metrics) == ("frozen", 0.3)


# -- the loop on real photos --------------------------------------------------------------------


def build_root(sample: Path, root: Path, classes: tuple[int, ...] = CLASSES) -> Settings:
    """A data root whose catalog and thumbnails hold ``classes`` x 10 real sample photos."""
    from imgsim.fsutil import atomic_copy
    from imgsim.index import pipeline

    settings = Settings().replace(
        data_root=root, backbone="random", runtime="torch", train_min_images=8, embedder="current"
    )
    layout = settings.layout
    src = layout.images / "reference"
    src.mkdir(parents=True, exist_ok=True)
    with open(sample / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if int(r["Class"]) in classes]
    for row in rows:
        atomic_copy(sample / "images" / row["image"], src / row["image"])
    labels = layout.raw / "labels.csv"
    labels.parent.mkdir(parents=True, exist_ok=True)
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Class", "image"])
        w.writerows([r["Class"], r["image"]] for r in rows)
    cat = pipeline.catalog(settings, str(src), str(labels), "2026-01-01", "t1", "random")
    for shard in pipeline.plan_shards(settings, cat["to_embed_file"], "t1", cat["backbone"]):
        pipeline.embed_shard(settings, shard["spec"], shard["backbone"])
    return settings


@pytest.fixture(scope="module")
def trained(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One data root, one published embedder (2 epochs, published regardless of the gain)."""
    from imgsim.training.train import run_training

    settings = build_root(sample_dir, tmp_path_factory.mktemp("train") / "data")
    points: list[dict[str, Any]] = []
    config = TrainConfig.from_settings(settings, epochs=2, batch_size=16, publish="always")
    result = run_training(settings, config, run_id="test", progress=points.append)
    return {"settings": settings, "result": result, "points": points}


@pytest.mark.slow
def test_training_publishes_a_whole_embedder_version(trained: dict[str, Any]) -> None:
    from imgsim.versions.embedders import (
        current_embedder,
        embedder_dir,
        published_embedders,
        read_embedder,
    )

    settings, result = trained["settings"], trained["result"]
    layout = settings.layout
    assert result.published and result.version
    assert published_embedders(layout) == [result.version] == [current_embedder(layout)]
    manifest = read_embedder(layout, result.version, hashes=True)
    assert manifest["name"] == f"random@{result.version}"
    assert set(manifest["files"]) == {"embedder.pt", "embedder.onnx", "curve.json", "labels.json"}
    assert manifest["base"]["name"] == "random" and manifest["mode"] == "top"
    assert manifest["dim"] == 512 and manifest["epochs"] == 2
    assert manifest["labels"]["classes"] == 4 and manifest["labels"]["held_out"] == 4
    assert manifest["loss"]["temperature"] == 0.05
    assert 1 <= manifest["best_epoch"] <= 2
    assert [p["epoch"] for p in trained["points"]] == [1, 2]  # a progress line per epoch
    assert all(np.isfinite(p["loss"]) for p in trained["points"])
    # the held-out photos are not in the training part and are recorded
    assert len(manifest["held_out_ids"]) == 4
    curve = json.loads((embedder_dir(layout, result.version) / "curve.json").read_text())
    assert curve == result.curve
    assert not any((layout.embedders / ".staging").iterdir())


@pytest.mark.slow
def test_published_embedder_loads_on_torch_and_onnx_alike(trained: dict[str, Any]) -> None:
    from PIL import Image

    from imgsim.embedding.backbones import load_backbone

    settings, result = trained["settings"], trained["result"]
    name = result.manifest["name"]
    kw = {"embedders": settings.layout.embedders, "cache_dir": settings.data_root / "cache"}
    torch_bb = load_backbone(name, runtime="torch", device="cpu", **kw)
    onnx_bb = load_backbone(name, runtime="onnx", **kw)
    assert torch_bb.spec.name == name and torch_bb.spec.dim == 512
    assert onnx_bb.extra["onnx_file"].endswith("embedder.onnx")  # the published export
    thumbs = sorted(settings.layout.thumbs.glob("*.jpg"))[:4]
    batch = np.stack([torch_bb.preprocess(Image.open(p).convert("RGB")).numpy() for p in thumbs])
    import torch

    a = torch_bb.embed_batch(torch.from_numpy(batch))
    b = onnx_bb.embed_batch(torch.from_numpy(batch))
    assert a.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=2e-4)


@pytest.mark.slow
def test_the_index_follows_the_embedder(trained: dict[str, Any]) -> None:
    """The next index run embeds every reference with the new embedder and plans a refit that
    names it (the version's backbone); frozen stays available on request."""
    from imgsim.index import pipeline

    settings, result = trained["settings"], trained["result"]
    layout = settings.layout
    labels = str(layout.raw / "labels.csv")
    src = str(layout.images / "reference")
    cat = pipeline.catalog(settings, src, labels, "2026-01-02", "t2", "random")
    name = result.manifest["name"]
    assert cat["backbone"] == name and cat["embedder"]["embedder"] == result.version
    assert cat["to_embed"] == cat["live"] == 40  # every reference again
    shards = pipeline.plan_shards(settings, cat["to_embed_file"], "t2", cat["backbone"])
    for shard in shards:
        pipeline.embed_shard(settings, shard["spec"], shard["backbone"])
    plan = pipeline.fit_plan(settings, cat["backbone"], 0, 0.0, run_id="t2")
    assert plan["backbone"] == name and plan["expected_count"] == 40
    assert plan["projection"] in ("lda", "none", "auto")
    # a daily run with nothing new embeds nothing
    again = pipeline.catalog(settings, src, labels, "2026-01-03", "t3", "random")
    assert again["backbone"] == name and again["to_embed"] == 0
    frozen = pipeline.resolve_embedder(settings, "random", "frozen")
    assert frozen["backbone"] == "random"
    other = pipeline.resolve_embedder(settings, "efficientnet_lite0", "current")
    assert other["backbone"] == "efficientnet_lite0" and "trained on random" in other["reason"]


@pytest.mark.slow
def test_a_damaged_embedder_is_never_used(trained: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from imgsim.embedding.backbones import load_backbone
    from imgsim.index import pipeline
    from imgsim.versions.embedders import EmbedderDamaged

    settings, result = trained["settings"], trained["result"]
    copy = tmp_path / "data"
    shutil.copytree(settings.data_root / "models", copy / "models")
    damaged = settings.replace(data_root=copy)
    weights = damaged.layout.embedders / result.version / "embedder.pt"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(EmbedderDamaged, match="sha256"):
        load_backbone(result.manifest["name"], embedders=damaged.layout.embedders)
    chosen = pipeline.resolve_embedder(damaged, "random", "current")  # never a dead end
    assert chosen["backbone"] == "random" and "damaged" in chosen["reason"]
    weights.write_bytes(b"short")
    with pytest.raises(EmbedderDamaged, match="bytes"):
        pipeline.resolve_embedder(damaged, "random", result.version)  # asked for by name


@pytest.mark.slow
def test_retraining_follows_label_changes(trained: dict[str, Any]) -> None:
    import pyarrow.parquet as pq

    from imgsim.store import read_catalog, write_catalog

    settings = trained["settings"]
    layout = settings.layout
    same = training_plan(settings, trigger="schedule")
    assert not same["train"] and "trained on" in same["reason"]
    assert training_plan(settings, force=True)["train"]
    rows = read_catalog(layout)
    backup = pq.read_table(layout.catalog)
    try:
        live = [r for r in rows if r["status"] == "live"]
        live[0]["class_id"] = 2 if live[0]["class_id"] != 2 else 3  # relabel 1 of 40: 2.5%
        write_catalog(layout, rows)
        small = training_plan(settings, trigger="asset")
        assert not small["train"] and small["changed"] == 1
        assert training_plan(settings, trigger="schedule")["train"]  # weekly: any change
        for r in live[:5]:
            r["class_id"] = 99  # a new class, 5 of 40 changed
        write_catalog(layout, rows)
        grown = training_plan(settings, trigger="asset")
        assert grown["train"] and grown["new_classes"] == [99]
    finally:
        pq.write_table(backup, layout.catalog)


@pytest.mark.slow
def test_nan_loss_stops_with_its_epoch_and_publishes_nothing(
    sample_dir: Path, tmp_path: Path
) -> None:
    from imgsim.training.train import run_training
    from imgsim.versions.embedders import published_embedders

    settings = build_root(sample_dir, tmp_path / "data", classes=(5, 6))
    config = TrainConfig.from_settings(settings, epochs=2, batch_size=8, publish="always")
    from dataclasses import replace

    with pytest.raises(TrainingDiverged, match="at epoch 1 of 2"):
        run_training(settings, replace(config, temperature=0.0))
    assert published_embedders(settings.layout) == []
    assert not list(settings.layout.runs.glob(".tmp-train-*"))  # the cache file is gone


@pytest.mark.slow
def test_a_run_killed_before_publishing_leaves_nothing(
    sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imgsim.embedding import onnx_runtime
    from imgsim.training.train import run_training
    from imgsim.versions.embedders import current_embedder, published_embedders

    settings = build_root(sample_dir, tmp_path / "data", classes=(7, 8))
    config = TrainConfig.from_settings(settings, epochs=1, batch_size=8, publish="always")

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("killed while exporting")

    monkeypatch.setattr(onnx_runtime, "export_onnx", killed)
    with pytest.raises(KeyboardInterrupt):
        run_training(settings, config)
    layout = settings.layout
    assert published_embedders(layout) == [] and current_embedder(layout) is None
    assert list((layout.embedders / ".staging").iterdir())  # the half-written version
    monkeypatch.undo()
    result = run_training(settings, config)  # the next run cleans it and publishes
    assert published_embedders(layout) == [result.version]
    assert not list((layout.embedders / ".staging").iterdir())


def test_rollback_brings_the_embedder_of_the_version_back(tmp_path: Path) -> None:
    from imgsim.fsutil import atomic_write_json
    from imgsim.versions.embedders import (
        FROZEN,
        current_embedder,
        publish_embedder,
        staging_dir,
    )
    from imgsim.versions.models import record_checksums, rollback

    layout = Settings().replace(data_root=tmp_path).layout
    version = "e20261207T081500Z-3fa9c2"
    staged = staging_dir(layout) / version
    staged.mkdir(parents=True)
    (staged / "embedder.pt").write_bytes(b"weights")
    atomic_write_json(staged / "manifest.json", {"version": version, "base": {"name": "random"}})
    publish_embedder(layout, version)
    for v, backbone in (
        ("v20261201T000000Z-aaaaaa", "random"),
        ("v20261202T000000Z-bbbbbb", f"random@{version}"),
    ):
        d = layout.models / v
        d.mkdir(parents=True)
        (d / "data.bin").write_bytes(b"x")
        atomic_write_json(d / "manifest.json", {"version": v, "backbone": {"name": backbone}})
        record_checksums(d)
    rollback(layout, "v20261201T000000Z-aaaaaa")
    assert current_embedder(layout) is None
    assert (layout.embedders / "CURRENT").read_text().strip() == FROZEN
    rollback(layout, "v20261202T000000Z-bbbbbb")
    assert current_embedder(layout) == version


@pytest.mark.slow
def test_full_mode_trains_every_layer_on_augmented_images(sample_dir: Path, tmp_path: Path) -> None:
    """The GPU path (IMGSIM_DEVICE=cuda picks it), run here on the CPU: every layer learns."""
    import torch

    from imgsim.embedding.backbones import build_embedder_net
    from imgsim.training.train import run_training
    from imgsim.versions.embedders import embedder_dir

    settings = build_root(sample_dir, tmp_path / "data", classes=(9, 10))
    config = TrainConfig.from_settings(
        settings, epochs=1, batch_size=8, publish="always", mode="full", device="cpu"
    )
    result = run_training(settings, config)
    assert result.manifest and result.manifest["mode"] == "full"
    assert result.manifest["frozen_stages"] == "none"
    assert "random-resized crop" in result.manifest["augmentation"]
    trained = torch.load(
        embedder_dir(settings.layout, result.version) / "embedder.pt", weights_only=True
    )
    start = build_embedder_net("random", 512, pretrained=True).state_dict()
    key = "frozen.0.weight"  # conv1: frozen on the CPU path, trained here
    assert not torch.equal(trained[key], start[key])


@pytest.mark.slow
def test_auto_projection_follows_what_was_measured_for_the_embedder(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """An embedder whose vectors did better without LDA (held-out) is indexed without it
    under IMGSIM_PROJECTION=auto; one that did better with it keeps LDA."""
    import shutil

    from imgsim.index import pipeline
    from imgsim.versions.embedders import embedder_dir

    settings, result = trained["settings"], trained["result"]
    copy = settings.replace(data_root=tmp_path / "data")
    shutil.copytree(settings.data_root, copy.data_root)
    name = result.manifest["name"]
    path = embedder_dir(copy.layout, result.version) / "manifest.json"
    for measured, expected in (("none", "none"), ("lda", "auto")):
        manifest = json.loads(path.read_text())
        manifest["projection"] = measured
        path.write_text(json.dumps(manifest))
        assert pipeline.embedder_projection(copy.layout, name) == measured
        plan = pipeline.fit_plan(copy, name, 0, 0.0, full_rebuild=True, projection="auto")
        assert plan["projection"] == expected
        plan = pipeline.fit_plan(copy, name, 0, 0.0, full_rebuild=True, projection="lda")
        assert plan["projection"] == "lda"  # asked for by name: kept
