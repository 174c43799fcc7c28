"""advlens.attacks: constraints, reproducibility, APGD's pieces against oracles, bad input.

Oracles: the closed-form minimal margin of a linear model (whether an eps-ball holds an
adversarial example at all), SciPy's SLSQP for the L1-ball-and-box projection, the DLR
formulas of Croce & Hein written out in NumPy, and the paper's checkpoint recursion.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from advlens.attacks import (
    AttackResult,
    enforce_constraints,
    get_attack,
    list_attacks,
    lp_norm,
)
from advlens.attacks.apgd import (
    checkpoints,
    dlr_loss,
    dlr_targeted_loss,
    halve_step,
    project_l1_box,
)
from advlens.errors import AdvlensError, ConfigError, DataError

EPS_RANGE = {"linf": (1e-3, 0.3), "l2": (1e-2, 2.0), "l1": (1e-2, 6.0)}


def tiny_model(kind: str, in_shape, n_classes: int, seed: int) -> nn.Module:
    """A random small network (eval mode) whose weights come from ``seed``."""
    c, h, w = in_shape
    if kind == "linear":
        model = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, n_classes))
    else:
        model = nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * h * w, n_classes)
        )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * 3.0 / fan_in**0.5)
    return model.eval().requires_grad_(False)


def assert_valid(
    result: AttackResult, model, x, y, norm: str, eps: float, real_twin: bool = True
) -> None:
    """The contract every attack result must satisfy."""
    x_adv = result.x_adv
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    size = lp_norm(x_adv - x, norm)
    assert (size <= eps * (1 + 1e-5) + 1e-6).all(), (size.max().item(), eps)
    torch.testing.assert_close(result.norm, size)
    with torch.no_grad():
        assert torch.equal(result.pred_clean, model(x).argmax(1))
        assert torch.equal(result.pred_adv, model(x_adv).argmax(1))
    attacked = result.pred_clean == y
    assert torch.equal(result.success, attacked & (result.pred_adv != y))
    # Not attacked: returned unchanged. Attacked: a real perturbation, never the clean input.
    assert torch.equal(x_adv[~attacked], x[~attacked])
    if real_twin:
        assert (result.norm[attacked] > 0).all()


def assert_same(a: AttackResult, b: AttackResult) -> None:
    for key in ("x_adv", "success", "norm", "pred_clean", "pred_adv"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


@st.composite
def problems(draw):
    """A random small model, batch, labels (some wrong), norm and eps."""
    seed = draw(st.integers(0, 2**16))
    b = draw(st.integers(1, 5))
    shape = (draw(st.integers(1, 2)), draw(st.integers(3, 6)), draw(st.integers(3, 6)))
    n_classes = draw(st.integers(4, 6))
    model = tiny_model(draw(st.sampled_from(["linear", "conv"])), shape, n_classes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.rand((b, *shape), generator=gen) * 0.98 + 0.01
    if draw(st.booleans()):  # pixels exactly on the box's faces
        mask = torch.rand(x.shape, generator=gen) < 0.25
        x = torch.where(mask, (torch.rand(x.shape, generator=gen) > 0.5).float(), x)
    with torch.no_grad():
        pred = model(x).argmax(1)
    wrong = torch.rand(b, generator=gen) < 0.3
    y = torch.where(wrong, (pred + 1) % n_classes, pred)
    norm = draw(st.sampled_from(["linf", "l2", "l1"]))
    lo, hi = EPS_RANGE[norm]
    eps = draw(st.floats(lo, hi))
    return model, x, y, norm, eps


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=problems(),
    name=st.sampled_from(["apgd-ce", "apgd-dlr", "apgd-t"]),
    n_iter=st.integers(1, 8),
    n_restarts=st.integers(1, 2),
)
def test_apgd_outputs_in_ball_and_box_and_reproducible(problem, name, n_iter, n_restarts):
    model, x, y, norm, eps = problem
    kw = {"n_target_classes": 2} if name == "apgd-t" else {}
    attack = get_attack(name, norm, eps, n_iter=n_iter, n_restarts=n_restarts, seed=7, **kw)
    result = attack(model, x, y)
    assert_valid(result, model, x, y, norm, eps)
    assert_same(result, attack(model, x, y))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    problem=problems().filter(lambda p: p[3] != "l1"),
    name=st.sampled_from(["PGD", "FGSM", "BasicIterativeAttack", "DeepFoolAttack"]),
)
def test_foolbox_outputs_in_ball_and_box_and_reproducible(problem, name):
    model, x, y, norm, eps = problem
    prefix = "Linf" if norm == "linf" else "L2"
    cls = {"PGD": "PGD", "FGSM": "FastGradientAttack"}.get(name, name)
    attack = get_attack(f"foolbox:{prefix}{cls}", norm, eps, n_iter=5)
    result = attack(model, x, y, seed=3)
    # foolbox may hand back the clean input (e.g. a zero gradient); advlens logs it
    assert_valid(result, model, x, y, norm, eps, real_twin=False)
    assert_same(result, attack(model, x, y, seed=3))


def _linear_problem(n_classes=4, d=12, n=60, seed=0):
    """A bias-free linear classifier and inputs in [0.3, 0.7] (eps <= 0.3: the box never binds)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn((n_classes, d), generator=gen))
    x = 0.3 + 0.4 * torch.rand((n, 1, 1, d), generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model.eval().requires_grad_(False), x, y


def _critical_eps(model, x, y, norm):
    """Smallest radius holding an adversarial example (exact for a linear model in the interior).

    Against class j the margin (w_y - w_j).x falls by at most eps * ||w_y - w_j||_dual.
    """
    w = model[1].weight.double()
    dual = {"linf": 1, "l2": 2, "l1": float("inf")}[norm]
    z = x.flatten(1).double() @ w.T
    out = torch.full((len(y),), float("inf"), dtype=torch.float64)
    for j in range(w.shape[0]):
        diff = torch.linalg.vector_norm(w[y] - w[j], ord=dual, dim=1)
        need = (z.gather(1, y[:, None]).squeeze(1) - z[:, j]) / diff.clamp_min(1e-12)
        out = torch.where(y == j, out, torch.minimum(out, need))
    return out


def _box_never_binds(model, eps, norm) -> bool:
    """Largest per-coordinate move of an optimal attack <= 0.3 (inputs lie in [0.3, 0.7])."""
    if norm != "l2":
        return eps <= 0.3
    w = model[1].weight.double()
    diff = w[:, None, :] - w[None, :, :]
    size = torch.linalg.vector_norm(diff, dim=2, keepdim=True).clamp_min(1e-12)
    return float(eps * (diff.abs() / size).max()) <= 0.3


def _margin(model, x, y):
    """z_y - max_{j != y} z_j in float64."""
    z = x.flatten(1).double() @ model[1].weight.double().T
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return z_y - z.scatter(1, y[:, None], float("-inf")).amax(1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name,n_classes", [("apgd-ce", 2), ("apgd-t", 4)])
def test_apgd_finds_exactly_the_reachable_adversarials_of_a_linear_model(name, n_classes, norm):
    # Exact when the loss leads to the cheapest flip: two classes (CE), or every target (APGD-T).
    model, x, y = _linear_problem(n_classes=n_classes)
    critical = _critical_eps(model, x, y, norm)
    eps = float(critical.median())  # half of the samples can be flipped, half cannot
    assert _box_never_binds(model, eps, norm)
    clear = (critical - eps).abs() > 0.02 * eps  # not razor-close to the boundary
    result = get_attack(name, norm, eps, n_iter=50)(model, x, y)
    assert_valid(result, model, x, y, norm, eps)
    assert torch.equal(result.success[clear], (critical < eps)[clear])


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr"])
def test_untargeted_apgd_is_sound_and_finds_clearly_reachable_adversarials(name, norm):
    # With 4 classes an untargeted loss may climb toward a class that is not the cheapest flip,
    # so only samples well inside the reachable set are required.
    model, x, y = _linear_problem(n_classes=4)
    critical = _critical_eps(model, x, y, norm)
    eps = float(critical.median())
    assert _box_never_binds(model, eps, norm)
    result = get_attack(name, norm, eps, n_iter=50)(model, x, y)
    assert_valid(result, model, x, y, norm, eps)
    assert not result.success[critical > 1.001 * eps].any()  # nothing beats the exact bound
    assert result.success[critical < 0.75 * eps].all()
    assert result.success.sum() >= 0.85 * (critical < eps).sum()


def test_apgd_l1_is_sound_and_finds_clearly_reachable_adversarials():
    # APGD-L1's sparse steps keep >= 2 coordinates (reference behaviour) while the exact L1
    # optimum of a linear model moves a single one: require success where 2 coordinates do.
    model, x, y = _linear_problem()
    critical = _critical_eps(model, x, y, "l1")
    eps = float(critical.median())
    assert _box_never_binds(model, eps, "l1")
    result = get_attack("apgd-ce", "l1", eps, n_iter=50)(model, x, y)
    assert_valid(result, model, x, y, "l1", eps)
    assert not result.success[critical > 1.001 * eps].any()
    assert result.success[critical < 0.5 * eps].all()
    assert result.success.float().mean() >= 0.3


def test_unsuccessful_twin_is_the_best_loss_point_not_the_clean_input():
    model, x, y = _linear_problem(n_classes=2, seed=1)
    eps = 0.5 * float(_critical_eps(model, x, y, "linf").min())  # too small to flip anything
    result = get_attack("apgd-ce", "linf", eps, n_iter=20)(model, x, y)
    assert not result.success.any()
    # On a linear model the best-loss point is the ball's corner that lowers the margin most.
    torch.testing.assert_close(result.norm, torch.full_like(result.norm, eps))
    w = model[1].weight.double()
    best = _margin(model, x, y) - eps * (w[0] - w[1]).abs().sum()
    torch.testing.assert_close(_margin(model, result.x_adv, y), best, rtol=0, atol=1e-5)


def test_seed_override_and_reproducibility():
    model, x, y = _linear_problem(n_classes=4, seed=2)
    attack = get_attack("apgd-ce", "l2", 0.05, n_iter=5, seed=0)
    a = attack(model, x, y, seed=11)
    assert_same(a, get_attack("apgd-ce", "l2", 0.05, n_iter=5, seed=11)(model, x, y))
    assert not torch.equal(a.x_adv, attack(model, x, y, seed=12).x_adv)
    assert torch.equal(attack(model, x, y).x_adv, attack(model, x, y, seed=0).x_adv)
    # extract.py passes seed = attack_seed * 1_000_003 + batch: large and numpy ints work too
    big = 7 * 1_000_003 + 12
    assert_same(attack(model, x, y, seed=np.int64(big)), attack(model, x, y, seed=big))


def test_misclassified_inputs_are_returned_unchanged():
    model, x, y = _linear_problem(n_classes=4, seed=3)
    y_wrong = (y + 1) % 4
    result = get_attack("apgd-dlr", "linf", 0.1, n_iter=3)(model, x, y_wrong)
    assert torch.equal(result.x_adv, x)
    assert not result.success.any() and (result.norm == 0).all()
    assert torch.equal(result.pred_adv, result.pred_clean)


def test_empty_batch_and_inference_mode_caller():
    model, x, y = _linear_problem(n_classes=4, seed=4)
    attack = get_attack("apgd-ce", "linf", 0.05, n_iter=3)
    empty = attack(model, x[:0], y[:0])
    assert empty.x_adv.shape == (0, *x.shape[1:]) and empty.success.shape == (0,)
    with torch.inference_mode():
        inside = attack(model, x, y)
    assert_same(inside, attack(model, x, y))


def test_bf16_autocast_and_channels_last_keep_the_contract():
    model = tiny_model("conv", (2, 6, 6), 5, seed=5)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand((8, 2, 6, 6), generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)
    for kw in ({"autocast_bf16": True}, {"channels_last": True}):
        result = get_attack("apgd-ce", "linf", 0.2, n_iter=10, **kw)(model, x, y)
        assert result.x_adv.shape == x.shape
        assert float(result.x_adv.min()) >= 0 and float(result.x_adv.max()) <= 1
        assert (lp_norm(result.x_adv - x, "linf") <= 0.2 + 1e-6).all()
        assert result.success.float().mean() > 0.5  # eps 0.2 fools this random net easily


def test_correct_and_success_are_decided_in_float32_under_bf16_autocast():
    """A borderline input: class 1 wins by 2^-8 in float32, a tie (class 0) in bf16, whose
    8-bit significand rounds 1 + 2^-8 to 1. The stored activations come from float32."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [1.0 + 2.0**-8]]))
    x = torch.ones((1, 1, 1, 1))
    y = torch.tensor([1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert int(model(x).float().argmax(1)) == 0  # the bf16 pass gets it wrong
    assert int(model(x).argmax(1)) == 1
    result = get_attack("apgd-ce", "linf", 1e-6, n_iter=2, autocast_bf16=True)(model, x, y)
    assert int(result.pred_clean) == 1  # correct, as the float32 pass says
    assert int(result.pred_adv) == int(model(result.x_adv).argmax(1))
    assert bool(result.success) == (int(result.pred_adv) != 1)


@pytest.mark.gpu
def test_attack_runs_on_the_models_gpu():
    model = tiny_model("conv", (3, 8, 8), 10, seed=6).cuda()
    x = torch.rand((16, 3, 8, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x.cuda()).argmax(1).cpu()
    attack = get_attack("apgd-ce", "l2", 0.5, n_iter=10, autocast_bf16=True, channels_last=True)
    result = attack(model, x, y)
    assert result.x_adv.is_cuda and result.success.is_cuda
    assert (lp_norm(result.x_adv.float() - x.cuda(), "l2") <= 0.5 * (1 + 1e-5)).all()
    assert_same(result, attack(model, x, y))


def test_checkpoints_follow_the_papers_recursion():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in hundredths.
    p = [0, 22]
    while p[-1] + max(p[-1] - p[-2] - 3, 6) <= 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    for n_iter in (100, 300, 1000):
        assert checkpoints(n_iter) == [q * n_iter // 100 for q in p[1:]]
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]


def test_halve_step_conditions():
    rising = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    jagged = torch.tensor([[0.0], [1.0], [0.5], [1.5], [1.0]])  # 2 of 4 steps up < 0.75 * 4
    no = torch.tensor([False])
    yes = torch.tensor([True])
    best = torch.tensor([4.0])
    assert not halve_step(rising, 0.75, no, torch.tensor([0.0]), best).item()
    assert halve_step(jagged, 0.75, no, torch.tensor([0.0]), torch.tensor([1.5])).item()
    assert not halve_step(jagged, 0.5, no, torch.tensor([0.0]), torch.tensor([1.5])).item()
    # best loss stuck: halve unless the step was already halved at the last checkpoint
    assert halve_step(rising, 0.75, no, best, best).item()
    assert not halve_step(rising, 0.75, yes, best, best).item()


def test_dlr_losses_match_the_formulas():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7))
    y = rng.integers(0, 7, 50)
    t = (y + rng.integers(1, 7, 50)) % 7
    s = np.sort(z, axis=1)
    rows = np.arange(50)
    z_other = np.where(z.argmax(1) == y, s[:, -2], s[:, -1])
    expect = -(z[rows, y] - z_other) / (s[:, -1] - s[:, -3] + 1e-12)
    expect_t = -(z[rows, y] - z[rows, t]) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)
    zt, yt, tt = torch.tensor(z), torch.tensor(y), torch.tensor(t)
    np.testing.assert_allclose(dlr_loss(zt, yt).numpy(), expect, rtol=1e-10)
    np.testing.assert_allclose(dlr_targeted_loss(zt, yt, tt).numpy(), expect_t, rtol=1e-10)


def _scipy_l1_box_projection(x: np.ndarray, target: np.ndarray, eps: float) -> np.ndarray:
    """argmin ||z - target|| over z in [0, 1] with ||z - x||_1 <= eps, by SLSQP.

    With d = u - w (u, w >= 0) the problem is a smooth convex QP that SLSQP solves accurately.
    """
    from scipy.optimize import minimize

    n = len(x)
    v = target - x

    def residual(uw):
        return uw[:n] - uw[n:] - v

    res = minimize(
        lambda uw: np.sum(residual(uw) ** 2),
        np.zeros(2 * n),
        jac=lambda uw: np.concatenate([2 * residual(uw), -2 * residual(uw)]),
        bounds=[(0, 1 - xi) for xi in x] + [(0, xi) for xi in x],
        constraints=[
            {"type": "ineq", "fun": lambda uw: eps - uw.sum(), "jac": lambda uw: -np.ones(2 * n)}
        ],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return x + res.x[:n] - res.x[n:]


def test_l1_box_projection_matches_scipy():
    rng = np.random.default_rng(1)
    for _ in range(6):
        x = rng.uniform(0, 1, 6)
        x[rng.random(6) < 0.3] = rng.integers(0, 2)  # some coordinates on the box's faces
        target = x + rng.normal(scale=0.6, size=6)
        eps = float(rng.uniform(0.1, 1.5))
        expect = _scipy_l1_box_projection(x, target, eps)
        got = project_l1_box(torch.tensor(x[None]), torch.tensor(target[None]), eps)[0].numpy()
        np.testing.assert_allclose(got, expect, atol=1e-6)
        assert np.abs(got - x).sum() <= eps * (1 + 1e-9) and got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_enforce_constraints_keeps_inside_points_and_pulls_back_outside_ones(norm):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((4, 1, 3, 3), generator=gen)
    inside = (x + 0.001 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    assert torch.equal(enforce_constraints(x, inside, norm, 1.0), inside)
    outside = x + 2 * torch.randn(x.shape, generator=gen)
    fixed = enforce_constraints(x, outside, norm, 0.1)
    assert (lp_norm(fixed - x, norm) <= 0.1 * (1 + 1e-6)).all()
    assert fixed.min() >= 0 and fixed.max() <= 1


def test_list_attacks_names_the_apgd_family_and_foolbox():
    names = list_attacks()
    assert {
        "apgd-ce",
        "apgd-dlr",
        "apgd-t",
        "foolbox:LinfPGD",
        "foolbox:L2CarliniWagnerAttack",
    } <= set(names)


def test_attack_result_checks_its_shapes():
    x = torch.zeros((3, 1, 2, 2))
    ok = {
        "success": torch.zeros(3, dtype=torch.bool),
        "norm": torch.zeros(3),
        "pred_clean": torch.zeros(3, dtype=torch.int64),
        "pred_adv": torch.zeros(3, dtype=torch.int64),
    }
    AttackResult(x_adv=x, **ok)
    with pytest.raises(ValueError, match="success"):
        AttackResult(x_adv=x, **{**ok, "success": torch.zeros(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="pred_adv"):
        AttackResult(x_adv=x, **{**ok, "pred_adv": torch.zeros(3)})


@pytest.mark.parametrize("eps", [0, -0.1, float("nan"), float("inf"), "big", None])
def test_bad_eps(eps):
    with pytest.raises(ConfigError, match="eps"):
        get_attack("apgd-ce", "linf", eps)


@pytest.mark.parametrize(
    "args,kw,match",
    [
        (("apgd-cee", "linf", 0.1), {}, "apgd-ce"),
        (("pgd", "linf", 0.1), {}, "'pgd' is not a known attack"),
        (("foolbox:LinfPDG", "linf", 0.1), {}, "LinfPGD"),
        (("foolbox:LinfPGD", "l2", 0.1), {}, "linf norm, not l2.*L2PGD"),
        (("foolbox:SpatialAttack", "linf", 0.1), {}, "not bounded"),
        (("foolbox:LinfPGD", "linf", 0.1), {"stepz": 3}, "stepz"),
        (("apgd-ce", "l3", 0.1), {}, "linf, l2, l1"),
        (("apgd-ce", "linf", 0.1), {"n_target_classes": 3}, "n_target_classes"),
        (("apgd-ce", "linf", 0.1), {"n_iter": 0}, "n_iter"),
        (("apgd-ce", "linf", 0.1), {"rho": 0.0}, "rho"),
        (("apgd-t", "linf", 0.1), {"n_target_classes": 0}, "n_target_classes"),
    ],
)
def test_bad_configuration(args, kw, match):
    with pytest.raises(ConfigError, match=match):
        get_attack(*args, **kw)


def test_bad_inputs():
    model, x, y = _linear_problem(n_classes=3, seed=7)
    attack = get_attack("apgd-ce", "linf", 0.1, n_iter=2)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        attack(model, x * 255, y)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        attack(model, torch.where(x > 0.5, float("nan"), x), y)
    with pytest.raises(DataError, match="labels"):
        attack(model, x, y[:-1])
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\]"):
        attack(model, x, y + 3)
    with pytest.raises(ConfigError, match="at least 4 classes"):
        get_attack("apgd-t", "linf", 0.1, n_iter=2)(model, x, (y + 1) % 3)  # none attacked
    with pytest.raises(ConfigError, match="at least 4 classes"):
        get_attack("apgd-t", "linf", 0.1, n_iter=2)(model, x, y)
    with pytest.raises(AdvlensError, match="seed"):
        attack(model, x, y, seed=1.5)


def test_training_mode_model_is_switched_to_eval_with_a_warning(caplog):
    model, x, y = _linear_problem(n_classes=3, seed=8)
    model.train()
    with caplog.at_level(logging.WARNING, logger="advlens.attacks"):
        result = get_attack("apgd-ce", "linf", 0.05, n_iter=2)(model, x, y)
    assert not model.training
    assert any("training mode" in r.getMessage() for r in caplog.records)
    assert result.x_adv.shape == x.shape


def test_foolbox_import_warning_does_not_escape():
    code = "from advlens.attacks import get_attack\nget_attack('foolbox:LinfPGD', 'linf', 0.1)\n"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
