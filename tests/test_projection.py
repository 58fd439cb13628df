"""imgsim.ann.projection: LDA with shrinkage, whitening, the auto choice, storage; Spark stats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imgsim.ann import projection as P

DIM = 24


def clustered(
    classes: int = 8, per_class: int = 10, seed: int = 0, noise_dims: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Classes that differ in a few directions, drowned in large class-independent noise in
    others: raw nearest neighbours are mostly noise, a discriminant map finds the classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, DIM)) * 1.5
    centres[:, DIM - noise_dims :] = 0
    y = np.repeat(np.arange(classes), per_class)
    noise = rng.normal(size=(y.size, DIM)) * 0.3
    noise[:, DIM - noise_dims :] *= 6.0
    return (centres[y] + noise + 5.0 * np.eye(DIM)[0]).astype(np.float32), y


def split(x: np.ndarray, y: np.ndarray, queries_per_class: int = 2):
    q = np.zeros(y.size, bool)
    for c in np.unique(y):
        q[np.flatnonzero(y == c)[:queries_per_class]] = True
    return x[~q], y[~q], x[q], y[q]


def test_stats_add_up_and_match_the_whole() -> None:
    x, y = clustered()
    y = y.copy()
    y[::7] = -1  # some unlabelled
    whole = P.stats_from_arrays(x, y)
    parts = P.stats_from_arrays(x[:30], y[:30]).merge(P.stats_from_arrays(x[30:], y[30:]))
    assert parts.n == whole.n == len(x)
    assert parts.labelled == whole.labelled == int((y >= 0).sum())
    np.testing.assert_allclose(parts.total_outer, whole.total_outer, atol=1e-9)
    np.testing.assert_allclose(parts.labelled_outer, whole.labelled_outer, atol=1e-9)
    for c in whole.class_counts:
        np.testing.assert_allclose(parts.class_sums[c], whole.class_sums[c], atol=1e-9)
    with pytest.raises(P.ProjectionError, match="mixed dimensions"):
        whole.merge(P.Stats(DIM + 1))


def test_lda_finds_the_classes_that_raw_distances_miss() -> None:
    xr, yr, xq, yq = split(*clustered())
    stats = P.stats_from_arrays(xr, yr)
    raw = P.label_precision(P.l2_normalize(xq), yq, P.l2_normalize(xr), yr, 5)
    lda = P.fit_lda(stats, shrinkage=0.1, dims=7)
    got = P.label_precision(lda.apply(xq), yq, lda.apply(xr), yr, 5)
    assert lda.dims == 7  # classes - 1
    assert got[0] > raw[0] + 0.3 and got[1] > raw[1]
    # unit vectors in the projected space
    np.testing.assert_allclose(np.linalg.norm(lda.apply(xq), axis=1), 1.0, rtol=1e-5)


def test_auto_cross_validates_lda_inside_the_references() -> None:
    xr, yr, _, _ = split(*clustered())
    choice = P.choose(P.stats_from_arrays(xr, yr), "auto", cv_vectors=xr, cv_labels=yr)
    assert choice.projection.kind == "lda" and choice.requested == "auto"
    assert "cross-validation" in choice.reason
    kinds = {row["kind"] for row in choice.cv}
    assert kinds == {"none", "whiten", "lda"}
    best = choice.projection.params
    assert best["shrinkage"] in P.LDA_SHRINKAGES and best["cv_precision_at_k"] > 0.5
    entry = choice.manifest_entry({"kind": "lda"})
    assert entry["coverage"] == {
        "images": len(xr),
        "labelled_images": len(xr),
        "share": 1.0,
        "classes": 8,
        "classes_with_two_or_more": 8,
    }


@pytest.mark.parametrize(
    ("labels", "why"),
    [
        ("none", "labels cover 0 of"),
        ("one class", "1 classes with 2+ images"),
        ("one per class", "0 classes with 2+ images"),
        ("few", "labels cover 6 of"),
    ],
)
def test_auto_falls_back_to_whitening_and_says_why(labels: str, why: str) -> None:
    x, y = clustered(per_class=20)
    y = {
        "none": np.full(y.size, -1),
        "one class": np.zeros(y.size, int),
        "one per class": np.arange(y.size),
        "few": np.where(np.arange(y.size) < 6, y, -1),
    }[labels]
    choice = P.choose(P.stats_from_arrays(x, y), "auto", cv_vectors=x[y >= 0], cv_labels=y[y >= 0])
    assert choice.projection.kind == "whiten"
    assert why in choice.reason and "whiten" in choice.reason
    with pytest.raises(P.ProjectionError, match="projection lda asked for"):
        P.choose(P.stats_from_arrays(x, y), "lda", cv_vectors=x[y >= 0], cv_labels=y[y >= 0])


def test_too_few_references_are_not_whitened() -> None:
    x, y = clustered(classes=27, per_class=1)  # a small first index
    x = np.concatenate([x, x[:1] + 0.01])
    y = np.concatenate([y, y[:1]])
    choice = P.choose(P.stats_from_arrays(x, y), "auto", cv_vectors=x, cv_labels=y)
    assert choice.projection.kind == "none" and "too few references" in choice.reason
    white = P.fit_whiten(P.stats_from_arrays(x, y))  # asked for: few dimensions
    assert white.dims == (len(x) - 1) // 4


def test_auto_falls_back_when_no_fold_can_fit_lda() -> None:
    x, y = clustered(per_class=20)
    y = np.full(y.size, -1)
    y[:4] = [0, 0, 1, 1]  # two classes of two: lda_ok, folds not
    stats = P.stats_from_arrays(x, y)
    choice = P.choose(stats, "auto", cv_vectors=x[:4], cv_labels=y[:4], min_coverage=0.0)
    assert choice.projection.kind == "whiten" and "could not fit LDA" in choice.reason
    with pytest.raises(P.ProjectionError, match="could not fit LDA"):
        P.choose(stats, "lda", cv_vectors=x[:4], cv_labels=y[:4], min_coverage=0.0)


def test_lda_refuses_classes_with_one_mean() -> None:
    x = np.tile(np.eye(DIM)[:3], (4, 1)).astype(np.float32)  # every class the same 3 rows
    y = np.repeat([0, 1, 2, 3], 3)
    with pytest.raises(P.ProjectionError, match="same mean"):
        P.fit_lda(P.stats_from_arrays(x, y), 0.1, 3)


def test_auto_keeps_no_projection_when_labels_do_not_help() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, DIM)).astype(np.float32)
    x[:60] += 4.0 * np.eye(DIM)[1]  # two real groups ...
    y = rng.integers(0, 6, size=120)  # ... and labels that ignore them
    choice = P.choose(P.stats_from_arrays(x, y), "auto", cv_vectors=x, cv_labels=y)
    assert choice.projection.kind == "none"
    assert "does not beat none" in choice.reason


def test_none_and_whiten_on_request() -> None:
    x, y = clustered(per_class=20)
    stats = P.stats_from_arrays(x, y)
    assert P.choose(stats, "none").projection.kind == "none"
    white = P.choose(stats, "whiten").projection
    assert white.kind == "whiten" and white.dims == min(P.WHITEN_DIMS, DIM)
    with pytest.raises(ValueError, match="choose one of"):
        P.choose(stats, "pca")


def test_saved_projection_round_trips_and_damage_is_named(tmp_path: Path) -> None:
    xr, yr, xq, _ = split(*clustered())
    choice = P.choose(P.stats_from_arrays(xr, yr), "lda", cv_vectors=xr, cv_labels=yr)
    entry = P.write_choice(choice, tmp_path / "projection")
    again, proj = P.read_choice(tmp_path / "projection")
    assert again == entry and proj is not None
    np.testing.assert_array_equal(proj.apply(xq), choice.projection.apply(xq))
    with pytest.raises(P.ProjectionError, match="expects 24"):
        proj.apply(np.ones((1, 5)))
    npz = tmp_path / "projection" / P.MATRIX_FILE
    npz.write_bytes(npz.read_bytes()[:-8] + b"damaged!")
    with pytest.raises(P.ProjectionError, match="damaged"):
        P.read_choice(tmp_path / "projection")
    assert P.load(tmp_path, None) is None and P.load(tmp_path, {"kind": "none"}) is None
    with pytest.raises(P.ProjectionError, match="did not complete"):
        P.read_choice(tmp_path / "nowhere")


def test_lsh_is_tuned_on_references_the_map_has_not_seen() -> None:
    x, y = clustered(classes=8, per_class=20)
    choice = P.choose(P.stats_from_arrays(x, y), "lda", cv_vectors=x, cv_labels=y)
    tuned = P.holdout_tuning(choice, x, y, target=0.9, seed=1)
    assert tuned is not None and tuned["queries"] == 32  # one stratified fold of 160
    assert tuned["sample_size"] == 128 and "held-out" in tuned["method"]
    assert {"tables", "keys_per_band", "probes", "width_factor"} <= set(tuned["choice"])
    assert P.holdout_tuning(P.choose(P.stats_from_arrays(x, y), "none"), x, y, target=0.9) is None


@pytest.mark.spark
def test_spark_statistics_equal_the_numpy_twin(spark) -> None:
    from imgsim.jobs.spark_projection import labelled_sample, project, stats_of

    x, y = clustered()
    rows = [(f"{i:04d}", x[i].tolist(), None if i % 9 == 0 else int(y[i])) for i in range(len(x))]
    df = spark.createDataFrame(
        rows, "image_id string, vector array<float>, class_id int"
    ).repartition(3)
    got = stats_of(df, DIM)
    want = P.stats_from_arrays(x, np.array([-1 if r[2] is None else r[2] for r in rows]))
    assert (got.n, got.labelled, got.class_counts) == (want.n, want.labelled, want.class_counts)
    np.testing.assert_allclose(got.labelled_outer, want.labelled_outer, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.total_sum, want.total_sum, rtol=1e-6, atol=1e-6)
    sx, sy = labelled_sample(df, 30, seed=1)
    assert sx.shape == (30, DIM) and (sy >= 0).all()
    lda = P.fit_lda(want, 0.1, 7)
    projected = {r.image_id: np.asarray(r.vector) for r in project(df, lda).collect()}
    np.testing.assert_allclose(projected["0001"], lda.apply(x[1])[0], atol=1e-6)
