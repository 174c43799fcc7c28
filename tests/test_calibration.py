"""Calibration of the overlap metric: chance levels against a simulation of random labels, the
calibrated score's anchors, the symmetric ``pair`` against a brute-force oracle, the auto k,
the half-sample interval, and the detector's grouped folds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from advlens.config import OverlapConfig, from_dict
from advlens.errors import ConfigError
from advlens.kernels.metrics import VARIANTS, auto_k, calibrated, chance
from advlens.overlap import (
    detector_folds,
    overlap,
    overlap_highdim,
    overlap_sweep,
    subsample_interval,
)

SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def flags(n: int) -> np.ndarray:
    return np.repeat([False, True], n)


def clusters(n_points: int, seed: int) -> np.ndarray:
    """Clumpy 2-D points (a map-like layout): the chance level must not depend on it."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 2)) * 8
    return centres[rng.integers(0, 6, n_points)] + rng.normal(size=(n_points, 2))


@pytest.mark.parametrize("n,k", [(60, 1), (60, 4), (150, 10)])
def test_chance_matches_simulated_random_labels(n, k) -> None:
    # random labels of the same points: permute the rows (random clean/perturbed and twins)
    x = clusters(2 * n, seed=n + k)
    rng = np.random.default_rng(0)
    sims = {v: [] for v in VARIANTS}
    for _ in range(300):
        res = overlap_sweep(x[rng.permutation(2 * n)], flags(n), ks=(k,))
        for v in sims:
            sims[v].append(res[(v, k)].value)
    for v, vals in sims.items():
        want = chance(v, n, k)
        se = np.std(vals, ddof=1) / np.sqrt(len(vals))
        assert abs(np.mean(vals) - want) < 4 * se + 1e-9, (v, np.mean(vals), want, se)
        assert res[(v, k)].chance == pytest.approx(want)


def test_chance_closed_forms() -> None:
    from math import comb

    n, k = 40, 5
    assert chance("overlap", n, k) == pytest.approx(1 - comb(n - 1, k) / comb(2 * n - 1, k))
    assert chance("pair", n, k) == pytest.approx(k / (2 * n - 1))
    # share: other-set points among the 2N - 2 that are neither the point nor its twin
    for n_ in (2, 3, 40, 1001):
        assert chance("share", n_, 1) == chance("share", n_, 7) == 0.5
    # unequal sets: the weighted mean of the clean and the perturbed points' chance
    got = chance("overlap", 30, 3, 10)
    want = 0.75 * (1 - comb(29, 3) / comb(39, 3)) + 0.25 * (1 - comb(9, 3) / comb(39, 3))
    assert got == pytest.approx(want)
    with pytest.raises(ValueError, match="unknown variant"):
        chance("nope", n, k)


def test_calibrated_is_one_for_random_labels_and_zero_when_separated() -> None:
    n, k = 200, 5
    x = clusters(2 * n, seed=3)
    rng = np.random.default_rng(1)
    ratios = {v: [] for v in VARIANTS}
    for _ in range(200):
        res = overlap_sweep(x[rng.permutation(2 * n)], flags(n), ks=(k,))
        for v in ratios:
            ratios[v].append(res[(v, k)].value / res[(v, k)].chance)
    for v, r in ratios.items():  # unclipped ratio: 1 in expectation
        assert abs(np.mean(r) - 1) < 4 * np.std(r, ddof=1) / np.sqrt(len(r)) + 1e-9, v
    # the reported (clipped) score is 1 for well-mixed random labels of overlap
    assert overlap(x[rng.permutation(2 * n)], flags(n), k=k).calibrated > 0.95
    far = np.concatenate([x[:n], x[:n] + 1e3])
    for v in ("overlap", "mixing", "share"):
        assert overlap(far, flags(n), k=k, variant=v).calibrated == 0.0
    assert calibrated(0.3, 0.6) == 0.5 and calibrated(0.9, 0.6) == 1.0


