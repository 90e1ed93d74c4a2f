"""The site's privacy policy: what a hospital allows, read at the hospital, never taken from the coordinator.

The coordinator writes the run config and every message a site receives, so nothing in
them can be trusted to protect the site's patients. A :class:`SitePolicy` is read where
the hospital keeps it — a TOML file named by the SuperNode's ``--node-config
policy-file=…``, policy keys in the node config itself, or (in a simulation) the policy
the hospital-side runner hands each virtual site — and :func:`review` compares every
round's request against it. A round asking for less than the policy allows is refused
with the rule named (:class:`~federation.errors.PolicyRefusedError`); nothing trained on
records leaves the site.

The default policy is the secure one: DP-SGD required, ε ≤ 8 at δ = 1e-5, per-sample
clipping at C ≤ 1, σ ≥ 0.5, SecAgg+ required. A policy file looks like::

    # /etc/privrad/site.toml
    dp-required = true
    epsilon-budget = 8.0
    delta = 1e-5
    max-grad-norm = 1.0
    min-noise-multiplier = 0.5
    max-noise-multiplier = 20.0   # beyond this, what is left of the budget counts as spent
    secagg-required = true
    secagg-min-shares = 11        # SecAgg+ neighbourhood: at least this many sites (or all of them)
    ledger-dir = "/var/lib/privrad/ledger"   # relative paths are relative to this file

Everything here is pure: no Flower, no Opacus.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from federation.config import parse_flat
from federation.errors import ConfigError, PolicyRefusedError
from federation.storage import atomic_write_bytes

__all__ = ["POLICY_FILE_KEY", "RoundRequest", "Rule", "SitePolicy", "check_secagg_setup", "check_secagg_unmask",
           "resolve_policy", "review"]

POLICY_FILE_KEY = "policy-file"
"""Node-config key naming the site's policy file."""


class Rule(enum.StrEnum):
    """The policy rules a round can break; each refusal names one."""

    DP_REQUIRED = "dp-required"
    EPSILON_BUDGET = "epsilon-budget"
    DELTA = "delta"
    MAX_GRAD_NORM = "max-grad-norm"
    MIN_NOISE_MULTIPLIER = "min-noise-multiplier"
    SECAGG_REQUIRED = "secagg-required"
    BUDGET = "budget"
    """The run's remaining rounds do not fit in what is left of the site's ε budget."""
    PLANNED_ROUNDS = "planned-rounds"
    """The coordinator asks for more rounds than the run planned (and the site's σ was sized for)."""
    SECAGG_PROTOCOL = "secagg-protocol"
    """The SecAgg+ parameters or requests let the coordinator unmask one site (a minority threshold, a site
    listed both as dropped and alive)."""
    TRAIN_ONLY = "train-only"
    """A site answers training messages only: a local evaluation or query would release plain statistics."""


