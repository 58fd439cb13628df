"""``make demo``: build a small, clearly synthetic archive in the Stanford layout, serve it over
loopback HTTP (the real download path), run ``imgsim_index`` with ``airflow dags test`` and print
what was built. With IMGSIM_ARCHIVE_URL and IMGSIM_LABELS_URL set, the real dataset is indexed.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO_CLASSES = [
    "Synthetic Red Sedan", "Synthetic Blue Coupe", "Synthetic Green SUV",
    "Synthetic Yellow Cab", "Synthetic Black Van", "Synthetic White Pickup",
]
COLOURS = [(200, 30, 30), (30, 60, 200), (40, 150, 60), (230, 200, 30), (25, 25, 25),
           (235, 235, 235)]


def synthetic_car(class_index: int, variant: int, size: tuple[int, int] = (480, 320)) -> bytes:
    """A drawn 'car' (body, cabin, wheels) labelled SYNTHETIC, as JPEG bytes. Deterministic."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(class_index * 1000 + variant)
    w, h = size
    sky = tuple(rng.randint(150, 220) for _ in range(3))
    im = Image.new("RGB", size, sky)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, int(h * 0.72), w, h], fill=(90, 90, 90))
    colour = COLOURS[class_index % len(COLOURS)]
    x0 = rng.randint(20, 80)
    length = int(w * (0.55 + 0.1 * (class_index % 3)))
    body_top = int(h * (0.42 - 0.06 * (class_index % 2)))
    draw.rectangle([x0, body_top, x0 + length, int(h * 0.7)], fill=colour)
    cabin = [x0 + length // 5, body_top - int(h * 0.16), x0 + int(length * 0.7), body_top]
    draw.rectangle(cabin, fill=tuple(max(0, c - 40) for c in colour))  # type: ignore[arg-type]
    r = int(h * 0.09)
    for cx in (x0 + length // 5, x0 + int(length * 0.8)):
        draw.ellipse([cx - r, int(h * 0.7) - r, cx + r, int(h * 0.7) + r], fill=(10, 10, 10))
    draw.text((10, 10), f"SYNTHETIC {DEMO_CLASSES[class_index]} #{variant}", fill=(0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def build_demo_archive(out_dir: Path, per_class: int = 8) -> tuple[Path, Path]:
    """Write ``car_ims.tgz`` and ``cars_annos.mat`` (Stanford AI Lab layout) into ``out_dir``."""
    from imgsim.fsutil import atomic_open
    from imgsim.sources.labels import write_cars_annos_mat

    archive, labels = out_dir / "car_ims.tgz", out_dir / "cars_annos.mat"
    if archive.exists() and labels.exists():
        return archive, labels
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[tuple[str, int]] = []
    with (atomic_open(archive, "wb") as fh,
          gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz,   # same bytes every time
          tarfile.open(fileobj=gz, mode="w") as tar):
        n = 0
        for c in range(len(DEMO_CLASSES)):
            for v in range(per_class):
                n += 1
                name = f"car_ims/{n:06d}.jpg"
                data = synthetic_car(c, v)
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


def airflow(args: list[str], env: Mapping[str, str], check: bool = True,
            capture: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "airflow"), *args]
    return subprocess.run(cmd, env=dict(env), check=check, text=True,
                          capture_output=capture)


def summary(data_root: Path) -> str:
    from imgsim.catalog import live_rows
    from imgsim.config import Layout
    from imgsim.models import current_version, describe_lsh, published_versions, read_manifest
    from imgsim.store import quarantined_ids

    layout = Layout(data_root)
    m = read_manifest(layout)
    metrics = m["metrics"]
    lines = [
        "imgsim index built",
        f"  current version : {current_version(layout)} "
        f"(published versions: {len(published_versions(layout))})",
        f"  images indexed  : {m['counts']['indexed']} of {len(live_rows(layout))} live "
        f"(quarantined: {len(quarantined_ids(layout))})",
        f"  backbone        : {m['backbone'].get('name')} {m['backbone'].get('dim')}-d "
        f"({m['backbone'].get('weights')})",
        f"  LSH             : {describe_lsh(m['lsh'])}, bucketLength "
        f"{m['lsh']['bucketLength']:.4g}",
        f"  recall@{metrics['k']}        : {metrics['recall_at_k']:.3f} against exact search "
        f"({metrics['queries']} queries, {100 * metrics['candidates_share']:.0f}% of the index "
        "compared)",
        f"  data root       : {layout.root}",
        f"  model           : {layout.models / m['version']}",
        f"  catalog         : {layout.catalog}",
        "",
        "next: .venv/bin/imgsim query PHOTO.jpg   (or drop photos into "
        f"{layout.queries / 'inbox'} and trigger imgsim_query); make airflow for the UI",
    ]
    return "\n".join(lines)


def run_demo(env: dict[str, str], logical_date: str | None = None) -> int:
    """Run the index DAG once on the embedded default; prints the summary."""
    from imgsim.embedding.backbones import WeightsNotFound, resolve_resnet18_weights

    data_root = Path(env["IMGSIM_DATA_ROOT"])
    if not env.get("IMGSIM_BACKBONE"):
        try:
            resolve_resnet18_weights(env.get("IMGSIM_WEIGHTS", ""))
        except WeightsNotFound as exc:
            print(f"note: {str(exc).split('. ')[0]}.\n      The demo uses the offline "
                  "efficientnet_lite0 backbone instead.", flush=True)
            env["IMGSIM_BACKBONE"] = "efficientnet_lite0"
    logical_date = logical_date or datetime.now(UTC).strftime("%Y-%m-%d")
    print("airflow db migrate ...", flush=True)
    airflow(["db", "migrate"], env, capture=True)
    with contextlib.ExitStack() as stack:
        if not env.get("IMGSIM_ARCHIVE_URL"):
            src = data_root / "demo-source"
            build_demo_archive(src)
            base = stack.enter_context(serve_directory(src))
            env["IMGSIM_ARCHIVE_URL"] = f"{base}/car_ims.tgz"
            env["IMGSIM_LABELS_URL"] = f"{base}/cars_annos.mat"
            print(f"serving the synthetic demo archive at {base}/", flush=True)
        print(f"airflow dags test imgsim_index {logical_date} ...", flush=True)
        proc = airflow(["dags", "test", "imgsim_index", logical_date], env, check=False)
    if proc.returncode != 0:
        print(f"imgsim_index failed (exit {proc.returncode}); see the log above", file=sys.stderr)
        return proc.returncode
    print()
    print(summary(data_root))
    return 0
