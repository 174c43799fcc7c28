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

Exit status: 0 when every layer task produced a row; 1 when some failed (metrics and report
are still written, the summary names the failed tasks; rerun to retry them); 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advlens._env import device_name, resolve_device, versions
from advlens._io import WRITTEN, record, remove_written, slug
from advlens._optional import HINTS
from advlens._version import __version__
from advlens.attacks import Attack, Unperturbed, check_finite, get_attack
from advlens.config import RunConfig, load, shaping_keys, store_identity
from advlens.data import SOURCES, Dataset, dataset_shape, load_dataset, stratified_sample
from advlens.embed import TSNEParams, get_engine, max_perplexity, resolve_engine
from advlens.errors import ConfigError, StoreError
from advlens.extract import extract, plan_queue, plan_sub_batch
from advlens.kernels.metrics import auto_k
from advlens.layer_task import LayerTask, run_layer_task
from advlens.models import build_model, fingerprint, get_factory
from advlens.models.taps import catalog, layer_aliases, select_layers
from advlens.models.user import cwd_importable
from advlens.report import summary, write_outputs
from advlens.report.tables import read_task_row
from advlens.schedule import check_plan, driver_device, plan_cluster, release_device, run_tasks
from advlens.store import ActivationStore
from advlens.train import ensure_weights

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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the stores, layers and tasks the run would create, and their disk space",
    )


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
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    result = run(cfg, progress=not args.quiet)

    print(summary(result.rows, result.run_dir))
    return exit_code(result.rows)


def exit_code(rows: list[dict[str, Any]]) -> int:
    """0 when there are rows and none records an error, else 1."""
    return 0 if rows and not any(r.get("error") for r in rows) else 1


def validate(cfg: RunConfig, *, data_given: bool = False) -> RunConfig:
    """Check the settings that depend on each other; needs no data, model or attack.

    ``data_given``: the caller passes its own images (the Python API), so ``data.source``
    names no dataset to load. Raises :class:`ConfigError` naming the key. Called before any
    work (see :func:`run`). It lives here, above the stages, because it asks them (data
    sources, t-SNE parameters); config.py itself imports no stage.
    """
    if not data_given and cfg.data.source not in SOURCES:
        raise ConfigError(str(SOURCES.unknown(cfg.data.source)))
    for seed in cfg.embed.seed_list:
        for perp in cfg.embed.perplexity_list:
            TSNEParams.from_config(cfg.embed, seed=seed, perplexity=perp)
    points = 2 * cfg.data.n  # every map holds N clean and N perturbed points
    k = auto_k(cfg.data.n) if cfg.overlap.k == "auto" else int(cfg.overlap.k)
    if k > points - 2:  # neighbours exclude the point itself and (share) its twin
        raise ConfigError(
            f"overlap.k = {k}: must be at most {points - 2}, the points of a map (2 x data.n = "
            f"{points}) other than a point and its twin; lower overlap.k or raise data.n"
        )
    dropped = [k for k in cfg.overlap.k_sweep if k > points - 2]
    if dropped:
        log.warning("overlap.k_sweep: k = %s left out (a map has only %d points)", dropped, points)
    limit = max_perplexity(points)
    for perp in cfg.embed.perplexity_list:
        if perp > limit:
            # Lowered in every engine alike; the row records it as perplexity_used.
            log.warning(
                "embed.perplexity = %g is too large for data.n = %d (%d points); the maps use "
                "the largest allowed value, %.4g (recorded as perplexity_used)",
                perp, cfg.data.n, points, limit,
            )  # fmt: skip
    return cfg


def run(
    cfg: RunConfig,
    *,
    progress: bool = True,
    model: torch.nn.Module | None = None,
    data: Dataset | None = None,
) -> RunResult:
    """Run every stage of ``cfg`` and return the metrics rows; resumes a killed run.

    ``model`` (an ``nn.Module``) and ``data`` (an :class:`advlens.data.Dataset`) replace the
    ones ``cfg`` names (the Python API passes its own). A run that fails before its first
    result removes the run folder it created.
    """
    run_dir = cfg.output.run_dir.resolve()
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # folders this run adds
    try:
        return _run(cfg, progress=progress, model=model, data=data)
    except BaseException:
        if made and run_dir.is_dir() and not _has_results(run_dir):
            shutil.rmtree(run_dir)
            for d in made[1:]:  # parents it created, while empty
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        raise


