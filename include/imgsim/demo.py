"""``make demo``: build a small, clearly synthetic archive in the Stanford layout, serve it over
loopback HTTP (the real download path), run ``imgsim_index`` with ``airflow dags test`` and print
what was built. With IMGSIM_ARCHIVE_URL and IMGSIM_LABELS_URL set, the real dataset is indexed.

The terminal gets a short view (:class:`DemoView`: each task as it starts and ends, the progress
of download, extract and embedding, then the summary); Airflow's and Spark's full output goes to
``<data root>/logs/demo-<time>.log``, whose path is printed first. ``imgsim demo -v`` shows it all.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

from imgsim.imaging import DEMO_CLASSES, synthetic_car  # noqa: E402  (re-exported for tests)

__all__ = ["DEMO_CLASSES", "synthetic_car"]


#: Photos of the demo archive that are copies of another one of their class, as copies reach a
#: real archive, so the duplicates page shows what it is for: (class, variant) -> (variant it
#: copies, how: ``mirror`` + JPEG 70, or ``crop`` 90% + JPEG 80).
DEMO_COPIES = {(0, 7): (0, "mirror"), (1, 7): (2, "crop")}


def demo_photo(class_index: int, variant: int) -> bytes:
    """A photo of the demo archive: :func:`imgsim.imaging.synthetic_car` on its own seeded
    scenery (clouds, a fence, stones on the road), so no two drawings are the same picture;
    the :data:`DEMO_COPIES` are copies of another photo. Deterministic."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw, ImageOps

    copied = DEMO_COPIES.get((class_index, variant))
    if copied is not None:
        source, how = copied
        with Image.open(io.BytesIO(demo_photo(class_index, source))) as im:
            img = im.convert("RGB")
        w, h = img.size
        if how == "mirror":
            img, quality = ImageOps.mirror(img), 70
        else:
            img, quality = img.crop((w // 20, h // 20, w - w // 20, h - h // 20)), 80
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    rng = random.Random(7919 * class_index + variant)
    with Image.open(io.BytesIO(synthetic_car(class_index, variant))) as im:
        drawing = im.convert("RGB")
    w, h = drawing.size
    sky = np.asarray(drawing, np.int16)[40, w - 1]
    # each photo's own shot of the car: stretched unevenly (no similarity maps one onto another)
    sx, sy = rng.uniform(0.65, 1.3), rng.uniform(0.8, 1.2)
    stretched = drawing.resize((round(w * sx), round(h * sy)), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (w, h), tuple(int(v) for v in sky))
    canvas.paste(stretched, (0, h - stretched.height) if sy < 1 else (0, 0))
    car = np.asarray(canvas, np.int16)
    greys = np.flatnonzero(np.abs(car[:, 2] - 90).sum(axis=1) < 40)
    road_top = int(greys[0]) if len(greys) else int(h * 0.72)
    scenery = Image.fromarray(np.broadcast_to(sky, car.shape).astype(np.uint8))
    draw = ImageDraw.Draw(scenery)
    for _ in range(rng.randint(3, 6)):  # clouds
        cx, cy, r = rng.randint(0, w), rng.randint(30, int(h * 0.3)), rng.randint(12, 40)
        draw.ellipse([cx - 2 * r, cy - r, cx + 2 * r, cy + r], fill=(245, 245, 245))
    for x in range(rng.randint(0, 30), w, rng.randint(18, 40)):  # a fence behind the car
        draw.line([x, int(h * 0.55), x, road_top], fill=(120, 90, 60), width=3)
    draw.rectangle([0, road_top, w, h], fill=(90, 90, 90))
    for _ in range(rng.randint(10, 20)):  # birds
        bx, by = rng.randint(0, w), rng.randint(20, int(h * 0.4))
        draw.line([bx - 6, by - 3, bx, by, bx + 6, by - 4], fill=(30, 30, 30), width=2)
    for _ in range(rng.randint(8, 16)):  # stones on the road
        x0, y0 = rng.randint(0, w), rng.randint(road_top + 4, h)
        draw.ellipse([x0, y0, x0 + rng.randint(3, 9), y0 + rng.randint(2, 6)], fill=(50, 50, 50))
    back = np.asarray(scenery, np.int16)
    rows = np.arange(h)[:, None]
    behind = ((np.abs(car - sky).sum(axis=2) < 40) & (rows < road_top)) | (
        (np.abs(car - 90).sum(axis=2) < 40) & (rows >= road_top)
    )  # the drawing's sky and road: the scenery shows there, the car and its label stay
    out = np.where(behind[..., None], back, car).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def build_demo_archive(out_dir: Path, per_class: int = 8) -> tuple[Path, Path]:
    """Write ``car_ims.tgz`` and ``cars_annos.mat`` (Stanford AI Lab layout) into ``out_dir``:
    :func:`demo_photo` of each demo class and variant (two of them copies of another)."""
    from imgsim.fsutil import atomic_open
    from imgsim.sources.labels import write_cars_annos_mat

    archive, labels = out_dir / "car_ims.tgz", out_dir / "cars_annos.mat"
    if archive.exists() and labels.exists():
        return archive, labels
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[tuple[str, int]] = []
    with (
        atomic_open(archive, "wb") as fh,
        gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz,  # same bytes every time
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        n = 0
        for c in range(len(DEMO_CLASSES)):
            for v in range(per_class):
                n += 1
                name = f"car_ims/{n:06d}.jpg"
                data = demo_photo(c, v)
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                tar.addfile(info, io.BytesIO(data))
                records.append((name, c + 1))
    write_cars_annos_mat(labels, records, DEMO_CLASSES)
    return archive, labels


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on 127.0.0.1 (a free port) for the duration; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("demo server: " + format, *args)


def summary(data_root: Path) -> str:
    from imgsim.ann.projection import describe as describe_projection
    from imgsim.catalog import label_coverage, live_rows
    from imgsim.config import Layout
    from imgsim.store import quarantined_ids
    from imgsim.versions.models import (
        current_version,
        describe_lsh,
        published_versions,
        read_manifest,
    )

    layout = Layout(data_root)
    m = read_manifest(layout)
    metrics = m["metrics"]
    live = live_rows(layout)
    cov = label_coverage(live)
    proj = m.get("projection") or {}
    lines = [
        "imgsim index built",
        f"  current version : {current_version(layout)} "
        f"(published versions: {len(published_versions(layout))})",
        f"  images indexed  : {m['counts']['indexed']} of {len(live)} live "
        f"(quarantined: {len(quarantined_ids(layout))})",
        f"  labels          : {cov['labelled_images']} of {cov['images']} images labelled "
        f"({100 * cov['share']:.0f}%), {cov['classes']} classes{names_note(live)}",
        f"  search space    : {describe_projection(proj)}"
        f"{': ' + proj['reason'] if proj.get('reason') else ''}",
        f"  backbone        : {m['backbone'].get('name')} {m['backbone'].get('dim')}-d "
        f"({m['backbone'].get('weights')})",
        f"  LSH             : {describe_lsh(m['lsh'])}, bucketLength "
        f"{m['lsh']['bucketLength']:.4g}",
        f"  recall@{metrics['k']}        : {metrics['recall_at_k']:.3f} against exact search "
        f"({metrics['queries']} queries, {100 * metrics['candidates_share']:.0f}% of the index "
        "compared)",
        f"  neighbour graph : {describe_graph(m)}",
        f"  map             : {describe_map(m)}",
        f"  data root       : {layout.root}",
        f"  model           : {layout.models / m['version']}",
        f"  catalog         : {layout.catalog}",
        "",
        "next: .venv/bin/imgsim query PHOTO.jpg   (or drop photos into "
        f"{layout.queries / 'inbox'} and trigger imgsim_query); make airflow for the UI",
    ]
    return "\n".join(lines)


def names_note(rows: list[dict[str, Any]]) -> str:
    """How the run summary says whether the labelled classes have names."""
    labelled = {r["class_id"] for r in rows if r["class_id"] is not None}
    named = {r["class_id"] for r in rows if r["class_id"] is not None and r["class_name"]}
    if not labelled or named == labelled:
        return ""
    if not named:
        return (
            " (no class names: give cars_meta.mat with IMGSIM_CLASS_NAMES_URL, or put it "
            "beside the labels)"
        )
    return f" ({len(labelled) - len(named)} without a name)"


def describe_graph(manifest: dict[str, Any]) -> str:
    """One line on a version's neighbour graph and near-duplicate groups (built in full, or
    updated from the base's graph: then no share of pairs was compared)."""
    g, d = manifest.get("neighbours"), manifest.get("duplicates") or {}
    if not g:
        return "none (IMGSIM_GRAPH_K=0)"
    if g.get("mode") == "incremental":
        changes = g.get("changes") or {}
        work = (
            f"updated from {g.get('previous')} ({changes.get('new', 0)} new, "
            f"{changes.get('gone', 0)} gone)"
        )
    elif g.get("pairs_share") is not None:
        work = f"{100 * g['pairs_share']:.0f}% of the pairs compared"
    else:
        work = "built in full"
    return (
        f"k={g['k']}, recall@{g['k']} {g['recall_at_k']:.3f} against exact search, "
        f"{work}, {g.get('seconds', 0):.0f} s; "
        + (
            f"{d.get('groups', 0)} near-duplicate group(s) at distance <= {d['distance']}"
            if d.get("distance") is not None
            else "no near-duplicate groups (no distance measured for this space)"
        )
    )


def describe_map(manifest: dict[str, Any]) -> str:
    """One line on a version's stored 2-D map (imgsim.jobs.version_map)."""
    entry = manifest.get("map")
    if not entry:
        return "none (IMGSIM_MAP_POINTS=0, or fewer than 3 references)"
    how = (
        "laid out anew"
        if entry.get("laid_out_in") in (None, manifest.get("version"))
        else f"{entry.get('placed', 0)} placed into {entry['laid_out_in']}'s layout"
    )
    method = "t-SNE" if entry.get("layout") == "tsne" else "principal plane"
    same = entry.get("same_class_nearest_on_map")
    return (
        f"{entry['points']} of {entry.get('references', entry['points'])} references, "
        f"{method}, {how}, {entry.get('seconds', 0):.0f} s"
        + (
            f"; nearest point on the map of the same class: {same:.0%} (in the search "
            f"space: {entry.get('same_class_nearest_in_space') or 0:.0%})"
            if same is not None
            else ""
        )
    )


#: ``airflow dags test``'s own lines around each task (airflow.sdk.definitions.dag._run_task).
_TASK_START = re.compile(r"\[DAG TEST\] starting task_id=(\S+) map_index=(-?\d+)")
_TASK_END = re.compile(r"\[DAG TEST\] end task task_id=(\S+) map_index=(-?\d+)")
_TASK_ERROR = re.compile(
    r"\[DAG TEST\] Error running task|Task failed; ti=|Task failed with "
    r"exception"
)
#: The last line of a Python traceback: ``package.module.SomeError: its text`` (builtins
#: unqualified: ``ValueError: ...``). What a failed task's line on the terminal repeats.
_EXCEPTION_LINE = re.compile(
    r"^((?:[a-z_]\w*\.)+[A-Z]\w*|[A-Z]\w*(?:Error|Exception|Exit|Interrupt))(?:: (.*))?$"
)
#: Airflow's wrappers whose text is the error itself (imgsim.errors.fail_fast's message is
#: already "ClassName: text").
_WRAPPERS = ("AirflowFailException", "AirflowException", "AirflowTaskTerminated")
#: Lines after an error's first one that are not its text: log records, traceback frames.
_NOT_ERROR_TEXT = re.compile(
    r"^(\d{4}-\d\d-\d\dT|\[|Traceback |The above exception|During handling|  File )"
)
#: At most this much of an error's text is shown on the terminal (the log has it all).
ERROR_CHARS = 1500
#: imgsim's own progress lines (imgsim.sources.download, imgsim.index.pipeline,
#: imgsim.embedding.infer).
_PROGRESS = [
    (
        "download",
        re.compile(
            r"((?:download|copy) \S+ (?:progress|done): [^\[\]]*?MB/s"
            r"(?:, ETA (?:[\d.]+ s|unknown))?)"
        ),
    ),
    (
        "extract",
        re.compile(
            r"(extract \S+ -> \S+: \d+ files, \d+ bytes "
            r"\((?:already )?extracted\))"
        ),
    ),
    ("embed", re.compile(r"(embedded \d+/\d+ images \([\d.]+ images/s\))")),
    ("embed", re.compile(r"(embedded with \S+: \d+ shard\(s\), \d+ of \d+ images)")),
    (
        "fit",
        re.compile(
            r"(nothing changed since \S+ \(\d+ images\): no refit"
            r"|no current model: fitting \S+"
            r"|CURRENT cannot be built on: .*? \(nothing of it is reused\))"
        ),
    ),
]
#: A progress line of one kind is shown at most this often (its final line always).
PROGRESS_EVERY_S = 10.0


class DemoView:
    """Turns ``airflow dags test`` output into the demo's short view, one line at a time.

    ``feed(line)`` returns the line to show for it, or None. Progress lines of one kind are
    thinned to one per :data:`PROGRESS_EVERY_S` (lines saying ``done`` always pass).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: dict[tuple[str, str], float] = {}
        self.failed: set[tuple[str, str]] = set()
        self.current: tuple[str, str] | None = None
        self.last_progress: dict[str, float] = {}
        self.tasks_failed: list[str] = []
        self.errors: dict[str, str] = {}  # failed task -> its error's text (the last attempt's)
        self._error: dict[tuple[str, str], str] = {}
        self._continues = False  # the lines after an error's first one are its text too

    @staticmethod
    def _name(task_id: str, map_index: str) -> str:
        return task_id if map_index == "-1" else f"{task_id}[{map_index}]"

    def feed(self, line: str) -> str | None:
        if m := _TASK_START.search(line):
            key = (m.group(1), m.group(2))
            self.started.setdefault(key, self.clock())
            self.current = key
            return f"  > {self._name(*key)} started"
        if m := _TASK_END.search(line):
            key = (m.group(1), m.group(2))
            took = self.clock() - self.started.get(key, self.clock())
            self.current = None
            if key in self.failed:
                self.failed.discard(key)  # a retry of the task starts afresh
                name = self._name(*key)
                self.tasks_failed.append(name)
                error = self._error.pop(key, "")
                if error:
                    self.errors[name] = error
                return f"  x {name} FAILED after {took:.0f} s" + (
                    f"\n      {error}" if error else ""
                )
            return f"  + {self._name(*key)} done in {took:.0f} s"
        if _TASK_ERROR.search(line) and self.current is not None:
            self.failed.add(self.current)
            return None
        if self.current is not None and self.current in self.failed:
            if m := _EXCEPTION_LINE.match(line):
                self._error[self.current] = _error_text(m.group(1), m.group(2) or "")
                self._continues = True
            elif self._continues and line.strip() and not _NOT_ERROR_TEXT.match(line):
                self._error[self.current] = _error_text("", self._error[self.current], line)
            else:
                self._continues = False
            return None
        for kind, pattern in _PROGRESS:
            if m := pattern.search(line):
                now = self.clock()
                final = (
                    " done:" in m.group(1)
                    or kind in ("extract", "fit")
                    or (kind == "embed" and _embed_complete(m.group(1)))
                )
                if not final and now - self.last_progress.get(kind, -1e9) < PROGRESS_EVERY_S:
                    return None
                self.last_progress[kind] = now
                return f"      {m.group(1)}"
        return None


def _error_text(qualified: str, text: str, more: str = "") -> str:
    """A traceback's last lines as a person reads them: ``SomeError: text`` (the wrapper's
    name dropped where its text is the error), at most :data:`ERROR_CHARS` long; ``more``:
    a further line of the same text (``qualified`` empty: ``text`` is what was shown so far)."""
    if not qualified:
        shown = f"{text}\n      {more.strip()}"
    else:
        name = qualified.rsplit(".", 1)[-1]
        shown = text.strip() if name in _WRAPPERS and text.strip() else f"{name}: {text}"
        shown = shown.strip().rstrip(":").strip()
    return shown if len(shown) <= ERROR_CHARS else shown[: ERROR_CHARS - 3] + "..."


def _embed_complete(text: str) -> bool:
    m = re.match(r"embedded (\d+)/(\d+) ", text)
    return m is None or m.group(1) == m.group(2)


def demo_log_path(data_root: Path) -> Path:
    return data_root / "logs" / f"demo-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.log"


def _stream(
    cmd: list[str], env: Mapping[str, str], logfile: IO[str], show: Callable[[str], str | None]
) -> int:
    """Run ``cmd``, every line of its output into ``logfile``; ``show(line)`` picks what the
    terminal gets. Returns the exit status."""
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    )
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            logfile.write(line)
            shown = show(line.rstrip("\n"))
            if shown is not None:
                print(shown, flush=True)
    logfile.flush()
    return proc.returncode


def run_demo(env: dict[str, str], logical_date: str | None = None, verbose: bool = False) -> int:
    """Run the index DAG once on the embedded default; prints a short view and the summary
    (``verbose``: Airflow's whole output), the full log going to a file named first."""
    from imgsim.embedding.backbones import WeightsNotFound, resolve_resnet18_weights

    data_root = Path(env["IMGSIM_DATA_ROOT"])
    log_path = demo_log_path(data_root)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"full log: {log_path}" + ("" if verbose else "   (imgsim demo -v shows it here)"),
        flush=True,
    )
    if not env.get("IMGSIM_BACKBONE"):
        try:
            resolve_resnet18_weights(
                env.get("IMGSIM_WEIGHTS", ""),
                env.get("IMGSIM_RESNET18_WEIGHTS_URL"),
                fetch_retries=0,
            )
        except WeightsNotFound as exc:
            print(
                f"note: {str(exc).split('. ')[0]}.\n      The demo uses the offline "
                "efficientnet_lite0 backbone instead.",
                flush=True,
            )
            env["IMGSIM_BACKBONE"] = "efficientnet_lite0"
    logical_date = logical_date or datetime.now(UTC).strftime("%Y-%m-%d")
    view = DemoView()
    show: Callable[[str], str | None] = (lambda line: line) if verbose else view.feed
    airflow_bin = str(Path(sys.executable).parent / "airflow")
    with open(log_path, "a", encoding="utf-8") as logfile:
        print("airflow db migrate ...", flush=True)
        rc = _stream(
            [airflow_bin, "db", "migrate"],
            env,
            logfile,
            (lambda line: line) if verbose else (lambda line: None),
        )
        if rc != 0:
            print(f"airflow db migrate failed (exit {rc}); see {log_path}", file=sys.stderr)
            return rc
        with contextlib.ExitStack() as stack:
            if not env.get("IMGSIM_ARCHIVE_URL"):
                src = data_root / "demo-source"
                build_demo_archive(src)
                base = stack.enter_context(serve_directory(src))
                env["IMGSIM_ARCHIVE_URL"] = f"{base}/car_ims.tgz"
                env["IMGSIM_LABELS_URL"] = f"{base}/cars_annos.mat"
                print(f"serving the synthetic demo archive at {base}/", flush=True)
            print(f"airflow dags test imgsim_index {logical_date} ...", flush=True)
            rc = _stream(
                [airflow_bin, "dags", "test", "imgsim_index", logical_date], env, logfile, show
            )
    if rc != 0 or view.tasks_failed:
        failed = (
            f" (failed: {', '.join(dict.fromkeys(view.tasks_failed))})" if view.tasks_failed else ""
        )
        print(
            f"\nimgsim_index failed (exit {rc}){failed}; the full log is {log_path}",
            file=sys.stderr,
        )
        for task_name, error in view.errors.items():
            print(f"  {task_name}: {error}", file=sys.stderr)
        return rc or 1
    print()
    print(summary(data_root))
    print(f"\nfull log: {log_path}")
    return 0
