"""The query pipeline's task bodies without Spark: collect, backbone check, finalize."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgsim.config import Layout, Settings
from imgsim.fsutil import atomic_write_text, read_json, sha256_file
from imgsim.query import run as query
from imgsim.query.lookup import BackboneMismatch, load_query_backbone
from jobargs import query_argv
from test_models import build_version, make_ids

VERSION = "v20260101T000000Z-aaaaaa"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_root=tmp_path / "data")
    build_version(s.layout.models, VERSION, make_ids(6))
    atomic_write_text(s.layout.current_pointer, VERSION + "\n")
    return s


def photo(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), colour).save(path, quality=95)
    return path


def test_collect_gathers_inbox_and_params_and_pins_the_version(
    settings: Settings, tmp_path: Path
) -> None:
    layout = settings.layout
    a = photo(query.inbox(layout) / "a.jpg", (200, 0, 0))
    photo(query.inbox(layout) / "a_copy.jpg", (200, 0, 0))  # same bytes as a.jpg
    inside = photo(layout.root / "elsewhere" / "b.jpg", (0, 200, 0))
    outside = photo(tmp_path / "outside" / "c.jpg", (0, 0, 200))
    plan = query.collect(
        settings, "manual__1", [str(inside), str(outside), str(layout.root / "nope.jpg")], k=3
    )
    assert plan["model_version"] == VERSION and plan["k"] == 3 and plan["pending"] == 2
    queries = {
        q["query_name"]: q for q in read_json(Path(plan["run_dir"]) / "queries.json")["queries"]
    }
    assert queries["a.jpg"]["status"] == "pending"
    assert queries["a.jpg"]["query_id"] == sha256_file(a)
    assert queries["a_copy.jpg"]["status"] == "already_answered"
    assert queries["b.jpg"]["status"] == "pending"
    assert queries["c.jpg"]["reason"] == "path_not_allowed"
    assert queries["nope.jpg"]["reason"] == "missing"


def test_collect_with_nothing_to_do_skips(settings: Settings) -> None:
    assert query.collect(settings, "manual__2", [], k=5) == {}


def test_collect_refuses_bad_k_and_unknown_version(settings: Settings) -> None:
    from imgsim.versions.models import VersionNotFound

    with pytest.raises(ValueError, match="k must be"):
        query.collect(settings, "manual__3", [], k=0)
    with pytest.raises(VersionNotFound):
        query.collect(
            settings,
            "manual__3",
            [str(settings.layout.root / "x.jpg")],
            k=5,
            version="v20990101T000000Z-bbbbbb",
        )


def test_a_different_backbone_is_an_error_not_a_wrong_answer() -> None:
    manifest: dict[str, Any] = {
        "version": VERSION,
        "backbone": {
            "name": "random",
            "dim": 512,
            "weights": "other.pth",
            "weights_sha256": "0" * 64,
            "preprocessing": "something else",
        },
    }
    with pytest.raises(BackboneMismatch, match="differs"):
        load_query_backbone(manifest)


def write_neighbours(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """``neighbours/`` as the Spark job writes it (without ``method``, as jobs before it did)."""
    schema = pa.schema([f for f in query.neighbours_schema() if f.name != "method"])
    (run_dir / "neighbours").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), run_dir / "neighbours" / "part-0.parquet"
    )


def test_finalize_writes_results_ledgers_and_empties_the_inbox(settings: Settings) -> None:
    layout: Layout = settings.layout
    a = photo(query.inbox(layout) / "a.jpg", (200, 0, 0))
    bad = query.inbox(layout) / "bad.jpg"
    bad.write_text("not an image")
    plan = query.collect(settings, "manual__4", [], k=2)
    run_dir = Path(plan["run_dir"])
    qfile = read_json(run_dir / "queries.json")
    for q in qfile["queries"]:  # what the embed task would have recorded
        if q["query_name"] == "bad.jpg":
            q.update(status="rejected", reason="not_an_image", detail="not an image")
    from imgsim.fsutil import atomic_write_json

    atomic_write_json(run_dir / "queries.json", qfile)
    qid = sha256_file(a)
    write_neighbours(
        run_dir,
        [
            {
                "query_id": qid,
                "image_id": make_ids(6)[0],
                "path": "images/car_ims/000000.jpg",
                "class_id": 1,
                "class_name": "one",
                "distance": 0.5,
                "candidates": 3,
                "rank": 1,
            }
        ],
    )
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


def test_inbox_photos_of_one_name_in_two_folders_both_survive(settings: Settings) -> None:
    """``inbox/a/x.jpg`` and ``inbox/b/x.jpg`` both leave the inbox, each to its own place
    beside its own answers; a photo replaced during the run stays in the inbox unanswered;
    nothing ever overwrites a file in processed/."""
    layout = settings.layout
    box = query.inbox(layout)
    red = photo(box / "a" / "x.jpg", (200, 0, 0))
    blue = photo(box / "b" / "x.jpg", (0, 0, 200))
    late = photo(box / "late.jpg", (0, 200, 0))
    plan = query.collect(settings, "manual__6", [], k=1)
    run_dir = Path(plan["run_dir"])
    ids = {q["query_path"]: q["query_id"] for q in read_json(run_dir / "queries.json")["queries"]}
    red_id, blue_id = ids[str(red.absolute())], ids[str(blue.absolute())]
    write_neighbours(
        run_dir,
        [
            {
                "query_id": qid,
                "image_id": make_ids(6)[i],
                "path": f"images/car_ims/00000{i}.jpg",
                "class_id": i,
                "class_name": None,
                "distance": 0.1,
                "candidates": 6,
                "rank": 1,
            }
            for i, qid in enumerate([red_id, blue_id, ids[str(late.absolute())]])
        ],
    )
    photo(late, (0, 199, 0))  # replaced in the inbox while the run answers the first one
    taken = layout.queries / "processed" / run_dir.name / "a" / "x.jpg"
    photo(taken, (9, 9, 9))  # a file already there is never replaced
    taken_bytes = taken.read_bytes()
    query.finalize(settings, str(run_dir))

    results = {q["query_path"]: q for q in read_json(run_dir / "results.json")["queries"]}
    red_copy = Path(results[str(red.absolute())]["query_copy"])
    blue_copy = Path(results[str(blue.absolute())]["query_copy"])
    assert blue_copy == layout.queries / "processed" / run_dir.name / "b" / "x.jpg"
    assert red_copy == taken.with_name("x.1.jpg") and taken.read_bytes() == taken_bytes
    assert sha256_file(red_copy) == red_id and sha256_file(blue_copy) == blue_id
    assert results[str(red.absolute())]["neighbours"][0]["image_id"] == make_ids(6)[0]
    assert results[str(blue.absolute())]["neighbours"][0]["image_id"] == make_ids(6)[1]
    assert not red.exists() and not blue.exists()
    assert late.exists() and "query_copy" not in results[str(late.absolute())]
    assert "replaced in the inbox" in results[str(late.absolute())]["note"]
    assert results[str(late.absolute())]["picture_gone"]  # no picture of other bytes
    again = query.collect(settings, "manual__7", [], k=1)  # the next run answers the new bytes
    assert again["pending"] == 1


# -- a damaged version (issue 13 item 7) ---------------------------------------------------------


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A version published by models.publish (so its manifest records its files), CURRENT."""
    from imgsim.versions import models
    from test_models import stage, validate, version_at

    s = Settings(data_root=(tmp_path / "data").resolve())
    v = version_at(0)
    ids = make_ids(300)  # a reference file whose middle is vector data, as in the issue
    stage(s.layout, v, ids)
    validate(s.layout, v, ids)
    models.publish(s.layout, v)
    monkeypatch.setenv("IMGSIM_DATA_ROOT", str(s.data_root))
    return s