def _has_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished task or a stored batch (something to resume)."""

    if any((run_dir / "tasks").glob("*.json")):
        return True
    for path in run_dir.glob("*.zarr"):
        try:
            if ActivationStore.open(path).completed_batches().any():
                return True
        except Exception:  # a store cut short before its first batch holds nothing to keep
            continue
    return False


def _run(cfg: RunConfig, *, progress: bool, model, data) -> RunResult:
    # Every setting is checked before anything is deleted, loaded or attacked.
    validate(cfg, data_given=data is not None)
    _check_names(cfg, model_given=model is not None)
    s = cfg.schedule
    check_plan(workers=s.workers, scheduler=s.scheduler, gpus=s.gpus)
    timings: dict[str, float] = {}
    # Absolute paths: Dask workers may run in another working directory.
    run_dir = cfg.output.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    model, data, device = _model_and_data(cfg, model, data)
    timings["model"] = time.perf_counter() - t
    layers, shapes, widths, aliases = _layer_plan(cfg, model, tuple(data.images.shape[1:]))
    model_id = fingerprint(cfg.model, model)

    t = time.perf_counter()
    samples, clean_accuracy = _pick_samples(cfg, model, data, device)
    timings["select"] = time.perf_counter() - t

    if cfg.output.overwrite:  # only now: settings, model and data are known to be good
        _clear_tasks(run_dir)
    stores: list[tuple[str, str, float, Path]] = []
    t = time.perf_counter()
    for attack_name in cfg.attack.attack_names:
        for norm in cfg.attack.norms:
            eps = cfg.attack.eps_for(norm, data.name)
            path = _attack_and_extract(
                cfg, model, samples, attack_name, norm, eps, layers, widths, device, progress,
                model_id, aliases,
            )  # fmt: skip
            stores.append((attack_name, norm, eps, path.resolve()))
    timings["attack+extract"] = time.perf_counter() - t

    # An alias is the same tensor as its layer: its task would repeat that layer's to the bit.
    tasks = _tasks(cfg, stores, [x for x in layers if x not in aliases], run_dir, device, layers)
    t = time.perf_counter()
    if plan_cluster(workers=s.workers, scheduler=s.scheduler, gpus=s.gpus).kind != "in-process":
        model = release_device(model, device)  # GPU workers get the driver's GPU memory back
    rows = run_tasks(
        run_layer_task,
        tasks,
        workers=s.workers,
        scheduler=s.scheduler,
        gpus=s.gpus,
        retries=s.retries,
        progress=progress,
    )
    rows = alias_rows(rows, aliases, layers)
    timings["layers"] = time.perf_counter() - t
    for stage in ("reduce", "embed", "overlap"):
        timings[stage] = float(sum(r.get(f"seconds_{stage}") or 0.0 for r in rows))

    t = time.perf_counter()

    provenance = _provenance(cfg, model, data, device, layers, shapes, timings)
    provenance["model"] |= model_id
    provenance["accuracy"] = accuracy_record(clean_accuracy, len(data.labels), stores)
    write_outputs(run_dir, rows, layers, provenance)
    timings["report"] = time.perf_counter() - t
    return RunResult(run_dir=run_dir, rows=rows, timings=timings, layers=layers)


def sweep_start(
    config: str | None, overrides: list[str] | None, name: str | None, prefix: str, key: str
) -> tuple[RunConfig, dict[str, Any], Path]:
    """A sweep's base config, its summary (``key``: the list of runs) and its folder,
    ``<output.root>/<prefix>-<name>``."""
    overrides = list(overrides or [])
    base = load(config, overrides)
    name = name or base.output.name
    folder = Path(base.output.root) / f"{prefix}-{name}"
    out = {"name": name, "folder": str(folder), "config": config, "overrides": overrides, key: []}
    return base, out, folder


def sweep_point(
    config: str | None, overrides: list[str], output_name: str, *, progress: bool = True
) -> tuple[RunResult, float]:
    """One run of a sweep (``advlens sweep --n`` / ``--eps``): ``config`` with ``overrides``,
    written to ``output.name = output_name``; returns the result and its wall seconds."""
    cfg = load(config, [*overrides, f'output.name="{output_name}"'])
    t = time.perf_counter()
    result = run(cfg, progress=progress)
    return result, time.perf_counter() - t


def _layer_plan(cfg: RunConfig, model, in_shape: tuple[int, ...]):
    """The selected layers, every tappable layer's output shape, each selected width and the
    aliases among the selected layers (``{alias: layer}``: the same tensor, stored once)."""

    cat = catalog(model, in_shape)
    layers = select_layers(cat, cfg.layers.select, include_input=cfg.layers.include_input)
    shapes = {info.name: info.shape for info in cat}
    dims = {info.name: info.dim(cfg.layers.pool) for info in cat}
    widths = {name: dims[name] for name in layers}
    return layers, shapes, widths, layer_aliases(cat, layers)


def alias_rows(rows: list[dict], aliases: dict[str, str], layers: list[str]) -> list[dict]:
    """``rows`` plus, for every alias, a copy of its layer's rows under the alias's name and
    index, marked ``alias_of`` (the map and numbers are the layer's: the same tensor)."""
    if not aliases:
        return rows
    out = list(rows)
    for alias, layer in aliases.items():
        for r in rows:
            if r.get("layer") == layer:
                out.append(r | {"layer": alias, "layer_index": layers.index(alias),
                                "alias_of": layer})  # fmt: skip
    return sorted(out, key=lambda r: (str(r.get("attack")), str(r.get("norm")),
                                      r.get("layer_index") or 0))  # fmt: skip


def _tasks(cfg: RunConfig, stores, layers, run_dir: Path, device: str, order=None) -> list:
    """One layer task per store x layer x engine x seed x perplexity; a task's layer index is
    its place in ``order`` (default: ``layers``)."""

    # A worker pinned to one GPU sees it as cuda:0, so tasks name no device index.
    task_device = "cuda" if str(device).startswith("cuda") else "cpu"
    # openTSNE's result depends on its thread count: "all cores" is resolved here, once, so
    # that every worker uses the same count and the task id records it.
    embed_cfg = cfg.embed
    if embed_cfg.n_jobs == -1:
        embed_cfg = dataclasses.replace(embed_cfg, n_jobs=os.cpu_count() or 1)
    # Likewise engine "auto": the task id and the row name the engine that makes the map.
    engines = [resolve_engine(name) for name in cfg.embed.engine_names]
    return [
        LayerTask(
            store=str(path),
            run_dir=str(run_dir),
            attack=slug(a),
            norm=norm,
            eps=eps,
            layer=layer,
            layer_index=(order or layers).index(layer),
            engine=engine,
            seed=seed,
            perplexity=perp,
            embed=embed_cfg,
            overlap=cfg.overlap,
            device=task_device,
        )
        for (a, norm, eps, path) in stores
        for layer in layers
        for engine in engines
        for seed in cfg.embed.seed_list
        for perp in cfg.embed.perplexity_list
    ]


def dry_run(cfg: RunConfig) -> str:
    """What ``run(cfg)`` would create: stores with their size, layers and layer tasks.

    Builds the model without weights (nothing is trained or loaded) and reads only the
    dataset's image shape; nothing is written.
    """

    _check_names(cfg)
    in_shape, n_classes = dataset_shape(cfg.data.source, cfg.data.path, cfg.data.split)
    model = build_model(
        dataclasses.replace(cfg.model, device="cpu"), cfg.data.source, in_shape, n_classes,
        weights=False,
    )  # fmt: skip
    layers, shapes, widths, aliases = _layer_plan(cfg, model, in_shape)
    run_dir = cfg.output.run_dir.resolve()
    n, itemsize = cfg.data.n, np.dtype(cfg.output.dtype).itemsize
    stored = {name: w for name, w in widths.items() if name not in aliases}
    store_bytes = 2 * n * sum(stored.values()) * itemsize  # clean + perturbed, uncompressed
    stores = [
        (a, norm, cfg.attack.eps_for(norm, cfg.data.source), run_dir / f"{slug(a)}-{norm}.zarr")
        for a in cfg.attack.attack_names
        for norm in cfg.attack.norms
    ]
    tasks = _tasks(cfg, stores, list(stored), run_dir, "cpu", layers)
    done = sum(t.row_path.exists() for t in tasks)
    lines = [f"advlens run --dry-run: {run_dir}/ ({'exists' if run_dir.exists() else 'new'})"]
    lines.append(f"stores ({len(stores)}, {n} clean + {n} perturbed samples each, "
                 f"{cfg.output.dtype}, at most {_size(store_bytes)} each uncompressed):")  # fmt: skip
    for a, norm, eps, path in stores:
        state = " (exists: resumed or checked)" if path.exists() else ""
        lines.append(f"  {path.name}  {a} {norm} eps={eps:g}  {_size(store_bytes)}{state}")
    lines.append(f"layers ({len(layers)}, pool={cfg.layers.pool}):")
    width = max(len(name) for name in layers)
    for name in layers:
        per = 2 * n * widths[name] * itemsize
        size = f"alias of {aliases[name]}, stored once" if name in aliases else (
            f"{_size(per)} per store")  # fmt: skip
        lines.append(f"  {name:<{width}}  {str(tuple(shapes[name])):<16} dim {widths[name]:>8}"
                     f"  {size}")  # fmt: skip
    lines.append(
        f"layer tasks: {len(tasks)} = {len(stores)} stores x {len(stored)} layers x "
        f"{len(cfg.embed.engine_names)} engines x {len(cfg.embed.seed_list)} seeds x "
        f"{len(cfg.embed.perplexity_list)} perplexities; {done} already done"
    )
    lines.append(f"disk: at most {_size(len(stores) * store_bytes)} for the stores, plus "
                 f"{_size(len(tasks) * 2 * n * 16)} of task maps")  # fmt: skip
    return "\n".join(lines)


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def build_attack(
    cfg: RunConfig, name: str, norm: str, eps: float, sub_batch: int | None = None
) -> Attack:
    """The attack ``name`` with ``cfg``'s budget; eps = 0 gives the unperturbed baseline.
    ``sub_batch``: images per forward/backward pass (:func:`advlens.extract.plan_sub_batch`)."""

    a = cfg.attack
    if eps == 0:
        log.info("%s %s: eps = 0, so every perturbed twin is its clean image", name, norm)
        return Unperturbed(name=name, norm=norm, eps=0.0, seed=a.seed)
    return get_attack(
        name, norm, eps, n_iter=a.n_iter, n_restarts=a.n_restarts, rho=a.rho, seed=a.seed,
        autocast_bf16=a.autocast_bf16, channels_last=a.channels_last, sub_batch=sub_batch,
    )  # fmt: skip


def _check_names(cfg: RunConfig, *, model_given: bool = False) -> None:
    """Fail before any work when an engine or attack named in ``cfg`` cannot run.

    ``model_given``: the caller passes its own ``nn.Module`` (the Python API), so
    ``model.name`` only labels it.
    """
    resolve_device(cfg.model.device)  # a ConfigError naming model.device when it cannot be used
    if not model_given:
        get_factory(cfg.model.name)
    module, sep, _ = cfg.model.name.partition(":")
    if (
        not model_given
        and sep
        and module not in ("torchvision", "timm")
        and not _importable(module)
    ):
        raise ConfigError(
            f"model.name = {cfg.model.name!r}: no module {module!r} on the Python path; "
            "install it or fix the name (package.module:function)"
        )
    if not model_given and cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        raise ConfigError(f"model.checkpoint = {cfg.model.checkpoint!r}: file not found")
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


def _clear_tasks(run_dir: Path) -> None:
    """For ``--overwrite``: delete the task rows and maps advlens wrote, leave anything else."""

    tasks = run_dir / "tasks"
    if not tasks.is_dir():
        return
    if not (run_dir / WRITTEN).is_file():  # a run of an advlens that kept no record
        for js in sorted(tasks.glob("*.json")):
            try:
                read_task_row(js)  # a valid row names its own file: advlens wrote it
            except StoreError:
                continue
            record(run_dir, js, js.with_suffix(".npz"))
    removed, left = remove_written(run_dir, sorted(p for p in tasks.rglob("*") if p.is_file()))
    log.info("overwrite: removed %d task file(s) of the earlier run", len(removed))
    if left:
        log.warning(
            "overwrite: left %d file(s) advlens did not write: %s",
            len(left), ", ".join(left[:10]) + (" ..." if len(left) > 10 else ""),
        )  # fmt: skip


def _importable(module: str) -> bool:
    cwd_importable()  # found there at build time too

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _model_and_data(cfg: RunConfig, model=None, data=None):
    device = driver_device(str(resolve_device(cfg.model.device)), cfg.schedule.gpus)
    if data is None:
        data = load_dataset(cfg.data.source, split=cfg.data.split, path=cfg.data.path)
    if model is None:
        ensure_weights(cfg.model, data.name)  # training is the run's job, never the builder's
        model = build_model(cfg.model, data.name, tuple(data.images.shape[1:]), len(data.classes))
    model = model.to(device).eval()
    check_fit(model, data, device, cfg.model.name)
    return model, data, device


def check_fit(model: torch.nn.Module, data: Dataset, device: str, name: str) -> None:
    """One sample's forward pass: a model that cannot take the data's images, or that
    returns no logits for every class, is a ConfigError naming both shapes."""

    x = torch.as_tensor(data.images[:1], device=device)
    what = f"model {name!r} on {data.name} images of shape {tuple(x.shape)} (N, C, H, W)"
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        raise ConfigError(
            f"{what}: the forward pass fails ({str(exc).splitlines()[0]}); the model expects "
            "other inputs: pick the dataset it was built for, or adapt its first layer"
        ) from None
    n_classes = int(data.labels.max()) + 1 if len(data.labels) else len(data.classes)
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) != 2 or shape[0] != 1 or shape[1] < n_classes:
        raise ConfigError(
            f"{what}: it returns {type(out).__name__} of shape {shape}, but advlens needs "
            f"logits of shape (1, n_classes) with n_classes >= {n_classes}, the data's labels"
        )


