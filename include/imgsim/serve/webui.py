"""The imgsim pages inside the Airflow UI: model versions, the latest query results, an upload.

A FastAPI app that ``plugins/imgsim_plugin.py`` mounts under ``/imgsim`` of the Airflow API
server, with menu entries in the Airflow navigation:

- ``/imgsim/``: the published model versions (CURRENT marked), from their manifests;
- ``/imgsim/gallery``: the newest ``queries/results/<run>/results.json``, each query beside its
  neighbours, with class names and distances (``?run=<name>`` shows an older run);
- ``/imgsim/search``: upload one image and see its neighbours in the current version, looked up
  in-process (the same code as ``imgsim query``); the upload is kept as
  ``queries/uploads/<sha256>.<ext>``;
- ``/imgsim/reference/<image_id>``: "similar to this reference", from the version's neighbour
  graph (no embedding); every reference thumbnail of the other pages links here;
- ``/imgsim/duplicates``: the version's near-duplicate groups, largest first;
- ``/imgsim/map``: the version's stored 2-D map (t-SNE) of its references, coloured by class;
- ``/imgsim/rollback``: make another published version CURRENT (confirmation first), for the
  users whose Airflow role may trigger imgsim_index runs (403 for the others);
- ``/imgsim/thumb/<image_id>`` and ``/imgsim/photo?path=...``: the pictures of those pages.

Every route needs Airflow's authentication (the ``get_user`` dependency: the JWT in the
``Authorization: Bearer`` header or the UI's ``_token`` cookie). Without it an API client gets
401, and a browser asking for a page is redirected to the login page. ``/photo`` serves only
files inside the data root (after resolving symlinks and ``..``), and only as a re-encoded
JPEG of a decodable image, so no other file content can leave the server through it.

Settings (the data root above all) are read from the environment once, by the first request
that needs them (:func:`get_settings`, a cached FastAPI dependency), and kept for the life of
the process: a changed ``IMGSIM_*`` variable takes effect when the API server restarts. Tests
give their own with ``app.dependency_overrides[get_settings]``.

The pages are the Jinja2 templates of :mod:`imgsim.templates` (shared with the gallery.html of
:mod:`imgsim.query.results`). Module import is light (FastAPI, Jinja2 and Airflow's auth
dependency);
torch, PIL, pyarrow and NumPy are imported inside the handlers that need them.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgsim.config import Layout, Settings
from imgsim.query.results import query_view, run_view
from imgsim.templates import render

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
#: a run folder's name (imgsim.fsutil.run_key): never "." or "..", nor any hidden name
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")

#: The signed-in Airflow user (401 without a valid token); every route depends on it.
CurrentUser = Annotated[BaseUser, Depends(get_user)]

app = FastAPI(
    title="imgsim",
    description="imgsim pages in the Airflow UI: model versions, query results, upload",
    dependencies=[Depends(get_user)],
    docs_url=None,
    redoc_url=None,
    openapi_url=None,  # nothing reachable without a login
)


@cache
def get_settings() -> Settings:
    """The UI's settings: read from the environment by the first request that needs them, then
    kept (tests override this dependency)."""
    return Settings.from_env()


#: The UI's settings (:func:`get_settings`).
AppSettings = Annotated[Settings, Depends(get_settings)]


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
    # Not signed in: the login page. Signed in but refused (403): a page that says why (the
    # login page would only send a signed-in user back here, in a loop).
    if exc.status_code == 401 and request.method == "GET" and _wants_html(request):
        return RedirectResponse(login_url(request), status_code=303)
    if _wants_html(request):
        page = render(
            "error.html",
            ui=_ui(request.scope, None, ""),
            title=f"Error {exc.status_code}",
            message=exc.detail,
        )
        return HTMLResponse(page, status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _version_error(request: Request, exc: Exception) -> Response:
    """A missing or damaged model version, on any page: the error box that says which and what
    to do (409), never a 500."""
    title = "Model version not found" if isinstance(exc, LookupError) else "Model version damaged"
    if _wants_html(request):
        page = render("error.html", ui=_ui(request.scope, None, ""), title=title, message=str(exc))
        return HTMLResponse(page, status_code=409, headers={"Cache-Control": "no-store"})
    return JSONResponse({"detail": str(exc)}, status_code=409)


def _register_version_errors() -> None:
    from imgsim.embedding.trained import EmbedderDamaged, EmbedderNotFound
    from imgsim.versions.models import VersionDamaged, VersionNotFound

    for error in (VersionDamaged, VersionNotFound, EmbedderDamaged, EmbedderNotFound):
        app.add_exception_handler(error, _version_error)  # type: ignore[arg-type]


_register_version_errors()


# --------------------------------------------------------------------------------------------
# Pages (imgsim.templates)


def _user_name(user: Any) -> str:
    if user is None:
        return ""
    try:
        return str(user.get_name())
    except Exception:
        return str(getattr(user, "username", "") or "")


def _ui(scope: Mapping[str, Any], user: Any, active: str) -> dict[str, str]:
    """The UI part of templates/base.html: ``<base href>`` (where the app is mounted), the nav
    entry of this page and the signed-in user."""
    return {
        "base": scope.get("root_path", "").rstrip("/") + "/",
        "active": active,
        "user": _user_name(user),
    }


def names_missing(items: Any) -> bool:
    """Whether labelled items (rows with class_id / class_name) come without class names."""
    return any(
        (it.get("class_id") if isinstance(it, Mapping) else it[0]) is not None
        and not (it.get("class_name") if isinstance(it, Mapping) else it[1])
        for it in items
    )


def _html(
    request: Request,
    template: str,
    *,
    user: Any,
    active: str,
    status_code: int = 200,
    **context: Any,
) -> Response:
    return HTMLResponse(
        render(template, ui=_ui(request.scope, user, active), **context),
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )


# --------------------------------------------------------------------------------------------
# Model versions


@dataclass(frozen=True)
class VersionRow:
    version: str
    current: bool
    manifest: dict[str, Any] | None
    error: str | None = None
    files: str = "not recorded"  # models.Integrity.status of a sizes check
    problems: tuple[str, ...] = ()  # what that check (or the last sha256 check) found


def version_rows(layout: Layout) -> list[VersionRow]:
    """Published versions, newest first, each with its manifest (or why it is unreadable) and
    the state of its files (sizes against those recorded at publish)."""
    from imgsim.versions.models import (
        check_version,
        current_version,
        published_versions,
        read_manifest,
    )

    current = current_version(layout)
    rows: list[VersionRow] = []
    for version in reversed(published_versions(layout)):
        files = check_version(layout, version)
        status, problems = files.status, tuple(files.problems)
        try:
            rows.append(
                VersionRow(
                    version,
                    version == current,
                    read_manifest(layout, version),
                    files=status,
                    problems=problems,
                )
            )
        except Exception as exc:  # one broken manifest must not hide the others
            rows.append(
                VersionRow(
                    version,
                    version == current,
                    None,
                    f"{type(exc).__name__}: {exc}",
                    files=status,
                    problems=problems,
                )
            )
    return rows


@app.get("/", include_in_schema=False)
def versions_page(request: Request, user: CurrentUser, settings: AppSettings) -> Response:
    from imgsim.versions.models import current_version, describe_lsh

    layout = settings.layout
    rows = version_rows(layout)
    ks = {(r.manifest or {}).get("metrics", {}).get("k") for r in rows if r.manifest}
    return _html(
        request,
        "versions.html",
        user=user,
        active="versions",
        layout=layout,
        rows=rows,
        k=ks.pop() if len(ks) == 1 else "k",
        current=current_version(layout),
        current_row=next((r for r in rows if r.current), None),
        describe_lsh=describe_lsh,
        may_rollback=may_trigger_index(user),
    )


# --------------------------------------------------------------------------------------------
# Rollback: the same code as `imgsim rollback`, for the users whose role may trigger DAG runs

#: the DAG whose run permission a rollback needs (it changes what the index serves)
INDEX_DAG = "imgsim_index"


def may_trigger_index(user: Any) -> bool:
    """Whether the Airflow auth manager lets ``user`` trigger runs of the index DAG."""
    try:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import (
            DagAccessEntity,
            DagDetails,
        )

        return bool(
            get_auth_manager().is_authorized_dag(
                method="POST",
                user=user,
                access_entity=DagAccessEntity.RUN,
                details=DagDetails(id=INDEX_DAG),
            )
        )
    except Exception as exc:  # no auth manager, or one that cannot answer: refuse
        log.warning("cannot check whether %s may trigger %s: %s", user, INDEX_DAG, exc)
        return False


def _rollback_target(layout: Layout, version: str) -> dict[str, Any]:
    from imgsim.versions.models import current_version, read_manifest

    chosen = _chosen_version(layout, version)
    if chosen == current_version(layout):
        raise HTTPException(409, f"{chosen} is CURRENT already: there is nothing to roll back")
    return read_manifest(layout, chosen)


def _require_trigger(user: Any) -> None:
    if not may_trigger_index(user):
        raise HTTPException(
            403,
            f"{_user_name(user) or 'this user'} may not roll back: it needs the permission to "
            f"trigger {INDEX_DAG} runs (Airflow role User or above)",
        )


@app.get("/rollback", include_in_schema=False)
def rollback_page(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    version: Annotated[str, Query(max_length=100)],
) -> Response:
    """Ask for confirmation; the form posts to :func:`rollback_version`."""
    from imgsim.versions.models import current_version

    _require_trigger(user)
    manifest = _rollback_target(settings.layout, version)
    return _html(
        request,
        "rollback.html",
        user=user,
        active="versions",
        version=version,
        current=current_version(settings.layout),
        manifest=manifest,
    )


@app.post("/rollback", include_in_schema=False)
def rollback_version(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    version: Annotated[str, Form(max_length=100)],
) -> Response:
    """Point CURRENT at ``version`` (:func:`imgsim.versions.models.rollback`, as the CLI)."""
    from imgsim.versions.models import IndexRunInFlight, VersionDamaged, VersionNotFound, rollback

    _require_trigger(user)
    _same_origin(request)
    _rollback_target(settings.layout, version)
    try:
        rollback(settings.layout, version, ttl_s=settings.lease_ttl_s)
    except (IndexRunInFlight, VersionDamaged, VersionNotFound, ValueError) as exc:
        raise HTTPException(409, str(exc)) from exc
    log.info("%s rolled CURRENT back to %s", _user_name(user), version)
    return RedirectResponse("./", status_code=303)


def _same_origin(request: Request) -> None:
    """Refuse a state change posted from another site (the browser sends Origin on POST)."""
    origin = request.headers.get("origin")
    if origin and origin.rstrip("/").split("://", 1)[-1] != request.headers.get("host", ""):
        raise HTTPException(403, f"cross-site request from {origin} refused")


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


def _relative(path: Path, layout: Layout) -> str | None:
    """``path`` as a data-root-relative string if it is inside the data root."""
    resolved = inside(path, layout.root)
    return None if resolved is None else str(resolved.relative_to(layout.root.resolve()))


def _query_src(layout: Layout, query: Mapping[str, Any]) -> str | None:
    """The URL of a result's query image, if a copy of it lies inside the data root."""
    if query.get("picture_gone"):  # replaced in the inbox during its run: not these bytes
        return None
    for key in ("query_copy", "query_path"):
        raw = query.get(key)
        if raw and Path(str(raw)).is_file():
            rel = _relative(Path(str(raw)), layout)
            if rel is not None:
                return _photo_url(rel)
    return None


