"""Per-site privacy ledger: an append-only, atomically written record of every DP step set.

One JSON file per site. Each entry is one round's DP-SGD work as Opacus accounts it,
``(noise_multiplier, sample_rate, steps)``, with the round, δ and the cumulative ε after
it. The ledger *is* the accountant's memory: ε of the whole history is recomputed from
the entries by Opacus's accountant (:func:`epsilon_of`), so ε is cumulative across
rounds even though Flower builds a fresh client (and a fresh Opacus engine) every round.
Before a site trains it asks :meth:`PrivacyLedger.check` whether the planned steps fit
its budget; if not it refuses, it never overspends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opacus.accountants import create_accountant

from federation.errors import ConfigError, PrivacyBudgetError
from federation.storage import atomic_write_json

__all__ = ["LedgerEntry", "PrivacyLedger", "StepSet", "epsilon_of"]

LEDGER_FORMAT = "privrad-privacy-ledger"
LEDGER_VERSION = 1

# Rényi orders: Opacus's defaults extended to 256, so that short, low-noise histories get a
# tight bound (with the defaults Opacus warns that the optimum is the largest order).
ALPHAS: tuple[float, ...] = (*(1 + x / 10.0 for x in range(1, 100)), *range(12, 64), 80, 96, 128, 192, 256)

StepSet = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: Opacus's accountant history entry."""


def merge_step_sets(history: Iterable[StepSet]) -> list[StepSet]:
    """Sum the steps of equal ``(σ, q)`` entries: RDP composes additively, so ε is unchanged.

    A run's ledger holds one entry per round, almost always with the same σ and q; the
    accountant's cost grows with the number of entries, not with the steps.
    """
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        merged[key] = merged.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in merged.items()]


def epsilon_of(history: Iterable[StepSet], delta: float, *, accountant: str = "rdp") -> float:
    """ε at ``delta`` of a whole DP-SGD history, computed by Opacus's accountant (pure)."""
    acc = create_accountant(accountant)
    entries = [(float(s), float(q), int(n)) for s, q, n in history]
    acc.history = merge_step_sets(entries) if accountant == "rdp" else entries
    if not acc.history:
        return 0.0
    if accountant == "rdp":
        return float(acc.get_epsilon(delta=delta, alphas=list(ALPHAS)))
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class LedgerEntry:
    """One round's DP step set at one site."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    timestamp: float

    @property
    def step_set(self) -> StepSet:
        """The Opacus history entry of this round."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


class PrivacyLedger:
    """The privacy ledger of one site, backed by one JSON file.

    Parameters
    ----------
    path
        The ledger file (created on the first append).
    site
        Site name, recorded in the file and checked on load.
    budget
        ε budget at ``delta``.
    delta
        δ of every ε in the ledger.
    accountant
        Opacus accountant name (``rdp`` or ``prv``).
    """

    def __init__(self, path: Path, *, site: str, budget: float, delta: float, accountant: str = "rdp") -> None:
        if not budget > 0:
            raise ConfigError(f"`epsilon_budget` must be positive, got {budget}")
        if not 0 < delta < 1:
            raise ConfigError(f"`delta` must be in (0, 1), got {delta}")
        self.path, self.site, self.budget, self.delta, self.accountant = Path(path), site, budget, delta, accountant
        self.entries: list[LedgerEntry] = self._load()

    def _load(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PrivacyBudgetError(f"{self.path}: privacy ledger is unreadable ({exc}); refusing to "
                                     "train without knowing what was spent") from exc
        if doc.get("format") != LEDGER_FORMAT or doc.get("version") != LEDGER_VERSION:
            raise PrivacyBudgetError(f"{self.path}: not a privrad privacy ledger (version {LEDGER_VERSION})")
        if doc.get("site") != self.site:
            raise PrivacyBudgetError(f"{self.path}: ledger of site {doc.get('site')!r}, not {self.site!r}")
        if float(doc.get("delta", -1)) != self.delta:
            raise PrivacyBudgetError(f"{self.path}: ledger is kept at delta={doc.get('delta')}, "
                                     f"asked for delta={self.delta}")
        return [LedgerEntry(**e) for e in doc["entries"]]

    @property
    def history(self) -> list[StepSet]:
        """All recorded step sets, oldest first."""
        return [e.step_set for e in self.entries]

    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return epsilon_of(self.history, self.delta, accountant=self.accountant)

    def epsilon_after(self, planned: Sequence[StepSet]) -> float:
        """ε the site would have spent after ``planned`` more step sets."""
        return epsilon_of([*self.history, *planned], self.delta, accountant=self.accountant)

    def check(self, planned: Sequence[StepSet]) -> float:
        """Return the ε after ``planned``, or raise if it would exceed the budget.

        Raises
        ------
        PrivacyBudgetError
            The planned steps would take ε above :attr:`budget`.
        """
        after = self.epsilon_after(planned)
        if after > self.budget:
            raise PrivacyBudgetError(
                f"site {self.site}: the next round would raise epsilon from {self.epsilon():.3f} to "
                f"{after:.3f} at delta={self.delta:g}, above the budget {self.budget:g}; refusing to train")
        return after

    def record(self, round_: int, step_sets: Sequence[StepSet]) -> float:
        """Append one round's step sets, write the file atomically, return the new ε."""
        for sigma, rate, steps in step_sets:
            eps = epsilon_of([*self.history, (sigma, rate, steps)], self.delta, accountant=self.accountant)
            self.entries.append(LedgerEntry(round_, float(sigma), float(rate), int(steps), self.delta, eps,
                                            time.time()))
        self._save()
        return self.epsilon()

    def _save(self) -> None:
        atomic_write_json(self.path, self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "site": self.site,
            "delta": self.delta,
            "epsilon_budget": self.budget,
            "accountant": self.accountant,
            "epsilon": self.epsilon(),
            "entries": [asdict(e) for e in self.entries],
        }
