"""DP's randomness is the site's: Poisson batches and noise from the OS CSPRNG, not from the run config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.optimizers import optimizer as opacus_optimizer

import privacy.dp as dp
from clients.client_app import HospitalClient, Site
from federation.config import RunConfig
from federation.ingest import Preprocess, load_dataset
from federation.model import build_model, get_weights
from privacy.ledger import PrivacyLedger
from privacy.policy import SitePolicy

CFG = RunConfig(image_size=32, batch_size=4, local_epochs=1, num_server_rounds=4, seed=0)


class _Spy:
    """Records every Poisson batch and every noise tensor a round draws."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[int]] = []
        self.noise: list[torch.Tensor] = []
        spy = self
        sampler = dp.UniformWithReplacementSampler

        class Recording(sampler):  # type: ignore[misc, valid-type]
            def __iter__(self) -> Any:
                for batch in super().__iter__():
                    spy.batches.append(list(batch))
                    yield batch

        original = opacus_optimizer._generate_noise

        def noise(*args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(*args, **kwargs)
            spy.noise.append(out.detach().clone())
            return out

        monkeypatch.setattr(dp, "UniformWithReplacementSampler", Recording)
        monkeypatch.setattr(opacus_optimizer, "_generate_noise", noise)

    def take(self) -> tuple[list[list[int]], list[torch.Tensor]]:
        out = (self.batches, self.noise)
        self.batches, self.noise = [], []
        return out


def _fit(folder: Path, tmp: Path, cfg: RunConfig, run: str) -> None:
    data = load_dataset(folder, preprocess=Preprocess(size=32))
    policy = SitePolicy(ledger_dir=str(tmp))
    ledger = PrivacyLedger(tmp / f"{run}.json", site="site-1", budget=8.0, delta=1e-5)
    client = HospitalClient(Site("site-1", data, policy, ledger), cfg, run=run, secagg=True)
    client.fit(get_weights(build_model(cfg.arch(), seed=0)), {"server-round": 1})


def test_two_rounds_with_identical_run_configs_draw_different_batches_and_noise(
        tiny_federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)

    _fit(tiny_federation / "site-1", tmp_path, CFG, run="a")
    batches_a, noise_a = spy.take()
    _fit(tiny_federation / "site-1", tmp_path, CFG, run="b")
    batches_b, noise_b = spy.take()

    assert len(batches_a) == len(batches_b) == 3  # 12 records, batches of 4
    assert batches_a != batches_b  # P(equal) = (5/9)**36 < 1e-9: three Bernoulli(1/3) masks over 12 records
    assert len(noise_a) == len(noise_b) > 0
    assert not any(torch.equal(x, y) for x, y in zip(noise_a, noise_b, strict=True))


def test_batch_selection_and_noise_depend_on_nothing_in_the_run_config(
        tiny_federation: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch)
    monkeypatch.setattr(dp.secrets, "randbits", lambda bits: 12345)  # fix the site's secret seeds only
    other = dataclasses.replace(CFG, seed=99, learning_rate=1e-2, augment=False, optimizer="sgd", epsilon_budget=6.0,
                                data_dir="/elsewhere", out_dir="/elsewhere", head="gap")

    _fit(tiny_federation / "site-1", tmp_path, CFG, run="a")
    batches_a, noise_a = spy.take()
    _fit(tiny_federation / "site-1", tmp_path, other, run="b")
    batches_b, _ = spy.take()

    assert batches_a == batches_b  # the same secrets: the same batches, whatever the run config says
    assert len(noise_a) > 0


def test_fresh_randomness_is_seeded_from_the_os_csprng(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []

    def randbits(bits: int) -> int:
        drawn.append(bits)
        return 1000 + len(drawn)

    monkeypatch.setattr(dp.secrets, "randbits", randbits)

    rng = dp.DPRandomness.fresh()

    assert drawn == [63, 63]
    assert (rng.sampling.initial_seed(), rng.noise.initial_seed()) == (1001, 1002)
