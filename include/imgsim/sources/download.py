"""Fetch one file over HTTP(S), ``file://`` or a local path, safely and resumably.

``fetch`` writes into ``<dest_dir>/<filename>.part`` and renames onto ``<dest_dir>/<filename>``
only once the bytes are complete (size, and checksum when one is given), so a file under the
final name is always whole. Beside it, ``<filename>.meta.json`` records where it came from,
and lets a later call skip the download when the local copy is still current.

HTTP(S) downloads resume from an existing ``.part`` with a ``Range`` request guarded by
``If-Range``; the server validators seen when the ``.part`` was started are kept in
``<filename>.part.json`` so a changed remote file restarts from zero instead of being spliced.
Transient failures (connection errors, timeouts, truncated bodies, HTTP 5xx and 429) are retried
with exponential backoff, each retry resuming from the bytes already on disk. Permanent ones (an
invalid URL, HTTP 4xx, a checksum mismatch, a missing local file) are never retried: the
:class:`DownloadError` says which kind it was (``permanent``), so a caller retries nothing more.

A checksum is ``sha256:<hex>`` or ``md5:<hex>`` (a bare hex string is read by its length);
md5 is accepted because that is what the dataset's users publish.

:func:`fetch_first` tries an ordered list of locations (mirrors) and returns the first that gives
the right bytes; when none does, its error names every location and what happened there.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit

from imgsim.config import setting_default
from imgsim.fsutil import atomic_write_json, fsync_dir, read_json

logger = logging.getLogger(__name__)

_HTTP_SCHEMES = ("http", "https")
_MAX_BACKOFF_S = 30.0
_PROGRESS_INTERVAL_S = 2.0
_USER_AGENT = "imgsim-downloader/1"
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
_HEX_LENGTHS = {"md5": 32, "sha256": 64}
# Whitespace and control characters are never part of a URL (http.client refuses them too).
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")


class DownloadError(RuntimeError):
    """A download failed; the message names the URL and what went wrong.

    ``permanent`` is True when trying again cannot help (invalid URL, HTTP 4xx, wrong bytes,
    no such file); False when transient failures used up the retries.
    """

    def __init__(self, message: str, *, permanent: bool = True) -> None:
        super().__init__(message)
        self.permanent = permanent


class SourceUnavailable(DownloadError):
    """No location of a source gave the right bytes; ``attempts``: (location, what happened)."""

    def __init__(self, message: str, attempts: list[tuple[str, str]], *, permanent: bool) -> None:
        super().__init__(message, permanent=permanent)
        self.attempts = attempts


@dataclass(frozen=True)
class Checksum:
    """An expected digest: ``algorithm`` is ``md5`` or ``sha256``, ``hexdigest`` lower case."""

    algorithm: str
    hexdigest: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def parse_checksum(text: str, what: str = "checksum") -> Checksum | None:
    """``md5:<hex>``, ``sha256:<hex>`` or a bare hex digest (by length); "" gives None."""
    raw = (text or "").strip()
    if not raw:
        return None
    algorithm, sep, value = raw.partition(":")
    if not sep:
        algorithm, value = "", raw
    algorithm, value = algorithm.strip().lower(), value.strip().lower()
    if not algorithm:
        algorithm = next((a for a, n in _HEX_LENGTHS.items() if len(value) == n), "")
    n = _HEX_LENGTHS.get(algorithm)
    if n is None or len(value) != n or not re.fullmatch(r"[0-9a-f]+", value):
        raise DownloadError(f"{what} {text!r} is not md5:<32 hex digits> or sha256:<64 hex digits>")
    return Checksum(algorithm, value)


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    url: str
    sha256: str
    size: int
    downloaded: bool
    md5: str = ""
    kind: str = "file"  # "file", or "folder" (a local folder that already holds the images)
    tried: tuple[str, ...] = field(default=())  # locations that failed before this one


def file_digests(path: Path, chunk_size: int = 1 << 20) -> tuple[str, str]:
    """(sha256, md5) of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


class _TransientError(Exception):
    """A failure worth retrying (the ``.part`` keeps what arrived so far)."""


@dataclass(frozen=True)
class _Validators:
    etag: str | None = None
    last_modified: str | None = None
    total: int | None = None


