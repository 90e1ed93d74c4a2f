"""The site's ledger and DP-SGD rounds: ε across rounds, reservations, locks, exact step counts, σ from what is left."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from federation.errors import PolicyRefusedError, PrivacyBudgetError
from federation.ingest import ImageSet, Preprocess, load_dataset
from federation.model import ArchConfig, build_model
from federation.train import TrainConfig
from privacy.dp import (
    RoundPlan,
    dp_loader,
    noise_for_target,
    plan_round,
    private_round,
    sample_rate,
    steps_per_epoch,
    train_dp_round,
)
from privacy.ledger import ALPHAS, EntryStatus, PrivacyLedger, epsilon_of, merge_step_sets
from privacy.policy import RoundRequest, SitePolicy

DELTA = 1e-5
EPS_TOL = 1e-9          # ledger vs accountant: same arithmetic, different bookkeeping
TARGET_TOL = 0.05       # the σ search stops within 0.1 % of σ: ε lands just under the target


def _stepwise_epsilon(step_sets: list[tuple[float, float, int]], delta: float) -> float:
    """Independent reference: Opacus' accountant stepped once per optimizer step."""
    acc = RDPAccountant()
    for sigma, q, steps in step_sets:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta=delta, alphas=list(ALPHAS)))


def _request(**kw: object) -> RoundRequest:
    values: dict[str, object] = {"dp": True, "secagg": True, "epsilon_budget": 8.0, "target_epsilon": None,
                                 "noise_multiplier": None, "max_grad_norm": 1.0, "delta": None, "rounds": 3}
    values.update(kw)
    return RoundRequest(**values)  # type: ignore[arg-type]


def _plan(n: int, train: TrainConfig, sigma: float) -> RoundPlan:
    return RoundPlan(sigma, 1.0, sample_rate(n, train.batch_size), train.epochs * steps_per_epoch(n, train.batch_size),
                     DELTA)


def test_epsilon_is_cumulative_over_three_real_dp_rounds(tiny_federation: Path, tmp_path: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    model = build_model(ArchConfig(input_size=32), seed=0)
    ledger = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=50.0, delta=DELTA)
    train = TrainConfig(epochs=1, batch_size=4)

    eps = []
    for r in (1, 2, 3):
        result = train_dp_round(model, data, train=train, plan=_plan(len(data), train, 1.1))
        eps.append(ledger.record(r, [result.step_set]))

    reloaded = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=50.0, delta=DELTA)
    recorded = reloaded.history
    assert [e.round for e in reloaded.entries] == [1, 2, 3]
    assert recorded == [(1.1, 1 / 3, 3)] * 3  # 12 images, batches of 4: q = 1/3, 3 steps a round
    assert eps[0] < eps[1] < eps[2]
    assert reloaded.epsilon() == pytest.approx(_stepwise_epsilon(recorded, DELTA), abs=EPS_TOL)
    assert json.loads((tmp_path / "site-1.json").read_text())["epsilon"] == pytest.approx(eps[2])


def test_the_ledger_reproduces_opacus_at_golden_values() -> None:
    # Opacus' RDPAccountant with the ledger's orders, for settings of the sweep
    for history in ([(1.54, 0.2, 100)], [(0.8, 1 / 93, 186 * 10)], [(1.1, 0.5, 40), (2.0, 0.25, 12)]):
        assert epsilon_of(history, DELTA) == pytest.approx(_stepwise_epsilon(history, DELTA), rel=1e-9)


def test_a_round_that_would_exceed_the_budget_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "s.json", site="s", budget=3.0, delta=DELTA)
    ledger.record(1, [(1.0, 0.1, 50)])
    spent = ledger.epsilon()

    with pytest.raises(PrivacyBudgetError, match=r"above the budget 3; refusing to train"):
        ledger.reserve(2, (1.0, 0.1, 200), run="r")

    assert ledger.epsilon() == spent
    assert len(PrivacyLedger(tmp_path / "s.json", site="s", budget=3.0, delta=DELTA).entries) == 1


def test_sigma_comes_from_the_remaining_budget_and_the_rounds_still_planned(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "s.json", site="s", budget=8.0, delta=DELTA)
    ledger.record(1, [(1.0, 0.1, 100)], run="an-earlier-run")  # ε already spent by another run
    train = TrainConfig(epochs=1, batch_size=10)
    policy = SitePolicy(ledger_dir=str(tmp_path))

    plan = plan_round(policy, _request(rounds=4), ledger, n=100, train=train, run="now")
    after = epsilon_of([*ledger.history, (plan.noise_multiplier, plan.sample_rate, plan.steps * 4)], DELTA)
    fresh = plan_round(policy, _request(rounds=4), PrivacyLedger(tmp_path / "t.json", site="t", budget=8.0,
                                                                  delta=DELTA), n=100, train=train, run="now")

    assert after <= 8.0
    assert after == pytest.approx(8.0, abs=TARGET_TOL)
    assert plan.noise_multiplier > fresh.noise_multiplier  # less budget left: more noise
    assert plan.steps == 10
    assert plan.sample_rate == pytest.approx(0.1)


