"""The imgsim pages inside the Airflow UI: model versions, the latest query results, an upload.

A FastAPI app that ``plugins/imgsim_plugin.py`` mounts under ``/imgsim`` of the Airflow API
server, with menu entries in the Airflow navigation:

- ``/imgsim/``: the published model versions (CURRENT marked), from their manifests;
- ``/imgsim/gallery``: the newest ``queries/results/<run>/results.json``, each query beside its
  neighbours, with class names and distances (``?run=<name>`` shows an older run);
- ``/imgsim/search``: upload one image and see its neighbours in the current version, looked up
  in-process (the same code as ``imgsim query``); the upload is kept as
  ``queries/uploads/<sha256>.<ext>``;
- ``/imgsim/thumb/<image_id>`` and ``/imgsim/photo?path=...``: the pictures of those pages.

Every route needs Airflow's authentication (the ``get_user`` dependency: the JWT in the
``Authorization: Bearer`` header or the UI's ``_token`` cookie). Without it an API client gets
401, and a browser asking for a page is redirected to the login page. ``/photo`` serves only
files inside the data root (after resolving symlinks and ``..``), and only as a re-encoded
JPEG of a decodable image, so no other file content can leave the server through it.

Settings (the data root above all) are read with ``Settings.from_env()`` on every request.
Module import is light (FastAPI and Airflow's auth dependency); torch, PIL, pyarrow and NumPy
are imported inside the handlers that need them.
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgsim.config import Layout, Settings

log = logging.getLogger(__name__)

#: Largest accepted upload.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Image formats accepted as uploads (Pillow format name -> file extension).
UPLOAD_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
#: Neighbours per upload: default and upper bound.
DEFAULT_K, MAX_K = 5, 50
#: Runs listed on the gallery page.
RECENT_RUNS = 12

IMAGE_ID_RE = re.compile(r"^[0-9a-f]{64}$")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")

#: The signed-in Airflow user (401 without a valid token); every route depends on it.
CurrentUser = Annotated[BaseUser, Depends(get_user)]

app = FastAPI(
    title="imgsim",
    description="imgsim pages in the Airflow UI: model versions, query results, upload",
    dependencies=[Depends(get_user)],
    docs_url=None, redoc_url=None, openapi_url=None,   # nothing reachable without a login
)


# --------------------------------------------------------------------------------------------
# Authentication errors: redirect a browser to the login page, 401/403 for API clients


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def login_url(request: Request) -> str:
    """Airflow's login page, coming back to the requested URL afterwards."""
    next_url = str(request.url)
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return str(get_auth_manager().get_url_login(next_url=next_url))
    except Exception:  # no auth manager initialised (e.g. the app served outside Airflow)
        return "/auth/login?" + urlencode({"next": next_url})


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code in (401, 403) and request.method == "GET" and _wants_html(request):
        return RedirectResponse(login_url(request), status_code=303)
    if _wants_html(request):
        body = _page(request, f"Error {exc.status_code}", _error_box(str(exc.detail)), user=None)
        return Response(body, status_code=exc.status_code, media_type="text/html",
                        headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# --------------------------------------------------------------------------------------------
# HTML


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


_CSS = """
:root { color-scheme: light; --fg:#1a202c; --muted:#5f6b7a; --line:#d8dee6; --accent:#017cee;
        --bg:#ffffff; --tile:#f4f6f8; --bad:#b42318; --badbg:#fdecea; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color:var(--fg); background:var(--bg); }
header { padding:12px 20px; border-bottom:1px solid var(--line); display:flex; gap:20px;
         align-items:baseline; flex-wrap:wrap; }
header h1 { font-size:18px; margin:0; }
nav a { margin-right:14px; color:var(--accent); text-decoration:none; }
nav a.active { font-weight:600; border-bottom:2px solid var(--accent); }
.who { margin-left:auto; color:var(--muted); }
main { padding:16px 20px 40px; }
h2 { font-size:16px; margin:22px 0 8px; }
.meta { color:var(--muted); margin:4px 0 12px; }
table { border-collapse:collapse; width:100%; }
th, td { border-bottom:1px solid var(--line); padding:6px 8px; text-align:left;
         vertical-align:top; }
th { font-weight:600; background:var(--tile); }
td.num { text-align:right; font-variant-numeric:tabular-nums; }
tr.current { background:#eaf4fe; }
.badge { display:inline-block; background:var(--accent); color:#fff; border-radius:9px;
         padding:0 7px; font-size:11px; font-weight:600; margin-left:6px; }
.badge.bad { background:var(--bad); }
tr.damaged { background:var(--badbg); }
td.files ul { margin:2px 0 0; padding-left:16px; }
.error { border:1px solid var(--bad); background:var(--badbg); color:var(--bad);
         padding:10px 14px; border-radius:6px; margin:10px 0; }
.query { border:1px solid var(--line); border-radius:8px; padding:10px 12px; margin:12px 0; }
.query h3 { font-size:14px; margin:0 0 8px; }
.row { display:flex; gap:10px; flex-wrap:wrap; align-items:flex-start; }
figure { margin:0; width:172px; }
figure img, .missing { width:172px; height:172px; object-fit:contain; background:var(--tile);
                       border:1px solid var(--line); border-radius:4px; display:block; }
.missing { display:flex; align-items:center; justify-content:center; color:var(--muted); }
figure.q img { border:2px solid var(--accent); }
figcaption { font-size:12px; margin-top:4px; overflow-wrap:anywhere; }
.note { color:var(--muted); font-style:italic; }
code { font-size:12px; }
form.upload { display:flex; gap:12px; align-items:center; flex-wrap:wrap;
              border:1px solid var(--line); border-radius:8px; padding:12px; }
button { background:var(--accent); color:#fff; border:0; border-radius:6px; padding:7px 14px;
         font-weight:600; cursor:pointer; }
ul.runs { margin:4px 0 10px; padding-left:18px; }
"""

_NAV = (("", "Model versions", "versions"), ("gallery", "Latest queries", "gallery"),
        ("search", "Find similar images", "search"))


def _user_name(user: Any) -> str:
    if user is None:
        return ""
    try:
        return str(user.get_name())
    except Exception:
        return str(getattr(user, "username", "") or "")


def _page(request: Request, title: str, body: str, *, user: Any, active: str = "") -> str:
    base = request.scope.get("root_path", "").rstrip("/") + "/"
    links = "".join(
        f'<a href="{href or "./"}" id="nav-{key}"'
        f'{" class=active" if key == active else ""}>{label}</a>'
        for href, label, key in _NAV)
    who = _user_name(user)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<base href="{_esc(base)}">',
        f"<title>imgsim &ndash; {_esc(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<header><h1>imgsim &ndash; {_esc(title)}</h1><nav>{links}</nav>"
        f'<span class="who">{"signed in as " + _esc(who) if who else ""}</span></header>',
        f"<main>{body}</main>",
        "</body></html>",
        "",
    ])


