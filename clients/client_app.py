"""Flower ClientApp: one hospital trains the shared Approx-CNN on its own data.

A thin adapter over :mod:`clients.ingest`, :mod:`clients.train` and :mod:`privacy`:

* the hospital's folder is ``data-dir/site-K`` with ``K = partition-id + 1`` in simulation,
  or ``data-path`` from ``--node-config`` in deployment;
* with ``dp`` on, local training is Opacus DP-SGD; every round's step set goes to the
  site's privacy ledger (``ledger-path`` node config, else ``out-dir/ledger/site-K.json``),
  which keeps ε cumulative across rounds and refuses a round that would exceed the budget;
* with ``secagg`` on, the reply passes through Flower's ``secaggplus_mod`` (legacy path:
  a ``NumPyClient``), so only masked vectors leave the hospital;
* with ``central-dp`` on, Flower's ``fixedclipping_mod`` clips the update to the site's
  own ``central-clipping-norm`` (it refuses a server that asks for a larger norm) before
  SecAgg+ masks it, and the site reports weight 1 so that every site counts equally in
  the mean the server noises (:mod:`aggregator.central_dp`).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients.ingest import ImageSet, Preprocess, load_dataset
from clients.train import TrainConfig, evaluate, train_epochs
from federation.config import RunConfig, StrategyKind
from federation.errors import ConfigError, PrivacyBudgetError
from federation.model import PrivradCNN, build_model
from privacy.dp import private_round, site_ledger
from privacy.ledger import PrivacyLedger

__all__ = ["HospitalClient", "app", "get_weights", "make_client_app", "set_weights", "site_data_path"]

log = logging.getLogger(__name__)

NDArrays = list[npt.NDArray[Any]]


def get_weights(model: PrivradCNN) -> NDArrays:
    """The model's state as a list of numpy arrays (state-dict order)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: PrivradCNN, weights: NDArrays) -> None:
    """Load a list of numpy arrays produced by :func:`get_weights`."""
    keys = list(model.state_dict())
    if len(keys) != len(weights):
        raise ConfigError(f"received {len(weights)} arrays, the model has {len(keys)} tensors")
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights, strict=True)})


def site_name(context: Context) -> str:
    """``site-K`` in simulation; the node config's ``site`` (or the data folder's name) in deployment."""
    node = context.node_config
    if "site" in node:
        return str(node["site"])
    if "data-path" in node:
        return Path(str(node["data-path"])).name
    return f"site-{int(node['partition-id']) + 1}"


def site_data_path(context: Context, cfg: RunConfig | None = None) -> Path:
    """The hospital's data folder, from node config (deployment) or partition id (simulation)."""
    node = context.node_config
    if "data-path" in node:
        return Path(str(node["data-path"]))
    root = cfg.data_dir if cfg is not None else str(context.run_config.get("data-dir", ""))
    if not root:
        raise ConfigError("`data-dir` (run config) or `data-path` (node config) must be set")
    return Path(root) / site_name(context)


def ledger_path(context: Context, cfg: RunConfig) -> Path:
    """Where this site's privacy ledger lives."""
    if "ledger-path" in context.node_config:
        return Path(str(context.node_config["ledger-path"]))
    if not cfg.out_dir:
        raise ConfigError("`out-dir` (run config) or `ledger-path` (node config) must be set with DP on")
    return Path(cfg.out_dir) / "ledger" / f"{site_name(context)}.json"


