"""The catalog: ids by content, incremental re-hashing, daily drops, gone images, what to embed."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgsim.catalog as catalog
from imgsim.catalog import GONE, LIVE, CatalogDiff, Source, incoming_source, update_catalog
from imgsim.config import Layout
from imgsim.fsutil import TMP_PREFIX
from imgsim.sources.labels import LabelRecord
from imgsim.store import quarantine, read_catalog, write_shard

BACKBONE = "random"
DAY1, DAY2, DAY3, DAY4 = "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05"


def jpeg_bytes(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A small JPEG whose pixels (hence bytes) depend on ``seed``."""
    pixels = np.random.default_rng(seed).integers(
        0, 256, size=(size[1], size[0], 3), dtype=np.uint8
    )
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_image(path: Path, seed: int) -> str:
    """Write a JPEG at ``path`` and return its expected image id (sha256 of the bytes)."""
    data = jpeg_bytes(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def bump_mtime(path: Path, seconds: int = 10) -> None:
    """Move the mtime on, so a rewrite is visible even on coarse-mtime filesystems."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 1_000_000_000))


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "data")


@pytest.fixture
def archive(layout: Layout) -> Path:
    return layout.images / "car_ims"


LABELS = {
    "000001.jpg": LabelRecord("000001.jpg", 1, "AM General Hummer SUV 2000"),
    "000002.jpg": LabelRecord("000002.jpg", 2, "Acura RL Sedan 2012"),
}


def sources(layout: Layout, archive: Path, day: str) -> list[Source]:
    """What the pipeline scans for ``day``: the archive, plus ``incoming/<day>/`` if present."""
    out = [Source("archive:car_ims", archive, LABELS)]
    daily = incoming_source(layout, day)
    if daily is not None:
        out.append(daily)
    return out


def run(layout: Layout, archive: Path, day: str, **kwargs: bool) -> CatalogDiff:
    return update_catalog(layout, sources(layout, archive, day), day, BACKBONE, **kwargs)


def rows_by_id(layout: Layout) -> dict[str, dict[str, object]]:
    return {r["image_id"]: r for r in read_catalog(layout)}


def live_ids(layout: Layout) -> set[str]:
    return {iid for iid, r in rows_by_id(layout).items() if r["status"] == LIVE}


def embed_all(layout: Layout, diff: CatalogDiff, run_key: str = "run1") -> None:
    """Pretend the embed step ran for everything in ``diff.to_embed``."""
    rows = [(item["image_id"], np.ones(4, np.float32)) for item in diff.to_embed]
    write_shard(layout, BACKBONE, run_key, 0, rows, 4)


@pytest.fixture
def counting_sha(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every file update_catalog hashes."""
    calls: list[Path] = []
    real: Callable[[Path], str] = catalog.sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(catalog, "sha256_file", counting)
    return calls


# -- first and repeated runs --------------------------------------------------------------------


def test_first_run_catalogs_everything(layout: Layout, archive: Path) -> None:
    ids = {
        name: write_image(archive / name, seed)
        for seed, name in enumerate(["000001.jpg", "000002.jpg", "000003.jpg"])
    }
    ids["new.jpg"] = write_image(layout.incoming_day(DAY1) / "new.jpg", 99)

    diff = run(layout, archive, DAY1)

    assert diff.live == 4
    assert diff.new_images == 4
    assert diff.gone == 0
    assert diff.changed_paths == 0
    assert diff.unlabelled == 2  # 000003.jpg and the dropped new.jpg
    assert diff.quarantined_skipped == 0
    assert [t["image_id"] for t in diff.to_embed] == sorted(ids.values())
    by_id = {t["image_id"]: t["path"] for t in diff.to_embed}
    assert by_id[ids["000001.jpg"]] == "images/car_ims/000001.jpg"
    assert by_id[ids["new.jpg"]] == f"incoming/{DAY1}/new.jpg"
    assert diff.summary() == {
        "live": 4,
        "new_images": 4,
        "gone": 0,
        "changed_paths": 0,
        "unlabelled": 2,
        "to_embed": 4,
        "quarantined_skipped": 0,
    }

    rows = rows_by_id(layout)
    assert set(rows) == set(ids.values())
    r1 = rows[ids["000001.jpg"]]
    assert (r1["class_id"], r1["class_name"]) == (1, "AM General Hummer SUV 2000")
    assert r1["source"] == "archive:car_ims"
    assert r1["file_name"] == "000001.jpg"
    assert r1["size"] == (archive / "000001.jpg").stat().st_size
    assert (r1["first_seen"], r1["last_seen"], r1["status"], r1["n_paths"]) == (DAY1, DAY1, LIVE, 1)
    assert rows[ids["000002.jpg"]]["class_id"] == 2
    assert rows[ids["000003.jpg"]]["class_id"] is None
    assert rows[ids["new.jpg"]]["source"] == f"incoming:{DAY1}"
    assert [p for p in layout.root.rglob("*") if p.name.startswith(TMP_PREFIX)] == []


def test_second_identical_run_hashes_nothing_and_embeds_nothing(
    layout: Layout, archive: Path, counting_sha: list[Path]
) -> None:
    for seed in range(3):
        write_image(archive / f"00000{seed + 1}.jpg", seed)
    write_image(layout.incoming_day(DAY1) / "drop.jpg", 50)

    first = run(layout, archive, DAY1)
    assert len(counting_sha) == 4
    assert len(first.to_embed) == 4

    counting_sha.clear()
    not_embedded_yet = run(layout, archive, DAY1)
    assert counting_sha == []
    assert not_embedded_yet.to_embed == first.to_embed  # still waiting for vectors
    assert not_embedded_yet.new_images == 0

    embed_all(layout, first)
    counting_sha.clear()
    second = run(layout, archive, DAY1)

    assert counting_sha == []
    assert second.to_embed == []
    assert (second.live, second.new_images, second.gone, second.changed_paths) == (4, 0, 0, 0)
    assert second.unlabelled == first.unlabelled


def test_first_seen_kept_and_last_seen_updated(layout: Layout, archive: Path) -> None:
    iid = write_image(archive / "000001.jpg", 1)
    run(layout, archive, DAY1)
    run(layout, archive, DAY2)

    row = rows_by_id(layout)[iid]
    assert (row["first_seen"], row["last_seen"]) == (DAY1, DAY2)


# -- daily drops --------------------------------------------------------------------------------


def test_incoming_is_ingested_only_by_its_days_run_and_stays_live(
    layout: Layout, archive: Path
) -> None:
    write_image(archive / "000001.jpg", 1)
    d1 = write_image(layout.incoming_day(DAY1) / "a.jpg", 11)
    d2 = write_image(layout.incoming_day(DAY2) / "b.jpg", 12)

    diff1 = run(layout, archive, DAY1)
    assert d1 in live_ids(layout)
    assert d2 not in rows_by_id(layout)  # tomorrow's drop is not read today
    assert diff1.live == 2

    diff2 = run(layout, archive, DAY2)
    assert {d1, d2} <= live_ids(layout)
    assert diff2.live == 3
    assert diff2.new_images == 1
    assert diff2.gone == 0
    assert rows_by_id(layout)[d1]["source"] == f"incoming:{DAY1}"

    assert incoming_source(layout, DAY3) is None  # no drop folder that day
    diff3 = run(layout, archive, DAY3)
    assert {d1, d2} <= live_ids(layout)
    assert (diff3.live, diff3.new_images, diff3.gone) == (3, 0, 0)
    assert {t["image_id"] for t in diff3.to_embed} == live_ids(layout)

    (layout.incoming_day(DAY1) / "a.jpg").unlink()  # an earlier day's file disappears
    diff4 = run(layout, archive, DAY4)
    assert diff4.gone == 1
    assert diff4.live == 2
    assert rows_by_id(layout)[d1]["status"] == GONE
    assert d1 not in {t["image_id"] for t in diff4.to_embed}


def test_earlier_days_file_changed_in_place_is_reidentified(layout: Layout, archive: Path) -> None:
    write_image(archive / "000001.jpg", 1)
    drop = layout.incoming_day(DAY1) / "a.jpg"
    old = write_image(drop, 11)
    run(layout, archive, DAY1)

    new = write_image(drop, 12)
    bump_mtime(drop)
    diff = run(layout, archive, DAY2)  # DAY1's folder is not a source now

    rows = rows_by_id(layout)
    assert rows[old]["status"] == GONE
    assert rows[new]["status"] == LIVE
    assert rows[new]["path"] == f"incoming/{DAY1}/a.jpg"
    assert (diff.gone, diff.changed_paths, diff.new_images) == (1, 1, 1)
    assert new in {t["image_id"] for t in diff.to_embed}


def test_incoming_labels_csv_is_applied(layout: Layout, archive: Path) -> None:
    write_image(archive / "000001.jpg", 1)
    day = layout.incoming_day(DAY1)
    labelled = write_image(day / "sub" / "x1.jpg", 21)
    unlabelled = write_image(day / "x2.jpg", 22)
    (day / "labels.csv").write_text(
        "Class,image,class_name\n7,sub/x1.jpg,Audi R8 2012\n8,other/x2.jpg/x3.jpg,Audi TT 2012\n"
    )

    src = incoming_source(layout, DAY1)
    assert src is not None
    assert src.name == f"incoming:{DAY1}"
    assert set(src.labels) == {"sub/x1.jpg", "other/x2.jpg/x3.jpg"}

    diff = run(layout, archive, DAY1)

    rows = rows_by_id(layout)
    assert (rows[labelled]["class_id"], rows[labelled]["class_name"]) == (7, "Audi R8 2012")
    assert rows[unlabelled]["class_id"] is None
    assert diff.unlabelled == 1
    assert diff.live == 3


def test_a_days_labels_without_names_take_the_names_of_their_class(
    layout: Layout, archive: Path
) -> None:
    write_image(archive / "000001.jpg", 1)  # the archive's labels name class 1
    day = layout.incoming_day(DAY1)
    same_class = write_image(day / "a.jpg", 31)
    unnamed_class = write_image(day / "b.jpg", 32)
    (day / "labels.csv").write_text("Class,image\n1,a.jpg\n9,b.jpg\n")
    run(layout, archive, DAY1)
    rows = rows_by_id(layout)
    assert (rows[same_class]["class_id"], rows[same_class]["class_name"]) == (
        1,
        "AM General Hummer SUV 2000",
    )
    assert (rows[unnamed_class]["class_id"], rows[unnamed_class]["class_name"]) == (9, None)


# -- gone, changed, duplicates ------------------------------------------------------------------


def test_deleted_file_is_marked_gone(layout: Layout, archive: Path) -> None:
    keep = write_image(archive / "000001.jpg", 1)
    lost = write_image(archive / "000002.jpg", 2)
    embed_all(layout, run(layout, archive, DAY1))

    (archive / "000002.jpg").unlink()
    diff = run(layout, archive, DAY2)

    assert diff.gone == 1
    assert diff.live == 1
    assert diff.to_embed == []
    rows = rows_by_id(layout)
    assert rows[lost]["status"] == GONE
    assert rows[keep]["status"] == LIVE
    assert live_ids(layout) == {keep}

    # Not re-counted: it was already gone.
    again = run(layout, archive, DAY3)
    assert again.gone == 0
    assert rows_by_id(layout)[lost]["status"] == GONE

    # With full_rebuild a gone image is still not embedded.
    assert lost not in {
        t["image_id"] for t in run(layout, archive, DAY3, full_rebuild=True).to_embed
    }


def test_gone_image_that_returns_is_live_again(layout: Layout, archive: Path) -> None:
    iid = write_image(archive / "000001.jpg", 1)
    write_image(archive / "000002.jpg", 2)
    run(layout, archive, DAY1)
    data = (archive / "000001.jpg").read_bytes()
    (archive / "000001.jpg").unlink()
    assert run(layout, archive, DAY2).gone == 1

    (archive / "moved.jpg").write_bytes(data)  # same bytes, new name
    diff = run(layout, archive, DAY3)

    row = rows_by_id(layout)[iid]
    assert row["status"] == LIVE
    assert row["path"] == "images/car_ims/moved.jpg"
    assert row["first_seen"] == DAY1
    assert (diff.new_images, diff.gone, diff.live) == (0, 0, 2)


def seed_sorting(old_id: str, new_sorts_first: bool) -> int:
    """A seed whose image id sorts before (or after) ``old_id``."""
    for seed in range(3, 200):
        iid = hashlib.sha256(jpeg_bytes(seed)).hexdigest()
        if (iid < old_id) == new_sorts_first:
            return seed
    raise AssertionError("no suitable seed")


@pytest.mark.parametrize("new_sorts_first", [True, False], ids=["new-id-first", "new-id-last"])
def test_changed_bytes_at_same_path(
    layout: Layout, archive: Path, counting_sha: list[Path], new_sorts_first: bool
) -> None:
    write_image(archive / "000001.jpg", 1)
    path = archive / "000002.jpg"
    old = write_image(path, 2)
    embed_all(layout, run(layout, archive, DAY1))

    new = write_image(path, seed_sorting(old, new_sorts_first))
    assert (new < old) == new_sorts_first
    bump_mtime(path)
    counting_sha.clear()
    diff = run(layout, archive, DAY2)

    assert counting_sha == [path]  # only the changed file is re-hashed
    assert diff.changed_paths == 1
    assert diff.gone == 1
    assert diff.new_images == 1
    assert diff.live == 2
    assert [t["image_id"] for t in diff.to_embed] == [new]
    rows = rows_by_id(layout)
    assert rows[old]["status"] == GONE
    assert rows[new]["status"] == LIVE
    assert rows[new]["path"] == "images/car_ims/000002.jpg"
    assert rows[new]["class_id"] == 2  # the label follows the file name

    # The next run sees nothing new: no re-hash, no changed path, nothing gone again.
    counting_sha.clear()
    later = run(layout, archive, DAY3)
    assert counting_sha == []
    assert (later.changed_paths, later.gone, later.new_images, later.live) == (0, 0, 0, 2)
    assert rows_by_id(layout)[old]["status"] == GONE


def test_identical_files_are_one_image(layout: Layout, archive: Path) -> None:
    iid = write_image(archive / "000001.jpg", 1)
    write_image(archive / "copy" / "000001.jpg", 1)
    other = write_image(archive / "000002.jpg", 2)

    diff = run(layout, archive, DAY1)

    assert diff.live == 2
    assert diff.new_images == 2
    assert [t["image_id"] for t in diff.to_embed] == sorted([iid, other])
    rows = rows_by_id(layout)
    assert rows[iid]["n_paths"] == 2
    assert rows[other]["n_paths"] == 1

    # Removing one copy keeps the image live.
    (archive / "000001.jpg").unlink()
    after = run(layout, archive, DAY2)
    assert after.gone == 0
    assert rows_by_id(layout)[iid]["status"] == LIVE
    assert rows_by_id(layout)[iid]["n_paths"] == 1


# -- what to embed ------------------------------------------------------------------------------


def test_full_rebuild_embeds_every_live_image(layout: Layout, archive: Path) -> None:
    for seed in range(3):
        write_image(archive / f"00000{seed + 1}.jpg", seed)
    embed_all(layout, run(layout, archive, DAY1))
    assert run(layout, archive, DAY1).to_embed == []

    diff = run(layout, archive, DAY1, full_rebuild=True)

    assert [t["image_id"] for t in diff.to_embed] == sorted(live_ids(layout))
    assert len(diff.to_embed) == 3


def test_partially_embedded_lists_only_the_rest(layout: Layout, archive: Path) -> None:
    a = write_image(archive / "000001.jpg", 1)
    b = write_image(archive / "000002.jpg", 2)
    run(layout, archive, DAY1)
    write_shard(layout, BACKBONE, "run1", 0, [(a, np.zeros(4, np.float32))], 4)

    diff = run(layout, archive, DAY1)
    assert [t["image_id"] for t in diff.to_embed] == [b]
    # Another backbone's store does not count.
    other = update_catalog(layout, sources(layout, archive, DAY1), DAY1, "resnet18")
    assert [t["image_id"] for t in other.to_embed] == sorted([a, b])


def test_quarantined_images_are_not_embedded(layout: Layout, archive: Path) -> None:
    good = write_image(archive / "000001.jpg", 1)
    bad = write_image(archive / "000002.jpg", 2)
    run(layout, archive, DAY1)
    quarantine(layout, bad, archive / "000002.jpg", "decode_error", "test", "run1")

    diff = run(layout, archive, DAY1)
    assert [t["image_id"] for t in diff.to_embed] == [good]
    assert diff.quarantined_skipped == 1
    assert diff.live == 2  # quarantined, not gone

    # a full rebuild tries every image again (formerly quarantine was forever)
    rebuild = run(layout, archive, DAY1, full_rebuild=True)
    assert sorted(t["image_id"] for t in rebuild.to_embed) == sorted([good, bad])


def test_quarantine_binds_only_under_the_settings_it_was_decided_by(
    layout: Layout, archive: Path
) -> None:
    """A too_large image comes back when IMGSIM_MAX_IMAGE_PIXELS is raised; an old record of
    a transient read error never binds; an image that embeds after all leaves quarantine."""
    from imgsim.store import binding_quarantine, quarantined_ids, release_from_quarantine

    big = write_image(archive / "000001.jpg", 1)
    flaky = write_image(archive / "000002.jpg", 2)
    broken = write_image(archive / "000003.jpg", 3)
    run(layout, archive, DAY1)
    quarantine(
        layout, big, archive / "000001.jpg", "too_large", "x", "run1", {"max_image_pixels": 1000}
    )
    quarantine(layout, flaky, archive / "000002.jpg", "unreadable", "EIO", "run1")
    quarantine(
        layout, broken, archive / "000003.jpg", "corrupt", "x", "run1", {"max_image_pixels": 1000}
    )
    assert set(binding_quarantine(layout, 1000)) == {big, broken}
    diff = update_catalog(
        layout, [Source("archive:car_ims", archive)], DAY1, BACKBONE, max_image_pixels=1000
    )
    assert [t["image_id"] for t in diff.to_embed] == [flaky]
    raised = update_catalog(
        layout, [Source("archive:car_ims", archive)], DAY1, BACKBONE, max_image_pixels=2000
    )
    assert sorted(t["image_id"] for t in raised.to_embed) == sorted([big, flaky])
    assert release_from_quarantine(layout, [big, flaky]) == 2
    assert set(quarantined_ids(layout)) == {broken}
    assert not list(layout.quarantine.glob(f"{big}.*"))


def test_missing_source_folder_raises_and_keeps_catalog(layout: Layout, archive: Path) -> None:
    iid = write_image(archive / "000001.jpg", 1)
    run(layout, archive, DAY1)
    before = read_catalog(layout)

    with pytest.raises(FileNotFoundError):
        update_catalog(layout, [Source("archive:nope", layout.images / "nope")], DAY2, BACKBONE)

    assert read_catalog(layout) == before
    assert live_ids(layout) == {iid}


# -- labels: kept, keyed by path, coverage -------------------------------------------------------


def test_earlier_days_touched_file_keeps_its_label(layout: Layout, archive: Path) -> None:
    """Issue 13 item 4: a touch (or a copy) of an earlier day's photo must not drop its label."""
    write_image(archive / "000001.jpg", 1)
    day = layout.incoming_day(DAY1)
    photo = write_image(day / "x1.jpg", 21)
    (day / "labels.csv").write_text("Class,image,class_name\n7,x1.jpg,Audi R8 2012\n")
    run(layout, archive, DAY1)
    assert rows_by_id(layout)[photo]["class_id"] == 7

    bump_mtime(day / "x1.jpg")  # same bytes, new mtime
    diff = run(layout, archive, DAY2)  # DAY1's folder is not a source now

    row = rows_by_id(layout)[photo]
    assert (row["class_id"], row["class_name"], row["status"]) == (7, "Audi R8 2012", LIVE)
    assert row["mtime_ns"] == (day / "x1.jpg").stat().st_mtime_ns
    assert (diff.gone, diff.new_images, diff.changed_paths) == (0, 0, 0)
    assert diff.label_coverage["labelled_images"] == 2


def test_same_file_name_in_two_folders_keeps_each_label(layout: Layout) -> None:
    root = layout.images / "stanford-cars"
    train = write_image(root / "cars_train" / "00001.jpg", 1)
    test = write_image(root / "cars_test" / "00001.jpg", 2)
    labels = {
        "cars_train/00001.jpg": LabelRecord("cars_train/00001.jpg", 14, "Audi TT 2012"),
        "cars_test/00001.jpg": LabelRecord("cars_test/00001.jpg", 181, "Suzuki 2012"),
    }
    update_catalog(layout, [Source("archive:stanford-cars", root, labels)], DAY1, BACKBONE)
    rows = rows_by_id(layout)
    assert (rows[train]["class_id"], rows[test]["class_id"]) == (14, 181)

    # Labels that name only "00001.jpg" cannot tell the two photos apart: neither gets one.
    bare = {"00001.jpg": LabelRecord("00001.jpg", 14, "Audi TT 2012")}
    layout.catalog.unlink()
    diff = update_catalog(layout, [Source("archive:stanford-cars", root, bare)], DAY1, BACKBONE)
    rows = rows_by_id(layout)
    assert (rows[train]["class_id"], rows[test]["class_id"]) == (None, None)
    assert diff.label_coverage == {"labelled_images": 0, "images": 2, "classes": 0, "share": 0.0}


def test_label_coverage_counts_live_images_only() -> None:
    rows = [
        {"status": LIVE, "class_id": 1},
        {"status": LIVE, "class_id": 1},
        {"status": LIVE, "class_id": 5},
        {"status": LIVE, "class_id": None},
        {"status": GONE, "class_id": 9},
    ]
    assert catalog.label_coverage(rows) == {
        "labelled_images": 3,
        "images": 4,
        "classes": 2,
        "share": 0.75,
    }
    assert catalog.label_coverage([])["share"] == 0.0


def test_low_coverage_names_examples_from_both_sides_and_the_fix(tmp_path: Path) -> None:
    from imgsim.sources.labels import find_images, match_labels

    for name in ("00001.jpg", "00002.jpg", "00003.jpg"):
        write_image(tmp_path / "cars_train" / name, int(name[:5]))
    labels = {
        f"car_ims/{i:06d}.jpg": LabelRecord(f"car_ims/{i:06d}.jpg", 1, None) for i in range(1, 5)
    }
    match = match_labels(tmp_path, find_images(tmp_path), labels)
    with pytest.raises(catalog.LabelCoverageError) as info:
        catalog.check_label_coverage(match, 0.5, "cars_annos.mat", "images/x")
    msg = str(info.value)
    assert "match 0 of the 3 images" in msg and "at least 50%" in msg
    assert "cars_train/00001.jpg" in msg and "car_ims/000001.jpg" in msg
    assert "IMGSIM_MIN_LABEL_COVERAGE=0" in msg and "IMGSIM_LABELS_URL" in msg
    assert catalog.check_label_coverage(match, 0, "l", "i")["share"] == 0.0  # allowed


def test_data_root_through_a_link_and_a_source_by_its_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real-data"
    (tmp_path / "link-data").symlink_to(real, target_is_directory=True)
    layout = Layout(tmp_path / "link-data")
    iid = write_image(real / "images" / "car_ims" / "000001.jpg", 1)
    update_catalog(
        layout, [Source("archive:car_ims", real / "images" / "car_ims", LABELS)], DAY1, BACKBONE
    )
    assert rows_by_id(layout)[iid]["path"] == "images/car_ims/000001.jpg"


def test_a_transient_read_error_is_retried_later_never_quarantined(
    layout: Layout, tmp_path: Path
) -> None:
    from imgsim.embedding.infer import Rejected
    from imgsim.imaging import ImageRejected, load_rgb
    from imgsim.store import quarantined_ids, set_aside

    with pytest.raises(ImageRejected) as info:  # the file system's error (EISDIR), not a decode
        load_rgb(tmp_path)
    assert info.value.transient and info.value.reason == "unreadable"
    flaky = Rejected("a" * 64, tmp_path / "x.jpg", "unreadable", "EIO", transient=True)
    assert set_aside(layout, flaky, "run1", 1000) == "retry:unreadable"
    assert quarantined_ids(layout) == {}
    big = Rejected("b" * 64, tmp_path / "y.jpg", "too_large", "5000x5000")
    assert set_aside(layout, big, "run1", 1000) == "too_large"
    assert quarantined_ids(layout)["b" * 64]["settings"] == {"max_image_pixels": 1000}
