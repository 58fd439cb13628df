"""Safe, idempotent extraction of tar and zip archives.

``safe_extract`` reads the whole member list first and refuses the archive (``ArchiveError``)
before anything is written when any entry could escape the target or is not a plain file or
directory: absolute paths, ``..`` components, drive letters, backslashes, symlinks, hard links,
device files and FIFOs. It also refuses archives over the size, count and compression-ratio
limits, and truncated or corrupt archives.

Files are streamed into ``<target.parent>/.tmp-extract-<name>-<random>`` (bytes counted as they
are written, headers are not trusted), a marker ``.imgsim-extracted.json`` holding the archive's
sha256 is written there, and only then is the directory renamed onto ``target``. A reader (or a
crash) sees either the old target or the complete new one. A second call with the same archive
finds the marker and returns ``extracted=False`` without touching anything.
"""

from __future__ import annotations

import lzma
import os
import re
import secrets
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from imgsim.errors import PermanentError
from imgsim.fsutil import TMP_PREFIX, atomic_write_json, fsync_dir, read_json, sha256_file

MARKER_NAME = ".imgsim-extracted.json"
FILE_MODE = 0o644
DIR_MODE = 0o755
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
# Magic numbers of compressed streams: such a file that tarfile cannot read is a broken tar.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Everything reading a damaged archive may raise.
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
)


class ArchiveError(RuntimeError, PermanentError):
    """An archive was refused or could not be read; the message names the archive and entry."""

    def __init__(self, message: str, *, archive: Path | None = None, entry: str | None = None):
        super().__init__(message)
        self.archive = archive
        self.entry = entry


@dataclass(frozen=True)
class ExtractResult:
    target: Path  # directory the archive was extracted into
    files: int  # regular files extracted
    total_bytes: int
    extracted: bool  # False when already extracted (idempotent skip)


@dataclass(frozen=True)
class _Entry:
    """One validated member: its safe relative path parts and what to do with it."""

    parts: tuple[str, ...]
    is_dir: bool
    size: int  # declared size (0 for directories)
    name: str  # the name as stored in the archive, for messages
    handle: tarfile.TarInfo | zipfile.ZipInfo


@dataclass(frozen=True)
class _Limits:
    max_files: int
    max_total_bytes: int
    max_ratio: float
    archive_size: int


def _err(archive: Path, problem: str, entry: str | None = None) -> ArchiveError:
    where = f", entry {entry!r}" if entry is not None else ""
    return ArchiveError(f"archive {archive}{where}: {problem}", archive=archive, entry=entry)


