"""The imgsim pages in the Airflow UI (imgsim.serve.webui), through FastAPI's TestClient.

Authentication is Airflow's ``get_user`` dependency; the tests override it with a fake user
(as the API server would resolve from the ``_token`` cookie), except where they check that
nothing is served without it. The settings dependency (``webui.get_settings``) is overridden
with each test's own data root. Model versions are built with test_models.build_version.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from airflow.api_fastapi.core_api.security import get_user
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from imgsim.config import Layout, Settings
from imgsim.fsutil import atomic_write_json, atomic_write_text, sha256_bytes
from imgsim.serve import webui
from test_models import build_version, make_ids

PROJECT_ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = "v20260101T000000Z-aaaaaa", "v20260102T000000Z-bbbbbb"
IDS = make_ids(12)
HTML = {"Accept": "text/html,application/xhtml+xml"}


class FakeUser:
    def get_name(self) -> str:
        return "tester"


def png_bytes(
    colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    root = tmp_path / "data"
    root.mkdir()
    return Layout(root.resolve())


def publish_two_versions(layout: Layout) -> None:
    extra = {
        "metrics": {
            "k": 5,
            "queries": 12,
            "recall_at_k": 0.9167,
            "candidates_share": 0.42,
            "label_hit_at_k": 0.75,
        }
    }
    build_version(layout.models, OLD, IDS, num_hash_tables=3, manifest_overrides=extra)
    build_version(
        layout.models,
        NEW,
        IDS,
        num_hash_tables=6,
        bucket_length=0.25,
        manifest_overrides={
            **extra,
            "backbone": {
                "name": "random",
                "dim": 6,
                "weights": "random(seed=0)",
                "weights_sha256": "",
            },
        },
    )
    atomic_write_text(layout.current_pointer, NEW + "\n")


@pytest.fixture
def app(layout: Layout) -> Iterator[FastAPI]:
    """webui.app with this test's settings (its data root; no weights file, device auto)."""
    webui.app.dependency_overrides[webui.get_settings] = lambda: Settings(
        data_root=layout.root, ui_preload=False
    )
    webui._MODEL_CACHE.clear()
    webui._BACKBONE_CACHE.clear()
    try:
        yield webui.app
    finally:
        webui.app.dependency_overrides.clear()
        webui._MODEL_CACHE.clear()
        webui._BACKBONE_CACHE.clear()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    app.dependency_overrides[get_user] = FakeUser
    with TestClient(app) as c:
        yield c


