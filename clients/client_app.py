"""Flower ClientApp: one hospital trains the shared Approx-CNN on its own data, under its own policy.

A thin adapter over :mod:`federation.ingest`, :mod:`federation.train` and :mod:`privacy`:

* the hospital's folder is ``data-dir/site-K`` with ``K = partition-id + 1`` in simulation,
  or ``data-path`` from ``--node-config`` in deployment, optionally filled from the hospital's
  PACS (``pacs-url``, ``pacs-labels``: :func:`clients.pacs.sync`);
* the hospital's :class:`~privacy.policy.SitePolicy` comes from the node config
  (``policy-file=…`` or policy keys) or from the hospital-side runner of a simulation,
  never from the run config; :func:`policy_gate`, the outermost mod, reviews every
  training message against it and answers a round that asks for less (DP off, a larger
  budget, a smaller σ, a larger clipping norm, no SecAgg+, more rounds than planned, no
  budget left) with an error reply naming the rule: no weights, no metrics, no ledger entry;
  evaluation and query messages are refused too (they would release plain statistics);
* with DP-SGD, σ is derived at the site from its ledger, the round is reserved in the
  ledger before training, and sampling and noise come from the site's CSPRNG;
* what a fit reply may carry is the allow-list :class:`FitMetric`, checked by the gate on
  the way out; under DP the aggregation weight is 1 (data-independent);
* with ``secagg`` on, the reply passes through Flower's ``secaggplus_mod`` (legacy path:
  a ``NumPyClient``), so only masked vectors leave the hospital;
* with ``central-dp`` on, Flower's ``fixedclipping_mod`` clips the update to the site's
  own ``central-clipping-norm`` before SecAgg+ masks it.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.client import Client, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Context, Error, Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from clients.pacs import PacsSource, sync
from federation.config import Resolve, RunConfig, StrategyKind, as_given
from federation.errors import ConfigError, PolicyRefusedError
from federation.ingest import ImageSet, Preprocess, load_dataset
from federation.ingest import site_name as numbered_site
from federation.model import NDArrays, build_model, get_weights, set_weights
from federation.records import FitMetric
from federation.train import TrainConfig, train_epochs
from privacy.dp import plan_round, private_round
from privacy.ledger import PrivacyLedger
from privacy.policy import (
    RoundRequest,
    Rule,
    SitePolicy,
    check_secagg_setup,
    check_secagg_unmask,
    resolve_policy,
    review,
)

__all__ = ["DatasetCache", "HospitalClient", "check_release", "make_client_app", "policy_gate", "round_request",
           "site_data_path"]

log = logging.getLogger(__name__)

Policies = SitePolicy | Mapping[str, SitePolicy]
"""One policy for every virtual site, or one per site name (sites not named get the default)."""

GATE_RECORD = "privrad.gate"
"""Context-state record in which the gate tells ``fit`` whether the message came through SecAgg+."""


def site_name(context: Context) -> str:
    """``site-K`` in simulation; the node config's ``site`` (or the data folder's name) in deployment."""
    node = context.node_config
    if "site" in node:
        return str(node["site"])
    if "data-path" in node:
        return Path(str(node["data-path"])).name
    return numbered_site(int(node["partition-id"]) + 1)


def site_data_path(context: Context, cfg: RunConfig | None = None) -> Path:
    """The hospital's data folder, from node config (deployment) or partition id (simulation).

    With ``pacs-url`` in the node config the data come from the hospital's PACS: its labelled CT
    instances (``pacs-labels``, optional ``pacs-study`` / ``pacs-series``) are synced into
    ``data-path``, the site's cache, before it is read (only missing instances are retrieved).
    """
    node = context.node_config
    if "pacs-url" in node:
        if "data-path" not in node or "pacs-labels" not in node:
            raise ConfigError("a PACS data source needs `data-path` (the site's cache) and `pacs-labels` "
                              "in the node config")
        source = PacsSource(str(node["pacs-url"]), Path(str(node["pacs-labels"])),
                            study=str(node.get("pacs-study", "")), series=str(node.get("pacs-series", "")))
        return sync(source, Path(str(node["data-path"]))).cache
    if "data-path" in node:
        return Path(str(node["data-path"]))
    root = cfg.data_dir if cfg is not None else str(context.run_config.get("data-dir", ""))
    if not root:
        raise ConfigError("`data-dir` (run config) or `data-path` (node config) must be set")
    return Path(root) / site_name(context)


def round_request(cfg: RunConfig, *, secagg: bool) -> RoundRequest:
    """What the run config (written by the coordinator) asks of a site; 0 means "the site decides"."""
    return RoundRequest(dp=cfg.dp, secagg=secagg, epsilon_budget=cfg.epsilon_budget,
                        target_epsilon=cfg.target_epsilon or None, noise_multiplier=cfg.noise_multiplier or None,
                        max_grad_norm=cfg.max_grad_norm, delta=cfg.delta or None, rounds=cfg.num_server_rounds)


def train_config(cfg: RunConfig, site: str, server_round: int) -> TrainConfig:
    """Local optimiser settings for ``server_round``.

    The rate follows ``lr-schedule`` over the rounds (constant within one); the seed (augmentation only) differs
    per round and site.
    """
    return TrainConfig(epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.round_learning_rate(server_round),
                       optimizer=cfg.optimizer, schedule="constant", augment=cfg.augment, shift=cfg.shift,
                       aug_mult=cfg.aug_mult, seed=zlib.crc32(f"{cfg.seed}/{site}/{server_round}".encode()))


DATASET_CACHE_BYTES = 512 * 2**20
"""Decoded images one process keeps across messages (in a simulation one Ray actor plays many sites)."""


class DatasetCache:
    """Loaded site data sets by (folder, image size, labels file time), least recently used out beyond ``limit`` bytes.

    Each SecAgg+ stage builds a new client and the policy gate opens the site again, so
    without it a site's DICOM files are decoded twice a round; with 200 sites played by
    two actors a cache of a few entries missed every time (0.14 s a load of 40 slices).
    """

    def __init__(self, limit: int = DATASET_CACHE_BYTES) -> None:
        self.limit = limit
        self._items: OrderedDict[tuple[str, int, float], ImageSet] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(data: ImageSet) -> int:
        return data.images.element_size() * data.images.nelement()

    def get(self, path: Path, size: int) -> ImageSet:
        """The site's images at ``size`` pixels, decoded once while they stay in the cache."""
        labels = path / "labels.csv"
        stamp = labels.stat().st_mtime if labels.is_file() else (path.stat().st_mtime if path.exists() else 0.0)
        key = (str(path), size, stamp)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        data = load_dataset(path, preprocess=Preprocess(size=size))
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += self._size(data)
            while self._bytes > self.limit and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)
        return data


