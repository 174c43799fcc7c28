"""Run the whole layer analysis: attack, extract, then reduce, embed and score every layer.

Examples
--------
  advlens run                                   # the embedded default (configs/default.toml)
  advlens run --set data.n=200 --set attack.norms=linf
  advlens run --config configs/cifar10-wrn28-10.toml --set data.path=/data/cifar10
  advlens run --workers 2                       # layer tasks on two local Dask workers
  advlens run --gpus 0,1                        # one layer task per GPU
  advlens run --scheduler tcp://head:8786       # an existing Dask cluster

Results go to ``<output.root>/<output.name>/``. Rerunning the same command resumes a killed
run; a run folder written with other settings is refused unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advlens import __version__
from advlens.config import RunConfig, load
from advlens.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: its folder, its metrics rows and seconds per stage."""

    run_dir: Path
    rows: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="TOML file (default: configs/default.toml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set data.n=200",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run folder that was written with other settings",
    )
    parser.add_argument("--workers", type=int, default=None, help="local Dask worker processes")
    parser.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    parser.add_argument("--gpus", default=None, help="GPUs to use, e.g. 0,1 (default: all)")


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.overwrite:
        overrides.append("output.overwrite=true")
    if args.workers is not None:
        overrides.append(f"schedule.workers={args.workers}")
    if args.scheduler:
        overrides.append(f'schedule.scheduler="{args.scheduler}"')
    if args.gpus:
        overrides.append(f"schedule.gpus=[{args.gpus}]")
    cfg = load(args.config, overrides)
    result = run(cfg, progress=not args.quiet)
    from advlens.report import summary

    print(summary(result.rows, result.run_dir))
    return 0


def run(cfg: RunConfig, *, progress: bool = True) -> RunResult:
    """Run every stage of ``cfg`` and return the metrics rows; resumes a killed run."""
    from advlens.analyze import LayerTask, run_layer_task
    from advlens.schedule import run_tasks

    _check_names(cfg)
    timings: dict[str, float] = {}
    # Absolute paths: Dask workers may run in another working directory.
    run_dir = cfg.output.run_dir.resolve()
    if cfg.output.overwrite and (run_dir / "tasks").exists():
        shutil.rmtree(run_dir / "tasks")
    run_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    model, data, device = _model_and_data(cfg)
    timings["model"] = time.perf_counter() - t

    from advlens.models.taps import catalog, select_layers

    in_shape = tuple(data.images.shape[1:])
    cat = catalog(model, in_shape)
    layers = select_layers(cat, cfg.layers.select, include_input=cfg.layers.include_input)
    shapes = {info.name: info.shape for info in cat}
    widths = {name: _width(shapes[name], cfg.layers.pool) for name in layers}

    t = time.perf_counter()
    samples, clean_accuracy = _pick_samples(cfg, model, data, device)
    timings["select"] = time.perf_counter() - t

    stores: list[tuple[str, str, float, Path]] = []
    t = time.perf_counter()
    for attack_name in cfg.attack.attack_names:
        for norm in cfg.attack.norms:
            eps = cfg.attack.eps_for(norm, data.name)
            path = _attack_and_extract(
                cfg, model, samples, attack_name, norm, eps, layers, widths, device, progress
            )
            stores.append((attack_name, norm, eps, path.resolve()))
    timings["attack+extract"] = time.perf_counter() - t

    # A worker pinned to one GPU sees it as cuda:0, so tasks name no device index.
    task_device = "cuda" if device.startswith("cuda") else "cpu"
    tasks = [
        LayerTask(
            store=str(path),
            run_dir=str(run_dir),
            attack=_slug(a),
            norm=norm,
            eps=eps,
            layer=layer,
            layer_index=i,
            engine=engine,
            seed=seed,
            perplexity=perp,
            embed=cfg.embed,
            overlap=cfg.overlap,
            device=task_device,
        )
        for (a, norm, eps, path) in stores
        for i, layer in enumerate(layers)
        for engine in cfg.embed.engine_names
        for seed in cfg.embed.seed_list
        for perp in cfg.embed.perplexity_list
    ]
    t = time.perf_counter()
    s = cfg.schedule
    rows = run_tasks(
        run_layer_task,
        tasks,
        workers=s.workers,
        scheduler=s.scheduler,
        gpus=s.gpus,
        retries=s.retries,
        progress=progress,
    )
    timings["layers"] = time.perf_counter() - t
    for stage in ("reduce", "embed", "overlap"):
        timings[stage] = float(sum(r.get(f"seconds_{stage}") or 0.0 for r in rows))

    t = time.perf_counter()
    from advlens.report import write_outputs

    provenance = _provenance(cfg, model, data, device, layers, shapes, timings)
    provenance["accuracy"] = accuracy_record(clean_accuracy, len(data.labels), stores)
    write_outputs(run_dir, rows, layers, provenance)
    timings["report"] = time.perf_counter() - t
    return RunResult(run_dir=run_dir, rows=rows, timings=timings, layers=layers)


def build_attack(cfg: RunConfig, name: str, norm: str, eps: float):
    """The attack ``name`` with ``cfg``'s budget; eps = 0 gives the unperturbed baseline."""
    from advlens.attacks import Unperturbed, get_attack

    a = cfg.attack
    if eps == 0:
        log.info("%s %s: eps = 0, so every perturbed twin is its clean image", name, norm)
        return Unperturbed(name=name, norm=norm, eps=0.0, seed=a.seed)
    return get_attack(
        name, norm, eps, n_iter=a.n_iter, n_restarts=a.n_restarts, rho=a.rho, seed=a.seed,
        autocast_bf16=a.autocast_bf16, channels_last=a.channels_last,
    )  # fmt: skip


