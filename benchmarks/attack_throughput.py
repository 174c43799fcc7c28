"""APGD throughput against the raw forward+backward loop it is built on.

For a model and batch size, measures images x iterations per second of (1) a bare loop of
forward pass, cross-entropy, gradient w.r.t. the input and a sign step (the ceiling for any
gradient attack) and (2) advlens' APGD-CE with the same model, batch, precision and memory
format, and prints their ratio. Target (issue 3): on a GPU with WRN-28-10 at batch 512, APGD
reaches at least 80% of the raw throughput. Weights do not change the work done, so models
are built untrained (random, seeded); the labels are the model's own predictions, so every
image is attacked.

    python benchmarks/attack_throughput.py                          # small-cnn, CPU-sized run
    python benchmarks/attack_throughput.py --model wrn-28-10 --batch-size 512 --bf16 --channels-last
    python benchmarks/attack_throughput.py --norm l2 --n-iter 50 --repeats 5

Results: ``benchmarks/results/attack_throughput-<model>-<cpu|gpu>.json`` (device name, CPU
count, library versions, both throughputs and the ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from advlens._env import device_name, versions

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args() -> argparse.Namespace:
    import torch

    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-cnn", help="advlens model name (small-cnn, wrn-28-10)")
    p.add_argument("--batch-size", type=int, default=512 if gpu else 256)
    p.add_argument("--n-iter", type=int, default=100, help="APGD iterations")
    p.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"))
    p.add_argument("--eps", type=float, default=None, help="default: the dataset's (config.py)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the best counts)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (both loops)")
    p.add_argument("--channels-last", action="store_true", help="channels-last (both loops)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/...)")
    return p.parse_args()


def build(name: str, device):
    """The untrained model ``name`` and its input shape / dataset."""
    import torch

    from advlens.config import ModelConfig
    from advlens.models import get_factory

    dataset, in_shape = (
        ("fashion-mnist", (1, 28, 28)) if name == "small-cnn" else ("cifar10", (3, 32, 32))
    )
    torch.manual_seed(0)
    if name == "small-cnn":
        from advlens.models.small_cnn import SmallCNN

        model = SmallCNN(in_shape, 10)
    else:
        model = get_factory(name)(ModelConfig(name=name), dataset, in_shape, 10, weights=False)
    return model.eval().requires_grad_(False).to(device), dataset, in_shape


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_loop(model, x, y, n_iter: int, bf16: bool) -> None:
    """n_iter x (forward, CE, input gradient, sign step): what any gradient attack must do."""
    import torch
    import torch.nn.functional as F

    x = x.clone()
    for _ in range(n_iter):
        x.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none").sum()
        (grad,) = torch.autograd.grad(loss, [x])
        with torch.no_grad():
            x = (x + 1e-3 * grad.sign()).clamp(0.0, 1.0)


def best_seconds(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up: kernels, allocator, autotuning
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    args = parse_args()
    import torch

    from advlens._env import resolve_device
    from advlens.attacks import get_attack
    from advlens.config import DEFAULT_EPS

    device = resolve_device(args.device)
    model, dataset, in_shape = build(args.model, device)
    eps = args.eps if args.eps is not None else DEFAULT_EPS[dataset].get(args.norm)
    if eps is None:
        raise SystemExit(f"no default eps for {args.norm} on {dataset}: pass --eps")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((args.batch_size, *in_shape), generator=gen).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        y = model(x).argmax(1)
    attack = get_attack(
        "apgd-ce",
        args.norm,
        eps,
        n_iter=args.n_iter,
        autocast_bf16=args.bf16,
        channels_last=args.channels_last,
    )
    work = args.batch_size * args.n_iter
    raw_s = best_seconds(
        lambda: raw_loop(model, x, y, args.n_iter, args.bf16), device, args.repeats
    )
    apgd_s = best_seconds(lambda: attack(model, x, y), device, args.repeats)
    raw, apgd = work / min(raw_s), work / min(apgd_s)
    kind = "gpu" if device.type == "cuda" else "cpu"
    row = {
        "benchmark": "attack_throughput",
        "device": device_name(device),
        "device_kind": kind,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions("advlens", "torch", "numpy", "foolbox"),
        "model": args.model,
        "dataset_shape": list(in_shape),
        "batch_size": args.batch_size,
        "n_iter": args.n_iter,
        "norm": args.norm,
        "eps": eps,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "raw_seconds": raw_s,
        "apgd_seconds": apgd_s,
        "raw_images_iter_per_s": raw,
        "apgd_images_iter_per_s": apgd,
        "ratio": apgd / raw,
        "median_ratio": statistics.median(raw_s) / statistics.median(apgd_s),
        "target_ratio_gpu": 0.8,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(
        f"{args.model} batch {args.batch_size} x {args.n_iter} it on {row['device']}: "
        f"raw {raw:,.4g} img*it/s, APGD {apgd:,.4g} img*it/s, ratio {apgd / raw:.2f} "
        f"(median-based {row['median_ratio']:.2f}; GPU target >= 0.80)"
    )
    out = args.out or RESULTS / f"attack_throughput-{args.model}-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
