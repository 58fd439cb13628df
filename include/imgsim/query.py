"""The query pipeline's task bodies: collect -> embed -> (Spark lookup) -> finalize.

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
from imgsim.fsutil import atomic_write_json, read_json, sha256_file
from imgsim.pipeline import run_key

log = logging.getLogger(__name__)

ANSWERED, REJECTED, ALREADY = "answered", "rejected", "already_answered"
PENDING = "pending"


def inbox(layout: Layout) -> Path:
    return layout.queries / "inbox"


def run_dir_for(layout: Layout, run_id: str) -> Path:
    return layout.queries / "results" / run_key(run_id)


def ledger_entry(layout: Layout, version: str, query_id: str) -> Path:
    return layout.queries / "ledger" / version / f"{query_id}.json"


def _allowed(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(r.resolve()) for r in roots)


def collect(settings: Settings, run_id: str, image_paths: list[str], k: int,
            version: str | None = None) -> dict[str, Any]:
    """Gather query images (inbox + Params), pin the model version, write ``queries.json``.

    Returns ``{}`` when there is nothing to look at (the rest of the run is skipped).
    """
    from imgsim.models import current_version, read_manifest, verify_version
    from imgsim.sources.labels import find_images

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
    manifest = read_manifest(layout, pinned)          # VersionNotFound names the problem
    pinned = manifest["version"]
    verify_version(layout, pinned)                    # VersionDamaged names file and rollback
    roots = settings.allowed_query_roots
    queries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for path, source in found:
        entry: dict[str, Any] = {"query_name": path.name, "query_path": str(path.absolute()),
                                 "source": source, "status": PENDING, "reason": None,
                                 "detail": None, "query_id": None}
        if source == "param" and not _allowed(path, roots):
            entry.update(status=REJECTED, reason="path_not_allowed",
                         detail=f"{path} is outside the allowed query roots "
                                f"{[str(r) for r in roots]} (IMGSIM_QUERY_ROOTS)")
        elif not path.is_file():
            entry.update(status=REJECTED, reason="missing", detail=f"{path} is not a file")
        else:
            qid = sha256_file(path)
            entry["query_id"] = qid
            previous = ledger_entry(layout, pinned, qid)
            if qid in seen:
                entry.update(status=ALREADY, detail="the same image appears twice in this run")
            elif previous.exists():
                entry.update(status=ALREADY, detail=f"answered before by {pinned} in run "
                                                    f"{read_json(previous)['run_id']}")
            seen.add(qid)
        queries.append(entry)
    run_dir = run_dir_for(layout, run_id)
    plan = {"run_id": run_id, "model_version": pinned, "k": int(k),
            "query_expansion": settings.query_expansion,
            "created_at": datetime.now(UTC).isoformat(), "queries": queries}
    atomic_write_json(run_dir / "queries.json", plan)
    pending = sum(q["status"] == PENDING for q in queries)
    log.info("%d query image(s), %d to answer with %s (k=%d)", len(queries), pending, pinned, k)
    return {"run_dir": str(run_dir), "model_version": pinned, "k": int(k), "pending": pending,
            "query_expansion": settings.query_expansion, "data_root": str(layout.root)}


def embed(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Embed the pending queries with the pinned version's backbone; record rejections."""
    import numpy as np
    import pyarrow as pa

    from imgsim.lookup import embed_files, load_query_backbone
    from imgsim.lsh import l2_normalize
    from imgsim.models import read_manifest
    from imgsim.store import write_parquet_atomic

    rdir = Path(run_dir)
    plan = read_json(rdir / "queries.json")
    manifest = read_manifest(settings.layout, plan["model_version"])
    pending = [q for q in plan["queries"] if q["status"] == PENDING]
    vectors: dict[str, Any] = {}
    if pending:
        backbone = load_query_backbone(manifest, weights_path=settings.weights_path,
                                       device=settings.device)
        good, bad = embed_files(backbone, [Path(q["query_path"]) for q in pending],
                                batch_size=settings.batch_size,
                                max_pixels=settings.max_image_pixels)
        for q in pending:
            if q["query_path"] in bad:
                rej = bad[q["query_path"]]
                q.update(status=REJECTED, reason=rej.reason, detail=rej.detail)
            else:
                vectors[q["query_id"]] = good[q["query_path"]]
    ids = sorted(vectors)
    dim = int(manifest["embedding_dim"])
    mat = l2_normalize(np.stack([vectors[i] for i in ids])) if ids else np.zeros((0, dim))
    table = pa.table({"query_id": pa.array(ids, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(
                          pa.array(mat.reshape(-1), pa.float32()), dim)})
    write_parquet_atomic(table, rdir / "query_vectors.parquet")
    atomic_write_json(rdir / "queries.json", plan)
    return {"run_dir": run_dir, "embedded": len(ids),
            "rejected": sum(q["status"] == REJECTED for q in plan["queries"])}


def read_neighbours(run_dir: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """The Spark job's output: neighbours per query id (ranked) and candidate counts."""
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


def finalize(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Assemble and write the results; ledger the answers; move inbox images out of the inbox."""
    from imgsim.lookup import answer_note
    from imgsim.models import read_manifest
    from imgsim.results import write_results

    layout = settings.layout
    rdir = Path(run_dir)
    plan = read_json(rdir / "queries.json")
    version, k = plan["model_version"], plan["k"]
    neighbours, counts = read_neighbours(rdir)
    methods = {qid: str(rows[0].get("method") or "lsh") for qid, rows in neighbours.items()}
    indexed = int(read_manifest(layout, version)["counts"]["indexed"])
    for q in plan["queries"]:
        q["model_version"] = version
        q.setdefault("neighbours", [])
        q.setdefault("note", None)
        if q["status"] == PENDING:
            rows = neighbours.get(q["query_id"], [])
            q["neighbours"] = [
                {"rank": r["rank"], "image_id": r["image_id"], "path": r["path"],
                 "class_id": r["class_id"], "class_name": r["class_name"],
                 "distance": float(r["distance"])} for r in rows]
            q["candidates"], q["found"] = counts.get(q["query_id"], 0), len(rows)
            q["method"] = methods.get(q["query_id"], "lsh")
            q["status"] = ANSWERED
            q["note"] = answer_note(q["method"], len(rows), k, indexed)
    # Inbox images leave the inbox: answered ones to processed/, rejected ones to rejected/.
    moves: list[tuple[Path, Path]] = []
    for q in plan["queries"]:
        if q["source"] == "inbox" and Path(q["query_path"]).exists():
            folder = "rejected" if q["status"] == REJECTED else "processed"
            target = layout.queries / folder / rdir.name / Path(q["query_path"]).name
            moves.append((Path(q["query_path"]), target))
            q["query_copy"] = str(target)
    # Order matters for crash safety: results, then the ledger, then the moves. A crash before
    # the moves leaves the images in the inbox, and the next run finds them in the ledger.
    paths = write_results(rdir, plan, layout)
    for q in plan["queries"]:
        if q["status"] == ANSWERED:
            atomic_write_json(ledger_entry(layout, version, q["query_id"]),
                              {"run_id": plan["run_id"], "results": str(paths["results_json"])})
    for source, target in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    summary = {s: sum(q["status"] == s for q in plan["queries"])
               for s in (ANSWERED, REJECTED, ALREADY)}
    log.info("results for %d queries in %s: %s", len(plan["queries"]), rdir, summary)
    return {"run_dir": run_dir, "model_version": version, **summary,
            "files": {k: str(v) for k, v in paths.items()}}