@dataclass(frozen=True)
class _Target:
    final: Path
    part: Path
    part_meta: Path
    meta: Path


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def fetch(
    url: str,
    dest_dir: Path,
    *,
    filename: str | None = None,
    sha256: str = "",
    checksum: str | Checksum | None = None,
    timeout_s: float = setting_default("download_timeout_s"),
    retries: int = setting_default("download_retries"),
    backoff_s: float = 1.0,
    allowed_schemes: tuple[str, ...] = ("https", "http", "file"),
    allowed_local_roots: tuple[Path, ...] | None = None,
    chunk_size: int = 1 << 20,
) -> DownloadResult:
    """Download ``url`` to ``dest_dir/<filename>`` unless the local copy is already current.

    ``url`` may be ``http(s)://``, ``file://`` or a plain local path (allowed when ``"file"`` is
    in ``allowed_schemes``). ``checksum`` (``md5:<hex>``/``sha256:<hex>``) or ``sha256`` (hex)
    is verified before the file gets its final name. Raises :class:`DownloadError`.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, not {retries}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, not {chunk_size}")
    if checksum is None or checksum == "":
        expected_sha: Checksum | None = parse_checksum(
            f"sha256:{sha256}" if sha256.strip() else "", "sha256"
        )
    elif isinstance(checksum, Checksum):
        expected_sha = checksum
    else:
        expected_sha = parse_checksum(checksum)
    scheme = _scheme_of(url, allowed_schemes)
    is_url = urlsplit(url).scheme != ""
    name = _safe_filename(url, filename, is_url=is_url)
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {dest_dir} for {url}: {exc}", permanent=False) from exc
    target = _Target(
        final=dest_dir / name,
        part=dest_dir / f"{name}.part",
        part_meta=dest_dir / f"{name}.part.json",
        meta=dest_dir / f"{name}.meta.json",
    )
    if scheme in _HTTP_SCHEMES:
        return _fetch_http(
            url,
            target,
            expected_sha,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            allowed_schemes=allowed_schemes,
            chunk_size=chunk_size,
        )
    source = _local_source(url, allowed_local_roots, is_url=is_url)
    return _fetch_local(url, source, target, expected_sha, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------


def _scheme_of(url: str, allowed_schemes: tuple[str, ...]) -> str:
    """Return ``http``/``https``/``file`` (plain local paths count as ``file``)."""
    if not url or _BAD_URL_CHARS.search(url):
        raise DownloadError(f"invalid URL {url!r} (empty, or holds a space or control character)")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "":
        scheme = "file"
    elif scheme not in ("http", "https", "file"):
        raise DownloadError(f"unsupported URL scheme {scheme!r} in {url}")
    allowed = {s.lower() for s in allowed_schemes}
    if scheme not in allowed:
        plain = urlsplit(url).scheme == ""
        what = "local paths (scheme 'file')" if plain else f"scheme {scheme!r}"
        raise DownloadError(f"{what} not allowed for {url}; allowed: {', '.join(allowed_schemes)}")
    return scheme


def _safe_filename(url: str, filename: str | None, *, is_url: bool) -> str:
    if filename is None:
        path = urlsplit(url).path if is_url else url
        filename = unquote(path.rsplit("/", 1)[-1])
    if filename in ("", ".", "..") or "/" in filename or "\0" in filename:
        raise DownloadError(f"unsafe or empty file name {filename!r} for {url}; pass filename=")
    return filename


def _local_source(url: str, roots: tuple[Path, ...] | None, *, is_url: bool) -> Path:
    if is_url:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"file URL with remote host {parts.netloc!r} not supported: {url}")
        raw = urllib.request.url2pathname(unquote(parts.path))
    else:
        raw = url
    try:
        source = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError) as exc:
        raise DownloadError(f"cannot resolve local path for {url}: {exc}") from exc
    if roots is not None and not any(source.is_relative_to(Path(r).resolve()) for r in roots):
        raise DownloadError(
            f"local source {source} for {url} is outside the allowed roots: "
            + ", ".join(str(r) for r in roots)
        )
    if not source.is_file():
        raise DownloadError(f"no such file: {source} (from {url})")
    return source


# --------------------------------------------------------------------------------------------
# shared finishing steps
# --------------------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = read_json(path)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)


def _discard_part(target: _Target) -> None:
    _unlink_quietly(target.part)
    _unlink_quietly(target.part_meta)


def _result_for_existing(
    url: str, target: _Target, digests: tuple[str, str] | None = None
) -> DownloadResult:
    size = target.final.stat().st_size
    sha, md5 = digests or file_digests(target.final)
    logger.info("%s is current (%s bytes); skipping download of %s", target.final, size, url)
    return DownloadResult(
        path=target.final, url=url, sha256=sha, size=size, downloaded=False, md5=md5
    )


def _mismatch(expected: Checksum | None, digests: tuple[str, str]) -> str:
    """ "" when ``digests`` (sha256, md5) satisfy ``expected``, else what was found instead."""
    if expected is None:
        return ""
    got = digests[0] if expected.algorithm == "sha256" else digests[1]
    return "" if got == expected.hexdigest else f"{expected.algorithm}:{got}"


def _finalize(
    url: str, target: _Target, expected_sha: Checksum | None, extra_meta: dict[str, Any]
) -> DownloadResult:
    """Verify the complete ``.part`` and rename it onto the final name, then write the meta."""
    size = target.part.stat().st_size
    digests = file_digests(target.part)
    digest = digests[0]
    if got := _mismatch(expected_sha, digests):
        _discard_part(target)
        raise DownloadError(
            f"checksum mismatch for {url}: expected {expected_sha}, got {got} "
            "(the location serves other bytes)"
        )
    meta = {
        "url": url,
        "sha256": digest,
        "size": size,
        "etag": None,
        "last_modified": None,
        "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra_meta,
    }
    try:
        _fsync_file(target.part)
        # The old meta describes the old file: drop it first so a crash between the rename and
        # the new meta never pairs new bytes with old metadata.
        target.meta.unlink(missing_ok=True)
        os.replace(target.part, target.final)
        fsync_dir(target.final.parent)
        atomic_write_json(target.meta, meta)
    except OSError as exc:
        raise DownloadError(
            f"cannot move the download of {url} into {target.final}: {exc}", permanent=False
        ) from exc
    _unlink_quietly(target.part_meta)
    logger.info("saved %s (%s bytes, sha256 %s) from %s", target.final, size, digest, url)
    return DownloadResult(
        path=target.final, url=url, sha256=digest, size=size, downloaded=True, md5=digests[1]
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sha_current(target: _Target, expected_sha: Checksum) -> tuple[str, str] | None:
    """The final file's (sha256, md5) if they satisfy ``expected_sha``, else None."""
    if not target.final.is_file():
        return None
    digests = file_digests(target.final)
    if not (got := _mismatch(expected_sha, digests)):
        return digests
    logger.info("%s has %s, expected %s; fetching again", target.final, got, expected_sha)
    return None


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns


