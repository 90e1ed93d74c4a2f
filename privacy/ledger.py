"""Per-site privacy ledger: a locked, append-only, atomically written record of every DP step set.

One JSON file per site, owned by the site. Each entry is one round's DP-SGD work as
Opacus accounts it, ``(noise_multiplier, sample_rate, steps)``, with the run and round,
δ and the cumulative ε after it. The ledger *is* the accountant's memory: ε of the whole
history is recomputed from the entries with Opacus's RDP analysis (:func:`epsilon_of`),
so ε is cumulative across rounds and runs even though Flower builds a fresh client (and
a fresh Opacus engine) every round.

Crash and concurrency safety:

* every change happens under a file lock (``<ledger>.lock``) and starts by reloading the
  file, so two processes sharing one ledger lose no entry;
* a round is **reserved** (written, counted as spent) *before* training and marked
  **spent** after it, so a run killed mid-round leaves its reservation counted;
* a reservation is checked against the budget under the same lock that writes it, so
  two runs cannot both fit into the last of the budget.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from federation.errors import ConfigError, PrivacyBudgetError
from federation.storage import atomic_write_json

__all__ = ["ALPHAS", "EntryStatus", "LedgerEntry", "PrivacyLedger", "StepSet", "epsilon_of", "merge_step_sets",
           "noise_for_remaining"]

LEDGER_FORMAT = "privrad-privacy-ledger"
LEDGER_VERSION = 2
LOCK_TIMEOUT_S = 120.0
"""How long a writer waits for another process's lock before it gives up (and trains nothing)."""

# Rényi orders: Opacus's defaults extended to 256, so that short, low-noise histories get a
# tight bound (with the defaults Opacus warns that the optimum is the largest order).
ALPHAS: tuple[float, ...] = (*(1 + x / 10.0 for x in range(1, 100)), *range(12, 64), 80, 96, 128, 192, 256)

StepSet = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: Opacus's accountant history entry."""


class EntryStatus(enum.StrEnum):
    """A ledger entry is counted as spent in either state."""

    RESERVED = "reserved"
    """Written before the round trained; stays counted if the round never finishes."""
    SPENT = "spent"


def merge_step_sets(history: Iterable[StepSet]) -> list[StepSet]:
    """Sum the steps of equal ``(σ, q)`` entries: RDP composes additively, so ε is unchanged."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        merged[key] = merged.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in merged.items()]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at every order of :data:`ALPHAS` (Opacus's analysis)."""
    rdp = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(ALPHAS)),
                     dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


def _rdp(history: Iterable[StepSet]) -> np.ndarray:
    total = np.zeros(len(ALPHAS))
    for s, q, n in merge_step_sets(history):
        total = total + n * _rdp_per_step(float(s), float(q))
    return total


def _epsilon(rdp: np.ndarray, delta: float) -> float:
    with warnings.catch_warnings():
        # At extreme σ the optimum is an end of the orders: the bound is still valid, only loose.
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
        eps, _ = get_privacy_spent(orders=list(ALPHAS), rdp=rdp, delta=delta)
    return float(eps)


def epsilon_of(history: Iterable[StepSet], delta: float) -> float:
    """ε at ``delta`` of a whole DP-SGD history (pure).

    The same arithmetic as Opacus's ``RDPAccountant`` (``compute_rdp`` × steps, summed,
    then ``get_privacy_spent``), with per-step RDP vectors cached by ``(σ, q)``.
    """
    entries = list(history)
    if not entries:
        return 0.0
    return _epsilon(_rdp(entries), delta)


