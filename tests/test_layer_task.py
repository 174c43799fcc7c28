"""Layer tasks on synthetic stores with known answers (issues 2 and 11).

A store whose perturbed activations are the clean ones shifted by a growing amount per layer
must give a decreasing overlap curve and an increasing detector AUC; identical sets give
overlap ~ 1 and AUC ~ 0.5; a huge shift gives overlap ~ 0 and AUC ~ 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from advlens.config import EmbedConfig, OverlapConfig
from advlens.kernels.metrics import auto_k, chance
from advlens.layer_task import LayerTask, run_layer_task
from advlens.report.tables import ARTEFACT_GAP
from advlens.store import ActivationStore

N, D = 150, 20
SHIFTS = {"same": 0.0, "near": 1.0, "mid": 2.5, "far": 100.0}


def _store(tmp_path) -> ActivationStore:
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 3
    centres = rng.normal(scale=6.0, size=(3, D))
    clean = (centres[labels] + rng.normal(size=(N, D))).astype(np.float32)
    direction = np.zeros(D, dtype=np.float32)
    direction[0] = 1.0
    store = ActivationStore.create(
        tmp_path / "synthetic.zarr", n=N, layers=dict.fromkeys(SHIFTS, D), batch_size=N,
        dtype="float32", attrs={"config": {"test": True}},
    )  # fmt: skip
    samples = {
        "index": np.arange(N), "label": labels, "pred_clean": labels, "pred_perturbed": labels,
        "success": np.zeros(N, bool), "norm": np.zeros(N, np.float32),
    }  # fmt: skip
    acts = {}
    for layer, shift in SHIFTS.items():
        # "same": an independent redraw from the same distribution, not the same points.
        redraw = (centres[labels] + rng.normal(size=(N, D))).astype(np.float32)
        acts[layer] = (clean, redraw if shift == 0 else clean + shift * direction)
    with store.writer() as w:
        w.put(0, samples, acts)
    return ActivationStore.open(store.path)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    store = _store(tmp)
    embed = EmbedConfig(engine="opentsne", n_iter=400, n_jobs=1, pca_dims=10)
    out = {}
    for i, layer in enumerate(SHIFTS):
        task = LayerTask(
            store=str(store.path), run_dir=str(tmp), attack="synthetic", norm="l2", eps=1.0,
            layer=layer, layer_index=i, engine="opentsne", seed=0, perplexity=30.0,
            embed=embed, overlap=OverlapConfig(bootstrap=50), device="cpu",
        )  # fmt: skip
        out[layer] = (task, run_layer_task(task))
    return out


def test_identical_distributions_overlap_and_chance_auc(rows):
    row = rows["same"][1]
    # k = "auto" is 2 at this N: the raw value sits near its chance level (0.75), the calibrated
    # one near 1 (within its sampling noise, about 0.03 here)
    assert row["calibrated"] >= 0.85 and row["overlap_reduced_calibrated"] >= 0.85
    assert row["overlap"] >= 0.9 * row["overlap_chance"]
    assert abs(row["auc"] - 0.5) < 0.15


def test_far_shift_separates_completely(rows):
    row = rows["far"][1]
    assert row["overlap"] <= 0.05 and row["overlap_reduced"] <= 0.05
    assert row["auc"] > 0.95


def test_growing_shift_gives_decreasing_curve(rows):
    # calibrated: the raw value of "same" sits at its chance level (k = 2), "near" twins above it
    overlap = [rows[layer][1]["calibrated"] for layer in SHIFTS]
    auc = [rows[layer][1]["auc"] for layer in SHIFTS]
    assert all(a >= b - 0.05 for a, b in zip(overlap, overlap[1:], strict=False)), overlap
    assert overlap[0] - overlap[-1] > 0.8
    assert auc[-1] > auc[0] + 0.4


def test_row_fields_in_range_and_consistent(rows):
    for task, row in rows.values():
        for key in ("overlap", "mixing", "pair", "share", "overlap_reduced", "auc", "value"):
            assert 0.0 <= row[key] <= 1.0, (key, row[key])
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
        assert row["calibrated_ci_low"] <= row["calibrated"] <= row["calibrated_ci_high"]
        assert row["k"] == auto_k(N) and row["k_setting"] == "auto"
        assert row["k_sweep"][f"overlap@{row['k']}"] == row["overlap"]
        for v in ("overlap", "mixing", "pair", "share"):
            assert row[f"{v}_chance"] == pytest.approx(chance(v, N, row["k"]))
            assert row[f"{v}_calibrated"] == pytest.approx(min(1, row[v] / row[f"{v}_chance"]))
        v = row["variant"]
        assert row["map_calibrated"] == row[f"{v}_calibrated"]
        assert row["reduced_calibrated"] == row[f"{v}_reduced_calibrated"]
        assert (
            row["calibrated"] == row[f"{'reduced_' if row['space'] == 'reduced' else ''}calibrated"]
        )
        gap = row["map_calibrated"] - row["reduced_calibrated"]
        assert row["artefact_gap"] == pytest.approx(gap)
        assert row["artefact_flag"] == (abs(gap) > ARTEFACT_GAP)
        assert row["n"] == N and row["error"] is None
        saved = np.load(task.map_path)
        assert saved["xy"].shape == (2 * N, 2)
        assert saved["per_point"].mean() == pytest.approx(row["overlap"])
        assert not (Path(task.store) / "embeddings").exists()  # the map is kept once: its .npz
        assert json.loads(task.row_path.read_text()) == row


def test_finished_task_is_skipped_not_recomputed(rows):
    task, row = rows["mid"]
    before = task.map_path.stat().st_mtime_ns
    assert run_layer_task(task) == row
    assert task.map_path.stat().st_mtime_ns == before


def test_task_id_changes_with_settings_but_not_with_repeat_lists(rows):
    task, _ = rows["near"]
    from dataclasses import replace

    more_seeds = replace(task, embed=replace(task.embed, seeds=(0, 1, 2)))
    other_iters = replace(task, embed=replace(task.embed, n_iter=500))
    assert more_seeds.task_id == task.task_id
    assert other_iters.task_id != task.task_id
    assert replace(task, seed=1).task_id != task.task_id


def test_report_uses_the_stored_k_sweep_which_matches_the_map(rows):
    from advlens.report.tables import TaskMap, knn_overlap_sweep, row_sweep

    for task, row in rows.values():
        z = np.load(task.map_path)
        m = TaskMap(row, z["xy"], z["is_perturbed"], z["labels"], z["per_point"])
        assert row_sweep(m, (5, 10, 20)) == knn_overlap_sweep(
            z["xy"], z["is_perturbed"], (5, 10, 20)
        )
