"""DP-SGD for one site's local round, on Opacus (per-sample clipping, Gaussian noise, Poisson sampling).

Pure pieces (δ default, σ from a target ε) are separate from the stateful Opacus run. The
accountant's memory across rounds is the site's :class:`~privacy.ledger.PrivacyLedger`:
a round returns its step set ``(σ, q, steps)`` and the caller records it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.ingest import ImageSet
from clients.train import ProximalTerm, TrainConfig, make_optimizer
from federation.errors import ConfigError, ModelError, PrivacyBudgetError
from privacy.ledger import ALPHAS, PrivacyLedger, StepSet

__all__ = [
    "DPConfig",
    "DPRoundResult",
    "default_delta",
    "noise_for_target",
    "planned_step_set",
    "private_round",
    "sample_rate",
    "site_ledger",
    "steps_per_epoch",
    "train_dp_round",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPConfig:
    """Differential-privacy settings of a site.

    Parameters
    ----------
    max_grad_norm
        Per-sample gradient clipping bound C.
    noise_multiplier
        σ; if ``None`` it is derived so that the whole planned run reaches ``target_epsilon``.
    target_epsilon
        ε the planned run should reach (used only when ``noise_multiplier`` is ``None``);
        defaults to ``epsilon_budget``.
    epsilon_budget
        The site refuses any round that would take its ε above this.
    delta
        δ; ``None`` means ``1 / (10 N)`` for a site with N images.
    accountant
        Opacus accountant: ``rdp`` (default) or ``prv``.
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    epsilon_budget: float = 8.0
    delta: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.max_grad_norm > 0:
            raise ConfigError(f"`max_grad_norm` must be positive, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"`noise_multiplier` must be positive, got {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"`target_epsilon` must be positive, got {self.target_epsilon}")
        if not self.epsilon_budget > 0:
            raise ConfigError(f"`epsilon_budget` must be positive, got {self.epsilon_budget}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"`delta` must be in (0, 1), got {self.delta}")
        if (self.target_epsilon or 0) > self.epsilon_budget:
            raise ConfigError(f"`target_epsilon` {self.target_epsilon} exceeds `epsilon_budget` "
                              f"{self.epsilon_budget}")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"`accountant` must be 'rdp' or 'prv', got {self.accountant!r}")


def default_delta(n: int, configured: float | None = None) -> float:
    """δ of a site with ``n`` records: the configured value, else ``1 / (10 n)``."""
    if configured is not None:
        return configured
    if n < 1:
        raise ConfigError(f"a site needs at least one record to set delta, got n={n}")
    return 1.0 / (10.0 * n)


def site_ledger(path: Path, *, site: str, n: int, dp: DPConfig) -> PrivacyLedger:
    """The privacy ledger of a site with ``n`` records, kept at ``dp``'s budget, δ and accountant."""
    return PrivacyLedger(path, site=site, budget=dp.epsilon_budget, delta=default_delta(n, dp.delta),
                         accountant=dp.accountant)


@functools.lru_cache(maxsize=64)
def noise_for_target(target_epsilon: float, *, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """σ such that ``steps`` DP-SGD steps at ``sample_rate`` spend ``target_epsilon`` at ``delta``.

    Opacus's binary search; the achieved ε is at most the target (tolerance 0.01), with
    the same Rényi orders as the ledger's :func:`~privacy.ledger.epsilon_of`. Pure, so
    cached: a site asks the same question every round.
    """
    alphas = {"alphas": list(ALPHAS)} if accountant == "rdp" else {}
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant,
                                      epsilon_tolerance=0.01, **alphas))


@dataclass(frozen=True)
class DPRoundResult:
    """What one DP-SGD round did."""

    loss: float
    step_set: StepSet
    seconds: float
    empty_batches: int = 0


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch under Poisson sampling, as Opacus runs them."""
    return math.ceil(n / batch_size)


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate q Opacus uses for a loader of ``n`` records in batches of ``batch_size``."""
    return 1.0 / steps_per_epoch(n, batch_size)


def planned_step_set(n: int, *, train: TrainConfig, noise_multiplier: float) -> StepSet:
    """The step set one round of :func:`train_dp_round` will spend (checked against the ledger first)."""
    return (noise_multiplier, sample_rate(n, train.batch_size), train.epochs * steps_per_epoch(n, train.batch_size))