class _Progress:
    """Logs bytes done/total, percentage, rate and ETA at most every ~2 s, and at the end."""

    def __init__(self, label: str, done: int, total: int | None) -> None:
        self.label = label
        self.start_done = done
        self.done = done
        self.total = total
        self.started = time.monotonic()
        self.last_log = self.started

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last_log >= _PROGRESS_INTERVAL_S:
            self.last_log = now
            self._log(now, final=False)

    def finish(self) -> None:
        self._log(time.monotonic(), final=True)

    def _log(self, now: float, *, final: bool) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = (self.done - self.start_done) / elapsed
        if self.total:
            pct = 100.0 * self.done / self.total
            remaining = max(self.total - self.done, 0)
            eta = f"{remaining / rate:.0f} s" if rate > 0 else "unknown"
            logger.info(
                "%s %s: %s / %s (%.1f%%) at %.2f MB/s, ETA %s",
                self.label,
                "done" if final else "progress",
                _human_bytes(self.done),
                _human_bytes(self.total),
                pct,
                rate / 1e6,
                "0 s" if final else eta,
            )
        else:
            logger.info(
                "%s %s: %s at %.2f MB/s",
                self.label,
                "done" if final else "progress",
                _human_bytes(self.done),
                rate / 1e6,
            )


# --------------------------------------------------------------------------------------------
# file:// and local paths
# --------------------------------------------------------------------------------------------


