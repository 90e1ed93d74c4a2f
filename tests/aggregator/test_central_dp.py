"""Central (site-level) DP: the noise the server adds, its accounting and budget, the client's clipping."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import (
    Code,
    Context,
    FitIns,
    FitRes,
    Message,
    MessageType,
    Metadata,
    RecordDict,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from opacus.accountants import RDPAccountant

from aggregator.central_dp import CentralDP, plan_central_dp
from clients.client_app import central_clipping_mod
from federation.errors import ConfigError
from privacy.ledger import ALPHAS, PrivacyLedger, epsilon_of

DELTA = 1e-5
SIZE = 200_000        # coordinates: the sample std of N(0, s²) is within 0.5 % of s (10 standard errors)
STD_RTOL = 0.005


class _Proxy(ClientProxy):
    """A registered client that is never called (the strategy only samples it)."""

    def get_properties(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def fit(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError


def _manager(n: int) -> tuple[SimpleClientManager, list[ClientProxy]]:
    manager = SimpleClientManager()
    proxies: list[ClientProxy] = [_Proxy(str(i)) for i in range(n)]
    for p in proxies:
        manager.register(p)
    return manager, proxies


def _wrapper(tmp_path: Path, *, sigma: float = 2.0, clip: float = 1.0, budget: float = 1e3, rounds: int = 3
             ) -> CentralDP:
    plan = plan_central_dp(clipping_norm=clip, noise_multiplier=sigma, epsilon_budget=budget, delta=DELTA,
                           rounds=rounds)
    ledger = PrivacyLedger(tmp_path / "central.json", site="central", budget=budget, delta=DELTA)
    return CentralDP(FedAvg(min_fit_clients=2, min_available_clients=2), plan=plan, ledger=ledger,
                     rng=np.random.default_rng(0))


def _results(proxies: list[ClientProxy], vectors: list[np.ndarray], weights: list[int]
             ) -> list[tuple[ClientProxy, FitRes]]:
    return [(p, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([v]), n, {}))
            for p, v, n in zip(proxies, vectors, weights, strict=True)]


def _accountant_epsilon(sigma: float, releases: int) -> float:
    """Independent reference: Opacus' RDP accountant stepped once per release, sampling rate 1."""
    acc = RDPAccountant()
    for _ in range(releases):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    return float(acc.get_epsilon(delta=DELTA, alphas=list(ALPHAS)))


@pytest.mark.parametrize(("contributing", "refused"), [(4, 0), (3, 1), (1, 3)])
def test_the_noise_is_sigma_c_over_the_sites_asked_whatever_the_dropouts(
        tmp_path: Path, contributing: int, refused: int) -> None:
    manager, proxies = _manager(4)
    dp = _wrapper(tmp_path)
    start = np.random.default_rng(2).uniform(-1, 1, SIZE).astype(np.float32)
    asked = dp.configure_fit(1, ndarrays_to_parameters([start]), manager)
    rng = np.random.default_rng(1)
    vectors = [start + rng.uniform(-0.1, 0.1, SIZE).astype(np.float32) for _ in proxies]
    weights = [1] * contributing + [0] * refused     # a refusing site contributes nothing

    params, metrics = dp.aggregate_fit(1, _results(proxies, vectors, weights), [])

    assert params is not None
    assert len(asked) == 4
    assert all(ins.config["clipping_norm"] == 1.0 for _, ins in asked)
    # the estimate divides the contributions' sum by the k = 4 sites asked
    expected = start + sum(v - start for v in vectors[:contributing]) / 4
    noise = parameters_to_ndarrays(params)[0].astype(np.float64) - expected
    assert noise.std() == pytest.approx(2.0 * 1.0 / 4, rel=STD_RTOL)
    assert abs(noise.mean()) < 5 * 0.5 / np.sqrt(SIZE)
    assert "central_sites" not in metrics  # participation is not published
    assert metrics["central_noise_std"] == pytest.approx(0.5)
    assert metrics["central_epsilon"] == pytest.approx(_accountant_epsilon(2.0, 1), rel=1e-9)
    assert dp.ledger.history == [(2.0, 1.0, 1)]


