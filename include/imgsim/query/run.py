"""The query pipeline's task bodies: collect -> embed (+ answer) -> (Spark lookup) -> finalize.

A run with few queries (at most ``IMGSIM_QUERY_LOCAL_MAX``) is answered in the embed task by
the in-process twin of the published model (:func:`imgsim.query.lookup.lookup`); a larger one by the
Spark job ``spark_jobs/query_lsh.py``. Both write the same ``neighbours/`` table, which
:func:`finalize` turns into the results; the run records which engine answered.

Each run works in ``queries/results/<run>/`` and pins one model version at collect time, so a
publish or rollback during the run cannot mix versions. A query image is identified by the
sha256 of its bytes; a ledger per version (``queries/ledger/<version>/<id>.json``) makes sure
the same image is not answered twice by the same version.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgsim.config import Layout, Settings
from imgsim.fsutil import atomic_write_json, read_json, run_key, sha256_file

log = logging.getLogger(__name__)

ANSWERED, REJECTED, ALREADY = "answered", "rejected", "already_answered"
PENDING = "pending"
#: who answers a run's queries: the embed task in-process, or the Spark job
ENGINES = ("local", "spark")


def inbox(layout: Layout) -> Path:
    return layout.queries / "inbox"


def run_dir_for(layout: Layout, run_id: str) -> Path:
    return layout.queries / "results" / run_key(run_id)


def ledger_entry(layout: Layout, version: str, query_id: str) -> Path:
    return layout.queries / "ledger" / version / f"{query_id}.json"


def _allowed(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(r.resolve()) for r in roots)


def collect(
    settings: Settings, run_id: str, image_paths: list[str], k: int, version: str | None = None
) -> dict[str, Any]:
    """Gather query images (inbox + Params), pin the model version, write ``queries.json``.

    Returns ``{}`` when there is nothing to look at (the rest of the run is skipped).
    """
    from imgsim.sources.labels import find_images
    from imgsim.versions.models import (
        current_version,
        pin_version,
        read_manifest,
        verify_version,
    )

    layout = settings.layout
    if not 1 <= int(k) <= 100:
        raise ValueError(f"k must be between 1 and 100, got {k}")
    box = inbox(layout)
    box.mkdir(parents=True, exist_ok=True)
    found: list[tuple[Path, str]] = [(p, "inbox") for p in find_images(box)]
    found += [(Path(p).expanduser(), "param") for p in image_paths]
    if not found:
        log.info("no query images in %s and none given as Params", box)
        return {}
    pinned = version or current_version(layout)
    manifest = read_manifest(layout, pinned)  # VersionNotFound names the problem
    pinned = manifest["version"]
    verify_version(layout, pinned)  # VersionDamaged names file and rollback
    pin_version(layout, pinned, run_key(run_id))  # no publish prunes it during this run
    roots = settings.allowed_query_roots
    queries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path, source in found:
        entry: dict[str, Any] = {
            "query_name": path.name,
            "query_path": str(path.absolute()),
            "source": source,
            "status": PENDING,
            "reason": None,
            "detail": None,
            "query_id": None,
        }
        if source == "param" and not _allowed(path, roots):
            entry.update(
                status=REJECTED,
                reason="path_not_allowed",
                detail=f"{path} is outside the allowed query roots "
                f"{[str(r) for r in roots]} (IMGSIM_QUERY_ROOTS)",
            )
        elif not path.is_file():
            entry.update(status=REJECTED, reason="missing", detail=f"{path} is not a file")
        else:
            qid = sha256_file(path)
            entry["query_id"] = qid
            previous = ledger_entry(layout, pinned, qid)
            if qid in seen:
                entry.update(status=ALREADY, detail="the same image appears twice in this run")
            elif previous.exists():
                entry.update(
                    status=ALREADY,
                    detail=f"answered before by {pinned} in run {read_json(previous)['run_id']}",
                )
            seen.add(qid)
        queries.append(entry)
    run_dir = run_dir_for(layout, run_id)
    plan = {
        "run_id": run_id,
        "model_version": pinned,
        "k": int(k),
        "query_expansion": settings.query_expansion,
        "scan_share": settings.scan_share,
        "scan_below": settings.scan_below,
        "created_at": datetime.now(UTC).isoformat(),
        "queries": queries,
    }
    atomic_write_json(run_dir / "queries.json", plan)
    pending = sum(q["status"] == PENDING for q in queries)
    log.info("%d query image(s), %d to answer with %s (k=%d)", len(queries), pending, pinned, k)
    return {
        "run_dir": str(run_dir),
        "model_version": pinned,
        "k": int(k),
        "pending": pending,
        "query_expansion": settings.query_expansion,
        "scan_share": settings.scan_share,
        "scan_below": settings.scan_below,
        "data_root": str(layout.root),
    }


def embed(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Embed the pending queries with the pinned version's backbone; record rejections."""
    import numpy as np
    import pyarrow as pa

    from imgsim.ann import l2_normalize
    from imgsim.query.lookup import embed_files, query_backbone
    from imgsim.store import write_parquet_atomic
    from imgsim.versions.models import read_manifest

    rdir = Path(run_dir)
    plan = read_json(rdir / "queries.json")
    manifest = read_manifest(settings.layout, plan["model_version"])
    pending = [q for q in plan["queries"] if q["status"] == PENDING]
    vectors: dict[str, Any] = {}
    if pending:
        backbone = query_backbone(settings, manifest)
        good, bad = embed_files(
            backbone,
            [Path(q["query_path"]) for q in pending],
            batch_size=settings.batch_size,
            max_pixels=settings.max_image_pixels,
        )
        for q in pending:
            if q["query_path"] in bad:
                rej = bad[q["query_path"]]
                q.update(status=REJECTED, reason=rej.reason, detail=rej.detail)
            else:
                vectors[q["query_id"]] = good[q["query_path"]]
    ids = sorted(vectors)
    dim = int(manifest["embedding_dim"])
    mat = l2_normalize(np.stack([vectors[i] for i in ids])) if ids else np.zeros((0, dim))
    table = pa.table(
        {
            "query_id": pa.array(ids, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(mat.reshape(-1), pa.float32()), dim
            ),
        }
    )
    write_parquet_atomic(table, rdir / "query_vectors.parquet")
    atomic_write_json(rdir / "queries.json", plan)
    return {
        "run_dir": run_dir,
        "embedded": len(ids),
        "rejected": sum(q["status"] == REJECTED for q in plan["queries"]),
    }


