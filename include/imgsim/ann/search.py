"""The search: exact distances, tie-stable top-k, and the batched LSH lookup with its ladder.

:class:`LshIndex` answers a batch of queries at once. Its candidates are the references that
share a band key with one of a query's probe keys (:mod:`imgsim.ann.bands`); they are scored
with one matrix product per batch (over the union of the batch's candidates), never one query
at a time. Each query is answered by the first rung that fits, and :attr:`Neighbours.method`
says which:

* ``scan``: an exact scan of the index, because it costs less than the LSH would: the index
  is small (``references x dims`` below ``scan_below``) or the LSH compares more than
  ``scan_share`` of it on average (``expected_share``: the share the version's validation
  measured). The decision is the index's, not the query's: it costs nothing to make, and the
  Spark job makes the same one from the same manifest;
* ``lsh``: the version's LSH as fitted;
* ``widened``: the LSH found fewer than k candidates; searched again with every probe;
* ``exact``: still fewer than k; an exact scan.

Candidates are ranked by L2 distance in float32 (``|q|^2 + |x|^2 - 2 q.x``, one matrix
product); the nearest ``k + OVERSELECT`` are re-ranked by their float64 distance (ties: the
lower reference row) and cut to k, so near-ties are decided in float64, whatever the batch,
as the Spark job decides them; the answer reports the float64 distances. The Spark query job
(:mod:`imgsim.jobs.query_lsh`) follows the same ladder and :func:`scan_is_cheaper`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from imgsim.ann.bands import BandIndex
from imgsim.ann.brp import AnnError, BrpParams, probe_keys
from imgsim.config import SCAN_BELOW, SCAN_SHARE

#: how a query was answered, in order of escalation (see the module docstring)
METHODS = ("lsh", "widened", "exact", "scan")
#: queries scored together: a batch holds about 14 bytes per (query, reference) cell (float32
#: distances, int64 top-k partition, masks), so 2^24 cells stay near 240 MB
MAX_BATCH_CELLS = 1 << 24
#: extra nearest (by float32) re-ranked in float64 before the k are cut: near-ties at the k-th
#: place are decided by the float64 distance, the same whichever batch a query is in
OVERSELECT = 16


def scan_is_cheaper(
    expected_share: float | None, n: int, dim: int, scan_share: float, scan_below: int
) -> bool:
    """Whether an exact scan of ``n`` references (``dim`` each) costs less than an LSH that
    compares ``expected_share`` of them on average (None: not measured)."""
    return n * dim < scan_below or (expected_share is not None and expected_share > scan_share)


def squared_distances(q: np.ndarray, x: np.ndarray, x_sq: np.ndarray | None = None) -> np.ndarray:
    """(m, dim), (n, dim) -> (m, n) squared L2 distances (float32, clipped at 0)."""
    q = np.asarray(q, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    if x_sq is None:
        x_sq = (x * x).sum(1)
    d = q @ x.T  # one matrix product, then in place: |q|^2 + |x|^2 - 2 q.x
    d *= -2.0
    d += x_sq[None, :]
    d += (q * q).sum(1)[:, None]
    return np.maximum(d, 0.0, out=d)


def refine(query: np.ndarray, ref: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``idx`` re-ordered by float64 L2 distance to ``query`` (ties by index), with those
    distances: the matrix-product form loses digits near 0 (a photo and its own copy), and
    Spark's job computes float64 differences too."""
    d = np.sqrt(((ref[idx].astype(np.float64) - np.asarray(query, np.float64)) ** 2).sum(1))
    order = np.lexsort((idx, d))
    return idx[order], d[order]


def smallest_k(d: np.ndarray, k: int) -> np.ndarray:
    """(m, min(k, n)) column indices of each row's smallest values, by value then index.

    Every entry tied with the k-th smallest is a contender, so ties resolve to the lowest
    index (argpartition alone would pick an arbitrary subset of the ties).
    """
    m, n = d.shape
    kk = min(k, n)
    if kk <= 0:
        return np.zeros((m, 0), np.int64)
    if kk == n:
        return np.argsort(d, axis=1, kind="stable")
    part = np.argpartition(d, kk - 1, axis=1)[:, :kk]
    rows = np.arange(m)[:, None]
    vals = d[rows, part]
    kth = vals.max(axis=1, keepdims=True)
    # rows where more entries tie with the k-th than were picked: take the lowest indices
    loose = np.flatnonzero((d == kth).sum(1) > (vals == kth).sum(1))
    for i in loose:
        lo = np.flatnonzero(d[i] < kth[i, 0])
        part[i] = np.concatenate([lo, np.flatnonzero(d[i] == kth[i, 0])[: kk - lo.size]])
        vals[i] = d[i, part[i]]
    return part[rows, np.lexsort((part, vals), axis=1)]


