"""Train the default small CNN and cache its weights (once per machine).

The weights go to ``$ADVLENS_CACHE/models/small-cnn-<dataset>-s<seed>.pt`` (default cache:
``~/.cache/advlens``) as a plain state dict, with a JSON sidecar (accuracy, epochs,
seconds). A cached model is never trained again; ``--force`` retrains.

Examples:
  advlens train                         # Fashion-MNIST, seed 0, 4 epochs (~2 min on 2 cores)
  advlens train --seed 1 --epochs 6
  advlens train --dataset synthetic --quiet
  ADVLENS_CACHE=/tmp/cache advlens train --force
  advlens train --adversarial pgd-linf --eps 0.1 --steps 7   # Madry et al. PGD training

Adversarial training (``--adversarial pgd-linf``) replaces every training batch by its PGD
adversarial examples (Madry et al. 2018: random start in the eps ball, ``steps`` signed-gradient
steps of 2.5 eps / steps, projection), generated with the model in eval mode; it is seeded and
cached like the standard model, in a file whose name carries the recipe
(``small-cnn-<dataset>-s<seed>-pgd-linf-e0.1-k7.pt``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advlens._io import atomic_write, write_json
from advlens.config import ADVERSARIAL, AdvRecipe
from advlens.data import Dataset, load_dataset
from advlens.errors import ConfigError
from advlens.models.small_cnn import (
    TRAINABLE,
    SmallCNN,
    cache_dir,
    is_fresh,
    read_sidecar,
    recipe_of,
    weights_path,
)
from advlens.progress import bar as progress_bar

log = logging.getLogger(__name__)

# Re-exported: where the cached weights live is the model's fact (models/small_cnn.py).
__all__ = [
    "ADVERSARIAL",
    "TRAINABLE",
    "AdvRecipe",
    "cache_dir",
    "ensure_trained",
    "ensure_weights",
    "evaluate",
    "pgd_linf",
    "read_sidecar",
    "train_small_cnn",
    "weights_path",
]
MIN_ACCURACY = {"fashion-mnist": 0.88}


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recipe: AdvRecipe,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Madry et al.'s PGD: random start, signed-gradient ascent steps, projection to the eps ball
    and to [0, 1]. Uses (and so advances) torch's global RNG, seeded by the caller."""
    eps, alpha = recipe.eps, 2.5 * recipe.eps / recipe.steps
    adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(recipe.steps):
        adv.requires_grad_(True)
        grad = torch.autograd.grad(loss_fn(model(adv), y), adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def train_small_cnn(
    ds_train: Dataset,
    ds_test: Dataset | None = None,
    *,
    epochs: int = 4,
    seed: int = 0,
    batch_size: int = 128,
    device: str = "cpu",
    lr: float = 2e-3,
    progress: bool = False,
    adversarial: AdvRecipe | None = None,
) -> tuple[SmallCNN, float]:
    """Train :class:`~advlens.models.small_cnn.SmallCNN` with Adam and a one-cycle schedule;
    on PGD adversarial examples of each batch with ``adversarial`` (:func:`pgd_linf`).

    Returns ``(model in eval mode, test accuracy)``; the accuracy is NaN without ``ds_test``.
    Seeded: the same data, seed and thread count give the same weights.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmallCNN(ds_train.shape, len(ds_train.classes)).to(device)
    x_all = torch.from_numpy(ds_train.images)
    y_all = torch.from_numpy(ds_train.labels)
    n = len(x_all)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    bar = progress_bar(
        total=steps, desc="train small-cnn", unit="step", enabled=None if progress else False
    )
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x_all[idx].to(device), y_all[idx].to(device)
            if adversarial is not None:
                model.eval()  # attack the model as it is, without touching its state
                xb = pgd_linf(model, xb, yb, adversarial, loss_fn)
                model.train()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.3f}")
        log.info("epoch %d/%d: train loss %.4f", epoch + 1, epochs, total / n)
    bar.close()
    model.eval()
    acc = evaluate(model, ds_test, device=device) if ds_test is not None else float("nan")
    return model, acc


def evaluate(
    model: nn.Module, ds: Dataset, *, batch_size: int = 1000, device: str = "cpu"
) -> float:
    """Top-1 accuracy of ``model`` on dataset ``ds``."""
    correct = 0
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            xb = torch.from_numpy(ds.images[start : start + batch_size]).to(device)
            pred = model(xb).argmax(1).cpu().numpy()
            correct += int((pred == ds.labels[start : start + batch_size]).sum())
    return correct / max(len(ds), 1)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive lock so that concurrent processes train a given model only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_trained(
    dataset: str = "fashion-mnist",
    seed: int = 0,
    epochs: int = 4,
    *,
    force: bool = False,
    progress: bool = True,
    data_path: str | None = None,
    adversarial: AdvRecipe | None = None,
) -> Path:
    """Path of the cached trained small CNN; trains and caches it first if missing.

    A cached file trained with a different number of epochs (or recipe) is retrained.
    """
    if dataset not in TRAINABLE:
        raise ConfigError(f"advlens trains small-cnn on {', '.join(TRAINABLE)}, not {dataset!r}")
    if epochs < 1:
        raise ConfigError(f"model.train_epochs = {epochs}: must be at least 1")
    path = weights_path(dataset, seed, adversarial)
    if not force and is_fresh(path, epochs, adversarial):
        return path
    with _lock(path.with_suffix(".lock")):
        if not force and is_fresh(path, epochs, adversarial):  # another process finished it
            return path
        _train_and_save(dataset, seed, epochs, path, progress, data_path, adversarial)
    return path


def ensure_weights(
    cfg: Any, dataset: str, *, data_path: str | None = None, progress: bool | None = None
) -> None:
    """Train and cache the small CNN that ``cfg`` (a ModelConfig) names, when it needs that.

    The run layer calls this before building a model (building never trains): only
    ``small-cnn`` without ``model.checkpoint`` on a dataset advlens trains it on.
    """
    if cfg.name != "small-cnn" or cfg.checkpoint or dataset not in TRAINABLE:
        return
    if progress is None:  # a bar unless logging is quiet (`advlens --quiet` sets WARNING)
        progress = logging.getLogger("advlens").isEnabledFor(logging.INFO)
    ensure_trained(
        dataset, seed=cfg.train_seed, epochs=cfg.train_epochs, progress=progress,
        data_path=data_path, adversarial=recipe_of(cfg),
    )  # fmt: skip


def _recipe_meta(recipe: AdvRecipe | None) -> dict | None:
    return dataclasses.asdict(recipe) if recipe else None


def _train_and_save(
    dataset, seed, epochs, path: Path, progress: bool, data_path, adversarial=None
) -> None:
    train = load_dataset(dataset, "train", data_path)
    test = load_dataset(dataset, "test", data_path)
    log.info(
        "training small-cnn on %s (%d images, %d epochs, seed %d)",
        dataset,
        len(train),
        epochs,
        seed,
    )
    t0 = time.perf_counter()
    model, acc = train_small_cnn(
        train, test, epochs=epochs, seed=seed, progress=progress, adversarial=adversarial
    )
    seconds = time.perf_counter() - t0
    floor = MIN_ACCURACY.get(dataset)
    if floor is not None and acc < floor and adversarial is None:
        log.warning(
            "small-cnn reached %.2f%% test accuracy, below the %.0f%% target",
            100 * acc,
            100 * floor,
        )
    state = model.state_dict()
    meta = {
        "model": "small-cnn",
        "dataset": dataset,
        "seed": seed,
        "epochs": epochs,
        "test_accuracy": round(acc, 6),
        "adversarial": _recipe_meta(adversarial),
        "seconds": round(seconds, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # readers: the old or the new file
    write_json(path.with_suffix(".json"), meta)
    log.info("saved %s (test accuracy %.2f%%, %.0f s)", path, 100 * acc, seconds)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", choices=TRAINABLE)
    parser.add_argument("--data-path", default=None, help="folder with the dataset files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    parser.add_argument("--adversarial", default=None, choices=ADVERSARIAL,
                        help="adversarial training (Madry et al. PGD)")  # fmt: skip
    parser.add_argument("--eps", type=float, default=0.1, help="adversarial training budget")
    parser.add_argument("--steps", type=int, default=7, help="PGD steps per batch")


def main(args: argparse.Namespace) -> int:
    recipe = AdvRecipe(args.adversarial, args.eps, args.steps) if args.adversarial else None
    path = weights_path(args.dataset, args.seed, recipe)
    cached = path.is_file() and not args.force
    path = ensure_trained(
        args.dataset,
        args.seed,
        args.epochs,
        force=args.force,
        progress=not getattr(args, "quiet", False),
        data_path=args.data_path,
        adversarial=recipe,
    )
    meta = read_sidecar(path) or {}
    state = "cached" if cached and meta.get("epochs") == args.epochs else "trained"
    acc = meta.get("test_accuracy")
    acc_text = f"{100 * acc:.2f}%" if isinstance(acc, float) else "?"
    print(
        f"small-cnn ({state}): {path}  test accuracy {acc_text}, {meta.get('seconds', '?')} s training"
    )
    return 0
