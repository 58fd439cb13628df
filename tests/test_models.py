"""Model versions: validation of a staged fit, atomic publish, rollback, retention, the fit gate."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgsim.ann import l2_normalize
from imgsim.config import Layout, Settings
from imgsim.fsutil import TMP_PREFIX, atomic_write_json, read_json
from imgsim.index import pipeline
from imgsim.store import snapshot_fingerprint, write_catalog, write_shard
from imgsim.versions import models
from imgsim.versions.models import ValidationFailed, VersionNotFound

BACKBONE = "random"
DIM = 6
TABLES = 3
BUCKET = 0.5
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

MATRIX_UDT = pa.struct(
    [
        ("type", pa.int8()),
        ("numRows", pa.int32()),
        ("numCols", pa.int32()),
        ("colPtrs", pa.list_(pa.int32())),
        ("rowIndices", pa.list_(pa.int32())),
        ("values", pa.list_(pa.float64())),
        ("isTransposed", pa.bool_()),
    ]
)
REFERENCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("class_id", pa.int32()),
        ("class_name", pa.string()),
        ("vector", pa.list_(pa.float32())),
        ("hashes", pa.list_(pa.int64())),
    ]
)


def version_at(minutes: int) -> str:
    return models.new_version(T0 + timedelta(minutes=minutes))


def make_ids(n: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:064x}"[-64:] for i in range(n)]


def build_version(
    root: Path,
    version: str,
    ids: list[str],
    *,
    backbone: str = BACKBONE,
    num_hash_tables: int = TABLES,
    bucket_length: float = BUCKET,
    recall: float | None = 0.95,
    seed: int = 0,
    manifest_overrides: dict[str, Any] | None = None,
    graph: bool = False,
    with_map: bool | None = None,
) -> dict[str, Any]:
    """A fitted version laid out as spark_jobs/fit_lsh.py writes it, under ``root/version``.

    With ``graph``, also its neighbour graph (exact, k=3) and one duplicate group (the first
    two ids) as imgsim.jobs.neighbour_graph writes them, and (``with_map``, by default as
    ``graph``) a stored map: the vectors' principal plane, as imgsim.jobs.version_map writes
    a map (its layout is tested on its own).

    model/metadata/part-00000: Spark's JSON metadata line; model/data/*.parquet: one row with
    the random matrix as a dense, row-major (isTransposed) MatrixUDT; reference/*.parquet: the
    unit vectors and their hashes floor(R @ x / w), with page CRCs; manifest.json last. Returns
    the manifest.
    """
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(num_hash_tables, DIM))
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    vectors = l2_normalize(rng.normal(size=(len(ids), DIM)))
    hashes = np.floor(vectors.astype(np.float64) @ matrix.T / bucket_length).astype(np.int64)

    out = root / version
    meta = out / "model" / "metadata"
    data = out / "model" / "data"
    ref = out / "reference"
    for d in (meta, data, ref):
        d.mkdir(parents=True)
    (meta / "part-00000").write_text(
        json.dumps(
            {
                "class": "org.apache.spark.ml.feature.BucketedRandomProjectionLSHModel",
                "timestamp": 1767323045000,
                "sparkVersion": "4.0.0",
                "uid": "brp_0123",
                "paramMap": {
                    "bucketLength": bucket_length,
                    "numHashTables": num_hash_tables,
                    "inputCol": "features",
                    "outputCol": "hashes",
                    "seed": 42,
                },
                "defaultParamMap": {"numHashTables": 1, "seed": 12345},
            }
        )
        + "\n"
    )
    (meta / "_SUCCESS").write_text("")
    udt = {
        "type": 1,
        "numRows": num_hash_tables,
        "numCols": DIM,
        "colPtrs": None,
        "rowIndices": None,
        "values": matrix.ravel(order="C").tolist(),
        "isTransposed": True,
    }
    pq.write_table(
        pa.Table.from_pylist(
            [{"randUnitVectors": udt}], schema=pa.schema([("randUnitVectors", MATRIX_UDT)])
        ),
        data / "part-0.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "image_id": iid,
                    "path": f"images/car_ims/{i:06d}.jpg",
                    "class_id": 1 + i % 3,
                    "class_name": None,
                    "vector": vectors[i].tolist(),
                    "hashes": hashes[i].tolist(),
                }
                for i, iid in enumerate(ids)
            ],
            schema=REFERENCE_SCHEMA,
        ),
        ref / "part-0.parquet",
        write_page_checksum=True,
    )  # as Spark (parquet-mr) writes pages
    (ref / "_SUCCESS").write_text("")
    manifest: dict[str, Any] = {
        "format": 1,
        "version": version,
        "created_at": T0.isoformat(),
        "run_id": "manual__x",
        "backbone": {"name": backbone, "dim": DIM},
        "embedding_dim": DIM,
        "normalize": "l2",
        "distance": "euclidean on unit vectors",
        "lsh": {
            "algorithm": "BucketedRandomProjectionLSH",
            "numHashTables": num_hash_tables,
            "bucketLength": bucket_length,
            "seed": 42,
        },
        "snapshot": {
            "fingerprint": snapshot_fingerprint(ids),
            "count": len(ids),
            "shard_files": ["part-run1-00000.parquet"],
        },
        "counts": {"catalog_live": len(ids), "indexed": len(ids), "without_embedding": 0},
        "metrics": {"k": 5, "queries": len(ids), "recall_at_k": recall},
        "files": {"model": "model", "reference": "reference"},
    }
    if graph:
        manifest.update(write_graph(out, ids, vectors))
    if graph if with_map is None else with_map:
        manifest["map"] = write_test_map(out, ids, vectors)
        manifest["files"]["map"] = manifest["map"]["file"]
    for key, value in (manifest_overrides or {}).items():
        manifest[key] = value
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def write_graph(out: Path, ids: list[str], vectors: np.ndarray, k: int = 3) -> dict[str, Any]:
    """neighbours/ (exact) and duplicates/ (ids 0 and 1) of a built version; manifest entries."""
    from imgsim.ann.graph import exact_neighbours

    idx, dist = exact_neighbours(vectors, k)
    (out / "neighbours").mkdir()
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"image_id": iid, "rank": r + 1, "neighbour_id": ids[j], "distance": float(d)}
                for i, iid in enumerate(ids)
                for r, (j, d) in enumerate(zip(idx[i], dist[i], strict=True))
            ]
        ),
        out / "neighbours" / "part-0.parquet",
    )
    (out / "duplicates").mkdir()
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "group": 0,
                    "size": 2,
                    "image_id": ids[a],
                    "path": f"images/car_ims/{a:06d}.jpg",
                    "class_id": 1 + a % 3,
                    "class_name": None,
                    "nearest_id": ids[b],
                    "nearest_distance": 0.01,
                }
                for a, b in ((0, 1), (1, 0))
            ]
        ),
        out / "duplicates" / "part-0.parquet",
    )
    return {
        "neighbours": {"k": k, "recall_at_k": 1.0, "edges": len(ids) * k, "queries": len(ids)},
        "duplicates": {
            "distance": 0.05,
            "space": "embeddings (L2-normalised, before the projection)",
            "groups": 1,
            "images": 2,
            "largest": 2,
        },
    }


def write_test_map(out: Path, ids: list[str], vectors: np.ndarray) -> dict[str, Any]:
    """map.parquet of a built version (the vectors' principal plane); its manifest entry."""
    from imgsim.ann.layout import MAP_FILE, principal_plane, write_map

    write_map(out / MAP_FILE, ids, principal_plane(vectors), np.zeros(len(ids), bool))
    return {
        "file": MAP_FILE,
        "points": len(ids),
        "references": len(ids),
        "layout": "tsne",
        "laid_out_in": out.name,
        "placed": 0,
        "same_class_nearest_on_map": 0.5,
        "same_class_nearest_in_space": 0.25,
    }


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "data")


IDS = make_ids(12)


def stage(layout: Layout, version: str, ids: list[str] = IDS, **kwargs: Any) -> dict[str, Any]:
    return build_version(layout.staging, version, ids, **kwargs)


def validate(
    layout: Layout, version: str, ids: list[str] = IDS, **overrides: Any
) -> models.ValidationReport:
    args: dict[str, Any] = {
        "expected_count": len(ids),
        "expected_fingerprint": snapshot_fingerprint(ids),
        "backbone": BACKBONE,
        "recall_floor": 0.8,
    }
    args.update(overrides)
    return models.validate_staged(layout, version, **args)


def staged_and_published(layout: Layout, version: str) -> str:
    stage(layout, version)
    validate(layout, version)
    return models.publish(layout, version, keep=100)


def tmp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith((TMP_PREFIX, ".trash-"))]


def current_text(layout: Layout) -> str | None:
    p = layout.current_pointer
    return p.read_text() if p.exists() else None


# -- names --------------------------------------------------------------------------------------


def test_new_version_names_are_valid_and_sortable() -> None:
    names = [models.new_version(T0 + timedelta(seconds=s)) for s in (0, 1, 59, 3600, 86400)]
    for name in names:
        assert models.VERSION_RE.match(name), name
        assert models.check_version_name(name) == name
    assert names == sorted(names)
    assert names[0].startswith("v20260102T030405Z-")
    assert len({models.new_version(T0) for _ in range(20)}) > 1  # random suffix
    assert models.VERSION_RE.match(models.new_version())


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "latest",
        "v20260102T030405Z",
        "../v20260102T030405Z-abcdef",
        "v20260102T030405Z-ABCDEF",
        "v20260102T030405Z-abcdef/x",
    ],
)
def test_check_version_name_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="not a version name"):
        models.check_version_name(bad)


# -- validation ---------------------------------------------------------------------------------


def test_validate_staged_passes_on_a_consistent_version(layout: Layout) -> None:
    v = version_at(0)
    stage(layout, v)

    report = validate(layout, v)

    assert report.version == v
    checks = report.checks
    assert checks["problems"] == []
    assert checks["numpy_hashes_match_spark"] is True
    assert checks["hash_rows_checked"] == len(IDS)
    assert checks["reference_rows"] == len(IDS)
    assert checks["indexed"] == len(IDS)
    assert checks["backbone"] == BACKBONE
    assert checks["recall_at_k"] == 0.95
    on_disk = read_json(layout.staging / v / "validation.json")
    assert on_disk == json.loads(json.dumps(report.as_dict()))
    assert tmp_leftovers(layout.root) == []


def tamper_hashes(layout: Layout, version: str) -> None:
    f = layout.staging / version / "reference" / "part-0.parquet"
    t = pq.read_table(f).to_pylist()
    t[3]["hashes"][1] += 1
    pq.write_table(pa.Table.from_pylist(t, schema=REFERENCE_SCHEMA), f)


def duplicate_reference_row(layout: Layout, version: str) -> None:
    f = layout.staging / version / "reference" / "part-0.parquet"
    t = pq.read_table(f).to_pylist()
    t[-1] = dict(t[0])
    pq.write_table(pa.Table.from_pylist(t, schema=REFERENCE_SCHEMA), f)


@pytest.mark.parametrize(
    ("stage_kwargs", "validate_kwargs", "corrupt", "message"),
    [
        ({"recall": 0.5}, {}, None, r"recall@k 0\.5 is below the floor 0\.8"),
        ({"recall": None}, {}, None, r"recall@k None is below the floor"),
        (
            {},
            {"expected_count": len(IDS) + 1},
            None,
            rf"indexed {len(IDS)} images, the catalog has {len(IDS) + 1}",
        ),
        (
            {},
            {"expected_fingerprint": snapshot_fingerprint(IDS[:-1])},
            None,
            "fingerprint mismatch",
        ),
        ({"backbone": "resnet18"}, {}, None, r"backbone 'resnet18' != configured 'random'"),
        ({}, {}, tamper_hashes, "hashes recomputed from the saved model differ"),
        ({}, {}, duplicate_reference_row, r"reference table has 12 rows \(11 distinct ids\)"),
        (
            {"manifest_overrides": {"lsh": {"numHashTables": TABLES + 1, "bucketLength": BUCKET}}},
            {},
            None,
            "saved model .* differs from the manifest",
        ),
    ],
    ids=["recall", "no-recall", "count", "fingerprint", "backbone", "hashes", "dup-ref", "params"],
)
def test_validate_staged_failures(
    layout: Layout,
    stage_kwargs: dict[str, Any],
    validate_kwargs: dict[str, Any],
    corrupt: Any,
    message: str,
) -> None:
    good = staged_and_published(layout, version_at(0))
    v = version_at(1)
    stage(layout, v, **stage_kwargs)
    if corrupt is not None:
        corrupt(layout, v)

    with pytest.raises(ValidationFailed, match=message) as err:
        validate(layout, v, **validate_kwargs)

    assert v in str(err.value)
    report = read_json(layout.staging / v / "validation.json")
    assert len(report["checks"]["problems"]) == 1, report["checks"]["problems"]
    # A failed version cannot be published; CURRENT keeps naming the good one.
    with pytest.raises(ValidationFailed, match="has not passed validation"):
        models.publish(layout, v)
    assert models.current_version(layout) == good
    assert (layout.staging / v).is_dir()
    assert not (layout.models / v).exists()


def test_validation_counts_short_neighbour_lists_and_fails_above_a_small_share(
    layout: Layout,
) -> None:
    """Images left with fewer than k graph neighbours (above FILL_MAX the fit leaves them
    short): validation counts them per image, compares with the manifest's count and fails the
    version when more than MAX_SHORT_SHARE of the references are short."""
    ids = make_ids(120)
    v = version_at(0)
    build_version(layout.staging, v, ids, graph=True)
    part = layout.staging / v / "neighbours" / "part-0.parquet"
    edges = pq.read_table(part)
    rows = edges.to_pylist()
    manifest_path = layout.staging / v / "manifest.json"
    manifest = read_json(manifest_path)

    def validated(short: set[str], recorded: int) -> Any:
        """The graph with ``short`` images cut to 1 neighbour, the manifest saying
        ``recorded``: validation's report."""
        cut = [r for r in rows if not (r["image_id"] in short and r["rank"] > 1)]
        pq.write_table(pa.Table.from_pylist(cut, schema=edges.schema), part)
        manifest["neighbours"].update(short_lists=recorded, edges=len(cut))
        atomic_write_json(manifest_path, manifest)
        return models.validate_staged(
            layout,
            v,
            expected_count=120,
            expected_fingerprint=snapshot_fingerprint(ids),
            backbone=BACKBONE,
            recall_floor=0.8,
        )

    assert validated(set(), 0).checks["graph_short_lists"] == 0
    # one image keeps 1 of its 3 neighbours (under 1%: passes, if the manifest says so)
    assert validated({ids[5]}, 1).checks["graph_short_lists"] == 1
    # five short (4%) and a manifest that says none: fails, naming both
    with pytest.raises(ValidationFailed) as info:
        validated(set(ids[:5]), 0)
    assert "5 of 120 references (4.2%) have fewer than 3 neighbours" in str(info.value)
    assert "records 0 references with fewer than 3 neighbours, the graph has 5" in str(info.value)


def test_validate_staged_without_manifest(layout: Layout) -> None:
    v = version_at(0)
    stage(layout, v)
    (layout.staging / v / "manifest.json").unlink()
    with pytest.raises(ValidationFailed, match=r"no manifest\.json"):
        validate(layout, v)


# -- publish / rollback / prune -----------------------------------------------------------------


def test_publish_moves_version_and_points_current(layout: Layout) -> None:
    assert models.current_version(layout) is None
    assert models.published_versions(layout) == []
    with pytest.raises(VersionNotFound, match="CURRENT is missing"):
        models.read_manifest(layout)
    v = version_at(0)
    stage(layout, v)
    validate(layout, v)

    assert models.publish(layout, v) == v

    assert not (layout.staging / v).exists()
    assert (layout.models / v / "model" / "metadata" / "part-00000").is_file()
    assert (layout.models / v / "validation.json").is_file()
    assert current_text(layout) == v + "\n"
    assert models.current_version(layout) == v
    assert models.published_versions(layout) == [v]
    assert models.read_manifest(layout)["version"] == v
    assert models.read_manifest(layout, v)["counts"]["indexed"] == len(IDS)
    assert tmp_leftovers(layout.root) == []


def test_publish_refuses_unvalidated_version(layout: Layout) -> None:
    good = staged_and_published(layout, version_at(0))
    v = version_at(1)
    stage(layout, v)  # never validated

    with pytest.raises(ValidationFailed, match="has not passed validation"):
        models.publish(layout, v)

    assert current_text(layout) == good + "\n"
    assert models.published_versions(layout) == [good]
    assert (layout.staging / v / "manifest.json").is_file()
    with pytest.raises(ValidationFailed):
        models.publish(layout, version_at(2))  # not even staged
    assert models.current_version(layout) == good


def test_republishing_a_published_version_only_moves_current(layout: Layout) -> None:
    v1 = staged_and_published(layout, version_at(0))
    v2 = staged_and_published(layout, version_at(1))
    assert models.current_version(layout) == v2

    models.publish(layout, v1)

    assert models.current_version(layout) == v1
    assert models.published_versions(layout) == [v1, v2]


def test_rollback(layout: Layout) -> None:
    v1 = staged_and_published(layout, version_at(0))
    v2 = staged_and_published(layout, version_at(1))
    assert models.current_version(layout) == v2

    assert models.rollback(layout, v1) == v1
    assert current_text(layout) == v1 + "\n"
    assert models.read_manifest(layout)["version"] == v1

    unknown = version_at(5)
    with pytest.raises(VersionNotFound, match=unknown):
        models.rollback(layout, unknown)
    with pytest.raises(VersionNotFound):
        models.rollback(layout, "latest")
    assert models.current_version(layout) == v1

    # A staged (unpublished) version is not a rollback target either.
    v3 = version_at(2)
    stage(layout, v3)
    validate(layout, v3)
    with pytest.raises(VersionNotFound):
        models.rollback(layout, v3)
    assert models.current_version(layout) == v1
    assert models.rollback(layout, v2) == v2
    assert tmp_leftovers(layout.root) == []


def test_prune_keeps_newest_and_never_current(layout: Layout) -> None:
    vs = [staged_and_published(layout, version_at(i)) for i in range(4)]
    assert models.published_versions(layout) == vs
    models.rollback(layout, vs[0])

    with models.models_lock(layout):
        doomed = models.prune(layout, keep=2)

    assert doomed == [vs[1]]
    assert models.published_versions(layout) == [vs[0], vs[2], vs[3]]
    assert models.current_version(layout) == vs[0]
    assert (layout.models / vs[0] / "manifest.json").is_file()

    # Publishing a new version with keep=2 now lets the old CURRENT go.
    v5 = version_at(10)
    stage(layout, v5)
    validate(layout, v5)
    models.publish(layout, v5, keep=2)
    assert models.published_versions(layout) == [vs[3], v5]
    assert models.current_version(layout) == v5
    assert tmp_leftovers(layout.root) == []
    assert sorted(p.name for p in layout.models.iterdir() if not p.name.startswith(".")) == sorted(
        ["CURRENT", vs[3], v5]
    )


def test_rollback_waits_for_an_index_run_in_flight(layout: Layout) -> None:
    """An index run holding the lease would publish over a rollback: refused while its
    heartbeat is fresh, done once it expired or with force."""
    from datetime import UTC, datetime, timedelta

    from imgsim.versions import runlease

    v1 = staged_and_published(layout, version_at(0))
    v2 = staged_and_published(layout, version_at(1))
    assert runlease.try_acquire(layout, "scheduled__x", lambda _: True, deployment="db:A") is None
    with pytest.raises(models.IndexRunInFlight, match="scheduled__x"):
        models.rollback(layout, v1)
    assert models.current_version(layout) == v2  # unchanged
    old = datetime.now(UTC) - timedelta(hours=4)
    lease = runlease.read_lease(layout)
    runlease._write(runlease.lease_path(layout), runlease.replace_heartbeat(lease, old))
    assert models.rollback(layout, v1, ttl_s=3600) == v1  # no heartbeat for 4 h: dead
    runlease.heartbeat(layout, "scheduled__x", "db:A")
    assert models.rollback(layout, v2, force=True) == v2


def test_prune_never_deletes_a_version_a_query_run_pinned(layout: Layout) -> None:
    import os

    vs = [staged_and_published(layout, version_at(i)) for i in range(3)]
    models.pin_version(layout, vs[0], "manual__q1")
    with models.models_lock(layout):
        assert models.prune(layout, keep=1) == [vs[1]]  # vs[0] is read by a query run
    assert models.published_versions(layout) == [vs[0], vs[2]]
    models.unpin_version(layout, "manual__q1")
    pin = models.pin_version(layout, vs[0], "crashed__q2")
    os.utime(pin, (0, 0))  # a pin older than a day: its run is gone
    with models.models_lock(layout):
        assert models.prune(layout, keep=1) == [vs[0]]
    assert not pin.exists()


def test_a_query_run_pins_its_version_until_it_finishes(tmp_path: Path) -> None:
    from imgsim.query import run as query

    settings = Settings(data_root=tmp_path / "data")
    layout = settings.layout
    v = staged_and_published(layout, version_at(0))
    inbox = query.inbox(layout)
    inbox.mkdir(parents=True)
    (inbox / "x.jpg").write_bytes(b"not decoded here")
    plan = query.collect(settings, "manual__pin", [], k=1)
    assert models.pinned_versions(layout) == {v}
    rows = read_json(Path(plan["run_dir"]) / "queries.json")
    for q in rows["queries"]:
        q.update(status="rejected", reason="not_an_image", detail="x")
    atomic_write_json(Path(plan["run_dir"]) / "queries.json", rows)
    query.finalize(settings, plan["run_dir"])
    assert models.pinned_versions(layout) == set()


def test_prune_with_fewer_versions_than_keep_is_a_noop(layout: Layout) -> None:
    vs = [staged_and_published(layout, version_at(i)) for i in range(2)]
    assert models.prune(layout, keep=5) == []
    assert models.published_versions(layout) == vs


def test_published_versions_ignores_incomplete_and_foreign_dirs(layout: Layout) -> None:
    v = staged_and_published(layout, version_at(0))
    (layout.models / version_at(3)).mkdir()  # no manifest: not a version
    (layout.models / "not-a-version").mkdir()
    (layout.models / ".trash-x").mkdir()
    assert models.published_versions(layout) == [v]


def test_clean_staging(layout: Layout) -> None:
    keep, drop1, drop2 = version_at(0), version_at(1), version_at(2)
    for v in (keep, drop1, drop2):
        stage(layout, v)
    models.clean_staging(layout, keep=keep)
    assert [p.name for p in layout.staging.iterdir()] == [keep]
    models.clean_staging(layout)
    assert list(layout.staging.iterdir()) == []
    models.clean_staging(Layout(layout.root / "elsewhere"))  # no staging dir: no error


# -- integrity: sizes and sha256 recorded at publish (issue 13 item 7) -------------------------


def overwrite_middle(path: Path, n: int = 64) -> None:
    """The hand-made fault of issue 13: ``n`` bytes in the middle of a file overwritten in place
    (same size, so only a sha256 tells)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 - n // 2
    data[mid : mid + n] = bytes((b + 0x5A) % 256 for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def reference_part(layout: Layout, version: str) -> Path:
    (part,) = sorted((layout.models / version / "reference").glob("part-*.parquet"))
    return part


def test_publish_records_every_file_size_and_sha256(layout: Layout) -> None:
    from imgsim.fsutil import sha256_file

    v = version_at(0)
    stage(layout, v)
    (layout.staging / v / "projection.npy").write_bytes(b"any future file")  # covered too
    validate(layout, v)
    models.publish(layout, v)

    vdir = layout.models / v
    recorded = models.read_manifest(layout, v)["checksums"]
    on_disk = sorted(p.relative_to(vdir).as_posix() for p in vdir.rglob("*") if p.is_file())
    assert sorted(recorded) == [f for f in on_disk if f != "manifest.json"]
    assert {
        "reference/part-0.parquet",
        "model/metadata/part-00000",
        "validation.json",
        "projection.npy",
    } <= set(recorded)
    for rel, entry in recorded.items():
        assert entry == {"size": (vdir / rel).stat().st_size, "sha256": sha256_file(vdir / rel)}
    integrity = models.verify_version(layout, v, hashes=True)
    assert (integrity.status, integrity.problems) == ("ok (sha256)", [])
    assert models.check_version(layout, v).status == "ok (sizes)"


def test_check_version_finds_missing_truncated_and_unexpected_files(layout: Layout) -> None:
    v = staged_and_published(layout, version_at(0))
    vdir = layout.models / v
    part = reference_part(layout, v)
    part.write_bytes(part.read_bytes()[:-10])
    (vdir / "model" / "metadata" / "part-00000").unlink()
    (vdir / "reference" / "part-1.parquet").write_bytes(b"PAR1")

    problems = models.check_version(layout, v).problems  # sizes only: no hashing needed

    assert problems == [
        "model/metadata/part-00000 is missing",
        f"reference/part-0.parquet has {part.stat().st_size} bytes, "
        f"{part.stat().st_size + 10} were recorded",
        "reference/part-1.parquet was not part of the version when it was published",
    ]
    with pytest.raises(models.VersionDamaged) as err:
        models.verify_version(layout, v)
    message = str(err.value)
    assert v in message and "reference/part-0.parquet" in message and "imgsim rollback" in message


def test_an_overwrite_is_found_by_sha256_and_remembered_until_repaired(layout: Layout) -> None:
    v = staged_and_published(layout, version_at(0))
    part = reference_part(layout, v)
    good = part.read_bytes()
    overwrite_middle(part)

    assert models.check_version(layout, v).problems == []  # same size: sizes pass
    found = models.check_version(layout, v, hashes=True)
    assert found.status == "damaged"
    assert found.problems == [
        "reference/part-0.parquet has been altered (its sha256 differs from the recorded one)"
    ]
    # Known now: the cheap check (and every load) reports it without hashing again.
    later = models.check_version(layout, v)
    assert later.problems == found.problems and later.checked_at == found.checked_at
    with pytest.raises(models.VersionDamaged, match=r"reference/part-0\.parquet"):
        models.verify_version(layout, v)

    part.write_bytes(good)  # restored from a backup
    assert models.check_version(layout, v).status == "damaged"  # until checked again
    assert models.check_version(layout, v, hashes=True).status == "ok (sha256)"
    assert models.check_version(layout, v).status == "ok (sizes)"


def test_versions_without_checksums_are_not_recorded_and_not_checked(layout: Layout) -> None:
    v = version_at(0)
    build_version(layout.models, v, IDS)  # as published before checksums existed
    overwrite_middle(layout.models / v / "reference" / "part-0.parquet")
    for hashes in (False, True):
        integrity = models.verify_version(layout, v, hashes=hashes)
        assert (integrity.status, integrity.recorded, integrity.problems) == (
            "not recorded",
            False,
            [],
        )


def test_a_failed_read_checks_hashes_and_names_the_damage(layout: Layout) -> None:
    v = staged_and_published(layout, version_at(0))
    overwrite_middle(reference_part(layout, v))
    with (
        pytest.raises(models.VersionDamaged, match=r"reference/part-0\.parquet") as err,
        models.reading_version(layout, v),
    ):
        raise OSError("Corrupt snappy compressed data")
    assert isinstance(err.value.__cause__, OSError) and err.value.version == v

    intact = staged_and_published(layout, version_at(1))
    with pytest.raises(KeyError), models.reading_version(layout, intact):  # not damage
        raise KeyError("a bug")


def test_rollback_refuses_a_damaged_version(layout: Layout) -> None:
    v1 = staged_and_published(layout, version_at(0))
    v2 = staged_and_published(layout, version_at(1))
    overwrite_middle(reference_part(layout, v1))
    with pytest.raises(models.VersionDamaged, match=v1):
        models.rollback(layout, v1)
    assert models.current_version(layout) == v2


def test_an_unreadable_manifest_is_damage(layout: Layout) -> None:
    v = staged_and_published(layout, version_at(0))
    (layout.models / v / "manifest.json").write_text("{not json")
    with pytest.raises(models.VersionDamaged, match=r"manifest\.json is not valid JSON"):
        models.read_manifest(layout, v)
    assert models.check_version(layout, v).status == "damaged"


def test_prune_forgets_the_checks_of_pruned_versions(layout: Layout) -> None:
    vs = [staged_and_published(layout, version_at(i)) for i in range(3)]
    models.check_version(layout, vs[0], hashes=True)
    assert (models.checks_dir(layout) / f"{vs[0]}.json").is_file()
    with models.models_lock(layout):
        models.prune(layout, keep=2)
    assert not (models.checks_dir(layout) / f"{vs[0]}.json").exists()
    assert models.published_versions(layout) == vs[1:]


def imgsim_versions(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str]:
    from imgsim import cli

    monkeypatch.setenv("IMGSIM_DATA_ROOT", str(layout.root))
    rc = cli.main(["versions", *args])
    return rc, capsys.readouterr().out


def row_of(out: str, version: str) -> str:
    return next(line for line in out.splitlines() if version in line and "CURRENT" not in line)


def test_versions_command_says_when_current_names_a_missing_version(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from imgsim.fsutil import atomic_write_text

    v = staged_and_published(layout, version_at(0))
    gone = version_at(9)
    atomic_write_text(layout.current_pointer, gone + "\n")

    rc, out = imgsim_versions(layout, monkeypatch, capsys)
    assert rc == 1
    assert f"CURRENT names {gone}, which is not a published version" in out
    assert "imgsim rollback VERSION" in out
    assert row_of(out, v).startswith("  ")  # listed, not marked current

    shutil.rmtree(layout.models / v)
    rc, out = imgsim_versions(layout, monkeypatch, capsys)
    assert rc == 1
    assert "no published versions" in out and f"CURRENT names {gone}" in out

    layout.current_pointer.unlink()
    assert imgsim_versions(layout, monkeypatch, capsys)[0] == 0  # empty, and says so


def test_versions_command_checks_sizes_and_with_verify_sha256(
    layout: Layout, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = version_at(0)
    build_version(layout.models, old, IDS)  # published before checksums existed
    v1 = staged_and_published(layout, version_at(1))
    v2 = staged_and_published(layout, version_at(2))
    overwrite_middle(reference_part(layout, v1))

    rc, out = imgsim_versions(layout, monkeypatch, capsys)
    assert rc == 0
    assert row_of(out, v2).startswith("* ") and row_of(out, v2).endswith("ok (sizes)")
    assert row_of(out, v1).endswith("ok (sizes)")  # same size: only a sha256 tells
    assert row_of(out, old).endswith("not recorded")

    rc, out = imgsim_versions(layout, monkeypatch, capsys, "--verify")
    assert rc == 1
    assert row_of(out, v1).endswith("damaged") and row_of(out, v2).endswith("ok (sha256)")
    assert "! reference/part-0.parquet has been altered" in out
    assert f"damaged: {v1}; `imgsim rollback VERSION`" in out
    rc, out = imgsim_versions(layout, monkeypatch, capsys)  # remembered without hashing
    assert rc == 1 and row_of(out, v1).endswith("damaged")


# -- the fit gate (pipeline.fit_plan) and the backbone record ------------------------------------


def catalog_row(iid: str, status: str = "live") -> dict[str, Any]:
    return {
        "image_id": iid,
        "path": f"images/car_ims/{iid[-6:]}.jpg",
        "source": "archive:x",
        "file_name": f"{iid[-6:]}.jpg",
        "class_id": 1,
        "class_name": None,
        "size": 1,
        "mtime_ns": 1,
        "first_seen": "2026-01-02",
        "last_seen": "2026-01-02",
        "status": status,
        "n_paths": 1,
    }


@pytest.fixture
def settings(layout: Layout) -> Settings:
    """A catalog of 12 live images (all embedded), one gone and one live without a vector."""
    write_catalog(
        layout,
        [*(catalog_row(i) for i in IDS), catalog_row("f" * 64, "gone"), catalog_row("e" * 64)],
    )
    write_shard(
        layout, BACKBONE, "run1", 0, [(i, np.ones(DIM, np.float32)) for i in [*IDS, "f" * 64]], DIM
    )
    return Settings(
        data_root=layout.root,
        backbone=BACKBONE,
        lsh_num_hash_tables=TABLES,
        lsh_bucket_length=BUCKET,
        recall_floor=0.8,
        keep_versions=3,
    )


def test_fit_plan_without_current_model(settings: Settings) -> None:
    plan = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)

    assert models.VERSION_RE.match(plan["version"])
    assert plan["expected_count"] == len(IDS)  # live and embedded only
    assert plan["fingerprint"] == snapshot_fingerprint(IDS)
    assert plan["backbone"] == BACKBONE
    assert (plan["num_hash_tables"], plan["bucket_length"]) == (TABLES, BUCKET)
    assert plan["data_root"] == str(settings.layout.root)


def as_fitted(plan: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The manifest fields fit_lsh.py records for ``plan`` (snapshot, labels, fit settings)."""
    return {
        "snapshot": {
            "fingerprint": plan["fingerprint"],
            "count": plan["expected_count"],
            "labels_fingerprint": plan["labels_fingerprint"],
        },
        "backbone": {"name": plan["backbone"]},
        "fit_settings": pipeline.fit_settings(
            settings, plan["num_hash_tables"], plan["bucket_length"], plan["projection"]
        ),
    }


def publish_plan(settings: Settings, plan: dict[str, Any]) -> None:
    build_version(
        settings.layout.staging, plan["version"], IDS, manifest_overrides=as_fitted(plan, settings)
    )
    pipeline.validate(settings, plan)
    pipeline.publish(settings, plan["version"])


def test_fit_plan_refits_when_any_fit_setting_changes(settings: Settings) -> None:
    publish_plan(settings, pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET))
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET) == {}
    for field, value, key in (
        ("lsh_seed", 7, "seed"),
        ("validation_sample", 50, None),
        ("target_recall", 0.9, None),
        ("projection", "none", None),
        ("projection_min_coverage", 0.9, None),
    ):
        plan = pipeline.fit_plan(settings.replace(**{field: value}), BACKBONE, TABLES, BUCKET)
        assert plan, f"{field}={value} must refit"
        assert plan["refit_because"] == [
            f"{key or field} {getattr(settings, field)!r} -> {value!r}"
        ]
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET, projection="whiten")


def test_fit_plan_refits_when_the_backbone_spec_or_labels_change(settings: Settings) -> None:
    layout = settings.layout
    record = layout.embeddings(BACKBONE) / "BACKBONE.json"
    atomic_write_json(record, {"name": BACKBONE, "dim": DIM, "weights_sha256": "a" * 64})
    plan = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    fitted = as_fitted(plan, settings)
    fitted["backbone"] = read_json(record)
    build_version(layout.staging, plan["version"], IDS, manifest_overrides=fitted)
    pipeline.validate(settings, plan)
    pipeline.publish(settings, plan["version"])
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET) == {}

    # New weights (same name, same ids, same fingerprint): the store was rebuilt.
    atomic_write_json(record, {"name": BACKBONE, "dim": DIM, "weights_sha256": "b" * 64})
    assert "backbone" in " ".join(
        pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)["refit_because"]
    )
    # Another runtime.
    atomic_write_json(
        record, {"name": BACKBONE, "dim": DIM, "weights_sha256": "a" * 64, "runtime": "onnx"}
    )
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    atomic_write_json(record, {"name": BACKBONE, "dim": DIM, "weights_sha256": "a" * 64})
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET) == {}

    # A label changes: the projection learned from the labels must be refitted.
    rows = [catalog_row(i) for i in IDS]
    rows[0]["class_id"] = 99
    write_catalog(layout, [*rows, catalog_row("f" * 64, "gone"), catalog_row("e" * 64)])
    relabelled = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    assert relabelled and "labels changed" in relabelled["refit_because"][0]


def test_fit_plan_skips_when_nothing_changed(settings: Settings) -> None:
    layout = settings.layout
    plan = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    build_version(
        layout.staging, plan["version"], IDS, manifest_overrides=as_fitted(plan, settings)
    )
    pipeline.validate(settings, plan)
    out = pipeline.publish(settings, plan["version"])
    assert out == {"version": plan["version"], "indexed": len(IDS), "recall_at_k": 0.95}
    assert not layout.staging.exists() or list(layout.staging.iterdir()) == []

    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET) == {}
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, float(BUCKET)) == {}

    changed = [
        pipeline.fit_plan(settings, BACKBONE, TABLES + 1, BUCKET),
        pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET * 2),
        pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET, full_rebuild=True),
    ]
    for new_plan in changed:
        assert new_plan, "a refit was expected"
        assert new_plan["fingerprint"] == snapshot_fingerprint(IDS)
        assert new_plan["version"] != plan["version"]
    assert changed[0]["num_hash_tables"] == TABLES + 1
    assert changed[1]["bucket_length"] == BUCKET * 2

    # A newly embedded live image changes the snapshot.
    write_shard(layout, BACKBONE, "run2", 0, [("e" * 64, np.ones(DIM, np.float32))], DIM)
    grown = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    assert grown["expected_count"] == len(IDS) + 1
    assert grown["fingerprint"] == snapshot_fingerprint([*IDS, "e" * 64])
    # a full rebuild asked for is said beside the other reasons (it relearns the projection)
    rebuilt = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET, full_rebuild=True)
    assert rebuilt["refit_because"][-1] == "full rebuild" and len(rebuilt["refit_because"]) > 1


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("manifest cut short", "manifest.json is not valid JSON"),
        ("manifest lacks keys", "its manifest.json lacks snapshot.fingerprint"),
        ("reference truncated", "reference/part-0.parquet has"),
        ("version folder gone", "is not published under"),
        ("CURRENT garbage", "CURRENT names 'not a version', which is not a version name"),
    ],
)
def test_a_damaged_current_means_a_full_build_that_says_why(
    settings: Settings, damage: str, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing or damaged CURRENT never blocks the index run: the plan builds in full, reuses
    nothing of it (base none) and says why in the log and in the plan the fit job records."""
    layout = settings.layout
    first = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    assert first["base"] == "none" and first["base_reason"] == "no published version"
    publish_plan(settings, first)
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET) == {}  # whole: nothing to do
    where = layout.models / first["version"]
    manifest = where / "manifest.json"
    if damage == "manifest cut short":
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    elif damage == "manifest lacks keys":
        data = read_json(manifest)
        del data["snapshot"]
        atomic_write_json(manifest, data)
    elif damage == "reference truncated":
        part = where / "reference" / "part-0.parquet"
        part.write_bytes(part.read_bytes()[:100])
    elif damage == "version folder gone":
        shutil.rmtree(where)
    else:
        layout.current_pointer.write_text("not a version\n")
    with caplog.at_level("WARNING", logger="imgsim.index.pipeline"):
        plan = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)
    assert plan, "a damaged CURRENT must be rebuilt, not skipped"
    assert plan["base"] == "none" and said in plan["base_reason"], plan["base_reason"]
    assert plan["refit_because"] == [plan["base_reason"]]
    assert plan["base_reason"].startswith("CURRENT cannot be built on:")
    assert "building" in caplog.text and said in caplog.text
    # ... and the rebuilt version publishes over it
    publish_plan(settings, plan)
    assert models.current_version(layout) == plan["version"]
    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET) == {}


def test_a_whole_current_is_the_plans_base(settings: Settings) -> None:
    publish_plan(settings, pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET))
    current = models.current_version(settings.layout)
    plan = pipeline.fit_plan(settings, BACKBONE, TABLES + 1, BUCKET)
    assert plan["base"] == current and current in plan["base_reason"]
    rebuilt = pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET, full_rebuild=True)
    assert rebuilt["base"] == "none" and rebuilt["base_reason"] == "a full rebuild was asked for"


def test_fit_plan_refits_for_another_backbone(settings: Settings) -> None:
    layout = settings.layout
    v = version_at(0)
    build_version(layout.models, v, IDS, backbone="resnet18")
    layout.current_pointer.write_text(v + "\n")
    assert models.current_version(layout) == v

    assert pipeline.fit_plan(settings, BACKBONE, TABLES, BUCKET)


def test_fit_plan_without_embeddings_raises(settings: Settings) -> None:
    with pytest.raises(pipeline.PipelineError, match="nothing to index"):
        pipeline.fit_plan(settings, "resnet18", TABLES, BUCKET)


def test_check_backbone_record(layout: Layout) -> None:
    spec = {"name": BACKBONE, "dim": DIM, "weights_sha256": "abc", "image_size": 224}
    record = layout.embeddings(BACKBONE) / "BACKBONE.json"

    pipeline.check_backbone_record(layout, spec)
    assert read_json(record) == spec
    pipeline.check_backbone_record(layout, dict(spec))  # same spec: fine

    with pytest.raises(pipeline.PipelineError, match="must not be mixed"):
        pipeline.check_backbone_record(layout, {**spec, "weights_sha256": "def"})
    assert read_json(record) == spec  # the record is not overwritten


def test_describe_lsh_names_plain_and_banded_keys() -> None:
    from imgsim.versions.models import describe_lsh

    assert describe_lsh({"numHashTables": 8}) == "8 tables"
    assert (
        describe_lsh(
            {
                "numHashTables": 256,
                "bands": 32,
                "keys_per_band": 8,
                "probes": 1,
                "requested_num_hash_tables": 0,
            }
        )
        == "32 bands x 8 keys, 1 probe (auto)"
    )
    assert (
        describe_lsh({"numHashTables": 10, "keys_per_band": 2, "probes": 2})
        == "5 bands x 2 keys, 2 probes"
    )


def test_publish_flushes_every_file_of_the_version_before_current_moves(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spark's executors wrote the version's files; publish fsyncs each of them (and the
    folders) before the rename and the new CURRENT can name them (a power loss right after
    must not leave CURRENT pointing at empty files)."""
    import os

    v = version_at(0)
    stage(layout, v)
    validate(layout, v)
    staged = layout.staging / v
    expected = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    flushed: list[str] = []
    events: list[str] = []
    real_fsync, real_open = os.fsync, os.open
    names: dict[int, str] = {}

    def opening(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        names[fd] = str(path)
        return fd

    def fsync(fd: int) -> None:
        name = names.get(fd, "")
        if name.startswith(str(staged)) and Path(name).is_file():
            flushed.append(Path(name).relative_to(staged).as_posix())
        real_fsync(fd)

    real_rename = os.rename

    def rename(src: Any, dst: Any) -> None:
        if Path(src) == staged:
            events.append(f"rename after {len(flushed)} flushed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    models.publish(layout, v)
    assert expected <= set(flushed)  # every file Spark (here: the test) wrote
    assert events == [f"rename after {len(flushed)} flushed"]
    assert models.current_version(layout) == v