def _html(request: Request, title: str, body: str, *, user: Any, active: str = "",
          status_code: int = 200) -> Response:
    return Response(_page(request, title, body, user=user, active=active),
                    status_code=status_code, media_type="text/html",
                    headers={"Cache-Control": "no-store"})


def _error_box(message: str) -> str:
    return f'<div class="error" id="error" role="alert">{_esc(message)}</div>'


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    try:
        return format(float(value), spec) + suffix
    except (TypeError, ValueError):
        return "&ndash;"


def _pct(value: Any) -> str:
    try:
        return f"{100 * float(value):.0f}%"
    except (TypeError, ValueError):
        return "&ndash;"


# --------------------------------------------------------------------------------------------
# Model versions


@dataclass(frozen=True)
class VersionRow:
    version: str
    current: bool
    manifest: dict[str, Any] | None
    error: str | None = None
    files: str = "not recorded"          # models.Integrity.status of a sizes check
    problems: tuple[str, ...] = ()       # what that check (or the last sha256 check) found


def version_rows(layout: Layout) -> list[VersionRow]:
    """Published versions, newest first, each with its manifest (or why it is unreadable) and
    the state of its files (sizes against those recorded at publish)."""
    from imgsim.models import check_version, current_version, published_versions, read_manifest

    current = current_version(layout)
    rows: list[VersionRow] = []
    for version in reversed(published_versions(layout)):
        files = check_version(layout, version)
        status, problems = files.status, tuple(files.problems)
        try:
            rows.append(VersionRow(version, version == current, read_manifest(layout, version),
                                   files=status, problems=problems))
        except Exception as exc:  # one broken manifest must not hide the others
            rows.append(VersionRow(version, version == current, None,
                                   f"{type(exc).__name__}: {exc}", files=status,
                                   problems=problems))
    return rows


