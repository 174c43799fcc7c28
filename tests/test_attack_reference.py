"""advlens' APGD against reference implementations on the default Fashion-MNIST model.

Full size (``slow``, ``make test-all``): on 500 correctly classified test images, with the same
eps and 100 iterations, advlens' APGD-CE and APGD-DLR must fool at least as many images as
torchattacks' ``APGD`` (same loss, steps=100) minus 1 percentage point, and at least as many as
foolbox's PGD with the same budget (steps=100). torchattacks and foolbox are called directly,
not through advlens. At the default eps (Linf 0.1, L2 1.5) every attack fools ~97% of this
undefended model, which tells implementations apart only when one is broken; the informative
comparisons use a smaller eps where about half of the images resist (asserted). Each attack
run is 500 images x 100 iterations: about 150 s for the twelve runs on 2 idle cores.

Small (``make test``): :func:`test_apgd_small_reaches_torchattacks_loss`, 100 images against
torchattacks alone, on the loss APGD maximises rather than on a success count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advlens.attacks import get_attack

# A test-only dependency, installed without its declared requirements (torchvision would
# replace this machine's torch): pip install --no-deps torchattacks==3.5.1
torchattacks = pytest.importorskip(
    "torchattacks", reason="pip install --no-deps torchattacks==3.5.1"
)

N = 500
N_SMALL = 100
N_ITER = 100
INFORMATIVE_EPS = {"linf": 0.03, "l2": 0.5}
DEFAULT_EPS = {"linf": 0.1, "l2": 1.5}

_runs: dict[tuple, float] = {}  # memo: foolbox's PGD serves both losses


@pytest.fixture(scope="module")
def samples(fmnist_model):
    """500 correctly classified, class-balanced test images as tensors on the model's device."""
    from advlens.data import stratified_sample

    model, test = fmnist_model
    device = next(model.parameters()).device
    pos = stratified_sample(test.labels, 2 * N, seed=0)
    x = torch.from_numpy(test.images[pos]).to(device)
    y = torch.from_numpy(test.labels[pos]).to(device)
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).cpu().numpy()
    keep = np.flatnonzero(correct)[:N]
    assert len(keep) == N
    return model, x[keep], y[keep]


def _rate(model, x_adv, y) -> float:
    with torch.no_grad():
        return float((model(x_adv).argmax(1) != y).float().mean())


def success_rate(impl: str, loss: str, norm: str, eps: float, samples) -> float:
    """Fraction of the samples fooled by ``impl`` (advlens, torchattacks, foolbox)."""
    key = (impl, "pgd" if impl == "foolbox" else loss, norm, eps)
    if key in _runs:
        return _runs[key]
    model, x, y = samples
    with torch.random.fork_rng(devices=[]):  # the references seed torch's global generator
        if impl == "advlens":
            result = get_attack(f"apgd-{loss}", norm, eps, n_iter=N_ITER, seed=0)(model, x, y)
            rate = float(result.success.float().mean())
        elif impl == "torchattacks":
            ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
            ref = torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=N_ITER, loss=loss, seed=0)
            rate = _rate(model, ref(x, y), y)
        else:
            from advlens.attacks.foolbox_attacks import import_foolbox

            fb = import_foolbox()
            torch.manual_seed(0)
            pgd = {"linf": fb.attacks.LinfPGD, "l2": fb.attacks.L2PGD}[norm](steps=N_ITER)
            fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0))
            _, clipped, _ = pgd(fmodel, x, y, epsilons=eps)
            rate = _rate(model, clipped, y)
    _runs[key] = rate
    print(f"{impl:12s} {key[1]:4s} {norm:4s} eps={eps:g}: success {rate:.3f}")
    return rate


def check_against_references(loss: str, norm: str, eps: float, samples, informative: bool):
    ours = success_rate("advlens", loss, norm, eps, samples)
    ta = success_rate("torchattacks", loss, norm, eps, samples)
    fb = success_rate("foolbox", loss, norm, eps, samples)
    if informative:
        assert 0.2 < ta < 0.9, f"eps {eps} no longer separates the attacks (torchattacks {ta:.3f})"
    assert ours >= ta - 0.01, f"advlens APGD-{loss} {ours:.3f} < torchattacks {ta:.3f} - 1pp"
    assert ours >= fb, f"advlens APGD-{loss} {ours:.3f} < foolbox PGD {fb:.3f}"


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_small_reaches_torchattacks_loss(norm, samples):
    """On 100 images (CE, the informative eps, 100 iterations), the loss advlens' APGD-CE
    reaches per image is at least torchattacks' best loss, on average, minus 0.03, and its
    success rate is at least torchattacks' minus 2 images.

    The mean best loss is what catches a wrong step-size schedule at this size. Checked with
    scratch edits of pipeline/attacks/apgd.py, then reverted (2-core CPU, torch 2.13): with
    the step never halved (``step / 2.0`` at a checkpoint replaced by ``step``) the mean falls
    0.145 (Linf) and 0.197 (L2) below torchattacks' and both cases fail; the correct code lies
    at +0.0005 and -0.0041. Success rates move by only 1-2 images (0.53 vs 0.55), too few to
    tell at 100 images. Wrong checkpoint spacing (every 10% of the iterations) moves the mean
    by only -0.002 / -0.007, within the noise of 100 images, and passes here: the checkpoints
    themselves are checked exactly by
    ``test_attacks.py::test_checkpoints_follow_the_papers_recursion``, which fails with it.
    """
    model, x, y = samples
    x, y = x[:N_SMALL], y[:N_SMALL]
    eps = INFORMATIVE_EPS[norm]
    with torch.random.fork_rng(devices=[]):  # torchattacks seeds torch's global generator
        result = get_attack("apgd-ce", norm, eps, n_iter=N_ITER, seed=0)(model, x, y)
        ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
        ref = torchattacks.APGD(model, norm=ta_norm, eps=eps, steps=N_ITER, loss="ce", seed=0)
        ta_loss, ta_best = ref.perturb(x, y, best_loss=True)
    with torch.no_grad():
        ours = torch.nn.functional.cross_entropy(model(result.x_adv), y, reduction="none")
    gap = float((ours - ta_loss).mean())
    ours_rate, ta_rate = float(result.success.float().mean()), _rate(model, ta_best, y)
    print(f"{norm}: mean CE gap to torchattacks {gap:+.4f}, success {ours_rate} vs {ta_rate}")
    assert 0.2 < ta_rate < 0.9, f"eps {eps} no longer separates the attacks ({ta_rate:.2f})"
    assert gap >= -0.03, f"advlens APGD-CE reaches a mean loss {gap:+.4f} below torchattacks'"
    assert ours_rate >= ta_rate - 2 / N_SMALL, f"success {ours_rate:.2f} < torchattacks {ta_rate}"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_linf_matches_references(loss, samples):
    check_against_references(loss, "linf", INFORMATIVE_EPS["linf"], samples, informative=True)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_l2_matches_references(loss, samples):
    check_against_references(loss, "l2", INFORMATIVE_EPS["l2"], samples, informative=True)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_references_at_default_eps(loss, norm, samples):
    check_against_references(loss, norm, DEFAULT_EPS[norm], samples, informative=False)
