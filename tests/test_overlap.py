"""advlens.overlap: the metric variants against a loop-by-loop oracle on scikit-learn neighbours,
invariances, sanity anchors, bootstrap, detector AUC and input errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.neighbors import NearestNeighbors

from advlens.errors import AdvlensError, ConfigError, DataError
from advlens.kernels.metrics import VARIANTS
from advlens.overlap import Overlap, detector_auc, overlap, overlap_highdim, overlap_sweep

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def pairs(n: int, shift: float, seed: int = 0, d: int = 2, noise: float = 1.0) -> np.ndarray:
    """N clean points and their twins: twin = clean + shift + noise * small jitter."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, d))
    twin = clean + shift + noise * 0.05 * rng.normal(size=(n, d))
    return np.concatenate([clean, twin])


def flags(n: int) -> np.ndarray:
    return np.repeat([False, True], n)


def oracle(x: np.ndarray, is_pert: np.ndarray, k: int, variant: str) -> np.ndarray:
    """Per-point values written out from docs/design.md, with scikit-learn's neighbours (continuous
    data: no distance ties, so any exact kNN gives the same sets)."""
    nn = NearestNeighbors(n_neighbors=min(k + 2, len(x))).fit(x)
    _, idx = nn.kneighbors(x)
    out = np.empty(len(x))
    n = len(x) // 2
    for i in range(len(x)):
        neigh = [j for j in idx[i] if j != i][:k]
        share = sum(is_pert[j] != is_pert[i] for j in neigh) / k
        if variant == "share":  # the twin left out: the first k of the others
            rest = [j for j in idx[i] if j not in (i, (i + n) % (2 * n))][:k]
            out[i] = sum(is_pert[j] != is_pert[i] for j in rest) / k
        elif variant == "overlap":
            out[i] = 1.0 if share > 0 else 0.0
        elif variant == "mixing":
            out[i] = min(share / 0.5, 1.0)
        else:  # symmetric: each point looks for its own twin in its own neighbourhood
            out[i] = 1.0 if (i + n) % (2 * n) in neigh else 0.0
    return out