@functools.lru_cache(maxsize=256)
def noise_for_remaining(target_epsilon: float, *, delta: float, history: tuple[StepSet, ...],
                        sample_rate: float, steps: int, floor: float = 0.0, rel_tol: float = 1e-3) -> float:
    """The smallest σ (≥ ``floor``, to ``rel_tol``) at which ``history`` plus ``steps`` more steps stays ≤ the target.

    Bisection in log σ over Opacus's RDP analysis; the returned σ always fits (ε ≤ target).

    Raises
    ------
    PrivacyBudgetError
        ``history`` alone already reaches the target: no σ fits.
    """
    base = _rdp(history)
    if _epsilon(base, delta) >= target_epsilon:
        raise PrivacyBudgetError(f"ε {_epsilon(base, delta):.3f} already spent reaches the target "
                                 f"{target_epsilon:g}: no σ fits another step")

    def fits(sigma: float) -> bool:
        return _epsilon(base + steps * _rdp_per_step(sigma, sample_rate), delta) <= target_epsilon

    lo = max(floor, 0.05)
    if fits(lo):
        return lo
    hi = max(2 * lo, 1.0)
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyBudgetError(f"no σ below 1e6 keeps ε under {target_epsilon:g}")
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


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
    run: str = ""
    status: EntryStatus = EntryStatus.SPENT
    id: str = ""

    @property
    def step_set(self) -> StepSet:
        """The Opacus history entry of this round."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {**asdict(self), "status": str(self.status)}


class PrivacyLedger:
    """The privacy ledger of one site, backed by one JSON file and a lock file beside it.

    Parameters
    ----------
    path
        The ledger file (created on the first write).
    site
        Site name, recorded in the file and checked on load.
    budget
        ε budget at ``delta``: the ledger refuses any reservation that would exceed it.
    delta
        δ of every ε in the ledger.
    """

    def __init__(self, path: Path, *, site: str, budget: float, delta: float) -> None:
        if not budget > 0:
            raise ConfigError(f"`epsilon_budget` must be positive, got {budget}")
        if not 0 < delta < 1:
            raise ConfigError(f"`delta` must be in (0, 1), got {delta}")
        self.path, self.site, self.budget, self.delta = Path(path), site, budget, delta
        self._lock = FileLock(str(self.path) + ".lock", timeout=LOCK_TIMEOUT_S)
        self.entries: list[LedgerEntry] = self._load()

    # -- file ---------------------------------------------------------------------------------
    def _load(self) -> list[LedgerEntry]:
        if not self.path.exists():
            return []
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PrivacyBudgetError(f"{self.path}: privacy ledger is unreadable ({exc}); refusing to "
                                     "train without knowing what was spent") from exc
        if doc.get("format") != LEDGER_FORMAT or doc.get("version") not in (1, LEDGER_VERSION):
            raise PrivacyBudgetError(f"{self.path}: not a privrad privacy ledger (version {LEDGER_VERSION})")
        if doc.get("site") != self.site:
            raise PrivacyBudgetError(f"{self.path}: ledger of site {doc.get('site')!r}, not {self.site!r}")
        if float(doc.get("delta", -1)) != self.delta:
            raise PrivacyBudgetError(f"{self.path}: ledger is kept at delta={doc.get('delta')}, "
                                     f"asked for delta={self.delta}")
        return [LedgerEntry(**{**e, "status": EntryStatus(e.get("status", EntryStatus.SPENT))})
                for e in doc["entries"]]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock and work on the file's current content; write it back on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._held():
            self.entries = self._load()
            yield
            atomic_write_json(self.path, self.to_dict())

    @contextmanager
    def _held(self) -> Iterator[None]:
        try:
            with self._lock:
                yield
        except Timeout:
            raise PrivacyBudgetError(f"{self.path}: the ledger stayed locked by another process for "
                                     f"{LOCK_TIMEOUT_S:.0f} s; refusing to train without it") from None

    def reload(self) -> None:
        """Read the file again (another process may have written it)."""
        with self._held():
            self.entries = self._load()

    # -- queries --------------------------------------------------------------------------------
    @property
    def history(self) -> list[StepSet]:
        """All recorded step sets (reserved and spent), oldest first."""
        return [e.step_set for e in self.entries]

    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta` (reservations included)."""
        return epsilon_of(self.history, self.delta)

    def epsilon_after(self, planned: Sequence[StepSet]) -> float:
        """ε the site would have spent after ``planned`` more step sets."""
        return epsilon_of([*self.history, *planned], self.delta)

    def rounds_in_run(self, run: str) -> int:
        """How many rounds of run ``run`` this site has reserved or spent."""
        return sum(1 for e in self.entries if e.run == run)

    def check(self, planned: Sequence[StepSet]) -> float:
        """Return the ε after ``planned`` (on the file's current content), or raise if it exceeds the budget.

        Raises
        ------
        PrivacyBudgetError
            The planned steps would take ε above :attr:`budget`.
        """
        self.reload()
        return self._check(planned)

    def _check(self, planned: Sequence[StepSet]) -> float:
        after = self.epsilon_after(planned)
        if after > self.budget:
            raise PrivacyBudgetError(
                f"site {self.site}: the next round would raise epsilon from {self.epsilon():.3f} to "
                f"{after:.3f} at delta={self.delta:g}, above the budget {self.budget:g}; refusing to train")
        return after

    # -- changes --------------------------------------------------------------------------------
    def _entry(self, round_: int, step_set: StepSet, *, run: str, status: EntryStatus) -> LedgerEntry:
        sigma, rate, steps = step_set
        eps = self.epsilon_after([step_set])
        return LedgerEntry(round_, float(sigma), float(rate), int(steps), self.delta, eps, time.time(), run=run,
                           status=status, id=uuid.uuid4().hex)

    def reserve(self, round_: int, step_set: StepSet, *, run: str) -> LedgerEntry:
        """Check and write ``step_set`` as reserved, under the lock; it counts as spent from now on.

        Raises
        ------
        PrivacyBudgetError
            It would exceed the budget; nothing was written.
        """
        with self._locked():
            self._check([step_set])
            entry = self._entry(round_, step_set, run=run, status=EntryStatus.RESERVED)
            self.entries.append(entry)
        return entry

    def settle(self, reservation: LedgerEntry, step_set: StepSet) -> float:
        """Mark ``reservation`` spent with what the round really spent; return the site's ε.

        A round never spends less than it reserved (the step count is built into the
        loader); one that spent anything else keeps the larger of the two and raises.

        Raises
        ------
        PrivacyBudgetError
            The reservation is gone from the file, or the round spent other steps than reserved.
        """
        with self._locked():
            idx = next((i for i, e in enumerate(self.entries) if e.id == reservation.id), None)
            if idx is None:
                raise PrivacyBudgetError(f"{self.path}: reservation {reservation.id} of round {reservation.round} "
                                         "is missing from the ledger")
            if step_set != reservation.step_set:
                extra = self._entry(reservation.round, step_set, run=reservation.run, status=EntryStatus.SPENT)
                self.entries.append(extra)
                raise PrivacyBudgetError(f"site {self.site}: round {reservation.round} ran {step_set}, reserved "
                                         f"{reservation.step_set}; both are recorded")
            self.entries[idx] = replace(self.entries[idx], status=EntryStatus.SPENT, timestamp=time.time())
        return self.epsilon()

    def record(self, round_: int, step_sets: Sequence[StepSet], *, run: str = "") -> float:
        """Append step sets as spent (no budget check: they were released already); return the new ε."""
        with self._locked():
            for step_set in step_sets:
                self.entries.append(self._entry(round_, step_set, run=run, status=EntryStatus.SPENT))
        return self.epsilon()

    def to_dict(self) -> dict[str, Any]:
        """The file's content."""
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "site": self.site,
            "delta": self.delta,
            "epsilon_budget": self.budget,
            "accountant": "rdp",
            "epsilon": self.epsilon(),
            "entries": [e.to_dict() for e in self.entries],
        }
