"""The LSH auto-tuner (imgsim.ann.tuning); AND-amplified, multi-probe band keys in NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from imgsim.ann import (
    AnnError,
    BandIndex,
    BrpParams,
    hash_vectors,
    l2_normalize,
    leave_one_out_recall,
    probe_keys,
    squared_distances,
)
from imgsim.ann.tuning import (
    CurvePoint,
    LshConfig,
    TuningError,
    choose,
    evaluate_grid,
    exact_top_k,
    pareto_front,
    sample_rows,
    tune,
)
from imgsim.config import ConfigError, Settings


def random_unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    from imgsim.ann import random_unit_vectors as draw

    return draw(count, dim, seed)


def brute_candidates(keys: np.ndarray, ref_h: np.ndarray) -> np.ndarray:
    """(n,) bool by comparing every reference: one query's (bands, probes + 1, K) keys."""
    bands, _, kb = keys.shape
    mask = np.zeros(ref_h.shape[0], bool)
    for b in range(bands):
        for key in keys[b]:
            mask |= (ref_h[:, b * kb : (b + 1) * kb] == key).all(axis=1)
    return mask


def clustered(
    n: int = 600, dim: int = 32, clusters: int = 60, spread: float = 0.15, seed: int = 3
) -> np.ndarray:
    """Unit vectors in tight, well separated clusters: near neighbours are easy to hash."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.normal(size=(clusters, dim)))
    x = centres[rng.integers(0, clusters, n)] + rng.normal(
        scale=spread / np.sqrt(dim), size=(n, dim)
    )
    return l2_normalize(x)


# -- the tuner ---------------------------------------------------------------------------------


def test_tuner_reaches_the_target_on_clustered_data_comparing_a_small_share() -> None:
    x = clustered()

    result = tune(x, target=0.95, max_queries=100, seed=1)

    assert result.target_met is True
    assert result.choice.recall_at_k >= 0.95
    assert result.choice.candidates_share < 0.5  # far from an exact search
    assert result.sample_size == 600 and result.queries == 100
    # The choice is the cheapest point reaching the target.
    reaching = [p for p in result.curve if p.recall_at_k >= 0.95]
    assert result.choice.candidates_share == min(p.candidates_share for p in reaching)
    d = result.as_dict()
    assert d["choice"]["tables"] == result.choice.config.tables
    assert len(d["curve"]) == len(result.curve)
    assert {"target", "curve", "choice", "sample_size", "target_met"} <= set(d)


def test_curve_is_monotone_in_the_candidates_compared() -> None:
    x = clustered(n=400)
    curve, _ = evaluate_grid(
        x,
        x[:50],
        exclude=np.arange(50),
        tables=(1, 2, 4, 8, 16),
        width_factors=(0.5, 2.0),
        keys_per_band=(1, 2),
        probes=(0, 1),
    )

    def family(p: CurvePoint) -> tuple[int, int, float]:
        return (p.config.keys_per_band, p.config.probes, p.width_factor)

    for _, pts in itertools.groupby(
        sorted(curve, key=lambda p: (family(p), p.config.tables)), key=family
    ):
        pts_l = list(pts)
        shares = [p.candidates_share for p in pts_l]
        recalls = [p.recall_at_k for p in pts_l]
        assert shares == sorted(shares)  # more bands, more candidates
        assert recalls == sorted(recalls)  # ... and never less recall
    front = pareto_front(curve)
    assert [p.candidates_share for p in front] == sorted(p.candidates_share for p in front)
    assert all(a.recall_at_k < b.recall_at_k for a, b in itertools.pairwise(front))


def test_unreachable_target_falls_back_to_the_best_recall() -> None:
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(300, 64)))  # no structure at all

    result = tune(x, target=1.0, tables=(1,), width_factors=(0.05,), max_queries=50)

    assert result.target_met is False
    assert result.choice.recall_at_k == max(p.recall_at_k for p in result.curve)
    assert result.choice.recall_at_k < 1.0
    assert result.as_dict()["target_met"] is False


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, float("nan"), "high", None])
def test_a_bad_target_is_a_clear_error(bad: object) -> None:
    with pytest.raises(TuningError, match="target recall"):
        tune(clustered(n=50), target=bad)  # type: ignore[arg-type]


def test_target_recall_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSIM_TARGET_RECALL", raising=False)
    assert Settings.from_env().target_recall == 0.95
    monkeypatch.setenv("IMGSIM_TARGET_RECALL", "0.9")
    assert Settings.from_env().target_recall == 0.9
    for bad in ("1.5", "0", "x"):
        monkeypatch.setenv("IMGSIM_TARGET_RECALL", bad)
        with pytest.raises(ConfigError, match="IMGSIM_TARGET_RECALL"):
            Settings.from_env()


def test_bad_inputs_are_clear_errors() -> None:
    x = clustered(n=40, dim=8)
    with pytest.raises(TuningError, match="same number of columns"):
        evaluate_grid(x, x[:, :4])
    with pytest.raises(TuningError, match="at least 2"):
        tune(x[:1])
    with pytest.raises(TuningError, match="tables"):
        evaluate_grid(x, x[:3], tables=(0,))
    with pytest.raises(TuningError, match="NaN"):
        evaluate_grid(np.full((5, 8), np.nan), x[:3])
    with pytest.raises(TuningError, match="empty curve"):
        choose([], 0.9)
    with pytest.raises(TuningError, match="sample size"):
        sample_rows(10, size=1)
    rows = sample_rows(10_000, size=4000, seed=1)
    assert rows.size == 4000 and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, sample_rows(10_000, size=4000, seed=1))


def test_choose_prefers_fewer_candidates_then_fewer_lookups() -> None:
    def pt(tables: int, recall: float, share: float) -> CurvePoint:
        return CurvePoint(LshConfig(tables, 1, 0.1), recall, share, 1.0)

    curve = [pt(8, 0.99, 0.5), pt(4, 0.96, 0.3), pt(16, 0.96, 0.3), pt(2, 0.9, 0.1)]
    best, met = choose(curve, 0.95)
    assert met and best.config.tables == 4
    best, met = choose(curve, 0.999)
    assert not met and best.recall_at_k == 0.99


def test_tuner_recall_equals_the_numpy_twin_search() -> None:
    """The tuner's shortcut (|C ∩ exact top-k|) gives what searching with the twin gives."""
    x = clustered(n=300, dim=16, spread=0.4)
    queries = np.arange(40)
    for kb, probes, factor, tables in [(1, 0, 0.5, 3), (2, 1, 1.0, 4), (3, 2, 2.0, 2)]:
        curve, scale = evaluate_grid(
            x,
            x[queries],
            exclude=queries,
            tables=(tables,),
            width_factors=(factor,),
            keys_per_band=(kb,),
            probes=(probes,),
            seed=5,
        )
        (point,) = curve
        params = BrpParams(random_unit_vectors(tables * kb, 16, 5), factor * scale)
        report = leave_one_out_recall(x, hash_vectors(params, x), queries, 5, params, kb, probes)
        assert point.recall_at_k == pytest.approx(report.recall_at_k, abs=1e-12)
        assert point.candidates_share == pytest.approx(report.candidates_share, abs=1e-12)


