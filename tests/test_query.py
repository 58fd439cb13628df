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
    assert answered["note"].startswith("only 1 of 2 neighbours were found")
    assert answered["method"] == "lsh"
    assert (run_dir / "contact_sheet.png").exists() and (run_dir / "gallery.html").exists()
    assert query.ledger_entry(layout, VERSION, qid).exists()
    assert list(query.inbox(layout).iterdir()) == []
    assert (layout.queries / "processed" / run_dir.name / "a.jpg").exists()
    assert (layout.queries / "rejected" / run_dir.name / "bad.jpg").exists()
    # The same photo again: already answered by this version, not answered twice.
    photo(query.inbox(layout) / "again.jpg", (200, 0, 0))
    again = query.collect(settings, "manual__5", [], k=2)
    assert again["pending"] == 0


# -- a damaged version (issue 13 item 7) ---------------------------------------------------------

@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A version published by models.publish (so its manifest records its files), CURRENT."""
    from imgsim import models
    from test_models import stage, validate, version_at

    s = replace(Settings(), data_root=(tmp_path / "data").resolve())
    v = version_at(0)
    ids = make_ids(300)        # a reference file whose middle is vector data, as in the issue
    stage(s.layout, v, ids)
    validate(s.layout, v, ids)
    models.publish(s.layout, v)
    monkeypatch.setenv("IMGSIM_DATA_ROOT", str(s.data_root))
    return s


def damage(settings: Settings, *, truncate: bool = False) -> tuple[str, str]:
    """The issue's fault (64 bytes overwritten mid-file) or a truncation, in the CURRENT
    version's reference table; returns (version, the file relative to the version)."""
    from imgsim.models import current_version
    from test_models import overwrite_middle, reference_part

    version = current_version(settings.layout)
    assert version
    part = reference_part(settings.layout, version)
    if truncate:
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    else:
        overwrite_middle(part)
    return version, part.relative_to(settings.layout.models / version).as_posix()


def assert_names_damage(message: str, version: str, rel: str) -> None:
    assert version in message and rel in message and "imgsim rollback" in message, message
    assert "Traceback" not in message and "snappy" not in message.lower(), message


def test_in_process_lookup_of_a_damaged_version_names_version_file_and_rollback(
        published: Settings) -> None:
    from imgsim.lookup import load_model
    from imgsim.models import VersionDamaged

    assert load_model(published.layout).ids                  # intact: loads
    version, rel = damage(published)
    with pytest.raises(VersionDamaged) as err:
        load_model(published.layout)
    assert_names_damage(str(err.value), version, rel)


def test_imgsim_query_on_a_damaged_version_is_a_clear_error(published: Settings,
                                                            capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    from imgsim import cli

    version, rel = damage(published)
    image = photo(tmp_path / "q.jpg", (10, 120, 200))
    assert cli.main(["query", str(image), "-k", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgsim: error: model version ")
    assert_names_damage(err, version, rel)


def test_collect_refuses_a_damaged_version(published: Settings) -> None:
    from imgsim.models import VersionDamaged

    version, rel = damage(published, truncate=True)
    with pytest.raises(VersionDamaged) as err:
        query.collect(published, "manual__6", [str(published.layout.root / "x.jpg")], k=3)
    assert_names_damage(str(err.value), version, rel)


def test_the_spark_query_job_checks_sizes_before_spark_starts(
        published: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from imgsim.models import VersionDamaged

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spark_jobs"))
    import query_lsh

    class NoSpark:
        class builder:
            @staticmethod
            def appName(name: str) -> Any:
                raise AssertionError("Spark started on a damaged version")

    monkeypatch.setattr(query_lsh, "SparkSession", NoSpark)
    version, rel = damage(published, truncate=True)
    with pytest.raises(VersionDamaged) as err:
        query_lsh.main(["--data-root", str(published.data_root), "--version", version,
                        "--run-dir", str(tmp_path / "run"), "--k", "3"])
    assert_names_damage(str(err.value), version, rel)