def _pick_samples(cfg: RunConfig, model, data, device: str):
    """Seeded, class-stratified sample of ``data.n`` correctly classified images, and the
    clean accuracy on the whole split."""

    preds = []
    with torch.no_grad():
        for start in range(0, len(data.labels), 1000):
            x = torch.as_tensor(data.images[start : start + 1000], device=device)
            logits = model(x)
            # NaN logits would count as class 0: refuse them before any sample is picked.
            check_finite(logits, f"model {cfg.model.name!r}: the logits of {data.name} images")
            preds.append(logits.argmax(1).cpu().numpy())
    correct = np.flatnonzero(np.concatenate(preds) == data.labels)
    if len(correct) < cfg.data.n:
        raise ConfigError(
            f"data.n = {cfg.data.n}, but only {len(correct)} of the {len(data.labels)} "
            f"{data.name} {cfg.data.split} images are classified correctly (only those are "
            "attacked); lower data.n"
            + (" or use the training split: --set data.split=train" if cfg.data.split == "test"
               else "")
        )  # fmt: skip
    accuracy = len(correct) / len(data.labels)
    log.info("clean accuracy %.4f on %d %s images", accuracy, len(data.labels), data.name)
    picked = correct[stratified_sample(data.labels[correct], cfg.data.n, cfg.data.seed)]
    return data.subset(picked), accuracy


