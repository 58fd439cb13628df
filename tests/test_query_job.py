"""spark_jobs/query_lsh.py against the in-process lookup: same model, same neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from imgsim.config import SCAN_BELOW, SCAN_SHARE
from imgsim.jobs import fit_lsh, learn_projection, query_lsh
from imgsim.query.lookup import load_model, lookup
from imgsim.store import write_parquet_atomic
from imgsim.versions.models import publish
from jobargs import fit_argv, query_argv
from test_fit_job import make_store
from test_models import validate

pytestmark = pytest.mark.spark
VERSION = "v20260101T000000Z-0000aa"


BANDED = "v20260101T000000Z-0000bb"
COPIES = {497: 3, 498: 3, 499: 40}
PROJECTED = "v20260101T000000Z-0000cc"


def fit_and_publish(spark, layout, version: str, flags: str) -> None:
    fit_lsh.run(
        spark, fit_lsh.parse_args(fit_argv(layout.root, version, f"--sample-size 20 {flags}"))
    )
    ids = [f"{i:064x}" for i in range(500)]
    validate(layout, version, ids, recall_floor=0.0)
    publish(layout, version)


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory: pytest.TempPathFactory):
    # three near-copies: the duplicate groups of the projected version are decided between the
    # embeddings, not in its 6-d LDA space (where many distinct vectors lie within 0.41)
    layout = make_store(
        tmp_path_factory.mktemp("qjob") / "data", n=500, dim=16, gone=0, copies=COPIES
    )
    fit_and_publish(
        spark,
        layout,
        BANDED,
        "--num-hash-tables 5 --keys-per-band 2 --probes 2 --bucket-length 0.25",
    )
    # The Spark job learns an LDA projection (statistics on the executors); the LSH is fitted
    # in its space.
    out = layout.runs / "manual" / "projection"
    learn_projection.run(
        spark,
        learn_projection.parse_args(
            [
                "--data-root",
                str(layout.root),
                "--backbone",
                "random",
                "--out",
                str(out),
                "--kind",
                "lda",
            ]
        ),
    )
    fit_and_publish(
        spark, layout, PROJECTED, f"--num-hash-tables 4 --bucket-length 0.2 --projection-dir {out}"
    )
    fit_and_publish(spark, layout, VERSION, "--num-hash-tables 2 --bucket-length 0.004")
    return layout


def test_a_projected_version_keeps_its_projection(published) -> None:
    model = load_model(published, PROJECTED)
    entry = model.manifest["projection"]
    assert entry["kind"] == "lda" and entry["requested"] == "lda"
    assert entry["dims"] == model.vectors.shape[1] <= 6  # at most classes - 1 (7 - 1)
    assert entry["coverage"]["labelled_images"] == 500 and entry["coverage"]["classes"] == 7
    assert model.manifest["embedding_dim"] == 16 and model.manifest["search_dim"] == entry["dims"]
    assert model.projection is not None and model.projection.kind == "lda"
    assert model.manifest["files"]["projection"] == "projection/projection.npz"
    assert model.manifest["fit_settings"]["projection"] == "lda"


def test_a_projected_version_decides_duplicates_between_the_embeddings(published) -> None:
    import pyarrow.parquet as pq

    from imgsim.ann import l2_normalize
    from imgsim.versions.models import version_dir

    model = load_model(published, PROJECTED)
    entry = model.manifest["duplicates"]
    assert entry["space"].startswith("embeddings") and entry["distance"] == 0.41
    assert entry["candidates"] == "each image's 5 nearest in the graph, rescored"
    dup = pq.read_table(version_dir(published, PROJECTED) / "duplicates").to_pandas()
    hexid = [f"{i:064x}" for i in range(500)]
    groups = dup.groupby("group")["image_id"].apply(set).to_dict()
    assert groups == {0: {hexid[3], hexid[497], hexid[498]}, 1: {hexid[40], hexid[499]}}
    # the distances are between the L2-normalised embeddings (the store's vectors)
    shards = sorted(published.embeddings("random").rglob("*.parquet"))
    vec = {
        i: v
        for f in shards
        for i, v in zip(
            *pq.read_table(f, columns=["image_id", "vector"]).to_pydict().values(), strict=True
        )
    }
    for row in dup.itertuples():
        a, b = (
            l2_normalize(np.asarray([vec[i]], np.float64))[0]
            for i in (row.image_id, row.nearest_id)
        )
        assert row.nearest_distance == pytest.approx(np.linalg.norm(a - b), abs=1e-6)
    # in the search space the same threshold would have joined far more
    far = model.vectors[:, None] - model.vectors[None]
    assert ((np.linalg.norm(far, axis=2) <= 0.41).sum() - 500) / 2 > 20


NO_SCAN = (1.0, 0)  # the LSH itself, never the cheaper scan


@pytest.mark.parametrize(
    ("version", "expansion", "scan"),
    [
        (VERSION, 0, NO_SCAN),
        (BANDED, 0, NO_SCAN),
        (PROJECTED, 0, NO_SCAN),
        (PROJECTED, 1, NO_SCAN),
        (BANDED, 0, (-1.0, 0)),
        (VERSION, 1, (1.0, 10_000)),
    ],
    ids=[
        "plain-or",
        "and-multiprobe",
        "lda-projected",
        "lda-expanded",
        "scan-by-share",
        "scan-small-index",
    ],
)
def test_spark_batch_and_in_process_lookup_agree(
    spark, published, tmp_path: Path, version: str, expansion: int, scan: tuple[float, int]
) -> None:
    rng = np.random.default_rng(7)
    model = load_model(published, version)
    model.set_scan(*NO_SCAN)
    from imgsim.store import load_vectors

    own_ids, own = load_vectors(published, "random", ids=set(model.ids[:5]))
    assert own_ids == model.ids[:5]
    queries = np.concatenate(
        [
            own,  # references themselves
            rng.normal(size=(15, 16)).astype(np.float32),
        ]
    )
    qids = [f"q{i:03d}" for i in range(len(queries))]
    from imgsim.ann import l2_normalize

    unit = l2_normalize(queries)
    write_parquet_atomic(
        pa.table(
            {
                "query_id": qids,
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(unit.reshape(-1), pa.float32()), 16
                ),
            }
        ),
        tmp_path / "query_vectors.parquet",
    )
    if scan[0] < 0:  # just below the share the version's validation measured: scan
        scan = (model.manifest["metrics"]["candidates_share"] * 0.99, 0)
    model.set_scan(*scan)
    result = query_lsh.answer(
        spark, published.root, version, tmp_path, k=5, expansion=expansion, scan=scan
    ).collect()
    local = lookup(model, queries, k=5, expansion=expansion)
    if version == BANDED:
        assert (model.manifest["lsh"]["keys_per_band"], model.manifest["lsh"]["probes"]) == (2, 2)
        assert model.params.num_hash_tables == 10
    for qid, answer in zip(qids, local, strict=True):
        rows = sorted((r for r in result if r.query_id == qid), key=lambda r: r.rank or 0)
        if not answer.neighbours:
            assert len(rows) == 1 and rows[0].image_id is None and rows[0].candidates == 0
            continue
        assert [r.image_id for r in rows] == [n.image_id for n in answer.neighbours], qid
        assert [r.distance for r in rows] == pytest.approx(
            [n.distance for n in answer.neighbours], abs=1e-5
        )
        assert rows[0].candidates == answer.candidates
        assert rows[0].method == answer.method, qid
        assert len(answer.neighbours) == 5  # widened or exact when the LSH finds few
    methods = {a.method for a in local}
    if scan == NO_SCAN:
        assert "scan" not in methods
    if version == VERSION and scan == NO_SCAN:
        assert methods & {"widened", "exact"}, "narrow: must widen some"
    if scan != NO_SCAN:
        assert methods == {"scan"}
    for i in range(5):  # a reference finds itself first, at distance ~0
        assert local[i].neighbours[0].image_id == model.ids[i]
        assert local[i].neighbours[0].distance < 1e-5


def test_query_job_refuses_an_unpublished_version(published) -> None:
    with pytest.raises(FileNotFoundError, match="not published"):
        query_lsh.read_model(published.root, "v20990101T000000Z-ffffff")
    with pytest.raises(SystemExit):
        query_lsh.parse_args(query_argv(Path("x"), "../x", Path("y")))


def test_query_job_on_a_damaged_version_names_version_file_and_rollback(
    spark, published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13's fault (64 bytes overwritten mid-file, same size) in a copy of a published
    version: the job's failed read is answered with VersionDamaged, not Spark's stack trace."""
    import shutil

    from imgsim.ann import l2_normalize
    from imgsim.config import Layout
    from imgsim.versions.models import VersionDamaged
    from test_models import overwrite_middle

    layout = Layout(tmp_path / "data")
    shutil.copytree(published.models / VERSION, layout.models / VERSION)
    part = max(
        (layout.models / VERSION / "reference").glob("part-*.parquet"),
        key=lambda p: p.stat().st_size,
    )
    overwrite_middle(part)
    unit = l2_normalize(np.random.default_rng(3).normal(size=(4, 16)))
    run_dir = tmp_path / "run"
    write_parquet_atomic(
        pa.table(
            {
                "query_id": [f"q{i}" for i in range(4)],
                "vector": pa.FixedSizeListArray.from_arrays(
                    pa.array(unit.reshape(-1), pa.float32()), 16
                ),
            }
        ),
        run_dir / "query_vectors.parquet",
    )
    monkeypatch.setattr(spark, "stop", lambda: None)  # main() stops its session
    with pytest.raises(VersionDamaged) as err:
        query_lsh.main(query_argv(layout.root, VERSION, run_dir, "--k 3"))
    message = str(err.value)
    rel = part.relative_to(layout.models / VERSION).as_posix()
    assert VERSION in message and rel in message and "imgsim rollback" in message
    assert not (run_dir / "neighbours").exists()


def test_main_hands_every_argument_to_the_search(
    spark, published, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--k and --expansion from the query DAG reach answer() (the expansion once did not)."""
    seen: list[tuple] = []

    class Stop(Exception):
        pass

    def fake_answer(*args):
        seen.append(args)
        raise Stop

    monkeypatch.setattr(query_lsh, "answer", fake_answer)
    monkeypatch.setattr(type(spark), "stop", lambda self: None)  # keep the shared session
    with pytest.raises(Stop):
        query_lsh.main(query_argv(published.root, PROJECTED, tmp_path, "--k 7 --expansion 2"))
    assert seen[0][2:] == (PROJECTED, tmp_path, 7, 2, (SCAN_SHARE, SCAN_BELOW))
