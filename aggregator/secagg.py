"""SecAgg+ at scale: how many shares each site deals, and what each protocol stage costs.

Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` places the sampled sites on a
shuffled ring; each site agrees keys with, masks against and deals Shamir shares to the
``num_shares - 1`` sites nearest to it. With ``num_shares`` a fraction of 1.0 (all-to-all,
the original SecAgg of Bonawitz et al. 2017) every site does ``n`` key agreements, ``n``
pairwise masks of the model's size and a Shamir split of degree ``≈ 0.6 n`` per round, and
the server ``n`` reconstructions of that degree: the round costs ``O(n²)`` to ``O(n³)``.
Measured here (pycryptodome's Shamir, one secret of 32 bytes): splitting into 200 shares
at threshold 120 takes 1.4 s, reconstructing it 2.0 s; into 25 shares at threshold 15,
about 10 ms each.

SecAgg+ proper (Bell et al., CCS 2020) replaces the complete graph by one of logarithmic
degree. :func:`auto_share_count` is that rule: every site when the federation is small,
``2 ⌈1.5 log₂ n⌉ + 1`` sites (odd, as the ring wants) beyond. :func:`plan_secagg` turns the
run config's ``secagg-num-shares`` and ``secagg-threshold`` into integers for the round,
with the threshold always above half the shares (the sites refuse anything else:
:func:`privacy.policy.check_secagg_setup`).

:class:`TimedSecAggPlusWorkflow` is Flower's workflow with that plan applied each round
and the four stages timed (setup, share keys, collect masked vectors, unmask); the
timings go to a callback, not into Flower.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.common import FitIns, Parameters
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from federation.errors import ConfigError

__all__ = ["SecAggPlan", "SecAggStage", "TimedSecAggPlusWorkflow", "auto_share_count", "plan_secagg"]

log = logging.getLogger(__name__)

LOG_FACTOR = 1.5
"""Half the neighbourhood is ``⌈LOG_FACTOR · log₂ n⌉`` sites on each side of the ring."""


class SecAggStage(enum.StrEnum):
    """The four stages of one SecAgg+ round, in protocol order."""

    SETUP = "setup"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED_VECTORS = "collect_masked_vectors"
    UNMASK = "unmask"


def auto_share_count(sampled: int) -> int:
    """Shares per site for ``sampled`` sites: all of them up to 13, ``2 ⌈1.5 log₂ n⌉ + 1`` beyond.

    The count grows as ``O(log n)`` (20 sites: 15, 50: 19, 100: 21, 200: 25, 1000: 31), so
    a round's key agreements, masks and Shamir work grow as ``O(n log n)``, not ``O(n²)``.

    Raises
    ------
    ConfigError
        Fewer than 2 sites (SecAgg+ needs at least 2).
    """
    if sampled < 2:
        raise ConfigError(f"SecAgg+ needs at least 2 sampled sites, got {sampled}")
    return min(sampled, 2 * math.ceil(LOG_FACTOR * math.log2(sampled)) + 1)


@dataclass(frozen=True)
class SecAggPlan:
    """The integers one SecAgg+ round runs with.

    Parameters
    ----------
    sampled
        Sites sampled for the round.
    shares
        Shares each site's mask seed and key are split into (itself and ``shares - 1``
        neighbours on the ring).
    threshold
        Shares that rebuild a secret; always more than ``shares / 2``.
    """

    sampled: int
    shares: int
    threshold: int

    @property
    def dropout_tolerance(self) -> int:
        """Neighbours of a site that may drop while its secrets can still be rebuilt."""
        return self.shares - self.threshold

    @property
    def all_to_all(self) -> bool:
        """Every site is every other's neighbour (the original SecAgg)."""
        return self.shares >= self.sampled