def choose_engine(queries: int, local_max: int) -> str:
    """``local`` for at most ``local_max`` queries (no JVM to start), else ``spark``."""
    if queries < 0 or local_max < 0:
        raise ValueError(f"queries ({queries}) and local_max ({local_max}) must be >= 0")
    return "local" if queries <= local_max else "spark"


#: A neighbour's columns in ``neighbours/`` (the lookup's ``Neighbour`` fields of those names).
NEIGHBOUR_FIELDS = ("rank", "image_id", "path", "class_id", "class_name", "distance")


def neighbours_table(query_ids: list[str], answers: list[Any]) -> Any:
    """The Spark job's ``neighbours`` table (:func:`neighbours_schema`) from
    :func:`imgsim.query.lookup.lookup` answers: one row per neighbour; a query without any gets one
    row with a null image_id, as the job writes it."""
    import pyarrow as pa

    if len(query_ids) != len(answers):
        raise ValueError(f"{len(query_ids)} query ids but {len(answers)} answers")
    rows: list[dict[str, Any]] = []
    for qid, ans in zip(query_ids, answers, strict=True):
        base = {"query_id": qid, "candidates": int(ans.candidates), "method": ans.method}
        if not ans.neighbours:
            rows.append({**base, **dict.fromkeys(NEIGHBOUR_FIELDS)})
        rows.extend(
            {**base, **{f: getattr(n, f) for f in NEIGHBOUR_FIELDS}, "distance": float(n.distance)}
            for n in ans.neighbours
        )
    return pa.Table.from_pylist(rows, schema=neighbours_schema())