def _files_cell(row: VersionRow) -> str:
    if not row.problems:
        return f'<td class="files">{_esc(row.files)}</td>'
    items = "".join(f"<li>{_esc(p)}</li>" for p in row.problems)
    return f'<td class="files error"><b>damaged</b><ul>{items}</ul></td>'


def _version_row_html(row: VersionRow) -> str:
    badge = '<span class="badge">CURRENT</span>' if row.current else ""
    if row.problems:
        badge += '<span class="badge bad">DAMAGED</span>'
    css = "version" + (" current" if row.current else "") + (" damaged" if row.problems else "")
    head = (f'<tr class="{css}" data-version="{_esc(row.version)}" data-files="'
            f'{_esc(row.files)}"><td><code>{_esc(row.version)}</code>{badge}</td>')
    m = row.manifest
    if m is None:
        return (head + f'<td colspan="10" class="error">manifest unreadable: '
                f"{_esc(row.error)}</td>{_files_cell(row)}</tr>")
    from imgsim.models import describe_lsh

    backbone, lsh = m.get("backbone") or {}, m.get("lsh") or {}
    metrics, counts = m.get("metrics") or {}, m.get("counts") or {}
    bb = f"{_esc(backbone.get('name'))} {_esc(backbone.get('dim'))}-d"
    weights = backbone.get("weights")
    if weights:
        sha = backbone.get("weights_sha256")
        bb += f'<br><code title="sha256 {_esc(sha)}">{_esc(weights)}</code>'
    cells = [
        _esc(str(m.get("created_at") or "")[:19].replace("T", " ")),
        f'<td class="num">{_esc(counts.get("indexed"))}</td>',
        bb,
        f'<td class="num">{_esc(describe_lsh(lsh))}</td>',
        f'<td class="num">{_fmt(lsh.get("bucketLength"), ".4g")}</td>',
        f'<td class="num">{_fmt(metrics.get("recall_at_k"), ".3f")}</td>',
        f'<td class="num">{_pct(metrics.get("candidates_share"))}</td>',
        f'<td class="num">{_fmt(metrics.get("label_hit_at_k"), ".3f")}</td>',
        f'<td class="num">{_fmt(metrics.get("label_precision_at_k"), ".3f")}</td>',
    ]
    cells.insert(3, _projection_cell(m.get("projection")))
    return (head + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
            + _files_cell(row) + "</tr>")


def _projection_cell(entry: dict[str, Any] | None) -> str:
    """The version's search space: kind and dims, what it was learned from, and its
    cross-validated label precision (the reason in the tooltip)."""
    if not entry or entry.get("kind", "none") == "none":
        why = (entry or {}).get("reason") or "a version without a projection"
        return f'<td class="projection" title="{_esc(why)}">none</td>'
    params, cov = entry.get("params") or {}, entry.get("coverage") or {}
    lines = [f"<b>{_esc(entry['kind'])}</b> {_esc(entry.get('dim'))}&rarr;"
             f"{_esc(entry.get('dims'))}-d"]
    if cov:
        lines.append(f"labels {_pct(cov.get('share'))} ({_esc(cov.get('classes'))} classes)")
    if "shrinkage" in params:
        lines.append(f"shrinkage {_esc(params['shrinkage'])}")
    if params.get("cv_precision_at_k") is not None:
        lines.append(f"CV precision@5 {_fmt(params['cv_precision_at_k'], '.3f')} "
                     f"(vs {_esc(params.get('cv_baseline'))})")
    return (f'<td class="projection" title="{_esc(entry.get("reason"))}">'
            + "<br>".join(lines) + "</td>")