def ranked(x: np.ndarray) -> list[tuple[int, int, list[int]]]:
    """Per point: (i, its twin, the other points nearest first, ties by index); brute force."""
    two_n = len(x)
    d = cdist(x, x)
    order = [np.lexsort((np.arange(two_n), d[i])) for i in range(two_n)]
    return [(i, (i + two_n // 2) % two_n, [j for j in order[i] if j != i]) for i in range(two_n)]


def brute_pair(x: np.ndarray, k: int) -> np.ndarray:
    """Symmetric pair by brute force: full distance matrix, ties by index."""
    return np.array([float(twin in rest[:k]) for _, twin, rest in ranked(x)])


def twin_points(
    n: int, grid: bool, seed: int
) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """n clean 2-D points and their noisy twins (rows n..2n-1); on a half-unit grid when
    ``grid`` (many exact distance ties: the index order decides)."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, 2))
    x = np.concatenate([clean, clean + 0.3 * rng.normal(size=(n, 2))])
    return rng, clean, (np.round(x * 2) / 2 if grid else x)


@SETTINGS
@given(n=st.integers(2, 40), k_frac=st.floats(0, 1), grid=st.booleans(), seed=st.integers(0, 999))
def test_symmetric_pair_equals_brute_force(n, k_frac, grid, seed) -> None:
    rng, clean, x = twin_points(n, grid, seed)
    k = 1 + int(k_frac * (2 * n - 2))
    res = overlap(x, flags(n), k=k, variant="pair")
    want = brute_pair(x, k)
    np.testing.assert_array_equal(res.per_point, want)
    assert res.value == pytest.approx(want.mean())


def brute_share(x: np.ndarray, k: int) -> np.ndarray:
    """share by brute force: full distance matrix, ties by index, the point and its twin out."""
    n = len(x) // 2
    return np.array(
        [
            sum((j >= n) != (i >= n) for j in [j for j in rest if j != twin][:k]) / k
            for i, twin, rest in ranked(x)
        ]
    )


@SETTINGS
@given(n=st.integers(2, 40), k_frac=st.floats(0, 1), grid=st.booleans(), seed=st.integers(0, 999))
def test_share_equals_brute_force(n, k_frac, grid, seed) -> None:
    rng, clean, x = twin_points(n, grid, seed)
    k = 1 + int(k_frac * (2 * n - 3))
    res = overlap(x, flags(n), k=k, variant="share")
    want = brute_share(x, k)
    np.testing.assert_allclose(res.per_point, want, rtol=0, atol=1e-12)
    assert res.value == pytest.approx(want.mean()) and res.chance == 0.5
    hd = np.concatenate([clean, clean]) @ rng.normal(size=(2, 5))  # 5-D, the twins coincide
    np.testing.assert_allclose(
        overlap_highdim(hd, flags(n), k=k, variant="share").per_point, brute_share(hd, k),
        rtol=0, atol=1e-12,
    )  # fmt: skip


def test_pair_looks_from_both_twins() -> None:
    # clean point 0 sits in a crowd, its twin 2 is isolated beside it: 2 sees 0, 0 does not see 2
    x = np.array([[0.0, 0.0], [0.1, 0.0], [-1.0, 0.0], [0.2, 0.0]])
    res = overlap(x, flags(2), k=1, variant="pair")
    np.testing.assert_array_equal(res.per_point, brute_pair(x, 1))
    assert res.per_point[0] != res.per_point[2]


def test_auto_k_rule() -> None:
    assert auto_k(1000) == 10 and auto_k(250) == 3 and auto_k(500) == 5 and auto_k(2000) == 20
    assert auto_k(10) == 1 and auto_k(1) == 1
    ks = [auto_k(n) for n in range(1, 5000, 37)]
    assert ks == sorted(ks)
    assert overlap(clusters(600, 0), flags(300), k="auto").k == 3


def test_overlap_config_k() -> None:
    assert OverlapConfig().k == "auto"
    assert from_dict({"overlap": {"k": 7}}).overlap.k == 7
    assert from_dict({"overlap": {"k": "12"}}).overlap.k == 12
    with pytest.raises(ConfigError, match="overlap.k = 'sometimes'"):
        from_dict({"overlap": {"k": "sometimes"}})
    with pytest.raises(ConfigError, match="at least 1"):
        OverlapConfig(k=0)
    from advlens.config import OVERLAP_VARIANTS

    assert OVERLAP_VARIANTS == VARIANTS  # the config accepts exactly the kernels' variants
    # the default: share, scored on the reduced points (benchmarks/metric_vs_n.py, README)
    assert (OverlapConfig().variant, OverlapConfig().space) == ("share", "reduced")
    assert from_dict({"overlap": {"space": "map"}}).overlap.space == "map"
    with pytest.raises(ConfigError, match="overlap.space = 'pca': valid spaces are reduced, map"):
        from_dict({"overlap": {"space": "pca"}})
    assert from_dict({"overlap": {"variant": "share"}}).overlap.variant == "share"
    with pytest.raises(
        ConfigError, match="'shar': valid variants are overlap, mixing, pair, share"
    ):
        from_dict({"overlap": {"variant": "shar"}})


def test_subsample_interval_matches_sampling_spread() -> None:
    # two overlapping clouds: the spread of the calibrated value over independent image samples
    # is what a half-sample interval from one sample should estimate
    def sample(n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        clean = rng.normal(size=(n, 2))
        return np.concatenate([clean, clean + [1.5, 0.0] + 0.3 * rng.normal(size=(n, 2))])

    n, k = 400, 4
    truth = [overlap(sample(n, s), flags(n), k=k).calibrated for s in range(40)]
    x = sample(n, 99)
    both = subsample_interval(x, k=k, draws=200, seed=0)
    assert both == subsample_interval(x, k=k, draws=200, seed=0)  # seeded
    one = overlap(x, flags(n), k=k)
    lo, hi = both["calibrated"]
    assert lo <= one.calibrated <= hi and both["value"][0] <= one.value <= both["value"][1]
    assert 0.6 < (hi - lo) / (2 * 1.96 * np.std(truth, ddof=1)) < 1.6


@pytest.mark.parametrize("n,folds,seed", [(10, 5, 0), (37, 5, 3), (200, 4, 1)])
def test_grouped_folds_never_split_a_twin_pair(n, folds, seed) -> None:
    splits = detector_folds(n, folds, seed)
    tests = np.concatenate([t for _, t in splits])
    assert np.array_equal(np.sort(tests), np.arange(2 * n))  # every point scored exactly once
    for train, test in splits:
        assert not set(train % n) & set(test % n)  # no sample on both sides
        samples = np.unique(test % n)
        assert np.array_equal(np.sort(test), np.concatenate([samples, samples + n]))
    assert [t.tolist() for _, t in detector_folds(n, folds, seed)] == [
        t.tolist() for _, t in splits
    ]


@SETTINGS
@given(
    n=st.integers(4, 60), d=st.sampled_from([2, 5]), grid=st.booleans(), seed=st.integers(0, 999)
)
def test_subset_neighbours_equal_a_new_search(n, d, grid, seed) -> None:
    from advlens.kernels import knn, knn2d
    from advlens.overlap import _subset_neighbours

    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, d))
    x = np.concatenate([clean, clean + 0.3 * rng.normal(size=(n, d))])
    if grid:  # many exact distance ties: the index order decides
        x = np.round(x * 2) / 2
    search = knn2d if d == 2 else knn
    m = n // 2
    q = int(rng.integers(1, 2 * m))
    pick = np.sort(rng.choice(n, m, replace=False))
    want = search(x[np.concatenate([pick, pick + n])], q)[0]
    np.testing.assert_array_equal(_subset_neighbours(search(x, 2 * n - 1)[0], pick, n, q), want)
    # a table too narrow for some subset point is refused, not read short
    assert _subset_neighbours(search(x, 1)[0], pick, n, 2) is None


def test_subsample_interval_on_reduced_points() -> None:
    rng = np.random.default_rng(4)
    n = 300
    clean = rng.normal(size=(n, 10))
    x = np.concatenate([clean, clean + 0.8 * rng.normal(size=(n, 10))])
    full = overlap_highdim(x, flags(n), k=6, variant="share")
    both = subsample_interval(x, k=6, variant="share", draws=100, seed=0)
    lo, hi = both["calibrated"]
    assert lo <= full.calibrated <= hi and 0 < hi - lo < 0.3
