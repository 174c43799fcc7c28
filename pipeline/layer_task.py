"""One layer task: reduce -> embed -> overlap for one (store, layer, engine, seed, perplexity).

Tasks are independent, so the scheduler can run them on any worker. Each writes its metrics
row (``tasks/<id>.json``) and its map (``tasks/<id>.npz``) atomically and is skipped when its
row and map already exist and read back intact, so an interrupted schedule resumes where it
stopped; a damaged or missing one is recomputed with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advlens._io import json_default, record, write_json, write_npz
from advlens.config import EmbedConfig, OverlapConfig, shaping
from advlens.embed import TSNEParams, embed, max_perplexity
from advlens.errors import StoreError
from advlens.kernels.metrics import VARIANTS
from advlens.overlap import (
    detector_auc,
    overlap_highdim_sweep,
    overlap_sweep,
    resolve_k,
    subsample_interval,
)
from advlens.reduce import reduce
from advlens.results import ARTEFACT_GAP, read_task_map, read_task_row
from advlens.store import ActivationStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerTask:
    """Everything one layer analysis needs; picklable, so it can travel to a Dask worker."""

    store: str
    run_dir: str
    attack: str
    norm: str
    eps: float
    layer: str
    layer_index: int
    engine: str
    seed: int
    perplexity: float
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    overlap: OverlapConfig = field(default_factory=OverlapConfig)
    device: str = "auto"

    @property
    def task_id(self) -> str:
        """Readable and unique: changes whenever a setting that shapes the result changes."""
        key = json.dumps(
            [
                self.store,
                self.layer,
                self.engine,
                self.seed,
                self.perplexity,
                _shaping(self.embed),
                shaping(self.overlap, "task"),
            ],
            sort_keys=True,
            default=json_default,
        )
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        layer = self.layer.replace("/", "_")
        return (
            f"{self.attack}-{self.norm}--{layer}--{self.engine}"
            f"-s{self.seed}-p{self.perplexity:g}-{digest}"
        )

    @property
    def row_path(self) -> Path:
        return Path(self.run_dir) / "tasks" / f"{self.task_id}.json"

    @property
    def map_path(self) -> Path:
        return Path(self.run_dir) / "tasks" / f"{self.task_id}.npz"

    def identity(self) -> dict[str, Any]:
        """The row fields that say which task a row belongs to (also for failed tasks)."""
        return {
            "task_id": self.task_id,
            "attack": self.attack,
            "norm": self.norm,
            "eps": self.eps,
            "layer": self.layer,
            "layer_index": self.layer_index,
            "engine": self.engine,
            "seed": self.seed,
            "perplexity": self.perplexity,
            "k": self.overlap.k,
        }


def _shaping(embed: EmbedConfig) -> dict[str, Any]:
    """Embed settings that shape one task's result: the repeat lists are spread over tasks."""
    return shaping(embed, "task")


