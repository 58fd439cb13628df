"""The NumPy twin of Spark's BucketedRandomProjectionLSH: model loading, hashing, search, recall."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imgsim.ann import (
    BrpParams,
    LshIndex,
    exact_search,
    hash_vectors,
    l2_normalize,
    leave_one_out_recall,
    load_brp_model,
    smallest_k,
    squared_distances,
    top_k,
)
from test_models import MATRIX_UDT  # Spark ML's matrix type, as Parquet stores it

NO_SCAN = {"scan_share": 1.0, "scan_below": 0}  # the LSH itself, never the cheaper scan


def dense_udt(matrix: np.ndarray, transposed: bool) -> dict[str, object]:
    """A Spark DenseMatrix as MatrixUDT: row-major values when transposed, else column-major."""
    rows, cols = matrix.shape
    values = matrix.ravel(order="C" if transposed else "F")
    return {
        "type": 1,
        "numRows": rows,
        "numCols": cols,
        "colPtrs": None,
        "rowIndices": None,
        "values": values.tolist(),
        "isTransposed": transposed,
    }


def sparse_udt(matrix: np.ndarray, transposed: bool) -> dict[str, object]:
    """A Spark SparseMatrix: CSC (colPtrs per column) or, transposed, CSR (per row)."""
    rows, cols = matrix.shape
    major = matrix if transposed else matrix.T  # iterate rows (CSR) or columns (CSC)
    ptrs, idx, vals = [0], [], []
    for line in major:
        nz = np.flatnonzero(line)
        idx.extend(int(i) for i in nz)
        vals.extend(float(v) for v in line[nz])
        ptrs.append(len(idx))
    return {
        "type": 0,
        "numRows": rows,
        "numCols": cols,
        "colPtrs": ptrs,
        "rowIndices": idx,
        "values": vals,
        "isTransposed": transposed,
    }


def write_brp_model(
    model_dir: Path,
    udt: dict[str, object],
    bucket_length: float,
    num_hash_tables: int,
    column: str = "randUnitVectors",
    default_bucket_length: float | None = None,
) -> Path:
    """A saved BucketedRandomProjectionLSHModel as Spark writes it (metadata + data parquet)."""
    (model_dir / "metadata").mkdir(parents=True)
    (model_dir / "data").mkdir(parents=True)
    meta = {
        "class": "org.apache.spark.ml.feature.BucketedRandomProjectionLSHModel",
        "timestamp": 1767225600000,
        "sparkVersion": "4.0.0",
        "uid": "brp_test",
        "paramMap": {
            "bucketLength": bucket_length,
            "numHashTables": num_hash_tables,
            "inputCol": "features",
            "outputCol": "hashes",
        },
        "defaultParamMap": {
            "numHashTables": 1,
            "seed": 42,
            **(
                {"bucketLength": default_bucket_length} if default_bucket_length is not None else {}
            ),
        },
    }
    (model_dir / "metadata" / "part-00000").write_text(json.dumps(meta) + "\n")
    (model_dir / "metadata" / "_SUCCESS").write_text("")
    table = pa.Table.from_pylist([{column: udt}], schema=pa.schema([(column, MATRIX_UDT)]))
    pq.write_table(table, model_dir / "data" / "part-00000-abc.snappy.parquet")
    return model_dir


def floor_hashes(matrix: np.ndarray, x: np.ndarray, w: float) -> np.ndarray:
    """Spark's formula written out element by element: floor(r_i . x / w)."""
    return np.array(
        [[math.floor(float(np.dot(r, v)) / w) for r in matrix] for v in x], dtype=np.int64
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# -- load_brp_model -----------------------------------------------------------------------------


@pytest.mark.parametrize("transposed", [True, False], ids=["row-major", "column-major"])
def test_load_dense_model_reproduces_matrix_and_hashes(
    tmp_path: Path, rng: np.random.Generator, transposed: bool
) -> None:
    matrix = rng.normal(size=(4, 6))
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    model = write_brp_model(tmp_path / "model", dense_udt(matrix, transposed), 0.5, 4)

    params = load_brp_model(model)

    assert params.bucket_length == 0.5
    assert params.num_hash_tables == 4
    assert params.matrix.shape == (4, 6)
    np.testing.assert_array_equal(params.matrix, matrix)
    x = rng.normal(size=(30, 6))
    np.testing.assert_array_equal(hash_vectors(params, x), floor_hashes(matrix, x, 0.5))


@pytest.mark.parametrize("transposed", [True, False], ids=["csr", "csc"])
def test_load_sparse_model(tmp_path: Path, transposed: bool) -> None:
    matrix = np.array([[0.0, 1.5, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.0]])
    model = write_brp_model(tmp_path / "model", sparse_udt(matrix, transposed), 1.0, 3)

    np.testing.assert_array_equal(load_brp_model(model).matrix, matrix)


def test_load_legacy_rand_matrix_column_and_param_precedence(tmp_path: Path) -> None:
    matrix = np.array([[1.0, 0.0], [0.0, 1.0]])
    model = write_brp_model(
        tmp_path / "model",
        dense_udt(matrix, True),
        2.0,
        2,
        column="randMatrix",
        default_bucket_length=9.0,
    )

    params = load_brp_model(model)

    np.testing.assert_array_equal(params.matrix, matrix)
    assert params.bucket_length == 2.0  # paramMap wins over defaultParamMap


def test_load_model_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="metadata"):
        load_brp_model(empty)

    no_data = write_brp_model(tmp_path / "nodata", dense_udt(np.eye(2), True), 1.0, 2)
    for f in (no_data / "data").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no model data"):
        load_brp_model(no_data)

    two_rows = write_brp_model(tmp_path / "tworows", dense_udt(np.eye(2), True), 1.0, 2)
    data_file = next((two_rows / "data").glob("*.parquet"))
    udt = dense_udt(np.eye(2), True)
    pq.write_table(
        pa.Table.from_pylist(
            [{"randUnitVectors": udt}] * 2, schema=pa.schema([("randUnitVectors", MATRIX_UDT)])
        ),
        data_file,
    )
    with pytest.raises(ValueError, match="expected one row"):
        load_brp_model(two_rows)

    wrong_col = write_brp_model(
        tmp_path / "wrongcol", dense_udt(np.eye(2), True), 1.0, 2, column="somethingElse"
    )
    with pytest.raises(ValueError, match="somethingElse"):
        load_brp_model(wrong_col)


