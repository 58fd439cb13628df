"""LSH auto-tuner: recall@k against exact search as a function of the candidates compared.

On a sample of the reference set (unit vectors) and a set of queries, the tuner computes each
query's exact top-k, then, for a grid of LSH parameters, which references would be candidates
(compared exactly) and so the recall@k the LSH reaches and the share of the index it compares.
It picks the cheapest configuration (fewest candidates) that reaches the target recall; if none
does, the one with the highest recall, flagged ``target_met: False``.

The LSH family is Spark's BucketedRandomProjectionLSH (``floor(r . x / w)`` per random unit
vector r), generalised as in :mod:`imgsim.ann.brp`: ``tables`` bands of ``keys_per_band``
consecutive projections (a band matches when all its keys match: AND), a candidate matches at
least one band (OR), and ``probes`` extra keys per band visit the neighbouring bucket of the
projections nearest a bucket boundary (multi-probe). ``keys_per_band=1, probes=0`` is plain
Spark BRP with ``numHashTables=tables``.

Recall needs no ranking per configuration: with candidates C and the exact top-k E (ordered by
distance, then index), the LSH's top-k among C holds exactly ``|C ∩ E|`` members of E, because
fewer than k references precede a member of E. Pure NumPy, no Spark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imgsim.ann.bands import BandIndex
from imgsim.ann.brp import AnnError, probe_keys_of, random_unit_vectors
from imgsim.ann.search import smallest_k, squared_distances
from imgsim.config import setting_default

#: Defaults of the grid: bucket widths as multiples of the data's scale
#: (median pair distance / sqrt(dim)), band counts, keys per band, probes per band.
DEFAULT_WIDTH_FACTORS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_TABLES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_KEYS_PER_BAND: tuple[int, ...] = (1,)
DEFAULT_PROBES: tuple[int, ...] = (0,)
MAX_SAMPLE = 4000


class TuningError(AnnError):
    """Bad input to the tuner (the message says which)."""


@dataclass(frozen=True)
class LshConfig:
    tables: int  # bands (Spark numHashTables when keys_per_band == 1)
    keys_per_band: int  # projections ANDed into one band key
    bucket_length: float  # w
    probes: int = 0  # extra keys looked up per band (multi-probe)

    @property
    def projections(self) -> int:
        """Projections hashed per vector (numHashTables of the underlying Spark model)."""
        return self.tables * self.keys_per_band

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": self.tables,
            "keys_per_band": self.keys_per_band,
            "bucket_length": self.bucket_length,
            "probes": self.probes,
            "projections": self.projections,
        }


@dataclass(frozen=True)
class CurvePoint:
    config: LshConfig
    recall_at_k: float  # mean |LSH top-k ∩ exact top-k| / |exact top-k|
    candidates_share: float  # mean share of the (non-excluded) sample compared per query
    width_factor: float  # bucket_length / scale

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.config.as_dict(),
            "width_factor": self.width_factor,
            "recall_at_k": round(self.recall_at_k, 6),
            "candidates_share": round(self.candidates_share, 6),
        }


@dataclass(frozen=True)
class TuningResult:
    target: float
    k: int
    sample_size: int
    queries: int
    scale: float  # median pair distance / sqrt(dim) of the sample
    curve: list[CurvePoint]
    choice: CurvePoint
    target_met: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "k": self.k,
            "sample_size": self.sample_size,
            "queries": self.queries,
            "scale": self.scale,
            "target_met": self.target_met,
            "choice": self.choice.as_dict(),
            "curve": [p.as_dict() for p in self.curve],
        }


# -- checks and helpers ---------------------------------------------------------------------------


def check_target(target: float) -> float:
    """A recall target must be a number in (0, 1]."""
    try:
        value = float(target)
    except (TypeError, ValueError) as exc:
        raise TuningError(f"target recall must be a number in (0, 1], got {target!r}") from exc
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise TuningError(f"target recall must be in (0, 1], got {target!r}")
    return value


def _check_inputs(
    ref: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None
) -> np.ndarray:
    if ref.ndim != 2 or queries.ndim != 2 or ref.shape[1] != queries.shape[1]:
        raise TuningError(
            f"reference {ref.shape} and queries {queries.shape} must be 2-d with "
            "the same number of columns"
        )
    if ref.shape[0] < 2 or queries.shape[0] < 1:
        raise TuningError(
            f"need at least 2 references and 1 query, got {ref.shape[0]} and {queries.shape[0]}"
        )
    if k < 1:
        raise TuningError(f"k must be >= 1, got {k}")
    if not (np.isfinite(ref).all() and np.isfinite(queries).all()):
        raise TuningError("vectors contain NaN or infinite values")
    ex = (
        np.full(queries.shape[0], -1, np.int64)
        if exclude is None
        else np.asarray(exclude, np.int64)
    )
    if ex.shape != (queries.shape[0],) or (ex >= ref.shape[0]).any():
        raise TuningError(f"exclude must hold one reference row (or -1) per query, got {ex.shape}")
    return ex


def pair_distances(x: np.ndarray, seed: int = 0, pairs: int = 8000) -> np.ndarray:
    """float64 L2 distances of up to ``pairs`` seeded random distinct pairs of rows."""
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, x.shape[0], size=(2, pairs))
    keep = i != j
    return np.linalg.norm(x[i[keep]].astype(np.float64) - x[j[keep]], axis=1)


def median_pair_distance(x: np.ndarray, seed: int = 0, pairs: int = 8000) -> float:
    """Median L2 distance between random distinct pairs of rows."""
    d = pair_distances(x, seed, pairs)
    if not len(d):
        return 1.0
    return float(np.median(d)) or 1.0


def data_scale(x: np.ndarray, seed: int = 0) -> float:
    """median pair distance / sqrt(dim): a projection's typical spread between two rows."""
    return median_pair_distance(x, seed) / math.sqrt(x.shape[1])