_DATASETS = DatasetCache()


def _site_dataset(path: Path, size: int) -> ImageSet:
    """The site's images, loaded once per process while they fit in :data:`DATASET_CACHE_BYTES`."""
    return _DATASETS.get(path, size)


@dataclass(frozen=True)
class Site:
    """One hospital as its ClientApp sees it: name, data, policy and ledger (the ledger only with DP)."""

    name: str
    data: ImageSet
    policy: SitePolicy
    ledger: PrivacyLedger | None

    @classmethod
    def open(cls, context: Context, cfg: RunConfig, policies: Policies | None) -> Site:
        """Resolve the site's policy, load its data and, with DP requested, open its ledger."""
        name = site_name(context)
        given = policies.get(name) if isinstance(policies, Mapping) else policies
        policy = resolve_policy(context.node_config, given)
        path = site_data_path(context, cfg)
        data = _site_dataset(path, cfg.image_size)
        ledger = None
        if cfg.dp:
            ledger = PrivacyLedger(policy.ledger_file(name, path), site=name, budget=policy.epsilon_budget,
                                   delta=policy.delta)
        return cls(name, data, policy, ledger)


def _came_through_secagg(ctxt: Context) -> bool:
    record = ctxt.state.config_records.get(GATE_RECORD)
    return bool(record is not None and record.get("secagg", False))