def _current_warning(layout: Layout, rows: list[VersionRow]) -> list[str]:
    """An error box when CURRENT names no published version or a damaged one."""
    from imgsim.models import current_version

    current = current_version(layout)
    row = next((r for r in rows if r.current), None)
    if current is not None and row is None:
        return [f'<div class="error" id="current-problem">CURRENT names <code>{_esc(current)}'
                "</code>, which is not a published version; queries fail until "
                "<code>imgsim rollback VERSION</code> points it at one.</div>"]
    if row is not None and row.problems:
        return [f'<div class="error" id="current-problem">The CURRENT version <code>'
                f"{_esc(current)}</code> is damaged; queries fail until <code>imgsim rollback "
                "VERSION</code> makes an intact version current.</div>"]
    return []


@app.get("/", include_in_schema=False)
def versions_page(request: Request, user: CurrentUser) -> Response:
    settings = Settings.from_env()
    layout = settings.layout
    rows = version_rows(layout)
    if not rows:
        body = (f'<p id="no-versions">No published model version under '
                f"<code>{_esc(layout.models)}</code> yet. Trigger the <b>imgsim_index</b> DAG "
                "to build one.</p>")
        return _html(request, "Model versions", body, user=user, active="versions")
    ks = {(r.manifest or {}).get("metrics", {}).get("k") for r in rows if r.manifest}
    k = ks.pop() if len(ks) == 1 else "k"
    current = next((r.version for r in rows if r.current), None)
    body = "\n".join([
        *_current_warning(layout, rows),
        f'<p class="meta">Data root <code>{_esc(layout.root)}</code> &middot; '
        f"{len(rows)} published version{'s' if len(rows) != 1 else ''} &middot; "
        f'CURRENT: <code id="current-version">{_esc(current or "none")}</code></p>',
        '<table id="versions"><thead><tr><th>version</th><th>created (UTC)</th>'
        "<th>images</th><th>backbone + weights</th><th>search space</th><th>LSH keys</th>"
        f"<th>bucketLength</th><th>recall@{_esc(k)}</th><th>candidates share</th>"
        f"<th>label hit@{_esc(k)}</th><th>label precision@{_esc(k)}</th><th>files</th>"
        "</tr></thead><tbody>",
        *(_version_row_html(r) for r in rows),
        "</tbody></table>",
        '<p class="meta">search space: the learned projection the index searches in (LDA '
        "from the labels, or whitening), with its cross-validated label precision inside the "
        "references; recall: LSH answers against exact search on a validation sample; "
        "candidates share: the part of the index compared per query; label hit / precision: "
        "neighbours of the same class among the first k, for references querying the rest "
        "(in-sample for a learned space: its cross-validated precision is the honest "
        "figure); files: sizes against those recorded at publish "
        "(<code>imgsim versions --verify</code> checks sha256 too). "
        "<code>imgsim rollback VERSION</code> moves CURRENT.</p>",
    ])
    return _html(request, "Model versions", body, user=user, active="versions")


# --------------------------------------------------------------------------------------------
# Picture URLs and path checks


def inside(path: Path, root: Path) -> Path | None:
    """``path`` resolved (symlinks and ``..`` followed) if it lies inside ``root``, else None."""
    try:
        resolved = path.resolve(strict=False)
        return resolved if resolved.is_relative_to(root.resolve()) else None
    except (OSError, RuntimeError, ValueError):
        return None


def _photo_url(path: str) -> str:
    return f"photo?{urlencode({'path': path})}"


def _thumb_url(image_id: str) -> str:
    return f"thumb/{quote(image_id)}"


def _relative(path: Path, layout: Layout) -> str | None:
    """``path`` as a data-root-relative string if it is inside the data root."""
    resolved = inside(path, layout.root)
    return None if resolved is None else str(resolved.relative_to(layout.root.resolve()))


