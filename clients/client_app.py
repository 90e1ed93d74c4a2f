"""Flower ClientApp: one hospital trains the shared model on its own data.

A thin adapter: data loading and training live in :mod:`clients.ingest` and
:mod:`clients.train`. In simulation the hospital's folder is ``data-dir/site-K`` with
``K = partition-id + 1``; in deployment it is ``data-path`` from ``--node-config``.
The federated issue adds DP-SGD (Opacus) and the SecAgg+ mod to this app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Context

from clients.ingest import ImageSet, Preprocess, load_dataset
from clients.train import TrainConfig, evaluate, train_epochs
from federation.errors import ConfigError
from federation.model import ArchConfig, PrivradCNN, build_model

__all__ = ["app"]

NDArrays = list[npt.NDArray[Any]]


def get_weights(model: PrivradCNN) -> NDArrays:
    """The model's state as a list of numpy arrays (state-dict order)."""
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: PrivradCNN, weights: NDArrays) -> None:
    """Load a list of numpy arrays produced by :func:`get_weights`."""
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ConfigError(f"received {len(weights)} arrays, the model has {len(keys)} tensors")
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})


def site_data_path(context: Context) -> Path:
    """The hospital's data folder, from node config (deployment) or partition id (simulation)."""
    node = context.node_config
    if "data-path" in node:
        return Path(str(node["data-path"]))
    root = str(context.run_config.get("data-dir", ""))
    if not root:
        raise ConfigError("`data-dir` (run config) or `data-path` (node config) must be set")
    return Path(root) / f"site-{int(node['partition-id']) + 1}"


class HospitalClient(NumPyClient):
    """Local training on one site's images."""

    def __init__(self, data: ImageSet, arch: ArchConfig, train: TrainConfig) -> None:
        self.data, self.train = data, train
        self.model = build_model(arch)

    def fit(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        set_weights(self.model, parameters)
        history = train_epochs(self.model, self.data, config=self.train)
        return get_weights(self.model), len(self.data), {"loss": history[-1].loss}

    def evaluate(self, parameters: NDArrays, config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        set_weights(self.model, parameters)
        metrics = evaluate(self.model, self.data)
        return 1.0 - float(metrics["auc_macro"]), len(self.data), {"auc_macro": metrics["auc_macro"]}


def client_fn(context: Context) -> Client:
    """Build the hospital's client for one message."""
    torch.set_num_threads(1)
    cfg = context.run_config
    arch = ArchConfig(input_size=int(cfg["image-size"]))
    data = load_dataset(site_data_path(context), preprocess=Preprocess(size=arch.input_size))
    train = TrainConfig(epochs=int(cfg["local-epochs"]), batch_size=int(cfg["batch-size"]),
                        lr=float(cfg["learning-rate"]))
    return HospitalClient(data, arch, train).to_client()


app = ClientApp(client_fn=client_fn)