def neighbours_schema() -> Any:
    """Columns of ``neighbours/``, as both engines write them (the job's Spark types)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("query_id", pa.string()),
            ("rank", pa.int32()),
            ("image_id", pa.string()),
            ("path", pa.string()),
            ("class_id", pa.int32()),
            ("class_name", pa.string()),
            ("distance", pa.float64()),
            ("candidates", pa.int64()),
            ("method", pa.string()),
        ]
    )


def write_neighbours(table: Any, target: Path) -> None:
    """Write ``table`` as the Parquet directory ``target`` (as the Spark job does): built
    beside it, then renamed into place; an older one is replaced only once the new one is
    complete."""
    import shutil
    import uuid

    from imgsim.fsutil import TMP_PREFIX, fsync_dir
    from imgsim.store import write_parquet_atomic

    tag = uuid.uuid4().hex[:8]
    tmp = target.parent / f"{TMP_PREFIX}{target.name}-{tag}"
    old = target.parent / f"{TMP_PREFIX}{target.name}-old-{tag}"
    try:
        write_parquet_atomic(table, tmp / "part-00000.parquet")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def answer_locally(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Answer the run's embedded queries in-process (:func:`imgsim.query.lookup.lookup` with the
    pinned version, ``k`` and ``query_expansion``); writes ``neighbours/`` as the Spark job
    would."""
    import numpy as np
    import pyarrow.parquet as pq

    from imgsim.query.lookup import load_model, lookup

    rdir = Path(run_dir)
    plan = read_json(rdir / "queries.json")
    table = pq.read_table(rdir / "query_vectors.parquet")
    ids = table.column("query_id").to_pylist()
    answers: list[Any] = []
    if ids:
        model = load_model(settings.layout, plan["model_version"])
        # plans written before the scan rule: never scan, as the Spark job reads them too
        model.set_scan(float(plan.get("scan_share", 1.0)), int(plan.get("scan_below", 0)))
        vectors = np.asarray(
            table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False),
            np.float32,
        ).reshape(len(ids), -1)
        answers = lookup(model, vectors, int(plan["k"]), int(plan.get("query_expansion") or 0))
    write_neighbours(neighbours_table(ids, answers), rdir / "neighbours")
    methods = {m: sum(a.method == m for a in answers) for m in {a.method for a in answers}}
    log.info("answered %d queries in-process with %s: %s", len(ids), plan["model_version"], methods)
    return {"answered": len(ids), "methods": methods}


def embed_and_route(settings: Settings, run_dir: str) -> dict[str, Any]:
    """The embed task: embed, pick the engine (:func:`choose_engine` on the embedded count and
    ``IMGSIM_QUERY_LOCAL_MAX``), record it in ``queries.json`` and, for ``local``, answer."""
    summary = embed(settings, run_dir)
    engine = choose_engine(summary["embedded"], settings.query_local_max)
    rdir = Path(run_dir)
    plan = read_json(rdir / "queries.json")
    plan["engine"] = engine
    atomic_write_json(rdir / "queries.json", plan)
    log.info(
        "%d queries embedded: answered by %s (IMGSIM_QUERY_LOCAL_MAX=%d)",
        summary["embedded"],
        "the Spark job" if engine == "spark" else "this task",
        settings.query_local_max,
    )
    if engine == "local":
        answer_locally(settings, run_dir)
    return {**summary, "engine": engine}