@dataclass(frozen=True)
class SitePolicy:
    """What one hospital allows (field names are the file's keys with ``-`` as ``_``).

    Parameters
    ----------
    dp_required
        Every round must be DP-SGD; ``False`` lets a run turn DP off (non-private training).
    epsilon_budget
        Record-level ε the site may ever spend at ``delta`` (across all runs on its ledger).
    delta
        δ of every ε the site accounts; independent of the data (never a function of n).
    max_grad_norm
        The largest per-sample clipping bound C a run may use.
    min_noise_multiplier
        The smallest σ a run may use, whatever the budget would allow.
    max_noise_multiplier
        The largest σ the site trains at: when what is left of the budget would need more
        (an update that is noise, useless to every hospital), the budget counts as spent.
    secagg_required
        Every training message must come through Flower's SecAgg+ workflow.
    secagg_min_shares
        The fewest shares (the site and its SecAgg+ neighbours) the site accepts when more
        sites take part: its update is masked only against its neighbours, so a coordinator
        colluding with all ``shares - 1`` of them could unmask it. With fewer sites than
        this, all of them must be neighbours.
    ledger_dir
        Folder of the site's persistent ledger (``<ledger-dir>/<site>.json``); empty: the
        ``ledgers/`` folder beside the site's data folder.
    accountant
        Opacus accountant of the ledger: ``rdp``.
    """

    dp_required: bool = True
    epsilon_budget: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    min_noise_multiplier: float = 0.5
    max_noise_multiplier: float = 20.0
    secagg_required: bool = True
    secagg_min_shares: int = 11
    ledger_dir: str = ""
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        for name in ("epsilon_budget", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"site policy: `{_key(name)}` must be a positive number, got {value!r}")
        if not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise ConfigError(f"site policy: `delta` must be in (0, 1), got {self.delta!r}")
        if not (isinstance(self.min_noise_multiplier, int | float) and self.min_noise_multiplier >= 0):
            raise ConfigError(f"site policy: `min-noise-multiplier` must not be negative, "
                              f"got {self.min_noise_multiplier!r}")
        if not (isinstance(self.max_noise_multiplier, int | float)
                and self.max_noise_multiplier >= max(self.min_noise_multiplier, 1e-9)):
            raise ConfigError(f"site policy: `max-noise-multiplier` must be at least `min-noise-multiplier` "
                              f"({self.min_noise_multiplier}), got {self.max_noise_multiplier!r}")
        for name in ("dp_required", "secagg_required"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"site policy: `{_key(name)}` must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.secagg_min_shares, int) and not isinstance(self.secagg_min_shares, bool)
                and self.secagg_min_shares >= 3):
            raise ConfigError(f"site policy: `secagg-min-shares` must be an integer of at least 3, "
                              f"got {self.secagg_min_shares!r}")
        if self.accountant != "rdp":
            raise ConfigError(f"site policy: `accountant` must be 'rdp', got {self.accountant!r}")

    # -- reading and writing ----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str, base: SitePolicy | None = None,
                     relative_to: Path | None = None) -> SitePolicy:
        """Build from ``-`` separated keys on top of ``base`` (default: the default policy).

        ``relative_to`` anchors a relative ``ledger-dir``. Unknown keys are an error naming ``source``.
        """
        try:
            out = parse_flat(cls, values, what="site-policy")
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if relative_to is not None and out.get("ledger_dir") and not Path(out["ledger_dir"]).is_absolute():
            out["ledger_dir"] = str((relative_to / out["ledger_dir"]).resolve())
        try:
            return dataclasses.replace(base or cls(), **out)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a policy file (TOML, flat keys).

        Raises
        ------
        ConfigError
            The file is missing, not TOML, or breaks a rule (the message names the file).
        """
        path = Path(path)
        try:
            values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: site policy cannot be read ({exc.strerror or exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: site policy is not valid TOML ({exc})") from None
        return cls.from_mapping(values, source=str(path), relative_to=path.parent)

    def save(self, path: Path) -> None:
        """Write the policy as TOML, atomically."""
        atomic_write_bytes(Path(path), tomli_w.dumps(self.to_dict()).encode())

    def to_dict(self) -> dict[str, Any]:
        """The file's keys and values."""
        return {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def ledger_file(self, site: str, data_path: Path) -> Path:
        """The site's ledger: ``<ledger-dir>/<site>.json``, by default beside the data folder."""
        folder = Path(self.ledger_dir) if self.ledger_dir else Path(data_path).resolve().parent / "ledgers"
        return folder / f"{site}.json"


def _key(name: str) -> str:
    return name.replace("_", "-")


def resolve_policy(node_config: Mapping[str, Any], given: SitePolicy | None = None) -> SitePolicy:
    """The policy of the site whose SuperNode has ``node_config``.

    In order: the file named by ``policy-file``; policy keys in the node config itself (on
    top of ``given`` or the default); ``given`` (the hospital-side runner's, in a
    simulation); the default policy. Nothing is read from the run config.
    """
    if "ledger-path" in node_config:
        raise ConfigError("node config key `ledger-path` is no longer read: set `ledger-dir` in the site's policy "
                          "(`policy-file=…` or a `ledger-dir=…` node-config key)")
    if POLICY_FILE_KEY in node_config:
        return SitePolicy.load(Path(str(node_config[POLICY_FILE_KEY])))
    keys = {_key(f.name) for f in dataclasses.fields(SitePolicy)}
    inline = {k: v for k, v in node_config.items() if k in keys}
    if inline:
        return SitePolicy.from_mapping(inline, source="node config", base=given)
    return given if given is not None else SitePolicy()


@dataclass(frozen=True)
class RoundRequest:
    """What the coordinator asks of a site for one training round.

    Built from the run config (which the coordinator writes) and from the message itself
    (whether it came through SecAgg+); ``None`` means "the site decides".
    """

    dp: bool
    secagg: bool
    epsilon_budget: float
    target_epsilon: float | None
    noise_multiplier: float | None
    max_grad_norm: float
    delta: float | None
    rounds: int


def review(policy: SitePolicy, request: RoundRequest) -> None:
    """Refuse ``request`` if it asks for less than ``policy`` allows (pure; the ledger is checked later).

    Raises
    ------
    PolicyRefusedError
        Naming the first rule the request breaks.
    """
    if policy.secagg_required and not request.secagg:
        raise PolicyRefusedError(Rule.SECAGG_REQUIRED, "this site sends updates only through SecAgg+; the round "
                                                       "came without it")
    if not request.dp:
        if policy.dp_required:
            raise PolicyRefusedError(Rule.DP_REQUIRED, "the run turns DP-SGD off; this site's policy requires it")
        return
    if request.epsilon_budget > policy.epsilon_budget:
        raise PolicyRefusedError(Rule.EPSILON_BUDGET, f"the run asks for an ε budget of {request.epsilon_budget:g}; "
                                                      f"this site allows at most {policy.epsilon_budget:g}")
    if request.target_epsilon is not None and request.target_epsilon > policy.epsilon_budget:
        raise PolicyRefusedError(Rule.EPSILON_BUDGET, f"the run targets ε {request.target_epsilon:g}; this site "
                                                      f"allows at most {policy.epsilon_budget:g}")
    if request.delta is not None and request.delta != policy.delta:
        raise PolicyRefusedError(Rule.DELTA, f"the run asks for δ {request.delta:g}; this site accounts at "
                                             f"δ {policy.delta:g}")
    if request.max_grad_norm > policy.max_grad_norm:
        raise PolicyRefusedError(Rule.MAX_GRAD_NORM, f"the run asks for clipping norm {request.max_grad_norm:g}; "
                                                     f"this site allows at most {policy.max_grad_norm:g}")
    if request.noise_multiplier is not None and request.noise_multiplier < policy.min_noise_multiplier:
        raise PolicyRefusedError(Rule.MIN_NOISE_MULTIPLIER, f"the run asks for σ {request.noise_multiplier:g}; this "
                                                            f"site requires at least {policy.min_noise_multiplier:g}")


def check_secagg_setup(*, sample_num: int, share_num: int, threshold: int,
                       min_shares: int = SitePolicy.secagg_min_shares) -> None:
    """Refuse SecAgg+ parameters under which the coordinator could collect both secrets of one site.

    Each site's mask seed and key are split into ``share_num`` shares, ``threshold`` of which
    rebuild either. In the unmask stage every neighbour hands over one share per site, of
    the seed (site alive) or of the key (site dropped); only if ``2 · threshold >
    share_num`` can no coordinator gather ``threshold`` of each. A site's update is masked
    against its ``share_num - 1`` neighbours only, so a neighbourhood smaller than
    ``min(sample_num, min_shares)`` (the site's ``secagg-min-shares``) is refused too: the
    coordinator would need few colluding sites to unmask it.

    Raises
    ------
    PolicyRefusedError
        Naming :attr:`Rule.SECAGG_PROTOCOL`.
    """
    if not 2 <= share_num <= sample_num or not 2 * threshold > share_num or threshold > share_num:
        raise PolicyRefusedError(Rule.SECAGG_PROTOCOL, f"threshold {threshold} of {share_num} shares "
                                                       f"({sample_num} sites): the threshold must exceed half "
                                                       "the shares, or the coordinator can unmask a site")
    if share_num < min(sample_num, min_shares):
        raise PolicyRefusedError(Rule.SECAGG_PROTOCOL, f"{share_num} shares among {sample_num} sites: this site "
                                                       f"requires at least {min(sample_num, min_shares)} "
                                                       "(secagg-min-shares), or a coordinator colluding with "
                                                       f"{share_num - 1} neighbours could unmask it")


def check_secagg_unmask(*, active: list[int], dead: list[int]) -> None:
    """Refuse an unmask request that lists a site both as alive and as dropped (it would unmask that site).

    Raises
    ------
    PolicyRefusedError
        Naming :attr:`Rule.SECAGG_PROTOCOL`.
    """
    both = sorted(set(active) & set(dead))
    if both:
        raise PolicyRefusedError(Rule.SECAGG_PROTOCOL, f"the unmask request lists nodes {both} as alive and as "
                                                       "dropped: answering would reveal their updates")
