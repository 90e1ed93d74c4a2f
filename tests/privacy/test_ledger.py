from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from clients.client_app import HospitalClient, get_weights
from clients.ingest import Preprocess, load_dataset
from clients.train import TrainConfig
from federation.config import RunConfig
from federation.errors import PrivacyBudgetError
from federation.model import ArchConfig, build_model
from privacy.dp import DPConfig, noise_for_target, planned_step_set, train_dp_round
from privacy.ledger import ALPHAS, PrivacyLedger, epsilon_of

DELTA = 1e-5
EPS_TOL = 1e-9          # ledger vs accountant: same arithmetic, different bookkeeping
TARGET_TOL = 0.05       # Opacus' binary search stops within 0.01 of the target


def _stepwise_epsilon(step_sets: list[tuple[float, float, int]], delta: float) -> float:
    """Independent reference: Opacus' accountant stepped once per optimizer step."""
    acc = RDPAccountant()
    for sigma, q, steps in step_sets:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta, alphas=list(ALPHAS)))


def test_epsilon_is_cumulative_over_three_real_dp_rounds(tiny_federation: Path, tmp_path: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    model = build_model(ArchConfig(input_size=32), seed=0)
    ledger = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=50.0, delta=DELTA)
    train = TrainConfig(epochs=1, batch_size=4)

    eps = []
    for r in (1, 2, 3):
        result = train_dp_round(model, data, train=train, dp=DPConfig(), noise_multiplier=1.1)
        eps.append(ledger.record(r, [result.step_set]))

    reloaded = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=50.0, delta=DELTA)
    recorded = reloaded.history
    assert [e.round for e in reloaded.entries] == [1, 2, 3]
    assert recorded == [(1.1, 1 / 3, 3)] * 3  # 12 images, batches of 4: q = 1/3, 3 steps a round
    assert eps[0] < eps[1] < eps[2]
    assert reloaded.epsilon() == pytest.approx(_stepwise_epsilon(recorded, DELTA), abs=EPS_TOL)
    assert json.loads((tmp_path / "site-1.json").read_text())["epsilon"] == pytest.approx(eps[2])


def test_a_round_that_would_exceed_the_budget_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "s.json", site="s", budget=3.0, delta=DELTA)
    ledger.record(1, [(1.0, 0.1, 50)])
    spent = ledger.epsilon()

    with pytest.raises(PrivacyBudgetError, match=r"above the budget 3; refusing to train"):
        ledger.check([(1.0, 0.1, 200)])

    assert ledger.epsilon() == spent
    assert len(PrivacyLedger(tmp_path / "s.json", site="s", budget=3.0, delta=DELTA).entries) == 1


def test_a_site_over_budget_says_so_and_sends_no_weight(tiny_federation: Path, tmp_path: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    cfg = RunConfig(image_size=32, batch_size=4, noise_multiplier=0.8, epsilon_budget=0.5)
    ledger = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=0.5, delta=DELTA)
    client = HospitalClient(data, cfg, site="site-1", ledger=ledger)
    start = get_weights(build_model(cfg.arch(), seed=0))

    weights, n, metrics = client.fit(start, {"server-round": 1})

    assert n == 0
    assert metrics["refused"] == 1
    assert "refusing to train" in metrics["reason"]
    assert all((a == b).all() for a, b in zip(weights, start, strict=True))
    assert not (tmp_path / "site-1.json").exists()


def test_the_planned_step_set_is_what_a_round_spends(tiny_federation: Path) -> None:
    data = load_dataset(tiny_federation / "site-2", preprocess=Preprocess(size=32))
    train = TrainConfig(epochs=2, batch_size=5)

    result = train_dp_round(build_model(ArchConfig(input_size=32)), data, train=train, dp=DPConfig(),
                            noise_multiplier=1.3)

    assert result.step_set == planned_step_set(len(data), train=train, noise_multiplier=1.3)


@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 0.1, 100), (8.0, 0.1, 200), (4.0, 0.02, 1000)])
def test_sigma_from_a_target_epsilon_reaches_it_without_exceeding(target: float, q: float, steps: int) -> None:
    sigma = noise_for_target(target, delta=DELTA, sample_rate=q, steps=steps)

    achieved = epsilon_of([(sigma, q, steps)], DELTA)

    assert achieved <= target
    assert achieved == pytest.approx(target, abs=TARGET_TOL)


def test_a_ledger_of_another_site_or_delta_is_refused(tmp_path: Path) -> None:
    PrivacyLedger(tmp_path / "l.json", site="site-1", budget=8, delta=DELTA).record(1, [(1.0, 0.1, 10)])

    with pytest.raises(PrivacyBudgetError, match="ledger of site 'site-1', not 'site-2'"):
        PrivacyLedger(tmp_path / "l.json", site="site-2", budget=8, delta=DELTA)
    with pytest.raises(PrivacyBudgetError, match=r"kept at delta=1e-05"):
        PrivacyLedger(tmp_path / "l.json", site="site-1", budget=8, delta=1e-6)


def test_an_unreadable_ledger_stops_training(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text("{ torn")

    with pytest.raises(PrivacyBudgetError, match=r"unreadable.*refusing to train"):
        PrivacyLedger(tmp_path / "l.json", site="s", budget=8, delta=DELTA)


def test_an_empty_poisson_batch_is_a_noisy_step_not_a_crash(tiny_federation: Path) -> None:
    # 4 images at q = 1/4: a batch is empty with probability 0.75**4 = 0.32, so eight steps
    # with none empty (p = 0.05) are rare; the loop finds a seed with an empty batch.
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    data = type(data)(data.images[:4], data.labels[:4], data.classes, data.files[:4])
    for seed in range(20):
        model = build_model(ArchConfig(input_size=32), seed=0)
        train = TrainConfig(epochs=2, batch_size=1, seed=seed, optimizer="sgd", lr=0.1)
        result = train_dp_round(model, data, train=train, dp=DPConfig(), noise_multiplier=1.0)
        if result.empty_batches:
            break
    assert result.empty_batches > 0
    assert result.step_set == (1.0, 0.25, 8)  # every step accounted for, the empty ones included
    assert all(p.isfinite().all() for p in model.parameters())


def test_equal_step_sets_merge_without_changing_epsilon() -> None:
    from opacus.accountants import RDPAccountant

    from privacy.ledger import ALPHAS, merge_step_sets

    history = [(1.5, 0.2, 10)] * 7 + [(2.0, 0.1, 5), (1.5, 0.2, 3)]
    assert merge_step_sets(history) == [(1.5, 0.2, 73), (2.0, 0.1, 5)]
    reference = RDPAccountant()
    reference.history = list(history)  # Opacus itself, one entry per round
    assert epsilon_of(history, DELTA) == pytest.approx(reference.get_epsilon(DELTA, alphas=list(ALPHAS)), rel=1e-12)