def _query_picture(query: Mapping[str, Any], layout: Layout) -> str | None:
    """The URL of a result's query image, if a copy of it lies inside the data root."""
    for key in ("query_copy", "query_path"):
        raw = query.get(key)
        if raw and Path(str(raw)).is_file():
            rel = _relative(Path(str(raw)), layout)
            if rel is not None:
                return _photo_url(rel)
    return None


def _neighbour_picture(neighbour: Mapping[str, Any], layout: Layout) -> str | None:
    image_id = str(neighbour.get("image_id") or "")
    if IMAGE_ID_RE.match(image_id) and (layout.thumbs / f"{image_id}.jpg").is_file():
        return _thumb_url(image_id)
    raw = neighbour.get("path")
    if raw and (layout.root / str(raw)).is_file() and _relative(layout.root / str(raw), layout):
        return _photo_url(str(raw))
    return None


def _figure(url: str | None, alt: str, caption: str, css: str = "") -> str:
    img = (f'<img src="{_esc(url)}" alt="{_esc(alt)}" loading="lazy">' if url
           else '<div class="missing">no picture</div>')
    cls = f' class="{css}"' if css else ""
    return f"<figure{cls}>{img}<figcaption>{caption}</figcaption></figure>"


def _neighbours_html(neighbours: Iterable[Mapping[str, Any]], layout: Layout) -> list[str]:
    out = []
    for n in sorted(neighbours, key=lambda n: n.get("rank") or 0):
        image_id = str(n.get("image_id") or "")
        class_name = n.get("class_name") or (
            f"class {n['class_id']}" if n.get("class_id") is not None else "no label")
        caption = (f'<b>#{_esc(n.get("rank"))}</b> <span class="class-name">'
                   f'{_esc(class_name)}</span><br>distance <span class="distance">'
                   f'{_fmt(n.get("distance"), ".4f")}</span><br>'
                   f'<code title="{_esc(n.get("path") or image_id)}">{_esc(image_id[:12])}</code>')
        out.append(_figure(_neighbour_picture(n, layout), f"#{n.get('rank')} {class_name}",
                           caption, "neighbour"))
    return out


# --------------------------------------------------------------------------------------------
# Latest query results


def result_runs(layout: Layout) -> list[Path]:
    """``queries/results/<run>/`` folders with a results.json, newest first."""
    root = layout.queries / "results"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        results = p / "results.json"
        if p.is_dir() and RUN_NAME_RE.match(p.name) and results.is_file():
            found.append((results.stat().st_mtime, p))
    return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name), reverse=True)]


def _query_html(query: Mapping[str, Any], layout: Layout, k: int) -> str:
    name = query.get("query_name") or Path(str(query.get("query_path") or "?")).name
    status = str(query.get("status") or "?")
    parts = [f'<section class="query" data-status="{_esc(status)}">',
             f"<h3>{_esc(name)} <small class=meta>{_esc(status)}</small></h3>",
             '<div class="row">',
             _figure(_query_picture(query, layout), f"query {name}",
                     f"<b>query</b><br>{_esc(name)}", "q")]
    if status == "rejected":
        parts.append(_error_box(f"rejected: {query.get('reason') or '?'}: "
                                f"{query.get('detail') or ''}"))
    elif status == "already_answered":
        parts.append(f'<p class="note">already answered: {_esc(query.get("detail"))}</p>')
    else:
        parts += _neighbours_html(query.get("neighbours") or [], layout)
    parts.append("</div>")
    found = len(query.get("neighbours") or [])
    if query.get("note"):
        parts.append(f'<p class="note">{_esc(query["note"])}</p>')
    elif status == "answered" and found < k:
        parts.append(f'<p class="note">found {found} of {k} requested neighbours</p>')
    parts.append("</section>")
    return "\n".join(parts)


