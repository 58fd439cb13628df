"""An index run keeps CURRENT's projection while the references change little
(imgsim.index.pipeline.reusable_projection, learn_projection)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgsim.ann.projection import Projection, read_choice
from imgsim.config import Layout, Settings
from imgsim.fsutil import atomic_write_json, read_json
from imgsim.index import pipeline
from imgsim.store import write_catalog
from imgsim.versions.models import record_checksums
from test_fit_job import make_store

VERSION = "v20260101T000000Z-00c0de"


def published_with_projection(root: Path, learned_on: int) -> tuple[Layout, Settings]:
    """A store of 400 images and a CURRENT version whose LDA was learned on the first
    ``learned_on`` of them (classes k % 7)."""
    layout = make_store(root, n=400, dim=16, gone=0)
    settings = Settings(data_root=root)
    where = layout.models / VERSION
    proj = Projection("lda", np.zeros(16), np.random.default_rng(0).normal(size=(16, 6)), {})
    entry = {**proj.save(where / "projection"), "requested": "lda", "reason": "learned"}
    ids = [f"{i:064x}" for i in range(learned_on)]
    pq.write_table(
        pa.table({"image_id": ids, "class_id": [k % 7 for k in range(learned_on)]}),
        where / "reference.parquet",
    )
    atomic_write_json(
        where / "manifest.json",
        {
            "version": VERSION,
            "backbone": read_json(layout.backbone_record("random")),
            "projection": entry,
            "fit_settings": {
                "projection": "lda",
                "projection_min_coverage": settings.projection_min_coverage,
                "seed": settings.lsh_seed,
            },
            "files": {"reference": "reference.parquet", "projection": entry["file"]},
            "snapshot": {"fingerprint": "-"},
            "counts": {"indexed": learned_on},
        },
    )
    record_checksums(where)  # as publish does
    layout.current_pointer.write_text(VERSION + "\n")
    return layout, settings


def plan_of(settings: Settings, out: Path) -> dict:
    return {
        "backbone": "random",
        "projection": "lda",
        "projection_min_coverage": settings.projection_min_coverage,
        "seed": settings.lsh_seed,
        "projection_dir": str(out),
        "expected_count": 400,
    }


def test_a_small_change_keeps_currents_projection(tmp_path: Path) -> None:
    layout, settings = published_with_projection(tmp_path / "data", learned_on=390)
    summary = pipeline.learn_projection(settings, plan_of(settings, tmp_path / "out"))
    assert summary["engine"] == "kept" and summary["learned_anew_because"] is None
    assert summary["kept"] == {
        "from": VERSION,
        "previous": VERSION,
        "learned_on": 390,
        "changed": 10,  # 10 new of 390: under 5%
        "refresh": 0.05,
    }
    entry, proj = read_choice(tmp_path / "out")  # the sha256 of the copy checks out
    assert entry["kind"] == "lda" and entry["reason"] == "learned" and proj is not None
    saved = np.load(layout.models / VERSION / "projection" / "projection.npz")
    assert np.array_equal(proj.matrix, saved["matrix"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("many", "30 references added or gone since it was learned on 370: more than"),
        ("relabel", "1 references were relabelled since"),
        ("new class", "1 classes new since"),
        ("refresh 0", "IMGSIM_PROJECTION_REFRESH is 0: learned anew every run"),
        ("settings", "the projection settings changed since"),
        ("damaged", f"{VERSION} is damaged: reference.parquet has 14 bytes"),
        ("altered", f"{VERSION} is damaged: projection/projection.npz has been altered"),
        ("no file", f"{VERSION} is damaged: projection/projection.npz is missing"),
        ("full rebuild", "a full rebuild was asked for"),
        ("no base", "CURRENT cannot be built on: v"),
    ],
)
def test_the_projection_is_learned_anew_when(tmp_path: Path, change: str, reason: str) -> None:
    layout, settings = published_with_projection(
        tmp_path / "data", learned_on=370 if change == "many" else 395
    )
    plan = plan_of(settings, tmp_path / "out")
    if change in ("relabel", "new class"):
        rows = pq.read_table(layout.catalog).to_pylist()
        target = 3 if change == "relabel" else 398  # a kept image, or a new one
        rows[target]["class_id"] = 99
        write_catalog(layout, rows)
    if change == "refresh 0":
        settings = Settings(data_root=tmp_path / "data", projection_refresh=0.0)
    if change == "settings":
        plan["projection_min_coverage"] = 0.9
    if change == "full rebuild":  # with other reasons beside it (fit_plan keeps them all)
        plan["refit_because"] = ["labels changed", "full rebuild"]
    if change == "damaged":
        (layout.models / VERSION / "reference.parquet").write_bytes(b"PAR1 truncated")
    if change == "no file":
        (layout.models / VERSION / "projection" / "projection.npz").unlink()
    if change == "altered":  # the same size, one byte changed: only its sha256 tells
        npz = layout.models / VERSION / "projection" / "projection.npz"
        data = bytearray(npz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        npz.write_bytes(bytes(data))
    if change == "no base":  # the fit plan found CURRENT damaged: nothing of it is reused
        plan.update(base="none", base_reason=f"CURRENT cannot be built on: {VERSION} is damaged")
    got = pipeline.reusable_projection(settings, plan)
    assert isinstance(got, str) and got.startswith(reason)


def test_currents_graph_is_updated_only_in_its_own_space(tmp_path: Path) -> None:
    from imgsim.jobs.bases import previous_graph, space_fingerprint

    layout, _ = published_with_projection(tmp_path / "data", learned_on=395)
    where = layout.models / VERSION
    manifest = read_json(where / "manifest.json")
    (where / "neighbours").mkdir()
    manifest["neighbours"] = {"k": 10, "method": "scan: exact"}
    manifest["files"]["neighbours"] = "neighbours"
    atomic_write_json(where / "manifest.json", manifest)
    record_checksums(where)
    backbone = manifest["backbone"]
    space = space_fingerprint(where, "projection/projection.npz")
    got = previous_graph(layout, 10, backbone, space)
    assert isinstance(got, dict) and got["method"] == "scan" and got["version"] == VERSION
    # the same arrays saved again (new zip timestamps): the same space
    proj = Projection(
        "lda", np.zeros(16), np.load(where / "projection/projection.npz")["matrix"], {}
    )
    proj.save(tmp_path / "again" / "projection")
    assert space_fingerprint(tmp_path / "again", "projection/projection.npz") == space
    assert previous_graph(layout, 10, backbone, "none").startswith("the search space changed")
    assert previous_graph(layout, 5, backbone, space) == f"k changed (10 in {VERSION}, now 5)"
    assert previous_graph(layout, 10, {"name": "x"}, space).startswith("the backbone changed")
    # the fit plan's choice holds: no base, or a named one
    assert previous_graph(layout, 10, backbone, space, "none").startswith(
        "the fit plan builds in full"
    )
    assert previous_graph(layout, 10, backbone, space, VERSION)["version"] == VERSION
    # a damaged graph or projection in the base never blocks the new fit: it is built in full
    (where / "neighbours" / "part-0.parquet").write_bytes(b"x")  # not recorded at publish
    assert "was not part of the version" in previous_graph(layout, 10, backbone, space)
    (where / "neighbours" / "part-0.parquet").unlink()
    (where / "projection/projection.npz").write_bytes(b"not an npz")
    got = previous_graph(layout, 10, backbone, space)
    assert got.startswith(f"no base to update: {VERSION} is damaged: projection/projection.npz")


def test_currents_map_is_built_on_only_in_its_own_space_and_as_recorded(tmp_path: Path) -> None:
    """The base's stored map takes the new references in its search space only; a map file
    whose bytes differ from those recorded at publish means a new layout, never a dead end."""
    from imgsim.ann.layout import MAP_FILE, write_map
    from imgsim.jobs.bases import previous_map, space_fingerprint

    layout, _ = published_with_projection(tmp_path / "data", learned_on=395)
    where = layout.models / VERSION
    manifest = read_json(where / "manifest.json")
    backbone = manifest["backbone"]
    space = space_fingerprint(where, "projection/projection.npz")
    assert previous_map(layout, backbone, space) == f"{VERSION} has no stored map"
    ids = [f"{i:064x}" for i in range(20)]
    write_map(where / MAP_FILE, ids, np.arange(40.0).reshape(20, 2), np.zeros(20, bool))
    manifest["map"] = {"points": 20, "laid_out_in": VERSION}
    manifest["files"]["map"] = MAP_FILE
    atomic_write_json(where / "manifest.json", manifest)
    record_checksums(where)
    got = previous_map(layout, backbone, space)
    assert isinstance(got, dict) and got["version"] == VERSION
    assert got["file"] == where / MAP_FILE and got["entry"]["points"] == 20
    assert previous_map(layout, backbone, "none").startswith("the search space changed")
    assert previous_map(layout, {"name": "x"}, space).startswith("the backbone changed")
    assert previous_map(layout, backbone, space, "none").startswith("the fit plan builds in full")
    data = bytearray((where / MAP_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte: only the sha256 tells
    (where / MAP_FILE).write_bytes(bytes(data))
    got = previous_map(layout, backbone, space)
    assert got.startswith(f"no base to update: {VERSION} is damaged: {MAP_FILE} has been altered")
