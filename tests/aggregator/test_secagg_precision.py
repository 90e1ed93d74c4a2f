"""SecAgg+'s quantisation under DP: the weight cap the run config chooses keeps the masked mean precise.

Each site sends ``params · weight / max_weight`` quantised by Flower's own ``quantize`` (2²² levels over
``±clipping_range``) and the server divides the dequantised sum by the summed ratio, as Flower's SecAgg+
workflow does (the masks cancel in the sum and are left out here). Under DP every weight is 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from aggregator.server_app import secagg_workflow
from federation.config import DEFAULT_MAX_WEIGHT, RunConfig

QUANTIZATION_RANGE = 1 << 22   # Flower's default
MODULUS_RANGE = 1 << 32
DP_MEAN_TOL = 16 / QUANTIZATION_RANGE
"""Max error of the masked mean at cap 1: one quantisation step (16 / 2²² = 3.8e-6; each site's stochastic
rounding is off by less than a step, so their mean is too)."""


def _secagg_mean(updates: list[list[np.ndarray]], weights: list[int], *, max_weight: float,
                 clipping_range: float) -> list[np.ndarray]:
    """Flower's SecAgg+ arithmetic (client: ratio, quantise, combine; server: extract, dequantise, offset, scale)."""
    total: list[np.ndarray] | None = None
    for params, w in zip(updates, weights, strict=True):
        q_ratio = round(w / max_weight * QUANTIZATION_RANGE)
        scaled = parameters_multiply(params, q_ratio / QUANTIZATION_RANGE)
        quantized = quantize(scaled, clipping_range, QUANTIZATION_RANGE)
        sent = [a.astype(np.int64) for a in factor_combine(q_ratio, quantized)]
        total = sent if total is None else parameters_addition(total, sent)
    assert total is not None
    q_total, summed = factor_extract(parameters_mod(total, MODULUS_RANGE))
    out = dequantize(summed, clipping_range, QUANTIZATION_RANGE)
    offset = -(len(updates) - 1) * clipping_range
    return [(v + offset) * (QUANTIZATION_RANGE / q_total) for v in out]


def _updates(seed: int, sites: int = 5) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(0, 0.3, (32, 81)).astype(np.float32), rng.normal(0, 0.1, 3).astype(np.float32)]
            for _ in range(sites)]


def _error(cap: float, seed: int = 0) -> float:
    ups = _updates(seed)
    got = _secagg_mean(ups, [1] * len(ups), max_weight=cap, clipping_range=8.0)
    want = [np.mean([u[i] for u in ups], axis=0) for i in range(len(ups[0]))]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("cfg", [RunConfig(dp=True), RunConfig(dp=False, central_dp=True)], ids=["dp-sgd", "central"])
def test_under_dp_the_cap_is_one_and_the_mean_keeps_one_quantisation_step(cfg: RunConfig) -> None:
    assert cfg.secagg_weight_cap() == 1.0
    assert secagg_workflow(cfg).max_weight == 1.0
    assert _error(cfg.secagg_weight_cap()) < DP_MEAN_TOL


def test_flowers_default_cap_under_dp_costs_a_thousandfold_step() -> None:
    """The failure the automatic cap fixes: weight 1 of a cap of 1000 leaves 1/1000 of the levels."""
    assert _error(DEFAULT_MAX_WEIGHT) > 50 * DP_MEAN_TOL


def test_without_dp_the_cap_stays_flowers_and_an_explicit_cap_wins() -> None:
    assert RunConfig(dp=False).secagg_weight_cap() == DEFAULT_MAX_WEIGHT
    assert RunConfig(dp=True, secagg_max_weight=50.0).secagg_weight_cap() == 50.0
