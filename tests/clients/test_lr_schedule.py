"""The sites' learning rate across server rounds (``lr-schedule``), against torch's own cosine annealing."""

from __future__ import annotations

import itertools

import pytest
import torch

from clients.client_app import train_config
from federation.config import RunConfig
from federation.errors import ConfigError

LR_TOL = 1e-12
"""Relative tolerance between the round's rate and torch's CosineAnnealingLR (both float64 arithmetic)."""


def _torch_cosine(lr: float, rounds: int) -> list[float]:
    """Rates of rounds 1..R from torch.optim.lr_scheduler.CosineAnnealingLR(T_max=R), stepped once a round."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=rounds)
    rates = []
    for _ in range(rounds):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("rounds", [1, 2, 5, 20])
def test_cosine_rounds_follow_torchs_cosine_annealing(rounds: int) -> None:
    cfg = RunConfig(num_server_rounds=rounds, learning_rate=0.01, lr_schedule="cosine")
    ours = [train_config(cfg, "site-1", r).lr for r in range(1, rounds + 1)]
    assert ours == pytest.approx(_torch_cosine(0.01, rounds), rel=LR_TOL)
    assert ours[0] == 0.01
    assert all(a > b for a, b in itertools.pairwise(ours))
    assert train_config(cfg, "site-1", 0).lr == 0.01   # the planning call: no round yet


def test_constant_is_the_default_and_keeps_the_rate() -> None:
    cfg = RunConfig(num_server_rounds=4, learning_rate=0.006)
    assert cfg.lr_schedule == "constant"
    assert {train_config(cfg, "site-2", r).lr for r in range(5)} == {0.006}


def test_the_flat_run_config_key_and_a_bad_value() -> None:
    cfg = RunConfig.from_flower({"lr-schedule": "cosine", "num-server-rounds": 3})
    assert cfg.round_learning_rate(3) == pytest.approx(cfg.learning_rate * 0.25, rel=LR_TOL)
    with pytest.raises(ConfigError, match="`lr-schedule` must be one of constant, cosine, got 'step'"):
        RunConfig(lr_schedule="step")


def test_a_server_round_out_of_range_stays_on_the_schedule() -> None:
    """``server-round`` comes from the (untrusted) server: outside 1..R it is held to the schedule's ends."""
    cfg = RunConfig(num_server_rounds=5, learning_rate=0.01, lr_schedule="cosine")
    last = cfg.round_learning_rate(5)
    assert cfg.round_learning_rate(-7) == cfg.round_learning_rate(1) == 0.01
    assert cfg.round_learning_rate(10**9) == last
    assert 0 < last < 0.01
