"""Run outputs: results.json / results.csv / contact_sheet.png / gallery.html."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from imgsim.config import Layout
from imgsim.query.results import (
    CSV_COLUMNS,
    render_contact_sheet,
    render_gallery_html,
    results_rows,
    write_results,
)

THUMB = 160
K = 3


def _thumb(layout: Layout, image_id: str, colour: tuple[int, int, int]) -> None:
    layout.thumbs.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (224, 224), colour).save(layout.thumbs / f"{image_id}.jpg", "JPEG")


def _neighbour(rank: int, image_id: str, class_name: str, distance: float) -> dict[str, Any]:
    return {
        "rank": rank,
        "image_id": image_id,
        "path": f"images/{image_id}.jpg",
        "class_id": rank,
        "class_name": class_name,
        "distance": distance,
    }


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    lay = Layout(tmp_path / "data")
    _thumb(lay, "a" * 64, (200, 30, 30))
    _thumb(lay, "b" * 64, (30, 200, 30))
    _thumb(lay, "c" * 64, (30, 30, 200))
    return lay


@pytest.fixture
def results(tmp_path: Path, layout: Layout) -> dict[str, Any]:
    query = tmp_path / "incoming" / "car.jpg"
    query.parent.mkdir(parents=True)
    Image.new("RGB", (400, 200), (250, 160, 0)).save(query, "JPEG")
    moved = tmp_path / "processed" / "other.jpg"
    moved.parent.mkdir(parents=True)
    Image.new("RGB", (120, 300), (0, 160, 250)).save(moved, "JPEG")
    base = {"model_version": "v20250101T000000", "candidates": 40, "reason": None, "detail": None}
    return {
        "run_id": "manual__2025-01-01",
        "model_version": "v20250101T000000",
        "k": K,
        "created_at": "2025-01-01T00:00:00+00:00",
        "queries": [
            {
                **base,
                "query_id": "1" * 64,
                "query_name": "car.jpg",
                "query_path": str(query),
                "status": "answered",
                "found": 3,
                "note": None,
                "neighbours": [
                    _neighbour(1, "a" * 64, "<script>alert(1)</script>", 0.1234567),
                    _neighbour(2, "b" * 64, "Audi R8 Coupe 2012", 0.5),
                    _neighbour(3, "c" * 64, "BMW M3 Coupe 2012", 1.25),
                ],
            },
            {
                **base,
                "query_id": "2" * 64,
                "query_name": "broken.jpg",
                "query_path": str(tmp_path / "incoming" / "broken.jpg"),
                "status": "rejected",
                "reason": "not_an_image",
                "detail": "not a recognised image format",
                "found": 0,
                "note": None,
                "neighbours": [],
            },
            {
                **base,
                "query_id": "3" * 64,
                "query_name": "moved.jpg",
                "query_path": str(tmp_path / "incoming" / "gone.jpg"),
                "query_copy": str(moved),
                "status": "answered",
                "found": 1,
                "note": "LSH returned 1 of 3 requested neighbours",
                "neighbours": [_neighbour(1, "d" * 64, "Missing Thumb Class", 0.75)],
            },
        ],
    }


def _tile_is_blank(sheet: Image.Image, box: tuple[int, int, int, int]) -> bool:
    colours = sheet.crop(box).getcolors(maxcolors=1 << 16)
    return colours is not None and len(colours) == 1 and colours[0][1] == (255, 255, 255)


def test_write_results_files(tmp_path: Path, layout: Layout, results: dict[str, Any]) -> None:
    run_dir = tmp_path / "runs" / "r1"
    paths = write_results(run_dir, results, layout)

    assert set(paths) == {"results_json", "results_csv", "contact_sheet", "gallery_html"}
    assert {p.name for p in paths.values()} == {
        "results.json",
        "results.csv",
        "contact_sheet.png",
        "gallery.html",
    }
    for p in paths.values():
        assert p.is_file() and p.parent == run_dir and p.stat().st_size > 0
    assert json.loads(paths["results_json"].read_text()) == results
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")]

    with paths["results_csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    with paths["results_csv"].open(newline="") as fh:
        assert next(csv.reader(fh)) == list(CSV_COLUMNS)
    assert len(rows) == 3 + 1 + 1
    answered = [r for r in rows if r["query_name"] == "car.jpg"]
    assert [r["rank"] for r in answered] == ["1", "2", "3"]
    assert answered[1]["class_name"] == "Audi R8 Coupe 2012"
    assert float(answered[0]["distance"]) == pytest.approx(0.1234567)
    rejected = [r for r in rows if r["query_name"] == "broken.jpg"]
    assert len(rejected) == 1
    assert rejected[0]["reason"] == "not_an_image" and rejected[0]["status"] == "rejected"
    assert rejected[0]["rank"] == rejected[0]["image_id"] == rejected[0]["distance"] == ""
    moved = [r for r in rows if r["query_name"] == "moved.jpg"]
    assert moved[0]["note"] == "LSH returned 1 of 3 requested neighbours"

    with Image.open(paths["contact_sheet"]) as im:
        assert im.format == "PNG" and im.mode == "RGB"


def test_results_rows_zero_neighbours_gets_reason(results: dict[str, Any]) -> None:
    results["queries"][0]["neighbours"] = []
    rows = results_rows(results)
    first = [r for r in rows if r["query_name"] == "car.jpg"]
    assert len(first) == 1 and first[0]["reason"] and first[0]["image_id"] == ""
    assert all(set(r) == set(CSV_COLUMNS) for r in rows)


def test_contact_sheet_geometry_and_content(layout: Layout, results: dict[str, Any]) -> None:
    sheet = render_contact_sheet(results, layout, thumb=THUMB)
    empty = render_contact_sheet({**results, "queries": []}, layout, thumb=THUMB)
    one = render_contact_sheet({**results, "queries": results["queries"][:1]}, layout, thumb=THUMB)
    assert sheet.mode == "RGB"
    header_h = empty.height
    row_h = one.height - header_h
    assert row_h >= THUMB
    assert sheet.height == header_h + 3 * row_h
    assert sheet.width == empty.width == one.width
    assert (K + 1) * THUMB < sheet.width < (K + 2) * THUMB

    # The query tile of row 0 holds the orange query image (letterboxed, centred).
    pad = (sheet.width - (K + 1) * THUMB) // (K + 2)
    x0, y0 = pad, header_h
    assert not _tile_is_blank(sheet, (x0, y0, x0 + THUMB, y0 + THUMB))
    r, g, b = sheet.getpixel((x0 + THUMB // 2, y0 + THUMB // 2))  # type: ignore[misc]
    assert r > 200 and 100 < g < 220 and b < 80
    # Neighbour 2 (green thumbnail) sits in the third tile.
    x2 = pad + 2 * (THUMB + pad)
    r, g, b = sheet.getpixel((x2 + THUMB // 2, y0 + THUMB // 2))  # type: ignore[misc]
    assert g > 150 and r < 100 and b < 100
    # Rejected row: a red-tinted tile, no neighbour tiles.
    y1 = header_h + row_h
    r, g, b = sheet.getpixel((x0 + 3, y1 + 3))  # type: ignore[misc]
    assert r > g + 20 and r > b + 20
    x1 = pad + (THUMB + pad)
    assert _tile_is_blank(sheet, (x1, y1, x1 + THUMB, y1 + THUMB))
    # Row 3: query_path is gone, query_copy (blue) is used.
    y2 = header_h + 2 * row_h
    r, g, b = sheet.getpixel((x0 + THUMB // 2, y2 + THUMB // 2))  # type: ignore[misc]
    assert b > 200 and r < 60


def test_missing_thumbnail_uses_placeholder(
    layout: Layout, results: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    only = {**results, "queries": results["queries"][2:]}  # neighbour "d" has no thumbnail
    with caplog.at_level(logging.WARNING, logger="imgsim.query.results"):
        sheet = render_contact_sheet(only, layout, thumb=THUMB)
    assert "missing" in caplog.text
    empty = render_contact_sheet({**only, "queries": []}, layout, thumb=THUMB)
    pad = (sheet.width - (K + 1) * THUMB) // (K + 2)
    x1, y = pad + THUMB + pad, empty.height
    colour = sheet.getpixel((x1 + 3, y + 3))
    assert colour not in ((255, 255, 255), (245, 245, 245))  # grey placeholder, not blank
    # The fallback to layout.root/path is used when the thumbnail is gone.
    img = layout.root / "images" / ("d" * 64 + ".jpg")
    img.parent.mkdir(parents=True)
    Image.new("RGB", (300, 300), (255, 0, 255)).save(img, "JPEG")
    sheet = render_contact_sheet(only, layout, thumb=THUMB)
    r, g, b = sheet.getpixel((x1 + THUMB // 2, y + THUMB // 2))  # type: ignore[misc]
    assert r > 200 and b > 200 and g < 60


def test_gallery_html_self_contained_and_escaped(layout: Layout, results: dict[str, Any]) -> None:
    page = render_gallery_html(results, layout)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page and 'src="/' not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 1 + 3 + 1  # query + 3 neighbours; moved query (neighbour missing)
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for name in ("Audi R8 Coupe 2012", "BMW M3 Coupe 2012"):
        assert name in page
    for d in ("0.1235", "0.5000", "1.2500", "0.7500"):
        assert d in page
    assert 'title="' + "a" * 64 + '"' in page and "a" * 12 in page
    assert "not_an_image" in page
    assert "LSH returned 1 of 3 requested neighbours" in page
    assert "manual__2025-01-01" in page and "v20250101T000000" in page


def test_zero_queries(tmp_path: Path, layout: Layout) -> None:
    results = {"run_id": "r0", "model_version": "v1", "k": 5, "created_at": "now", "queries": []}
    paths = write_results(tmp_path / "run0", results, layout)
    with paths["results_csv"].open(newline="") as fh:
        assert len(list(csv.reader(fh))) == 1
    with Image.open(paths["contact_sheet"]) as im:
        im.load()
        assert im.width > 6 * 160 and 0 < im.height < 100
    assert "No queries" in paths["gallery_html"].read_text()
    assert json.loads(paths["results_json"].read_text()) == results


def test_long_names_and_odd_values(layout: Layout, results: dict[str, Any]) -> None:
    q = results["queries"][0]
    q["query_name"] = "x" * 500 + ".jpg"
    q["neighbours"][1]["class_name"] = "Very Long Class Name " * 30
    q["neighbours"][2]["class_name"] = None
    q["neighbours"][2]["distance"] = None
    results["queries"][1]["detail"] = "word " * 200
    results["model_version"] = "m" * 300
    sheet = render_contact_sheet(results, layout, thumb=96)
    assert sheet.width < (K + 2) * 96
    page = render_gallery_html(results, layout)
    assert "x" * 500 in page


def test_row_cap(layout: Layout, results: dict[str, Any]) -> None:
    many = {**results, "queries": results["queries"][:1] * 7}
    capped = render_contact_sheet(many, layout, thumb=64, max_rows=2)
    full = render_contact_sheet(many, layout, thumb=64)
    assert capped.height < full.height


def test_a_rejected_querys_file_is_not_decoded_for_the_gallery(
    tmp_path: Path, layout: Layout, results: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A rejected input (here a real picture, e.g. one over the pixel limit) is shown as "no
    picture", not decoded again, and not reported as a missing picture."""
    rejected = tmp_path / "incoming" / "huge.jpg"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(rejected, "JPEG")
    query = {**results["queries"][1], "query_name": "huge.jpg", "query_path": str(rejected)}
    query["reason"] = "too_large"
    with caplog.at_level(logging.WARNING, logger="imgsim.query.results"):
        page = render_gallery_html({**results, "queries": [query]}, layout)
    assert "data:image/jpeg" not in page and "no picture" in page
    assert "missing" not in caplog.text