def plan_secagg(sampled: int, *, num_shares: float, threshold: float) -> SecAggPlan:
    """The round's shares and threshold from the run config's values.

    ``num_shares`` 0 is :func:`auto_share_count`; in ``(0, 1]`` a fraction of the sampled
    sites (Flower's reading: 1.0 is all-to-all); above 1 an absolute count (at most the
    sampled sites). ``threshold`` in ``(0, 1]`` is a fraction of the shares, above 1 an
    absolute count; either way it is raised to ``⌊shares / 2⌋ + 1`` if it is not above half.

    Raises
    ------
    ConfigError
        Fewer than 2 sites, a negative or non-integral absolute count, or a threshold
        above the share count (the message names the key and value).
    """
    if sampled < 2:
        raise ConfigError(f"SecAgg+ needs at least 2 sampled sites, got {sampled}")
    if num_shares < 0:
        raise ConfigError(f"`secagg-num-shares` must not be negative, got {num_shares}")
    if num_shares == 0:
        shares = auto_share_count(sampled)
    else:
        if num_shares > 1 and num_shares != int(num_shares):
            raise ConfigError(f"`secagg-num-shares` above 1 is a count of shares and must be an integer, "
                              f"got {num_shares}")
        shares = min(round(num_shares * sampled) if num_shares <= 1 else int(num_shares), sampled)
        if shares < sampled and shares % 2 == 0:
            shares += 1  # the ring is symmetric: an odd count
        if num_shares <= 1 and shares <= 2:
            shares = sampled
    if threshold <= 0:
        raise ConfigError(f"`secagg-threshold` must be positive, got {threshold}")
    if threshold <= 1:
        t = max(round(threshold * shares), 2)
    else:
        if threshold != int(threshold):
            raise ConfigError(f"`secagg-threshold` above 1 is a count of shares and must be an integer, "
                              f"got {threshold}")
        t = int(threshold)
    t = max(t, shares // 2 + 1)
    if t > shares:
        raise ConfigError(f"`secagg-threshold` {threshold} asks for {t} shares of {shares} "
                          f"({sampled} sites): it must not exceed the share count")
    return SecAggPlan(sampled=sampled, shares=shares, threshold=t)


StageObserver = Callable[[int, SecAggPlan, dict[SecAggStage, float]], None]
"""Shown, after each round, the round number, its plan and the seconds each stage took."""


class TimedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with :func:`plan_secagg` applied per round and its stages timed.

    Parameters
    ----------
    num_shares, threshold
        The run config's ``secagg-num-shares`` and ``secagg-threshold`` (see :func:`plan_secagg`).
    fraction_fit, min_clients
        The strategy's sampling, for a first plan at the round's start (``max(⌊available ·
        fraction_fit⌋, min_clients)`` sites, as legacy FedAvg samples); the setup stage
        replaces it by the plan for the sites ``configure_fit`` actually returns.
    observer
        Shown each round's plan and stage timings (a halted round reports the stages it ran).
    max_weight, clipping_range, timeout
        As Flower's workflow.
    """

    def __init__(self, *, num_shares: float, threshold: float, fraction_fit: float, min_clients: int,
                 max_weight: float, clipping_range: float, timeout: float,
                 observer: StageObserver | None = None) -> None:
        super().__init__(num_shares=1.0, reconstruction_threshold=1.0, max_weight=max_weight,
                         clipping_range=clipping_range, timeout=timeout)
        self.share_rule, self.threshold_rule = num_shares, threshold
        self.fraction_fit, self.min_clients = fraction_fit, min_clients
        self.observer = observer
        self.plan = plan_secagg(max(min_clients, 2), num_shares=num_shares, threshold=threshold)
        self._times: dict[SecAggStage, float] = {}

    def __call__(self, grid: Grid, context: LegacyContext) -> None:  # type: ignore[override]
        """Run Flower's stages with the round planned for the sites sampled, and report their times."""
        available = context.client_manager.num_available()
        self._apply(max(int(available * self.fraction_fit), self.min_clients, 2))  # replaced once sampled
        self._times = {}
        try:
            super().__call__(grid, context)
        finally:
            if self.observer is not None:
                current = context.state.config_records[MAIN_CONFIGS_RECORD].get(WorkflowKey.CURRENT_ROUND, 0)
                self.observer(int(current) if isinstance(current, int) else 0, self.plan, dict(self._times))

    def _apply(self, sampled: int) -> None:
        self.plan = plan_secagg(sampled, num_shares=self.share_rule, threshold=self.threshold_rule)
        self.num_shares, self.reconstruction_threshold = self.plan.shares, self.plan.threshold

    def _timed(self, stage: SecAggStage, step: Callable[[Grid, LegacyContext, WorkflowState], bool],
               grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        start = time.perf_counter()
        try:
            return step(grid, context, state)
        finally:
            self._times[stage] = time.perf_counter() - start

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's setup stage, timed, with the shares planned for exactly the sites the strategy sampled.

        Flower reads ``num_shares`` right after the strategy's ``configure_fit``; for the
        duration of the stage that call is wrapped so the plan follows its result (in a
        deployment, sites may connect between the round's start and the sampling).
        """
        strategy = context.strategy
        configure = strategy.configure_fit

        def planned(server_round: int, parameters: Parameters, client_manager: ClientManager
                    ) -> list[tuple[ClientProxy, FitIns]]:
            chosen = configure(server_round, parameters, client_manager)
            if len(chosen) >= 2:
                self._apply(len(chosen))
                log.info("SecAgg+: %d sites, %d shares each, threshold %d", self.plan.sampled, self.plan.shares,
                         self.plan.threshold)
            return chosen

        vars(strategy)["configure_fit"] = planned
        try:
            return self._timed(SecAggStage.SETUP, super().setup_stage, grid, context, state)
        finally:
            del vars(strategy)["configure_fit"]

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's share-keys stage, timed."""
        return self._timed(SecAggStage.SHARE_KEYS, super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's collect-masked-vectors stage (local training included), timed."""
        return self._timed(SecAggStage.COLLECT_MASKED_VECTORS, super().collect_masked_vectors_stage, grid,
                           context, state)

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's unmask stage (the strategy's aggregation included), timed."""
        return self._timed(SecAggStage.UNMASK, super().unmask_stage, grid, context, state)
