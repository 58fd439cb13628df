"""A learned linear map in front of the search: Fisher LDA from the labels, or PCA-whitening.

Everything the index compares lives in the projected space: the LSH is fitted there, queries
are mapped there before the lookup, and exact search for validation and evaluation runs there.

    y = l2_normalize((l2_normalize(x) - mean) @ matrix)

``matrix`` is (dim, dims). The kinds:

* ``lda``: Fisher linear discriminant analysis with shrinkage. The within-class scatter of the
  labelled references is shrunk towards a multiple of the identity,
  ``Sw_a = (1 - a) Sw + a (tr Sw / dim) I``, and the map keeps the ``dims`` directions that
  maximise between-class over within-class scatter (generalised eigenproblem, solved through a
  whitening of ``Sw_a`` and a thin SVD of the whitened class means). ``a`` and ``dims`` are
  chosen by cross-validation inside the reference set (label precision@k of held-out references
  against the rest; see :func:`choose`), never on queries.
* ``whiten``: PCA-whitening of all references (labels not needed), regularised the same way.
* ``none``: the identity (vectors only L2-normalised): versions without a projection.

The statistics the fit needs (counts, sums and scatter, per class and overall) are
:class:`Stats`. They add up (:meth:`Stats.merge`), so Spark computes them partition by partition
and the driver only solves the small eigenproblem (``spark_jobs/learn_projection.py``); NumPy
computes the same from arrays (:func:`stats_from_arrays`) for tests and evaluation.

No torch, pyspark or PIL here: the module is imported by the query paths and the Spark job.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imgsim.config import PROJECTIONS, setting_default
from imgsim.errors import PermanentError

log = logging.getLogger(__name__)

KINDS = PROJECTIONS
#: the projection's files inside a version directory
PROJECTION_DIR = "projection"
MATRIX_FILE = "projection.npz"
#: shrinkage values and dimensions the cross-validation tries for ``lda``
LDA_SHRINKAGES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
LDA_DIMS = (32, 64, 128, 256)
#: whitening (no labels to cross-validate with): fixed regularisation and dimensions
WHITEN_SHRINKAGE = 0.1
WHITEN_DIMS = 256
#: whitening keeps at most (references - 1) / 4 dimensions (n points whitened in n - 1
#: dimensions become equidistant), and auto does not whiten fewer references than this
MIN_WHITEN_REFERENCES = 100
#: ``auto`` takes ``lda`` when at least this share of the references is labelled ...
MIN_LABEL_COVERAGE: float = setting_default("projection_min_coverage")
#: ... by at least this many classes with at least two labelled references each
MIN_LDA_CLASSES = 2
#: labelled references the cross-validation uses (at most; a seeded sample), in the task and
#: in spark_jobs/learn_projection.py
CV_SAMPLE = 20_000


class ProjectionError(ValueError, PermanentError):
    """A projection cannot be learned or applied; the message says why and what to do."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def check_kind(value: str, source: str = "projection") -> str:
    from imgsim.config import check_setting

    return check_setting("projection", value, source)


# -- sufficient statistics -------------------------------------------------------------------------


