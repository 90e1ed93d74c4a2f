"""Typed run configuration shared by the ServerApp and the ClientApp.

Flower hands both apps ``context.run_config``, a flat mapping read from
``[tool.flwr.app.config]`` in ``pyproject.toml`` and ``--run-config`` overrides.
:meth:`RunConfig.from_flower` turns it into a frozen, validated dataclass once.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from federation.errors import ConfigError
from federation.model import ActInit, ArchConfig, HeadKind

__all__ = ["RunConfig", "StrategyKind", "parse_flat"]

E = TypeVar("E", bound=enum.Enum)

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the field's ``default``; booleans strictly (a typo is an error, not false)."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ConfigError(f"`{key}` must be true or false, got {value!r}")
    if isinstance(default, enum.Enum):
        return str(value)
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{key}` must be {type(default).__name__}, got {value!r}") from None


def parse_flat(cls: type[Any], values: Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """Flat ``-`` separated keys (Flower's run and node configs, TOML files) → ``cls``'s field values.

    Each value is coerced to its field's type; an unknown key is an error listing the known ones.

    Raises
    ------
    ConfigError
        A key ``cls`` does not have, or a value of the wrong type (the message names the key).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ConfigError(f"unknown {what} key `{key}`; known: {sorted(k.replace('_', '-') for k in fields)}")
        out[name] = _coerce(key, value, fields[name].default)
    return out


DEFAULT_MAX_WEIGHT = 1000.0
"""SecAgg+'s weight cap without DP (Flower's default): a site's weight is its number of records."""

class LrSchedule(enum.StrEnum):
    """``lr-schedule``: the same rate every round, or a cosine decay across the server rounds."""

    CONSTANT = "constant"
    COSINE = "cosine"


class StrategyKind(enum.StrEnum):
    """Server-side aggregation strategy (all run inside SecAgg+ when it is on)."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"
    FEDADAM = "fedadam"


@dataclass(frozen=True)
class RunConfig:
    """One federated run.

    Field names are the run-config keys with ``-`` replaced by ``_``. The coordinator
    writes the run config, so its privacy fields (``dp``, ``epsilon_budget``,
    ``target_epsilon``, ``noise_multiplier``, ``max_grad_norm``, ``delta``, ``secagg``) are
    *requests*: every site reviews them against its own policy (:mod:`privacy.policy`)
    and refuses a round that asks for less. A value of 0 for ``noise_multiplier``,
    ``target_epsilon`` or ``delta`` leaves the choice to the site (σ from what is left of
    its budget over the rounds still planned; target ε = the budget; δ = the site's).

    The initial global model is ``initial_model`` (a privrad checkpoint) if set; else,
    with ``pretrain_epochs`` > 0, the server pretrains on the public archive
    ``public_dir`` (default ``data_dir/public`` when it exists), which costs no privacy:
    the public data are not the hospitals'; it runs at ``pretrain_batch_size``, apart from the sites'
    DP-SGD batch (public pretraining at batch 256 stalls: 4 steps an epoch on 1,000 slices gave val
    macro-AUC 0.620 where batch 32 gives 0.829). Otherwise training starts from scratch.
    ``central_dp`` adds site-level DP on top (or instead of DP-SGD): each site clips its
    update to ``central_clipping_norm``, the server adds Gaussian noise of multiplier
    ``central_noise_multiplier`` (0: derived so the planned rounds spend
    ``central_epsilon_budget`` at ``central_delta``) and refuses rounds beyond the budget.
    ``channels`` (comma-separated; empty: none) and ``scatter`` (``J`` of the fixed
    scattering front end, 0: none) shape the Approx-CNN (:class:`~federation.model.ArchConfig`);
    ``channels = ""`` with ``scatter = 2`` is a linear classifier on scattering features.
    ``lr_schedule`` ``cosine`` decays the sites' learning rate across the server rounds
    (:meth:`round_learning_rate`; constant within a round): on the 300-slice archive's federation it lifted
    DP-SGD at ε = 8 from val macro-AUC 0.970 (constant lr 0.01) to 0.976 in the tuning script, but the
    Flower pipeline reached 0.968 ± 0.002 over 3 seeds (docs/federated-training.md: a gap not yet explained).
    ``secagg_num_shares`` 0 lets the server size each site's SecAgg+ neighbourhood
    (``2 ⌈1.5 log₂ n⌉ + 1`` of ``n`` sampled sites, all of them up to 13:
    :func:`aggregator.secagg.auto_share_count`); a value in (0, 1] is a fraction of the
    sampled sites (1.0: all-to-all, whose cost grows as ``n²``), above 1 a count.
    ``secagg_threshold`` is a fraction of the shares (or a count above 1), always raised
    above half of them. ``secagg_max_weight`` is SecAgg+'s weight cap; 0 (default) lets
    :meth:`secagg_weight_cap` choose it (1 under DP, where every weight is 1).
    ``head`` defaults to ``flatten``, chosen on the validation split (federated DP-SGD +
    SecAgg+, 10 rounds: val macro-AUC 0.980 flatten vs 0.776 gap, whose plateau federated
    rounds do not leave).
    """

    num_server_rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 3e-3
    lr_schedule: str = "constant"
    optimizer: str = "adamw"
    augment: bool = True
    shift: int = 0
    aug_mult: int = 1
    image_size: int = 64
    head: str = "flatten"
    act_init: str = "relu"
    conv_gain: float = 1.0
    channels: str = "16,32,64"
    scatter: int = 0
    data_dir: str = ""
    test_dir: str = ""
    val_dir: str = ""
    out_dir: str = ""
    seed: int = 0
    # initial global model
    initial_model: str = ""
    public_dir: str = ""
    pretrain_epochs: int = 15
    pretrain_batch_size: int = 32
    # differential privacy (client-side DP-SGD)
    dp: bool = True
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    epsilon_budget: float = 8.0
    delta: float = 0.0
    # central (site-level) DP: client-side update clipping + server noise (aggregator.central_dp)
    central_dp: bool = False
    central_clipping_norm: float = 1.0
    central_noise_multiplier: float = 0.0
    central_epsilon_budget: float = 8.0
    central_delta: float = 1e-5
    # secure aggregation
    secagg: bool = True
    secagg_num_shares: float = 0.0
    secagg_threshold: float = 0.6
    secagg_timeout: float = 120.0
    secagg_max_weight: float = 0.0
    secagg_clipping_range: float = 8.0
    # strategy
    strategy: StrategyKind = StrategyKind.FEDAVG
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    min_clients: int = 2
    fraction_fit: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategy", _choice("strategy", StrategyKind, self.strategy))
        _choice("head", HeadKind, self.head)   # kept as str (a Flower run-config value), checked here
        _choice("act_init", ActInit, self.act_init)
        _choice("lr_schedule", LrSchedule, self.lr_schedule)
        positive = ("num_server_rounds", "local_epochs", "batch_size", "pretrain_batch_size", "learning_rate",
                    "image_size", "conv_gain", "max_grad_norm", "epsilon_budget", "secagg_threshold",
                    "secagg_timeout", "secagg_clipping_range", "central_clipping_norm",
                    "central_epsilon_budget")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"`{name.replace('_', '-')}` must be positive, got {getattr(self, name)}")
        self.arch()   # the architecture keys together (channels, scatter, image-size): a ConfigError naming them
        if self.aug_mult < 1:
            raise ConfigError(f"`aug-mult` must be at least 1, got {self.aug_mult}")
        for name in ("shift", "secagg_max_weight", "noise_multiplier", "target_epsilon", "delta", "proximal_mu",
                     "pretrain_epochs", "central_noise_multiplier", "secagg_num_shares"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name.replace('_', '-')}` must not be negative, got {getattr(self, name)}")
        if self.delta >= 1:
            raise ConfigError(f"`delta` must be below 1, got {self.delta}")
        if not 0 < self.central_delta < 1:
            raise ConfigError(f"`central-delta` must be in (0, 1), got {self.central_delta}")
        if self.target_epsilon > self.epsilon_budget:
            raise ConfigError(f"`target-epsilon` {self.target_epsilon} exceeds `epsilon-budget` "
                              f"{self.epsilon_budget}")
        if self.min_clients < 2 and self.secagg:
            raise ConfigError(f"`min-clients` must be at least 2 with SecAgg+, got {self.min_clients}")
        if not 0 < self.fraction_fit <= 1:
            raise ConfigError(f"`fraction-fit` must be in (0, 1], got {self.fraction_fit}")

    def secagg_weight_cap(self) -> float:
        """SecAgg+'s ``max_weight``: ``secagg_max_weight``, or with 0 the cap that keeps its quantisation fine.

        Each site sends its parameters times ``weight / max_weight``, quantised to 2²² levels over
        ``±secagg_clipping_range`` (3.8e-6 at 8). Under DP-SGD or central DP every weight is 1, so a cap of 1
        keeps that step; Flower's default of 1000 made it 3.8e-3 in parameter units, as large as the late
        rounds' whole update under a decaying learning rate (docs/federated-training.md). Without DP the
        weight is the site's size, capped at 1000.
        """
        if self.secagg_max_weight > 0:
            return self.secagg_max_weight
        return 1.0 if self.dp or self.central_dp else DEFAULT_MAX_WEIGHT

    def round_learning_rate(self, server_round: int) -> float:
        """The sites' learning rate in ``server_round`` (1-based): constant, or a cosine decay over the rounds.

        ``cosine`` gives round ``r`` of ``R`` the rate ``lr · (1 + cos(π (r − 1) / R)) / 2``: the full rate in
        round 1, falling towards 0 in the last (round 0, the planning call, gets the full rate).
        """
        if self.lr_schedule == LrSchedule.CONSTANT:
            return self.learning_rate
        r = min(max(server_round - 1, 0), self.num_server_rounds - 1)
        return self.learning_rate * 0.5 * (1 + math.cos(math.pi * r / self.num_server_rounds))

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Build from Flower's flat run config (``-`` separated keys); unknown keys are an error."""
        merged = {**dict(run_config), **dict(overrides or {})}
        return cls(**parse_flat(cls, merged, what="run-config"))

    def arch(self) -> ArchConfig:
        """The Approx-CNN architecture every party builds."""
        return ArchConfig(input_size=self.image_size, head=HeadKind(self.head), act_init=ActInit(self.act_init),
                          conv_gain=self.conv_gain, scatter=self.scatter, channels=self._channels())

    def _channels(self) -> tuple[int, ...]:
        try:
            return tuple(int(c) for c in self.channels.split(",") if c.strip())
        except ValueError:
            raise ConfigError(f"`channels` must be comma-separated integers, got {self.channels!r}") from None

    def to_flower(self) -> dict[str, Any]:
        """Flat ``-`` separated form (Flower run-config values: bool, int, float, str)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name.replace("_", "-")] = str(v) if isinstance(v, enum.Enum) else v
        return out


Resolve = Callable[[RunConfig, "int | str"], RunConfig]
"""Fills what a run config left empty (``data-dir``, ``out-dir``) for run ``run_id``."""


def _choice(name: str, kind: type[E], value: Any) -> E:
    """``kind(value)``, or a :class:`ConfigError` naming the run-config key and its choices."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"`{name.replace('_', '-')}` must be one of {', '.join(k.value for k in kind)}, "
                          f"got {value!r}") from None


def as_given(cfg: RunConfig, run_id: int | str) -> RunConfig:
    """The run config unchanged (a hospital's data path comes from its node config)."""
    return cfg


def require_paths(cfg: RunConfig, run_id: int | str) -> RunConfig:
    """The run config as given; an empty ``data-dir`` or ``out-dir`` is an error naming the key.

    The Flower apps that ``flwr run .`` starts (:mod:`simulations.apps`) resolve both to the
    built-in synthetic federation and a cache folder instead.

    Raises
    ------
    ConfigError
        ``data-dir`` or ``out-dir`` is empty.
    """
    for key, value in (("data-dir", cfg.data_dir), ("out-dir", cfg.out_dir)):
        if not value:
            raise ConfigError(f"`{key}` is empty in the run config of run {run_id}: set it "
                              f"(`--run-config \"{key}='...'\"`) or start the apps of simulations.apps")
    return cfg
