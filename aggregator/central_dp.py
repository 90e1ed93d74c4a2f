"""Central (site-level) differential privacy: client-side clipping, server-side Gaussian noise.

DP-SGD at each site (:mod:`privacy.dp`) bounds what the model reveals about one *patient*.
Central DP bounds what the released global model reveals about one *hospital's whole
contribution* (McMahan et al., "Learning differentially private recurrent language
models", ICLR 2018): every site clips its update ``Δ = w_local − w_global`` to L2 norm
``C`` (Flower's ``fixedclipping_mod``, run inside SecAgg+ so the clipped update is what
gets masked), every contributing site has the same weight, and the server adds
``N(0, (σ C / m)²)`` to each coordinate of the mean of the ``m`` contributions, i.e. noise
of standard deviation ``σ C`` on a sum whose sensitivity to adding or removing one site is
``C``. It composes with SecAgg+: the server sees only the (unnoised) mean, and the noise
goes on that mean before the strategy (FedAvg, FedProx or FedAdam) turns it into the next
global model, so FedAdam's server optimiser is post-processing.

Trust model, stated plainly: the server draws the noise, so central DP protects the
sites from everyone who receives the global model (other hospitals, the public, a
later model inversion), not from the aggregation server itself; SecAgg+ is what keeps
the server from seeing any individual update.

Accounting is Opacus's RDP accountant over the rounds, one Gaussian mechanism per round
with sampling rate ``q`` = sites asked / sites available. With the default
``fraction-fit`` 1 every site takes part (``q = 1``) and the bound is exact; with
``q < 1`` Flower samples a fixed-size subset rather than Poisson-sampling sites, and the
Poisson bound is the usual approximation. The server keeps its own
:class:`~privacy.ledger.PrivacyLedger` (``RUN/central_ledger.json``), checks every round
against ``central-epsilon-budget`` before asking any site to train, and refuses (no
clients, no release) when the round would exceed it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from federation.errors import ConfigError, PrivacyBudgetError
from privacy.dp import noise_for_target
from privacy.ledger import PrivacyLedger, epsilon_of

__all__ = ["CentralDP", "CentralDPPlan", "plan_central_dp"]

log = logging.getLogger(__name__)

CentralObserver = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class CentralDPPlan:
    """σ, C and the ε the planned rounds spend at δ (all rounds, every site sampled at ``sample_rate``)."""

    noise_multiplier: float
    clipping_norm: float
    sample_rate: float
    rounds: int
    delta: float
    epsilon_budget: float
    planned_epsilon: float


def plan_central_dp(*, clipping_norm: float, noise_multiplier: float | None, epsilon_budget: float,
                    delta: float, sample_rate: float, rounds: int) -> CentralDPPlan:
    """Choose σ (``None``: the smallest σ whose ``rounds`` releases fit ``epsilon_budget``) and check it.

    Raises
    ------
    ConfigError
        A bad value, or a given σ at which the planned rounds would exceed the budget.
    """
    if not clipping_norm > 0:
        raise ConfigError(f"`central-clipping-norm` must be positive, got {clipping_norm}")
    if not 0 < delta < 1:
        raise ConfigError(f"`central-delta` must be in (0, 1), got {delta}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"central DP sample rate must be in (0, 1], got {sample_rate}")
    if rounds < 1:
        raise ConfigError(f"central DP needs at least one round, got {rounds}")
    if noise_multiplier is None:
        noise_multiplier = noise_for_target(epsilon_budget, delta=delta, sample_rate=sample_rate, steps=rounds)
    elif not noise_multiplier > 0:
        raise ConfigError(f"`central-noise-multiplier` must be positive, got {noise_multiplier}")
    eps = epsilon_of([(noise_multiplier, sample_rate, rounds)], delta)
    if eps > epsilon_budget:
        raise ConfigError(f"central DP: {rounds} rounds at central-noise-multiplier {noise_multiplier:g} "
                          f"(sample rate {sample_rate:g}) spend epsilon {eps:.3f} at delta {delta:g}, above "
                          f"`central-epsilon-budget` {epsilon_budget:g}; raise sigma, lower the rounds or "
                          "leave sigma at 0 to derive it")
    return CentralDPPlan(noise_multiplier, clipping_norm, sample_rate, rounds, delta, epsilon_budget, eps)


class CentralDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side-clipping DP wrapper, with site dropout, accounting and a budget.

    Differences from Flower's wrapper: the noise goes on the mean of the sites that
    actually contributed (``m`` survivors, so its scale ``σC/m`` matches the sensitivity
    of that mean rather than of the sampled count) and *before* the inner strategy
    aggregates (correct for FedAdam too); a round with dropouts is still released; every
    release is recorded in ``ledger`` and a round that would exceed its budget is refused.

    ``observer`` (tests, audits) gets per round ``noise_std``, ``sites``, ``epsilon``.
    """

    def __init__(self, strategy: Strategy, *, plan: CentralDPPlan, ledger: PrivacyLedger,
                 rng: np.random.Generator | None = None, observer: CentralObserver | None = None) -> None:
        # num_sampled_clients feeds only Flower's aggregate_fit, replaced here (noise uses the survivors)
        super().__init__(strategy, noise_multiplier=plan.noise_multiplier, clipping_norm=plan.clipping_norm,
                         num_sampled_clients=1)
        self.plan, self.ledger, self.observer = plan, ledger, observer
        self.rng = rng if rng is not None else np.random.default_rng()  # OS entropy
        self._rate: dict[int, float] = {}
        self.last: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"CentralDP(sigma={self.plan.noise_multiplier:g}, C={self.plan.clipping_norm:g})"

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        """Ask the sites to train (with the clipping norm) unless this round would exceed the budget."""
        self.last = {}
        instructions = super().configure_fit(server_round, parameters, client_manager)
        available = max(client_manager.num_available(), 1)
        rate = min(len(instructions) / available, 1.0)
        try:
            self.ledger.check([(self.plan.noise_multiplier, rate, 1)])
        except PrivacyBudgetError as exc:
            log.warning("central DP: %s; round %d asks no site to train and releases nothing", exc, server_round)
            self.last = {"central_refused": 1.0, "central_epsilon": self.ledger.epsilon()}
            return []
        self._rate[server_round] = rate
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Add ``N(0, (σC/m)²)`` to the contributions' mean, aggregate, account for the release."""
        contributing = [(p, r) for p, r in results if r.num_examples > 0]
        if not contributing or server_round not in self._rate:
            return None, {}
        m = len(contributing)
        std = self.plan.noise_multiplier * self.plan.clipping_norm / m
        noise = [self.rng.normal(0.0, std, size=a.shape).astype(a.dtype)
                 for a in parameters_to_ndarrays(contributing[0][1].parameters)]
        # The same noise on every contribution: any weighted mean of (x_k + z) is mean + z.
        # Under SecAgg+ every FitRes already carries the same unmasked mean.
        for _, res in contributing:
            res.parameters = ndarrays_to_parameters(
                [a + z for a, z in zip(parameters_to_ndarrays(res.parameters), noise, strict=True)])
        aggregated, metrics = self.strategy.aggregate_fit(server_round, contributing, failures)
        if aggregated is None:
            return None, metrics
        eps = self.ledger.record(server_round, [(self.plan.noise_multiplier, self._rate.pop(server_round), 1)])
        self.last = {"central_epsilon": eps, "central_noise_std": std, "central_sites": float(m),
                     "central_refused": 0.0}
        log.info("round %d: central DP noise std %.4g on the mean of %d sites; central epsilon %.3f",
                 server_round, std, m, eps)
        if self.observer is not None:
            self.observer(server_round, {"noise_std": std, "sites": float(m), "epsilon": eps})
        return aggregated, {**metrics, **self.last}

    def describe(self) -> dict[str, Any]:
        """The plan and spend, for ``metrics.json`` and ``privacy_ledger.json``."""
        return {"noise_multiplier": self.plan.noise_multiplier, "clipping_norm": self.plan.clipping_norm,
                "delta": self.plan.delta, "epsilon_budget": self.plan.epsilon_budget,
                "planned_epsilon": self.plan.planned_epsilon, "epsilon": self.ledger.epsilon(),
                "releases": len(self.ledger.entries), "ledger": str(self.ledger.path)}