def accuracy_record(
    clean: float, n_split: int, stores: Sequence[tuple[str, str, float, Path]]
) -> dict[str, Any]:
    """Clean accuracy on the split and robust accuracy per attack and norm: the share of the
    split still classified correctly under attack, clean x (1 - success rate), since only
    correctly classified images are attacked (a seeded sample of them)."""

    robust = {}
    for attack, norm, _eps, path in stores:
        success = ActivationStore.open(path).samples()["success"]
        robust[f"{slug(attack)} {norm}"] = float(clean * (1 - np.mean(success)))
    return {"clean": float(clean), "n_split": int(n_split), "robust": robust}


def _attack_and_extract(
    cfg,
    model,
    samples,
    attack_name,
    norm,
    eps,
    layers,
    widths,
    device,
    progress,
    model_id,
    aliases=None,
) -> Path:
    a = cfg.attack
    sub_batch = plan_sub_batch(model, samples.images.shape[1:], a.batch_size, a.memory_mb)
    attack = build_attack(cfg, attack_name, norm, eps, sub_batch=sub_batch)
    # Only what shapes the activations (config.setting(shapes="store")) and the model's
    # content decide whether an existing store can be resumed.
    full = cfg.to_dict()
    identity = store_identity(cfg, attack_name, norm, eps)
    identity["model"] |= model_id
    if sub_batch is not None:
        # Convolutions and products may round a row differently in another sub-batch size,
        # and APGD can amplify a last-bit change: the sub-batch is part of what was stored.
        identity["attack"]["sub_batch"] = sub_batch
        log.info("%s %s: attack and taps in sub-batches of %d images (attack.memory_mb = %d)",
                 attack_name, norm, sub_batch, a.memory_mb)  # fmt: skip
    attrs = {
        "config": identity,
        "run_config": full,
        "advlens_version": __version__,
        "model": cfg.model.name,
        "dataset": samples.name,
    }
    path = cfg.output.run_dir / f"{slug(attack_name)}-{norm}.zarr"
    store = ActivationStore.create(
        path,
        n=len(samples.labels),
        layers=widths,
        batch_size=a.batch_size,
        dtype=cfg.output.dtype,
        attrs=attrs,
        overwrite=cfg.output.overwrite,
        aliases=aliases,
    )
    if not store.is_complete():
        itemsize = np.dtype(cfg.output.dtype).itemsize
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
            sub_batch=sub_batch,
            max_queue=plan_queue(a.batch_size * sum(widths.values()) * 2 * itemsize, a.memory_mb),
        )  # fmt: skip
    return path


def _provenance(cfg, model, data, device, layers, shapes, timings) -> dict[str, Any]:
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
        # What a change of setting invalidates (docs/design.md, "Settings and identity").
        "shapes": {level: shaping_keys(cfg, level) for level in ("store", "task")},
    }
