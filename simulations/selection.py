"""Model choices made on the validation split: head, activation bound, learnable activation, learning rates.

Every default of the Approx-CNN and its training that the code or README justifies by a
measurement is re-measured here on ``DATA/val`` (drawn like ``DATA/test`` on a stream of
its own). The choices are made in order, each around the ones already made (coordinate
search): the head first, then the activation bound, the learnable activation and the
learning rate; the Ref-CNN's learning rate on its own. A setting met twice is trained
once. The test set is only reported, for the chosen candidate of each choice.
``selection.json`` and ``selection.md`` hold the table.

The federated head is chosen on the validation split too (federated DP-SGD + SecAgg+
runs): the federated run wants a head that leaves its start quickly, which centralised
training at 30 epochs does not show.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.config import RunConfig
from federation.errors import DataError
from federation.model import ArchConfig, HeadKind, ModelKind
from federation.storage import atomic_write_bytes, atomic_write_json
from federation.train import TrainConfig, default_lr
from privacy.policy import SitePolicy
from simulations.centralised import train_centralised
from simulations.federated import run_federated

__all__ = ["CHOICES", "Setting", "run_selection"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setting:
    """One centralised training setting: an architecture and a learning rate."""

    arch: ArchConfig
    lr: float

    @property
    def name(self) -> str:
        """Folder name, unique per setting."""
        a = self.arch
        return (f"{a.kind}-{a.head}-b{a.act_bound:g}-{'learn' if a.learnable_act else 'fixed'}-lr{self.lr:g}")


Vary = Callable[[Setting, str], Setting]

CHOICES: tuple[tuple[str, tuple[str, ...], Vary], ...] = (
    ("approx-head", ("gap", "flatten"),
     lambda s, v: dataclasses.replace(s, arch=dataclasses.replace(s.arch, head=HeadKind(v)))),
    ("act-bound", ("0.5", "2", "4"),
     lambda s, v: dataclasses.replace(s, arch=dataclasses.replace(s.arch, act_bound=float(v)))),
    ("learnable-act", ("true", "false"),
     lambda s, v: dataclasses.replace(s, arch=dataclasses.replace(s.arch, learnable_act=v == "true"))),
    ("approx-lr", ("0.001", "0.003"), lambda s, v: dataclasses.replace(s, lr=float(v))),
)
"""The Approx-CNN's choices, in the order they are made: name, candidates, how a candidate changes a setting."""

REF_LRS = ("0.001", "0.003")


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| choice | candidate | default | val macro-AUC | chosen | test macro-AUC (chosen only) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        test = f"{r['test_auc_macro']:.3f}" if r["chosen"] else ""
        lines.append(f"| {r['choice']} | {r['value']} | {'yes' if r['default'] else ''} | {r['val_auc_macro']:.3f} "
                     f"| {'**yes**' if r['chosen'] else ''} | {test} |")
    return "\n".join(lines) + "\n"


def _value(setting: Setting, choice: str) -> str:
    a = setting.arch
    return {"approx-head": str(a.head), "act-bound": f"{a.act_bound:g}",
            "learnable-act": str(a.learnable_act).lower(), "approx-lr": f"{setting.lr:g}",
            "ref-lr": f"{setting.lr:g}"}[choice]


def run_selection(data: Path, out: Path, *, epochs: int = 30, seed: int = 0, federated: bool = True,
                  rounds: int = 10, size: int = 64,
                  on_candidate: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Make every choice on the validation macro-AUC; write ``selection.json`` / ``.md``; return them.

    Raises
    ------
    DataError
        ``data`` has no ``val/`` split (``privrad phantoms --val N`` writes one).
    """
    data, out = Path(data), Path(out)
    if not (data / "val").is_dir():
        raise DataError(data / "val", "is missing: choices are made on the validation split (privrad phantoms --val)")
    trained: dict[Setting, dict[str, float]] = {}

    def score(setting: Setting) -> dict[str, float]:
        if setting not in trained:
            result = train_centralised(data, test=data / "test", val=data / "val", out=out / setting.name,
                                       arch=setting.arch, train=TrainConfig(epochs=epochs, lr=setting.lr, seed=seed))
            if result.val_auc_macro is None:
                raise DataError(data / "val", "is missing: choices are made on the validation split")
            trained[setting] = {"val": result.val_auc_macro, "test": result.metrics.auc_macro}
            if on_candidate is not None:
                on_candidate(setting.name, trained[setting]["val"])
        return trained[setting]

    rows: list[dict[str, Any]] = []

    def choose(choice: str, options: list[Setting], default: Setting) -> Setting:
        scores = [score(s) for s in options]
        best = max(range(len(options)), key=lambda i: scores[i]["val"])
        rows.extend({"choice": choice, "value": _value(s, choice), "default": _value(s, choice) ==
                     _value(default, choice), "val_auc_macro": sc["val"], "test_auc_macro": sc["test"],
                     "chosen": i == best, "mode": "centralised", "epochs": epochs}
                    for i, (s, sc) in enumerate(zip(options, scores, strict=True)))
        return options[best]

    default_approx = Setting(ArchConfig(kind=ModelKind.APPROX, input_size=size), default_lr(ModelKind.APPROX))
    current = default_approx
    for choice, values, vary in CHOICES:
        current = choose(choice, [vary(current, v) for v in values], default_approx)
    default_ref = Setting(ArchConfig(kind=ModelKind.REF, input_size=size, head=current.arch.head),
                          default_lr(ModelKind.REF))
    choose("ref-lr", [dataclasses.replace(default_ref, lr=float(v)) for v in REF_LRS], default_ref)
    if federated:
        rows += _federated_head(data, out, rounds=rounds, seed=seed, size=size, on_candidate=on_candidate)
    summary = {"about": "choices made in order on the validation macro-AUC (DATA/val), each around those already "
                        "made; the test macro-AUC is reported for the chosen candidates only",
               "data": str(data), "seed": seed, "epochs": epochs, "rows": rows,
               "chosen": {r["choice"]: r["value"] for r in rows if r["chosen"]},
               "defaults_confirmed": all(r["default"] for r in rows if r["chosen"])}
    atomic_write_json(out / "selection.json", summary)
    atomic_write_bytes(out / "selection.md", _table(rows).encode())
    return summary


def _federated_head(data: Path, out: Path, *, rounds: int, seed: int, size: int,
                    on_candidate: Callable[[str, float], None] | None) -> list[dict[str, Any]]:
    rows = []
    for head in (HeadKind.FLATTEN, HeadKind.GAP):
        folder = out / f"federated-head-{head}"
        cfg = RunConfig(data_dir=str(data), out_dir=str(folder), head=str(head), num_server_rounds=rounds,
                        local_epochs=2, seed=seed, image_size=size)
        final = run_federated(cfg, policies=SitePolicy(ledger_dir=str(folder / "ledgers"))).metrics["final"]
        rows.append({"choice": "federated-head", "value": str(head), "default": head == RunConfig().head,
                     "val_auc_macro": final["val_auc_macro"], "test_auc_macro": final["auc_macro"],
                     "mode": f"federated DP-SGD + SecAgg+, {rounds} rounds", "epochs": rounds * 2})
        if on_candidate is not None:
            on_candidate(folder.name, final["val_auc_macro"])
    best = max(rows, key=lambda r: r["val_auc_macro"])
    for r in rows:
        r["chosen"] = r is best
    return rows
