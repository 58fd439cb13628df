"""NumPy twin of Spark's BucketedRandomProjectionLSH, plus exact search and recall metrics.

Spark's hash for table i is ``floor(r_i . x / bucketLength)``, where the rows r_i of the model's
random matrix are stored in the saved model (``data/*.parquet``). Reading that matrix reproduces
Spark's hashes exactly, so lookups and validation need no JVM. A candidate is any reference
that shares at least one table's bucket with the query (Spark's OR-amplification).

AND-amplified keys and multi-probe work over the same projections: a model with
``tables * keys_per_band`` projections forms ``tables`` bands of ``keys_per_band`` consecutive
hash values; a reference is a candidate when one of its band keys equals one of the query's
probe keys for that band (its own key, plus ``probes`` keys that move the projections nearest a
bucket boundary into the neighbouring bucket; see :func:`probe_keys`). ``keys_per_band=1,
probes=0`` is exactly Spark's OR search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class BrpParams:
    matrix: np.ndarray          # (numHashTables, dim), float64
    bucket_length: float

    @property
    def num_hash_tables(self) -> int:
        return int(self.matrix.shape[0])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _matrix_from_udt(m: dict[str, Any]) -> np.ndarray:
    """Spark MatrixUDT struct (type 1 dense, 0 sparse) -> dense ndarray."""
    rows, cols = int(m["numRows"]), int(m["numCols"])
    values = np.asarray(m["values"], dtype=np.float64)
    transposed = bool(m.get("isTransposed"))
    if int(m["type"]) == 1:
        if transposed:                       # row-major values
            return values.reshape((rows, cols), order="C")
        return values.reshape((rows, cols), order="F")
    dense = np.zeros((rows, cols))
    col_ptrs, row_idx = m["colPtrs"], m["rowIndices"]
    major = rows if transposed else cols
    for j in range(major):
        for p in range(col_ptrs[j], col_ptrs[j + 1]):
            if transposed:
                dense[j, row_idx[p]] = values[p]
            else:
                dense[row_idx[p], j] = values[p]
    return dense


def load_brp_model(model_dir: str | Path) -> BrpParams:
    """Read the random matrix and bucketLength of a saved BucketedRandomProjectionLSHModel."""
    import pyarrow.parquet as pq

    model_dir = Path(model_dir)
    meta_files = sorted((model_dir / "metadata").glob("part-*"))
    if not meta_files:
        raise FileNotFoundError(f"{model_dir}/metadata: no Spark model metadata")
    meta = json.loads(meta_files[0].read_text().splitlines()[0])
    params = {**meta.get("defaultParamMap", {}), **meta.get("paramMap", {})}
    bucket_length = float(params["bucketLength"])
    data_files = sorted(p for p in (model_dir / "data").glob("*.parquet"))
    if not data_files:
        raise FileNotFoundError(f"{model_dir}/data: no model data")
    rows = pq.read_table(data_files[0]).to_pylist()
    # Spark 4 saves the unit projection vectors as "randUnitVectors" (3.x: "randMatrix").
    key = next((k for k in ("randUnitVectors", "randMatrix") if rows and k in rows[0]), None)
    if len(rows) != 1 or key is None:
        raise ValueError(f"{model_dir}/data: expected one row with the random matrix, "
                         f"found columns {list(rows[0]) if rows else []}")
    return BrpParams(_matrix_from_udt(rows[0][key]), bucket_length)


def hash_vectors(params: BrpParams, x: np.ndarray) -> np.ndarray:
    """(n, dim) -> (n, numHashTables) int64 bucket ids, exactly as Spark computes them."""
    x64 = np.asarray(x, dtype=np.float64)
    return np.floor(x64 @ params.matrix.T / params.bucket_length).astype(np.int64)


def projections(params: BrpParams, x: np.ndarray) -> np.ndarray:
    """(n, dim) -> (n, numHashTables) ``r_i . x / bucketLength`` (float64); floor = the hash."""
    x64 = np.asarray(x, dtype=np.float64)
    return x64 @ params.matrix.T / params.bucket_length


def probe_keys(params: BrpParams, x: np.ndarray, keys_per_band: int = 1,
               probes: int = 0) -> np.ndarray:
    """Band keys each query looks up: (m, tables, 1 + probes, keys_per_band) int64.

    Probe 0 is the query's own band key (its hash values, as :func:`hash_vectors`); probe p
    moves the p-th key nearest a bucket boundary by one bucket towards that boundary.
    """
    from imgsim.tuning import probe_keys as _probe_keys

    return _probe_keys(projections(params, np.atleast_2d(x)), keys_per_band, probes)


def band_candidates(query_keys: np.ndarray, ref_hashes: np.ndarray) -> np.ndarray:
    """(n,) bool: the reference shares a band key with one of the query's probe keys.

    ``query_keys`` is one query's (tables, probes + 1, keys_per_band); ``ref_hashes`` is
    (n, tables * keys_per_band), the hash columns in Spark's order.
    """
    tables, _, kb = query_keys.shape
    n = ref_hashes.shape[0]
    if ref_hashes.shape[1] != tables * kb:
        raise ValueError(f"reference hashes have {ref_hashes.shape[1]} columns, expected "
                         f"{tables} bands x {kb} keys")
    mask = np.zeros(n, bool)
    for b in range(tables):                 # band by band: memory stays O(n * keys_per_band)
        band = ref_hashes[:, b * kb:(b + 1) * kb]
        for key in query_keys[b]:
            mask |= (band == key).all(axis=1)
    return mask


@dataclass(frozen=True)
class _Band:
    lo: np.ndarray              # (K,) smallest reference hash per key
    span: np.ndarray            # (K,) hash range per key
    radix: np.ndarray           # (K,) mixed-radix weights; packed id = ((h - lo) * radix).sum()
    order: np.ndarray           # reference rows sorted by packed id
    ids: np.ndarray             # packed ids, sorted


@dataclass(frozen=True)
class BandIndex:
    """Reference band keys packed into exact integer ids and sorted, per band.

    A probe key then finds its bucket with a binary search instead of a comparison against
    every reference. Bands whose key range does not fit 63 bits are left to the comparison
    (``None``). Same candidates as :func:`band_candidates`, only faster on large indexes.
    """

    keys_per_band: int
    bands: list[_Band | None]

    @classmethod
    def build(cls, ref_hashes: np.ndarray, keys_per_band: int) -> BandIndex:
        n, total = ref_hashes.shape
        if keys_per_band < 1 or total % keys_per_band:
            raise ValueError(f"{total} hash columns cannot form bands of {keys_per_band} keys")
        out: list[_Band | None] = []
        for b in range(total // keys_per_band):
            band = ref_hashes[:, b * keys_per_band:(b + 1) * keys_per_band]
            if n == 0:
                out.append(None)
                continue
            lo, hi = band.min(axis=0), band.max(axis=0)
            span = hi - lo + 1
            if float(np.prod(span.astype(np.float64))) >= 2.0 ** 62:
                out.append(None)
                continue
            radix = np.concatenate([[1], np.cumprod(span[:-1])]).astype(np.int64)
            packed = ((band - lo) * radix).sum(axis=1)
            order = np.argsort(packed, kind="stable")
            out.append(_Band(lo, span, radix, order, packed[order]))
        return cls(keys_per_band, out)

    def candidates(self, query_keys: np.ndarray, ref_hashes: np.ndarray) -> np.ndarray:
        """(n,) bool, as :func:`band_candidates` for one query's (bands, probes+1, K) keys."""
        n = ref_hashes.shape[0]
        kb = self.keys_per_band
        if query_keys.shape[0] != len(self.bands) or query_keys.shape[2] != kb:
            raise ValueError(f"query keys {query_keys.shape} do not fit {len(self.bands)} bands "
                             f"of {kb} keys")
        mask = np.zeros(n, bool)
        for b, band in enumerate(self.bands):
            if band is None:
                cols = ref_hashes[:, b * kb:(b + 1) * kb]
                for key in query_keys[b]:
                    mask |= (cols == key).all(axis=1)
                continue
            rel = query_keys[b] - band.lo                         # (probes+1, K)
            inside = ((rel >= 0) & (rel < band.span)).all(axis=1)
            if not inside.any():
                continue
            ids = (rel[inside] * band.radix).sum(axis=1)
            left = np.searchsorted(band.ids, ids, side="left")
            right = np.searchsorted(band.ids, ids, side="right")
            for a, z in zip(left, right, strict=True):
                mask[band.order[a:z]] = True
        return mask