@pytest.fixture
def anonymous(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def test_the_settings_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    webui.get_settings.cache_clear()
    try:
        monkeypatch.setenv("IMGSIM_DATA_ROOT", str(tmp_path / "first"))
        first = webui.get_settings()
        monkeypatch.setenv("IMGSIM_DATA_ROOT", str(tmp_path / "second"))
        assert webui.get_settings() is first
        assert first.data_root == (tmp_path / "first").resolve()
    finally:
        webui.get_settings.cache_clear()


# -- authentication -----------------------------------------------------------------------------

ROUTES = [
    ("get", "/"),
    ("get", "/gallery"),
    ("get", "/search"),
    ("get", f"/thumb/{IDS[0]}"),
    ("get", "/photo?path=x.jpg"),
    ("post", "/search"),
]


@pytest.mark.parametrize(("method", "url"), ROUTES)
def test_nothing_is_served_without_a_login(
    anonymous: TestClient, layout: Layout, method: str, url: str
) -> None:
    publish_two_versions(layout)
    resp = getattr(anonymous, method)(url)
    assert resp.status_code == 401, resp.text
    assert resp.json() == {"detail": "Not authenticated"}
    assert NEW not in resp.text


def test_a_browser_without_a_login_is_sent_to_the_login_page(
    anonymous: TestClient, layout: Layout
) -> None:
    resp = anonymous.get("/gallery", headers=HTML, follow_redirects=False)
    assert resp.status_code == 303
    assert resp.headers["location"].startswith("/auth/login?next=")
    assert "gallery" in resp.headers["location"]


def test_an_invalid_token_is_refused(anonymous: TestClient, layout: Layout) -> None:
    from airflow.api_fastapi.app import _AuthManagerState

    class Refusing:
        async def get_user_from_token(self, token: str) -> Any:
            from jwt import InvalidTokenError

            raise InvalidTokenError("bad")

    old, _AuthManagerState.instance = _AuthManagerState.instance, Refusing()  # type: ignore
    try:
        resp = anonymous.get("/", headers={"Authorization": "Bearer forged"})
        anonymous.cookies.set("_token", "forged")
        cookie = anonymous.get("/")
    finally:
        _AuthManagerState.instance = old
    assert resp.status_code == 403 and cookie.status_code == 403
    assert "Model versions" not in resp.text + cookie.text


def test_no_api_docs_are_exposed(anonymous: TestClient) -> None:
    for url in ("/docs", "/redoc", "/openapi.json"):
        assert anonymous.get(url).status_code == 404


# -- model versions -----------------------------------------------------------------------------


def test_versions_page_lists_the_published_versions_with_current_marked(
    client: TestClient, layout: Layout
) -> None:
    publish_two_versions(layout)
    resp = client.get("/")
    assert resp.status_code == 200
    page = resp.text
    assert page.index(NEW) < page.index(OLD)  # newest first
    new_row = page[page.index(f'data-version="{NEW}"') :]
    new_row = new_row[: new_row.index("</tr>")]
    old_row = page[page.index(f'data-version="{OLD}"') :]
    old_row = old_row[: old_row.index("</tr>")]
    assert "CURRENT" in new_row and "CURRENT" not in old_row
    assert 'id="current-version">' + NEW in page
    assert ">6 tables<" in new_row and ">3 tables<" in old_row  # numHashTables
    assert "0.25" in new_row and "0.5" in old_row  # bucketLength
    assert "0.917" in new_row and "42%" in new_row and "0.750" in new_row
    assert "random 6-d" in new_row and "random(seed=0)" in new_row
    assert ">12<" in new_row  # images indexed
    assert "2026-01-02 03:04:05" in new_row or "2026-01-02" in new_row
    assert "signed in as tester" in page


def test_versions_page_shows_the_search_space_and_its_evaluation(
    client: TestClient, layout: Layout
) -> None:
    publish_two_versions(layout)
    manifest = json.loads((layout.models / NEW / "manifest.json").read_text())
    manifest["projection"] = {
        "kind": "lda",
        "dim": 1280,
        "dims": 195,
        "reason": "labels cover 100% <of> the refs",
        "coverage": {"images": 12, "labelled_images": 12, "share": 1.0, "classes": 3},
        "params": {"shrinkage": 0.2, "cv_precision_at_k": 0.3467, "cv_baseline": "none 0.130"},
    }
    manifest["metrics"]["label_precision_at_k"] = 0.5
    (layout.models / NEW / "manifest.json").write_text(json.dumps(manifest))
    page = client.get("/").text
    new_row = page[page.index(f'data-version="{NEW}"') :]
    new_row = new_row[: new_row.index("</tr>")]
    assert "<b>lda</b> 1280&rarr;195-d" in new_row and "shrinkage 0.2" in new_row
    assert "CV precision@5 0.347 (vs none 0.130)" in new_row and "labels 100%" in new_row
    assert 'title="labels cover 100% &lt;of&gt; the refs"' in new_row  # escaped
    assert ">0.500<" in new_row  # label precision@k
    old_row = page[page.index(f'data-version="{OLD}"') :]
    assert (
        '<td class="projection" title="a version without a projection">none</td>'
        in old_row[: old_row.index("</tr>")]
    )


def test_versions_page_without_a_model_says_what_to_do(client: TestClient, layout: Layout) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert 'id="no-versions"' in resp.text and "imgsim_index" in resp.text


def test_a_broken_manifest_is_shown_without_hiding_the_others(
    client: TestClient, layout: Layout
) -> None:
    publish_two_versions(layout)
    (layout.models / OLD / "manifest.json").write_text("{not json")
    resp = client.get("/")
    assert resp.status_code == 200
    assert "manifest unreadable" in resp.text and NEW in resp.text


def versions_row(page: str, version: str) -> str:
    row = page[page.rindex("<tr", 0, page.index(f'data-version="{version}"')) :]
    return row[: row.index("</tr>")]


def test_versions_page_marks_a_damaged_version(client: TestClient, layout: Layout) -> None:
    from imgsim.versions import models
    from test_models import overwrite_middle

    publish_two_versions(layout)
    for v in (OLD, NEW):
        models.record_checksums(layout.models / v)  # as models.publish does
    resp = client.get("/")
    assert 'data-files="ok (sizes)"' in versions_row(resp.text, NEW)
    assert "DAMAGED" not in resp.text and 'id="current-problem"' not in resp.text

    part = layout.models / OLD / "reference" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[:-1])  # sizes tell at once
    overwrite_middle(layout.models / NEW / "reference" / "part-0.parquet")
    models.check_version(layout, NEW, hashes=True)  # as `imgsim versions --verify`
    page = client.get("/").text
    old, new = versions_row(page, OLD), versions_row(page, NEW)
    assert 'class="version damaged"' in old and ">DAMAGED<" in old
    assert "reference/part-0.parquet has" in old and "were recorded" in old
    assert 'class="version current damaged"' in new and "has been altered" in new
    assert 'id="current-problem"' in page and "imgsim rollback" in page


def test_versions_page_says_when_current_names_a_missing_version(
    client: TestClient, layout: Layout
) -> None:
    publish_two_versions(layout)
    atomic_write_text(layout.current_pointer, "v20990101T000000Z-cccccc\n")
    page = client.get("/").text
    assert 'id="current-problem"' in page and "v20990101T000000Z-cccccc" in page
    assert 'data-files="not recorded"' in versions_row(page, NEW)  # older versions: no check


def test_an_upload_to_a_damaged_current_version_is_refused_clearly(
    client: TestClient, layout: Layout
) -> None:
    from imgsim.versions import models

    publish_two_versions(layout)
    models.record_checksums(layout.models / NEW)
    part = layout.models / NEW / "reference" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[:-1])
    resp = client.post("/search", files={"image": ("car.png", png_bytes(), "image/png")})
    assert resp.status_code == 409
    assert NEW in resp.text and "imgsim rollback" in resp.text