def train_dp_round(
    model: nn.Module,
    data: ImageSet,
    *,
    train: TrainConfig,
    dp: DPConfig,
    noise_multiplier: float,
    proximal_mu: float = 0.0,
) -> DPRoundResult:
    """Train ``model`` in place for ``train.epochs`` with DP-SGD; return the step set spent.

    The model must hold no batch statistics (Opacus refuses BatchNorm: per-sample
    gradients would be mixed across samples). The steps are counted here, not read back
    from Opacus's accountant, which merges equal step sets. An empty Poisson batch is a
    step like any other (noise only), as the accountant assumes. ``proximal_mu`` > 0 adds
    FedProx's proximal gradient after clipping and noise (it reads no record).
    """
    model.train()
    prox = ProximalTerm(model, proximal_mu) if proximal_mu else None
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ModelError(f"model cannot be trained with DP-SGD: {errors[0]}")
    gen = torch.Generator().manual_seed(train.seed)
    loader = DataLoader(TensorDataset(data.images, data.labels), batch_size=train.batch_size, generator=gen)
    optimizer, sched = make_optimizer(model, train, train.epochs * steps_per_epoch(len(data), train.batch_size))
    with warnings.catch_warnings():
        # Opacus warns that secure_mode=False uses torch's PRNG; a simulation accepts that.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
        dp_model, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=dp.max_grad_norm, poisson_sampling=True)
    q = sample_rate(len(data), train.batch_size)
    loss_fn = nn.CrossEntropyLoss()
    start, steps, total, count, empty = time.perf_counter(), 0, 0.0, 0, 0
    try:
        with warnings.catch_warnings():
            # Opacus' per-sample hooks on the first layer trip torch's "no inputs require
            # gradients" note: expected, images do not require gradients.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(train.epochs):
                for x, y in dp_loader:
                    if train.augment and len(x):
                        flip = torch.rand(x.shape[0], generator=gen) < 0.5
                        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                    dp_opt.zero_grad(set_to_none=True)
                    if len(x):
                        loss = loss_fn(dp_model(x), y)
                        loss.backward()
                        total += loss.item() * len(y)
                        count += len(y)
                    else:  # an empty Poisson batch still takes its noisy step: zero per-sample gradients
                        for p in dp_opt.params:
                            p.grad_sample = p.new_zeros((0, *p.shape))
                        empty += 1
                    if dp_opt.pre_step():  # clip, noise and account; then the plain update
                        if prox is not None:
                            prox.add_grad()
                        dp_opt.original_optimizer.step()
                    sched.step()
                    steps += 1
    finally:
        dp_model._close()  # remove Opacus hooks so the module can be wrapped again
    model.eval()
    return DPRoundResult(loss=total / max(count, 1), step_set=(noise_multiplier, q, steps),
                         seconds=time.perf_counter() - start, empty_batches=empty)


def private_round(
    model: nn.Module,
    data: ImageSet,
    *,
    train: TrainConfig,
    dp: DPConfig,
    ledger: PrivacyLedger,
    round_: int,
    planned_rounds: int,
    proximal_mu: float = 0.0,
) -> tuple[DPRoundResult, float]:
    """One DP-SGD round under a site's ledger: plan σ, check the budget, train, record.

    σ is ``dp.noise_multiplier``, or the σ at which ``planned_rounds`` rounds like this one
    spend ``dp.target_epsilon`` (default: the budget). Returns the round and the site's
    cumulative ε after it.

    Raises
    ------
    PrivacyBudgetError
        The round would take the site over its budget; nothing was trained or recorded.
    """
    n = len(data)
    sigma = dp.noise_multiplier
    if sigma is None:
        _, q, steps = planned_step_set(n, train=train, noise_multiplier=1.0)
        sigma = noise_for_target(dp.target_epsilon or dp.epsilon_budget, delta=ledger.delta, sample_rate=q,
                                 steps=steps * planned_rounds, accountant=dp.accountant)
    planned = planned_step_set(n, train=train, noise_multiplier=sigma)
    ledger.check([planned])
    result = train_dp_round(model, data, train=train, dp=dp, noise_multiplier=sigma, proximal_mu=proximal_mu)
    if result.step_set != planned:  # never record less than was spent
        ledger.record(round_, [result.step_set])
        raise PrivacyBudgetError(f"site {ledger.site}: ran {result.step_set}, planned {planned}")
    return result, ledger.record(round_, [result.step_set])
