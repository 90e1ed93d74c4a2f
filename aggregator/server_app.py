"""Flower ServerApp: FedAvg (or FedProx, FedAdam) inside Flower's SecAgg+ workflow, legacy path.

SecAgg+ works only on Flower 1.41's legacy path (see the design notes): a legacy strategy
in a ``LegacyContext`` run by ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``.
The workflow unmasks only the *sum* of the clients' weighted vectors; every ``FitRes``
the strategy then sees carries that same aggregate, never an individual update.

With ``central-dp`` the strategy is wrapped in :class:`~aggregator.central_dp.CentralDP`
(site-level DP: client-side clipping, server noise on the securely aggregated mean).

The initial global model comes from :mod:`aggregator.initial` (public-data pretraining
by default when the data folder has a ``public/`` archive). Each round, and once before
the first, the global model is evaluated centrally on the held-out set and checkpointed;
``metrics.json``, ``global_model.pt`` and ``training.png`` are rewritten atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.common import (
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, FedProx, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from aggregator.central_dp import CentralDP, plan_central_dp
from aggregator.initial import initial_model
from aggregator.metrics import RunRecorder
from clients.client_app import get_weights
from clients.ingest import Preprocess, load_dataset
from federation.config import RunConfig, StrategyKind
from federation.errors import ConfigError
from federation.model import build_model
from privacy.ledger import PrivacyLedger

__all__ = ["app", "build_strategy", "central_dp_strategy", "make_server_app", "secagg_workflow"]

log = logging.getLogger(__name__)


def build_strategy(cfg: RunConfig, recorder: RunRecorder, initial_weights: NDArrays | None = None) -> Strategy:
    """The legacy strategy of the run, wired to the recorder's evaluation and metrics hooks.

    ``initial_weights`` default to the seeded random model.
    """
    if initial_weights is None:
        initial_weights = get_weights(build_model(cfg.arch(), seed=cfg.seed))
    initial = ndarrays_to_parameters(initial_weights)
    common: dict[str, Any] = {
        "fraction_fit": cfg.fraction_fit,
        "fraction_evaluate": 0.0,
        "min_fit_clients": cfg.min_clients,
        "min_available_clients": cfg.min_clients,
        "evaluate_fn": recorder.evaluate,
        "fit_metrics_aggregation_fn": recorder.aggregate_fit_metrics,
        "on_fit_config_fn": lambda r: {"server-round": r},
        "initial_parameters": initial,
    }
    if cfg.strategy is StrategyKind.FEDAVG:
        return FedAvg(**common)
    if cfg.strategy is StrategyKind.FEDADAM:
        return FedAdam(**common, eta=cfg.server_learning_rate)
    if cfg.strategy is StrategyKind.FEDPROX:  # the clients add the proximal term (clients.train)
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    raise ConfigError(f"`strategy` {cfg.strategy!r} is not supported")


FitObserver = Callable[[int, list[tuple[NDArrays, int]]], None]


class ObservedStrategy(Strategy):
    """A strategy that delegates to ``inner`` and shows ``observer`` what ``aggregate_fit`` receives.

    Every ``(parameters, num_examples)`` the strategy is handed is exactly what
    server-side code can see of the clients' updates.
    """

    def __init__(self, inner: Strategy, observer: FitObserver) -> None:
        self.inner, self.observer = inner, observer

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.observer(server_round, [(parameters_to_ndarrays(r.parameters), r.num_examples) for _, r in results])
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


def central_dp_strategy(cfg: RunConfig, inner: Strategy) -> CentralDP:
    """Wrap ``inner`` in central DP with the run's σ, C, δ and budget; the ledger is ``RUN/central_ledger.json``."""
    plan = plan_central_dp(clipping_norm=cfg.central_clipping_norm,
                           noise_multiplier=cfg.central_noise_multiplier or None,
                           epsilon_budget=cfg.central_epsilon_budget, delta=cfg.central_delta,
                           sample_rate=cfg.fraction_fit, rounds=cfg.num_server_rounds)
    ledger = PrivacyLedger(Path(cfg.out_dir) / "central_ledger.json", site="central", budget=plan.epsilon_budget,
                           delta=plan.delta)
    log.info("central DP: sigma %.4g, C %g, planned epsilon %.3f at delta %g", plan.noise_multiplier,
             plan.clipping_norm, plan.planned_epsilon, plan.delta)
    return CentralDP(inner, plan=plan, ledger=ledger)


def secagg_workflow(cfg: RunConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the run's shares, threshold and (always) a timeout."""
    return SecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares,
        reconstruction_threshold=cfg.secagg_threshold,
        max_weight=cfg.secagg_max_weight,
        clipping_range=cfg.secagg_clipping_range,
        timeout=cfg.secagg_timeout,
    )


def make_server_app(overrides: Mapping[str, Any] | None = None, *, observer: FitObserver | None = None
                    ) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``observer`` (for audits and tests) is shown what the strategy receives each round.
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = RunConfig.from_flower(context.run_config, overrides).resolved(context.run_id)
        log.info("run %s: data %s, writing to %s", context.run_id, cfg.data_dir, cfg.out_dir)
        test = load_dataset(Path(cfg.test_dir or Path(cfg.data_dir) / "test"),
                            preprocess=Preprocess(size=cfg.image_size))
        init = initial_model(cfg)
        recorder = RunRecorder(cfg, test, Path(cfg.out_dir), initial={"source": str(init.kind), **init.info})
        strategy = build_strategy(cfg, recorder, get_weights(init.model))
        if cfg.central_dp:
            strategy = recorder.central = central_dp_strategy(cfg, strategy)
        if observer is not None:
            strategy = ObservedStrategy(strategy, observer)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_server_rounds),
                               strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=secagg_workflow(cfg) if cfg.secagg else None)
        workflow(grid, legacy)
        recorder.write()

    return server


app = make_server_app()