def _fetch_local(
    url: str, source: Path, target: _Target, expected_sha: Checksum | None, *, chunk_size: int
) -> DownloadResult:
    st = source.stat()
    if target.final.is_file() and source.samefile(target.final):
        return _source_is_destination(url, target, expected_sha, st)
    if expected_sha:
        if digests := _sha_current(target, expected_sha):
            return _result_for_existing(url, target, digests)
    elif _local_meta_current(url, target, st):
        return _result_for_existing(url, target)
    logger.info("copying %s (%s) to %s", source, _human_bytes(st.st_size), target.final)
    _discard_part(target)
    progress = _Progress(f"copy {source.name}", 0, st.st_size)
    try:
        with open(source, "rb") as fin, open(target.part, "wb") as fout:
            for chunk in iter(lambda: fin.read(chunk_size), b""):
                fout.write(chunk)
                progress.add(len(chunk))
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        _discard_part(target)
        raise DownloadError(
            f"copy of {url} to {target.part} failed: {exc}", permanent=False
        ) from exc
    progress.finish()
    copied = target.part.stat().st_size
    if copied != st.st_size:
        _discard_part(target)
        raise DownloadError(
            f"source changed while copying {url}: expected {st.st_size} bytes, copied {copied}",
            permanent=False,
        )
    return _finalize(
        url,
        target,
        expected_sha,
        {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns},
    )