def _neighbour_src(layout: Layout, neighbour: Mapping[str, Any]) -> str | None:
    """The URL of a neighbour's thumbnail, else of its image inside the data root."""
    image_id = str(neighbour.get("image_id") or "")
    if IMAGE_ID_RE.match(image_id) and (layout.thumbs / f"{image_id}.jpg").is_file():
        return f"thumb/{image_id}"
    raw = neighbour.get("path")
    if raw and (layout.root / str(raw)).is_file() and _relative(layout.root / str(raw), layout):
        return _photo_url(str(raw))
    return None


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


@app.get("/gallery", include_in_schema=False)
def gallery_page(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    run: Annotated[str | None, Query()] = None,
) -> Response:
    from imgsim.fsutil import read_json

    layout = settings.layout
    runs = result_runs(layout)
    if run is not None:
        if (
            not RUN_NAME_RE.match(run)
            or not (layout.queries / "results" / run / "results.json").is_file()
        ):
            raise HTTPException(404, f"no query results named {run!r}")
        chosen = layout.queries / "results" / run
    elif runs:
        chosen = runs[0]
    else:
        return _html(
            request,
            "run.html",
            user=user,
            active="gallery",
            queries=None,
            inbox=layout.queries / "inbox",
        )
    try:
        results = read_json(chosen / "results.json")
    except (OSError, ValueError) as exc:
        raise HTTPException(500, f"{chosen / 'results.json'} is unreadable: {exc}") from exc
    return _html(
        request,
        "run.html",
        user=user,
        active="gallery",
        run_dir=chosen,
        runs=[p.name for p in runs[:RECENT_RUNS]],
        **run_view(results, partial(_query_src, layout), partial(_neighbour_src, layout)),
    )