def test_the_sigma_of_a_run_stays_while_its_rounds_follow_the_plan(tiny_federation: Path, tmp_path: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    policy = SitePolicy(ledger_dir=str(tmp_path))
    ledger = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=8.0, delta=DELTA)
    train = TrainConfig(epochs=1, batch_size=4)
    model = build_model(ArchConfig(input_size=32), seed=0)

    sigmas, eps = [], 0.0
    for r in (1, 2, 3):
        result, eps, _ = private_round(model, data, train=train, policy=policy, request=_request(rounds=3),
                                       ledger=ledger, run="run-a", round_=r)
        sigmas.append(result.step_set[0])
    with pytest.raises(PolicyRefusedError, match=r"\[planned-rounds\]"):
        private_round(model, data, train=train, policy=policy, request=_request(rounds=3), ledger=ledger,
                      run="run-a", round_=4)

    assert sigmas[0] == sigmas[1] == sigmas[2]
    assert 8.0 - TARGET_TOL <= eps <= 8.0
    assert [e.status for e in ledger.entries] == [EntryStatus.SPENT] * 3


def test_a_second_run_on_a_persistent_ledger_spends_only_what_is_left(tiny_federation: Path, tmp_path: Path) -> None:
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    policy = SitePolicy(ledger_dir=str(tmp_path))
    ledger = PrivacyLedger(tmp_path / "site-1.json", site="site-1", budget=8.0, delta=DELTA)
    train = TrainConfig(epochs=1, batch_size=4)
    model = build_model(ArchConfig(input_size=32), seed=0)
    for r in (1, 2):
        private_round(model, data, train=train, policy=policy, request=_request(rounds=2, target_epsilon=4.0),
                      ledger=ledger, run="first", round_=r)
    half = ledger.epsilon()

    for r in (1, 2):  # the second run targets the whole budget and is sized for what is left, not refused
        private_round(model, data, train=train, policy=policy, request=_request(rounds=2), ledger=ledger,
                      run="second", round_=r)

    assert half <= 4.0
    assert half < ledger.epsilon() <= 8.0
    with pytest.raises(PolicyRefusedError, match=r"\[budget\]"):  # a third run at σ 1 no longer fits
        private_round(model, data, train=train, policy=policy, request=_request(rounds=2, noise_multiplier=1.0),
                      ledger=ledger, run="third", round_=1)
    assert len(ledger.entries) == 4


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
    # with none empty (p = 0.05) are rare; the loop tries until a round has an empty batch.
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    data = ImageSet(data.images[:4], data.labels[:4], data.classes, data.files[:4])
    train = TrainConfig(epochs=2, batch_size=1, optimizer="sgd", lr=0.1)
    for _ in range(20):
        model = build_model(ArchConfig(input_size=32), seed=0)
        result = train_dp_round(model, data, train=train, plan=_plan(4, train, 1.0))
        if result.empty_batches:
            break
    assert result.empty_batches > 0
    assert result.step_set == (1.0, 0.25, 8)  # every step accounted for, the empty ones included
    assert all(p.isfinite().all() for p in model.parameters())


def test_equal_step_sets_merge_without_changing_epsilon() -> None:
    history = [(1.5, 0.2, 10)] * 7 + [(2.0, 0.1, 5), (1.5, 0.2, 3)]
    assert merge_step_sets(history) == [(1.5, 0.2, 73), (2.0, 0.1, 5)]
    reference = RDPAccountant()
    reference.history = list(history)  # Opacus itself, one entry per round
    assert epsilon_of(history, DELTA) == pytest.approx(reference.get_epsilon(DELTA, alphas=list(ALPHAS)), rel=1e-12)


@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 0.1, 100), (8.0, 0.1, 200), (4.0, 0.02, 1000)])
def test_sigma_from_a_target_epsilon_reaches_it_without_exceeding(target: float, q: float, steps: int) -> None:
    sigma = noise_for_target(target, delta=DELTA, sample_rate=q, steps=steps)

    achieved = _stepwise_epsilon([(sigma, q, steps)], DELTA)

    assert achieved <= target
    assert achieved == pytest.approx(target, abs=TARGET_TOL)