# -- hashing ------------------------------------------------------------------------------------


def test_hash_vectors_is_floor_of_projection_over_bucket_length(rng: np.random.Generator) -> None:
    matrix = rng.normal(size=(5, 8))
    x = rng.normal(size=(50, 8)).astype(np.float32)
    params = BrpParams(matrix, 0.3)

    h = hash_vectors(params, x)

    assert h.dtype == np.int64
    assert h.shape == (50, 5)
    np.testing.assert_array_equal(h, floor_hashes(matrix, x.astype(np.float64), 0.3))
    assert (h < 0).any()  # negative projections floor downwards


def test_hash_vectors_negative_values_floor_down() -> None:
    params = BrpParams(np.array([[1.0], [-1.0]]), 1.0)
    np.testing.assert_array_equal(
        hash_vectors(params, np.array([[0.5], [2.0]])), [[0, -1], [2, -2]]
    )


# -- search -------------------------------------------------------------------------------------


def test_squared_distances_match_direct_computation(rng: np.random.Generator) -> None:
    q = rng.normal(size=(3, 4)).astype(np.float32)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    want = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    got = squared_distances(q, x)
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (squared_distances(q, q).diagonal() >= 0).all()


def test_lsh_search_with_huge_bucket_length_equals_exact(rng: np.random.Generator) -> None:
    # Non-negative data and projections: every projection lies in [0, w), one bucket per table.
    ref = l2_normalize(rng.random(size=(40, 6)))
    params = BrpParams(np.abs(rng.normal(size=(3, 6))), 1e9)
    ref_h = hash_vectors(params, ref)
    assert (ref_h == 0).all()
    query = l2_normalize(rng.random(size=(1, 6)))[0]

    (approx,) = LshIndex.build(ref, ref_h, params, **NO_SCAN).search(query, k=5)
    exact = exact_search(query, ref, k=5)

    assert (approx.candidates, approx.method) == (40, "lsh")
    assert exact.candidates == 40
    np.testing.assert_array_equal(approx.indices, exact.indices)
    np.testing.assert_allclose(approx.distances, exact.distances, rtol=1e-5)
    assert np.all(np.diff(exact.distances) >= 0)
    brute = np.sqrt(((ref - query) ** 2).sum(1))
    np.testing.assert_array_equal(exact.indices, np.argsort(brute, kind="stable")[:5])