def exact_top_k(
    ref: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """((m, k) exact neighbour rows ordered by distance then index, (m, n) squared distances).

    Excluded entries get an infinite distance; a row with fewer than k allowed references is
    padded with -1.
    """
    ex = _check_inputs(ref, queries, k, exclude)
    d = squared_distances(queries, ref)
    rows = np.flatnonzero(ex >= 0)
    d[rows, ex[rows]] = np.inf
    kk = min(k, ref.shape[0])
    order = smallest_k(d, kk)
    top = np.where(np.isfinite(np.take_along_axis(d, order, 1)), order, -1)
    if kk < k:
        top = np.concatenate([top, np.full((top.shape[0], k - kk), -1)], axis=1)
    return top, d


# -- the curve ------------------------------------------------------------------------------------


def evaluate_family(
    ref_proj: np.ndarray,
    query_proj: np.ndarray,
    exact: np.ndarray,
    allowed: np.ndarray,
    tables: Sequence[int],
    keys_per_band: int,
    probes: int,
) -> list[tuple[int, float, float]]:
    """(tables, recall, share) for each band count, on projections already divided by w.

    Band b uses projection columns ``[b*K, (b+1)*K)``, so the candidate sets of fewer bands
    are subsets of those of more (one pass, cumulative OR).
    """
    m, n = query_proj.shape[0], ref_proj.shape[0]
    index = BandIndex.build(np.floor(ref_proj).astype(np.int64), keys_per_band)
    q_keys = probe_keys_of(query_proj, keys_per_band, probes)
    mask = np.zeros((m, n), bool)
    valid = exact >= 0
    want = np.maximum(valid.sum(1), 1)
    rows = np.arange(m)[:, None]
    n_allowed = np.maximum(allowed.sum(1), 1)
    out = []
    wanted = sorted(set(tables))
    for b in range(wanted[-1]):
        index.band_mask(b, q_keys[:, b], out=mask)
        if b + 1 in wanted:
            live = mask & allowed
            hits = (live[rows, np.maximum(exact, 0)] & valid).sum(1)
            out.append(
                (b + 1, float((hits / want).mean()), float((live.sum(1) / n_allowed).mean()))
            )
    return out


def evaluate_grid(
    ref: np.ndarray,
    queries: np.ndarray,
    *,
    k: int = 5,
    width_factors: Sequence[float] = DEFAULT_WIDTH_FACTORS,
    tables: Sequence[int] = DEFAULT_TABLES,
    keys_per_band: Sequence[int] = DEFAULT_KEYS_PER_BAND,
    probes: Sequence[int] = DEFAULT_PROBES,
    seed: int = 42,
    exclude: np.ndarray | None = None,
    scale: float | None = None,
) -> tuple[list[CurvePoint], float]:
    """Recall@k and candidate share for every grid point; also returns the scale used."""
    ex = _check_inputs(ref, queries, k, exclude)
    if not tables or min(tables) < 1:
        raise TuningError(f"tables must be >= 1, got {list(tables)}")
    if not width_factors or min(width_factors) <= 0:
        raise TuningError(f"width factors must be > 0, got {list(width_factors)}")
    if not keys_per_band or min(keys_per_band) < 1 or not probes or min(probes) < 0:
        raise TuningError(
            f"keys_per_band must be >= 1 and probes >= 0, got {list(keys_per_band)}, {list(probes)}"
        )
    scale = data_scale(ref, seed) if scale is None else scale
    exact, _ = exact_top_k(ref, queries, k, ex)
    allowed = np.ones((queries.shape[0], ref.shape[0]), bool)
    rows = np.flatnonzero(ex >= 0)
    allowed[rows, ex[rows]] = False
    most = max(tables) * max(keys_per_band)
    r = random_unit_vectors(most, ref.shape[1], seed)
    ref_dot = ref.astype(np.float64) @ r.T
    q_dot = queries.astype(np.float64) @ r.T
    curve: list[CurvePoint] = []
    for kb in sorted(set(keys_per_band)):
        for t in sorted({p for p in probes if p <= kb}):
            for f in sorted(set(width_factors)):
                w = f * scale
                cols = max(tables) * kb
                for nt, rec, share in evaluate_family(
                    ref_dot[:, :cols] / w, q_dot[:, :cols] / w, exact, allowed, tables, kb, t
                ):
                    curve.append(CurvePoint(LshConfig(nt, kb, w, t), rec, share, f))
    return curve, scale


def choose(curve: Sequence[CurvePoint], target: float) -> tuple[CurvePoint, bool]:
    """Cheapest point reaching ``target`` (then fewer lookups); else the highest recall."""
    check_target(target)
    if not curve:
        raise TuningError("empty curve: nothing to choose from")
    met = [p for p in curve if p.recall_at_k >= target - 1e-12]
    if met:
        best = min(
            met,
            key=lambda p: (
                p.candidates_share,
                p.config.tables * (1 + p.config.probes),
                p.config.projections,
                -p.recall_at_k,
            ),
        )
        return best, True
    return max(curve, key=lambda p: (p.recall_at_k, -p.candidates_share)), False


def pareto_front(curve: Sequence[CurvePoint]) -> list[CurvePoint]:
    """Points no other point beats on both recall and share, by increasing share."""
    front: list[CurvePoint] = []
    for p in sorted(curve, key=lambda p: (p.candidates_share, -p.recall_at_k)):
        if not front or p.recall_at_k > front[-1].recall_at_k:
            front.append(p)
    return front


def tune(
    ref: np.ndarray,
    queries: np.ndarray | None = None,
    *,
    target: float = setting_default("target_recall"),
    k: int = 5,
    exclude: np.ndarray | None = None,
    max_queries: int = 200,
    seed: int = 42,
    width_factors: Sequence[float] = DEFAULT_WIDTH_FACTORS,
    tables: Sequence[int] = DEFAULT_TABLES,
    keys_per_band: Sequence[int] = DEFAULT_KEYS_PER_BAND,
    probes: Sequence[int] = DEFAULT_PROBES,
) -> TuningResult:
    """Tune on ``ref`` (unit vectors). Without ``queries``, a seeded sample of ``ref`` queries
    the rest (leave-one-out)."""
    target = check_target(target)
    ref = np.asarray(ref, np.float32)
    if queries is None:
        if ref.ndim != 2 or ref.shape[0] < 2:
            raise TuningError(f"need at least 2 reference vectors, got shape {ref.shape}")
        pick = np.sort(np.random.default_rng(seed).permutation(ref.shape[0])[:max_queries])
        queries, exclude = ref[pick], pick
    queries = np.asarray(queries, np.float32)
    curve, scale = evaluate_grid(
        ref,
        queries,
        k=k,
        width_factors=width_factors,
        tables=tables,
        keys_per_band=keys_per_band,
        probes=probes,
        seed=seed,
        exclude=exclude,
    )
    best, met = choose(curve, target)
    return TuningResult(
        target, k, int(ref.shape[0]), int(queries.shape[0]), scale, curve, best, met
    )


def sample_rows(n: int, size: int = MAX_SAMPLE, seed: int = 42) -> np.ndarray:
    """A seeded, sorted sample of at most ``size`` row indices out of ``n``."""
    if size < 2:
        raise TuningError(f"sample size must be >= 2, got {size}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])
