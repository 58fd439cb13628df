"""Crash-safe file writes: every write lands under a temporary name and is renamed into place.

A reader (or a crash at any moment) sees either the old file or the complete new one, never a
half-written file. Temporary names start with ``.tmp-`` so scanners can ignore them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_PREFIX = ".tmp-"


def run_key(run_id: str) -> str:
    """A file-name-safe key for an Airflow run id (stable across task retries)."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-.")
    if not key:
        raise ValueError(f"run id {run_id!r} gives an empty key")
    return key[:120]


def fsync_tree(root: Path) -> int:
    """fsync every file under ``root``, then every folder, deepest first, so that what another
    process wrote there (Spark's executors) is on disk before a rename publishes it. Returns
    the number of files flushed; an error flushing one raises (publishing must stop)."""
    files = 0
    folders = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            folders.append(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            files += 1
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        fsync_dir(folder)
    return files


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives a power loss (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{target.name}.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(target, exc) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DiskFull(OSError):
    """No space left while writing; the message names the file and the free space there."""

    def __init__(self, target: Path, cause: OSError) -> None:
        try:
            free = shutil.disk_usage(target.parent).free
        except OSError:
            free = -1
        super().__init__(
            cause.errno,
            f"no space left on the device while writing {target} "
            f"({free} bytes free there); nothing was replaced: free "
            "space or move IMGSIM_DATA_ROOT, then re-run the task",
        )


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` through a temporary file (``dst`` is complete or absent)."""
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], *, wait: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created, with its folder) for the ``with`` block;
    ``wait=False`` raises ``BlockingIOError`` at once when another process holds it."""
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