def squared_distances(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(m, dim), (n, dim) -> (m, n) squared L2 distances (clipped at 0)."""
    q = np.asarray(q, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    d = (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2.0 * (q @ x.T)
    return np.maximum(d, 0.0)


def top_k(dist_row: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k smallest entries (ties by index), restricted to ``allowed`` if given."""
    idx = np.arange(dist_row.shape[0]) if allowed is None else np.flatnonzero(allowed)
    if idx.size == 0:
        return idx
    sub = dist_row[idx]
    kk = min(k, idx.size)
    if kk < idx.size:
        # Keep every entry tied with the k-th smallest: argpartition alone picks an arbitrary
        # subset of the ties, which would break the tie-by-index order.
        kth = np.partition(sub, kk - 1)[kk - 1]
        part = np.flatnonzero(sub <= kth)
    else:
        part = np.arange(idx.size)
    order = np.lexsort((idx[part], sub[part]))[:kk]
    return idx[part][order]


@dataclass(frozen=True)
class Neighbours:
    indices: np.ndarray         # into the reference matrix, nearest first
    distances: np.ndarray       # L2
    candidates: int             # references compared (sharing a bucket with the query)


def lsh_search(query: np.ndarray, query_hashes: np.ndarray, ref: np.ndarray,
               ref_hashes: np.ndarray, k: int, exclude: int | None = None) -> Neighbours:
    """Spark's approximate kNN for one query: exact distances among bucket-sharing candidates."""
    mask = (ref_hashes == query_hashes[None, :]).any(axis=1)
    if exclude is not None:
        mask[exclude] = False
    cand = np.flatnonzero(mask)
    if cand.size == 0:
        return Neighbours(cand, np.zeros(0, np.float32), 0)
    d = squared_distances(query[None, :], ref[cand])[0]
    order = top_k(d, k)
    return Neighbours(cand[order], np.sqrt(d[order]), int(cand.size))


def amplified_search(query: np.ndarray, query_keys: np.ndarray, ref: np.ndarray,
                     ref_hashes: np.ndarray, k: int, exclude: int | None = None,
                     index: BandIndex | None = None) -> Neighbours:
    """Approximate kNN with AND-amplified band keys and multi-probe (see :func:`probe_keys`).

    ``index`` (:class:`BandIndex` of ``ref_hashes``) finds the same candidates faster.
    """
    mask = (band_candidates(query_keys, ref_hashes) if index is None
            else index.candidates(query_keys, ref_hashes))
    if exclude is not None:
        mask[exclude] = False
    cand = np.flatnonzero(mask)
    if cand.size == 0:
        return Neighbours(cand, np.zeros(0, np.float32), 0)
    d = squared_distances(query[None, :], ref[cand])[0]
    order = top_k(d, k)
    return Neighbours(cand[order], np.sqrt(d[order]), int(cand.size))


def exact_search(query: np.ndarray, ref: np.ndarray, k: int,
                 exclude: int | None = None) -> Neighbours:
    d = squared_distances(query[None, :], ref)[0]
    allowed = None
    if exclude is not None:
        allowed = np.ones(ref.shape[0], bool)
        allowed[exclude] = False
    order = top_k(d, k, allowed)
    return Neighbours(order, np.sqrt(d[order]), int(ref.shape[0]))


def expand_queries(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Query expansion: each unit query plus its first neighbours' vectors, re-normalised.

    ``queries`` (m, dim); ``neighbours`` (m, n, dim), the n nearest references found by a
    first search. The expanded query is searched again; its answers are then ordered by their
    distance to the original query (:func:`imgsim.lookup.lookup`).
    """
    q = np.asarray(queries, np.float32) + np.asarray(neighbours, np.float32).sum(axis=1)
    norms = np.linalg.norm(q, axis=-1, keepdims=True)
    return np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)


@dataclass(frozen=True)
class RecallReport:
    k: int
    queries: int
    recall_at_k: float              # |LSH top-k ∩ exact top-k| / k, averaged
    candidates_share: float         # mean share of the reference set compared per query
    short_answers: int              # queries for which the LSH returned fewer than k

    def as_dict(self) -> dict[str, float | int]:
        return {"k": self.k, "queries": self.queries, "recall_at_k": self.recall_at_k,
                "candidates_share": self.candidates_share, "short_answers": self.short_answers}


def leave_one_out_recall(ref: np.ndarray, ref_hashes: np.ndarray, sample: np.ndarray,
                         k: int = 5) -> RecallReport:
    """Each sampled reference queries the rest: LSH top-k against exact top-k."""
    n = ref.shape[0]
    if n < 2 or sample.size == 0:
        return RecallReport(k, 0, 1.0, 0.0, 0)
    recalls, shares, short = [], [], 0
    for i in sample:
        exact = exact_search(ref[i], ref, k, exclude=int(i))
        approx = lsh_search(ref[i], ref_hashes[i], ref, ref_hashes, k, exclude=int(i))
        want = set(exact.indices.tolist())
        recalls.append(len(want & set(approx.indices.tolist())) / max(len(want), 1))
        shares.append(approx.candidates / (n - 1))
        short += int(approx.indices.size < min(k, n - 1))
    return RecallReport(k, int(sample.size), float(np.mean(recalls)), float(np.mean(shares)),
                        short)
