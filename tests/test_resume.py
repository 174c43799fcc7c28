"""extract() and resume: a run killed (SIGKILL) mid-extraction resumes to the same bytes.

The run is a real one: a small seeded torch CNN, the real APGD attack, layer taps and the
store's writer thread, in a child process driven by the script below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from advlens.errors import StoreError
from advlens.store import ActivationStore

N, BATCH = 120, 12  # 10 batches
SCRIPT = textwrap.dedent(
    """
    import sys
    from dataclasses import replace

    import torch
    from torch import nn

    from advlens.attacks import get_attack
    from advlens.data import synthetic
    from advlens.extract import extract
    from advlens.models.taps import catalog, select_layers
    from advlens.store import ActivationStore

    torch.set_num_threads(1)


    def tiny_model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(4 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10),
        ).eval()


    def setup(n):
        model = tiny_model()
        data = synthetic(n=n, shape=(1, 14, 14), seed=1)
        with torch.no_grad():  # label = prediction: every sample is attacked
            pred = model(torch.from_numpy(data.images)).argmax(1).numpy()
        data = replace(data, labels=pred)
        infos = catalog(model, data.images.shape[1:])
        layers = select_layers(infos, ["all"], include_input=True)
        widths = {i.name: i.size for i in infos if i.name in layers}
        return model, data, layers, widths


    def main(path, n, batch_size, n_iter):
        model, data, layers, widths = setup(n)
        attack = get_attack("apgd-ce", "linf", 0.1, n_iter=n_iter, seed=7)
        store = ActivationStore.create(
            path, n=n, layers=widths, batch_size=batch_size, dtype="float16",
            attrs={"config": {"attack": {"n_iter": n_iter}}, "model": "tiny", "dataset": data.name},
        )
        extract(model, data, attack, store, layers, device="cpu", progress=False)


    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    """
)


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "extract_run.py"
    path.write_text(SCRIPT)
    return path


def _load(script: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_run", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _start(script: Path, store: Path, n_iter: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, str(script), str(store), str(N), str(BATCH), str(n_iter)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()


def _n_done(path: Path) -> int:
    # Cheap poll of the layout (docs/design.md): one chunk file progress/batches/c/<b> per finished batch.
    folder = path / "progress" / "batches" / "c"
    return sum(name.isdigit() for name in os.listdir(folder)) if folder.is_dir() else 0


def _arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return {
        name: np.asarray(node[...])
        for name, node in group.members(max_depth=None)
        if isinstance(node, zarr.Array)
    }


@pytest.mark.long
def test_sigkill_mid_extraction_then_resume_is_bit_identical(script, tmp_path):
    n_iter = 40
    killed, reference = tmp_path / "killed.zarr", tmp_path / "reference.zarr"
    uninterrupted = _start(script, reference, n_iter)  # runs alongside, to save wall time
    try:
        _kill_resume_and_compare(script, killed, reference, n_iter, uninterrupted)
    finally:  # never leave a child behind, whatever failed
        uninterrupted.kill()
        uninterrupted.communicate()


def _kill_resume_and_compare(script, killed, reference, n_iter, uninterrupted):
    proc = _start(script, killed, n_iter)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if 2 <= _n_done(killed) <= N // BATCH - 3:
                break
            time.sleep(0.01)
        ended_early = proc.poll() is not None
    finally:
        proc.kill()
        out = proc.communicate()[0].decode()
    if ended_early:
        pytest.fail(f"the run ended (rc {proc.returncode}) before it was killed:\n{out}")
    assert proc.returncode == -signal.SIGKILL

    store = ActivationStore.open(killed)
    done = store.completed_batches()
    assert 0 < done.sum() < store.n_batches, done  # a partially written store
    assert store.attrs["status"] == "writing"
    with pytest.raises(StoreError, match="incomplete"):
        store.read_layer("input", "clean")
    first_gap = int(np.flatnonzero(~done)[0])
    # Make the torn state explicit: whatever the kill left of the first unfinished batch, give
    # it a garbled shard and a stray temp file, as a kill during a write would.
    layer = store.layers[1]
    shard = killed / f"layers/{layer}/clean/c/{first_gap}/0"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"torn" * 100)
    (shard.parent / "0.deadbeef.partial").write_bytes(b"half")
    kept = {
        p: (p.read_bytes(), p.stat().st_mtime_ns)
        for b in np.flatnonzero(done)
        for p in (killed / "layers").glob(f"*/*/c/{b}/0")
    }
    assert len(kept) == 2 * len(store.layers) * int(done.sum())

    _finish(_start(script, killed, n_iter))
    _finish(uninterrupted)

    # Completed batches were not written again.
    for p, (raw, mtime) in kept.items():
        assert p.read_bytes() == raw and p.stat().st_mtime_ns == mtime, p
    assert not list(shard.parent.glob("*.partial"))
    a, b = _arrays(killed), _arrays(reference)
    assert a.keys() == b.keys() and len(a) == 2 * len(store.layers) + 7
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs after resume"
    ra, rb = ActivationStore.open(killed), ActivationStore.open(reference)
    assert ra.is_complete() and ra.attrs == rb.attrs and ra.attrs["status"] == "complete"
    # The perturbed twins really differ from the clean inputs (the attack ran).
    assert not np.array_equal(a["layers/input/clean"], a["layers/input/perturbed"])


def test_extract_matches_direct_attack_and_taps(script, tmp_path):
    """Oracle: the stored rows equal the attack and tap_forward called batch by batch."""
    from advlens.attacks import get_attack
    from advlens.extract import batch_seed, extract
    from advlens.models.taps import tap_forward

    mod = _load(script)
    n, bs = 20, 8
    model, data, layers, widths = mod.setup(n)
    attack = get_attack("apgd-ce", "l2", 1.0, n_iter=5, seed=3)
    store = ActivationStore.create(
        tmp_path / "e.zarr", n=n, layers=widths, batch_size=bs, dtype="float32", attrs={}
    )
    extract(model, data, attack, store, layers, device="cpu", progress=False)
    assert store.is_complete()
    samples = store.samples()
    assert np.array_equal(samples["index"], data.index)
    assert np.array_equal(samples["label"], data.labels)
    for b in range(store.n_batches):
        r0, r1 = store.batch_rows(b)
        x, y = torch.from_numpy(data.images[r0:r1]), torch.from_numpy(data.labels[r0:r1])
        res = attack(model, x, y, seed=batch_seed(3, b))
        _, clean = tap_forward(model, x, layers)
        _, adv = tap_forward(model, res.x_adv, layers)
        for layer in layers:
            assert np.array_equal(store.read_layer(layer, "clean")[r0:r1], clean[layer].numpy())
            assert np.array_equal(store.read_layer(layer, "perturbed")[r0:r1], adv[layer].numpy())
        assert np.array_equal(samples["pred_perturbed"][r0:r1], res.pred_adv.numpy())
        assert np.array_equal(samples["success"][r0:r1], res.success.numpy())
        assert np.array_equal(samples["norm"][r0:r1], res.norm.numpy())
    assert samples["success"].any() and (samples["norm"] > 0).all()
    # A finished store: extract has nothing left to do and changes nothing.
    before = (store.path / f"layers/{layers[-1]}/clean/c/0/0").stat().st_mtime_ns
    extract(model, data, attack, store, layers, device="cpu", progress=False)
    assert (store.path / f"layers/{layers[-1]}/clean/c/0/0").stat().st_mtime_ns == before


def test_extract_refuses_mismatched_layers_and_sizes(script, tmp_path):
    from advlens.attacks import get_attack
    from advlens.extract import extract

    mod = _load(script)
    model, data, layers, widths = mod.setup(10)
    attack = get_attack("apgd-ce", "linf", 0.1, n_iter=2)
    store = ActivationStore.create(
        tmp_path / "m.zarr", n=10, layers=widths, batch_size=5, dtype="float16", attrs={}
    )
    with pytest.raises(StoreError, match="differ from the layers"):
        extract(model, data, attack, store, layers[:-1], device="cpu", progress=False)
    with pytest.raises(StoreError, match="sized for 10"):
        extract(
            model, data.subset(np.arange(6)), attack, store, layers, device="cpu", progress=False
        )
    # A layer whose width no longer matches the store (model changed): named, nothing written.
    narrow = dict(widths)
    narrow[layers[1]] += 1
    other = ActivationStore.create(
        tmp_path / "w.zarr", n=10, layers=narrow, batch_size=5, dtype="float16", attrs={}
    )
    with pytest.raises(StoreError, match=f"layers/{layers[1]}/clean"):
        extract(model, data, attack, other, layers, device="cpu", progress=False)
    assert not other.completed_batches().any()
