"""End to end: WRN-28-10 on CIFAR-10-shaped images, APGD-CE (L2 and Linf), `auto` layers.

Runs the whole pipeline through ``advlens.run.run`` with a config built here and reports the
seconds of every stage (model, select, attack+extract, layers: reduce / embed / overlap, report).
Target (issue 9): 10,000 images in at most 10 minutes on one H100/H200-class GPU.

Without ``--data`` the images are random; without ``--checkpoint`` the network has random
(seeded) weights. A random network labels the images itself (its predictions become the
labels, written to a temporary CIFAR-10 binary file), so every image counts as correctly
classified and is attacked, as with a trained network on real data.

    python benchmarks/end_to_end.py                                  # GPU: 10,000 images
    python benchmarks/end_to_end.py --n 64 --n-iter 5 --tsne-iter 250  # CPU smoke run
    python benchmarks/end_to_end.py --data /data/cifar10 --checkpoint Standard.pt --split train
    python benchmarks/end_to_end.py --bf16 --channels-last            # faster attack on GPU

Results: ``benchmarks/results/end_to_end_<cpu|gpu>.json`` (device name, versions, timings).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from advlens._env import cpu_name, versions

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000 if gpu else 32, help="attacked images")
    p.add_argument("--n-iter", type=int, default=100 if gpu else 2, help="APGD iterations")
    p.add_argument("--tsne-iter", type=int, default=1000 if gpu else 250, help="t-SNE iterations")
    p.add_argument("--batch-size", type=int, default=500 if gpu else 32)
    p.add_argument("--bootstrap", type=int, default=200 if gpu else 0, help="overlap CI resamples")
    p.add_argument("--perplexity", type=float, default=None, help="default: 30, less for tiny n")
    p.add_argument("--engine", default="auto", help="t-SNE engine (auto: torch on a GPU)")
    p.add_argument("--pool", default="none", choices=("none", "gap"), help="activation pooling")
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 release folder")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--checkpoint", type=Path, default=None, help="WRN-28-10 state dict (.pt)")
    p.add_argument("--bf16", action="store_true", help="attack under bf16 autocast")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-tf32", action="store_true", help="keep float32 matmuls exact on GPU")
    p.add_argument("--workers", type=int, default=0, help="layer task workers (0: automatic)")
    p.add_argument("--gpus", default="", help="GPUs for layer tasks, e.g. 0,1 (default: all)")
    p.add_argument("--out-root", type=Path, default=None, help="keep the run here (default: temp)")
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    import torch

    from advlens.config import (
        AttackConfig,
        DataConfig,
        EmbedConfig,
        LayersConfig,
        ModelConfig,
        OutputConfig,
        OverlapConfig,
        RunConfig,
        ScheduleConfig,
    )
    from advlens.run import run

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    if gpu and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with tempfile.TemporaryDirectory(prefix="advlens-e2e-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data_dir, checkpoint = args.data, args.checkpoint
        if checkpoint is None:
            checkpoint = tmp / "wrn-28-10-random.pt"
            data_dir = _self_labelled(args, checkpoint, tmp / "cifar10", device)
        prepare = time.perf_counter() - t0

        cfg = RunConfig(
            data=DataConfig(source="cifar10", path=str(data_dir), split=args.split, n=args.n),
            model=ModelConfig(name="wrn-28-10", checkpoint=str(checkpoint), device=device),
            attack=AttackConfig(
                name="apgd-ce",
                norms=("l2", "linf"),
                n_iter=args.n_iter,
                batch_size=args.batch_size,
                autocast_bf16=args.bf16,
                channels_last=args.channels_last,
            ),
            layers=LayersConfig(select=("auto",), include_input=True, pool=args.pool),
            embed=EmbedConfig(
                engine=args.engine,
                n_iter=args.tsne_iter,
                # t-SNE needs more than 3 x perplexity points; 2n points go in.
                perplexity=args.perplexity or min(30.0, max(2.0, (2 * args.n - 1) / 3 - 1)),
            ),
            overlap=OverlapConfig(bootstrap=args.bootstrap),
            output=OutputConfig(
                root=str((args.out_root or tmp / "runs").resolve()),
                name="e2e-wrn-28-10",
                overwrite=True,
            ),
            schedule=ScheduleConfig(
                workers=args.workers,
                gpus=tuple(int(g) for g in args.gpus.split(",") if g.strip()),
            ),
        )
        t0 = time.perf_counter()
        result = run(cfg, progress=True)
        total = time.perf_counter() - t0

    errors = [r for r in result.rows if r.get("error")]
    out = {
        "benchmark": "end_to_end",
        "device": torch.cuda.get_device_name() if gpu else cpu_name(),
        "cpu_count": os.cpu_count(),
        "seconds_total": total,
        "target_seconds": 600 if gpu and args.n >= 10_000 else None,
        "meets_target": (total <= 600) if gpu and args.n >= 10_000 else None,
        "seconds_by_stage": result.timings,
        "seconds_prepare_inputs": prepare,
        "layers": result.layers,
        "n_tasks": len(result.rows),
        "n_failed_tasks": len(errors),
        "errors": [r["error"] for r in errors][:5],
        "overlap_by_layer": {
            f"{r.get('norm')}:{r.get('layer')}": r.get("overlap") for r in result.rows
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "perplexity_used": cfg.embed.perplexity,
        "random_images": args.data is None,
        "random_weights": args.checkpoint is None,
        "tf32": gpu and not args.no_tf32,
        "python": platform.python_version(),
        "versions": versions(
            "advlens", "torch", "numpy", "scipy", "scikit-learn", "openTSNE", "zarr", "dask"
        ),
    }
    path = args.out or RESULTS / f"end_to_end_{'gpu' if gpu else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    print(f"{out['device']}: {args.n} images, {len(result.layers)} layers, {total:.1f} s total")
    print(f"  {stages}")
    if errors:
        print(f"  {len(errors)} failed tasks, first: {errors[0]['error']}")
    print(f"  -> {path}")


def _self_labelled(args, checkpoint: Path, folder: Path, device: str) -> Path:
    """Save a seeded random WRN-28-10 and a CIFAR-10 binary file labelled by its predictions."""
    import torch

    from advlens.config import ModelConfig
    from advlens.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="wrn-28-10", device=device)
    model = build_model(cfg, "cifar10", (3, 32, 32), 10, weights=False)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, checkpoint)

    if args.data is not None:
        from advlens.data import load_dataset

        images = load_dataset("cifar10", split=args.split, path=str(args.data)).images
        pixels = np.round(images * 255).astype(np.uint8).reshape(len(images), -1)
    else:
        # A margin of extra images: a prediction that flips between two identical forward
        # passes (nondeterministic GPU kernels) must not leave fewer than n correct.
        total = args.n + max(16, math.ceil(0.02 * args.n))
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, size=(total, 3 * 32 * 32), dtype=np.uint8)
    labels = []
    with torch.no_grad():  # same batches and dtype as the run's own correctness check
        for start in range(0, len(pixels), 1000):
            x = torch.as_tensor(pixels[start : start + 1000], device=device)
            x = x.float().div(255).view(-1, 3, 32, 32)
            labels.append(model(x).argmax(1).to(torch.uint8).cpu().numpy())
    y = np.concatenate(labels)
    folder.mkdir(parents=True)
    name = "test_batch.bin" if args.split == "test" else "data_batch_1.bin"
    np.concatenate([y[:, None], pixels], axis=1).tofile(folder / name)
    return folder


if __name__ == "__main__":
    main()