def _check_names(cfg: RunConfig) -> None:
    """Fail before any work when an engine or attack named in ``cfg`` cannot run."""
    from advlens._optional import HINTS
    from advlens.embed import get_engine

    for name in cfg.embed.engine_names:
        if not get_engine(name).available():
            raise ConfigError(
                f"embed.engine = {name!r} is not usable on this machine (it needs "
                f"{'a GPU and ' + HINTS[name] if name in HINTS else 'a GPU'}); "
                "pick opentsne or sklearn, or auto"
            )
    for name in cfg.attack.attack_names:
        for norm in cfg.attack.norms:
            build_attack(cfg, name, norm, cfg.attack.eps_for(norm, cfg.data.source))


def _model_and_data(cfg: RunConfig):
    from advlens.data import load_dataset
    from advlens.models import build_model
    from advlens.reduce import resolve_device

    device = resolve_device(cfg.model.device)
    data = load_dataset(cfg.data.source, split=cfg.data.split, path=cfg.data.path)
    model = build_model(cfg.model, data.name, tuple(data.images.shape[1:]), len(data.classes))
    model = model.to(device).eval()
    return model, data, device


def _pick_samples(cfg: RunConfig, model, data, device: str):
    """Seeded, class-stratified sample of ``data.n`` correctly classified images, and the
    clean accuracy on the whole split."""
    import torch

    from advlens.data import stratified_sample

    preds = []
    with torch.no_grad():
        for start in range(0, len(data.labels), 1000):
            x = torch.as_tensor(data.images[start : start + 1000], device=device)
            preds.append(model(x).argmax(1).cpu().numpy())
    correct = np.flatnonzero(np.concatenate(preds) == data.labels)
    if len(correct) < cfg.data.n:
        raise ConfigError(
            f"data.n = {cfg.data.n}, but only {len(correct)} of the {len(data.labels)} "
            f"{data.name} {cfg.data.split} images are classified correctly (only those are "
            "attacked); lower data.n"
        )
    accuracy = len(correct) / len(data.labels)
    log.info("clean accuracy %.4f on %d %s images", accuracy, len(data.labels), data.name)
    picked = correct[stratified_sample(data.labels[correct], cfg.data.n, cfg.data.seed)]
    return data.subset(picked), accuracy


def accuracy_record(clean: float, n_split: int, stores) -> dict[str, Any]:
    """Clean accuracy on the split and robust accuracy per attack and norm: the share of the
    split still classified correctly under attack, clean x (1 - success rate), since only
    correctly classified images are attacked (a seeded sample of them)."""
    from advlens.store import ActivationStore

    robust = {}
    for attack, norm, _eps, path in stores:
        success = ActivationStore.open(path).samples()["success"]
        robust[f"{_slug(attack)} {norm}"] = float(clean * (1 - np.mean(success)))
    return {"clean": float(clean), "n_split": int(n_split), "robust": robust}


def _attack_and_extract(
    cfg, model, samples, attack_name, norm, eps, layers, widths, device, progress
) -> Path:
    from advlens.extract import extract
    from advlens.store import ActivationStore

    a = cfg.attack
    attack = build_attack(cfg, attack_name, norm, eps)
    # Only what shapes the activations decides whether an existing store can be resumed.
    full = cfg.to_dict()
    identity = {
        "data": full["data"],
        "model": full["model"],
        "attack": {
            "name": attack_name,
            "norm": norm,
            "eps": eps,
            "n_iter": a.n_iter,
            "n_restarts": a.n_restarts,
            "rho": a.rho,
            "seed": a.seed,
            "batch_size": a.batch_size,
        },
        "layers": full["layers"],
        "dtype": cfg.output.dtype,
    }
    attrs = {
        "config": identity,
        "run_config": full,
        "advlens_version": __version__,
        "model": cfg.model.name,
        "dataset": samples.name,
    }
    path = cfg.output.run_dir / f"{_slug(attack_name)}-{norm}.zarr"
    store = ActivationStore.create(
        path,
        n=len(samples.labels),
        layers=widths,
        batch_size=a.batch_size,
        dtype=cfg.output.dtype,
        attrs=attrs,
        overwrite=cfg.output.overwrite,
    )
    if not store.is_complete():
        extract(
            model,
            samples,
            attack,
            store,
            layers,
            device=device,
            pool=cfg.layers.pool,
            progress=progress,
            seed=a.seed,
        )
    return path


def _width(shape: tuple[int, ...], pool: str) -> int:
    if pool == "gap" and len(shape) == 3:
        return int(shape[0])
    return int(np.prod(shape))


def _slug(name: str) -> str:
    return name.replace(":", "-").replace("/", "-").lower()


def _provenance(cfg, model, data, device, layers, shapes, timings) -> dict[str, Any]:
    from advlens._env import device_name, versions

    libs = versions("torch", "numpy", "scipy", "scikit-learn", "openTSNE", "zarr", "dask",
                    "matplotlib", "foolbox")  # fmt: skip
    return {
        "advlens_version": __version__,
        "config": cfg.to_dict(),
        "model": {
            "name": cfg.model.name,
            "checkpoint": cfg.model.checkpoint,
            "parameters": int(sum(p.numel() for p in model.parameters())),
        },
        "dataset": {
            "name": data.name,
            "split": cfg.data.split,
            "n": cfg.data.n,
            "classes": list(data.classes),
        },  # fmt: skip
        "layers": [{"name": name, "shape": list(shapes[name])} for name in layers],
        "device": f"{device} ({device_name(device)})",
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": libs,
        "timings": timings,
    }