class HospitalClient(NumPyClient):
    """Local training on one site's images: DP-SGD under the site's policy, or plain where it allows."""

    def __init__(self, site: Site, cfg: RunConfig, *, run: str, secagg: bool,
                 before_fit: Callable[[], None] | None = None) -> None:
        self.site, self.cfg, self.run, self.secagg = site, cfg, run, secagg
        self.before_fit = before_fit
        self.model = build_model(cfg.arch())

    def fit(self, parameters: NDArrays, config: Mapping[str, Any]) -> tuple[NDArrays, int, dict[str, Any]]:
        """Train from the global weights; with DP, reserve and record the privacy spend.

        Raises
        ------
        PolicyRefusedError
            The round asks for less than the site's policy allows (the gate answers it).
        """
        if self.before_fit is not None:
            self.before_fit()
        # labels the ledger entry and picks the round's learning rate (lr-schedule); trusted for nothing that
        # bears on privacy: σ, clipping and the spend come from the site's policy and ledger, whatever round it says
        server_round = int(config.get("server-round", 0))
        request = round_request(self.cfg, secagg=self.secagg)
        set_weights(self.model, parameters)
        train = train_config(self.cfg, self.site.name, server_round)
        mu = self.cfg.proximal_mu if self.cfg.strategy is StrategyKind.FEDPROX else 0.0
        metrics: dict[str, Any] = {FitMetric.SITE: self.site.name, FitMetric.ROUND: server_round,
                                   FitMetric.REFUSED: 0}
        if self.site.ledger is None:
            review(self.site.policy, request)  # DP off: only where the policy allows it
            train_epochs(self.model, self.site.data, config=train, proximal_mu=mu)
            weight = len(self.site.data)  # non-private training: the policy accepted that n is visible
        else:
            result, eps, _ = private_round(self.model, self.site.data, train=train, policy=self.site.policy,
                                           request=request, ledger=self.site.ledger, run=self.run,
                                           round_=server_round, proximal_mu=mu)
            metrics.update({FitMetric.EPSILON: eps, FitMetric.DELTA: self.site.ledger.delta,
                            FitMetric.NOISE_MULTIPLIER: result.step_set[0], FitMetric.STEPS: result.step_set[2]})
            weight = 1  # data-independent: n stays at the site
        if self.cfg.central_dp:
            weight = 1  # central DP's noise is calibrated to one site's share of the mean
        return get_weights(self.model), weight, {str(k): v for k, v in metrics.items()}


def _refusal(msg: Message, exc: PolicyRefusedError) -> Message:
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=str(exc)), reply_to=msg)


def check_release(reply: Message, *, dp: bool) -> Message:
    """Let a training reply leave only if its metrics are allow-listed (and, under DP, its weight is 1).

    A reply that breaks the allow-list is replaced by an error reply: fail closed.
    """
    if reply.has_error():
        return reply
    content = reply.content
    metrics = content.config_records.get("fitres.metrics")
    extra = sorted(set(metrics or {}) - {str(m) for m in FitMetric})
    problem = f"metrics {extra} are not on the allow-list" if extra else ""
    weight = content.metric_records.get("fitres.num_examples")
    if dp and weight is not None and weight.get("num_examples") not in (0, 1):
        problem = f"weight {weight.get('num_examples')} under DP is not data-independent"
    if problem:
        log.error("withholding a fit reply: %s", problem)
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"site withheld its reply: {problem}"),
                       reply_to=reply)
    return reply


def _int_list(record: ConfigRecord, key: str, *, scalar: bool = False) -> list[int]:
    """A list of integers (``scalar``: exactly one) from a SecAgg+ config record, or a refusal naming the field."""
    value = record.get(key)
    values = [value] if scalar else value
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PolicyRefusedError(Rule.SECAGG_PROTOCOL, f"SecAgg+ field `{key}` is {value!r}, not "
                                                       f"{'an integer' if scalar else 'a list of integers'}")
    return [int(v) for v in values if isinstance(v, int)]


