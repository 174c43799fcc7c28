"""One prepared call for a machine with one CUDA GPU and no network: ``make gpu-check``.

Phases, each a subprocess under its own time cap, all inside ``TOTAL_CAP`` seconds (9 min):

0. ``install``: the wheels in ``.whl/`` (``make gpu-wheels`` fetched them here) go offline into
   ``/tmp/site``, and a copy of advlens (``pipeline/`` as ``advlens``, ``kernels/`` inside it,
   ``configs/`` beside it) with them; every later phase runs with ``PYTHONPATH=/tmp/site``.
1. ``pytest-gpu``: ``pytest -m gpu``.
2. ``tsne-70k``: benchmarks/tsne_engine.py at 70,000 points (Fashion-MNIST where present,
   else the synthetic mixture), against openTSNE.
3. ``tsne-2m``: the same at 2 x 10^6 synthetic points (torch engine only).
4. ``overlap``: benchmarks/overlap_kernel.py at 2 x 10^5 and 2 x 10^6 points.
5. ``apgd-bf16``, ``apgd-tf32``: benchmarks/attack_throughput.py, WRN-28-10, batch 512.
6. ``end-to-end``: benchmarks/end_to_end.py at the largest N planned to fit its cap.

Without a CUDA GPU every GPU phase is skipped with the reason (a dry run, seconds). Each
phase's JSON goes to ``$OUT/gpu_check/`` (when ``OUT`` is set) and to ``benchmarks/results/``;
the summary (status, seconds, exit code, last lines of output per phase) to
``gpu_check_<device>.json`` in both places.

Usage::

    python benchmarks/gpu_check.py            # what `make gpu-check` runs
    python benchmarks/gpu_check.py --dry-run  # plan and skip every GPU phase
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"
SITE = Path("/tmp/site")
TOTAL_CAP = 540.0  # seconds for everything: the machine's call limit leaves a margin
TAIL = 2000  # characters of each phase's output kept in the summary


def _cuda() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU (torch.cuda.is_available() is False)"
    return True, torch.cuda.get_device_name(0)


def phases(out: Path) -> list[tuple[str, float, list[str], dict[str, str]]]:
    """(name, cap seconds, command, extra environment) of every GPU phase, in order."""
    py = sys.executable
    b = str(ROOT / "benchmarks")
    tf32 = {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}
    wrn = ["--model", "wrn-28-10", "--batch-size", "512", "--n-iter", "20", "--repeats", "2"]
    return [
        ("pytest-gpu", 100, [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                             "--timeout", "90", str(ROOT / "tests")], {}),
        ("tsne-70k", 130, [py, f"{b}/tsne_engine.py", "--n", "70000", "--threads", "16",
                           "--out", str(out / "tsne_engine_70k.json")], {}),
        ("tsne-2m", 90, [py, f"{b}/tsne_engine.py", "--n", "2000000", "--data", "synthetic",
                         "--skip-opentsne", "--recall-sample", "2000",
                         "--out", str(out / "tsne_engine_2m.json")], {}),
        ("overlap", 40, [py, f"{b}/overlap_kernel.py", "--sizes", "200000", "2000000",
                         "--numpy-max", "200000", "--out", str(out / "overlap_kernel.json")], {}),
        ("apgd-bf16", 40, [py, f"{b}/attack_throughput.py", *wrn, "--bf16", "--channels-last",
                           "--out", str(out / "attack_throughput_bf16.json")], {}),
        ("apgd-tf32", 40, [py, f"{b}/attack_throughput.py", *wrn, "--channels-last",
                           "--out", str(out / "attack_throughput_tf32.json")], tf32),
        ("end-to-end", 80, [py, f"{b}/end_to_end.py", "--n", "2000", "--n-iter", "20",
                            "--tsne-iter", "500", "--bootstrap", "0", "--bf16",
                            "--channels-last", "--out", str(out / "end_to_end.json")], {}),
    ]  # fmt: skip


def install() -> dict:
    """Offline install of .whl/ into SITE, and advlens copied beside it."""
    t = time.perf_counter()
    SITE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    log = ""
    if wheels:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        log = (done.stdout + done.stderr)[-TAIL:]
        if done.returncode:
            return {"status": "failed", "rc": done.returncode, "output": log,
                    "seconds": time.perf_counter() - t}  # fmt: skip
    target = SITE / "advlens"
    shutil.rmtree(target, ignore_errors=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "pipeline", target, ignore=skip)
    shutil.copytree(ROOT / "kernels", target / "kernels", ignore=skip)
    # advlens.config finds configs/default.toml beside the package folder
    shutil.rmtree(SITE / "configs", ignore_errors=True)
    shutil.copytree(ROOT / "configs", SITE / "configs")
    return {"status": "ok", "wheels": len(wheels), "output": log,
            "seconds": time.perf_counter() - t}  # fmt: skip


def run_phase(name: str, cap: float, cmd: list[str], env: dict[str, str]) -> dict:
    t = time.perf_counter()
    full = os.environ | {"PYTHONPATH": f"{SITE}:{os.environ.get('PYTHONPATH', '')}",
                         "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"} | env  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env=full,
                              cwd=ROOT)  # fmt: skip
        status = "ok" if done.returncode == 0 else "failed"
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status, rc = "timeout", None
        text = "".join(
            s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
            for s in (exc.stdout, exc.stderr)
        )
    seconds = time.perf_counter() - t
    print(f"[{name}] {status} in {seconds:.1f} s (cap {cap:.0f} s)", flush=True)
    return {"status": status, "rc": rc, "seconds": seconds, "cap": cap, "output": text[-TAIL:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="skip every GPU phase")
    ap.add_argument("--only", default="", help="comma list of phases to run (default: all)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    env_out = os.environ.get("OUT")
    out = Path(env_out) / "gpu_check" if env_out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    gpu, device = _cuda()
    reason = "--dry-run" if args.dry_run else (None if gpu else device)
    summary: dict = {"benchmark": "gpu_check", "device": device if gpu else "none",
                     "skip_reason": reason, "phases": {}}  # fmt: skip
    plan = phases(out)
    if sum(cap for _, cap, _, _ in plan) > TOTAL_CAP:
        raise SystemExit("gpu_check: the phase caps exceed TOTAL_CAP; fix the plan")
    only = {p for p in args.only.split(",") if p}
    if reason is None:
        summary["phases"]["install"] = install()
    else:
        summary["phases"]["install"] = {"status": "skipped", "reason": reason,
                                        "wheels": len(list(WHEELS.glob("*.whl")))}  # fmt: skip
    for name, cap, cmd, env in plan:
        left = TOTAL_CAP - (time.perf_counter() - start)
        if reason is not None or (only and name not in only):
            why = reason or "not in --only"
            summary["phases"][name] = {"status": "skipped", "reason": why, "cap": cap,
                                       "command": " ".join(cmd[1:])}  # fmt: skip
            print(f"[{name}] skipped: {why}")
            continue
        if left < 10:
            summary["phases"][name] = {"status": "skipped", "reason": "total time cap reached"}
            continue
        summary["phases"][name] = run_phase(name, min(cap, left), cmd, env)
    summary["seconds"] = time.perf_counter() - start
    summary["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    slug = re.sub(r"[^a-z0-9]+", "-", summary["device"].lower()).strip("-")
    text = json.dumps(summary, indent=2)
    for folder in {out, RESULTS}:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"gpu_check_{slug}.json").write_text(text)
    if out != RESULTS:  # phase JSONs back into the repository as well
        for f in out.glob("*.json"):
            shutil.copy(f, RESULTS / f.name)
    print(f"gpu_check: {summary['seconds']:.1f} s, summary in {out}/gpu_check_{slug}.json")
    bad = [n for n, p in summary["phases"].items() if p["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