def test_a_timed_out_site_changes_neither_the_denominator_nor_the_noise(tmp_path: Path) -> None:
    manager, proxies = _manager(3)
    dp = _wrapper(tmp_path)
    dp.configure_fit(1, ndarrays_to_parameters([np.zeros(SIZE, np.float32)]), manager)
    vectors = [np.full(SIZE, 0.3, np.float32)] * 2

    params, _ = dp.aggregate_fit(1, _results(proxies[:2], vectors, [1, 1]), [TimeoutError("site 3 hung")])

    assert params is not None  # Flower's own wrapper releases nothing once any site fails
    released = parameters_to_ndarrays(params)[0]
    assert released.mean() == pytest.approx(0.2, abs=5 * (2.0 / 3) / np.sqrt(SIZE))  # 2 × 0.3 / 3 asked
    assert released.std() == pytest.approx(2.0 / 3, rel=STD_RTOL)


def test_central_epsilon_accumulates_and_a_round_over_budget_is_refused(tmp_path: Path) -> None:
    two_rounds = epsilon_of([(2.0, 1.0, 2)], DELTA)
    manager, proxies = _manager(2)
    dp = _wrapper(tmp_path, budget=two_rounds * 1.001, rounds=2)
    zero = ndarrays_to_parameters([np.zeros(10, np.float32)])
    eps = []
    for r in (1, 2):
        assert len(dp.configure_fit(r, zero, manager)) == 2
        _, metrics = dp.aggregate_fit(r, _results(proxies, [np.zeros(10, np.float32)] * 2, [1, 1]), [])
        eps.append(metrics["central_epsilon"])

    asked = dp.configure_fit(3, zero, manager)

    assert eps[0] < eps[1] == pytest.approx(two_rounds)
    assert eps[1] == pytest.approx(_accountant_epsilon(2.0, 2), rel=1e-9)
    assert asked == []
    assert dp.last["central_refused"] == 1.0
    assert dp.aggregate_fit(3, _results(proxies, [np.zeros(10, np.float32)] * 2, [1, 1]), []) == (None, {})
    reloaded = PrivacyLedger(tmp_path / "central.json", site="central", budget=1.0, delta=DELTA)
    assert reloaded.history == [(2.0, 1.0, 1)] * 2


def test_sigma_is_derived_from_the_budget_and_a_given_sigma_over_budget_is_an_error() -> None:
    plan = plan_central_dp(clipping_norm=1.0, noise_multiplier=None, epsilon_budget=8.0, delta=DELTA, rounds=10)

    assert 7.9 <= plan.planned_epsilon <= 8.0
    with pytest.raises(ConfigError, match="central-epsilon-budget"):
        plan_central_dp(clipping_norm=1.0, noise_multiplier=0.3, epsilon_budget=8.0, delta=DELTA, rounds=10)


def _train_message(global_w: list[np.ndarray], norm: float) -> Message:
    ins = FitIns(ndarrays_to_parameters(global_w), {"clipping_norm": norm, "server-round": 1})
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                    created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(recorddict_compat.fitins_to_recorddict(ins, keep_input=True), metadata=meta)


def _context(**run_config: Any) -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)


def test_the_site_clips_its_update_to_its_own_norm_before_it_leaves(tmp_path: Path) -> None:
    global_w = [np.zeros((3, 3), np.float32), np.ones(4, np.float32)]
    local_w = [np.full((3, 3), 2.0, np.float32), np.full(4, -1.0, np.float32)]  # ‖Δ‖ = sqrt(36 + 16)

    def train(msg: Message, ctxt: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(local_w), 1, {})
        return msg.create_reply(recorddict_compat.fitres_to_recorddict(res, keep_input=True))

    mod = central_clipping_mod()
    reply = mod(_train_message(global_w, 0.5), _context(**{"central-dp": True, "central-clipping-norm": 0.5}),
                train)
    sent = parameters_to_ndarrays(recorddict_compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)
    delta = np.sqrt(sum(float(np.sum((s - g) ** 2)) for s, g in zip(sent, global_w, strict=True)))
    direction = np.concatenate([(s - g).ravel() for s, g in zip(sent, global_w, strict=True)])
    original = np.concatenate([(w - g).ravel() for w, g in zip(local_w, global_w, strict=True)])

    assert delta == pytest.approx(0.5, rel=1e-5)
    assert np.allclose(direction / 0.5, original / np.linalg.norm(original), atol=1e-6)
    with pytest.raises(ConfigError, match=r"clipping norm 5\.0"):
        mod(_train_message(global_w, 5.0), _context(**{"central-dp": True, "central-clipping-norm": 0.5}), train)