@app.get("/gallery", include_in_schema=False)
def gallery_page(request: Request, user: CurrentUser,
                 run: Annotated[str | None, Query()] = None) -> Response:
    from imgsim.fsutil import read_json

    layout = Settings.from_env().layout
    runs = result_runs(layout)
    if run is not None:
        if not RUN_NAME_RE.match(run) or not (layout.queries / "results" / run /
                                              "results.json").is_file():
            raise HTTPException(404, f"no query results named {run!r}")
        chosen = layout.queries / "results" / run
    elif runs:
        chosen = runs[0]
    else:
        body = ('<p id="no-results">No query results yet. Drop photos into '
                f"<code>{_esc(layout.queries / 'inbox')}</code> and trigger <b>imgsim_query</b>, "
                'run <code>imgsim query PHOTO</code>, or <a href="search">upload one</a>.</p>')
        return _html(request, "Latest queries", body, user=user, active="gallery")
    try:
        results = read_json(chosen / "results.json")
    except (OSError, ValueError) as exc:
        raise HTTPException(500, f"{chosen / 'results.json'} is unreadable: {exc}") from exc
    queries = list(results.get("queries") or [])
    try:
        k = int(results.get("k") or 0)
    except (TypeError, ValueError):
        k = 0
    others = "".join(
        f'<li><a href="gallery?{urlencode({"run": p.name})}">{_esc(p.name)}</a></li>'
        for p in runs[:RECENT_RUNS])
    body = "\n".join([
        f'<p class="meta" id="run-meta">run <code id="run-id">{_esc(results.get("run_id"))}'
        f'</code> &middot; model <code id="run-version">{_esc(results.get("model_version"))}'
        f"</code> &middot; k = {k} &middot; created {_esc(results.get('created_at'))} &middot; "
        f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'} &middot; files in "
        f"<code>{_esc(chosen)}</code></p>",
        *(_query_html(q, layout, k) for q in queries),
        "" if queries else '<p class="meta">This run has no queries.</p>',
        f'<h2>Recent runs</h2><ul class="runs">{others}</ul>',
    ])
    return _html(request, "Latest queries", body, user=user, active="gallery")


# --------------------------------------------------------------------------------------------
# Pictures