# ------------------------------------------------------------------ exact step counts
def _images(n: int) -> ImageSet:
    import torch

    return ImageSet(torch.zeros(n, 1, 2, 2), torch.zeros(n, dtype=torch.long), ("a",), tuple(str(i) for i in range(n)))


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [16, 32, 64])
def test_the_loader_runs_the_planned_steps_for_every_n_up_to_5000(batch_size: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(0)
    wrong = []
    for n in range(1, 5001):
        loader = dp_loader(_images(n), batch_size=batch_size, generator=gen)
        planned = TrainConfig(epochs=1, batch_size=batch_size)
        steps = sum(1 for _ in loader.batch_sampler)  # Opacus's Poisson sampler, as the round iterates it
        if steps != planned.epochs * steps_per_epoch(n, batch_size) or abs(
                sample_rate(n, batch_size) * steps - 1) > 1e-12:
            wrong.append(n)
    assert wrong == []


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=1, max_value=5000), batch_size=st.sampled_from([16, 32, 64]))
def test_iterating_the_loader_yields_exactly_the_planned_steps(n: int, batch_size: int) -> None:
    import torch

    batches = list(dp_loader(_images(n), batch_size=batch_size, generator=torch.Generator().manual_seed(n)))
    assert len(batches) == steps_per_epoch(n, batch_size)
    assert all(x.shape[1:] == (1, 2, 2) for x, _ in batches)  # empty batches keep their shape


def test_opacus_own_loader_runs_one_step_short_where_ours_does_not() -> None:
    # the floating-point trap of int(1 / q): n = 2950, B = 32 → ⌈n/B⌉ = 93, int(1 / (1/93)) = 92
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import TensorDataset

    data = _images(2950)
    opacus_own = DPDataLoader(TensorDataset(data.images, data.labels), sample_rate=sample_rate(2950, 32))
    ours = dp_loader(data, batch_size=32, generator=torch.Generator().manual_seed(0))

    assert sum(1 for _ in opacus_own.batch_sampler) == 92
    assert sum(1 for _ in ours.batch_sampler) == steps_per_epoch(2950, 32) == 93


def test_a_site_of_2950_records_in_batches_of_32_trains_its_rounds(tmp_path: Path) -> None:
    import torch

    n = 2950
    data = ImageSet(torch.rand(n, 1, 16, 16), torch.randint(0, 3, (n,)), ("normal", "cyst", "tumour"),
                    tuple(f"{i}.dcm" for i in range(n)))
    policy = SitePolicy(ledger_dir=str(tmp_path))
    ledger = PrivacyLedger(tmp_path / "s.json", site="s", budget=8.0, delta=DELTA)
    train = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05)
    model = build_model(ArchConfig(input_size=16, channels=(2, 4)), seed=0)

    for r in (1, 2):
        result, _, _ = private_round(model, data, train=train, policy=policy, request=_request(rounds=2),
                                     ledger=ledger, run="r", round_=r)
        assert result.step_set[2] == 93

    assert [e.status for e in ledger.entries] == [EntryStatus.SPENT, EntryStatus.SPENT]


# ------------------------------------------------------------------ two writers, a crash
def _append_rounds(path: str, worker: int, rounds: int) -> None:
    ledger = PrivacyLedger(Path(path), site="s", budget=1e6, delta=DELTA)
    for r in range(rounds):
        entry = ledger.reserve(r, (1.0 + worker, 0.1, 1), run=f"w{worker}")
        ledger.settle(entry, (1.0 + worker, 0.1, 1))


def test_two_processes_sharing_one_ledger_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_rounds, args=(str(path), w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]

    ledger = PrivacyLedger(path, site="s", budget=1e6, delta=DELTA)
    assert len(ledger.entries) == 50
    assert sorted(e.round for e in ledger.entries if e.run == "w0") == list(range(25))
    assert sorted(e.round for e in ledger.entries if e.run == "w1") == list(range(25))
    assert all(e.status is EntryStatus.SPENT for e in ledger.entries)


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import privacy.dp as dp
    from federation.ingest import Preprocess, load_dataset
    from federation.train import TrainConfig
    from federation.model import ArchConfig, build_model
    from privacy.ledger import PrivacyLedger
    from privacy.policy import RoundRequest, SitePolicy

    def hang(*args, **kwargs):
        print("training", flush=True)
        time.sleep(600)

    dp.train_dp_round = hang  # the round is killed while it trains
    data = load_dataset(Path(sys.argv[1]), preprocess=Preprocess(size=32))
    ledger = PrivacyLedger(Path(sys.argv[2]), site="site-1", budget=8.0, delta=1e-5)
    request = RoundRequest(dp=True, secagg=True, epsilon_budget=8.0, target_epsilon=None, noise_multiplier=None,
                           max_grad_norm=1.0, delta=None, rounds=2)
    dp.private_round(build_model(ArchConfig(input_size=32)), data, train=TrainConfig(epochs=1, batch_size=4),
                     policy=SitePolicy(), request=request, ledger=ledger, run="killed", round_=1)
""")


def test_a_run_killed_mid_round_leaves_its_reservation_counted(tiny_federation: Path, tmp_path: Path) -> None:
    path = tmp_path / "site-1.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tiny_federation / "site-1"), str(path)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "training"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    time.sleep(0.1)

    ledger = PrivacyLedger(path, site="site-1", budget=8.0, delta=DELTA)
    assert [e.status for e in ledger.entries] == [EntryStatus.RESERVED]
    assert ledger.epsilon() > 0  # the reservation counts as spent
    assert ledger.rounds_in_run("killed") == 1
