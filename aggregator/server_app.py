"""Flower ServerApp: federated averaging of the hospitals' models.

The federated issue composes this with the SecAgg+ workflow and central DP; here it is
plain FedAvg on Flower's legacy strategy path (the one SecAgg+ needs in Flower 1.41).
"""

from __future__ import annotations

from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg

from clients.client_app import get_weights
from federation.model import ArchConfig, build_model

__all__ = ["app"]


def server_fn(context: Context) -> ServerAppComponents:
    """FedAvg over all connected hospitals, starting from a seeded Approx-CNN."""
    cfg = context.run_config
    model = build_model(ArchConfig(input_size=int(cfg["image-size"])), seed=0)
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=2,
        min_available_clients=2,
        initial_parameters=ndarrays_to_parameters(get_weights(model)),
    )
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(cfg["num-server-rounds"])))


app = ServerApp(server_fn=server_fn)