@SETTINGS
@given(
    n=st.integers(3, 60),
    shift=st.sampled_from([0.0, 0.1, 0.5, 3.0]),
    k_frac=st.floats(0, 1),
    variant=st.sampled_from(VARIANTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_variants_match_oracle_and_lie_in_unit_interval(n, shift, k_frac, variant, seed) -> None:
    x = pairs(n, shift, seed)
    k = 1 + int(k_frac * (2 * n - (3 if variant == "share" else 2)))  # share: twin left out
    res = overlap(x, flags(n), k=k, variant=variant)
    want = oracle(x, flags(n), k, variant)
    np.testing.assert_array_equal(res.per_point, want)
    assert res.value == pytest.approx(want.mean())
    assert 0.0 <= res.value <= 1.0 and res.k == k and res.variant == variant


@SETTINGS
@given(
    n=st.integers(3, 50),
    shift=st.sampled_from([0.0, 0.3, 2.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_permuting_samples_leaves_values_unchanged(n, shift, seed) -> None:
    x = pairs(n, shift, seed)
    labels = np.random.default_rng(seed).integers(0, 4, n)
    perm = np.random.default_rng(seed + 1).permutation(n)
    order = np.concatenate([perm, perm + n])  # same permutation of the samples in both halves
    a = overlap_sweep(x, flags(n), ks=(1, 2, 4), labels=labels)
    b = overlap_sweep(x[order], flags(n), ks=(1, 2, 4), labels=labels[perm])
    for key in a:
        assert a[key].value == pytest.approx(b[key].value)
        np.testing.assert_array_equal(a[key].per_point[order], b[key].per_point)
        assert a[key].per_class == pytest.approx(b[key].per_class)
    # overlap and mixing need no pairing: any permutation of the points
    p = np.random.default_rng(seed + 2).permutation(2 * n)
    for v in ("overlap", "mixing"):
        assert overlap(x, flags(n), k=3, variant=v).value == pytest.approx(
            overlap(x[p], flags(n)[p], k=3, variant=v).value
        )


def test_sanity_anchors() -> None:
    n = 400
    same = pairs(n, 0.0, noise=0.0)  # twins identical to their clean points
    indep = np.concatenate([pairs(n, 0.0, seed=1)[:n], pairs(n, 0.0, seed=2)[:n]])
    far = pairs(n, 1e3)
    for v in ("overlap", "mixing", "pair"):
        assert overlap(same, flags(n), variant=v).value >= 0.9
    for v in VARIANTS:
        assert overlap(far, flags(n), variant=v).value <= 0.05
    # share leaves the twin out: identical twins are as mixed as random labels (1/2, chance)
    assert overlap(same, flags(n), variant="share").calibrated >= 0.9
    assert overlap(indep, flags(n)).value >= 0.9  # same distribution, drawn independently
    assert overlap(same, flags(n), k=1, variant="pair").value == 1.0


def test_sweep_equals_separate_calls_and_per_class() -> None:
    n = 120
    x = pairs(n, 0.3, seed=3)
    labels = np.random.default_rng(3).integers(0, 5, n)
    sweep = overlap_sweep(x, flags(n), ks=(2, 7, 15), labels=labels)
    assert list(sweep) == [(v, k) for v in VARIANTS for k in (2, 7, 15)]
    lab2 = np.concatenate([labels, labels])
    for (v, k), res in sweep.items():
        one = overlap(x, flags(n), k=k, variant=v, labels=lab2)  # per-point labels accepted too
        np.testing.assert_array_equal(res.per_point, one.per_point)
        for c in range(5):
            assert res.per_class[c] == pytest.approx(res.per_point[lab2 == c].mean())
        assert one.per_class == pytest.approx(res.per_class)


def test_bootstrap_interval() -> None:
    n = 2000
    x = pairs(n, 0.04, seed=4)
    a = overlap(x, flags(n), k=3, variant="pair", bootstrap=400, seed=1)
    b = overlap(x, flags(n), k=3, variant="pair", bootstrap=400, seed=1)
    assert a.ci == b.ci  # seeded
    lo, hi = a.ci
    assert lo <= a.value <= hi
    # the 95% interval of a mean of N per-sample values is about 2 * 1.96 * sd / sqrt(N)
    per_sample = (a.per_point[:n] + a.per_point[n:]) / 2
    assert 0.1 < a.value < 0.9
    assert hi - lo == pytest.approx(2 * 1.96 * per_sample.std() / np.sqrt(n), rel=0.25)
    assert overlap(x, flags(n), k=3).ci is None


def test_bootstrap_keeps_twins_together() -> None:
    from advlens.kernels.metrics import bootstrap_ci

    clean = (np.random.default_rng(5).random(1000) < 0.5).astype(float)
    # a twin that always disagrees with its clean point: every sample scores 1/2, no spread
    assert bootstrap_ci(np.concatenate([clean, 1 - clean]), 300, seed=0) == (0.5, 0.5)
    # twins that agree: the spread of N (not 2N) independent 0/1 draws
    lo, hi = bootstrap_ci(np.concatenate([clean, clean]), 300, seed=0)
    p = clean.mean()
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 1000), rel=0.25)


def test_highdim_anchors_and_oracle() -> None:
    n = 150
    x = pairs(n, 0.2, seed=5, d=20)
    res = overlap_highdim(x, flags(n), k=4)
    np.testing.assert_array_equal(res.per_point, oracle(x, flags(n), 4, "overlap"))
    assert overlap_highdim(pairs(n, 0.0, d=20, noise=0.0), flags(n)).value >= 0.9
    assert overlap_highdim(pairs(n, 50.0, d=20), flags(n)).value <= 0.05


def test_detector_auc() -> None:
    n = 300
    rng = np.random.default_rng(6)
    indep = rng.normal(size=(2 * n, 10))  # clean and perturbed from one distribution
    assert abs(detector_auc(indep, flags(n), k=10, seed=0) - 0.5) < 0.1
    shifted = np.concatenate([indep[:n], indep[n:] + 2.0])
    assert detector_auc(shifted, flags(n), k=10, seed=0) > 0.95
    assert detector_auc(shifted, flags(n), seed=3) == detector_auc(shifted, flags(n), seed=3)
    # twins identical to their clean points: only folds that keep each pair together give
    # every test point balanced neighbours (probability 1/2 everywhere, AUC exactly 1/2)
    same = pairs(n, 0.0, seed=7, d=10, noise=0.0)
    assert detector_auc(same, flags(n), k=10, seed=1) == pytest.approx(0.5, abs=1e-12)


def test_bad_input_errors() -> None:
    n = 20
    x = pairs(n, 0.1)
    with pytest.raises(ConfigError, match="at least 1"):
        overlap(x, flags(n), k=0)
    with pytest.raises(ConfigError, match="k = 40 is larger"):
        overlap(x, flags(n), k=40)
    with pytest.raises(DataError, match=r"is_perturbed has shape \(39,\)"):
        overlap(x, flags(n)[:-1])
    with pytest.raises(DataError, match="both clean and perturbed"):
        overlap(x, np.zeros(2 * n, bool))
    bad = x.copy()
    bad[5, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        overlap(bad, flags(n))
    with pytest.raises(DataError, match=r"expected \(n, 2\)"):
        overlap(np.zeros((2 * n, 3)), flags(n))
    shuffled = np.random.default_rng(0).permutation(flags(n))
    with pytest.raises(ConfigError, match="sample-order convention"):
        overlap(x, shuffled, variant="pair")
    with pytest.raises(ConfigError, match="sample-order convention"):
        overlap(x, shuffled, variant="share")
    with pytest.raises(ConfigError, match="'share' variant leaves out .* use k <= 38"):
        overlap(x, flags(n), k=39, variant="share")
    with pytest.raises(ConfigError, match="sample-order convention"):
        overlap(x, shuffled, bootstrap=10)
    with pytest.raises(ConfigError, match="sample-order convention"):
        detector_auc(x, shuffled)
    with pytest.raises(ConfigError, match="closest valid names.*: mixing"):
        overlap(x, flags(n), variant="mixin")
    with pytest.raises(DataError, match="labels have shape"):
        overlap(x, flags(n), labels=np.zeros(7, int))
    with pytest.raises(ConfigError, match="detector trains on 32 points"):
        detector_auc(pairs(n, 0.0, d=5), flags(n), k=33)
    with pytest.raises(AdvlensError):
        overlap(x, flags(n), device="tpu")
    with pytest.raises(ConfigError, match="ks is empty"):
        overlap_sweep(x, flags(n), ks=())


def test_overlap_result_checks_itself() -> None:
    pp = np.array([0.0, 1.0, 1.0, 1.0])
    Overlap(0.75, pp, {0: 0.75}, 3, "overlap")
    with pytest.raises(ValueError, match="1-D"):
        Overlap(0.75, pp.reshape(2, 2), {}, 3, "overlap")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Overlap(0.75, pp * 2, {}, 3, "overlap")
    with pytest.raises(ValueError, match="invalid"):
        Overlap(0.75, pp, {}, 3, "nope")
    with pytest.raises(ValueError, match="ci"):
        Overlap(0.75, pp, {}, 3, "overlap", ci=(0.9, 0.1))


def test_torch_inputs() -> None:
    import torch

    n = 50
    x = pairs(n, 0.2, seed=8)
    want = overlap(x, flags(n), k=5, variant="mixing")
    got = overlap(torch.from_numpy(x), torch.from_numpy(flags(n)), k=5, variant="mixing")
    np.testing.assert_array_equal(got.per_point, want.per_point)
    hd = pairs(n, 0.2, seed=8, d=6)
    assert (
        overlap_highdim(torch.from_numpy(hd), flags(n)).value == overlap_highdim(hd, flags(n)).value
    )


@pytest.mark.gpu
def test_gpu_overlap_equals_cpu() -> None:
    pytest.importorskip("cupy")
    n = 30_000
    x = pairs(n, 0.05, seed=9)
    labels = np.random.default_rng(9).integers(0, 10, n)
    cpu = overlap_sweep(x, flags(n), ks=(5, 10, 50), labels=labels, device="cpu")
    gpu = overlap_sweep(x, flags(n), ks=(5, 10, 50), labels=labels, device="cuda")
    for key in cpu:
        np.testing.assert_array_equal(cpu[key].per_point, gpu[key].per_point)
        assert cpu[key].per_class == gpu[key].per_class
    hd = pairs(n // 3, 0.3, seed=9, d=50)
    a = overlap_highdim(hd, flags(n // 3), device="cpu")
    b = overlap_highdim(hd, flags(n // 3), device="cuda")
    np.testing.assert_array_equal(a.per_point, b.per_point)
