"""The query pipeline's task bodies without Spark: collect, backbone check, finalize."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgsim import query
from imgsim.config import Layout, Settings
from imgsim.fsutil import atomic_write_text, read_json, sha256_file
from imgsim.lookup import BackboneMismatch, load_query_backbone
from test_models import build_version, make_ids

VERSION = "v20260101T000000Z-aaaaaa"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = replace(Settings(), data_root=tmp_path / "data")
    build_version(s.layout.models, VERSION, make_ids(6))
    atomic_write_text(s.layout.current_pointer, VERSION + "\n")
    return s


def photo(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path, quality=95)
    return path


def test_collect_gathers_inbox_and_params_and_pins_the_version(settings: Settings,
                                                               tmp_path: Path) -> None:
    layout = settings.layout
    a = photo(query.inbox(layout) / "a.jpg", (200, 0, 0))
    photo(query.inbox(layout) / "a_copy.jpg", (200, 0, 0))        # same bytes as a.jpg
    inside = photo(layout.root / "elsewhere" / "b.jpg", (0, 200, 0))
    outside = photo(tmp_path / "outside" / "c.jpg", (0, 0, 200))
    plan = query.collect(settings, "manual__1", [str(inside), str(outside),
                                                 str(layout.root / "nope.jpg")], k=3)
    assert plan["model_version"] == VERSION and plan["k"] == 3 and plan["pending"] == 2
    queries = {q["query_name"]: q for q in read_json(Path(plan["run_dir"]) / "queries.json")
               ["queries"]}
    assert queries["a.jpg"]["status"] == "pending"
    assert queries["a.jpg"]["query_id"] == sha256_file(a)
    assert queries["a_copy.jpg"]["status"] == "already_answered"
    assert queries["b.jpg"]["status"] == "pending"
    assert queries["c.jpg"]["reason"] == "path_not_allowed"
    assert queries["nope.jpg"]["reason"] == "missing"


def test_collect_with_nothing_to_do_skips(settings: Settings) -> None:
    assert query.collect(settings, "manual__2", [], k=5) == {}


def test_collect_refuses_bad_k_and_unknown_version(settings: Settings) -> None:
    from imgsim.models import VersionNotFound

    with pytest.raises(ValueError, match="k must be"):
        query.collect(settings, "manual__3", [], k=0)
    with pytest.raises(VersionNotFound):
        query.collect(settings, "manual__3", [str(settings.layout.root / "x.jpg")], k=5,
                      version="v20990101T000000Z-bbbbbb")


def test_a_different_backbone_is_an_error_not_a_wrong_answer() -> None:
    manifest: dict[str, Any] = {"version": VERSION,
                                "backbone": {"name": "random", "dim": 512, "weights": "other.pth",
                                             "weights_sha256": "0" * 64,
                                             "preprocessing": "something else"}}
    with pytest.raises(BackboneMismatch, match="differs"):
        load_query_backbone(manifest)


def write_neighbours(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    schema = pa.schema([("query_id", pa.string()), ("image_id", pa.string()),
                        ("path", pa.string()), ("class_id", pa.int32()),
                        ("class_name", pa.string()), ("distance", pa.float64()),
                        ("candidates", pa.int64()), ("rank", pa.int32())])
    (run_dir / "neighbours").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema),
                   run_dir / "neighbours" / "part-0.parquet")


def test_finalize_writes_results_ledgers_and_empties_the_inbox(settings: Settings) -> None:
    layout: Layout = settings.layout
    a = photo(query.inbox(layout) / "a.jpg", (200, 0, 0))
    bad = query.inbox(layout) / "bad.jpg"
    bad.write_text("not an image")
    plan = query.collect(settings, "manual__4", [], k=2)
    run_dir = Path(plan["run_dir"])
    qfile = read_json(run_dir / "queries.json")
    for q in qfile["queries"]:                 # what the embed task would have recorded
        if q["query_name"] == "bad.jpg":
            q.update(status="rejected", reason="not_an_image", detail="not an image")
    from imgsim.fsutil import atomic_write_json

    atomic_write_json(run_dir / "queries.json", qfile)
    qid = sha256_file(a)
    write_neighbours(run_dir, [{"query_id": qid, "image_id": make_ids(6)[0],
                                "path": "images/car_ims/000000.jpg", "class_id": 1,
                                "class_name": "one", "distance": 0.5, "candidates": 3,
                                "rank": 1}])
    out = query.finalize(settings, str(run_dir))
    assert out["answered"] == 1 and out["rejected"] == 1
    results = read_json(run_dir / "results.json")
    answered = next(q for q in results["queries"] if q["query_name"] == "a.jpg")
    assert answered["model_version"] == VERSION and answered["found"] == 1
    assert answered["note"].startswith("LSH returned 1 of 2")
    assert (run_dir / "contact_sheet.png").exists() and (run_dir / "gallery.html").exists()
    assert query.ledger_entry(layout, VERSION, qid).exists()
    assert list(query.inbox(layout).iterdir()) == []
    assert (layout.queries / "processed" / run_dir.name / "a.jpg").exists()
    assert (layout.queries / "rejected" / run_dir.name / "bad.jpg").exists()
    # The same photo again: already answered by this version, not answered twice.
    photo(query.inbox(layout) / "again.jpg", (200, 0, 0))
    again = query.collect(settings, "manual__5", [], k=2)
    assert again["pending"] == 0
