"""The fit job (imgsim.jobs.fit_lsh) on one local SparkSession."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsim.config import Layout
from imgsim.fsutil import atomic_write_json, read_json
from imgsim.jobs import fit_lsh, spark_io
from imgsim.store import snapshot_fingerprint, write_catalog, write_shard
from jobargs import fit_argv
from test_models import validate

pytestmark = pytest.mark.spark


def make_store(
    root: Path, n: int = 400, dim: int = 16, gone: int = 5, copies: dict[int, int] | None = None
) -> Layout:
    """A store of ``n`` random vectors (the first ``gone`` images gone); ``copies`` maps an
    image to the one whose vector it nearly repeats (a near-duplicate)."""
    layout = Layout(root)
    rng = np.random.default_rng(1)
    ids = [f"{i:064x}" for i in range(n)]
    rows = [
        {
            "image_id": iid,
            "path": f"images/a/{k}.jpg",
            "source": "archive:a",
            "file_name": f"{k}.jpg",
            "class_id": k % 7,
            "class_name": f"class {k % 7}",
            "size": 1,
            "mtime_ns": 1,
            "first_seen": "2026-01-01",
            "last_seen": "2026-01-01",
            "status": "gone" if k < gone else "live",
            "n_paths": 1,
        }
        for k, iid in enumerate(ids)
    ]
    write_catalog(layout, rows)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    for copy, original in (copies or {}).items():
        x[copy] = x[original] + 0.002 * rng.normal(size=dim)
    half = n // 2
    write_shard(layout, "random", "run1", 0, list(zip(ids[:half], x[:half], strict=True)), dim)
    write_shard(layout, "random", "run1", 1, list(zip(ids[half:], x[half:], strict=True)), dim)
    atomic_write_json(layout.embeddings("random") / "BACKBONE.json", {"name": "random", "dim": dim})
    return layout


def test_newest_per_image_keeps_latest(spark) -> None:
    from pyspark.testing import assertDataFrameEqual

    t1, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    df = spark.createDataFrame(
        [("a", [1.0], t1), ("a", [2.0], t2), ("b", [3.0], t1)],
        "image_id string, vector array<float>, embedded_at timestamp",
    )
    expected = spark.createDataFrame(
        [("a", [2.0]), ("b", [3.0])], "image_id string, vector array<float>"
    )
    assertDataFrameEqual(spark_io.newest_per_image(df), expected)


def test_live_vectors_are_unit_length_and_skip_gone(spark) -> None:
    catalog = spark.createDataFrame(
        [("a", "p", 1, "x"), ("c", "q", 2, "y")],
        "image_id string, path string, class_id int, class_name string",
    )
    t = datetime(2026, 1, 1, tzinfo=UTC)
    emb = spark.createDataFrame(
        [("a", [3.0, 4.0], t), ("b", [1.0, 0.0], t)],
        "image_id string, vector array<float>, embedded_at timestamp",
    )
    rows = spark_io.live_vectors(catalog, emb).collect()
    assert [r.image_id for r in rows] == ["a"]
    assert rows[0].vector == pytest.approx([0.6, 0.8])


def test_fit_writes_a_version_that_validates(spark, tmp_path: Path) -> None:
    layout = make_store(tmp_path / "data")
    args = fit_args(
        layout,
        "v20260101T000000Z-abcdef",
        "--num-hash-tables 6 --bucket-length 2.0 --sample-size 50 --seed 7 --target-recall 0.9",
    )
    manifest = fit_lsh.run(spark, args)
    # Every fit setting reaches the job and is recorded (IMGSIM_LSH_SEED,
    # IMGSIM_VALIDATION_SAMPLE, IMGSIM_TARGET_RECALL: fit_plan compares them).
    assert manifest["lsh"]["seed"] == 7
    assert manifest["fit_settings"] == {
        "num_hash_tables": 6,
        "bucket_length": 2.0,
        "seed": 7,
        "validation_sample": 50,
        "target_recall": 0.9,
        "projection": "none",
        "projection_min_coverage": None,
        "graph_k": 10,
        "graph_bucket_cap": 1000,
        "duplicate_distance": 0.0,
        "duplicate_verifier": "none",  # random vectors, no thumbnails (tests/jobargs.py)
        "duplicate_min_inliers": 0,
        "scan_below": 4_000_000,
        "map_points": 4000,
    }
    staged = layout.staging / "v20260101T000000Z-abcdef"
    assert read_json(staged / "manifest.json") == manifest
    assert manifest["counts"] == {"catalog_live": 395, "indexed": 395, "without_embedding": 0}
    live_ids = [f"{i:064x}" for i in range(5, 400)]
    assert manifest["snapshot"]["fingerprint"] == snapshot_fingerprint(live_ids)
    assert manifest["lsh"]["numHashTables"] == 6
    assert manifest["metrics"]["queries"] == 50
    assert 0.0 < manifest["metrics"]["candidates_share"] <= 1.0
    # Leave-one-out recall from the Spark job equals the NumPy twin's on the same sample.
    report = validate(layout, "v20260101T000000Z-abcdef", live_ids, recall_floor=0.0)
    assert report.checks["numpy_hashes_match_spark"] is True
    assert report.checks["reference_rows"] == 395
    # a small index (395 x 16 below IMGSIM_SCAN_BELOW): the graph is the exact one
    import pyarrow.parquet as pq

    from imgsim.ann.graph import exact_neighbours

    graph = manifest["neighbours"]
    assert graph["method"].startswith("scan") and graph["recall_at_k"] == 1.0
    # no projection: the near-duplicate distance applies to the graph's own distances
    assert manifest["duplicates"]["distance"] == 0.41
    assert manifest["duplicates"]["distance_source"].startswith("measured on copies")
    assert manifest["duplicates"]["space"] == "search"
    ref = pq.read_table(staged / "reference").to_pydict()
    idx, dist = exact_neighbours(np.array(ref["vector"], np.float32), 10)
    table = pq.read_table(staged / "neighbours").to_pandas().sort_values(["image_id", "rank"])
    got = table.groupby("image_id")["neighbour_id"].apply(list).to_dict()
    assert got == {i: [ref["image_id"][j] for j in idx[r]] for r, i in enumerate(ref["image_id"])}
    near = table.groupby("image_id")["distance"].apply(list).to_dict()
    assert np.allclose(near[ref["image_id"][0]], dist[0], atol=1e-9)


def test_neighbour_graph_is_the_numpy_twins_and_finds_the_duplicates(spark, tmp_path: Path) -> None:
    """The Spark graph (bucket stage, caps, top-k, fill) equals imgsim.ann.graph.local_graph
    on the same hashes; the planted near-duplicates form their groups; validate passes."""
    import pyarrow.parquet as pq

    from imgsim.ann.graph import GraphCells, exact_neighbours, local_graph

    copies = {390: 10, 391: 10, 392: 20}
    layout = make_store(tmp_path / "data", n=400, dim=16, gone=0, copies=copies)
    version = "v20260101T000000Z-0a0a01"
    # Arrow batches of 50 rows: buckets span batches, so the carry-over between them counts
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "50")
    try:
        manifest = fit(
            spark,
            layout,
            version,
            "--num-hash-tables 4 --keys-per-band 2 --bucket-length 1.5 --sample-size 100 "
            "--graph-k 6 --graph-bucket-cap 12 --duplicate-distance 0.05 --scan-below 0",
        )
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    staged = layout.staging / version
    ref = pq.read_table(staged / "reference").to_pydict()
    ids = ref["image_id"]
    x = np.array(ref["vector"], dtype=np.float32)
    entry = manifest["neighbours"]
    # the graph's own cells, trained for this index, with their centroids in the version
    assert manifest["files"]["neighbours_cells"] == entry["file"]
    cells = GraphCells.load(staged / entry["file"], entry["cells"])
    assert entry["tuning"]["predicted_recall"] > 0 and cells.dim == 16
    assert entry["tuning"]["probes"] == cells.probes and cells.cells == 12  # 400 // 32
    twin, work = local_graph(ids, x, cells, k=6, cap=12)
    graph = pq.read_table(staged / "neighbours").to_pandas()
    assert entry["split_cells"] == work["split"] > 0
    assert entry["largest_cell"] == work["largest_cell"] > 12
    assert entry["largest_leaf"] == work["largest_leaf"]
    assert entry["pairs_compared"] == work["pairs"]
    assert entry["cells_used"] == len(np.unique(cells.probe_cells(x)))
    assert entry["shuffled_rows"] == 400 * cells.probes
    assert entry["edges"] == len(graph)
    # short lists were completed by exact search; the rest are the twin's, in the same order
    exact_idx, _ = exact_neighbours(x, 6)
    filled = 0
    for image_id, rows in graph.groupby("image_id"):
        got = rows.sort_values("rank")
        assert got["rank"].tolist() == list(range(1, len(got) + 1))
        want = twin[image_id]
        if len(want) < 6:
            filled += 1
            want_ids = [ids[j] for j in exact_idx[ids.index(image_id)]]
            assert got["neighbour_id"].tolist() == want_ids
        else:
            assert got["neighbour_id"].tolist() == [t for _, t in want]
            assert np.allclose(got["distance"], [d for d, _ in want], atol=1e-9)
    assert len(set(graph["image_id"])) == 400 and filled == entry["filled"]
    assert entry["queries"] == 100
    graph_sets = graph.groupby("image_id")["neighbour_id"].apply(set).to_dict()
    full_recall = np.mean(
        [len(graph_sets[i] & {ids[j] for j in exact_idx[r]}) / 6 for r, i in enumerate(ids)]
    )
    assert abs(entry["recall_at_k"] - full_recall) < 0.1  # a sample of 100 of the 400
    # near-duplicates: {10, 390, 391} and {20, 392}, largest first
    dup = pq.read_table(staged / "duplicates").to_pandas()
    groups = dup.groupby("group")["image_id"].apply(set).to_dict()
    hexid = [f"{i:064x}" for i in range(400)]
    assert groups == {0: {hexid[10], hexid[390], hexid[391]}, 1: {hexid[20], hexid[392]}}
    assert dup["path"].notna().all() and (dup["nearest_distance"] < 0.05).all()
    assert manifest["duplicates"] == {**manifest["duplicates"], "groups": 2, "images": 5}
    assert manifest["files"]["neighbours"] == "neighbours"
    report = validate(layout, version, hexid, recall_floor=0.0)
    assert report.checks["graph_recall_at_k"] == entry["recall_at_k"]


def fit_args(layout: Any, version: str, flags: str = "") -> Any:
    """The fit job's arguments for ``layout``'s random-backbone store; ``flags`` as typed."""
    return fit_lsh.parse_args(fit_argv(layout.root, version, flags))


def fit(spark: Any, layout: Any, version: str, flags: str) -> dict[str, Any]:
    """fit_lsh.run on the store's "random" backbone with ``flags``; the manifest."""
    return fit_lsh.run(spark, fit_args(layout, version, flags))