def test_exact_top_k_excludes_and_pads() -> None:
    x = l2_normalize(np.eye(3, dtype=np.float32) + 0.01)
    top, d = exact_top_k(x, x, 5, exclude=np.arange(3))
    assert top.shape == (3, 5)
    assert (top[:, 2:] == -1).all()
    assert all(i not in top[i] for i in range(3))
    assert np.isinf(d[0, 0])


# -- AND-amplified keys and multi-probe in the twin --------------------------------------------


def test_one_key_per_band_without_probes_is_sparks_or_search() -> None:
    rng = np.random.default_rng(2)
    x = l2_normalize(rng.normal(size=(200, 12)))
    params = BrpParams(rng.normal(size=(6, 12)), 0.4)
    ref_h = hash_vectors(params, x)
    keys = probe_keys(params, x[:20], 1, 0)
    assert keys.shape == (20, 6, 1, 1)
    np.testing.assert_array_equal(keys[:, :, 0, 0], ref_h[:20])
    mask = BandIndex.build(ref_h, 1).candidates(keys)
    for i in range(20):  # Spark: a shared bucket in any table
        np.testing.assert_array_equal(mask[i], (ref_h == ref_h[i]).any(axis=1))


def test_probe_keys_move_the_key_nearest_a_boundary_towards_it() -> None:
    # One band of 3 keys, w = 1, axis-aligned projections: projections = the coordinates.
    params = BrpParams(np.eye(3), 1.0)
    q = np.array([[0.55, 2.97, -0.3]])  # fracs 0.55, 0.97, 0.7 -> boundary gaps .45 .03 .3

    keys = probe_keys(params, q, keys_per_band=3, probes=3)[0, 0]

    assert keys.tolist() == [
        [0, 2, -1],  # own bucket
        [0, 3, -1],  # 2.97 is 0.03 below 3: up
        [0, 2, 0],  # -0.3 is 0.3 below 0: up
        [1, 2, -1],
    ]  # 0.55 is 0.45 below 1: up


def test_probe_direction_follows_the_nearer_boundary() -> None:
    params = BrpParams(np.eye(2), 1.0)
    keys = probe_keys(params, np.array([[0.2, 5.9]]), keys_per_band=1, probes=1)[0]
    assert keys[0].tolist() == [[0], [-1]]  # 0.2 is nearer 0: down
    assert keys[1].tolist() == [[5], [6]]  # 5.9 is nearer 6: up
    with pytest.raises(AnnError, match="probes"):
        probe_keys(params, np.array([[0.2, 5.9]]), keys_per_band=1, probes=2)
    with pytest.raises(AnnError, match="bands"):
        probe_keys(params, np.array([[0.2, 5.9]]), keys_per_band=3, probes=0)