class HospitalClient(NumPyClient):
    """Local (optionally DP-SGD) training on one site's images."""

    def __init__(self, data: ImageSet, cfg: RunConfig, *, site: str, ledger: PrivacyLedger | None,
                 before_fit: Callable[[], None] | None = None) -> None:
        self.data, self.cfg, self.site, self.ledger = data, cfg, site, ledger
        self.before_fit = before_fit
        self.arch = cfg.arch()
        self.model = build_model(self.arch)

    def train_config(self, server_round: int) -> TrainConfig:
        """Local optimiser settings; the seed differs per round and site."""
        return TrainConfig(epochs=self.cfg.local_epochs, batch_size=self.cfg.batch_size, lr=self.cfg.learning_rate,
                           optimizer=self.cfg.optimizer, schedule="constant", augment=self.cfg.augment,
                           seed=zlib.crc32(f"{self.cfg.seed}/{self.site}/{server_round}".encode()))

    def fit(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        """Train from the global weights; with DP, check and record the privacy spend."""
        if self.before_fit is not None:
            self.before_fit()
        server_round = int(config.get("server-round", 0))
        set_weights(self.model, parameters)
        train = self.train_config(server_round)
        metrics: dict[str, Any] = {"site": self.site, "refused": 0}
        mu = self.cfg.proximal_mu if self.cfg.strategy is StrategyKind.FEDPROX else 0.0
        if self.ledger is None:
            loss = train_epochs(self.model, self.data, config=train, proximal_mu=mu)[-1].loss
        else:
            try:
                result, eps = private_round(self.model, self.data, train=train, dp=self.cfg.dp_config(),
                                            ledger=self.ledger, round_=server_round,
                                            planned_rounds=self.cfg.num_server_rounds, proximal_mu=mu)
            except PrivacyBudgetError as exc:
                log.warning("%s", exc)
                return parameters, 0, {**metrics, "refused": 1, "reason": str(exc),
                                       "epsilon": self.ledger.epsilon(), "delta": self.ledger.delta}
            loss = result.loss
            metrics.update(epsilon=eps, delta=self.ledger.delta, noise_multiplier=result.step_set[0])
        metrics["loss"] = float(loss)
        # Central DP needs equal weights: its noise is calibrated to one site's share of the mean.
        return get_weights(self.model), 1 if self.cfg.central_dp else len(self.data), metrics

    def evaluate(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[float, int, dict[str, Any]]:
        """Local metrics of the global model (not used with centralised evaluation)."""
        set_weights(self.model, parameters)
        metrics = evaluate(self.model, self.data)
        return 1.0 - float(metrics["auc_macro"]), len(self.data), {"auc_macro": metrics["auc_macro"]}


def secagg_when_configured(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run ``secaggplus_mod`` for messages of the SecAgg+ workflow, pass the others through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def central_clipping_mod(overrides: Mapping[str, Any] | None = None) -> Callable[[Message, Context, ClientAppCallable],
                                                                               Message]:
    """A mod that clips the site's update for central DP when the site's run config turns it on.

    The norm is the site's own ``central-clipping-norm``; a training message asking for a
    different norm is refused with an error reply rather than silently weakening the bound.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        cfg = RunConfig.from_flower(ctxt.run_config, overrides)
        if not cfg.central_dp or msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        sent = recorddict_compat.recorddict_to_fitins(msg.content, keep_input=True).config.get(KEY_CLIPPING_NORM)
        if sent is None or abs(float(sent) - cfg.central_clipping_norm) > 1e-9 * cfg.central_clipping_norm:
            raise ConfigError(f"central DP: the server asked for clipping norm {sent!r}, this site is configured "
                              f"for {cfg.central_clipping_norm}; refusing to train")
        return fixedclipping_mod(msg, ctxt, call_next)

    return mod


def make_client_app(overrides: Mapping[str, Any] | None = None, *,
                    before_fit: Callable[[Context], None] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``before_fit`` runs at the start of every ``fit``, mid-protocol under SecAgg+ (fault
    injection in dropout tests).
    """

    def client_fn(context: Context) -> Client:
        torch.set_num_threads(1)
        cfg = RunConfig.from_flower(context.run_config, overrides).resolved(context.run_id)
        site = site_name(context)
        data = load_dataset(site_data_path(context, cfg), preprocess=Preprocess(size=cfg.image_size))
        ledger = None
        if cfg.dp:
            ledger = site_ledger(ledger_path(context, cfg), site=site, n=len(data), dp=cfg.dp_config())
        hook = (lambda: before_fit(context)) if before_fit is not None else None
        return HospitalClient(data, cfg, site=site, ledger=ledger, before_fit=hook).to_client()

    # SecAgg+ outermost: the update is clipped before it is masked.
    return ClientApp(client_fn=client_fn, mods=[secagg_when_configured, central_clipping_mod(overrides)])


app = make_client_app()