def test_lsh_search_compares_only_bucket_sharing_candidates() -> None:
    ref = np.array([[0.0, 1.2], [1.0, 1.2], [2.0, 0.0], [3.0, 0.0]], np.float32)
    params = BrpParams(np.eye(2), 1.0)  # hashes: the coordinates, floored
    index = LshIndex.build(ref, hash_vectors(params, ref), params, **NO_SCAN)
    query = np.array([2.9, 1.1], np.float32)
    # The query shares table 0 with row 2 and table 1 with rows 0 and 1; row 3 shares nothing.
    (res,) = index.search(query, k=3)

    assert (res.candidates, res.method) == (3, "lsh")
    np.testing.assert_array_equal(res.indices, [2, 1, 0])  # row 3 is nearest but not a candidate
    np.testing.assert_allclose(
        res.distances, np.linalg.norm(ref[[2, 1, 0]] - query, axis=1), rtol=1e-5
    )

    # No candidate (and none with every probe): the ladder ends in an exact scan.
    far_q = np.array([9.5, 9.5], np.float32)
    (far,) = index.search(far_q, k=3)
    assert far.method == "exact"
    assert far.candidates == 4
    np.testing.assert_array_equal(far.indices, exact_search(far_q, ref, 3).indices)


def test_exclude_removes_the_query_itself(rng: np.random.Generator) -> None:
    ref = rng.normal(size=(10, 3)).astype(np.float32)
    params = BrpParams(np.zeros((2, 3)), 1.0)  # every hash 0: one bucket
    index = LshIndex.build(ref, hash_vectors(params, ref), params, **NO_SCAN)

    (approx,) = index.search(ref[4], k=3, exclude=np.array([4]))
    exact = exact_search(ref[4], ref, k=3, exclude=4)

    assert 4 not in approx.indices.tolist()
    assert 4 not in exact.indices.tolist()
    assert approx.candidates == 9
    np.testing.assert_array_equal(approx.indices, exact.indices)
    # Without exclude the query is its own nearest neighbour at distance 0.
    self_hit = exact_search(ref[4], ref, k=1)
    assert self_hit.indices.tolist() == [4]
    assert self_hit.distances[0] == pytest.approx(0.0, abs=1e-3)


def test_a_batch_answers_as_one_query_at_a_time(rng: np.random.Generator) -> None:
    ref = l2_normalize(rng.normal(size=(500, 16)))
    params = BrpParams(rng.normal(size=(12, 16)) / 4, 0.3)
    index = LshIndex.build(
        ref, hash_vectors(params, ref), params, keys_per_band=3, probes=1, **NO_SCAN
    )
    queries = l2_normalize(
        np.concatenate([ref[:30] + 0.05 * rng.normal(size=(30, 16)), rng.normal(size=(10, 16))])
    )

    batch = index.search(queries, k=7)
    for i, got in enumerate(batch):
        (one,) = index.search(queries[i], k=7)
        np.testing.assert_array_equal(got.indices, one.indices)
        assert (got.candidates, got.method) == (one.candidates, one.method)
        # the LSH's answer is the exact top-7 among the query's candidates
        mask = index.candidates(queries[i : i + 1])[0]
        if got.method == "lsh":
            d = squared_distances(queries[i : i + 1], ref)[0]
            want = np.flatnonzero(mask)[np.lexsort((np.flatnonzero(mask), d[mask]))[:7]]
            np.testing.assert_array_equal(got.indices, want)
            assert got.candidates == mask.sum()
    assert {a.method for a in batch} <= {"lsh", "widened", "exact"}


def test_the_scan_answers_when_it_is_cheaper(rng: np.random.Generator) -> None:
    ref = l2_normalize(rng.normal(size=(300, 8)))
    params = BrpParams(rng.normal(size=(4, 8)), 0.5)
    hashes = hash_vectors(params, ref)
    q = ref[:5]

    lsh = LshIndex.build(ref, hashes, params, expected_share=0.6, **NO_SCAN).search(q, k=5)
    assert {a.method for a in lsh} <= {"lsh", "widened", "exact"}
    assert "lsh" in {a.method for a in lsh}

    def index(**scan: object) -> LshIndex:
        return LshIndex.build(ref, hashes, params, **{**NO_SCAN, **scan})  # type: ignore[arg-type]

    by_share = index(scan_share=0.25, expected_share=0.6)  # measured: 60% compared
    small = index(scan_below=300 * 8 + 1)  # references x dims below
    assert by_share.scans and small.scans
    assert not index(scan_share=0.25, expected_share=0.2).scans
    assert not index(scan_share=0.25).scans  # share not measured
    for answers in (by_share.search(q, 5), small.search(q, 5)):
        for i, a in enumerate(answers):
            exact = exact_search(q[i], ref, 5)
            assert a.method == "scan"
            assert a.candidates == 300
            np.testing.assert_array_equal(a.indices, exact.indices)