def test_and_narrows_and_probes_widen_the_candidates() -> None:
    rng = np.random.default_rng(4)
    x = l2_normalize(rng.normal(size=(300, 16)))
    params = BrpParams(rng.normal(size=(8, 16)), 0.3)
    ref_h = hash_vectors(params, x)
    or_mask = BandIndex.build(ref_h, 1).candidates(probe_keys(params, x[:30], 1, 0))
    and_mask = BandIndex.build(ref_h, 2).candidates(probe_keys(params, x[:30], 2, 0))
    probed = BandIndex.build(ref_h, 2).candidates(probe_keys(params, x[:30], 2, 2))
    assert not (and_mask & ~or_mask).any()  # AND: subset of OR over the same keys
    assert not (and_mask & ~probed).any()  # probes only add candidates
    assert and_mask[np.arange(30), np.arange(30)].all()  # a vector always finds itself
    assert or_mask[np.arange(30), np.arange(30)].all()
    with pytest.raises(AnnError, match="bands"):
        BandIndex.build(ref_h[:, :6], 2).candidates(probe_keys(params, x[0], 2, 0))


def test_in_process_lookup_follows_the_manifests_banding() -> None:
    from imgsim.query.lookup import LoadedModel, banding, lookup

    rng = np.random.default_rng(9)
    x = l2_normalize(rng.normal(size=(120, 8)))
    params = BrpParams(random_unit_vectors(6, 8, 1), 0.2)
    meta = [{"path": f"p{i}", "class_id": None, "class_name": None} for i in range(120)]
    ids = [f"id{i}" for i in range(120)]

    def model(lsh: dict[str, int]) -> LoadedModel:
        return LoadedModel(
            "v", {"lsh": lsh}, ids, x, hash_vectors(params, x), meta, params, scan=(1.0, 0)
        )

    assert banding({"lsh": {"numHashTables": 6}}) == (1, 0)  # manifests before banding
    plain = lookup(model({"numHashTables": 6}), x[:10], 5)
    banded = lookup(model({"numHashTables": 6, "keys_per_band": 2, "probes": 1}), x[:10], 5)
    ref_h = hash_vectors(params, x)
    d = squared_distances(x[:10], x)
    for answers, kb, probes in ((plain, 1, 0), (banded, 2, 1)):
        mask = BandIndex.build(ref_h, kb).candidates(probe_keys(params, x[:10], kb, probes))
        for i in range(10):
            if answers[i].method != "lsh":
                continue
            cand = np.flatnonzero(mask[i])
            want = cand[np.lexsort((cand, d[i, cand]))[:5]]
            assert [n.image_id for n in answers[i].neighbours] == [ids[j] for j in want]
            assert answers[i].candidates == mask[i].sum()
    assert sum(a.method == "lsh" for a in banded) >= 5


@pytest.mark.parametrize("kb,probes", [(1, 0), (1, 1), (3, 2), (4, 0)])
def test_band_index_finds_the_same_candidates(kb: int, probes: int) -> None:
    rng = np.random.default_rng(kb * 10 + probes)
    x = l2_normalize(rng.normal(size=(400, 12)))
    params = BrpParams(random_unit_vectors(5 * kb, 12, 3), 0.15)
    ref_h = hash_vectors(params, x)
    index = BandIndex.build(ref_h, kb)
    queries = l2_normalize(np.concatenate([x[:20], rng.normal(size=(20, 12))]))
    keys = probe_keys(params, queries, kb, probes)
    mask = index.candidates(keys)
    for i in range(len(queries)):
        np.testing.assert_array_equal(mask[i], brute_candidates(keys[i], ref_h))
    with pytest.raises(ValueError, match="bands"):
        BandIndex.build(ref_h, 7 if kb != 7 else 3)


def test_exact_top_k_orders_by_distance_then_index_with_ties() -> None:
    rng = np.random.default_rng(11)
    ref = l2_normalize(rng.integers(0, 2, size=(60, 4)).astype(np.float32) + 0.01)  # many ties
    q = ref[:15]
    top, d = exact_top_k(ref, q, 5)
    for i in range(15):
        np.testing.assert_array_equal(top[i], np.lexsort((np.arange(60), d[i]))[:5])


def test_band_index_compares_columns_where_a_band_cannot_be_packed() -> None:
    rng = np.random.default_rng(5)
    ref_h = rng.integers(-(2**40), 2**40, size=(300, 4))  # 2 keys spanning 2^41 each
    ref_h[:100] = ref_h[0]  # a shared bucket
    index = BandIndex.build(ref_h, 2)
    assert index.bands[0] is None
    keys = np.stack(
        [
            ref_h[[0, 150, 299]].reshape(3, 2, 2)[:, :, None, :],
            rng.integers(-5, 5, size=(3, 2, 1, 2)),
        ],
        axis=2,
    )[:, :, :, 0, :]
    mask = index.candidates(keys)
    for i in range(3):
        np.testing.assert_array_equal(mask[i], brute_candidates(keys[i], ref_h))
    assert mask[0].sum() >= 100
