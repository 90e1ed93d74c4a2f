"""FedProx's proximal term, with and without DP-SGD, and the server strategy that asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.server.strategy import FedProx

from aggregator.metrics import RunRecorder
from aggregator.server_app import build_strategy
from federation.config import RunConfig
from federation.errors import ConfigError
from federation.ingest import Preprocess, load_dataset
from federation.model import ArchConfig, build_model
from federation.train import ProximalTerm, TrainConfig, train_epochs
from privacy.dp import DPRandomness, RoundPlan, sample_rate, steps_per_epoch, train_dp_round

ARCH = ArchConfig(input_size=32, channels=(4, 8), head="flatten")
TRAIN = TrainConfig(epochs=2, batch_size=4, lr=1e-2, seed=1, schedule="constant")


def _drift(model: torch.nn.Module, start: dict[str, torch.Tensor]) -> float:
    return float(sum((p.detach() - start[n]).pow(2).sum() for n, p in model.named_parameters()).sqrt())


def test_the_proximal_term_keeps_local_training_near_the_global_weights(tiny_federation: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    free, held = build_model(ARCH, seed=0), build_model(ARCH, seed=0)
    start = {n: p.detach().clone() for n, p in free.named_parameters()}

    train_epochs(free, data, config=TRAIN)
    train_epochs(held, data, config=TRAIN, proximal_mu=50.0)

    assert _drift(held, start) < 0.5 * _drift(free, start)


def test_under_dp_the_proximal_term_costs_no_budget_and_still_pulls_back(tiny_federation: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    free, held = build_model(ARCH, seed=0), build_model(ARCH, seed=0)
    start = {n: p.detach().clone() for n, p in free.named_parameters()}
    n = len(data)
    plan = RoundPlan(1.0, 1.0, sample_rate(n, TRAIN.batch_size), TRAIN.epochs * steps_per_epoch(n, TRAIN.batch_size),
                     1e-5)

    def same() -> DPRandomness:  # the same batches and noise for both, so only the proximal term differs
        return DPRandomness(torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))

    a = train_dp_round(free, data, train=TRAIN, plan=plan, randomness=same())
    b = train_dp_round(held, data, train=TRAIN, plan=plan, randomness=same(), proximal_mu=50.0)

    assert a.step_set == b.step_set == plan.step_set
    assert _drift(held, start) < 0.5 * _drift(free, start)


def test_a_non_positive_mu_is_refused() -> None:
    with pytest.raises(ConfigError, match="`proximal_mu` must be positive, got -1"):
        ProximalTerm(build_model(ARCH), -1.0)


def test_the_server_runs_fedprox_with_the_configured_mu(tiny_federation: Path, tmp_path: Path) -> None:
    cfg = RunConfig(image_size=32, strategy="fedprox", proximal_mu=0.3)
    test = load_dataset(tiny_federation / "test", preprocess=Preprocess(size=32))

    strategy = build_strategy(cfg, RunRecorder(cfg, test, tmp_path))

    assert isinstance(strategy, FedProx)
    assert strategy.proximal_mu == 0.3