def policy_gate(policies: Policies | None, overrides: Mapping[str, Any] | None,
                resolve: Resolve = as_given) -> Callable[[Message, Context, ClientAppCallable], Message]:
    """The outermost mod: review every training message against the site's policy; check what leaves.

    Plain training messages and the SecAgg+ setup stage are reviewed in full (policy rules,
    then the ledger); a refusal at setup keeps the site out of that round's SecAgg+ group.
    SecAgg+ parameters that would let the coordinator unmask one site (a threshold of at
    most half the shares; fewer shares than the policy's ``secagg-min-shares`` or all
    sites; a site listed as alive and as dropped at unmask) are refused too.
    A refusal raised later (another run took the last of the budget) is answered the same way.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type
        if kind in (MessageType.EVALUATE, MessageType.QUERY):
            return _refusal(msg, PolicyRefusedError(Rule.TRAIN_ONLY, f"this site answers training messages only, "
                                                                     f"not {kind!r}: a local evaluation would "
                                                                     "release plain statistics of its records"))
        if kind != MessageType.TRAIN:
            return call_next(msg, ctxt)
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        secagg = configs is not None
        ctxt.state.config_records[GATE_RECORD] = ConfigRecord({"secagg": secagg})
        cfg = resolve(RunConfig.from_flower(ctxt.run_config, overrides), ctxt.run_id)
        stage = configs.get(Key.STAGE) if configs is not None else None
        try:
            if configs is not None and stage == Stage.UNMASK:
                check_secagg_unmask(active=_int_list(configs, Key.ACTIVE_NODE_ID_LIST),
                                    dead=_int_list(configs, Key.DEAD_NODE_ID_LIST))
            if configs is None or stage == Stage.SETUP:
                site = Site.open(ctxt, cfg, policies)
                if configs is not None:
                    check_secagg_setup(sample_num=_int_list(configs, Key.SAMPLE_NUMBER, scalar=True)[0],
                                       share_num=_int_list(configs, Key.SHARE_NUMBER, scalar=True)[0],
                                       threshold=_int_list(configs, Key.THRESHOLD, scalar=True)[0],
                                       min_shares=site.policy.secagg_min_shares)
                request = round_request(cfg, secagg=secagg)
                if site.ledger is None:
                    review(site.policy, request)
                else:  # the policy's rules first, then the ledger
                    plan_round(site.policy, request, site.ledger, n=len(site.data),
                               train=train_config(cfg, site.name, 0), run=str(ctxt.run_id))
            reply = call_next(msg, ctxt)
        except PolicyRefusedError as exc:
            log.warning("%s", exc)
            return _refusal(msg, exc)
        return check_release(reply, dp=cfg.dp)

    return mod


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


def make_client_app(overrides: Mapping[str, Any] | None = None, *, policies: Policies | None = None,
                    before_fit: Callable[[Context], None] | None = None,
                    resolve: Resolve = as_given) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` updated with ``overrides``.

    ``policies`` are the hospital side's: one :class:`~privacy.policy.SitePolicy` for every
    virtual site or one per site name; a SuperNode's node config (``policy-file`` or policy
    keys) takes precedence, and without either a site keeps the default (secure) policy.
    ``before_fit`` runs at the start of every ``fit``, mid-protocol under SecAgg+ (fault
    injection in dropout tests). ``resolve`` fills an empty ``data-dir``/``out-dir``
    (default: as given; :mod:`simulations.apps` uses the built-in federation).
    """

    def client_fn(context: Context) -> Client:
        torch.set_num_threads(1)
        cfg = resolve(RunConfig.from_flower(context.run_config, overrides), context.run_id)
        site = Site.open(context, cfg, policies)
        hook = (lambda: before_fit(context)) if before_fit is not None else None
        return HospitalClient(site, cfg, run=str(context.run_id), secagg=_came_through_secagg(context),
                              before_fit=hook).to_client()

    # The policy gate outermost (it sees what leaves last); SecAgg+ next: the update is clipped before it is masked.
    return ClientApp(client_fn=client_fn,
                     mods=[policy_gate(policies, overrides, resolve), secagg_when_configured,
                           central_clipping_mod(overrides)])

