"""Bad-input census: every bad setting, file and command line is refused with rc 2, one message
naming the offending key or file, no traceback, and before any attack (no store is created)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from advlens.cli import main as cli

log = logging.getLogger(__name__)
# cli() binds logging to the stderr of the test that first ran it; capsys closes that.
pytestmark = pytest.mark.usefixtures("fresh_log_handlers")

TINY = [
    "data.source=synthetic", "data.n=40", "attack.n_iter=2", "attack.batch_size=20",
    "attack.norms=['linf']", "embed.n_iter=250", "embed.n_jobs=1", "embed.pca_dims=10",
    "overlap.bootstrap=0",
]  # fmt: skip
HAS_GPU = torch.cuda.is_available()


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("census-files")
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"w": _Payload()}, d / "evil.pt")
    torch.save(nn.Linear(2, 2).state_dict(), d / "linear.pt")
    (d / "junk.h5").write_text("hello")
    (d / "bad.toml").write_text("[data\nn = 3\n")
    (d / "unknown.toml").write_text("[data]\nsamples = 3\n")
    (d / "badtype.toml").write_text('[data]\nn = "many"\n')
    (d / "section.toml").write_text("data = 3\n")
    return d


# (command-line extras, text the message must contain); {f} is the files folder.
CASES = [
    (["--set", "data.n=2"], "data.n"),
    (["--set", "data.n=0"], "data.n"),
    (["--set", "data.n=abc"], "data.n"),
    (["--set", "data.n=1.5"], "data.n"),
    (["--set", "data.source=mnist"], "data.source"),
    (["--set", "data.split=val"], "split"),
    (["--set", "data.seed=x"], "data.seed"),
    (["--set", "data.source=fashion-mnist", "--set", "data.path='/nonexistent'"], "/nonexistent"),
    (["--set", "model.name=resnet999"], "model.name"),
    (["--set", "model.name=no_such_pkg.nets:make"], "model.name"),
    (["--set", "model.device=tpu"], "model.device"),
    (["--set", "model.checkpoint='/nonexistent.pt'"], "model.checkpoint"),
    (["--set", "model.checkpoint='{f}/junk.pt'"], "not a torch checkpoint"),
    (["--set", "model.checkpoint='{f}/evil.pt'"], "not a weights-only file"),
    (["--set", "model.checkpoint='{f}/linear.pt'"], "model.checkpoint"),
    (["--set", "model.train_epochs=0"], "model.train_epochs"),
    (["--set", "model.name=denser"], "model.checkpoint"),
    (["--set", "model.name=denser", "--set", "model.checkpoint='{f}/junk.h5'"], "junk.h5"),
    (["--set", "attack.name=pgd-xyz"], "pgd-xyz"),
    (["--set", "attack.names=['apgd-ce', 'nope']"], "nope"),
    (["--set", "attack.names=['']"], "attack.names"),
    (["--set", "attack.norms=[]"], "attack.norms"),
    (["--set", "attack.norms=['l3']"], "attack.norms"),
    (["--set", "attack.eps.linf=-1"], "attack.eps.linf"),
    (["--set", "attack.eps.linf=nan"], "attack.eps.linf"),
    (["--set", "attack.eps.l5=1"], "attack.eps"),
    (["--set", "attack.n_iter=0"], "attack.n_iter"),
    (["--set", "attack.batch_size=0"], "attack.batch_size"),
    (["--set", "attack.n_restarts=0"], "attack.n_restarts"),
    (["--set", "attack.rho=1.5"], "attack.rho"),
    (["--set", "attack.seed=-1"], "attack.seed"),
    (["--set", "attack.autocast_bf16=maybe"], "attack.autocast_bf16"),
    (["--set", "attack.stepsize=3"], "attack.stepsize"),
    (["--set", "layers.select=[]"], "layers.select"),
    (["--set", "layers.select=['conv9']"], "conv9"),
    (["--set", "layers.pool=max"], "layers.pool"),
    (["--set", "layers.include_input=perhaps"], "layers.include_input"),
    (["--set", "embed.engine=tsnecuda"], "tsnecuda"),
    (["--set", "embed.engines=['opentsne', 'bogus']"], "bogus"),
    (["--set", "embed.init=spectral"], "embed.init"),
    (["--set", "embed.learning_rate=-5"], "embed.learning_rate"),
    (["--set", "embed.learning_rate=fast"], "embed.learning_rate"),
    (["--set", "embed.n_jobs=0"], "embed.n_jobs"),
    (["--set", "embed.n_jobs=-3"], "embed.n_jobs"),
    (["--set", "embed.n_iter=100"], "embed.early_exaggeration_iter"),
    (["--set", "embed.n_iter=0"], "embed.n_iter"),
    (["--set", "embed.perplexity=nan"], "embed.perplexity"),
    (["--set", "embed.perplexity=-1"], "embed.perplexity"),
    (["--set", "embed.perplexities=[10, 0]"], "embed.perplexities"),
    (["--set", "embed.seeds=['a']"], "embed.seeds"),
    (["--set", "embed.pca_dims=1"], "embed.pca_dims"),
    (["--set", "embed.early_exaggeration=0.5"], "embed.early_exaggeration"),
    (["--set", "overlap.k=0"], "overlap.k"),
    (["--set", "overlap.k=80"], "overlap.k"),
    (["--set", "overlap.k_sweep=[5, 0]"], "overlap.k_sweep"),
    (["--set", "overlap.variant=foo"], "overlap.variant"),
    (["--set", "overlap.bootstrap=-1"], "overlap.bootstrap"),
    (["--set", "output.dtype=float64"], "output.dtype"),
    (["--workers", "-1"], "schedule.workers"),
    (["--set", "schedule.retries=-1"], "schedule.retries"),
    (["--set", "schedule.gpus=[-1]"], "schedule.gpus"),
    (["--scheduler", "tcp://127.0.0.1:{port}"], "schedule.scheduler"),
    (["--scheduler", "tcp://127.0.0.1:notaport"], "schedule.scheduler"),
    (["--config", "/nonexistent.toml"], "/nonexistent.toml"),
    (["--config", "{f}/bad.toml"], "bad.toml"),
    (["--config", "{f}/unknown.toml"], "data.samples"),
    (["--config", "{f}/badtype.toml"], "data.n"),
    (["--config", "{f}/section.toml"], "data"),
    (["--set", "garbage"], "--set"),
    (["--workers", "abc"], "--workers"),
    (["--no-such-flag"], "--no-such-flag"),
]
if not HAS_GPU:
    CASES += [
        (["--gpus", "0"], "schedule.gpus"),
        (["--set", "model.device=cuda"], "model.device"),
    ]


def _args(tmp_path, files, extra):
    port = _free_port()
    extra = [a.replace("{f}", str(files)).replace("{port}", str(port)) for a in extra]
    sets = sum((["--set", s] for s in [*TINY, f"output.root='{tmp_path}'"]), [])
    if extra and extra[0] == "--config":  # a config file replaces the defaults, not TINY
        sets = [*extra[:2], *sets]
        extra = extra[2:]
    return ["run", "--quiet", *sets, *extra]


def test_census_has_sixty_distinct_cases():
    assert len({tuple(c[0]) for c in CASES}) >= 60


@pytest.mark.parametrize(("extra", "needle"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_refused_before_any_attack(tmp_path, files, capsys, extra, needle):
    args = _args(tmp_path, files, extra)
    t0 = time.perf_counter()
    try:
        code = cli(args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    seconds = time.perf_counter() - t0
    log.info("census %s: refused in %.2f s", " ".join(extra), seconds)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err, err
    assert not list(tmp_path.rglob("*.zarr")), "the attack started"


# Each case is also refused in process above; a real process (exit status, logging set up by
# main) costs a fresh interpreter and torch import, so `make test` runs one, CI (`long`) all.
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--set", "data.n=2"], "data.n"),
        pytest.param(
            ["--set", "model.checkpoint='{f}/evil.pt'"], "not a weights-only file",
            marks=pytest.mark.long,
        ),
        pytest.param(["--workers", "-1"], "schedule.workers", marks=pytest.mark.long),
    ],
)  # fmt: skip
def test_bad_input_from_a_real_process(tmp_path, files, extra, needle):
    args = _args(tmp_path, files, extra)
    proc = subprocess.run(
        [sys.executable, "-m", "advlens", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not list(Path(tmp_path).rglob("*.zarr"))
