"""Human-readable outputs of one lookup run: results.json, results.csv, a contact sheet, a gallery.

``results`` is the run's results dict (the content of results.json)::

    {"run_id", "model_version", "k", "created_at", "engine" ("local": in-process; "spark"),
     "queries": [{"query_id", "query_name", "query_path", "query_copy"?, "status",
                  "reason", "detail", "model_version", "candidates", "found", "note", "method",
                  "neighbours": [{"rank", "image_id", "path", "class_id", "class_name",
                                  "distance"}]}]}

Neighbour images come from ``layout.thumbs/<image_id>.jpg``, falling back to
``layout.root/<path>``, then to a grey "missing" placeholder; nothing here fails because an
image is gone. Query images are decoded with :func:`imgsim.imaging.load_rgb` (pixel limit,
EXIF orientation), since they are untrusted uploads. Every file is written atomically, and
results.json last, so its presence means the whole set is complete.

gallery.html is templates/run.html (:mod:`imgsim.templates`), the page the UI shows a run with
too; :func:`run_view` gives it a run's results. PIL is imported inside functions only, so this
module is cheap to import from DAG files.
"""

from __future__ import annotations

import base64
import csv
import io
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgsim.config import Layout
from imgsim.fsutil import atomic_open, atomic_write_json, atomic_write_text
from imgsim.templates import number, render

if TYPE_CHECKING:
    from PIL.Image import Image
    from PIL.ImageDraw import ImageDraw
    from PIL.ImageFont import FreeTypeFont
    from PIL.ImageFont import ImageFont as BitmapFont

    Font = FreeTypeFont | BitmapFont

#: Where a results entry's image comes from: its ``src`` (a URL, a data URI), None if none.
Source = Callable[[Mapping[str, Any]], str | None]

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
CONTACT_SHEET = "contact_sheet.png"
GALLERY_HTML = "gallery.html"

CSV_COLUMNS = (
    "query_name",
    "query_id",
    "status",
    "reason",
    "rank",
    "image_id",
    "path",
    "class_id",
    "class_name",
    "distance",
    "model_version",
    "note",
)

#: Contact-sheet rows beyond this are summarised in a footer line (keeps the PNG bounded).
MAX_SHEET_ROWS = 200
#: Longest side of the JPEGs inlined into gallery.html.
GALLERY_IMAGE_SIZE = 224

_WHITE = (255, 255, 255)
_TEXT = (20, 20, 20)
_MUTED = (90, 90, 90)
_TILE_BG = (245, 245, 245)
_BORDER = (200, 200, 200)
_MISSING_BG = (190, 190, 190)
_REJECTED_BG = (250, 210, 210)
_REJECTED_BORDER = (200, 40, 40)
_REJECTED_TEXT = (140, 0, 0)
_ELLIPSIS = "..."


# --------------------------------------------------------------------------------------------
# Writing


def write_results(run_dir: Path, results: dict[str, Any], layout: Layout) -> dict[str, Path]:
    """Write results.json, results.csv, contact_sheet.png and gallery.html into ``run_dir``.

    Returns ``{"results_json", "results_csv", "contact_sheet", "gallery_html"}`` -> path.
    results.json is written last: when it exists, the other three are complete.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "results_csv": run_dir / RESULTS_CSV,
        "contact_sheet": run_dir / CONTACT_SHEET,
        "gallery_html": run_dir / GALLERY_HTML,
        "results_json": run_dir / RESULTS_JSON,
    }
    atomic_write_text(paths["results_csv"], _csv_text(results_rows(results)))
    sheet = render_contact_sheet(results, layout)
    with atomic_open(paths["contact_sheet"], "wb") as fh:
        sheet.save(fh, format="PNG")
    atomic_write_text(paths["gallery_html"], render_gallery_html(results, layout))
    atomic_write_json(paths["results_json"], results)
    log.info(
        "wrote results of run %s (%d queries) to %s",
        results.get("run_id"),
        len(_queries(results)),
        run_dir,
    )
    return paths


# --------------------------------------------------------------------------------------------
# CSV


def results_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (query, neighbour); a query without neighbours gets one row of its own."""
    rows: list[dict[str, Any]] = []
    for q in _queries(results):
        base = {
            "query_name": _query_name(q),
            "query_id": q.get("query_id") or "",
            "status": q.get("status") or "",
            "reason": q.get("reason") or "",
            "model_version": q.get("model_version") or results.get("model_version") or "",
            "note": q.get("note") or "",
        }
        neighbours = _neighbours(q)
        if not neighbours:
            if not base["reason"] and q.get("status") != "rejected":
                base["reason"] = "no_neighbours"
            rows.append({**{c: "" for c in CSV_COLUMNS}, **base})
            continue
        for n in neighbours:
            rows.append(
                {
                    **base,
                    "rank": _blank(n.get("rank")),
                    "image_id": _blank(n.get("image_id")),
                    "path": _blank(n.get("path")),
                    "class_id": _blank(n.get("class_id")),
                    "class_name": _blank(n.get("class_name")),
                    "distance": _blank(n.get("distance")),
                }
            )
    return rows