# --------------------------------------------------------------------------------------------
# The version's neighbour graph: similar to a reference, duplicate groups, the 2-D map

#: duplicate groups per page
GROUPS_PER_PAGE = 30


def _chosen_version(layout: Layout, version: str | None) -> str:
    """``version`` if it is published, else CURRENT when none is asked for; 404 otherwise."""
    from imgsim.versions.models import check_version_name, current_version, published_versions

    if version is None:
        current = current_version(layout)
        if current is None:
            raise HTTPException(404, "no published model version yet; trigger imgsim_index first")
        if current not in published_versions(layout):
            raise HTTPException(
                409,
                f"CURRENT ({layout.current_pointer}) names {current[:80]!r}, which is not a "
                f"published version under {layout.models}. Make a published one current on the "
                "versions page (or `imgsim rollback VERSION`), or trigger imgsim_index, which "
                "builds a new one in full.",
            )
        return current
    try:  # (also the rollback's target check)
        check_version_name(version)
    except ValueError as exc:
        raise HTTPException(404, str(exc)) from exc
    if version not in published_versions(layout):
        raise HTTPException(404, f"no published version {version}")
    return version


def _graph_error(exc: Exception) -> HTTPException:
    return HTTPException(409, str(exc))


@app.get("/reference/{image_id}", include_in_schema=False)
def similar_page(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    image_id: str,
    version: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """A reference and its nearest references, from the version's neighbour graph."""
    from imgsim.query.results import class_label
    from imgsim.versions.graph import NoGraph, similar_to
    from imgsim.versions.models import VersionDamaged, current_version

    if not IMAGE_ID_RE.match(image_id):
        raise HTTPException(404, "not an image id")
    layout = settings.layout
    chosen = _chosen_version(layout, version)
    try:
        similar = similar_to(layout, chosen, image_id)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from exc
    except (NoGraph, VersionDamaged) as exc:
        raise _graph_error(exc) from exc
    neighbours = [
        {**n, "label": class_label(n), "picture": _neighbour_src(layout, n)}
        for n in similar.neighbours
    ]
    return _html(
        request,
        "similar.html",
        user=user,
        active="",
        similar=similar,
        reference_label=class_label(similar.reference),
        names_missing=names_missing([similar.reference, *similar.neighbours]),
        picture=_neighbour_src(layout, similar.reference),
        neighbours=neighbours,
        current=current_version(layout),
    )


@app.get("/duplicates", include_in_schema=False)
def duplicates_page(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    version: Annotated[str | None, Query(max_length=100)] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
) -> Response:
    """The version's near-duplicate groups, largest first, GROUPS_PER_PAGE to a page."""
    from imgsim.query.results import class_label
    from imgsim.versions.graph import NoGraph, duplicate_groups
    from imgsim.versions.models import VersionDamaged, current_version

    layout = settings.layout
    chosen = _chosen_version(layout, version)
    try:
        groups, entry = duplicate_groups(
            layout, chosen, offset=(page - 1) * GROUPS_PER_PAGE, limit=GROUPS_PER_PAGE
        )
    except (NoGraph, VersionDamaged) as exc:
        raise _graph_error(exc) from exc
    view = [
        {
            "group": g.group,
            "labels_differ": len({m.get("class_id") for m in g.members} - {None}) > 1,
            "members": [
                {**m, "label": class_label(m), "picture": _neighbour_src(layout, m)}
                for m in g.members
            ],
        }
        for g in groups
    ]
    total = int(entry.get("groups") or 0)
    pages = max(1, -(-total // GROUPS_PER_PAGE))
    if page > pages:
        raise HTTPException(
            404,
            f"page {page} of the duplicate groups does not exist: {chosen} has {total} group"
            f"{'' if total == 1 else 's'} on {pages} page{'' if pages == 1 else 's'}",
        )
    return _html(
        request,
        "duplicates.html",
        user=user,
        active="duplicates",
        version=chosen,
        current=current_version(layout),
        groups=view,
        names_missing=names_missing(m for g in groups for m in g.members),
        entry=entry,
        page=page,
        pages=pages,
    )


@cache
def _map_of(root: str, version: str) -> Any:
    """The stored map of a published version (immutable, so read once per API server)."""
    from imgsim.versions.graph import map_points

    return map_points(Layout(Path(root)), version)


def class_colour(class_id: int | None) -> str:
    """A class's colour on the map (golden-angle hues: neighbouring ids differ); grey: none."""
    return "#999" if class_id is None else f"hsl({(int(class_id) * 137.508) % 360:.0f},70%,42%)"


#: the islands' names on the map: font size and the average width of a character, in the
#: map's viewBox units (1000 wide)
ISLAND_FONT = 10.0
ISLAND_CHAR_WIDTH = 5.6


#: dots closer than this (viewBox units, the dot's radius) are drawn apart
DOT_RADIUS = 4.5


def spread_coincident(dots: list[dict[str, Any]], radius: float = DOT_RADIUS) -> int:
    """Dots that fall on one spot are drawn around it on a sunflower spiral (in place), so
    a tight island of eight looks like eight dots, not one (t-SNE draws the demo's synthetic
    classes that tightly). The first dot of a spot stays where the map puts it, the i-th
    moves by ``1.2 * radius * sqrt(i)``; each moved dot gets ``spread: True``. Returns how
    many moved."""
    import math

    seen: dict[tuple[int, int], int] = {}
    moved = 0
    for dot in dots:
        key = (round(float(dot["x"]) / radius), round(float(dot["y"]) / radius))
        i = seen.get(key, 0)
        seen[key] = i + 1
        if i:
            r, a = 1.2 * radius * math.sqrt(i), i * 2.399963
            dot["x"] = round(float(dot["x"]) + r * math.cos(a), 1)
            dot["y"] = round(float(dot["y"]) + r * math.sin(a), 1)
            dot["spread"] = True
            moved += 1
    return moved


def island_names(islands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The islands whose names fit on the map without covering another's, largest first (a
    greedy pass: a name goes where it overlaps no name already placed). Islands are dicts
    with x, y (viewBox units) and label; the others are named in the legend only."""
    placed: list[tuple[float, float, float, float]] = []
    named = []
    for island in islands:
        half = ISLAND_CHAR_WIDTH * len(str(island["label"])) / 2 + 2
        # inside the map: a name by the edge is moved in, never cut off
        island = {
            **island,
            "x": round(min(max(float(island["x"]), half), 1000 - half), 1),
            "y": round(max(float(island["y"]), ISLAND_FONT + 2), 1),
        }
        box = (
            float(island["x"]) - half,
            float(island["y"]) - ISLAND_FONT,
            float(island["x"]) + half,
            float(island["y"]) + 3,
        )
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            continue
        placed.append(box)
        named.append(island)
    return named


@app.get("/map", include_in_schema=False)
def map_page(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    version: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """The version's stored 2-D map (t-SNE, laid out by the fit job), coloured by class,
    with a legend of its classes and the islands' names on it."""
    from imgsim.query.results import class_label
    from imgsim.versions.graph import NoMap, map_classes
    from imgsim.versions.models import VersionDamaged, current_version

    layout = settings.layout
    chosen = _chosen_version(layout, version)
    try:
        points = _map_of(str(layout.root), chosen)
    except (VersionDamaged, NoMap, ValueError) as exc:
        raise _graph_error(exc) from exc
    dots = [
        {
            "id": image_id,
            "x": round(20 + 960 * float(x), 1),
            "y": round(980 - 960 * float(y), 1),
            "class": "" if cid is None else str(cid),
            "colour": class_colour(cid),
            "label": class_label({"class_id": cid, "class_name": name})
            + (" (placed into an earlier layout)" if placed else ""),
        }
        for image_id, cid, name, (x, y), placed in zip(
            points.image_id,
            points.class_id,
            points.class_name,
            points.xy,
            points.placed,
            strict=True,
        )
    ]
    classes = [
        {
            "id": c.class_id,
            "label": class_label({"class_id": c.class_id, "class_name": c.name}),
            "colour": class_colour(c.class_id),
            "count": c.count,
            "near": c.near,
            "island": c.island,
            "x": round(20 + 960 * c.x, 1),
            "y": round(980 - 960 * c.y, 1),
        }
        for c in map_classes(points)
    ]
    spread_coincident(dots)
    islands = [c for c in classes if c["island"]]
    named = island_names(islands)
    shown = {c["id"]: c for c in named}
    return _html(
        request,
        "map.html",
        user=user,
        active="map",
        points=points,
        entry=points.entry,
        dots=dots,
        classes=sorted(classes, key=lambda c: str(c["label"]).lower()),
        islands=[shown.get(c["id"], c) for c in islands],
        named=named,
        unlabelled=sum(1 for c in points.class_id if c is None),
        names_missing=names_missing(zip(points.class_id, points.class_name, strict=True)),
        current=current_version(layout),
    )


# --------------------------------------------------------------------------------------------
# Pictures


@app.get("/thumb/{image_id}", include_in_schema=False)
def thumb(image_id: str, settings: AppSettings) -> Response:
    """A reference image's 224x224 thumbnail (``thumbs/<image_id>.jpg``)."""
    if not IMAGE_ID_RE.match(image_id):
        raise HTTPException(404, "not an image id")
    layout = settings.layout
    path = inside(layout.thumbs / f"{image_id}.jpg", layout.root)
    if path is None or not path.is_file():
        raise HTTPException(404, f"no thumbnail for {image_id}")
    return FileResponse(
        path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"}
    )


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
def photo(
    path: Annotated[str, Query(min_length=1, max_length=4096)],
    settings: AppSettings,
    size: Annotated[int, Query(ge=32, le=1024)] = 320,
) -> Response:
    """An image under the data root (a query photo, an upload, an original), re-encoded as JPEG.

    ``path`` is relative to the data root (or absolute). Whatever it names is resolved first;
    anything outside the data root is refused with 403, and a file that is not a decodable
    image with 415, so only pixels ever leave through here.
    """
    from imgsim.imaging import ImageRejected

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
    return Response(
        data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )


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
        raise UploadError(
            415,
            f"{filename!r} is not an image ({len(data):,} bytes that no "
            "image decoder recognises). Upload a JPEG, PNG or WebP "
            "photo.",
        ) from exc
    if fmt not in UPLOAD_FORMATS:
        raise UploadError(
            415, f"{filename!r} is a {fmt or 'unknown'} image; upload a JPEG, PNG or WebP photo."
        )
    return UPLOAD_FORMATS[fmt]


def save_upload(layout: Layout, data: bytes, ext: str, max_bytes: int | None = None) -> Path:
    """Keep the upload as ``queries/uploads/<sha256>.<ext>`` (atomic; same bytes, same file),
    then trim the folder to ``max_bytes`` (IMGSIM_UPLOADS_MAX_MB): the oldest uploads go first,
    never the one just kept."""
    import os

    from imgsim.fsutil import atomic_write_bytes, sha256_bytes

    target = layout.queries / "uploads" / f"{sha256_bytes(data)}.{ext}"
    if not target.is_file():
        atomic_write_bytes(target, data)
    else:
        os.utime(target)  # uploaded again: the newest now
    if max_bytes is not None:
        trim_uploads(target.parent, max_bytes, keep=target)
    return target


def trim_uploads(folder: Path, max_bytes: int, keep: Path) -> list[Path]:
    """Delete the oldest files of ``folder`` (by mtime) until the rest fit in ``max_bytes``;
    ``keep`` stays whatever its size. Returns what was deleted."""
    files = []
    for p in folder.iterdir():
        try:
            st = p.stat()
        except FileNotFoundError:  # deleted by a request beside this one
            continue
        if p.is_file():
            files.append((st.st_mtime_ns, p.name, st.st_size, p))
    total = sum(size for _, _, size, _ in files)
    gone = []
    for _, _, size, p in sorted(files):
        if total <= max_bytes:
            break
        if p == keep:
            continue
        p.unlink(missing_ok=True)
        total -= size
        gone.append(p)
    if gone:
        log.info("uploads over %d bytes: deleted the %d oldest", max_bytes, len(gone))
    return gone


_LOAD_LOCK = threading.Lock()
_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_BACKBONE_CACHE: dict[str, Any] = {}


def _model_and_backbone(settings: Settings) -> tuple[Any, Any]:
    """The CURRENT version loaded for lookups, and its backbone (cached between requests)."""
    from imgsim.query.lookup import load_model, query_backbone
    from imgsim.versions.models import current_version

    layout = settings.layout
    version = current_version(layout)
    if version is None:
        raise UploadError(
            409,
            f"No published model under {layout.models} yet; trigger the imgsim_index DAG first.",
        )
    with _LOAD_LOCK:
        key = (str(layout.root), version)
        model = _MODEL_CACHE.get(key)
        if model is None:
            model = load_model(layout, version)
            _MODEL_CACHE.clear()  # keep one version in memory
            _MODEL_CACHE[key] = model
        bkey = json.dumps(
            [model.manifest["backbone"], settings.weights_path, settings.device], sort_keys=True
        )
        backbone = _BACKBONE_CACHE.get(bkey)
        if backbone is None:
            backbone = query_backbone(settings, model.manifest)
            _BACKBONE_CACHE.clear()
            _BACKBONE_CACHE[bkey] = backbone
    return model, backbone


_WARMING: dict[str, threading.Thread] = {}


def warm_model(settings: Settings) -> bool:
    """Load the CURRENT version and its CNN in a background thread, once per version, so the
    first upload does not wait for them (about 12 s on 2 cores); True while that load runs
    (the page says so). A failure is left for the upload to report."""
    from imgsim.versions.models import current_version

    version = current_version(settings.layout)
    if version is None or not settings.ui_preload:
        return False
    key = f"{settings.layout.root}:{version}"
    with _LOAD_LOCK:
        if (str(settings.layout.root), version) in _MODEL_CACHE and _BACKBONE_CACHE:
            return False
        thread = _WARMING.get(key)
        if thread is None:

            def warm() -> None:
                try:
                    _model_and_backbone(settings)
                except Exception as exc:  # the upload itself says what is wrong
                    log.warning("could not load %s for uploads ahead of time: %s", version, exc)

            thread = threading.Thread(target=warm, name="imgsim-warm-model", daemon=True)
            _WARMING[key] = thread
            thread.start()
    return thread.is_alive()


def ready_model(settings: Settings) -> tuple[Any, Any]:
    """The CURRENT version and its backbone, loaded, or the UploadError that says why no
    model can answer (checked before an upload is stored)."""
    from imgsim.embedding.onnx_runtime import OnnxRuntimeError
    from imgsim.errors import PermanentError

    try:
        return _model_and_backbone(settings)
    except (PermanentError, OnnxRuntimeError) as exc:
        raise UploadError(409, str(exc)) from exc


def answer_upload(
    settings: Settings, path: Path, k: int, ready: tuple[Any, Any] | None = None
) -> dict[str, Any]:
    """Embed the saved upload with the current version's backbone and look it up."""
    from imgsim.query.lookup import Answer, BackboneMismatch, Searcher
    from imgsim.versions.models import VersionDamaged

    try:
        model, backbone = ready or ready_model(settings)
        searcher = Searcher.load(settings, batch_size=1, model=model, backbone=backbone)
        (ans,) = searcher.search_files([path], k).values()
    except (BackboneMismatch, VersionDamaged) as exc:
        raise UploadError(409, str(exc)) from exc
    if not isinstance(ans, Answer):
        raise UploadError(422, f"the image cannot be used: {ans.reason}: {ans.detail}")
    return {
        "model_version": model.version,
        "indexed": searcher.indexed,
        "k": k,
        **ans.fields(k, searcher.indexed),
    }


def _search_page(
    request: Request, user: Any, k: int, status_code: int = 200, **context: Any
) -> Response:
    """templates/search.html: the upload form, with ``error``, ``current`` or ``answer``."""
    return _html(
        request,
        "search.html",
        user=user,
        active="search",
        status_code=status_code,
        k=k,
        max_k=MAX_K,
        max_mb=MAX_UPLOAD_BYTES // (1024 * 1024),
        **{"error": None, "current": None, "answer": None, "loading": False, **context},
    )


@app.get("/search", include_in_schema=False)
def search_page(request: Request, user: CurrentUser, settings: AppSettings) -> Response:
    try:
        version = _chosen_version(settings.layout, None)
    except HTTPException as exc:  # none yet, or CURRENT names no published version
        return _search_page(request, user, DEFAULT_K, error=str(exc.detail))
    loading = warm_model(settings)
    return _search_page(request, user, DEFAULT_K, current=version, loading=loading)


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
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not scope["path"].rstrip("/").endswith("/search")
        ):
            await self.app(scope, receive, send)
            return
        limit = MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await _plain_error(scope, send, 400, "invalid Content-Length header")
                return
            if too_large:
                await _plain_error(scope, send, 413, _too_large_message())
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
            if exceeded:  # the app's answer to a cut-off body (400) is replaced
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _plain_error(scope, send, 413, _too_large_message())


def _too_large_message() -> str:
    return (
        f"The upload is larger than the {MAX_UPLOAD_BYTES // (1024 * 1024)} MB limit; "
        "choose a smaller image."
    )


async def _plain_error(scope: Any, send: Any, status: int, message: str) -> None:
    body = render(
        "error.html", ui=_ui(scope, None, "search"), title="upload refused", message=message
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


app.add_middleware(UploadSizeLimit)


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    chunks, total = [], 0
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise UploadError(
                413, f"{upload.filename!r} is larger than the {limit // (1024 * 1024)} MB limit."
            )
        chunks.append(chunk)
    return b"".join(chunks)


@app.post("/search", include_in_schema=False)
async def search_upload(
    request: Request,
    user: CurrentUser,
    settings: AppSettings,
    image: UploadFile | None = None,
    k: Annotated[int, Form()] = DEFAULT_K,
) -> Response:
    """Save the uploaded image, look it up in the CURRENT version, show its neighbours."""
    layout = settings.layout
    k = max(1, min(MAX_K, k))
    filename = (image.filename if image is not None else None) or "upload"
    try:
        if image is None:  # (an over-large body never gets here: UploadSizeLimit)
            raise UploadError(400, "no file in the form; choose an image to upload.")
        data = await _read_limited(image, MAX_UPLOAD_BYTES)
        ext = await run_in_threadpool(sniff_image, data, filename)
        ready = await run_in_threadpool(ready_model, settings)  # nothing kept if none answers
        saved = await run_in_threadpool(
            save_upload, layout, data, ext, settings.uploads_max_mb * 1024 * 1024
        )
        answer = await run_in_threadpool(answer_upload, settings, saved, k, ready)
    except UploadError as exc:
        return _search_page(request, user, k, exc.status, error=exc.message)
    query = {**answer, "query_name": filename, "query_path": str(saved)}
    return _search_page(
        request,
        user,
        k,
        answer={
            **answer,
            "filename": filename,
            "saved": saved.relative_to(layout.root),
            "query": query_view(
                query, k, partial(_query_src, layout), partial(_neighbour_src, layout)
            ),
        },
    )