# -- gallery and pictures -----------------------------------------------------------------------


def write_results(layout: Layout, run: str) -> dict[str, Any]:
    query_copy = layout.queries / "processed" / run / "q1.png"
    query_copy.parent.mkdir(parents=True)
    query_copy.write_bytes(png_bytes())
    layout.thumbs.mkdir(parents=True, exist_ok=True)
    for iid in IDS[:3]:
        (layout.thumbs / f"{iid}.jpg").write_bytes(png_bytes((10, 200, 10), fmt="JPEG"))
    results = {
        "run_id": f"manual__{run}",
        "model_version": NEW,
        "k": 3,
        "created_at": "2026-01-02T00:00:00+00:00",
        "queries": [
            {
                "query_name": "q1.png",
                "query_path": str(layout.queries / "inbox" / "q1.png"),
                "query_copy": str(query_copy),
                "status": "answered",
                "query_id": "1" * 64,
                "neighbours": [
                    {
                        "rank": r + 1,
                        "image_id": IDS[r],
                        "path": f"images/{r}.jpg",
                        "class_id": r,
                        "class_name": f"Class <{r}>",
                        "distance": 0.1 * (r + 1),
                    }
                    for r in range(3)
                ],
                "note": None,
            },
            {
                "query_name": "broken.jpg",
                "query_path": "/elsewhere/broken.jpg",
                "status": "rejected",
                "reason": "not_an_image",
                "detail": "not a recognised image format",
                "neighbours": [],
            },
        ],
    }
    atomic_write_json(layout.queries / "results" / run / "results.json", results)
    return results


def test_gallery_shows_the_latest_run_with_neighbours_classes_and_distances(
    client: TestClient, layout: Layout
) -> None:
    publish_two_versions(layout)
    write_results(layout, "manual__2026-01-01")
    latest = "manual__2026-01-02"
    write_results(layout, latest)
    os.utime(layout.queries / "results" / latest / "results.json", (2e9, 2e9))
    resp = client.get("/gallery")
    assert resp.status_code == 200
    page = resp.text
    assert f'id="run-id">manual__{latest}<' in page
    assert page.count('class="neighbour"') == 3
    assert "Class &lt;0&gt;" in page and "<0>" not in page  # escaped
    assert "0.1000" in page and "0.3000" in page
    assert "rejected: not_an_image" in page
    for iid in IDS[:3]:
        assert f"thumb/{iid}" in page
    assert "photo?path=queries%2Fprocessed%2F" in page  # the query's copy
    assert "manual__2026-01-01" in page  # listed as an older run

    older = client.get("/gallery", params={"run": "manual__2026-01-01"})
    assert older.status_code == 200 and 'id="run-id">manual__manual__2026-01-01<' in older.text
    for bad in ("../../etc", "nope"):
        assert client.get("/gallery", params={"run": bad}).status_code == 404


def test_gallery_without_results_says_how_to_get_some(client: TestClient, layout: Layout) -> None:
    resp = client.get("/gallery")
    assert resp.status_code == 200 and 'id="no-results"' in resp.text


def test_pictures_are_served(client: TestClient, layout: Layout) -> None:
    write_results(layout, "r1")
    thumb = client.get(f"/thumb/{IDS[0]}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    photo = client.get("/photo", params={"path": "queries/processed/r1/q1.png", "size": 64})
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(photo.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 64
    absolute = client.get("/photo", params={"path": str(layout.queries / "processed/r1/q1.png")})
    assert absolute.status_code == 200


def test_no_file_outside_the_data_root_is_served(
    client: TestClient, layout: Layout, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    (layout.root / "link.png").symlink_to(secret)
    (layout.root / "notes.txt").write_text("not a picture")
    refused = {
        "../secret.png": 403,
        str(secret): 403,
        "../../../../../../etc/passwd": 403,
        "/etc/passwd": 403,
        "link.png": 403,  # a symlink pointing outside
        "queries/../../secret.png": 403,
        "notes.txt": 415,  # inside, but only pictures leave the server
        "nothing-here.jpg": 404,
    }
    for path, status in refused.items():
        resp = client.get("/photo", params={"path": path})
        assert resp.status_code == status, (path, resp.status_code, resp.text)
        assert resp.headers["content-type"] != "image/jpeg"
    for url in (
        "/thumb/..%2F..%2Fsecret.png",
        "/thumb/../../etc/passwd",
        "/thumb/" + "A" * 64,
        f"/thumb/{IDS[5]}",
        "/thumb/%2Fetc%2Fpasswd",
    ):
        assert client.get(url).status_code == 404, url


# -- upload -------------------------------------------------------------------------------------


def uploads(layout: Layout) -> list[Path]:
    d = layout.queries / "uploads"
    return sorted(d.iterdir()) if d.exists() else []


def test_search_page_has_the_upload_form(client: TestClient, layout: Layout) -> None:
    publish_two_versions(layout)
    resp = client.get("/search")
    assert resp.status_code == 200
    assert 'enctype="multipart/form-data"' in resp.text and NEW in resp.text


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"%PDF-1.4 this is a document, not a photo\n" * 20, 415, "is not an image"),
        (b"", 400, "is empty"),
        (png_bytes(fmt="GIF"), 415, "is a GIF image; upload a JPEG, PNG or WebP"),
    ],
)
def test_an_upload_that_is_not_a_usable_image_gets_a_clear_error(
    client: TestClient, layout: Layout, content: bytes, status: int, message: str
) -> None:
    publish_two_versions(layout)
    resp = client.post(
        "/search", files={"image": ("notes.jpg", content, "image/jpeg")}, data={"k": "3"}
    )
    assert resp.status_code == status
    assert 'id="error"' in resp.text and message in resp.text
    assert "notes.jpg" in resp.text
    assert 'id="upload-form"' in resp.text  # the form is offered again
    assert uploads(layout) == []