def _csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value


# --------------------------------------------------------------------------------------------
# Shared helpers


def _queries(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(results.get("queries") or [])


def _neighbours(query: Mapping[str, Any]) -> list[dict[str, Any]]:
    if query.get("status") == "rejected":
        return []
    return sorted(query.get("neighbours") or [], key=lambda n: n.get("rank") or 0)


def _query_name(query: Mapping[str, Any]) -> str:
    name = query.get("query_name")
    if name:
        return str(name)
    if query.get("query_path"):
        return Path(str(query["query_path"])).name
    return str(query.get("query_id") or "?")[:12]


def _k(results: Mapping[str, Any]) -> int:
    try:
        return max(0, int(results.get("k") or 0))
    except (TypeError, ValueError):
        return 0


def _found_short(query: Mapping[str, Any], k: int) -> bool:
    return query.get("status") == "answered" and len(_neighbours(query)) < k


def _short_note(query: Mapping[str, Any], k: int) -> str:
    """The query's note, or a generated one when fewer than k neighbours came back."""
    note = query.get("note")
    if note:
        return str(note)
    if _found_short(query, k):
        return f"found {len(_neighbours(query))} of {k} requested neighbours"
    return ""


class _Images:
    """Loads (and caches) the images of one rendering; records what was missing."""

    def __init__(self, layout: Layout, size: int) -> None:
        self.layout = layout
        self.size = size
        self.missing: list[str] = []
        self._cache: dict[str, Image | None] = {}

    def warn_missing(self, rendering: str) -> None:
        """One log line for the images ``rendering`` showed as placeholders, if any."""
        if self.missing:
            log.warning(
                "%s: %d image(s) missing, shown as placeholders (e.g. %s)",
                rendering,
                len(self.missing),
                self.missing[0],
            )

    def query(self, query: Mapping[str, Any]) -> Image | None:
        if query.get("picture_gone"):  # replaced during its run (imgsim.query.run.inbox_moves)
            return None
        candidates = [query.get("query_path"), query.get("query_copy")]
        paths = [Path(str(p)) for p in candidates if p]
        return self._first(paths, f"query {_query_name(query)}")

    def neighbour(self, neighbour: Mapping[str, Any]) -> Image | None:
        paths: list[Path] = []
        image_id = neighbour.get("image_id")
        if image_id and "/" not in str(image_id) and "\\" not in str(image_id):
            paths.append(self.layout.thumbs / f"{image_id}.jpg")
        if neighbour.get("path"):
            paths.append(self.layout.root / str(neighbour["path"]))
        return self._first(paths, f"neighbour {image_id}")

    def _first(self, paths: list[Path], what: str) -> Image | None:
        for path in paths:
            key = str(path)
            if key not in self._cache:
                self._cache[key] = _load_fitted(path, self.size)
            if self._cache[key] is not None:
                return self._cache[key]
        self.missing.append(what)
        return None


def _load_fitted(path: Path, size: int) -> Image | None:
    """The image at ``path`` scaled to fit in size x size (aspect kept), or None."""
    from PIL import Image as PILImage
    from PIL import ImageOps

    from imgsim.imaging import ImageRejected, load_rgb

    if not path.is_file():
        return None
    try:
        decoded = load_rgb(path, draft_size=(size, size))
    except ImageRejected as exc:
        log.debug("cannot show %s: %s", path, exc)
        return None
    return ImageOps.contain(decoded.image, (size, size), PILImage.Resampling.LANCZOS)


# --------------------------------------------------------------------------------------------
# Contact sheet


def _load_font(size: int) -> Font:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # old Pillow or no FreeType: fixed bitmap font
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    bbox = font.getbbox("Hgjy|")
    return int(bbox[3] - min(0, bbox[1])) + 3


def _fit(draw: ImageDraw, text: str, font: Font, width: int) -> str:
    """``text`` on one line, truncated with '...' to fit ``width`` pixels."""
    text = " ".join(str(text).split())
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits together with the ellipsis
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + _ELLIPSIS, font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + _ELLIPSIS if lo else ""


def _wrap(draw: ImageDraw, text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most ``max_lines`` lines (the last one truncated)."""
    lines: list[str] = []
    current = ""
    words = str(text).split()
    for i, word in enumerate(words):
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        if len(lines) == max_lines - 1:
            current = " ".join(words[i:])
            break
    if current:
        lines.append(current)
    return [_fit(draw, line, font, width) for line in lines[:max_lines]]


def _draw_lines(
    draw: ImageDraw,
    lines: list[str],
    font: Font,
    box: tuple[int, int, int, int],
    fill: tuple[int, int, int],
) -> None:
    """Draw ``lines`` centred in ``box`` (left, top, right, bottom)."""
    left, top, right, bottom = box
    line_h = _line_height(font)
    y = top + max(0, (bottom - top - line_h * len(lines)) // 2)
    for line in lines:
        x = left + max(0, int((right - left - draw.textlength(line, font=font)) // 2))
        draw.text((x, y), line, fill=fill, font=font)
        y += line_h


def _paste_tile(
    sheet: Image,
    draw: ImageDraw,
    image: Image | None,
    xy: tuple[int, int],
    thumb: int,
    font: Font,
    *,
    placeholder: str = "missing",
) -> None:
    x, y = xy
    box = (x, y, x + thumb - 1, y + thumb - 1)
    if image is None:
        draw.rectangle(box, fill=_MISSING_BG, outline=_BORDER)
        _draw_lines(draw, [placeholder], font, box, _MUTED)
        return
    draw.rectangle(box, fill=_TILE_BG, outline=_BORDER)
    w, h = image.size
    sheet.paste(image, (x + (thumb - w) // 2, y + (thumb - h) // 2))


def _rejected_tile(
    draw: ImageDraw, query: Mapping[str, Any], xy: tuple[int, int], thumb: int, font: Font
) -> None:
    x, y = xy
    box = (x, y, x + thumb - 1, y + thumb - 1)
    draw.rectangle(box, fill=_REJECTED_BG, outline=_REJECTED_BORDER, width=2)
    inner = thumb - 12
    max_lines = max(1, (thumb - 12) // _line_height(font))
    lines = ["REJECTED"]
    lines += _wrap(draw, str(query.get("reason") or "unknown reason"), font, inner, 2)
    if query.get("detail"):
        lines += _wrap(draw, str(query["detail"]), font, inner, max(0, max_lines - len(lines)))
    _draw_lines(
        draw, lines[:max_lines], font, (x + 6, y + 6, x + thumb - 6, y + thumb - 6), _REJECTED_TEXT
    )


def render_contact_sheet(
    results: Mapping[str, Any], layout: Layout, *, thumb: int = 160, max_rows: int = MAX_SHEET_ROWS
) -> Image:
    """One row per query: the query tile, then its neighbours; a header line on top.

    The sheet is (k + 1) tiles wide (more if a query has more than k neighbours). Rows beyond
    ``max_rows`` are left out and counted in a footer line.
    """
    from PIL import Image as PILImage
    from PIL import ImageDraw

    thumb = max(32, int(thumb))
    pad = max(6, thumb // 20)
    font = _load_font(max(9, thumb // 14))
    header_font = _load_font(max(11, thumb // 11))
    line_h, header_h = _line_height(font), _line_height(header_font)

    queries = _queries(results)
    shown, hidden = queries[: max(0, max_rows)], max(0, len(queries) - max(0, max_rows))
    k = _k(results)
    cols = 1 + max([k, *(len(_neighbours(q)) for q in shown)])
    row_h = thumb + 2 * line_h + pad
    header_total = pad + header_h + pad
    width = pad + cols * (thumb + pad)
    height = header_total + len(shown) * (row_h + pad) + (header_h + pad if hidden else 0)

    sheet = PILImage.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(sheet)
    header = (
        f"imgsim  model {results.get('model_version') or '?'}  "
        f"run {results.get('run_id') or '?'}  k={k}  queries={len(queries)}"
    )
    draw.text(
        (pad, pad), _fit(draw, header, header_font, width - 2 * pad), fill=_TEXT, font=header_font
    )

    images = _Images(layout, thumb)
    for row, query in enumerate(shown):
        y = header_total + row * (row_h + pad)
        _render_row(sheet, draw, images, query, (pad, y), thumb, pad, font, k)
    if hidden:
        footer = f"... {hidden} more queries not shown (see {RESULTS_CSV} / {GALLERY_HTML})"
        draw.text(
            (pad, height - header_h - pad),
            _fit(draw, footer, header_font, width - 2 * pad),
            fill=_MUTED,
            font=header_font,
        )
    images.warn_missing("contact sheet")
    return sheet


def _render_row(
    sheet: Image,
    draw: ImageDraw,
    images: _Images,
    query: Mapping[str, Any],
    xy: tuple[int, int],
    thumb: int,
    pad: int,
    font: Font,
    k: int,
) -> None:
    x, y = xy
    line_h = _line_height(font)
    caption_y = y + thumb + 2
    name = _query_name(query)
    if query.get("status") == "rejected":
        _rejected_tile(draw, query, (x, y), thumb, font)
    else:
        _paste_tile(sheet, draw, images.query(query), (x, y), thumb, font)
    draw.text((x, caption_y), _fit(draw, f"QUERY {name}", font, thumb), fill=_TEXT, font=font)
    status = str(query.get("status") or "")
    if status and status != "answered":
        draw.text((x, caption_y + line_h), _fit(draw, status, font, thumb), fill=_MUTED, font=font)
    if query.get("status") == "rejected":
        return
    neighbours = _neighbours(query)
    for i, n in enumerate(neighbours, start=1):
        nx = x + i * (thumb + pad)
        _paste_tile(sheet, draw, images.neighbour(n), (nx, y), thumb, font)
        label = f"#{n.get('rank', i)} {n.get('class_name') or n.get('class_id') or ''}".strip()
        draw.text((nx, caption_y), _fit(draw, label, font, thumb), fill=_TEXT, font=font)
        draw.text(
            (nx, caption_y + line_h),
            _fit(draw, f"d={number(n.get('distance'), '.3f', '?')}", font, thumb),
            fill=_MUTED,
            font=font,
        )
    note = _short_note(query, k)
    if note and _found_short(query, k):
        nx = x + (len(neighbours) + 1) * (thumb + pad)
        lines = _wrap(draw, note, font, thumb - 8, max(1, thumb // line_h - 1))
        _draw_lines(draw, lines, font, (nx + 4, y, nx + thumb - 4, y + thumb), _MUTED)


# --------------------------------------------------------------------------------------------
# Gallery (imgsim.templates: run.html)


def run_view(
    results: Mapping[str, Any], query_src: Source, neighbour_src: Source
) -> dict[str, Any]:
    """A run's results as templates/run.html shows them (the run's gallery.html and the UI's
    gallery page), each query as :func:`query_view`."""
    k = _k(results)
    return {
        "run_id": results.get("run_id") or "?",
        "model_version": results.get("model_version") or "?",
        "k": k,
        "created_at": results.get("created_at") or "?",
        "queries": [query_view(q, k, query_src, neighbour_src) for q in _queries(results)],
    }


def query_view(
    query: Mapping[str, Any], k: int, query_src: Source, neighbour_src: Source
) -> dict[str, Any]:
    """A results entry as the ``query_section`` macro (templates/macros.html) shows it: its
    name, status, picture and note, and its neighbours in rank order."""
    status = str(query.get("status") or "?")
    return {
        "name": _query_name(query),
        "status": status,
        "query_id": str(query.get("query_id") or ""),
        "model_version": str(query.get("model_version") or ""),
        # a rejected input is not decoded again (not an image, too large, truncated)
        "picture": None if status == "rejected" else query_src(query),
        "reason": query.get("reason") or "unknown reason",
        "detail": query.get("detail"),
        "note": _short_note(query, k),
        "neighbours": [
            {
                "rank": n.get("rank"),
                "label": class_label(n),
                "distance": n.get("distance"),
                "image_id": str(n.get("image_id") or ""),
                "path": n.get("path"),
                "picture": neighbour_src(n),
            }
            for n in _neighbours(query)
        ],
    }


def class_label(neighbour: Mapping[str, Any]) -> str:
    if neighbour.get("class_name"):
        return str(neighbour["class_name"])
    class_id = neighbour.get("class_id")
    return "no label" if class_id is None else f"class {class_id}"


def _data_uri(image: Image | None) -> str | None:
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_gallery_html(results: Mapping[str, Any], layout: Layout) -> str:
    """A self-contained HTML page: images inlined as JPEG data URIs, no links, all text escaped."""
    images = _Images(layout, GALLERY_IMAGE_SIZE)
    page = render(
        "run.html",
        ui=None,
        **run_view(
            results, lambda q: _data_uri(images.query(q)), lambda n: _data_uri(images.neighbour(n))
        ),
    )
    images.warn_missing("gallery")
    return page
