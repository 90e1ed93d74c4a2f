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
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.common import (
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Message,
    NDArrays,
    Parameters,
    RecordDict,
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
from flwr.supercore.run import Run

from aggregator.central_dp import CentralDP, plan_central_dp
from aggregator.initial import initial_model
from aggregator.metrics import RunRecorder
from aggregator.secagg import StageObserver, TimedSecAggPlusWorkflow
from federation.config import Resolve, RunConfig, StrategyKind, require_paths
from federation.errors import ConfigError
from federation.ingest import Preprocess, load_dataset
from federation.model import build_model, get_weights
from privacy.ledger import PrivacyLedger

__all__ = ["build_strategy", "central_dp_strategy", "make_server_app", "secagg_workflow"]

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
    if cfg.strategy is StrategyKind.FEDPROX:  # the clients add the proximal term (federation.train)
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    raise ConfigError(f"`strategy` {cfg.strategy!r} is not supported")


FitObserver = Callable[[int, list[tuple[NDArrays, int]]], None]
ReplyObserver = Callable[[Message], None]

class RoundGuard(Strategy):
    """Delegates to ``inner``; a round with no contribution keeps the global model instead of crashing.

    Results of weight 0 are dropped before aggregation (Flower's in-place FedAvg divides by
    the total weight); when none is left the round is empty: ``aggregate_fit`` returns no
    parameters and the strategy's model stays. ``observer`` is shown every
    ``(parameters, num_examples)`` the strategy is handed: exactly what server-side code
    can see of the clients' updates.
    """

    def __init__(self, inner: Strategy, observer: FitObserver | None = None) -> None:
        self.inner, self.observer = inner, observer

    def __repr__(self) -> str:
        return f"RoundGuard({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                      ) -> list[tuple[ClientProxy, FitIns]]:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if self.observer is not None:
            self.observer(server_round, [(parameters_to_ndarrays(r.parameters), r.num_examples) for _, r in results])
        contributing = [(p, r) for p, r in results if r.num_examples > 0]
        if not contributing:
            log.warning("round %d: no site contributed (%d failures); the global model stays", server_round,
                        len(failures))
            return None, {}
        return self.inner.aggregate_fit(server_round, contributing, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager
                           ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[tuple[ClientProxy, EvaluateRes] | BaseException]
                           ) -> tuple[float | None, dict[str, Scalar]]:
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


class ReportingGrid(Grid):
    """A Grid that shows every reply it receives to ``observers`` (refusals, errors, contents) and passes it on."""

    def __init__(self, inner: Grid, observers: Iterable[ReplyObserver]) -> None:
        self.inner, self.observers = inner, list(observers)

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._show(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._show(self.inner.send_and_receive(messages, timeout=timeout))

    def _show(self, replies: Iterable[Message]) -> list[Message]:
        out = list(replies)
        for reply in out:
            for observe in self.observers:
                observe(reply)
        return out


def central_dp_strategy(cfg: RunConfig, inner: Strategy) -> CentralDP:
    """Wrap ``inner`` in central DP with the run's σ, C, δ and budget; the ledger is ``RUN/central_ledger.json``."""
    plan = plan_central_dp(clipping_norm=cfg.central_clipping_norm,
                           noise_multiplier=cfg.central_noise_multiplier or None,
                           epsilon_budget=cfg.central_epsilon_budget, delta=cfg.central_delta,
                           rounds=cfg.num_server_rounds)
    ledger = PrivacyLedger(Path(cfg.out_dir) / "central_ledger.json", site="central", budget=plan.epsilon_budget,
                           delta=plan.delta)
    log.info("central DP: sigma %.4g, C %g, planned epsilon %.3f at delta %g", plan.noise_multiplier,
             plan.clipping_norm, plan.planned_epsilon, plan.delta)
    return CentralDP(inner, plan=plan, ledger=ledger)


def secagg_workflow(cfg: RunConfig, observer: StageObserver | None = None) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the run's shares, threshold and (always) a timeout.

    The shares and threshold are planned each round for the sites sampled
    (:func:`aggregator.secagg.plan_secagg`); ``observer`` is shown each round's plan and
    the seconds of its four stages.
    """
    return TimedSecAggPlusWorkflow(
        num_shares=cfg.secagg_num_shares,
        threshold=cfg.secagg_threshold,
        fraction_fit=cfg.fraction_fit,
        min_clients=cfg.min_clients,
        max_weight=cfg.secagg_weight_cap(),
        clipping_range=cfg.secagg_clipping_range,
        timeout=cfg.secagg_timeout,
        observer=observer,
    )


def make_server_app(overrides: Mapping[str, Any] | None = None, *, observer: FitObserver | None = None,
                    on_reply: ReplyObserver | None = None, resolve: Resolve = require_paths) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``observer`` (for audits and tests) is shown what the strategy receives each round,
    ``on_reply`` every reply message the server gets (refusals included). ``resolve`` fills
    an empty ``data-dir``/``out-dir`` (default: they must be set; :mod:`simulations.apps`
    uses the built-in federation).
    """
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve(RunConfig.from_flower(context.run_config, overrides), context.run_id)
        log.info("run %s: data %s, writing to %s", context.run_id, cfg.data_dir, cfg.out_dir)
        test = load_dataset(Path(cfg.test_dir or Path(cfg.data_dir) / "test"),
                            preprocess=Preprocess(size=cfg.image_size))
        val_dir = Path(cfg.val_dir or Path(cfg.data_dir) / "val")
        val = load_dataset(val_dir, classes=test.classes, preprocess=Preprocess(size=cfg.image_size)) if (
            cfg.val_dir or val_dir.is_dir()) else None
        init = initial_model(cfg)
        recorder = RunRecorder(cfg, test, Path(cfg.out_dir), initial={"source": str(init.kind), **init.info},
                               val=val)
        strategy = build_strategy(cfg, recorder, get_weights(init.model))
        if cfg.central_dp:
            strategy = recorder.central = central_dp_strategy(cfg, strategy)
        strategy = RoundGuard(strategy, observer)
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.num_server_rounds),
                               strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=secagg_workflow(cfg, recorder.note_secagg) if cfg.secagg else None)
        observers = [recorder.on_reply, *([on_reply] if on_reply is not None else [])]
        workflow(ReportingGrid(grid, observers), legacy)
        recorder.write()

    return server

