"""safe_extract: layouts, idempotence, and every way an archive is refused."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from imgsim.sources.archive import (
    MARKER_NAME,
    ArchiveError,
    ExtractResult,
    _Budget,
    _Limits,
    safe_extract,
)


def _payload(i: int, size: int = 3000) -> bytes:
    """Incompressible, distinct bytes (a stand-in for a JPEG)."""
    return os.urandom(size - 8) + i.to_bytes(8, "big")


def _add_file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tf.addfile(info, io.BytesIO(data))


def _add_special(tf: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tf.addfile(info)


def _make_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> dict[str, bytes]:
    with tarfile.open(path, mode) as tf:
        for name, data in members.items():
            _add_file(tf, name, data)
    return members


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _only_archive_left(tmp_path: Path, archive: Path) -> None:
    assert _tree(tmp_path) == {archive.name}, "nothing may be written when an archive is refused"


@pytest.fixture
def stanford_tgz(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    members = {f"car_ims/{i:06d}.jpg": _payload(i) for i in range(1, 13)}
    archive = tmp_path / "car_ims.tgz"
    _make_tar(archive, members)
    return archive, members


def test_stanford_tgz_extracts_identical_bytes(stanford_tgz, tmp_path: Path) -> None:
    archive, members = stanford_tgz
    target = tmp_path / "raw" / "car_ims_extracted"
    result = safe_extract(archive, target)
    assert result == ExtractResult(target, len(members), sum(map(len, members.values())), True)
    for name, data in members.items():
        path = target / name
        assert path.read_bytes() == data
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((target / "car_ims").stat().st_mode) == 0o755
    assert (target / MARKER_NAME).is_file()
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_second_call_is_a_noop(stanford_tgz, tmp_path: Path) -> None:
    archive, _ = stanford_tgz
    target = tmp_path / "out"
    first = safe_extract(archive, target)
    marker, one = target / MARKER_NAME, target / "car_ims" / "000001.jpg"
    before = (marker.stat().st_mtime_ns, one.stat().st_mtime_ns, one.stat().st_ino)
    second = safe_extract(archive, target)
    assert second.extracted is False
    assert (second.files, second.total_bytes) == (first.files, first.total_bytes)
    assert (marker.stat().st_mtime_ns, one.stat().st_mtime_ns, one.stat().st_ino) == before


def test_kaggle_zip_extracts_identical_bytes(tmp_path: Path) -> None:
    members = {f"cars_train/{i:05d}.jpg": _payload(i) for i in range(1, 9)}
    archive = tmp_path / "stanford-car-dataset.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cars_train/", b"")
        for name, data in members.items():
            zf.writestr(name, data)
    result = safe_extract(archive, tmp_path / "kaggle")
    assert result.files == len(members) and result.extracted
    for name, data in members.items():
        assert (tmp_path / "kaggle" / name).read_bytes() == data


def test_format_is_detected_by_content(tmp_path: Path) -> None:
    archive = tmp_path / "misnamed.zip"  # really a bz2 tar
    members = _make_tar(archive, {"a/b.jpg": b"x" * 100}, mode="w:bz2")
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "a" / "b.jpg").read_bytes() == members["a/b.jpg"]
    not_archive = tmp_path / "notes.tgz"
    not_archive.write_text("hello\n")
    with pytest.raises(ArchiveError, match="not a tar"):
        safe_extract(not_archive, tmp_path / "out2")


def test_plain_and_xz_tar(tmp_path: Path) -> None:
    for mode, name in (("w", "a.tar"), ("w:xz", "a.tar.xz")):
        archive = tmp_path / name
        _make_tar(archive, {"d/f.jpg": b"abc" * 10}, mode=mode)
        assert safe_extract(archive, tmp_path / f"out-{name}").files == 1


def test_setuid_mode_is_not_kept(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tf:
        _add_file(tf, "x.jpg", b"data", mode=0o4777)
    safe_extract(archive, tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out" / "x.jpg").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.jpg", "'..'"),
        ("car_ims/../../evil.jpg", "'..'"),
        ("/tmp/evil.jpg", "absolute"),
        ("C:/evil.jpg", "drive letter"),
        ("..\\evil.jpg", "backslash"),
    ],
)
def test_tar_path_tricks_rejected(tmp_path: Path, name: str, problem: str) -> None:
    archive = tmp_path / "bad.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        _add_file(tf, "car_ims/000001.jpg", b"fine")  # a good entry first: still nothing written
        _add_file(tf, name, b"evil")
    target = tmp_path / "out"
    with pytest.raises(ArchiveError, match=problem) as info:
        safe_extract(archive, target)
    assert repr(name) in str(info.value) and str(archive) in str(info.value)
    assert not target.exists()
    _only_archive_left(tmp_path, archive)


@pytest.mark.parametrize("name", ["../evil.jpg", "/abs/evil.jpg"])
def test_zip_path_tricks_rejected(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cars_train/00001.jpg", b"fine")
        zf.writestr(zipfile.ZipInfo(name), b"evil")
    with pytest.raises(ArchiveError, match="entry"):
        safe_extract(archive, tmp_path / "out")
    _only_archive_left(tmp_path, archive)


@pytest.mark.parametrize(
    ("kind", "linkname", "problem"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "symlink"),
        (tarfile.SYMTYPE, "000001.jpg", "symlink"),  # even a harmless-looking one
        (tarfile.LNKTYPE, "car_ims/000001.jpg", "hard link"),
        (tarfile.CHRTYPE, "", "device"),
        (tarfile.BLKTYPE, "", "device"),
        (tarfile.FIFOTYPE, "", "FIFO"),
    ],
)
def test_tar_special_members_rejected(
    tmp_path: Path, kind: bytes, linkname: str, problem: str
) -> None:
    archive = tmp_path / "special.tar"
    with tarfile.open(archive, "w") as tf:
        _add_file(tf, "car_ims/000001.jpg", b"fine")
        _add_special(tf, "car_ims/special", kind, linkname)
    with pytest.raises(ArchiveError, match=problem) as info:
        safe_extract(archive, tmp_path / "out")
    assert "car_ims/special" in str(info.value)
    _only_archive_left(tmp_path, archive)


def test_zip_symlink_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("cars_train/link.jpg")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symlink"):
        safe_extract(archive, tmp_path / "out")
    _only_archive_left(tmp_path, archive)


def test_gzip_bomb_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tgz"
    size = 50 * 2**20
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("car_ims/zeros.jpg")
        info.size = size
        tf.addfile(info, io.BytesIO(bytes(size)))
    assert archive.stat().st_size * 100 < size
    with pytest.raises(ArchiveError, match="ratio") as info:
        safe_extract(archive, tmp_path / "out", max_ratio=100)
    assert "car_ims/zeros.jpg" in str(info.value)
    _only_archive_left(tmp_path, archive)


def test_streamed_bytes_are_counted_not_trusted(tmp_path: Path) -> None:
    """Output is checked while written: more than declared, or over the ratio, stops it."""
    archive = tmp_path / "a.tgz"
    budget = _Budget(archive, _Limits(10, 10**9, 100.0, archive_size=1000))
    with pytest.raises(ArchiveError, match="more than its declared"):
        budget.copy(io.BytesIO(b"x" * 2000), io.BytesIO(), 1000, "liar.jpg")
    budget = _Budget(archive, _Limits(10, 10**9, 100.0, archive_size=1000))
    with pytest.raises(ArchiveError, match="ratio"):
        budget.copy(io.BytesIO(bytes(200_000)), io.BytesIO(), 200_000, "bomb.jpg")
    budget = _Budget(archive, _Limits(10, 10**9, 100.0, archive_size=1000))
    with pytest.raises(ArchiveError, match="truncated"):
        budget.copy(io.BytesIO(b"x" * 10), io.BytesIO(), 20, "short.jpg")


def test_total_size_limit(tmp_path: Path) -> None:
    archive = tmp_path / "big.tar"
    _make_tar(archive, {f"f{i}.jpg": _payload(i, 4000) for i in range(3)}, mode="w")
    with pytest.raises(ArchiveError, match="max_total_bytes"):
        safe_extract(archive, tmp_path / "out", max_total_bytes=10_000)
    _only_archive_left(tmp_path, archive)


def test_too_many_files_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "many.tgz"
    _make_tar(archive, {f"car_ims/{i:06d}.jpg": b"x" for i in range(1, 12)})
    with pytest.raises(ArchiveError, match="max_files=10"):
        safe_extract(archive, tmp_path / "out", max_files=10)
    _only_archive_left(tmp_path, archive)
    zarchive = tmp_path / "many.zip"
    with zipfile.ZipFile(zarchive, "w") as zf:
        for i in range(11):
            zf.writestr(f"{i}.jpg", b"x")
    with pytest.raises(ArchiveError, match="max_files=10"):
        safe_extract(zarchive, tmp_path / "out", max_files=10)
    assert not (tmp_path / "out").exists()


def _cut_and_extract(tmp_path: Path, full: Path, name: str, keep: int) -> Path:
    """``full`` cut to its first ``keep`` bytes as ``name`` (``full`` removed): extracting it
    fails as truncated and leaves only the archive behind."""
    archive = tmp_path / name
    archive.write_bytes(full.read_bytes()[:keep])
    full.unlink()
    with pytest.raises(ArchiveError, match="truncated"):
        safe_extract(archive, tmp_path / "out")
    _only_archive_left(tmp_path, archive)
    return archive


@pytest.mark.parametrize("mode", ["w:gz", "w"])
def test_truncated_tar_rejected(tmp_path: Path, mode: str) -> None:
    full = tmp_path / "full.tar"
    _make_tar(full, {f"car_ims/{i:06d}.jpg": _payload(i) for i in range(1, 21)}, mode=mode)
    _cut_and_extract(tmp_path, full, "cut.tgz", full.stat().st_size // 2)


def test_plain_tar_cut_at_a_header_boundary_rejected(tmp_path: Path) -> None:
    """tarfile stops silently there; the missing end-of-archive block gives it away."""
    full = tmp_path / "full.tar"
    _make_tar(full, {f"{i}.jpg": b"y" * 512 for i in range(4)}, mode="w")
    _cut_and_extract(tmp_path, full, "cut.tar", 2 * 1024)  # two complete members, then nothing


def test_truncated_zip_rejected(tmp_path: Path) -> None:
    full = tmp_path / "full.zip"
    with zipfile.ZipFile(full, "w") as zf:
        for i in range(10):
            zf.writestr(f"cars_train/{i:05d}.jpg", _payload(i))
    _cut_and_extract(tmp_path, full, "cut.zip", full.stat().st_size // 2)


def test_duplicate_and_conflicting_entries_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "dup.tar"
    with tarfile.open(archive, "w") as tf:
        _add_file(tf, "a/b.jpg", b"1")
        _add_file(tf, "a", b"2")  # 'a' is a directory above
    with pytest.raises(ArchiveError, match="both a file and a directory"):
        safe_extract(archive, tmp_path / "out")
    _only_archive_left(tmp_path, archive)


def test_different_archive_replaces_target(stanford_tgz, tmp_path: Path) -> None:
    archive, _ = stanford_tgz
    target = tmp_path / "out"
    safe_extract(archive, target)
    newer = tmp_path / "newer.tgz"
    members = _make_tar(newer, {"car_ims/000100.jpg": _payload(100)})
    result = safe_extract(newer, target)
    assert result.extracted and result.files == 1
    assert _tree(target) == {"car_ims", "car_ims/000100.jpg", MARKER_NAME}
    assert (target / "car_ims" / "000100.jpg").read_bytes() == members["car_ims/000100.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car_ims.tgz", "newer.tgz", "out"]


def test_failure_leaves_existing_target_untouched(stanford_tgz, tmp_path: Path) -> None:
    archive, _ = stanford_tgz
    target = tmp_path / "out"
    safe_extract(archive, target)
    before = _tree(target)
    bad = tmp_path / "bad.tgz"
    with tarfile.open(bad, "w:gz") as tf:
        _add_file(tf, "../evil.jpg", b"evil")
    with pytest.raises(ArchiveError):
        safe_extract(bad, target)
    assert _tree(target) == before
    assert safe_extract(archive, target).extracted is False


def test_unmarked_target_is_not_replaced(stanford_tgz, tmp_path: Path) -> None:
    archive, _ = stanford_tgz
    target = tmp_path / "out"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ArchiveError, match="replace_unmarked"):
        safe_extract(archive, target)
    assert (target / "precious.txt").read_text() == "keep me"
    assert safe_extract(archive, target, replace_unmarked=True).extracted
    assert not (target / "precious.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert safe_extract(archive, empty).extracted  # an empty directory is fine