def test_an_upload_over_the_size_limit_is_refused(
    client: TestClient, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_two_versions(layout)
    monkeypatch.setattr(webui, "MAX_UPLOAD_BYTES", 1000)
    big = png_bytes(size=(400, 400)) + b"\0" * 5000
    resp = client.post("/search", files={"image": ("big.png", big, "image/png")})
    assert resp.status_code == 413 and "limit" in resp.text
    assert uploads(layout) == []


def _post_raw(body_chunks: list[bytes], content_length: int | None) -> tuple[int, int, bytes]:
    """POST /search straight into the ASGI app; returns (status, chunks the app read, body)."""
    import asyncio

    pulled = 0
    chunks = list(body_chunks)

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if not chunks:
            return {"type": "http.disconnect"}
        pulled += 1
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"host", b"test")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/search",
        "raw_path": b"/search",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    asyncio.run(webui.app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], pulled, body


def _multipart_chunks(total: int, chunk: int = 64 * 1024) -> list[bytes]:
    head = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="huge.png"\r\n'
        b"Content-Type: image/png\r\n\r\n"
    )
    payload = b"\0" * total
    return [head] + [payload[i : i + chunk] for i in range(0, total, chunk)] + [b"\r\n--xyz--\r\n"]


def test_an_upload_declared_too_large_is_refused_before_its_body_is_read(
    client: TestClient, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the limit used to be checked after FastAPI had spooled the whole body."""
    publish_two_versions(layout)
    monkeypatch.setattr(webui, "MAX_UPLOAD_BYTES", 100_000)
    chunks = _multipart_chunks(2_000_000)
    status, pulled, body = _post_raw(chunks, sum(map(len, chunks)))
    assert status == 413 and b"limit" in body
    assert pulled == 0  # not one byte of the body read
    assert uploads(layout) == []


def test_a_chunked_upload_is_cut_off_at_the_limit(
    client: TestClient, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_two_versions(layout)
    monkeypatch.setattr(webui, "MAX_UPLOAD_BYTES", 100_000)
    chunks = _multipart_chunks(5_000_000)  # no Content-Length: chunked
    status, pulled, body = _post_raw(chunks, None)
    assert status == 413 and b"limit" in body
    # 100 kB + 64 kB of form overhead: the app stops reading a chunk past the limit
    assert pulled <= 4 < len(chunks)
    assert uploads(layout) == []


def test_a_chunked_upload_through_the_client_is_refused(
    client: TestClient, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_two_versions(layout)
    monkeypatch.setattr(webui, "MAX_UPLOAD_BYTES", 100_000)

    def body() -> Iterator[bytes]:
        yield from _multipart_chunks(3_000_000)

    resp = client.post(
        "/search", content=body(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert resp.status_code == 413 and "limit" in resp.text
    assert uploads(layout) == []


def test_a_small_chunked_upload_still_works(client: TestClient, layout: Layout) -> None:
    publish_two_versions(layout)
    status, _, body = _post_raw(_multipart_chunks(10), None)
    assert status != 413  # reaches the endpoint (not an image)
    assert b"not an image" in body


def test_an_upload_without_a_model_says_to_build_one(client: TestClient, layout: Layout) -> None:
    resp = client.post("/search", files={"image": ("car.png", png_bytes(), "image/png")})
    assert resp.status_code == 409 and "imgsim_index" in resp.text


def test_an_upload_is_saved_and_answered_by_the_current_version(
    client: TestClient, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lookup path of the upload, with the CNN replaced by a known vector."""
    import imgsim.query.lookup as lookup_mod

    publish_two_versions(layout)
    model = lookup_mod.load_model(layout, NEW)
    target = model.vectors[4]
    calls: dict[str, Any] = {}

    def fake_backbone(manifest: dict[str, Any], **kwargs: Any) -> str:
        calls["backbone"] = manifest["version"]
        return "backbone"

    def fake_embed(backbone: Any, paths: list[Path], **kwargs: Any) -> tuple[dict, dict]:
        calls["paths"] = paths
        return {str(p): np.asarray(target) * 3.0 for p in paths}, {}

    monkeypatch.setattr(lookup_mod, "load_query_backbone", fake_backbone)
    monkeypatch.setattr(lookup_mod, "embed_files", fake_embed)
    data = png_bytes((1, 2, 3))
    resp = client.post(
        "/search", files={"image": ("my car.png", data, "image/png")}, data={"k": "3"}
    )
    assert resp.status_code == 200, resp.text
    saved = layout.queries / "uploads" / f"{sha256_bytes(data)}.png"
    assert uploads(layout) == [saved] and saved.read_bytes() == data
    assert calls == {"backbone": NEW, "paths": [saved]}
    page = resp.text
    assert f'id="answer-version">{NEW}<' in page
    answer = page[page.index('id="answer"') :]
    assert answer.count('class="neighbour"') >= 1
    assert f"thumb/{IDS[4]}" in answer or model.ids[4][:12] in answer
    assert "0.0000" in answer  # the same vector, distance 0
    assert f"photo?path=queries%2Fuploads%2F{sha256_bytes(data)}.png" in page

    again = client.post("/search", files={"image": ("again.png", data, "image/png")})
    assert again.status_code == 200 and uploads(layout) == [saved]  # same bytes, same file


def test_an_upload_the_backbone_rejects_is_reported(
    client: TestClient, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imgsim.query.lookup as lookup_mod
    from imgsim.embedding.infer import Rejected

    publish_two_versions(layout)
    monkeypatch.setattr(lookup_mod, "load_query_backbone", lambda m, **kw: "backbone")
    monkeypatch.setattr(
        lookup_mod,
        "embed_files",
        lambda b, paths, **kw: (
            {},
            {str(p): Rejected(str(p), p, "too_small", "4x4 is below 8x8 pixels") for p in paths},
        ),
    )
    resp = client.post(
        "/search", files={"image": ("tiny.png", png_bytes(size=(4, 4)), "image/png")}
    )
    assert resp.status_code == 422 and "too_small" in resp.text


# -- the plugin ---------------------------------------------------------------------------------


def test_the_plugin_mounts_the_app_and_adds_menu_entries() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "imgsim_plugin_under_test", PROJECT_ROOT / "plugins" / "imgsim_plugin.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.ImgsimPlugin
    assert plugin.name == "imgsim"
    (mounted,) = plugin.fastapi_apps
    assert mounted["app"] is webui.app and mounted["url_prefix"] == "/imgsim"
    hrefs = {v["href"] for v in plugin.external_views}
    assert hrefs == {
        "imgsim/",
        "imgsim/gallery",
        "imgsim/search",
        "imgsim/duplicates",
        "imgsim/map",
    }
    assert all(not h.startswith("/") for h in hrefs)  # relative to the UI's base
    assert len({v["url_route"] for v in plugin.external_views}) == 5


def test_importing_the_plugin_loads_no_torch_pil_or_pyspark() -> None:
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        "import json; print(json.dumps(sorted(m for m in ('torch', 'PIL', 'pyspark', "
        "'pyarrow', 'timm') if m in sys.modules)))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(PROJECT_ROOT / "plugins" / "imgsim_plugin.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# -- the neighbour graph pages: similar to a reference, duplicate groups, the map ----------


def publish_with_graph(layout: Layout) -> None:
    build_version(layout.models, OLD, IDS, graph=True)
    build_version(layout.models, NEW, IDS, graph=True, seed=1)
    atomic_write_text(layout.current_pointer, NEW + "\n")


def test_similar_to_a_reference_shows_its_graph_neighbours_as_links(
    client: TestClient, layout: Layout
) -> None:
    import pyarrow.parquet as pq

    publish_with_graph(layout)
    graph = pq.read_table(layout.models / NEW / "neighbours").to_pandas()
    want = graph[graph["image_id"] == IDS[0]].sort_values("rank")["neighbour_id"].tolist()
    resp = client.get(f"/reference/{IDS[0]}")
    assert resp.status_code == 200, resp.text
    page = resp.text
    assert 'id="similar-version">' + NEW in page
    links = [f'href="reference/{n}?version={NEW}"' for n in want]
    assert all(link in page for link in links)
    assert [page.index(link) for link in links] == sorted(page.index(link) for link in links)
    # an older version's graph when asked for; its neighbours link within it
    old = client.get(f"/reference/{IDS[0]}?version={OLD}").text
    assert "(not CURRENT)" in old and f"?version={OLD}" in old
    assert client.get(f"/reference/{'f' * 64}").status_code == 404  # not a reference
    assert client.get("/reference/not-an-id").status_code == 404
    assert client.get(f"/reference/{IDS[0]}?version=v2026").status_code == 404


def test_a_version_without_a_graph_says_so(client: TestClient, layout: Layout) -> None:
    publish_two_versions(layout)  # versions from before graphs (and maps)
    for url in (f"/reference/{IDS[0]}", "/duplicates"):
        resp = client.get(url, headers=HTML)
        assert resp.status_code == 409
        assert "has no neighbour graph" in resp.text
    resp = client.get("/map", headers=HTML)
    assert resp.status_code == 409 and "has no stored map" in resp.text
    assert "the next index run lays one out" in resp.text


def test_duplicate_groups_page_lists_the_groups_with_links(
    client: TestClient, layout: Layout
) -> None:
    publish_with_graph(layout)
    page = client.get("/duplicates").text
    assert 'id="group-count">1<' in page
    assert "at or under distance 0.050 between the embeddings (<code>" in page
    assert page.count('class="query duplicate-group"') == 1
    assert f'href="reference/{IDS[0]}?version={NEW}"' in page
    assert f'href="reference/{IDS[1]}?version={NEW}"' in page
    assert 'href="duplicates"' in page  # the nav entry


def test_map_page_places_every_reference_coloured_by_class(
    client: TestClient, layout: Layout
) -> None:
    from imgsim.ann.layout import read_map, unit_square

    publish_with_graph(layout)
    page = client.get("/map").text
    assert 'id="map-count">12<' in page
    assert page.count("<circle ") == 12
    assert len(set(re.findall(r'fill="(hsl\([^"]+\))"', page))) == 3  # class ids 1, 2, 3
    assert f'href="reference/{IDS[5]}?version={NEW}"' in page
    # the dots are where the stored map puts them (nothing laid out by the page)
    stored = read_map(layout.models / NEW / "map.parquet")
    for iid, (x, y) in zip(stored["image_id"], unit_square(stored["xy"]), strict=True):
        dot = re.search(rf'<circle cx="([0-9.]+)" cy="([0-9.]+)"[^>]*data-id="{iid}"', page)
        assert dot is not None, iid
        assert abs(float(dot[1]) - (20 + 960 * x)) < 0.06
        assert abs(float(dot[2]) - (980 - 960 * y)) < 0.06
    assert "data-spread" not in page  # no two dots on one spot here
    # the legend: one entry per class, with its count on the map
    legend = re.findall(r'<li><button type="button" data-class="(\d+)" title="(\d+) on', page)
    assert sorted(legend) == [("1", "4"), ("2", "4"), ("3", "4")]
    assert "t-SNE of the search space" in page and "<b>50%</b>" in page
    # altered map bytes: a damaged version, said so (never a map of garbage)
    webui._map_of.cache_clear()
    (layout.models / NEW / "map.parquet").write_bytes(b"PAR1 cut short")
    resp = client.get("/map", headers=HTML)
    assert resp.status_code == 409 and "is damaged" in resp.text


def test_dots_on_one_spot_are_drawn_around_it() -> None:
    dots = [{"x": 500.0, "y": 500.0} for _ in range(8)] + [{"x": 100.0, "y": 100.0}]
    assert webui.spread_coincident(dots) == 7
    spots = {(d["x"], d["y"]) for d in dots}
    assert len(spots) == 9  # eight dots, not one
    assert dots[0] == {"x": 500.0, "y": 500.0} and dots[8] == {"x": 100.0, "y": 100.0}
    for i, d in enumerate(dots[1:8], start=1):
        gap = ((d["x"] - 500) ** 2 + (d["y"] - 500) ** 2) ** 0.5
        assert d["spread"] and abs(gap - 1.2 * webui.DOT_RADIUS * i**0.5) < 0.2


def test_island_names_never_cover_each_other() -> None:
    islands = [
        {"x": 500.0, "y": 500.0, "label": "Audi A5 Coupe 2012"},
        {"x": 510.0, "y": 505.0, "label": "Audi S5 Coupe 2012"},  # on the first: left out
        {"x": 500.0, "y": 530.0, "label": "BMW M3 Coupe 2012"},  # below it: fits
        {"x": 900.0, "y": 100.0, "label": "Geo Metro Convertible 1993"},
    ]
    named = webui.island_names(islands)
    assert [i["label"] for i in named] == [
        "Audi A5 Coupe 2012",
        "BMW M3 Coupe 2012",
        "Geo Metro Convertible 1993",
    ]
    # a name by the edge is moved inside the map, never cut off
    edge = webui.island_names([{"x": 990.0, "y": 3.0, "label": "Geo Metro Convertible 1993"}])
    half = webui.ISLAND_CHAR_WIDTH * 26 / 2 + 2
    assert edge[0]["x"] == round(1000 - half, 1) and edge[0]["y"] == webui.ISLAND_FONT + 2


# -- rollback from the versions page: only roles that may trigger DAG runs ------------------


def sign_in(app: FastAPI, role: str) -> None:
    """Requests come from a user of ``role`` (its name), as SimpleAuthManager signs them in."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username=role, role=role)


@pytest.fixture
def simple_auth() -> Iterator[None]:
    """Airflow's SimpleAuthManager answers the permission checks (roles as configured)."""
    from airflow.api_fastapi.app import _AuthManagerState
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager

    old, _AuthManagerState.instance = _AuthManagerState.instance, SimpleAuthManager()  # type: ignore
    try:
        yield
    finally:
        _AuthManagerState.instance = old


@pytest.mark.parametrize(
    ("role", "allowed"), [("viewer", False), ("user", True), ("op", True), ("admin", True)]
)
def test_rollback_is_offered_to_and_accepted_from_roles_that_may_trigger_runs(
    app: FastAPI, layout: Layout, simple_auth: None, role: str, allowed: bool
) -> None:

    publish_two_versions(layout)
    sign_in(app, role)
    with TestClient(app) as c:
        versions = c.get("/").text
        confirm = c.get(f"/rollback?version={OLD}")
        done = c.post("/rollback", data={"version": OLD}, follow_redirects=False)
    assert (f'id="rollback-{OLD}"' in versions) == allowed
    assert f'id="rollback-{NEW}"' not in versions  # never onto the current one
    if allowed:
        assert confirm.status_code == 200 and 'id="confirm-rollback"' in confirm.text
        assert done.status_code == 303, done.text
        assert layout.current_pointer.read_text().strip() == OLD
    else:  # a viewer sees the versions; a forged request is refused
        assert "Model versions" in versions
        assert confirm.status_code == 403 and done.status_code == 403
        assert "may not roll back" in done.text
        assert layout.current_pointer.read_text().strip() == NEW


def test_a_rollback_posted_from_another_site_or_to_no_version_is_refused(
    app: FastAPI, layout: Layout, simple_auth: None
) -> None:

    publish_two_versions(layout)
    sign_in(app, "admin")
    with TestClient(app) as c:
        forged = c.post(
            "/rollback", data={"version": OLD}, headers={"Origin": "https://evil.example"}
        )
        missing = c.post("/rollback", data={"version": "v20200101T000000Z-cccccc"})
    assert forged.status_code == 403 and "cross-site" in forged.text
    assert missing.status_code == 404
    assert layout.current_pointer.read_text().strip() == NEW


# -- faults (issue 23 item 7) --------------------------------------------------------------------


@pytest.mark.parametrize("page", ["/reference/" + IDS[0], "/duplicates", "/map", "/search"])
def test_with_current_missing_every_page_shows_the_error_box_not_a_500(
    client: TestClient, layout: Layout, page: str
) -> None:
    publish_two_versions(layout)
    atomic_write_text(layout.current_pointer, "v20990101T000000Z-cccccc\n")
    resp = client.get(page, headers=HTML)
    assert resp.status_code in (200, 409), resp.text  # the upload form itself stays (200)
    assert "v20990101T000000Z-cccccc" in resp.text and "not a published version" in resp.text
    assert "rollback" in resp.text
    if page != "/search":
        assert 'class="error' in resp.text or "error" in resp.text.lower()


def test_a_version_deleted_under_a_page_is_a_409_box(client: TestClient, layout: Layout) -> None:
    """A version named on a page that goes while the page is built (read_manifest's
    VersionNotFound deep inside a reader): the error page, 409, not a 500."""
    import shutil

    publish_two_versions(layout)
    original = webui._chosen_version

    def chosen_then_gone(lay: Layout, version: str | None) -> str:
        got = original(lay, version)
        shutil.rmtree(lay.models / got)
        return got

    webui._chosen_version = chosen_then_gone  # type: ignore[assignment]
    try:
        resp = client.get("/duplicates", headers=HTML)
    finally:
        webui._chosen_version = original  # type: ignore[assignment]
    assert resp.status_code == 409 and "not found" in resp.text


def test_an_upload_with_current_missing_stores_nothing(client: TestClient, layout: Layout) -> None:
    publish_two_versions(layout)
    atomic_write_text(layout.current_pointer, "v20990101T000000Z-cccccc\n")
    resp = client.post("/search", files={"image": ("car.png", png_bytes(), "image/png")})
    assert resp.status_code == 409 and "v20990101T000000Z-cccccc" in resp.text
    uploads = layout.queries / "uploads"
    assert not uploads.exists() or list(uploads.iterdir()) == []


def test_the_uploads_folder_is_capped_oldest_first(tmp_path: Path) -> None:
    import os

    folder = tmp_path / "uploads"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(b"x" * 100)
        os.utime(folder / f"{i}.jpg", ns=(i * 10**9, i * 10**9))
    layout = Layout(tmp_path)
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "uploads").symlink_to(folder)
    kept = webui.save_upload(layout, b"y" * 150, "jpg", max_bytes=400)
    left = sorted(p.name for p in folder.iterdir())
    assert kept.name in left and sum((folder / n).stat().st_size for n in left) <= 400
    assert left == sorted([kept.name, "3.jpg", "4.jpg"])  # 0, 1 and 2 (the oldest) went
    # one upload larger than the cap alone is still kept (it is being answered)
    big = webui.save_upload(layout, b"z" * 1000, "jpg", max_bytes=400)
    assert [p.name for p in folder.iterdir()] == [big.name]


def test_a_signed_in_user_refused_sees_a_403_page_not_the_login_form(
    app: FastAPI, layout: Layout, simple_auth: None
) -> None:

    publish_two_versions(layout)
    sign_in(app, "viewer")
    with TestClient(app) as c:
        resp = c.get(f"/rollback?version={OLD}", headers=HTML, follow_redirects=False)
        photo = c.get("/photo?path=../secret.png", headers=HTML, follow_redirects=False)
    assert resp.status_code == 403 and "location" not in resp.headers
    assert "may not roll back" in resp.text and "<form" not in resp.text.split("<main")[-1]
    assert photo.status_code == 403 and "only images inside the data root" in photo.text


@pytest.mark.parametrize("name", [".", "..", ".hidden"])
def test_run_names_that_are_dots_are_refused(client: TestClient, layout: Layout, name: str) -> None:
    (layout.queries / "results").mkdir(parents=True)
    atomic_write_json(layout.queries / "results.json", {"queries": []})
    atomic_write_json(layout.queries / "results" / "results.json", {"queries": []})
    assert client.get("/gallery", params={"run": name}).status_code == 404


def test_a_rollback_while_an_index_run_holds_the_lease_is_refused(
    app: FastAPI, layout: Layout, simple_auth: None
) -> None:

    from imgsim.versions import runlease

    publish_two_versions(layout)
    runlease.try_acquire(layout, "scheduled__2026-12-07", lambda _: True, deployment="db:A")
    sign_in(app, "op")
    with TestClient(app) as c:
        done = c.post("/rollback", data={"version": OLD}, headers=HTML, follow_redirects=False)
    assert done.status_code == 409 and "scheduled__2026-12-07" in done.text
    assert layout.current_pointer.read_text().strip() == NEW


# -- what a data team looks at (issue 25 item 1) -------------------------------------------------


def test_the_similar_page_heads_a_labelled_reference_with_its_class(
    client: TestClient, layout: Layout
) -> None:
    from imgsim.versions.graph import similar_to

    build_version(layout.models, NEW, IDS, graph=True)
    atomic_write_text(layout.current_pointer, NEW + "\n")
    ref = similar_to(layout, NEW, IDS[0]).reference
    page = client.get(f"/reference/{IDS[0]}").text
    heading = page.split('id="reference-label">')[1].split("<")[0].strip()
    assert ref.get("class_id") is not None and heading == f"class {ref['class_id']}"


def test_rollback_to_the_current_version_is_not_offered(
    app: FastAPI, layout: Layout, simple_auth: None
) -> None:

    publish_two_versions(layout)
    sign_in(app, "op")
    with TestClient(app) as c:
        confirm = c.get(f"/rollback?version={NEW}", headers=HTML)
        done = c.post("/rollback", data={"version": NEW}, headers=HTML, follow_redirects=False)
    assert confirm.status_code == 409 and "is CURRENT already" in confirm.text
    assert "instead of" not in confirm.text
    assert done.status_code == 409


def test_a_duplicates_page_past_the_last_says_how_many_there_are(
    client: TestClient, layout: Layout
) -> None:
    build_version(layout.models, NEW, IDS, graph=True)
    atomic_write_text(layout.current_pointer, NEW + "\n")
    assert client.get("/duplicates?page=1").status_code == 200
    resp = client.get("/duplicates?page=99", headers=HTML)
    assert resp.status_code == 404
    assert "page 99 of the duplicate groups does not exist" in resp.text
    assert "1 group on 1 page" in resp.text


def test_the_upload_page_loads_the_model_in_the_background(
    app: FastAPI, layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    publish_two_versions(layout)
    release = threading.Event()
    loads: list[str] = []

    def slow_load(settings: Settings) -> tuple[str, str]:
        loads.append(str(settings.layout.root))
        release.wait(10)
        webui._MODEL_CACHE[(str(settings.layout.root), NEW)] = "model"
        webui._BACKBONE_CACHE["b"] = "backbone"
        return "model", "backbone"

    monkeypatch.setattr(webui, "_model_and_backbone", slow_load)
    app.dependency_overrides[webui.get_settings] = lambda: Settings(data_root=layout.root)
    app.dependency_overrides[get_user] = FakeUser
    webui._WARMING.clear()
    with TestClient(app) as c:
        first = c.get("/search").text
        second = c.get("/search").text  # one load only, still running
        release.set()
        webui._WARMING[f"{layout.root}:{NEW}"].join(10)
        third = c.get("/search").text
    assert 'id="model-loading"' in first and 'id="model-loading"' in second
    assert 'id="model-loading"' not in third
    assert loads == [str(layout.root)]


def test_pages_say_when_the_classes_have_no_names(client: TestClient, layout: Layout) -> None:
    build_version(layout.models, NEW, IDS, graph=True)  # class ids, no class names
    atomic_write_text(layout.current_pointer, NEW + "\n")
    for page in (f"/reference/{IDS[0]}", "/duplicates", "/map"):
        assert 'id="names-missing"' in client.get(page).text, page
    assert 'id="names-missing"' not in client.get("/").text
    assert webui.names_missing([{"class_id": 1, "class_name": "Audi TT 2012"}]) is False
    assert webui.names_missing([(None, None), (3, "BMW M3")]) is False
    assert webui.names_missing([(3, None)]) is True


def test_a_duplicate_group_under_two_labels_is_flagged(client: TestClient, layout: Layout) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    build_version(layout.models, NEW, IDS, graph=True)  # group 0: ids 0 and 1
    atomic_write_text(layout.current_pointer, NEW + "\n")
    part = layout.models / NEW / "duplicates" / "part-0.parquet"
    table = pq.read_table(part).to_pylist()
    page = client.get("/duplicates").text
    same = len({r["class_id"] for r in table}) == 1
    assert ('data-labels-differ="1"' in page) == (not same)
    for r in table:
        r["class_id"] = 1 if r["image_id"] == IDS[0] else 2
    pq.write_table(pa.Table.from_pylist(table), part)
    page = client.get("/duplicates").text
    assert 'data-labels-differ="1"' in page and "same photo, two labels" in page