def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of ``name`` once checked to stay inside the target."""
    if "\x00" in name:
        raise _err(archive, "NUL byte in entry name", name)
    if "\\" in name:
        raise _err(archive, "backslash in entry name (Windows path trick)", name)
    if name.startswith("/"):
        raise _err(archive, "absolute path", name)
    if _DRIVE.match(name):
        raise _err(archive, "drive letter in entry name", name)
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _err(archive, "'..' component (path traversal)", name)
    if parts == (MARKER_NAME,):
        raise _err(archive, f"entry uses the reserved name {MARKER_NAME}", name)
    return parts


class _Checker:
    """Accumulates members and enforces the limits while the member list is read."""

    def __init__(self, archive: Path, limits: _Limits) -> None:
        self.archive = archive
        self.limits = limits
        self.members = 0
        self.declared = 0
        self.entries: list[_Entry] = []

    def add(
        self, name: str, is_dir: bool, size: int, handle: tarfile.TarInfo | zipfile.ZipInfo
    ) -> None:
        self.members += 1
        if self.members > self.limits.max_files:
            raise _err(self.archive, f"more than max_files={self.limits.max_files} members", name)
        if size < 0:
            raise _err(self.archive, f"negative declared size {size}", name)
        self.declared += size
        if self.declared > self.limits.max_total_bytes:
            raise _err(
                self.archive,
                f"declared sizes add up to more than max_total_bytes={self.limits.max_total_bytes}",
                name,
            )
        ratio = self.declared / max(self.limits.archive_size, 1)
        if ratio > self.limits.max_ratio:
            raise _err(
                self.archive,
                f"compression ratio {ratio:.0f} exceeds max_ratio={self.limits.max_ratio:g} "
                "(decompression bomb?)",
                name,
            )
        parts = _safe_parts(self.archive, name)
        if not parts:
            if is_dir:
                return  # "./" itself
            raise _err(self.archive, "empty file name", name)
        self.entries.append(_Entry(parts, is_dir, size if not is_dir else 0, name, handle))

    def check_conflicts(self) -> None:
        """Refuse duplicate files and paths that are both a file and a directory."""
        files: dict[tuple[str, ...], str] = {}
        dirs: set[tuple[str, ...]] = set()
        for e in self.entries:
            if e.is_dir:
                dirs.add(e.parts)
            elif e.parts in files:
                raise _err(self.archive, "duplicate file entry", e.name)
            else:
                files[e.parts] = e.name
            for i in range(1, len(e.parts)):
                dirs.add(e.parts[:i])
        for parts in dirs:
            if parts in files:
                raise _err(self.archive, "entry is both a file and a directory", files[parts])


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symlink (-> {info.linkname!r})"
    if info.islnk():
        return f"hard link (-> {info.linkname!r})"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    return f"unsupported member type {info.type!r}"


def _scan_tar(archive: Path, tf: tarfile.TarFile, checker: _Checker) -> None:
    for info in tf:  # iterating (not getmembers) so the limits stop a huge member list early
        if info.isreg():
            checker.add(info.name, False, info.size, info)
        elif info.isdir():
            checker.add(info.name, True, 0, info)
        else:
            raise _err(archive, f"refusing {_tar_kind(info)}", info.name)
    # tarfile stops silently at a truncated or garbled header after the first one; a complete
    # archive has an end-of-archive block of zeros where the member list stopped.
    fileobj = tf.fileobj
    assert fileobj is not None
    fileobj.seek(tf.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise _err(archive, "truncated or corrupt archive (no end-of-archive block)")
    # Read compressed streams to their end: this checks the end-of-stream marker and CRC.
    while fileobj.read(_CHUNK):
        pass


def _zip_mode(info: zipfile.ZipInfo) -> int:
    return (info.external_attr >> 16) & 0xFFFF


def _scan_zip(archive: Path, zf: zipfile.ZipFile, checker: _Checker) -> None:
    infos = zf.infolist()
    if len(infos) > checker.limits.max_files:
        raise _err(archive, f"more than max_files={checker.limits.max_files} members")
    for info in infos:
        mode = _zip_mode(info)
        kind = stat.S_IFMT(mode)
        if info.flag_bits & 0x1:
            raise _err(archive, "encrypted entry", info.filename)
        if kind == stat.S_IFLNK:
            raise _err(archive, "refusing symlink", info.filename)
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise _err(archive, "refusing device file", info.filename)
        if kind == stat.S_IFIFO:
            raise _err(archive, "refusing FIFO", info.filename)
        if kind == stat.S_IFSOCK:
            raise _err(archive, "refusing socket", info.filename)
        is_dir = info.is_dir() or kind == stat.S_IFDIR
        checker.add(info.filename, is_dir, 0 if is_dir else info.file_size, info)


class _Budget:
    """Counts bytes as they are written and enforces the limits on actual output."""

    def __init__(self, archive: Path, limits: _Limits) -> None:
        self.archive = archive
        self.limits = limits
        self.written = 0

    def copy(self, src: IO[bytes], dst: IO[bytes], declared: int, name: str) -> int:
        member = 0
        while True:
            try:
                chunk = src.read(_CHUNK)
            except _READ_ERRORS as exc:
                raise _err(self.archive, f"truncated or corrupt archive ({exc})", name) from exc
            if not chunk:
                break
            member += len(chunk)
            self.written += len(chunk)
            if member > declared:
                raise _err(
                    self.archive, f"entry holds more than its declared {declared} bytes", name
                )
            if self.written > self.limits.max_total_bytes:
                raise _err(
                    self.archive,
                    f"more than max_total_bytes={self.limits.max_total_bytes} written",
                    name,
                )
            ratio = self.written / max(self.limits.archive_size, 1)
            if ratio > self.limits.max_ratio:
                raise _err(
                    self.archive,
                    f"compression ratio {ratio:.0f} exceeds max_ratio="
                    f"{self.limits.max_ratio:g} (decompression bomb?)",
                    name,
                )
            dst.write(chunk)
        if member != declared:
            raise _err(
                self.archive,
                f"truncated or corrupt archive: entry has {member} of {declared} bytes",
                name,
            )
        return member


def _make_dirs(root: Path, parts: tuple[str, ...], made: set[tuple[str, ...]]) -> Path:
    """Create ``root/parts`` one level at a time (mode 0o755); ``made`` remembers what exists."""
    path = root
    for i, part in enumerate(parts, start=1):
        path = path / part
        if parts[:i] in made:
            continue
        made.add(parts[:i])
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():  # cannot happen after validation
                raise
            continue
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask
    return path


def _open_new_file(path: Path) -> IO[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")


def _open_archive(archive: Path) -> tarfile.TarFile | zipfile.ZipFile:
    """Open ``archive`` as tar or zip, recognised by content, not by extension."""
    with open(archive, "rb") as fh:
        head = fh.read(8)
    try:
        is_tar = tarfile.is_tarfile(archive)
    except _READ_ERRORS:
        is_tar = False
    try:
        if is_tar:
            return tarfile.open(archive, mode="r:*")
        if zipfile.is_zipfile(archive):
            return zipfile.ZipFile(archive)
    except _READ_ERRORS as exc:
        raise _err(archive, f"truncated or corrupt archive ({exc})") from exc
    if head.startswith(_COMPRESSED_MAGIC) or head.startswith(_ZIP_MAGIC):
        raise _err(archive, "truncated or corrupt archive (cannot read its member list)")
    raise _err(archive, "not a tar (.tar/.tgz/.tar.gz/.tar.bz2/.tar.xz) or zip archive")


def _write_entries(
    arc: tarfile.TarFile | zipfile.ZipFile,
    entries: list[_Entry],
    tmp: Path,
    budget: _Budget,
) -> int:
    files = 0
    made: set[tuple[str, ...]] = set()
    for e in entries:
        if e.is_dir:
            _make_dirs(tmp, e.parts, made)
            continue
        parent = _make_dirs(tmp, e.parts[:-1], made)
        src: IO[bytes] | None
        try:
            if isinstance(arc, tarfile.TarFile):
                assert isinstance(e.handle, tarfile.TarInfo)
                src = arc.extractfile(e.handle)
            else:
                assert isinstance(e.handle, zipfile.ZipInfo)
                src = arc.open(e.handle)
        except _READ_ERRORS as exc:
            raise _err(budget.archive, f"truncated or corrupt archive ({exc})", e.name) from exc
        if src is None:
            raise _err(budget.archive, "cannot read entry", e.name)
        with src, _open_new_file(parent / e.parts[-1]) as dst:
            budget.copy(src, dst, e.size, e.name)
        files += 1
    return files


def _read_marker(target: Path) -> dict[str, object] | None:
    try:
        marker = read_json(target / MARKER_NAME)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _as_int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def safe_extract(
    archive: Path,
    target: Path,
    *,
    max_files: int = 100_000,
    max_total_bytes: int = 20 * 2**30,
    max_ratio: float = 200.0,
    replace_unmarked: bool = False,
    archive_sha256: str = "",
) -> ExtractResult:
    """Extract ``archive`` into the directory ``target`` safely and at most once.

    Raises ``ArchiveError`` when the archive is refused; then nothing is written and an
    existing ``target`` is left as it was. An existing ``target`` from another archive (it
    has a marker with another sha256) is replaced. An existing non-empty ``target`` without
    a marker was not made here; it is refused unless ``replace_unmarked`` is true.
    ``archive_sha256``, when the caller already knows it (the download step computed it),
    saves reading the whole archive once more to hash it.
    """
    archive = Path(archive)
    target = Path(target)
    if not archive.is_file():
        raise _err(archive, "no such file")
    digest = archive_sha256.strip().lower() or sha256_file(archive)

    marker = _read_marker(target) if target.is_dir() else None
    if marker is not None and marker.get("sha256") == digest:
        return ExtractResult(
            target=target,
            files=_as_int(marker.get("files")),
            total_bytes=_as_int(marker.get("bytes")),
            extracted=False,
        )
    if (
        marker is None
        and os.path.lexists(target)
        and not _is_empty_dir(target)
        and not replace_unmarked
    ):
        raise _err(
            archive,
            f"target {target} exists and was not made by safe_extract (no {MARKER_NAME}); "
            "remove it or pass replace_unmarked=True",
        )

    limits = _Limits(max_files, max_total_bytes, max_ratio, archive.stat().st_size)
    with _open_archive(archive) as arc:
        checker = _Checker(archive, limits)
        # Pass 1: read and check every member; nothing is written yet.
        try:
            if isinstance(arc, tarfile.TarFile):
                _scan_tar(archive, arc, checker)
            else:
                _scan_zip(archive, arc, checker)
        except ArchiveError:
            raise
        except _READ_ERRORS as exc:
            raise _err(archive, f"truncated or corrupt archive ({exc})") from exc
        checker.check_conflicts()

        # Pass 2: stream the files into a temporary directory beside the target.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f"{TMP_PREFIX}extract-{target.name}-{secrets.token_hex(6)}"
        tmp.mkdir(mode=DIR_MODE)
        try:
            os.chmod(tmp, DIR_MODE)
            budget = _Budget(archive, limits)
            # Read errors become ArchiveError; write errors (disk full) stay OSError.
            files = _write_entries(arc, checker.entries, tmp, budget)
            atomic_write_json(
                tmp / MARKER_NAME,
                {
                    "archive": archive.name,
                    "sha256": digest,
                    "files": files,
                    "bytes": budget.written,
                },
            )
            os.sync()  # the file contents must be on disk before the rename publishes them
            _publish(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ExtractResult(target=target, files=files, total_bytes=budget.written, extracted=True)


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target``, moving an existing target aside and deleting it after."""
    old: Path | None = None
    if os.path.lexists(target):
        old = target.parent / f"{TMP_PREFIX}extract-{target.name}-old-{secrets.token_hex(6)}"
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


__all__ = ["MARKER_NAME", "ArchiveError", "ExtractResult", "safe_extract"]