def read_neighbours(run_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """``neighbours/`` (either engine's): neighbours per query id (ranked) and candidate counts."""
    import pyarrow.parquet as pq

    out: dict[str, list[dict[str, Any]]] = {}
    counts: dict[str, int] = {}
    path = run_dir / "neighbours"
    if path.exists():
        for row in pq.read_table(path).to_pylist():
            counts[row["query_id"]] = int(row["candidates"])
            if row["image_id"] is not None:
                out.setdefault(row["query_id"], []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r["rank"])
    return out, counts


def inbox_moves(
    layout: Layout, run_name: str, queries: list[dict[str, Any]]
) -> list[tuple[Path, Path]]:
    """Where each inbox image of a run goes when the run is done: answered ones (and those
    answered before) to ``processed/<run>/``, rejected ones to ``rejected/<run>/``, under
    their path relative to the inbox (``inbox/a/x.jpg`` and ``inbox/b/x.jpg`` stay apart).
    Sets each moved query's ``query_copy``.

    An image whose bytes changed since the run collected it (replaced in the inbox during the
    run) stays in the inbox, unanswered, for the next run; so does one that is gone."""
    box = inbox(layout).absolute()
    moves: list[tuple[Path, Path]] = []
    for q in queries:
        source = Path(q["query_path"])
        if q["source"] != "inbox" or not source.is_file():
            continue
        if q.get("query_id") and sha256_file(source) != q["query_id"]:
            log.warning("%s changed during the run; left in the inbox for the next run", source)
            q["note"] = (
                "replaced in the inbox during the run: the answers are for the photo collected, "
                "the new one is left there for the next run"
            )
            q["picture_gone"] = True  # the bytes answered are no longer on disk: no picture
            continue
        try:
            relative = source.absolute().relative_to(box)
        except ValueError:
            relative = Path(source.name)
        folder = "rejected" if q["status"] == REJECTED else "processed"
        target = free_name(layout.queries / folder / run_name / relative)
        moves.append((source, target))
        q["query_copy"] = str(target)
    return moves


def free_name(target: Path) -> Path:
    """``target``, or its first numbered twin (``x.1.jpg``) that names no file yet."""
    candidate, n = target, 0
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.stem}.{n}{target.suffix}")
    return candidate


def move_out(source: Path, target: Path) -> Path:
    """Move ``source`` to ``target`` (or a free twin of it) without ever replacing a file:
    a hard link that fails on a taken name, then the unlink; a plain rename after a check
    where hard links are not possible. Returns where it went."""
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        target = free_name(target)
        try:
            os.link(source, target)
        except FileExistsError:
            continue  # taken between the check and the link: the next twin
        except OSError:  # no hard links on this filesystem
            os.replace(source, target)
            return target
        source.unlink()
        return target


def finalize(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Assemble and write the results; ledger the answers; move inbox images out of the inbox."""
    from imgsim.query.lookup import answer_fields
    from imgsim.query.results import write_results
    from imgsim.versions.models import read_manifest, unpin_version

    layout = settings.layout
    rdir = Path(run_dir)
    plan = read_json(rdir / "queries.json")
    version, k = plan["model_version"], plan["k"]
    neighbours, counts = read_neighbours(rdir)
    plan["engine"] = plan.get("engine") or "spark"  # runs before the engine choice: Spark
    methods = {qid: str(rows[0].get("method") or "lsh") for qid, rows in neighbours.items()}
    indexed = int(read_manifest(layout, version)["counts"]["indexed"])
    for q in plan["queries"]:
        q["model_version"] = version
        q.setdefault("neighbours", [])
        q.setdefault("note", None)
        if q["status"] == PENDING:
            rows = neighbours.get(q["query_id"], [])
            q.update(
                answer_fields(
                    [
                        {
                            "rank": r["rank"],
                            "image_id": r["image_id"],
                            "path": r["path"],
                            "class_id": r["class_id"],
                            "class_name": r["class_name"],
                            "distance": float(r["distance"]),
                        }
                        for r in rows
                    ],
                    counts.get(q["query_id"], 0),
                    methods.get(q["query_id"], "lsh"),
                    k,
                    indexed,
                )
            )
    moves = inbox_moves(layout, rdir.name, plan["queries"])
    # Order matters for crash safety: results, then the ledger, then the moves. A crash before
    # the moves leaves the images in the inbox, and the next run finds them in the ledger.
    paths = write_results(rdir, plan, layout)
    for q in plan["queries"]:
        if q["status"] == ANSWERED:
            atomic_write_json(
                ledger_entry(layout, version, q["query_id"]),
                {"run_id": plan["run_id"], "results": str(paths["results_json"])},
            )
    for source, target in moves:
        move_out(source, target)
    unpin_version(layout, run_key(plan["run_id"]))
    summary = {
        s: sum(q["status"] == s for q in plan["queries"]) for s in (ANSWERED, REJECTED, ALREADY)
    }
    log.info("results for %d queries in %s: %s", len(plan["queries"]), rdir, summary)
    return {
        "run_dir": run_dir,
        "model_version": version,
        "engine": plan["engine"],
        **summary,
        "files": {k: str(v) for k, v in paths.items()},
    }
