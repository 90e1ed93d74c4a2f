"""Central (site-level) differential privacy: client-side clipping, server-side Gaussian noise.

DP-SGD at each site (:mod:`privacy.dp`) bounds what the model reveals about one *patient*.
Central DP bounds what the released global model reveals about one *hospital's whole
contribution* (McMahan et al., "Learning differentially private recurrent language
models", ICLR 2018): every site clips its update ``Δ = w_local − w_global`` to L2 norm
``C`` (Flower's ``fixedclipping_mod``, run inside SecAgg+ so the clipped update is what
gets masked) and the server releases

    w_global + (1/k) Σ_{sites that contributed} Δ_i + N(0, (σ C / k)²)

with ``k`` the number of sites *asked* this round, a data-independent denominator: a
site that drops out or refuses contributes Δ = 0 and changes nothing else.

Adjacency: add/remove one site's whole contribution (its update present or absent).
The sum's sensitivity is ``C``, so the released mean's is ``C / k`` and the noise of
standard deviation ``σ C / k`` makes each round a Gaussian mechanism of multiplier σ.
How many sites actually contributed is not published (it reveals participation).

It composes with SecAgg+: the server sees only the (unnoised) mean of the survivors,
from which it forms the estimate above before the strategy (FedAvg, FedProx or FedAdam)
turns it into the next global model, so FedAdam's server optimiser is post-processing.

Trust model, stated plainly: the server draws the noise, so central DP protects the
sites from everyone who receives the global model (other hospitals, the public, a
later model inversion), not from the aggregation server itself; SecAgg+ is what keeps
the server from seeing any individual update, and DP-SGD at the site what protects
patients from the server.

Accounting: Opacus's RDP accountant, one Gaussian mechanism of multiplier σ per round at
sampling rate 1. With ``fraction-fit`` < 1 Flower asks a fixed-size subset of the sites
(sampling without replacement), for which Opacus has no amplification bound; the
rounds are accounted as what that is at least, an unsampled release (q = 1), which is a
valid upper bound for any subset. The server keeps its own
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
    """σ, C and the ε the planned rounds spend at δ (one unsampled Gaussian release per round)."""

    noise_multiplier: float
    clipping_norm: float
    rounds: int
    delta: float
    epsilon_budget: float
    planned_epsilon: float


def plan_central_dp(*, clipping_norm: float, noise_multiplier: float | None, epsilon_budget: float,
                    delta: float, rounds: int) -> CentralDPPlan:
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
    if rounds < 1:
        raise ConfigError(f"central DP needs at least one round, got {rounds}")
    if noise_multiplier is None:
        noise_multiplier = noise_for_target(epsilon_budget, delta=delta, sample_rate=1.0, steps=rounds)
    elif not noise_multiplier > 0:
        raise ConfigError(f"`central-noise-multiplier` must be positive, got {noise_multiplier}")
    eps = epsilon_of([(noise_multiplier, 1.0, rounds)], delta)
    if eps > epsilon_budget:
        raise ConfigError(f"central DP: {rounds} rounds at central-noise-multiplier {noise_multiplier:g} "
                          f"spend epsilon {eps:.3f} at delta {delta:g}, above "
                          f"`central-epsilon-budget` {epsilon_budget:g}; raise sigma, lower the rounds or "
                          "leave sigma at 0 to derive it")
    return CentralDPPlan(noise_multiplier, clipping_norm, rounds, delta, epsilon_budget, eps)


class CentralDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side-clipping DP wrapper, with a data-independent denominator, accounting and a budget.

    Differences from Flower's wrapper: the released mean divides the contributions' sum by
    the ``k`` sites *asked* (dropouts and refusals contribute nothing and change nothing
    else) and adds ``N(0, (σC/k)²)`` *before* the inner strategy aggregates (correct for
    FedAdam too); a round with dropouts is still released; every release is recorded in
    ``ledger`` and a round that would exceed its budget is refused. The number of sites
    that contributed is not published.

    ``observer`` (tests, audits) gets per round ``noise_std``, ``asked``, ``epsilon``.
    """

    def __init__(self, strategy: Strategy, *, plan: CentralDPPlan, ledger: PrivacyLedger,
                 rng: np.random.Generator | None = None, observer: CentralObserver | None = None) -> None:
        # num_sampled_clients feeds only Flower's aggregate_fit, replaced here (k is counted per round)
        super().__init__(strategy, noise_multiplier=plan.noise_multiplier, clipping_norm=plan.clipping_norm,
                         num_sampled_clients=1)
        self.plan, self.ledger, self.observer = plan, ledger, observer
        self.rng = rng if rng is not None else np.random.default_rng()  # OS entropy
        self._asked: dict[int, tuple[int, list[np.ndarray]]] = {}  # round → (k, global weights sent)
        self.last: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"CentralDP(sigma={self.plan.noise_multiplier:g}, C={self.plan.clipping_norm:g})"

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        """Ask the sites to train (with the clipping norm) unless this round would exceed the budget."""
        self.last = {}
        try:
            self.ledger.check([(self.plan.noise_multiplier, 1.0, 1)])
        except PrivacyBudgetError as exc:
            log.warning("central DP: %s; round %d asks no site to train and releases nothing", exc, server_round)
            self.last = {"central_refused": 1.0, "central_epsilon": self.ledger.epsilon()}
            return []
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if instructions:
            self._asked[server_round] = (len(instructions), parameters_to_ndarrays(parameters))
        return instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Release ``w + (1/k) Σ Δ_i + N(0, (σC/k)²)``, aggregate, account for the release."""
        contributing = [(p, r) for p, r in results if r.num_examples > 0]
        if not contributing or server_round not in self._asked:
            return None, {}
        k, start = self._asked.pop(server_round)
        m = len(contributing)
        # Equal weights: the mean of the contributions (under SecAgg+ every FitRes already carries it).
        updates = [parameters_to_ndarrays(r.parameters) for _, r in contributing]
        mean = [np.mean(np.stack(layer).astype(np.float64), axis=0) for layer in zip(*updates, strict=True)]
        std = self.plan.noise_multiplier * self.plan.clipping_norm / k
        released = [(w + (m / k) * (u - w) + self.rng.normal(0.0, std, size=w.shape)).astype(w.dtype)
                    for w, u in zip(start, mean, strict=True)]
        for _, res in contributing:
            res.parameters = ndarrays_to_parameters(released)
        aggregated, metrics = self.strategy.aggregate_fit(server_round, contributing, failures)
        if aggregated is None:
            return None, metrics
        eps = self.ledger.record(server_round, [(self.plan.noise_multiplier, 1.0, 1)])
        self.last = {"central_epsilon": eps, "central_noise_std": std, "central_refused": 0.0}
        log.info("round %d: central DP noise std %.4g (σC/k, k = %d asked); central epsilon %.3f", server_round,
                 std, k, eps)
        if self.observer is not None:
            self.observer(server_round, {"noise_std": std, "asked": float(k), "epsilon": eps})
        return aggregated, {**metrics, **self.last}

    def describe(self) -> dict[str, Any]:
        """The plan and spend, for ``metrics.json`` and ``privacy_ledger.json``."""
        return {"noise_multiplier": self.plan.noise_multiplier, "clipping_norm": self.plan.clipping_norm,
                "delta": self.plan.delta, "epsilon_budget": self.plan.epsilon_budget,
                "planned_epsilon": self.plan.planned_epsilon, "epsilon": self.ledger.epsilon(),
                "releases": len(self.ledger.entries), "ledger": str(self.ledger.path),
                "adjacency": "add/remove one site's contribution; denominator = sites asked"}