def run_layer_task(task: LayerTask) -> dict[str, Any]:
    """Analyse one layer; return its metrics row (read back when the task already ran)."""
    done = _done_row(task)
    if done is not None:
        return done

    store = ActivationStore.open(task.store)
    samples = store.samples()
    n = store.n
    is_perturbed = np.repeat([False, True], n)
    labels = np.concatenate([samples["label"], samples["label"]])

    t0 = time.perf_counter()
    x = reduce(store.joint(task.layer), task.embed.pca_dims, seed=task.seed, device=task.device)
    t1 = time.perf_counter()

    params = TSNEParams.from_config(task.embed, seed=task.seed, perplexity=task.perplexity)
    emb = embed(x, engine=task.engine, params=params)
    t2 = time.perf_counter()

    ov = task.overlap
    k = resolve_k(ov.k, n)
    ks = tuple(sorted(set(ov.k_sweep) | {k}))
    ks = tuple(q for q in ks if q < 2 * n - 1)  # share leaves the twin out: k <= 2N - 2
    # One neighbour search per space serves every variant and k; the interval only for the
    # reported (variant, space); the other space's value stands beside it (artefact check).
    sweep = overlap_sweep(emb.xy, is_perturbed, ks=ks, labels=labels)
    high = overlap_highdim_sweep(x, is_perturbed, ks=(k,), labels=labels)
    on_map, reduced = sweep[(ov.variant, k)], high[(ov.variant, k)]
    main = reduced if ov.space == "reduced" else on_map
    ci = cal_ci = None
    if ov.bootstrap and n >= 4:
        both = subsample_interval(x if ov.space == "reduced" else emb.xy, k=k, variant=ov.variant,
                                  draws=ov.bootstrap, seed=task.seed, device="cpu")  # fmt: skip
        ci, cal_ci = both["value"], both["calibrated"]
    base = sweep[("overlap", k)]
    # The detector trains on 4/5 of the samples; tiny runs need a smaller k than the map.
    folds = min(5, n)
    smallest_train = 2 * (n - math.ceil(n / folds))
    auc = detector_auc(x, is_perturbed, k=min(k, smallest_train), seed=ov.detector_seed,
                       folds=folds)  # fmt: skip
    t3 = time.perf_counter()

    row = task.identity() | {
        "k": k,
        "k_setting": ov.k,
        "n": n,
        # embed() lowers a perplexity too large for the map (advlens.run.validate warns)
        "perplexity_used": min(float(task.perplexity), max_perplexity(2 * n)),
        "success_rate": float(np.mean(samples["success"])),
        "overlap": sweep[("overlap", k)].value,
        "mixing": sweep[("mixing", k)].value,
        "pair": sweep[("pair", k)].value,
        "share": sweep[("share", k)].value,
        **{f"{v}_chance": sweep[(v, k)].chance for v in VARIANTS},
        **{f"{v}_calibrated": sweep[(v, k)].calibrated for v in VARIANTS},
        **{f"{v}_reduced": high[(v, k)].value for v in VARIANTS},
        **{f"{v}_reduced_calibrated": high[(v, k)].calibrated for v in VARIANTS},
        "value": main.value,
        "calibrated": main.calibrated,
        "chance": main.chance,
        "variant": ov.variant,
        "space": ov.space,
        "map_calibrated": on_map.calibrated,
        "reduced_calibrated": reduced.calibrated,
        # intervals of the value and the calibrated value: half-samples of the images
        # (overlap.subsample_interval)
        "ci_low": ci[0] if ci else None,
        "ci_high": ci[1] if ci else None,
        "calibrated_ci_low": cal_ci[0] if cal_ci else None,
        "calibrated_ci_high": cal_ci[1] if cal_ci else None,
        "ci_kind": "half-sample subsampling of images, neighbours recomputed" if ci else None,
        # the reported statistic on the map minus on the reduced points (results.ARTEFACT_GAP)
        "artefact_gap": on_map.calibrated - reduced.calibrated,
        "artefact_flag": bool(abs(on_map.calibrated - reduced.calibrated) > ARTEFACT_GAP),
        "auc": auc,
        "k_sweep": {f"{v}@{q}": o.value for (v, q), o in sweep.items()},
        "per_class": {str(c): v for c, v in main.per_class.items()},
        "seconds_reduce": t1 - t0,
        "seconds_embed": t2 - t1,
        "seconds_overlap": t3 - t2,
        "engine_seconds": emb.seconds,
        "error": None,
    }
    record(task.run_dir, task.map_path, task.row_path)  # before writing: see advlens._io
    write_npz(
        task.map_path,
        xy=emb.xy,
        is_perturbed=is_perturbed,
        labels=labels,
        per_point=base.per_point.astype(np.float32),
    )
    write_json(task.row_path, row)  # last: its presence marks the task done
    return row


def _done_row(task: LayerTask) -> dict[str, Any] | None:
    """The row of a task that already ran, when its row and map read back intact."""
    if not (task.row_path.exists() or task.map_path.exists()):
        return None
    try:
        row = read_task_row(task.row_path)
        read_task_map(task.map_path, row)
    except StoreError as exc:
        log.warning("%s; recomputing task %s", exc, task.task_id)
        return None
    return row
