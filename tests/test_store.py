"""The embedding store (shards per backbone), the snapshot fingerprint and the quarantine."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import imgsim.store as store
from imgsim.config import Layout
from imgsim.fsutil import TMP_PREFIX

BACKBONE = "random"
DIM = 4


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "data")


def vec(*values: float) -> np.ndarray:
    return np.asarray(values, np.float32)


def tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(TMP_PREFIX)]


class FakeClock:
    """Stands in for ``imgsim.store.datetime``: each now() is one second after the last."""

    def __init__(self) -> None:
        self.t = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def now(self, tz: object = None) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


def test_write_shard_then_read_back(layout: Layout) -> None:
    rows = [("b", vec(0, 1, 0, 0)), ("a", vec(1, 0, 0, 0)), ("c", vec(0, 0, 1, 0.5))]

    path = store.write_shard(layout, BACKBONE, "run1", 3, rows, DIM)

    assert path == store.shard_path(layout, BACKBONE, "run1", 3)
    assert path.name == "part-run1-00003.parquet"
    assert path.parent == layout.embeddings(BACKBONE)
    assert store.shard_files(layout, BACKBONE) == [path]
    assert store.embedded_ids(layout, BACKBONE) == {"a", "b", "c"}
    table = pq.read_table(path)
    assert table.column("backbone").to_pylist() == [BACKBONE] * 3
    assert table.column("run_key").to_pylist() == ["run1"] * 3
    assert table.column("shard").to_pylist() == [3] * 3
    assert table.schema.field("vector").type.list_size == DIM

    ids, mat = store.load_vectors(layout, BACKBONE)
    assert ids == ["a", "b", "c"]  # sorted by id
    assert mat.dtype == np.float32
    np.testing.assert_array_equal(mat, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0.5]])

    ids, mat = store.load_vectors(layout, BACKBONE, ids={"c", "zzz"})
    assert ids == ["c"]
    np.testing.assert_array_equal(mat, [[0, 0, 1, 0.5]])
    assert store.embedded_ids(layout, "resnet18") == set()  # other backbone: empty


def test_empty_store_and_empty_shard(layout: Layout) -> None:
    assert store.embedded_ids(layout, BACKBONE) == set()
    ids, mat = store.load_vectors(layout, BACKBONE)
    assert ids == []
    assert mat.shape == (0, 0)

    # A shard where every image was quarantined is written empty and read without error.
    store.write_shard(layout, BACKBONE, "run1", 0, [], DIM)
    store.write_shard(layout, BACKBONE, "run1", 1, [("x", vec(1, 2, 3, 4))], DIM)
    assert store.embedded_ids(layout, BACKBONE) == {"x"}
    ids, mat = store.load_vectors(layout, BACKBONE)
    assert ids == ["x"]
    np.testing.assert_array_equal(mat, [[1, 2, 3, 4]])


def test_newest_row_wins_by_embedded_at_not_file_order(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "datetime", FakeClock())
    # Written first (older), but its file name sorts last.
    store.write_shard(
        layout,
        BACKBONE,
        "zz-run",
        0,
        [("shared", vec(1, 1, 1, 1)), ("only-old", vec(2, 2, 2, 2))],
        DIM,
    )
    # Written second (newer), file name sorts first.
    store.write_shard(layout, BACKBONE, "aa-run", 0, [("shared", vec(9, 9, 9, 9))], DIM)
    assert [p.name for p in store.shard_files(layout, BACKBONE)] == [
        "part-aa-run-00000.parquet",
        "part-zz-run-00000.parquet",
    ]

    ids, mat = store.load_vectors(layout, BACKBONE)

    assert ids == ["only-old", "shared"]
    np.testing.assert_array_equal(mat, [[2, 2, 2, 2], [9, 9, 9, 9]])
    _, only_shared = store.load_vectors(layout, BACKBONE, ids={"shared"})
    np.testing.assert_array_equal(only_shared, [[9, 9, 9, 9]])


def test_newest_row_wins_with_real_clock(layout: Layout) -> None:
    store.write_shard(layout, BACKBONE, "run-b", 0, [("x", vec(1, 0, 0, 0))], DIM)
    first = pq.read_table(store.shard_path(layout, BACKBONE, "run-b", 0)).column("embedded_at")
    store.write_shard(layout, BACKBONE, "run-a", 0, [("x", vec(0, 0, 0, 7))], DIM)
    second = pq.read_table(store.shard_path(layout, BACKBONE, "run-a", 0)).column("embedded_at")
    assert second[0].as_py() > first[0].as_py()

    ids, mat = store.load_vectors(layout, BACKBONE)

    assert ids == ["x"]
    np.testing.assert_array_equal(mat, [[0, 0, 0, 7]])


def test_rewriting_a_shard_replaces_its_file(layout: Layout) -> None:
    store.write_shard(
        layout, BACKBONE, "run1", 0, [("a", vec(1, 0, 0, 0)), ("b", vec(0, 1, 0, 0))], DIM
    )
    # A retry of the same shard (b was quarantined this time).
    store.write_shard(layout, BACKBONE, "run1", 0, [("a", vec(0, 0, 0, 1))], DIM)

    files = store.shard_files(layout, BACKBONE)
    assert len(files) == 1
    assert pq.read_table(files[0]).num_rows == 1
    assert store.embedded_ids(layout, BACKBONE) == {"a"}
    ids, mat = store.load_vectors(layout, BACKBONE)
    assert ids == ["a"]
    np.testing.assert_array_equal(mat, [[0, 0, 0, 1]])
    assert tmp_leftovers(layout.root) == []


def test_tmp_files_in_the_store_are_ignored(layout: Layout) -> None:
    store.write_shard(layout, BACKBONE, "run1", 0, [("a", vec(1, 0, 0, 0))], DIM)
    real = store.shard_path(layout, BACKBONE, "run1", 0)
    # A crashed writer's leftover, as atomic_open names it.
    (real.parent / f"{TMP_PREFIX}part-run2-00000.parquet.xyz").write_bytes(real.read_bytes())

    assert store.shard_files(layout, BACKBONE) == [real]
    assert store.embedded_ids(layout, BACKBONE) == {"a"}


def test_snapshot_fingerprint() -> None:
    ids = ["c" * 64, "a" * 64, "b" * 64]
    fp = store.snapshot_fingerprint(ids)

    assert fp == store.snapshot_fingerprint(reversed(ids))
    assert fp == store.snapshot_fingerprint(set(ids))
    expected = hashlib.sha256("".join(f"{i}\n" for i in sorted(ids)).encode()).hexdigest()
    assert fp == expected
    assert fp != store.snapshot_fingerprint(ids[:2])
    assert fp != store.snapshot_fingerprint([*ids, "d" * 64])
    # Concatenation cannot collide: ids are separated.
    assert store.snapshot_fingerprint(["ab", "c"]) != store.snapshot_fingerprint(["a", "bc"])
    assert store.snapshot_fingerprint([]) == hashlib.sha256(b"").hexdigest()


def test_quarantine_records_and_copies(layout: Layout, tmp_path: Path) -> None:
    src = tmp_path / "src" / "Broken.JPG"
    src.parent.mkdir()
    src.write_bytes(b"not really a jpeg")
    iid = hashlib.sha256(src.read_bytes()).hexdigest()

    rec = store.quarantine(layout, iid, src, "decode_error", "cannot identify image", "run-1")

    assert rec.image_id == iid
    assert rec.source_path == str(src)
    assert rec.reason == "decode_error"
    assert rec.run_key == "run-1"
    copy = layout.quarantine / f"{iid}.jpg"
    assert copy.read_bytes() == b"not really a jpeg"
    assert src.read_bytes() == b"not really a jpeg"  # the original is untouched
    on_disk = json.loads((layout.quarantine / f"{iid}.json").read_text())
    assert on_disk["reason"] == "decode_error"
    assert on_disk["detail"] == "cannot identify image"
    assert datetime.fromisoformat(on_disk["quarantined_at"]).tzinfo is not None

    bad = store.quarantined_ids(layout)
    assert set(bad) == {iid}
    assert bad[iid]["source_path"] == str(src)
    assert tmp_leftovers(layout.root) == []


def test_quarantine_missing_source_and_unreadable_records(layout: Layout, tmp_path: Path) -> None:
    assert store.quarantined_ids(layout) == {}
    store.quarantine(layout, "gone1", tmp_path / "missing.png", "missing", "no file", "r")
    assert not (layout.quarantine / "gone1.png").exists()
    assert set(store.quarantined_ids(layout)) == {"gone1"}

    (layout.quarantine / "junk.json").write_text("{not json")
    (layout.quarantine / f"{TMP_PREFIX}x.json.abc").write_text('{"image_id": "tmp"}')
    assert set(store.quarantined_ids(layout)) == {"gone1"}


def test_catalog_round_trip(layout: Layout) -> None:
    assert store.read_catalog(layout) == []
    row = {
        "image_id": "b",
        "path": "images/x/2.jpg",
        "source": "archive:x",
        "file_name": "2.jpg",
        "class_id": None,
        "class_name": None,
        "size": 10,
        "mtime_ns": 5,
        "first_seen": "2026-01-01",
        "last_seen": "2026-01-02",
        "status": "live",
        "n_paths": 1,
    }
    store.write_catalog(layout, [row, dict(row, image_id="a", class_id=3, class_name="c3")])

    got = store.read_catalog(layout)

    assert [r["image_id"] for r in got] == ["a", "b"]
    assert list(got[0]) == list(store.CATALOG_COLUMNS)
    assert got[0]["class_id"] == 3
    assert got[1]["class_id"] is None
    assert tmp_leftovers(layout.root) == []
