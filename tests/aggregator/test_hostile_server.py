"""A coordinator that asks for less privacy than the hospitals allow, on Flower's real Simulation Engine.

The run config is the coordinator's to write and reaches every site; the site policy is
the hospital's. Each case runs a ServerApp whose run config asks for one thing less than
the policy allows; every site must refuse, name the rule, send no weights and leave its
ledger untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from flwr.common import Message, MessageType
from flwr.simulation import run_simulation

from aggregator.metrics import refusal_rule
from aggregator.server_app import make_server_app
from clients.client_app import make_client_app
from federation.config import RunConfig
from federation.records import FitMetric
from privacy.policy import Rule, SitePolicy
from simulations.phantoms import PhantomConfig, generate_phantoms

pytestmark = pytest.mark.slow

SITES = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile")
    generate_phantoms(out, config=PhantomConfig(sites=SITES, per_site=12, test=9, size=16, seed=5))
    return out


def _simulate(data: Path, out: Path, policy: SitePolicy, *, server: dict[str, Any], clients: dict[str, Any]
              ) -> list[Message]:
    """One simulated run; ``server`` and ``clients`` are the run config each side sees. Returns every reply."""
    # 60 s SecAgg+ timeout: at 20 s a loaded machine dropped live sites ("Insufficient available nodes")
    base = RunConfig(data_dir=str(data), out_dir=str(out), image_size=16, batch_size=4, local_epochs=1,
                     secagg_timeout=60.0, secagg_max_weight=100.0, pretrain_epochs=0).to_flower()
    replies: list[Message] = []
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=make_server_app({**base, **server}, on_reply=replies.append),
                   client_app=make_client_app({**base, **clients}, policies=policy),
                   num_supernodes=SITES,
                   backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False, "log_to_driver": False}})
    return [r for r in replies if r.metadata.message_type == MessageType.TRAIN]


def _ledger_entries(ledgers: Path) -> int:
    return sum(len(json.loads(f.read_text())["entries"]) for f in ledgers.glob("site-*.json"))


ASKS: dict[str, tuple[dict[str, Any], Rule]] = {
    "dp off": ({"dp": False}, Rule.DP_REQUIRED),
    "a larger budget": ({"epsilon-budget": 100.0}, Rule.EPSILON_BUDGET),
    "a smaller sigma": ({"noise-multiplier": 0.1}, Rule.MIN_NOISE_MULTIPLIER),
    "a larger clipping norm": ({"max-grad-norm": 5.0}, Rule.MAX_GRAD_NORM),
    "no secagg": ({"secagg": False}, Rule.SECAGG_REQUIRED),
    # σ 0.6 is allowed, but 40 rounds at it do not fit in ε 8: refused before the first
    "more rounds than the budget allows": ({"noise-multiplier": 0.6, "num-server-rounds": 40}, Rule.BUDGET),
}


@pytest.mark.parametrize("case", list(ASKS))
def test_every_site_refuses_a_round_that_asks_for_less_than_its_policy(
        federation: Path, tmp_path: Path, case: str) -> None:
    asks, rule = ASKS[case]
    policy = SitePolicy(ledger_dir=str(tmp_path / "ledgers"))

    # the clients see the hostile run config; this server stops after one round whatever it announced
    replies = _simulate(federation, tmp_path / "run", policy, server={**asks, "num-server-rounds": 1}, clients=asks)

    assert len(replies) == SITES  # one answer per site (under SecAgg+: to the setup stage)
    assert all(r.has_error() and not r.has_content() for r in replies)  # no weights, no metrics
    assert [refusal_rule(r) for r in replies] == [str(rule)] * SITES
    assert _ledger_entries(tmp_path / "ledgers") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rounds"][0]["aggregated"] is False  # the empty round kept the global model
    assert metrics["rounds"][0]["refusals"] == {str(rule): SITES}


def test_a_round_beyond_the_planned_ones_is_refused_and_the_earlier_ones_stand(
        federation: Path, tmp_path: Path) -> None:
    policy = SitePolicy(ledger_dir=str(tmp_path / "ledgers"))

    # the run config announces 1 round (σ is sized for it); the server runs 2
    replies = _simulate(federation, tmp_path / "run", policy, server={"num-server-rounds": 2},
                        clients={"num-server-rounds": 1})

    by_round: dict[str, list[Message]] = {}
    for r in replies:
        by_round.setdefault(r.metadata.group_id, []).append(r)
    assert not any(r.has_error() for r in by_round["1"])
    assert [refusal_rule(r) for r in by_round["2"] if r.has_error()] == [str(Rule.PLANNED_ROUNDS)] * SITES
    assert _ledger_entries(tmp_path / "ledgers") == SITES  # round 1 only
    for ledger in (tmp_path / "ledgers").glob("site-*.json"):
        assert json.loads(ledger.read_text())["epsilon"] <= 8.0


ALLOWED_DP = {str(k) for k in FitMetric}


def _fit_metrics(replies: list[Message]) -> list[dict[str, Any]]:
    return [dict(r.content.config_records["fitres.metrics"]) for r in replies
            if not r.has_error() and "fitres.metrics" in r.content.config_records]


@pytest.mark.parametrize("secagg", [True, False])
def test_a_fit_reply_carries_exactly_the_allow_listed_metrics(federation: Path, tmp_path: Path,
                                                              secagg: bool) -> None:
    policy = SitePolicy(ledger_dir=str(tmp_path / "ledgers"), secagg_required=secagg)

    replies = _simulate(federation, tmp_path / "run", policy, server={"secagg": secagg, "num-server-rounds": 1},
                        clients={"secagg": secagg, "num-server-rounds": 1})

    sent = _fit_metrics(replies)
    assert len(sent) == SITES
    assert all(set(m) == ALLOWED_DP for m in sent)
    weights = [r.content.metric_records["fitres.num_examples"]["num_examples"] for r in replies
               if not r.has_error() and "fitres.num_examples" in r.content.metric_records]
    assert weights == [1] * SITES  # under DP the weight is data-independent (each site holds 12 records)
    if secagg:  # under SecAgg+ no array leaves a site in the clear
        assert all(not any(len(rec) for rec in r.content.array_records.values()) for r in replies
                   if not r.has_error())

