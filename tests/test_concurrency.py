"""Concurrency: publishes, rollbacks and readers at the same time; a query run pins its version."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
from PIL import Image

from imgsim.config import Layout, Settings
from imgsim.fsutil import read_json, sha256_file
from imgsim.query import run as query
from imgsim.versions import models
from test_models import build_version, make_ids, validate
from test_query import write_neighbours

IDS = make_ids(8)
V1, V2, V3 = ("v20260101T000000Z-000001", "v20260102T000000Z-000002", "v20260103T000000Z-000003")


def stage_and_validate(layout: Layout, version: str) -> None:
    build_version(layout.staging, version, IDS)
    validate(layout, version, IDS, recall_floor=0.5)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_root=tmp_path / "data")
    for v in (V1, V2):
        stage_and_validate(s.layout, v)
        models.publish(s.layout, v)
    return s


def _flip(root: str, rounds: int) -> None:
    layout = Layout(Path(root))
    for i in range(rounds):
        models.rollback(layout, V1 if i % 2 else V2)


def _read(root: str, rounds: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    layout = Layout(Path(root))
    seen = set()
    for _ in range(rounds):
        seen.add(models.current_version(layout))
    out.put(sorted(seen))


def test_rollbacks_and_readers_at_once_never_see_a_partial_pointer(settings: Settings) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    root = str(settings.layout.root)
    procs = [ctx.Process(target=_flip, args=(root, 150)) for _ in range(2)]
    procs += [ctx.Process(target=_read, args=(root, 3000, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    for _ in range(2):
        assert set(results.get(timeout=10)) <= {V1, V2}
    assert models.current_version(settings.layout) in {V1, V2}


def test_a_query_run_answers_with_the_version_it_pinned(settings: Settings) -> None:
    """A publish (or a rollback) between collect and write_results changes nothing for it."""
    layout = settings.layout
    inbox = query.inbox(layout)
    inbox.mkdir(parents=True)
    photo = inbox / "car.jpg"
    Image.new("RGB", (40, 30), (9, 99, 199)).save(photo)
    plan = query.collect(settings, "manual__pinned", [], k=1)
    assert plan["model_version"] == V2
    stage_and_validate(layout, V3)
    models.publish(layout, V3)  # a new version lands mid-run
    models.rollback(layout, V1)  # and someone rolls back mid-run
    run_dir = Path(plan["run_dir"])
    write_neighbours(
        run_dir,
        [
            {
                "query_id": sha256_file(photo),
                "image_id": IDS[0],
                "path": "images/car_ims/000000.jpg",
                "class_id": 1,
                "class_name": "x",
                "distance": 0.1,
                "candidates": 4,
                "rank": 1,
            }
        ],
    )
    query.finalize(settings, str(run_dir))
    results = read_json(run_dir / "results.json")
    assert results["model_version"] == V2
    assert [q["model_version"] for q in results["queries"]] == [V2]
    assert query.ledger_entry(
        layout, V2, sha256_file(layout.queries / "processed" / run_dir.name / "car.jpg")
    ).exists()


def test_two_publishers_of_different_versions_serialize(settings: Settings) -> None:
    layout = settings.layout
    stage_and_validate(layout, V3)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publish, args=(str(layout.root), v)) for v in (V3, V1, V3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert models.current_version(layout) in {V1, V3}
    assert models.published_versions(layout) == [V1, V2, V3]
    assert not list(layout.staging.glob("*"))


def _publish(root: str, version: str) -> None:
    models.publish(Layout(Path(root)), version)