@app.get("/thumb/{image_id}", include_in_schema=False)
def thumb(image_id: str) -> Response:
    """A reference image's 224x224 thumbnail (``thumbs/<image_id>.jpg``)."""
    if not IMAGE_ID_RE.match(image_id):
        raise HTTPException(404, "not an image id")
    layout = Settings.from_env().layout
    path = inside(layout.thumbs / f"{image_id}.jpg", layout.root)
    if path is None or not path.is_file():
        raise HTTPException(404, f"no thumbnail for {image_id}")
    return FileResponse(path, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400"})


def render_jpeg(path: Path, size: int, max_pixels: int) -> bytes:
    """A JPEG of the image at ``path`` fitted into size x size; ImageRejected if not an image."""
    from PIL import Image, ImageOps

    from imgsim.imaging import load_rgb

    decoded = load_rgb(path, max_pixels=max_pixels, draft_size=(size, size))
    image = ImageOps.contain(decoded.image, (size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@app.get("/photo", include_in_schema=False)
def photo(path: Annotated[str, Query(min_length=1, max_length=4096)],
          size: Annotated[int, Query(ge=32, le=1024)] = 320) -> Response:
    """An image under the data root (a query photo, an upload, an original), re-encoded as JPEG.

    ``path`` is relative to the data root (or absolute). Whatever it names is resolved first;
    anything outside the data root is refused with 403, and a file that is not a decodable
    image with 415, so only pixels ever leave through here.
    """
    from imgsim.imaging import ImageRejected

    settings = Settings.from_env()
    root = settings.data_root
    if "\x00" in path:
        raise HTTPException(400, "bad path")
    candidate = Path(path)
    resolved = inside(candidate if candidate.is_absolute() else root / candidate, root)
    if resolved is None:
        raise HTTPException(403, "only images inside the data root are served")
    if not resolved.is_file():
        raise HTTPException(404, "no such image")
    try:
        data = render_jpeg(resolved, size, settings.max_image_pixels)
    except ImageRejected as exc:
        raise HTTPException(415, f"not a servable image: {exc.reason}") from exc
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600"})


# --------------------------------------------------------------------------------------------
# Upload and look up


class UploadError(Exception):
    """An upload that cannot be answered; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def sniff_image(data: bytes, filename: str) -> str:
    """The extension for an upload of ``data``, or UploadError when it is no accepted image."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(400, f"{filename!r} is empty (0 bytes); choose an image file.")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UploadError(415, f"{filename!r} is not an image ({len(data):,} bytes that no "
                               "image decoder recognises). Upload a JPEG, PNG or WebP "
                               "photo.") from exc
    if fmt not in UPLOAD_FORMATS:
        raise UploadError(415, f"{filename!r} is a {fmt or 'unknown'} image; upload a JPEG, "
                               "PNG or WebP photo.")
    return UPLOAD_FORMATS[fmt]


def save_upload(layout: Layout, data: bytes, ext: str) -> Path:
    """Keep the upload as ``queries/uploads/<sha256>.<ext>`` (atomic; same bytes, same file)."""
    from imgsim.fsutil import atomic_write_bytes, sha256_bytes

    target = layout.queries / "uploads" / f"{sha256_bytes(data)}.{ext}"
    if not target.is_file():
        atomic_write_bytes(target, data)
    return target


_LOAD_LOCK = threading.Lock()
_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_BACKBONE_CACHE: dict[str, Any] = {}


def _model_and_backbone(settings: Settings) -> tuple[Any, Any]:
    """The CURRENT version loaded for lookups, and its backbone (cached between requests)."""
    from imgsim.lookup import load_model, load_query_backbone
    from imgsim.models import current_version

    layout = settings.layout
    version = current_version(layout)
    if version is None:
        raise UploadError(409, f"No published model under {layout.models} yet; trigger the "
                               "imgsim_index DAG first.")
    with _LOAD_LOCK:
        key = (str(layout.root), version)
        model = _MODEL_CACHE.get(key)
        if model is None:
            model = load_model(layout, version)
            _MODEL_CACHE.clear()           # keep one version in memory
            _MODEL_CACHE[key] = model
        bkey = json.dumps([model.manifest["backbone"], settings.weights_path, settings.device],
                          sort_keys=True)
        backbone = _BACKBONE_CACHE.get(bkey)
        if backbone is None:
            backbone = load_query_backbone(model.manifest, weights_path=settings.weights_path,
                                           device=settings.device)
            _BACKBONE_CACHE.clear()
            _BACKBONE_CACHE[bkey] = backbone
    return model, backbone


def answer_upload(settings: Settings, path: Path, k: int) -> dict[str, Any]:
    """Embed the saved upload with the current version's backbone and look it up."""
    from imgsim.lookup import Answer, BackboneMismatch, Searcher
    from imgsim.models import VersionDamaged

    try:
        model, backbone = _model_and_backbone(settings)
        searcher = Searcher.load(settings, batch_size=1, model=model, backbone=backbone)
        (ans,) = searcher.search_files([path], k).values()
    except (BackboneMismatch, VersionDamaged) as exc:
        raise UploadError(409, str(exc)) from exc
    if not isinstance(ans, Answer):
        raise UploadError(422, f"the image cannot be used: {ans.reason}: {ans.detail}")
    return {"model_version": model.version, "indexed": searcher.indexed, "k": k,
            **ans.fields(k, searcher.indexed)}


def _search_form(k: int) -> str:
    return (
        '<form class="upload" id="upload-form" method="post" action="search" '
        'enctype="multipart/form-data">'
        '<label>Image <input type="file" name="image" id="image-input" '
        'accept="image/jpeg,image/png,image/webp" required></label>'
        f'<label>Neighbours <input type="number" name="k" id="k-input" value="{k}" min="1" '
        f'max="{MAX_K}" style="width:4em"></label>'
        '<button type="submit" id="upload-button">Find similar images</button>'
        f'<span class="meta">JPEG, PNG or WebP, up to {MAX_UPLOAD_BYTES // (1024 * 1024)} MB; '
        "answered by the CURRENT model version</span></form>")


@app.get("/search", include_in_schema=False)
def search_page(request: Request, user: CurrentUser) -> Response:
    from imgsim.models import current_version

    layout = Settings.from_env().layout
    version = current_version(layout)
    note = (f'<p class="meta">CURRENT model version: <code>{_esc(version)}</code></p>' if version
            else _error_box("No published model version yet; trigger imgsim_index first."))
    return _html(request, "Find similar images", note + _search_form(DEFAULT_K), user=user,
                 active="search")


#: Room for the multipart framing and the other form fields around the file.
FORM_OVERHEAD_BYTES = 64 * 1024


class _BodyTooLarge(Exception):
    """Raised inside the app's ``receive`` once a request body passes the upload limit."""


class UploadSizeLimit:
    """ASGI middleware: an upload (``POST .../search``) larger than :data:`MAX_UPLOAD_BYTES`
    is refused with 413 *before* FastAPI parses and spools the form: at once when its
    Content-Length says so, else (chunked bodies) as soon as the bytes received pass the limit,
    so at most one chunk past the limit is ever read and nothing of it is kept."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST"
                or not scope["path"].rstrip("/").endswith("/search")):
            await self.app(scope, receive, send)
            return
        limit = MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await _plain_error(send, 400, "invalid Content-Length header")
                return
            if too_large:
                await _plain_error(send, 413, _too_large_message())
                return
        received, exceeded, started = 0, False, False

        async def limited_receive() -> Any:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Any) -> None:
            nonlocal started
            if exceeded:            # the app's answer to a cut-off body (400) is replaced
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _plain_error(send, 413, _too_large_message())


def _too_large_message() -> str:
    return (f"The upload is larger than the {MAX_UPLOAD_BYTES // (1024 * 1024)} MB limit; "
            "choose a smaller image.")


async def _plain_error(send: Any, status: int, message: str) -> None:
    body = (f"<!doctype html><title>imgsim: upload refused</title><p id=\"error\">{_esc(message)}"
            '</p><p><a href="search">back</a></p>').encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/html; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


app.add_middleware(UploadSizeLimit)


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise UploadError(413, f"{upload.filename!r} is larger than the "
                                   f"{limit // (1024 * 1024)} MB limit.")
        chunks.append(chunk)
    return b"".join(chunks)


@app.post("/search", include_in_schema=False)
async def search_upload(request: Request, user: CurrentUser,
                        image: UploadFile | None = None,
                        k: Annotated[int, Form()] = DEFAULT_K) -> Response:
    """Save the uploaded image, look it up in the CURRENT version, show its neighbours."""
    settings = Settings.from_env()
    layout = settings.layout
    k = max(1, min(MAX_K, k))
    filename = (image.filename if image is not None else None) or "upload"
    try:
        if image is None:      # (an over-large body never gets here: UploadSizeLimit)
            raise UploadError(400, "no file in the form; choose an image to upload.")
        data = await _read_limited(image, MAX_UPLOAD_BYTES)
        ext = await run_in_threadpool(sniff_image, data, filename)
        saved = await run_in_threadpool(save_upload, layout, data, ext)
        answer = await run_in_threadpool(answer_upload, settings, saved, k)
    except UploadError as exc:
        body = _error_box(exc.message) + _search_form(k)
        return _html(request, "Find similar images", body, user=user, active="search",
                     status_code=exc.status)
    rel = str(saved.relative_to(layout.root))
    note = f'<p class="note">{_esc(answer["note"])}</p>' if answer["note"] else ""
    body = "\n".join([
        _search_form(k),
        f'<p class="meta" id="answer-meta">{_esc(filename)} &rarr; model '
        f'<code id="answer-version">{_esc(answer["model_version"])}</code> '
        f"({answer['indexed']} reference images), {answer['candidates']} compared; "
        f"saved as <code>{_esc(rel)}</code></p>",
        '<section class="query" id="answer"><div class="row">',
        _figure(_photo_url(rel), "your image", f"<b>your image</b><br>{_esc(filename)}", "q"),
        *_neighbours_html(answer["neighbours"], layout),
        "</div>", note, "</section>",
    ])
    return _html(request, "Find similar images", body, user=user, active="search")