def top_k(dist_row: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Indices of one row's k smallest entries (ties by index), among ``allowed`` if given."""
    idx = np.arange(dist_row.shape[0]) if allowed is None else np.flatnonzero(allowed)
    return idx[smallest_k(dist_row[idx][None, :], k)[0]]


@dataclass(frozen=True)
class Neighbours:
    indices: np.ndarray  # into the reference matrix, nearest first
    distances: np.ndarray  # L2
    candidates: int  # references compared
    method: str = "lsh"  # METHODS


def exact_search(
    query: np.ndarray, ref: np.ndarray, k: int, exclude: int | None = None
) -> Neighbours:
    """The k nearest of all references (one query), ``exclude`` left out."""
    d = squared_distances(np.atleast_2d(query), ref)[0]
    allowed = None
    if exclude is not None:
        allowed = np.ones(ref.shape[0], bool)
        allowed[exclude] = False
    idx, dist = refine(query, ref, top_k(d, k + OVERSELECT, allowed))
    return Neighbours(idx[:k], dist[:k], int(ref.shape[0]) - (exclude is not None), "exact")


@dataclass
class LshIndex:
    """Reference vectors with their band index, searched in batches (see the module doc)."""

    vectors: np.ndarray  # (n, dim) float32, the search space
    bands: BandIndex  # of the reference hashes
    params: BrpParams  # the model's projections
    probes: int = 0
    scan_share: float = SCAN_SHARE  # compare more than this share: scan instead
    scan_below: int = SCAN_BELOW  # references x dims below which a scan answers
    expected_share: float | None = None  # the LSH's mean share compared (validation)
    sq: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, np.float32)
        if self.vectors.shape[0] != self.bands.size:
            raise AnnError(f"{self.vectors.shape[0]} vectors but {self.bands.size} hash rows")
        if not 0 <= self.probes <= self.bands.keys_per_band:
            raise AnnError(
                f"probes must be between 0 and keys_per_band "
                f"({self.bands.keys_per_band}), got {self.probes}"
            )
        self.sq = (self.vectors * self.vectors).sum(1)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        hashes: np.ndarray,
        params: BrpParams,
        *,
        keys_per_band: int = 1,
        probes: int = 0,
        scan_share: float = SCAN_SHARE,
        scan_below: int = SCAN_BELOW,
        expected_share: float | None = None,
    ) -> LshIndex:
        return cls(
            vectors,
            BandIndex.build(hashes, keys_per_band),
            params,
            probes,
            scan_share,
            scan_below,
            expected_share,
        )

    @property
    def scans(self) -> bool:
        """Every query is answered by the exact scan (:func:`scan_is_cheaper`)."""
        return scan_is_cheaper(
            self.expected_share,
            self.size,
            int(self.vectors.shape[1]),
            self.scan_share,
            self.scan_below,
        )

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    def candidates(self, queries: np.ndarray, probes: int | None = None) -> np.ndarray:
        """(m, n) bool candidate mask of (m, dim) search-space queries."""
        keys = probe_keys(
            self.params,
            queries,
            self.bands.keys_per_band,
            self.probes if probes is None else probes,
        )
        return self.bands.candidates(keys)

    def search(
        self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> list[Neighbours]:
        """The k nearest references of each (m, dim) search-space query, through the ladder.

        ``exclude`` holds one reference row per query (or -1) that must not be returned.
        """
        if k < 1:
            raise AnnError(f"k must be >= 1, got {k}")
        q = np.atleast_2d(np.asarray(queries, np.float32))
        if q.shape[1] != self.vectors.shape[1]:
            raise AnnError(
                f"queries have {q.shape[1]} dimensions, the index {self.vectors.shape[1]}"
            )
        ex = np.full(q.shape[0], -1, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        if ex.shape != (q.shape[0],) or (ex >= self.size).any():
            raise AnnError(f"exclude must hold one reference row (or -1) per query, got {ex.shape}")
        step = max(1, MAX_BATCH_CELLS // max(self.size, 1))
        out: list[Neighbours] = []
        for s in range(0, q.shape[0], step):
            out.extend(self._batch(q[s : s + step], k, ex[s : s + step]))
        return out

    def _batch(self, q: np.ndarray, k: int, ex: np.ndarray) -> list[Neighbours]:
        m, n = q.shape[0], self.size
        rows = np.arange(m)
        has_ex = ex >= 0
        allowed = n - has_ex.astype(np.int64)  # references each may return
        if not n or self.scans:  # one matrix product, no candidate masks at all
            d = squared_distances(q, self.vectors, self.sq)
            d[rows[has_ex], ex[has_ex]] = np.inf
            return self._answers(q, d, None, k, allowed, ["scan"] * m)
        want = np.minimum(k, allowed)
        method = np.full(m, "lsh", dtype=object)
        mask = self.candidates(q)
        mask[rows[has_ex], ex[has_ex]] = False
        count = mask.sum(1)
        short = count < want
        if short.any() and self.probes < self.bands.keys_per_band:
            wide = self.candidates(q[short], self.bands.keys_per_band)
            wide[np.flatnonzero(has_ex[short]), ex[short & has_ex]] = False
            mask[short] = wide
            count = mask.sum(1)
            method[short] = "widened"
        exact = count < want
        method[exact] = "exact"
        mask[exact] = True
        mask[rows[has_ex], ex[has_ex]] = False
        cols: np.ndarray | None = np.flatnonzero(mask.any(0))
        if cols is not None and cols.size > self.scan_share * n:
            cols = None  # most of the index: score all of it, contiguously, without a copy
        if cols is None:
            d = squared_distances(q, self.vectors, self.sq)
            d[~mask] = np.inf
        else:
            d = squared_distances(q, self.vectors[cols], self.sq[cols])
            d[~mask[:, cols]] = np.inf
        return self._answers(q, d, cols, k, mask.sum(1), list(method))

    def _answers(
        self,
        q: np.ndarray,
        d: np.ndarray,
        cols: np.ndarray | None,
        k: int,
        compared: np.ndarray,
        method: list[str],
    ) -> list[Neighbours]:
        """Each row's k nearest finite entries (columns ``cols`` of the index, None: all): the
        k + OVERSELECT nearest in float32, re-ranked in float64, cut to k."""
        top = smallest_k(d, k + OVERSELECT)
        out = []
        for i in range(q.shape[0]):
            sel = top[i][np.isfinite(d[i, top[i]])]
            idx, dist = refine(q[i], self.vectors, sel if cols is None else cols[sel])
            out.append(Neighbours(idx[:k], dist[:k], int(compared[i]), str(method[i])))
        return out


def expand_queries(queries: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Query expansion: each unit query plus its first neighbours' vectors, re-normalised.

    ``queries`` (m, dim); ``neighbours`` (m, n, dim), the n nearest references found by a
    first search. The expanded query is searched again; its answers are then ordered by their
    distance to the original query (:func:`imgsim.query.lookup.lookup`).
    """
    q = np.asarray(queries, np.float32) + np.asarray(neighbours, np.float32).sum(axis=1)
    norms = np.linalg.norm(q, axis=-1, keepdims=True)
    return np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)


@dataclass(frozen=True)
class RecallReport:
    k: int
    queries: int
    recall_at_k: float  # |LSH top-k ∩ exact top-k| / k, averaged
    candidates_share: float  # mean share of the reference set compared per query
    short_answers: int  # queries for which the LSH returned fewer than k

    def as_dict(self) -> dict[str, float | int]:
        return {
            "k": self.k,
            "queries": self.queries,
            "recall_at_k": self.recall_at_k,
            "candidates_share": self.candidates_share,
            "short_answers": self.short_answers,
        }


def leave_one_out_recall(
    ref: np.ndarray,
    ref_hashes: np.ndarray,
    sample: np.ndarray,
    k: int = 5,
    params: BrpParams | None = None,
    keys_per_band: int = 1,
    probes: int = 0,
) -> RecallReport:
    """Each sampled reference queries the rest: the LSH's top-k (no ladder) against exact.

    Without ``params`` a query's keys are its own stored hashes (Spark's OR search).
    """
    n = ref.shape[0]
    sample = np.asarray(sample, np.int64)
    if n < 2 or sample.size == 0:
        return RecallReport(k, 0, 1.0, 0.0, 0)
    bands = BandIndex.build(ref_hashes, keys_per_band)
    if params is None:
        keys = np.asarray(ref_hashes, np.int64)[sample][:, :, None, None]
        mask = bands.candidates(keys)
    else:
        mask = LshIndex(ref, bands, params, probes, 1.0, 0).candidates(ref[sample])
    mask[np.arange(sample.size), sample] = False
    d = squared_distances(ref[sample], ref)
    d[np.arange(sample.size), sample] = np.inf
    exact = smallest_k(d, k)
    d[~mask] = np.inf
    approx = smallest_k(d, k)
    recalls, short = [], 0
    for i in range(sample.size):
        got = approx[i][np.isfinite(d[i, approx[i]])]
        recalls.append(len(set(exact[i].tolist()) & set(got.tolist())) / min(k, n - 1))
        short += int(got.size < min(k, n - 1))
    return RecallReport(
        k, int(sample.size), float(np.mean(recalls)), float(np.mean(mask.sum(1) / (n - 1))), short
    )
