"""Intervals over repeats (report.tables.aggregate): a percentile bootstrap only with enough
repeats, otherwise the range, said so; engines and perplexities never pooled silently."""

from __future__ import annotations

import numpy as np
import pytest

from advlens.report.tables import MIN_PERCENTILE_REPEATS, aggregate, bootstrap_mean


def _rows(values, engines=("opentsne",), perplexities=(30.0,)):
    out = []
    for i, v in enumerate(values):
        out.append({"attack": "apgd-ce", "norm": "linf", "layer": "fc1", "layer_index": 0,
                    "engine": engines[i % len(engines)], "seed": i,
                    "perplexity": perplexities[i % len(perplexities)], "overlap": v,
                    "calibrated": v, "overlap_reduced": v, "overlap_reduced_calibrated": v,
                    "auc": 0.5, "error": None})  # fmt: skip
    return out


def test_few_repeats_give_the_range_and_say_so() -> None:
    vals = [0.2, 0.35, 0.3]
    (a,) = aggregate(_rows(vals))
    assert a["interval"] == "3 repeats, range" and a["pooled"] == ""
    assert (a["calibrated_boot_low"], a["calibrated_boot_high"]) == (0.2, 0.35)
    assert a["calibrated_mean"] == pytest.approx(np.mean(vals))


def test_enough_repeats_give_a_percentile_bootstrap() -> None:
    vals = list(np.random.default_rng(0).uniform(0.2, 0.4, MIN_PERCENTILE_REPEATS + 2))
    (a,) = aggregate(_rows(vals))
    assert a["interval"].startswith("95% percentile bootstrap over 12 repeats")
    assert (a["overlap_boot_low"], a["overlap_boot_high"]) == bootstrap_mean(np.array(vals))
    assert min(vals) < a["overlap_boot_low"] < a["overlap_boot_high"] < max(vals)


def test_engines_and_perplexities_pooled_only_visibly() -> None:
    (a,) = aggregate(_rows([0.1, 0.2, 0.3, 0.4], engines=("opentsne", "sklearn")))
    assert a["pooled"] == "engines"
    (b,) = aggregate(_rows([0.1, 0.2], engines=("a", "b"), perplexities=(30.0, 50.0)))
    assert b["pooled"] == "engines perplexities"