def test_smallest_k_rows_break_ties_by_index(rng: np.random.Generator) -> None:
    d = rng.integers(0, 3, size=(50, 40)).astype(np.float32)
    d[::7] = np.inf
    for k in (1, 5, 39, 40, 60):
        got = smallest_k(d, k)
        want = np.stack([np.lexsort((np.arange(40), row))[:k] for row in d])
        np.testing.assert_array_equal(got, want)


def test_top_k_breaks_ties_by_index() -> None:
    d = np.array([1.0, 0.0, 0.0, 0.0, 2.0, 0.0], np.float32)
    assert top_k(d, 2).tolist() == [1, 2]
    assert top_k(d, 4).tolist() == [1, 2, 3, 5]
    assert top_k(d, 5).tolist() == [1, 2, 3, 5, 0]
    assert top_k(d, 100).tolist() == [1, 2, 3, 5, 0, 4]
    allowed = np.array([True, False, True, True, True, True])
    assert top_k(d, 2, allowed).tolist() == [2, 3]
    assert top_k(d, 3, np.zeros(6, bool)).size == 0


def test_top_k_tie_breaking_on_many_random_ties() -> None:
    # Ties straddling the k-th position must still resolve to the lowest indices.
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(2, 50))
        d = rng.integers(0, 3, size=n).astype(np.float32)
        k = int(rng.integers(1, n + 2))
        want = np.lexsort((np.arange(n), d))[:k]
        np.testing.assert_array_equal(top_k(d, k), want)


# -- recall -------------------------------------------------------------------------------------


def test_leave_one_out_recall_is_one_when_every_candidate_is_compared(
    rng: np.random.Generator,
) -> None:
    ref = l2_normalize(rng.normal(size=(60, 8)))
    ref_h = np.zeros((60, 4), np.int64)  # one bucket: every reference is a candidate

    report = leave_one_out_recall(ref, ref_h, np.arange(20), k=5)

    assert report.queries == 20
    assert report.k == 5
    assert report.recall_at_k == 1.0
    assert report.candidates_share == 1.0
    assert report.short_answers == 0
    assert report.as_dict()["recall_at_k"] == 1.0


def test_leave_one_out_recall_drops_for_tiny_bucket_length(rng: np.random.Generator) -> None:
    ref = l2_normalize(rng.normal(size=(60, 8)))
    params = BrpParams(rng.normal(size=(2, 8)), 1e-4)

    report = leave_one_out_recall(ref, hash_vectors(params, ref), np.arange(60), k=5)

    assert report.queries == 60
    assert report.recall_at_k < 1.0
    assert report.candidates_share < 0.1
    assert report.short_answers > 0


def test_leave_one_out_recall_degenerate_inputs() -> None:
    one = np.ones((1, 3), np.float32)
    assert leave_one_out_recall(one, np.zeros((1, 2), np.int64), np.arange(1)).queries == 0
    two = np.eye(2, dtype=np.float32)
    empty = leave_one_out_recall(two, np.zeros((2, 2), np.int64), np.array([], np.int64))
    assert empty.queries == 0
    assert empty.recall_at_k == 1.0


def test_l2_normalize_keeps_zero_rows_zero() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])

    out = l2_normalize(x)

    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]], rtol=1e-6)
    assert np.isfinite(out).all()


def test_near_ties_are_decided_in_float64_whatever_the_batch() -> None:
    # Two references 1e-4 and 3e-4 from the query: float32's |q|^2 + |x|^2 - 2 q.x cannot
    # tell them apart reliably; the answer must not depend on that rounding or on the batch.
    rng = np.random.default_rng(0)
    wrong = 0
    for seed in range(60):
        r = np.random.default_rng(seed)
        q = l2_normalize(r.normal(size=(1, 64)))[0]
        near, nearer = q.copy(), q.copy()
        near[0] += 3e-4
        nearer[1] += 1e-4
        ref = l2_normalize(np.vstack([near, nearer, r.normal(size=(20, 64))]))
        params = BrpParams(r.normal(size=(4, 64)), 1.0)
        index = LshIndex.build(
            ref, hash_vectors(params, ref), params, scan_share=1.0, scan_below=2**62
        )
        others = l2_normalize(rng.normal(size=(40, 64)))
        alone = index.search(q, 1)[0].indices.tolist()
        batched = index.search(np.vstack([others, q[None, :]]), 1)[-1].indices.tolist()
        wrong += alone != [1] or batched != [1]
    assert wrong == 0
