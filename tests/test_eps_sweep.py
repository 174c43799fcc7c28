"""`advlens sweep --eps`: the radius and matched-success interpolation against dense oracles,
the summary, its outputs, bad input, and one real sweep on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from advlens.cli import main as cli
from advlens.eps_sweep import (
    at_success,
    parse_eps,
    radius,
    render_eps_markdown,
    summarise_eps,
    write_eps_outputs,
)
from advlens.errors import ConfigError


def dense_radius(eps, values, threshold=0.5):
    """First crossing of the piecewise-linear curve through (0, 1) and the points, found on a
    fine grid (the oracle)."""
    xs = np.concatenate([[0.0], eps])
    ys = np.concatenate([[1.0], values])
    grid = np.linspace(0, xs[-1], 200_001)
    below = np.flatnonzero(np.interp(grid, xs, ys) < threshold)
    return None if below.size == 0 else grid[below[0]]


@settings(max_examples=60, deadline=None, database=None)
@given(
    steps=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6),
    values=st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
)
def test_radius_matches_dense_oracle(steps, values) -> None:
    eps = np.cumsum(steps)
    vals = np.array(values[: len(eps)])
    got = radius(eps, vals)
    want = dense_radius(eps, vals)
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, abs=2 * eps[-1] / 200_000 + 1e-9)


def test_radius_and_matched_success_by_hand() -> None:
    assert radius([0.1, 0.2], [0.8, 0.4]) == pytest.approx(0.175)
    assert radius([0.1], [0.0]) == pytest.approx(0.05)  # from the eps = 0 anchor
    assert radius([0.1, 0.2], [0.9, 0.6]) is None
    assert at_success([0.2, 0.6], [0.8, 0.4], 0.4) == pytest.approx(0.6)
    assert at_success([0.2, 0.6], [0.8, 0.4], 0.75) is None  # never reached: no value
    assert at_success([0.2, 0.6], [0.8, 0.4], 0.1) == pytest.approx(0.9)


def test_parse_eps_and_errors(capsys) -> None:
    assert parse_eps("0.1, 0.02,0.1") == [0.02, 0.1]
    for bad, needle in (("0.1,x", "'x' is not a number"), ("0,0.1", "finite number > 0")):
        assert cli(["sweep", "--eps", bad]) == 2
        assert needle in capsys.readouterr().err
    with pytest.raises(ConfigError, match="at least one budget"):
        parse_eps(" , ")
    assert cli(["sweep"]) == 2
    assert "give one of --n" in capsys.readouterr().err


def _entries():
    out = []
    for eps, succ, vals in ((0.05, 0.2, (1.0, 0.9, 0.7)), (0.1, 0.5, (1.0, 0.6, 0.3)),
                            (0.2, 0.9, (0.9, 0.2, 0.1))):  # fmt: skip
        rows = [{"attack": "apgd-ce", "norm": "linf", "layer": layer, "layer_index": i,
                 "calibrated": v, "success_rate": succ, "error": None, "variant": "share",
                 "space": "reduced"}
                for i, (layer, v) in enumerate(zip(("input", "conv1", "fc"), vals, strict=True))]  # fmt: skip
        out.append({"eps": eps, "rows": rows})
    return out


def test_summary_markdown_and_figures(tmp_path) -> None:
    layers = summarise_eps(_entries())
    assert [d["layer"] for d in layers] == ["input", "conv1", "fc"]
    fc = layers[2]
    assert fc["calibrated"] == [0.7, 0.3, 0.1] and fc["success_rate"] == [0.2, 0.5, 0.9]
    assert fc["radius"] == pytest.approx(radius([0.05, 0.1, 0.2], [0.7, 0.3, 0.1]))
    assert layers[0]["radius"] is None
    assert fc["at_success"]["0.5"] == pytest.approx(0.3)
    out = {"name": "t", "folder": str(tmp_path), "runs": _entries(), "layers": layers}
    md = render_eps_markdown(out)
    assert "Calibrated value per layer (share, space reduced; 1 = as mixed" in md
    assert "| apgd-ce-linf | input | 1.000 | 1.000 | 0.900 | > 0.2 |" in md
    assert "| apgd-ce-linf | 0.200 | 0.500 | 0.900 |" in md
    paths = write_eps_outputs(out, tmp_path)
    assert json.loads(paths[0].read_text())["layers"] == json.loads(json.dumps(layers))
    for p in paths[2:]:
        assert p.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.long
def test_eps_sweep_runs_the_analysis_at_each_budget(tmp_path) -> None:
    root = tmp_path / "runs"
    argv = ["sweep", "--quiet", "--eps", "0.3,0.05", "--name", "t",
            "--set", f'output.root="{root}"']  # fmt: skip
    for setting in ("data.source=synthetic", "data.n=30", "attack.n_iter=5",
                    "attack.batch_size=30", 'attack.norms=["linf"]', 'layers.select=["fc1"]',
                    "layers.include_input=false", "embed.n_iter=250", "embed.n_jobs=1",
                    "embed.pca_dims=10", "overlap.bootstrap=0"):  # fmt: skip
        argv += ["--set", setting]
    assert cli(argv) == 0
    folder = root / "eps-sweep-t"
    out = json.loads((folder / "eps_sweep.json").read_text())
    assert [r["eps"] for r in out["runs"]] == [0.05, 0.3]
    (fc1,) = out["layers"]
    assert fc1["eps"] == [0.05, 0.3] and all(0 <= v <= 1 for v in fc1["calibrated"])
    assert fc1["success_rate"][1] >= fc1["success_rate"][0]
    for r in out["runs"]:
        assert all(row["eps"] == r["eps"] for row in r["rows"])
    assert (folder / "radius.png").read_bytes()[:4] == b"\x89PNG"