def damage(settings: Settings, *, truncate: bool = False) -> tuple[str, str]:
    """The issue's fault (64 bytes overwritten mid-file) or a truncation, in the CURRENT
    version's reference table; returns (version, the file relative to the version)."""
    from imgsim.versions.models import current_version
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
    published: Settings,
) -> None:
    from imgsim.query.lookup import load_model
    from imgsim.versions.models import VersionDamaged

    assert load_model(published.layout).ids  # intact: loads
    version, rel = damage(published)
    with pytest.raises(VersionDamaged) as err:
        load_model(published.layout)
    assert_names_damage(str(err.value), version, rel)


def test_imgsim_query_on_a_damaged_version_is_a_clear_error(
    published: Settings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from imgsim import cli

    version, rel = damage(published)
    image = photo(tmp_path / "q.jpg", (10, 120, 200))
    assert cli.main(["query", str(image), "-k", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgsim: error: model version ")
    assert_names_damage(err, version, rel)


def test_collect_refuses_a_damaged_version(published: Settings) -> None:
    from imgsim.versions.models import VersionDamaged

    version, rel = damage(published, truncate=True)
    with pytest.raises(VersionDamaged) as err:
        query.collect(published, "manual__6", [str(published.layout.root / "x.jpg")], k=3)
    assert_names_damage(str(err.value), version, rel)


def test_the_spark_query_job_checks_sizes_before_spark_starts(
    published: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from imgsim.jobs import query_lsh
    from imgsim.versions.models import VersionDamaged

    class NoSpark:
        class builder:
            @staticmethod
            def appName(name: str) -> Any:
                raise AssertionError("Spark started on a damaged version")

    monkeypatch.setattr(query_lsh, "SparkSession", NoSpark)
    version, rel = damage(published, truncate=True)
    with pytest.raises(VersionDamaged) as err:
        query_lsh.main(query_argv(published.data_root, version, tmp_path / "run", "--k 3"))
    assert_names_damage(str(err.value), version, rel)


# -- small runs without a JVM (issue 15 item 7) --------------------------------------------------

NEIGHBOUR_COLUMNS = [
    "query_id",
    "rank",
    "image_id",
    "path",
    "class_id",
    "class_name",
    "distance",
    "candidates",
    "method",
]


def test_choose_engine_answers_up_to_the_threshold_in_process() -> None:
    assert query.choose_engine(0, 0) == "local"  # nothing to answer: no JVM either
    assert query.choose_engine(1, 0) == "spark"
    assert query.choose_engine(200, 200) == "local"
    assert query.choose_engine(201, 200) == "spark"
    with pytest.raises(ValueError, match="must be >= 0"):
        query.choose_engine(3, -1)


def fake_embedding(monkeypatch: pytest.MonkeyPatch, dim: int = 6) -> dict[str, Any]:
    """The embed task's backbone replaced by fixed vectors per file (build_version's 6-d
    space); returns {path: vector}."""
    import numpy as np

    import imgsim.query.lookup

    made: dict[str, Any] = {}

    def embed_files(backbone: Any, paths: list[Path], **_: Any) -> tuple[dict, dict]:
        rng = np.random.default_rng(len(made))
        for p in paths:
            made[str(p)] = rng.normal(size=dim).astype(np.float32)
        return {str(p): made[str(p)] for p in paths}, {}

    monkeypatch.setattr(imgsim.query.lookup, "load_query_backbone", lambda *a, **k: object())
    monkeypatch.setattr(imgsim.query.lookup, "embed_files", embed_files)
    return made


@pytest.mark.parametrize("expansion", [0, 1], ids=["plain", "expanded"])
def test_a_small_run_is_answered_in_the_embed_task_as_lookup_answers(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, expansion: int
) -> None:
    import numpy as np

    from imgsim.query.lookup import load_model, lookup

    settings = settings.replace(query_expansion=expansion)
    layout = settings.layout
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
    paths = [photo(query.inbox(layout) / f"q{i}.jpg", c) for i, c in enumerate(colours)]
    made = fake_embedding(monkeypatch)
    plan = query.collect(settings, "manual__7", [], k=5)
    assert plan["query_expansion"] == expansion
    out = query.embed_and_route(settings, plan["run_dir"])
    assert out["engine"] == "local" and out["embedded"] == 4
    run_dir = Path(plan["run_dir"])
    assert read_json(run_dir / "queries.json")["engine"] == "local"

    table = pq.read_table(run_dir / "neighbours")
    assert sorted(table.column_names) == sorted(NEIGHBOUR_COLUMNS)
    types = {f.name: str(f.type) for f in table.schema}
    assert types == {
        "query_id": "string",
        "rank": "int32",
        "image_id": "string",
        "path": "string",
        "class_id": "int32",
        "class_name": "string",
        "distance": "double",
        "candidates": "int64",
        "method": "string",
    }
    # What the in-process twin answers for the same (unit) vectors, k and expansion.
    ids = [sha256_file(p) for p in paths]
    vectors = np.stack([made[str(p.absolute())] for p in paths])
    answers = lookup(load_model(layout, VERSION), vectors, 5, expansion)
    rows = table.to_pylist()
    for qid, ans in zip(ids, answers, strict=True):
        mine = sorted((r for r in rows if r["query_id"] == qid), key=lambda r: r["rank"])
        assert [
            (r["rank"], r["image_id"], r["path"], r["class_id"], r["class_name"]) for r in mine
        ] == [(n.rank, n.image_id, n.path, n.class_id, n.class_name) for n in ans.neighbours]
        assert [r["distance"] for r in mine] == pytest.approx(
            [n.distance for n in ans.neighbours], abs=1e-6
        )
        assert {(r["candidates"], r["method"]) for r in mine} == {(ans.candidates, ans.method)}
        assert len(mine) == 5  # widened or exact when the LSH finds few
    assert len(rows) == 20

    done = query.finalize(settings, plan["run_dir"])
    assert done["engine"] == "local" and done["answered"] == 4
    results = read_json(run_dir / "results.json")
    assert results["engine"] == "local"
    by_id = {q["query_id"]: q for q in results["queries"]}
    for qid, ans in zip(ids, answers, strict=True):
        assert [n["image_id"] for n in by_id[qid]["neighbours"]] == [
            n.image_id for n in ans.neighbours
        ]
        assert by_id[qid]["method"] == ans.method


def test_a_large_run_is_left_to_the_spark_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.replace(query_local_max=1)
    layout = settings.layout
    for i, c in enumerate([(200, 0, 0), (0, 200, 0)]):
        photo(query.inbox(layout) / f"q{i}.jpg", c)
    fake_embedding(monkeypatch)
    plan = query.collect(settings, "manual__8", [], k=2)
    out = query.embed_and_route(settings, plan["run_dir"])
    run_dir = Path(plan["run_dir"])
    assert out["engine"] == "spark" and out["embedded"] == 2
    assert read_json(run_dir / "queries.json")["engine"] == "spark"
    assert not (run_dir / "neighbours").exists()  # the job's to write
    write_neighbours(run_dir, [])  # what a job with no rows leaves
    done = query.finalize(settings, plan["run_dir"])
    assert done["engine"] == "spark"
    assert read_json(run_dir / "results.json")["engine"] == "spark"


def test_a_query_without_neighbours_gets_the_jobs_null_row(tmp_path: Path) -> None:
    from imgsim.query.lookup import Answer, Neighbour

    answers = [
        Answer([], 0, "exact"),
        Answer([Neighbour(1, "r1", "images/a.jpg", None, None, 0.25)], 3, "lsh"),
    ]
    table = query.neighbours_table(["q0", "q1"], answers)
    assert table.column_names == NEIGHBOUR_COLUMNS
    assert table.to_pylist() == [
        {
            "query_id": "q0",
            "rank": None,
            "image_id": None,
            "path": None,
            "class_id": None,
            "class_name": None,
            "distance": None,
            "candidates": 0,
            "method": "exact",
        },
        {
            "query_id": "q1",
            "rank": 1,
            "image_id": "r1",
            "path": "images/a.jpg",
            "class_id": None,
            "class_name": None,
            "distance": 0.25,
            "candidates": 3,
            "method": "lsh",
        },
    ]
    with pytest.raises(ValueError, match="2 query ids but 1 answers"):
        query.neighbours_table(["q0", "q1"], answers[:1])
    # Written as a Parquet directory that replaces an older one only when complete.
    target = tmp_path / "run" / "neighbours"
    query.write_neighbours(query.neighbours_table(["q0"], answers[:1]), target)
    query.write_neighbours(table, target)
    assert pq.read_table(target).num_rows == 2
    assert [p.name for p in target.parent.iterdir()] == ["neighbours"]
    neighbours, counts = query.read_neighbours(target.parent)
    assert counts == {"q0": 0, "q1": 3} and [r["image_id"] for r in neighbours["q1"]] == ["r1"]


def test_the_spark_query_job_passes_query_expansion_on(
    published: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DAG hands --expansion to spark_jobs/query_lsh.py; main() must search with it."""

    from imgsim.jobs import query_lsh
    from imgsim.versions.models import current_version

    class FakeSpark:
        def stop(self) -> None:
            pass

    class Builder:
        @staticmethod
        def appName(name: str) -> Any:
            return Builder

        @staticmethod
        def getOrCreate() -> FakeSpark:
            return FakeSpark()

    class Answered(Exception):
        pass

    seen: dict[str, Any] = {}

    def answer(
        spark: Any,
        root: Path,
        version: str,
        run_dir: Path,
        k: int,
        expansion: int = 0,
        scan: Any = None,
    ) -> Any:
        seen.update(k=k, expansion=expansion, scan=scan)
        raise Answered

    monkeypatch.setattr(query_lsh.SparkSession, "builder", Builder)
    monkeypatch.setattr(query_lsh, "answer", answer)
    version = current_version(published.layout)
    assert version
    with pytest.raises(Answered):
        flags = "--k 3 --expansion 2 --scan-share 0.5 --scan-below 7"
        query_lsh.main(query_argv(published.data_root, version, tmp_path / "run", flags))
    assert seen == {"k": 3, "expansion": 2, "scan": (0.5, 7)}


@pytest.mark.parametrize("kind", ["backbone", "onnx"])
def test_imgsim_query_says_a_backbone_or_onnx_error_in_one_line(
    settings: Settings,
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A version built with another backbone, or an ONNX model that ONNX Runtime cannot load:
    ``imgsim query`` prints one line and exits 2, never a traceback."""
    from imgsim import cli
    from imgsim.embedding.onnx_runtime import open_runner
    from imgsim.query import lookup

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")

    def load(*args: Any, **kwargs: Any) -> Any:
        if kind == "backbone":
            raise BackboneMismatch("the version's backbone differs from this one's")
        return open_runner(broken)  # ONNX Runtime's own error, turned into one line

    monkeypatch.setenv("IMGSIM_DATA_ROOT", str(settings.data_root))
    monkeypatch.setattr(lookup.Searcher, "load", load)
    image = photo(tmp_path / "q.jpg", (10, 120, 200))
    assert cli.main(["query", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgsim: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert ("backbone differs" if kind == "backbone" else f"cannot load {broken}") in err


def test_the_query_side_runs_on_imgsim_num_threads(settings: Settings) -> None:
    """IMGSIM_NUM_THREADS reaches the CLI's, the upload's and the query DAG's backbone (they
    all load it through lookup.query_backbone)."""
    import torch

    from imgsim.query.lookup import query_backbone

    before = torch.get_num_threads()
    try:
        manifest = {
            "version": VERSION,
            "backbone": {
                "name": "random",
                "dim": 512,
                "weights": "random(seed=0)",
                "weights_sha256": "",
            },
        }
        with contextlib.suppress(BackboneMismatch):  # the spec check comes after the threads
            query_backbone(settings.replace(num_threads=1), manifest)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