def test_fit_recall_matches_numpy_twin(spark, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from imgsim.ann import leave_one_out_recall, load_brp_model

    layout = make_store(tmp_path / "data", n=300, dim=8, gone=0)
    version = "v20260101T000000Z-000001"
    manifest = fit(
        spark, layout, version, "--num-hash-tables 3 --bucket-length 0.5 --sample-size 300"
    )
    staged = layout.staging / version
    ref = pq.read_table(staged / "reference").to_pydict()
    x = np.array(ref["vector"], dtype=np.float32)
    h = np.array(ref["hashes"], dtype=np.int64)
    params = load_brp_model(staged / "model")
    twin = leave_one_out_recall(x, h, np.arange(len(x)), k=5)
    assert manifest["metrics"]["recall_at_k"] == pytest.approx(twin.recall_at_k, abs=1e-9)
    assert manifest["metrics"]["candidates_share"] == pytest.approx(twin.candidates_share)
    assert params.num_hash_tables == 3


def test_arrow_vector_columns_round_trip_and_refuse_bad_rows() -> None:
    """The graph stages read and write vectors as whole Arrow columns (no per-row Python)."""
    import pyarrow as pa

    from imgsim.jobs.neighbour_graph import GraphError, arrow_list, arrow_vectors

    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    col = arrow_list(x)
    assert col.to_pylist()[1] == [3.0, 4.0, 5.0]
    assert (arrow_vectors(col, 3) == x).all()
    assert (arrow_vectors(col.slice(2), 3) == x[2:]).all()  # a slice keeps its offsets
    assert (arrow_vectors(pa.chunked_array([col.slice(0, 1), col.slice(1)]), 3) == x).all()
    with pytest.raises(GraphError, match="other than 4 dimensions"):
        arrow_vectors(col, 4)
    with pytest.raises(GraphError, match="null"):
        arrow_vectors(pa.array([[1.0, 2.0, 3.0], None], pa.list_(pa.float32())), 3)


def test_bad_arguments_are_refused() -> None:
    for version, flags in (("../evil", ""), ("v", "--bucket-length -1")):
        with pytest.raises(SystemExit):
            fit_args(Layout(Path("x")), version, flags)


def test_missing_embeddings_is_a_clear_error(spark, tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data")
    write_catalog(layout, [])
    args = fit_args(layout, "v20260101T000000Z-000002")
    with pytest.raises(FileNotFoundError, match="no embedding shards"):
        fit_lsh.run(spark, args)


def test_auto_bucket_length_follows_the_scale_of_the_data(spark, tmp_path: Path) -> None:
    layout = make_store(tmp_path / "data", n=300, dim=64, gone=0)
    version = "v20260101T000000Z-000003"
    manifest = fit(spark, layout, version, "--num-hash-tables 4 --bucket-length 0 --sample-size 20")
    lsh = manifest["lsh"]
    # Random Gaussian vectors, normalised: pair distances are about sqrt(2).
    assert lsh["median_pair_distance"] == pytest.approx(np.sqrt(2), rel=0.05)
    assert lsh["bucketLength"] == pytest.approx(0.5 * lsh["median_pair_distance"] / 8.0)
    assert lsh["requested_bucket_length"] == 0
    assert 0.0 < manifest["metrics"]["candidates_share"] < 1.0


def test_auto_parameters_are_tuned_and_kept_in_the_manifest(spark, tmp_path: Path) -> None:
    layout = make_store(tmp_path / "data", n=300, dim=16, gone=0)
    version = "v20260101T000000Z-000004"
    tuned = "--num-hash-tables 0 --target-recall 0.9 --tune-sample 250 --tune-queries 60"
    manifest = fit(spark, layout, version, f"{tuned} --sample-size 40")
    lsh, tuning = manifest["lsh"], manifest["tuning"]
    assert lsh["requested_num_hash_tables"] == 0
    assert tuning["target"] == 0.9
    assert tuning["sample_size"] == 250 and tuning["queries"] == 60
    assert tuning["target_met"] is True
    assert tuning["choice"]["recall_at_k"] >= 0.9
    choice = tuning["choice"]
    assert lsh["bands"] == choice["tables"]
    assert (lsh["keys_per_band"], lsh["probes"]) == (choice["keys_per_band"], choice["probes"])
    assert lsh["numHashTables"] == choice["tables"] * choice["keys_per_band"]
    assert lsh["bucketLength"] == choice["bucket_length"]
    assert {p["keys_per_band"] for p in tuning["curve"]} == {1, 2, 4, 8}
    assert len(tuning["curve"]) > 10
    assert (
        min(p["candidates_share"] for p in tuning["curve"] if p["recall_at_k"] >= 0.9)
        == tuning["choice"]["candidates_share"]
    )
    # The published fit still validates; its measured recall is near the tuner's estimate.
    report = validate(layout, version, [f"{i:064x}" for i in range(300)], recall_floor=0.0)
    assert report.checks["numpy_hashes_match_spark"] is True


def test_and_keys_with_probes_recall_matches_numpy_twin(spark, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from imgsim.ann import leave_one_out_recall, load_brp_model

    layout = make_store(tmp_path / "data", n=200, dim=8, gone=0)
    version = "v20260101T000000Z-000005"
    banded = "--num-hash-tables 3 --keys-per-band 2 --probes 1 --bucket-length 0.3"
    manifest = fit(spark, layout, version, f"{banded} --sample-size 200")
    lsh = manifest["lsh"]
    assert (lsh["bands"], lsh["keys_per_band"], lsh["probes"], lsh["numHashTables"]) == (3, 2, 1, 6)
    staged = layout.staging / version
    ref = pq.read_table(staged / "reference").to_pydict()
    x = np.array(ref["vector"], dtype=np.float32)
    h = np.array(ref["hashes"], dtype=np.int64)
    params = load_brp_model(staged / "model")
    twin = leave_one_out_recall(x, h, np.arange(len(x)), 5, params, keys_per_band=2, probes=1)
    assert manifest["metrics"]["recall_at_k"] == pytest.approx(twin.recall_at_k, abs=1e-9)
    assert manifest["metrics"]["candidates_share"] == pytest.approx(twin.candidates_share)


def test_explicit_parameters_are_not_tuned() -> None:
    args = fit_args(Layout(Path("x")), "v1", "--num-hash-tables 6")
    assert args.num_hash_tables == 6 and args.target_recall is None
    for bad in (
        "--num-hash-tables -1",
        "--target-recall 0",
        "--target-recall 1.5",
        "--tune-sample 1",
        "--probes 2",
        "--keys-per-band 0",
        "--tune-probes a,b",
    ):
        with pytest.raises(SystemExit):
            fit_args(Layout(Path("x")), "v1", bad)


def test_a_daily_change_updates_the_exact_graph_instead_of_rescanning(
    spark, tmp_path: Path
) -> None:
    """Same space as CURRENT (no projection, same backbone): new images and those that lost
    a neighbour are scanned afresh, the others keep their lists plus the new images; the
    result is the exact graph of the new index."""
    import pyarrow.parquet as pq

    from imgsim.ann.graph import exact_neighbours
    from imgsim.versions.models import publish

    layout = make_store(tmp_path / "data", n=300, dim=8, gone=0)
    first, second = "v20260101T000000Z-0000f1", "v20260102T000000Z-0000f2"
    m1 = fit(spark, layout, first, "--num-hash-tables 4 --bucket-length 2.0 --sample-size 30")
    assert m1["neighbours"]["mode"] == "full"
    assert m1["neighbours"]["mode_reason"] == "no base to update: no published version"
    # the map: every reference laid out (t-SNE) in this version, stored with it
    map1 = m1["map"]
    assert map1["points"] == 300 and map1["layout"] == "tsne" and map1["mode"] == "full"
    assert map1["laid_out_in"] == first and map1["placed"] == 0
    assert m1["files"]["map"] == "map.parquet"
    xy1 = stored_map(layout.staging / first)
    ids = [f"{i:064x}" for i in range(300)]
    validate(layout, first, ids, recall_floor=0.0)
    publish(layout, first)
    # the next day: 12 new images (one a near-copy of image 7), images 0-4 gone
    rng = np.random.default_rng(5)
    new = [f"{i:064x}" for i in range(300, 312)]
    x_new = rng.normal(size=(12, 8)).astype(np.float32)
    old = {
        i: np.asarray(v, np.float32)
        for f in sorted(layout.embeddings("random").rglob("*.parquet"))
        for i, v in zip(
            *pq.read_table(f, columns=["image_id", "vector"]).to_pydict().values(), strict=True
        )
    }
    x_new[0] = old[ids[7]] + 0.001
    write_shard(layout, "random", "run2", 0, list(zip(new, x_new, strict=True)), 8)
    catalog = pq.read_table(layout.catalog).to_pylist()
    for row in catalog:
        if row["image_id"] in ids[:5]:
            row["status"] = "gone"
    extra = {**catalog[-1], "status": "live"}
    write_catalog(
        layout,
        catalog + [{**extra, "image_id": i, "path": f"images/b/{i[-3:]}.jpg"} for i in new],
    )
    spark.catalog.clearCache()  # the first fit cached the catalog (one application per run)
    m2 = fit(spark, layout, second, "--num-hash-tables 4 --bucket-length 2.0 --sample-size 30")
    entry = m2["neighbours"]
    assert entry["mode"] == "incremental" and entry["previous"] == first
    assert entry["changes"]["new"] == 12 and entry["changes"]["gone"] == 5
    assert 0 < entry["changes"]["lost"] < 100
    assert entry["mode_reason"].startswith(f"12 new, 5 gone and {entry['changes']['lost']} ")
    staged = layout.staging / second
    ref = pq.read_table(staged / "reference").to_pydict()
    idx, dist = exact_neighbours(np.array(ref["vector"], np.float32), 10)
    table = pq.read_table(staged / "neighbours").to_pandas().sort_values(["image_id", "rank"])
    got = table.groupby("image_id")["neighbour_id"].apply(list).to_dict()
    want = {i: [ref["image_id"][j] for j in idx[r]] for r, i in enumerate(ref["image_id"])}
    assert got == want  # the exact graph of the new index
    near = table.groupby("image_id")["distance"].apply(list).to_dict()
    assert all(np.allclose(near[i], dist[r], atol=1e-9) for r, i in enumerate(ref["image_id"]))
    assert got[ids[7]][0] == new[0] and entry["recall_at_k"] == 1.0
    assert set(table["rank"]) == set(range(1, 11))
    # the map: the 12 new images placed into the first layout, the others kept where they were
    map2 = m2["map"]
    assert map2["mode"] == "incremental" and map2["previous"] == first, map2["mode_reason"]
    assert map2["laid_out_in"] == first and map2["placed"] == 12 and map2["points"] == 307
    assert map2["mode_reason"].startswith(f"12 new and 5 gone since {first}")
    xy2 = stored_map(staged)
    assert set(xy2) == set(ids[5:] + new)
    assert all(xy2[i] == xy1[i] for i in ids[5:])
    # a changed k cannot reuse the graph
    third = "v20260103T000000Z-0000f3"
    validate(layout, second, ids[5:] + new, recall_floor=0.0)
    publish(layout, second)
    m3 = fit(spark, layout, third, "--num-hash-tables 4 --bucket-length 2.0 --graph-k 5")
    assert m3["neighbours"]["mode"] == "full"
    assert m3["neighbours"]["mode_reason"] == f"k changed (10 in {second}, now 5)"
    assert m3["map"]["mode"] == "kept" and m3["map"]["placed"] == 12  # same space, same images
    assert stored_map(layout.staging / third) == xy2


def stored_map(version_dir: Path) -> dict[str, tuple[float, float]]:
    from imgsim.ann.layout import read_map

    got = read_map(version_dir / "map.parquet")
    return {i: (float(x), float(y)) for i, (x, y) in zip(got["image_id"], got["xy"], strict=True)}


def add_images(layout: Any, first: int, x: np.ndarray, run: str) -> list[str]:
    """Images ``first``, ``first`` + 1, ... with vectors ``x``, live in the catalog."""
    import pyarrow.parquet as pq

    ids = [f"{i:064x}" for i in range(first, first + len(x))]
    write_shard(layout, "random", run, 0, list(zip(ids, x, strict=True)), x.shape[1])
    catalog = pq.read_table(layout.catalog).to_pylist()
    extra = {**catalog[-1], "status": "live"}
    write_catalog(
        layout,
        catalog + [{**extra, "image_id": i, "path": f"images/{run}/{i[-3:]}.jpg"} for i in ids],
    )
    return ids


def test_a_small_change_scores_only_the_touched_cells_again(spark, tmp_path: Path) -> None:
    """Same space as CURRENT, the cells path: CURRENT's cells are kept and only the cells of
    the new images are scored again; the graph equals a whole build with those cells."""
    import pyarrow.parquet as pq

    from imgsim.ann.graph import GraphCells, local_graph
    from imgsim.versions.models import publish

    layout = make_store(tmp_path / "data", n=400, dim=16, gone=0)
    flags = (
        "--num-hash-tables 4 --bucket-length 2.0 --sample-size 50 --scan-below 0 "
        "--graph-k 6 --graph-bucket-cap 200 --target-recall 0.5"
    )
    first, second = "v20260101T000000Z-0000c1", "v20260102T000000Z-0000c2"
    m1 = fit(spark, layout, first, flags)
    assert m1["neighbours"]["method"].startswith("cells") and m1["neighbours"]["mode"] == "full"
    validate(layout, first, [f"{i:064x}" for i in range(400)], recall_floor=0.0)
    publish(layout, first)
    x_old = np.array(
        pq.read_table(layout.staging.parent / first / "reference").to_pydict()["vector"]
    )
    new = add_images(layout, 400, np.stack([x_old[3] + 0.01, -x_old[5]]).astype(np.float32), "r2")
    spark.catalog.clearCache()  # the first fit cached the catalog (one application per run)
    m2 = fit(spark, layout, second, flags)
    entry = m2["neighbours"]
    cells = GraphCells.load(layout.staging / second / entry["file"], entry["cells"])
    assert entry["mode"] == "incremental", entry["mode_reason"]
    assert entry["changes"] == {"new": 2, "gone": 0, "lost": 0}
    assert 0 < entry["cells_scored_again"] <= cells.cells // 2
    assert entry["tuning"]["kept_from"] == first and entry["split_cells"] == 0
    ref = pq.read_table(layout.staging / second / "reference").to_pydict()
    ids, x = ref["image_id"], np.array(ref["vector"], np.float32)
    twin, work = local_graph(ids, x, cells, k=6, cap=200)
    assert work["split"] == 0
    graph = pq.read_table(layout.staging / second / "neighbours").to_pandas()
    got = graph.sort_values(["image_id", "rank"]).groupby("image_id")["neighbour_id"].apply(list)
    assert len(got) == 402
    for image_id, want in twin.items():
        assert len(want) == 6 and got[image_id] == [t for _, t in want], image_id
    assert got[new[0]][0] == f"{3:064x}"