@dataclass
class Stats:
    """Counts, sums and scatter of unit vectors: overall and per labelled class. They add up."""

    dim: int
    n: int = 0
    total_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    total_outer: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    labelled_outer: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    class_counts: dict[int, int] = field(default_factory=dict)
    class_sums: dict[int, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.total_sum.size == 0:
            self.total_sum = np.zeros(self.dim)
            self.total_outer = np.zeros((self.dim, self.dim))
            self.labelled_outer = np.zeros((self.dim, self.dim))

    def merge(self, other: Stats) -> Stats:
        if other.dim != self.dim:
            raise ProjectionError(
                f"cannot merge statistics of {self.dim}-d and {other.dim}-d "
                "vectors: the embeddings have mixed dimensions"
            )
        counts = dict(self.class_counts)
        sums = {c: s.copy() for c, s in self.class_sums.items()}
        for c, n in other.class_counts.items():
            counts[c] = counts.get(c, 0) + n
            sums[c] = sums[c] + other.class_sums[c] if c in sums else other.class_sums[c].copy()
        return Stats(
            self.dim,
            self.n + other.n,
            self.total_sum + other.total_sum,
            self.total_outer + other.total_outer,
            self.labelled_outer + other.labelled_outer,
            counts,
            sums,
        )

    @property
    def labelled(self) -> int:
        return int(sum(self.class_counts.values()))

    @property
    def usable_classes(self) -> int:
        """Classes with at least two labelled references (the ones that carry within-scatter)."""
        return sum(1 for n in self.class_counts.values() if n >= 2)


def stats_from_arrays(x: np.ndarray, labels: np.ndarray | None = None) -> Stats:
    """Statistics of the rows of ``x`` (L2-normalised here); ``labels`` < 0 or None: unlabelled."""
    u = l2_normalize(x).astype(np.float64)
    n, dim = u.shape
    y = np.full(n, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    if y.shape != (n,):
        raise ProjectionError(f"{n} vectors but {y.shape} labels")
    lab = y >= 0
    ul = u[lab]
    counts: dict[int, int] = {}
    sums: dict[int, np.ndarray] = {}
    if lab.any():
        classes, inverse = np.unique(y[lab], return_inverse=True)
        per = np.zeros((classes.size, dim))
        np.add.at(per, inverse, ul)
        cnt = np.bincount(inverse, minlength=classes.size)
        counts = {int(c): int(k) for c, k in zip(classes, cnt, strict=True)}
        sums = {int(c): per[i] for i, c in enumerate(classes)}
    return Stats(dim, n, u.sum(0), u.T @ u, ul.T @ ul, counts, sums)


# -- the map ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    kind: str  # none, whiten, lda
    mean: np.ndarray  # (dim,)
    matrix: np.ndarray  # (dim, dims)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dims(self) -> int:
        return int(self.matrix.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Raw (or unit) vectors -> unit vectors in the projected space, float32."""
        u = l2_normalize(np.atleast_2d(x))
        if u.shape[1] != self.dim:
            raise ProjectionError(
                f"vectors have {u.shape[1]} dimensions, the {self.kind} "
                f"projection expects {self.dim}"
            )
        if self.kind == "none":
            return u
        y = (u.astype(np.float64) - self.mean) @ self.matrix
        return l2_normalize(y)

    # -- storage ---------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean.astype(np.float64), matrix=self.matrix.astype(np.float64))
        return buf.getvalue()

    def save(self, directory: Path) -> dict[str, Any]:
        """Write ``projection.npz`` into ``directory`` (atomically); the manifest entry."""
        from imgsim.fsutil import atomic_open

        if self.kind == "none":
            return {"kind": "none", "dim": self.dim, "dims": self.dims, "params": self.params}
        data = self.to_bytes()
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_open(directory / MATRIX_FILE, "wb") as fh:
            fh.write(data)
        return {
            "kind": self.kind,
            "dim": self.dim,
            "dims": self.dims,
            "file": f"{PROJECTION_DIR}/{MATRIX_FILE}",
            "sha256": hashlib.sha256(data).hexdigest(),
            "params": self.params,
        }


def identity(dim: int) -> Projection:
    return Projection("none", np.zeros(dim), np.eye(dim), {})


def load(version_dir: Path, entry: dict[str, Any] | None) -> Projection | None:
    """The projection a manifest's ``projection`` entry names (None: a version without one)."""
    if not entry or entry.get("kind", "none") == "none":
        return None
    path = version_dir / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ProjectionError(f"{path}: the version's projection file is missing") from exc
    digest = hashlib.sha256(data).hexdigest()
    if entry.get("sha256") and digest != entry["sha256"]:
        raise ProjectionError(
            f"{path}: sha256 {digest} differs from the manifest's "
            f"{entry['sha256']}: the version is damaged"
        )
    with np.load(io.BytesIO(data)) as npz:
        return Projection(entry["kind"], npz["mean"], npz["matrix"], entry.get("params", {}))


def _eigh_desc(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh((m + m.T) / 2.0)
    order = np.argsort(vals)[::-1]
    return np.maximum(vals[order], 0.0), vecs[:, order]


@dataclass(frozen=True)
class _LdaBasis:
    """What every (shrinkage, dims) of one set of statistics shares: one eigh of Sw."""

    mean: np.ndarray
    within_vals: np.ndarray
    within_vecs: np.ndarray
    between: np.ndarray  # (dim, classes) sqrt(n_c / N) (mu_c - mu)
    classes: int
    labelled: int

    @classmethod
    def of(cls, stats: Stats) -> _LdaBasis:
        classes = sorted(c for c, n in stats.class_counts.items() if n >= 1)
        nl = stats.labelled
        if stats.usable_classes < MIN_LDA_CLASSES or nl <= len(classes):
            raise ProjectionError(
                f"LDA needs at least {MIN_LDA_CLASSES} classes with two or more labelled "
                f"references; the index has {stats.usable_classes} such classes "
                f"({nl} labelled references in {len(classes)} classes)"
            )
        sums = np.stack([stats.class_sums[c] for c in classes])
        counts = np.array([stats.class_counts[c] for c in classes], np.float64)
        mu_l = sums.sum(0) / nl
        within = stats.labelled_outer - (sums.T / counts) @ sums
        within /= max(nl - len(classes), 1)
        vals, vecs = _eigh_desc(within)
        means = sums / counts[:, None]
        between = ((means - mu_l) * np.sqrt(counts / nl)[:, None]).T
        return cls(stats.total_sum / max(stats.n, 1), vals, vecs, between, len(classes), nl)

    def projection(self, shrinkage: float, dims: int) -> Projection:
        vals = (1.0 - shrinkage) * self.within_vals + shrinkage * float(self.within_vals.mean())
        vals = np.maximum(vals, 1e-12)
        g = (self.within_vecs.T @ self.between) / np.sqrt(vals)[:, None]  # whitened means
        left, sing, _ = np.linalg.svd(g, full_matrices=False)
        keep = int(
            min(
                dims,
                self.classes - 1,
                int((sing > 1e-9 * sing[0]).sum()) if sing.size and sing[0] > 0 else 0,
            )
        )
        if keep < 1:
            raise ProjectionError(
                "the labelled classes have the same mean vector: LDA finds "
                "no direction that separates them"
            )
        matrix = (self.within_vecs / np.sqrt(vals)[None, :]) @ left[:, :keep]
        params = {
            "shrinkage": float(shrinkage),
            "dims_requested": int(dims),
            "classes": self.classes,
            "labelled_images": self.labelled,
        }
        return Projection("lda", self.mean, matrix, params)


def fit_lda(stats: Stats, shrinkage: float, dims: int) -> Projection:
    """Fisher LDA with shrinkage ``a`` in [0, 1), at most ``dims`` (<= classes - 1) dimensions."""
    if not 0.0 <= shrinkage < 1.0:
        raise ProjectionError(f"LDA shrinkage must be in [0, 1), got {shrinkage}")
    return _LdaBasis.of(stats).projection(shrinkage, dims)


def fit_whiten(
    stats: Stats, dims: int = WHITEN_DIMS, shrinkage: float = WHITEN_SHRINKAGE
) -> Projection:
    """PCA-whitening of all references: the ``dims`` leading components, regularised."""
    if stats.n < 2:
        raise ProjectionError(f"whitening needs at least 2 references, the index has {stats.n}")
    mean = stats.total_sum / stats.n
    cov = stats.total_outer / stats.n - np.outer(mean, mean)
    vals, vecs = _eigh_desc(cov)
    keep = int(min(dims, stats.dim, max(1, (stats.n - 1) // 4)))
    reg = (1.0 - shrinkage) * vals[:keep] + shrinkage * float(vals.mean())
    matrix = vecs[:, :keep] / np.sqrt(np.maximum(reg, 1e-12))[None, :]
    return Projection(
        "whiten",
        mean,
        matrix,
        {"shrinkage": float(shrinkage), "dims_requested": int(dims), "images": int(stats.n)},
    )


# -- choosing by cross-validation --------------------------------------------------------------


def label_precision(
    queries: np.ndarray, q_labels: np.ndarray, refs: np.ndarray, r_labels: np.ndarray, k: int = 5
) -> tuple[float, float]:
    """(precision@k, hit@1) of exact search of unit ``queries`` among unit ``refs``."""
    m = label_metrics(queries, q_labels, refs, r_labels, k)
    return m["precision"], m["hit_at_1"]


def label_metrics(
    queries: np.ndarray, q_labels: np.ndarray, refs: np.ndarray, r_labels: np.ndarray, k: int = 5
) -> dict[str, float]:
    """precision@k, hit@1 and hit@k of exact search of unit ``queries`` among unit ``refs``
    (nearest = largest inner product)."""
    if len(queries) == 0 or len(refs) == 0:
        return {"precision": 0.0, "hit_at_1": 0.0, "hit_at_k": 0.0}
    sims = queries @ refs.T
    kk = min(k, refs.shape[0])
    top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    order = np.take_along_axis(sims, top, 1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, 1)
    same = r_labels[top] == q_labels[:, None]
    return {
        "precision": float(same.sum(1).mean() / k),
        "hit_at_1": float(same[:, 0].mean()),
        "hit_at_k": float(same.any(axis=1).mean()),
    }


def cv_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per row, stratified by label (each class spread over the folds)."""
    rng = np.random.default_rng(seed)
    out = np.empty(labels.shape[0], np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        out[rows] = (np.arange(rows.size) + int(rng.integers(folds))) % folds
    return out


@dataclass(frozen=True)
class Choice:
    projection: Projection
    reason: str
    coverage: dict[str, Any]
    cv: list[dict[str, Any]]  # one row per candidate: kind, params, precision, hit@1
    seconds: float
    requested: str = "auto"  # the kind asked for (auto, none, whiten, lda)
    min_coverage: float = MIN_LABEL_COVERAGE

    def manifest_entry(self, saved: dict[str, Any]) -> dict[str, Any]:
        return {
            **saved,
            "requested": self.requested,
            "min_coverage": self.min_coverage,
            "reason": self.reason,
            "coverage": self.coverage,
            "cross_validation": self.cv,
            "seconds": round(self.seconds, 3),
        }


def coverage(stats: Stats) -> dict[str, Any]:
    return {
        "images": int(stats.n),
        "labelled_images": stats.labelled,
        "share": round(stats.labelled / stats.n, 4) if stats.n else 0.0,
        "classes": len(stats.class_counts),
        "classes_with_two_or_more": stats.usable_classes,
    }


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    *,
    folds: int,
    k: int,
    seed: int,
    shrinkages: tuple[float, ...],
    dims: tuple[int, ...],
) -> dict[tuple[str, float, int], list[tuple[float, float]]]:
    """(precision@k, hit@1) per fold of ``none``, ``whiten`` and LDA for each (shrinkage,
    dims), on the folds where LDA can be fitted (so every candidate is scored on the same ones).

    Per fold: one eigendecomposition of the training folds' within-class scatter, one thin
    SVD per shrinkage; each smaller ``dims`` is a prefix of the largest's columns.
    """
    fold = cv_folds(y, folds, seed)
    scores: dict[tuple[str, float, int], list[tuple[float, float]]] = {}
    for f in range(folds):
        train, held = fold != f, fold == f
        if not held.any() or not train.any():
            continue
        tstats = stats_from_arrays(x[train], y[train])
        try:
            basis = _LdaBasis.of(tstats)
        except ProjectionError:
            continue
        scores.setdefault(("none", 0.0, x.shape[1]), []).append(
            label_precision(x[held], y[held], x[train], y[train], k)
        )
        white = fit_whiten(tstats)
        scores.setdefault(("whiten", WHITEN_SHRINKAGE, white.dims), []).append(
            label_precision(white.apply(x[held]), y[held], white.apply(x[train]), y[train], k)
        )
        for a in shrinkages:
            proj = basis.projection(a, max(dims))
            zt = (x[train].astype(np.float64) - proj.mean) @ proj.matrix
            zh = (x[held].astype(np.float64) - proj.mean) @ proj.matrix
            for d in dims:
                scores.setdefault(("lda", a, d), []).append(
                    label_precision(
                        l2_normalize(zh[:, :d]), y[held], l2_normalize(zt[:, :d]), y[train], k
                    )
                )
    return scores


def choose(stats: Stats, kind: str = "auto", **kwargs: Any) -> Choice:
    """:func:`_choose`, with the request recorded in the choice.

    The eigenproblems run with one BLAS thread: on a machine whose cores are busy (Spark,
    Airflow, other tasks), OpenBLAS's threads oversubscribe them and a 1,280 x 1,280 eigh took
    12 s instead of 0.5 s here.
    """
    from dataclasses import replace

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        choice = _choose(stats, kind, **kwargs)
    return replace(
        choice,
        requested=check_kind(kind),
        min_coverage=float(kwargs.get("min_coverage", MIN_LABEL_COVERAGE)),
    )


def _choose(
    stats: Stats,
    kind: str = "auto",
    *,
    cv_vectors: np.ndarray | None = None,
    cv_labels: np.ndarray | None = None,
    folds: int = 5,
    k: int = 5,
    seed: int = 42,
    shrinkages: tuple[float, ...] = LDA_SHRINKAGES,
    dims: tuple[int, ...] = LDA_DIMS,
    min_coverage: float = MIN_LABEL_COVERAGE,
) -> Choice:
    """The projection of ``kind`` (auto: see below) for the references ``stats`` describes.

    ``auto`` takes ``lda`` when at least ``min_coverage`` of the references are labelled by
    at least two classes of two or more images, else ``whiten`` (else ``none``). For ``lda``,
    ``cv_vectors``/``cv_labels`` (labelled references, all or a stratified sample) choose the
    shrinkage and dimensions: each candidate is fitted on ``folds - 1`` folds and its held-out
    references query the rest (label precision@k). The identity and whitening are scored the
    same way; ``auto`` keeps LDA only if it beats both, so labels that do not help never make
    the index worse. The chosen map is then refitted on all of ``stats``.
    """
    t0 = time.perf_counter()
    kind = check_kind(kind)
    cov = coverage(stats)
    cv: list[dict[str, Any]] = []
    if kind == "none":
        return Choice(identity(stats.dim), "asked for none", cov, cv, time.perf_counter() - t0)
    lda_ok = (
        stats.usable_classes >= MIN_LDA_CLASSES
        and stats.n > 0
        and stats.labelled / stats.n >= min_coverage
    )
    why_not = (
        f"labels cover {stats.labelled} of {stats.n} references "
        f"({100 * cov['share']:.0f}%, {stats.usable_classes} classes with 2+ images); "
        f"lda needs {100 * min_coverage:.0f}% and {MIN_LDA_CLASSES} such classes"
    )
    if kind == "lda" and not lda_ok:
        raise ProjectionError(
            f"projection lda asked for, but {why_not}: label more references "
            "(IMGSIM_LABELS_URL) or use auto/whiten"
        )
    if kind == "whiten" or (kind == "auto" and not lda_ok):
        if stats.n < (3 if kind == "whiten" else MIN_WHITEN_REFERENCES):
            return Choice(
                identity(stats.dim),
                f"{why_not}; too few references to learn a "
                f"whitening from ({stats.n}, fewer than {MIN_WHITEN_REFERENCES}): "
                "none",
                cov,
                cv,
                time.perf_counter() - t0,
            )
        reason = "asked for whiten" if kind == "whiten" else f"{why_not}: whiten"
        return Choice(fit_whiten(stats), reason, cov, cv, time.perf_counter() - t0)

    if cv_vectors is None or cv_labels is None:
        raise ProjectionError("lda needs labelled vectors to cross-validate its parameters")
    x = l2_normalize(cv_vectors)
    y = np.asarray(cv_labels, np.int64)
    scores = cross_validate(x, y, folds=folds, k=k, seed=seed, shrinkages=shrinkages, dims=dims)
    for (name, a, d), vals in scores.items():
        p, h = np.mean(vals, axis=0)
        cv.append(
            {
                "kind": name,
                "shrinkage": a,
                "dims": d,
                "folds": len(vals),
                f"precision_at_{k}": round(float(p), 4),
                "hit_at_1": round(float(h), 4),
            }
        )
    pk = f"precision_at_{k}"
    ldas = [r for r in cv if r["kind"] == "lda"]
    if not ldas:
        why = (
            "cross-validation could not fit LDA on any fold: too few labelled references per class"
        )
        if kind == "lda":
            raise ProjectionError(f"projection lda asked for, but {why}")
        if stats.n < MIN_WHITEN_REFERENCES:
            return Choice(
                identity(stats.dim),
                f"{why}; too few references to whiten: none",
                cov,
                cv,
                time.perf_counter() - t0,
            )
        return Choice(fit_whiten(stats), f"{why}: whiten", cov, cv, time.perf_counter() - t0)
    best = max(ldas, key=lambda r: (r[pk] + r["hit_at_1"], r[pk], -r["dims"]))
    baseline = max((r for r in cv if r["kind"] != "lda"), key=lambda r: r[pk])
    if kind == "auto" and best[pk] <= baseline[pk]:
        reason = (
            f"cross-validated lda (precision@{k} {best[pk]:.3f}) does not beat "
            f"{baseline['kind']} ({baseline[pk]:.3f}): {baseline['kind']}"
        )
        proj = identity(stats.dim) if baseline["kind"] == "none" else fit_whiten(stats)
        return Choice(proj, reason, cov, cv, time.perf_counter() - t0)
    proj = fit_lda(stats, best["shrinkage"], best["dims"])
    proj.params.update(
        cv_precision_at_k=best[pk],
        cv_hit_at_1=best["hit_at_1"],
        cv_baseline=f"{baseline['kind']} {baseline[pk]:.3f}",
        cv_folds=folds,
    )
    reason = (
        f"labels cover {100 * cov['share']:.0f}% of the references "
        f"({cov['classes']} classes): lda, shrinkage {best['shrinkage']} and "
        f"{proj.dims} dims by {folds}-fold cross-validation (precision@{k} "
        f"{best[pk]:.3f} vs {baseline['kind']} {baseline[pk]:.3f})"
    )
    return Choice(proj, reason, cov, cv, time.perf_counter() - t0)


#: the fit job's auto-tuner grid (spark_jobs/fit_lsh.py --tune-keys-per-band / --tune-probes)
TUNE_KEYS_PER_BAND = (1, 2, 4, 8)
TUNE_PROBES = (0, 1, 2)


def holdout_tuning(
    choice: Choice,
    x: np.ndarray,
    labels: np.ndarray,
    *,
    target: float,
    k: int = 5,
    seed: int = 42,
    max_queries: int = 200,
    max_refs: int = 4000,
) -> dict[str, Any] | None:
    """LSH parameters for the learned space, tuned on references the map has not seen.

    A learned map pulls its own training vectors together: tuned leave-one-out on the
    references it was fitted on, the LSH reaches its recall target there but not for new
    queries (on the sample, 0.69 recall@5 for a 0.95 target). So the same kind is refitted
    without one fold (labelled: a stratified fold; else a seeded 20%), and the tuner
    (:func:`imgsim.ann.tuning.tune`) measures that fold, projected, against the rest. The fit job
    uses the chosen keys, probes and width factor (times the scale of its own data). None for
    ``none`` (nothing learned, no gap) or too few vectors.
    """
    from imgsim.ann.tuning import TuningError, tune

    proj = choice.projection
    if proj.kind == "none" or len(x) < 20:
        return None
    y = np.asarray(labels, np.int64)
    rng = np.random.default_rng(seed)
    held = cv_folds(y, 5, seed) == 0 if proj.kind == "lda" else rng.random(len(x)) < 0.2
    train = np.flatnonzero(~held)
    queries = np.flatnonzero(held)
    if len(train) > max_refs:
        train = np.sort(rng.choice(train, max_refs, replace=False))
    if len(queries) > max_queries:
        queries = np.sort(rng.choice(queries, max_queries, replace=False))
    stats = stats_from_arrays(x[train], y[train])
    try:
        if proj.kind == "lda":
            part = fit_lda(stats, proj.params["shrinkage"], proj.dims)
        else:
            part = fit_whiten(stats, proj.dims, proj.params.get("shrinkage", WHITEN_SHRINKAGE))
        result = tune(
            part.apply(x[train]),
            part.apply(x[queries]),
            target=target,
            k=k,
            seed=seed,
            keys_per_band=TUNE_KEYS_PER_BAND,
            probes=TUNE_PROBES,
        )
    except (ProjectionError, TuningError) as exc:
        log.warning("held-out LSH tuning skipped: %s", exc)
        return None
    return {
        **result.as_dict(),
        "method": f"held-out: {len(queries)} references projected "
        f"by the {proj.kind} map refitted on {len(train)} "
        "others, searched among those",
    }


#: the learned projection handed from the learn step to the fit: the choice as JSON + the matrix
CHOICE_FILE = "projection.json"


def write_choice(
    choice: Choice, out_dir: Path, lsh_tuning: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Save a learned projection into ``out_dir`` (matrix first, its JSON entry last), with
    the held-out LSH tuning (:func:`holdout_tuning`) for the fit job."""
    from imgsim.fsutil import atomic_write_json

    entry = choice.manifest_entry(choice.projection.save(out_dir))
    if lsh_tuning is not None:
        entry["lsh_tuning"] = lsh_tuning
    atomic_write_json(out_dir / CHOICE_FILE, entry)
    return entry


def read_choice(out_dir: Path) -> tuple[dict[str, Any], Projection | None]:
    """What :func:`write_choice` saved: (manifest entry, projection or None for ``none``)."""
    from imgsim.fsutil import read_json

    path = out_dir / CHOICE_FILE
    if not path.exists():
        raise ProjectionError(
            f"{path}: no learned projection; the learn_projection step did not complete"
        )
    entry: dict[str, Any] = read_json(path)
    if entry["kind"] == "none":
        return entry, None
    return entry, load(out_dir.parent, {**entry, "file": f"{out_dir.name}/{MATRIX_FILE}"})


def describe(entry: dict[str, Any] | None) -> str:
    """One line for the CLI and the UI."""
    if not entry or entry.get("kind", "none") == "none":
        return "none"
    return f"{entry['kind']} {entry.get('dim')}->{entry.get('dims')}d"