def _source_is_destination(
    url: str, target: _Target, expected_sha: Checksum | None, st: os.stat_result
) -> DownloadResult:
    """The source already lies under the final name: verify it, record it, never copy it."""
    digests = file_digests(target.final)
    digest = digests[0]
    if got := _mismatch(expected_sha, digests):
        raise DownloadError(
            f"checksum mismatch for {url}: expected {expected_sha}, got {got} "
            "(the source is the destination file itself; it was left in place)"
        )
    meta = _read_meta(target.meta)
    if not (meta and meta.get("url") == url and meta.get("sha256") == digest):
        atomic_write_json(
            target.meta,
            {
                "url": url,
                "sha256": digest,
                "size": st.st_size,
                "etag": None,
                "last_modified": None,
                "source_size": st.st_size,
                "source_mtime_ns": st.st_mtime_ns,
                "downloaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
    return _result_for_existing(url, target, digests)


def _local_meta_current(url: str, target: _Target, st: os.stat_result) -> bool:
    if not target.final.is_file():
        return False
    meta = _read_meta(target.meta)
    if meta is None or meta.get("url") != url:
        return False
    return (
        meta.get("size") == target.final.stat().st_size
        and meta.get("source_size") == st.st_size
        and meta.get("source_mtime_ns") == st.st_mtime_ns
    )


# --------------------------------------------------------------------------------------------
# HTTP(S)
# --------------------------------------------------------------------------------------------


class _CheckedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http/https targets whose scheme is allowed; keeps HEAD a HEAD."""

    def __init__(self, allowed_schemes: tuple[str, ...]) -> None:
        super().__init__()
        self._allowed = {s.lower() for s in allowed_schemes} & set(_HTTP_SCHEMES)

    def _check(self, req: urllib.request.Request, headers: HTTPMessage) -> None:
        location = headers.get("location") or headers.get("uri")
        if not location:
            return
        newurl = urljoin(req.full_url, location.strip())
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in self._allowed:
            raise DownloadError(
                f"refused redirect from {req.full_url} to {newurl}: scheme {scheme!r} not allowed"
            )

    def http_error_302(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage
    ) -> Any:
        self._check(req, headers)
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        scheme = urlsplit(newurl).scheme.lower()
        if scheme not in self._allowed:
            raise DownloadError(
                f"refused redirect from {req.full_url} to {newurl}: scheme {scheme!r} not allowed"
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_method() == "HEAD":
            new.method = "HEAD"
        return new


def _opener(allowed_schemes: tuple[str, ...]) -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_CheckedRedirectHandler(allowed_schemes))


def _header(headers: Message, name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if value else None


def _int_header(headers: Message, name: str) -> int | None:
    value = _header(headers, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    return isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, TimeoutError)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if _is_timeout(exc):
        return f"timeout: no data from the server within {timeout_s:g} s"
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        return f"connection error: {exc.reason}"
    if isinstance(exc, _TransientError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fetch_http(
    url: str,
    target: _Target,
    expected_sha: Checksum | None,
    *,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    allowed_schemes: tuple[str, ...],
    chunk_size: int,
) -> DownloadResult:
    opener = _opener(allowed_schemes)
    if expected_sha:
        if digests := _sha_current(target, expected_sha):
            return _result_for_existing(url, target, digests)
    elif _http_meta_current(url, target, opener, timeout_s):
        return _result_for_existing(url, target)

    attempts = retries + 1
    validators = _Validators()
    for attempt in range(attempts):
        try:
            validators = _http_attempt(url, target, opener, timeout_s, chunk_size)
            break
        except DownloadError:
            raise
        except (http.client.InvalidURL, ValueError) as exc:
            raise DownloadError(f"invalid URL {url!r}: {exc}") from exc
        except (_TransientError, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.URLError) and isinstance(
                exc.reason, ssl.SSLCertVerificationError
            ):
                msg = f"TLS certificate check failed for {url}: {exc.reason}"
                raise DownloadError(msg) from exc
            reason = _describe(exc, timeout_s)
            if attempt + 1 >= attempts:
                raise DownloadError(
                    f"download of {url} failed after {attempts} attempt(s): {reason}",
                    permanent=False,
                ) from exc
            delay = min(backoff_s * 2**attempt, _MAX_BACKOFF_S)
            logger.warning(
                "attempt %s/%s for %s failed (%s); retrying in %.2f s, resuming from %s bytes",
                attempt + 1,
                attempts,
                url,
                reason,
                delay,
                _part_size(target.part),
            )
            time.sleep(delay)
    return _finalize(
        url,
        target,
        expected_sha,
        {"etag": validators.etag, "last_modified": validators.last_modified},
    )


def _http_meta_current(
    url: str, target: _Target, opener: urllib.request.OpenerDirector, timeout_s: float
) -> bool:
    if not target.final.is_file():
        return False
    meta = _read_meta(target.meta)
    if meta is None or meta.get("url") != url or meta.get("size") != target.final.stat().st_size:
        return False
    request = urllib.request.Request(
        url, method="HEAD", headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            headers = response.headers
    except (DownloadError, OSError, http.client.HTTPException) as exc:
        logger.info("HEAD %s failed (%s); downloading again", url, _describe(exc, timeout_s))
        return False
    remote: dict[str, object] = {}
    length = _int_header(headers, "Content-Length")
    if length is not None:
        remote["size"] = length
    for key, name in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        value = _header(headers, name)
        if value is not None:
            remote[key] = value
    if not remote:
        logger.info("HEAD %s returned no validators; downloading again", url)
        return False
    changed = [key for key, value in remote.items() if meta.get(key) != value]
    if changed:
        logger.info("%s changed on the server (%s); downloading again", url, ", ".join(changed))
        return False
    return True


def _part_size(part: Path) -> int:
    try:
        return part.stat().st_size
    except FileNotFoundError:
        return 0


def _load_part_validators(url: str, target: _Target) -> _Validators | None:
    """Validators recorded when the ``.part`` was started, or None if it cannot be trusted."""
    meta = _read_meta(target.part_meta)
    if meta is None or meta.get("url") != url:
        return None
    total = meta.get("total")
    return _Validators(
        etag=meta.get("etag") or None,
        last_modified=meta.get("last_modified") or None,
        total=total if isinstance(total, int) else None,
    )


def _restart(target: _Target, reason: str, url: str) -> None:
    if _part_size(target.part) or target.part_meta.exists():
        logger.info("restarting %s from zero: %s", url, reason)
    _discard_part(target)


def _http_attempt(
    url: str,
    target: _Target,
    opener: urllib.request.OpenerDirector,
    timeout_s: float,
    chunk_size: int,
) -> _Validators:
    """One attempt; returns the validators of a complete ``.part``. Restarts do not count."""
    for _pass in range(2):
        offset = _part_size(target.part)
        recorded = _load_part_validators(url, target) if offset else None
        if offset and recorded is None:
            _restart(target, "partial file has no matching .part.json", url)
            offset = 0
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if offset and recorded is not None:
            headers["Range"] = f"bytes={offset}-"
            if recorded.etag and not recorded.etag.startswith("W/"):
                headers["If-Range"] = recorded.etag
            elif recorded.last_modified:
                headers["If-Range"] = recorded.last_modified
        request = urllib.request.Request(url, headers=headers)
        try:
            response = opener.open(request, timeout=timeout_s)
        except urllib.error.HTTPError as exc:
            try:
                outcome = _handle_http_error(url, target, exc, offset, recorded)
            finally:
                _close_quietly(exc)
            if outcome is not None:
                return outcome
            continue  # restart from zero
        with response:
            done = _consume(url, target, response, offset, recorded, chunk_size)
        if done is not None:
            return done
    raise _TransientError(f"server kept sending unusable ranges for {url}")


def _close_quietly(resource: Any) -> None:
    # An HTTPError built without a body has nothing to close and may raise here.
    with contextlib.suppress(Exception):
        resource.close()


def _handle_http_error(
    url: str,
    target: _Target,
    exc: urllib.error.HTTPError,
    offset: int,
    recorded: _Validators | None,
) -> _Validators | None:
    """Return validators if the part is complete (416), None to restart; raise otherwise."""
    code = exc.code
    if code == 416:
        match = _UNSATISFIED_RANGE_RE.match(_header(exc.headers, "Content-Range") or "")
        total = int(match.group(1)) if match else None
        if offset and recorded is not None and total == offset:
            logger.info("%s: partial file already complete (%s bytes)", url, offset)
            return recorded
        _restart(target, f"HTTP 416 with {offset} bytes on disk, server total {total}", url)
        return None
    if code == 429 or 500 <= code <= 599:
        raise _TransientError(f"HTTP {code} {exc.reason}")
    if 300 <= code <= 399:
        raise DownloadError(f"HTTP {code} {exc.reason} for {url}: redirect not followed")
    raise DownloadError(f"HTTP {code} {exc.reason} for {url}")


def _consume(
    url: str,
    target: _Target,
    response: http.client.HTTPResponse,
    offset: int,
    recorded: _Validators | None,
    chunk_size: int,
) -> _Validators | None:
    """Stream the body into the ``.part``; None asks for a restart from zero."""
    headers = response.headers
    etag = _header(headers, "ETag")
    last_modified = _header(headers, "Last-Modified")
    length = _int_header(headers, "Content-Length")
    status = response.status
    if status == 206:
        match = _CONTENT_RANGE_RE.match(_header(headers, "Content-Range") or "")
        if not offset or recorded is None or match is None:
            _restart(target, f"unexpected 206 (Content-Range {headers.get('Content-Range')})", url)
            return None
        start, end, total_raw = int(match.group(1)), int(match.group(2)), match.group(3)
        total = int(total_raw) if total_raw != "*" else None
        if start != offset:
            _restart(target, f"Content-Range starts at {start}, expected {offset}", url)
            return None
        changed = (
            _differs(etag, recorded.etag)
            or _differs(last_modified, recorded.last_modified)
            or _differs(total, recorded.total)
        )
        if changed:
            _restart(target, "the file changed on the server since the partial download", url)
            return None
        expected_end: int | None = total if total is not None else (end + 1)
        validators = _Validators(
            etag=recorded.etag or etag,
            last_modified=recorded.last_modified or last_modified,
            total=total,
        )
        mode = "ab"
    elif status == 200:
        if offset:
            logger.info("%s: server sent the whole file (status 200); restarting from zero", url)
        _discard_part(target)
        offset = 0
        expected_end = length
        validators = _Validators(etag=etag, last_modified=last_modified, total=length)
        atomic_write_json(
            target.part_meta,
            {
                "url": url,
                "etag": etag,
                "last_modified": last_modified,
                "total": length,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        mode = "wb"
    else:
        raise DownloadError(f"HTTP {status} {response.reason} for {url}: unexpected status")

    logger.info(
        "downloading %s -> %s (%s)%s",
        url,
        target.final,
        _human_bytes(expected_end) if expected_end is not None else "size unknown",
        f", resuming at {offset} bytes" if offset else "",
    )
    progress = _Progress(f"download {target.final.name}", offset, expected_end)
    _stream(response, target.part, mode, chunk_size, progress)
    size = _part_size(target.part)
    if expected_end is not None and size < expected_end:
        raise _TransientError(f"connection closed early: have {size} of {expected_end} bytes")
    if expected_end is not None and size > expected_end:
        _restart(target, f"got {size} bytes, more than the expected {expected_end}", url)
        raise _TransientError(f"received more bytes than announced ({size} > {expected_end})")
    progress.finish()
    return validators


def _differs(seen: object, recorded: object) -> bool:
    """True when both values are known and disagree."""
    return seen is not None and recorded is not None and seen != recorded


def _stream(
    response: http.client.HTTPResponse,
    part: Path,
    mode: str,
    chunk_size: int,
    progress: _Progress,
) -> None:
    try:
        fh = open(part, mode)  # noqa: SIM115 - closed in finally, write errors are fatal
    except OSError as exc:
        raise DownloadError(f"cannot open {part}: {exc}", permanent=False) from exc
    # read1 returns whatever one receive brings, so a stall or drop loses no received bytes.
    read = getattr(response, "read1", response.read)
    try:
        while True:
            chunk = read(chunk_size)  # network errors propagate (and are retried)
            if not chunk:
                break
            try:
                fh.write(chunk)
            except OSError as exc:
                raise DownloadError(f"cannot write {part}: {exc}", permanent=False) from exc
            progress.add(len(chunk))
        fh.flush()
        os.fsync(fh.fileno())
    finally:
        fh.close()


# --------------------------------------------------------------------------------------------
# ordered locations (mirrors)
# --------------------------------------------------------------------------------------------


def split_locations(value: str | Sequence[str]) -> list[str]:
    """Locations from a whitespace-separated string or a list (each item may hold several)."""
    items = [value] if isinstance(value, str) else list(value)
    return [loc for item in items for loc in str(item or "").split()]


def local_path(location: str) -> Path | None:
    """The local file or folder ``location`` names (a plain path or ``file://`` URL), or None
    (another scheme)."""
    parts = urlsplit(location)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        raw = urllib.request.url2pathname(unquote(parts.path))
    elif parts.scheme == "":
        raw = location
    else:
        return None
    try:
        return Path(raw).expanduser().resolve()
    except (OSError, RuntimeError):
        return None


def _local_folder(location: str) -> Path | None:
    """The folder ``location`` names (a plain path or ``file://`` URL), or None."""
    path = local_path(location)
    return path if path is not None and path.is_dir() else None


def fetch_first(
    locations: str | Sequence[str],
    dest_dir: Path,
    *,
    what: str,
    checksum: str | Checksum | None = None,
    allow_folders: bool = False,
    help_text: str = "",
    **kwargs: Any,
) -> DownloadResult:
    """Fetch from the first of ``locations`` that works and gives the right bytes.

    Locations are tried in order; one that fails (404, unreachable, wrong checksum, ...) is
    logged and the next is tried. With ``allow_folders``, a location that is a local folder
    holding images is used in place (``kind="folder"``; a checksum does not apply to it).
    When every location fails, :class:`SourceUnavailable` names each one with what happened,
    followed by ``help_text``; it is permanent when every failure was. ``kwargs`` go to
    :func:`fetch`.
    """
    from imgsim.sources.labels import find_images

    locs = split_locations(locations)
    expected = checksum if isinstance(checksum, Checksum) else parse_checksum(checksum or "")
    attempts: list[tuple[str, str]] = []
    permanent = True
    for loc in locs:
        folder = _local_folder(loc) if allow_folders else None
        if folder is not None:
            if find_images(folder):
                logger.info("%s: using the images already in the folder %s", what, folder)
                return DownloadResult(
                    path=folder,
                    url=loc,
                    sha256="",
                    size=0,
                    downloaded=False,
                    kind="folder",
                    tried=tuple(a for a, _ in attempts),
                )
            attempts.append((loc, "a folder without any .jpg/.jpeg/.png image"))
            continue
        try:
            result = fetch(loc, dest_dir, checksum=expected, **kwargs)
        except DownloadError as exc:
            logger.warning("%s: location %s failed: %s", what, loc, exc)
            attempts.append((loc, str(exc)))
            permanent = permanent and exc.permanent
            continue
        if attempts:
            logger.info("%s: got it from %s after %d failed location(s)", what, loc, len(attempts))
        return DownloadResult(**{**result.__dict__, "tried": tuple(a for a, _ in attempts)})
    if not locs:
        raise SourceUnavailable(
            f"no location given for the {what}. {help_text}".strip(), [], permanent=True
        )
    lines = [
        f"could not get the {what} from any of its {len(locs)} location(s)"
        + (f" (expected {expected})" if expected else "")
        + ":"
    ]
    lines += [f"  {i}. {loc}: {why}" for i, (loc, why) in enumerate(attempts, start=1)]
    if help_text:
        lines.append(help_text)
    raise SourceUnavailable("\n".join(lines), attempts, permanent=permanent)
