"""The coordinator's side: the Flower ServerApp and what it records.

:mod:`~aggregator.server_app` (FedAvg, FedProx or FedAdam inside SecAgg+, empty-round guard),
:mod:`~aggregator.initial` (the starting model: public pretraining or a checkpoint),
:mod:`~aggregator.central_dp` (site-level DP: server noise on the masked mean) and
:mod:`~aggregator.metrics` (per-round evaluation on the test and validation splits,
refusals, checkpoints). It never imports :mod:`clients`: what both sides share lives in
:mod:`federation`.
"""

from aggregator.server_app import build_strategy, make_server_app, secagg_workflow

__all__ = ["build_strategy", "make_server_app", "secagg_workflow"]
