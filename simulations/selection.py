"""Model choices made on the validation split: head, activation bound, learnable activation, learning rates.

Every default of the Approx-CNN and its training that the code or README justifies by a
measurement is re-measured here on ``DATA/val`` (drawn like ``DATA/test`` on a stream of
its own), one factor at a time around the default; the test set is only reported, for
the chosen candidate of each choice. ``selection.json`` and ``selection.md`` hold the table.

The federated head is chosen on the validation split too: the federated run wants a head
that leaves its start quickly, which centralised training at 30 epochs does not show.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients.train import TrainConfig, default_lr
from federation.config import RunConfig
from federation.errors import DataError
from federation.model import ArchConfig, HeadKind, ModelKind
from federation.storage import atomic_write_bytes, atomic_write_json
from privacy.policy import SitePolicy
from simulations.centralised import train_centralised

__all__ = ["Candidate", "candidates", "run_selection"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One setting tried for one choice (all else at the default)."""

    choice: str
    value: str
    arch: ArchConfig
    lr: float
    default: bool

    @property
    def name(self) -> str:
        """Folder name."""
        return f"{self.choice}-{self.value}"


def candidates(size: int = 64) -> list[Candidate]:
    """The centralised candidates: each choice's default (``privrad train``'s) and its alternatives."""
    approx = ArchConfig(kind=ModelKind.APPROX, input_size=size)
    ref = ArchConfig(kind=ModelKind.REF, input_size=size)
    a_lr, r_lr = default_lr(ModelKind.APPROX), default_lr(ModelKind.REF)
    other_head = HeadKind.FLATTEN if approx.head is HeadKind.GAP else HeadKind.GAP
    return [
        Candidate("approx-head", str(approx.head), approx, a_lr, True),
        Candidate("approx-head", str(other_head), dataclasses.replace(approx, head=other_head), a_lr, False),
        *[Candidate("act-bound", f"{b:g}", dataclasses.replace(approx, act_bound=b), a_lr, b == approx.act_bound)
          for b in (0.5, 2.0, 4.0)],
        Candidate("learnable-act", str(approx.learnable_act).lower(), approx, a_lr, True),
        Candidate("learnable-act", str(not approx.learnable_act).lower(),
                  dataclasses.replace(approx, learnable_act=not approx.learnable_act), a_lr, False),
        *[Candidate("approx-lr", f"{lr:g}", approx, lr, lr == a_lr) for lr in (1e-3, 3e-3)],
        *[Candidate("ref-lr", f"{lr:g}", ref, lr, lr == r_lr) for lr in (1e-3, 3e-3)],
    ]


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| choice | candidate | default | val macro-AUC | chosen | test macro-AUC (chosen only) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        test = f"{r['test_auc_macro']:.3f}" if r["chosen"] else ""
        lines.append(f"| {r['choice']} | {r['value']} | {'yes' if r['default'] else ''} | {r['val_auc_macro']:.3f} "
                     f"| {'**yes**' if r['chosen'] else ''} | {test} |")
    return "\n".join(lines) + "\n"


def run_selection(data: Path, out: Path, *, epochs: int = 30, seed: int = 0, federated: bool = True,
                  rounds: int = 10, size: int = 64,
                  on_candidate: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Train every candidate, choose per choice by validation macro-AUC; write ``selection.json`` / ``.md``.

    Raises
    ------
    DataError
        ``data`` has no ``val/`` split (``privrad phantoms --val N`` writes one).
    """
    data, out = Path(data), Path(out)
    if not (data / "val").is_dir():
        raise DataError(data / "val", "is missing: choices are made on the validation split (privrad phantoms --val)")
    rows: list[dict[str, Any]] = []
    for cand in candidates(size):
        train = TrainConfig(epochs=epochs, lr=cand.lr, seed=seed)
        result = train_centralised(data, test=data / "test", val=data / "val", out=out / cand.name, arch=cand.arch,
                                   train=train)
        rows.append({"choice": cand.choice, "value": cand.value, "default": cand.default,
                     "val_auc_macro": result.metrics["val_auc_macro"], "test_auc_macro": result.metrics["auc_macro"],
                     "mode": "centralised", "epochs": epochs})
        if on_candidate is not None:
            on_candidate(cand.name, result.metrics["val_auc_macro"])
    if federated:
        from simulations.federated import run_federated

        for head in (HeadKind.FLATTEN, HeadKind.GAP):
            cfg = RunConfig(data_dir=str(data), out_dir=str(out / f"federated-head-{head}"), head=str(head),
                            num_server_rounds=rounds, local_epochs=2, seed=seed, image_size=size)
            policy = SitePolicy(ledger_dir=str(out / f"federated-head-{head}" / "ledgers"))
            res = run_federated(cfg, policies=policy)
            final = res.metrics["final"]
            rows.append({"choice": "federated-head", "value": str(head), "default": head is HeadKind.FLATTEN,
                         "val_auc_macro": final["val_auc_macro"], "test_auc_macro": final["auc_macro"],
                         "mode": f"federated DP-SGD + SecAgg+, {rounds} rounds", "epochs": rounds * 2})
            if on_candidate is not None:
                on_candidate(f"federated-head-{head}", final["val_auc_macro"])
    for choice in dict.fromkeys(r["choice"] for r in rows):
        group = [r for r in rows if r["choice"] == choice]
        best = max(group, key=lambda r: r["val_auc_macro"])
        for r in group:
            r["chosen"] = r is best
    summary = {"about": "one factor at a time around the default; chosen by validation macro-AUC (DATA/val); "
                        "the test macro-AUC is reported for the chosen candidate only",
               "data": str(data), "seed": seed, "rows": rows,
               "defaults_confirmed": all(r["default"] for r in rows if r["chosen"])}
    atomic_write_json(out / "selection.json", summary)
    atomic_write_bytes(out / "selection.md", _table(rows).encode())
    return summary
