"""Per-round record of a federated run: central evaluation, client metrics, checkpoints, plot.

Everything is written atomically after every round, so a crash loses at most the round
in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Message, Metrics, NDArrays, Scalar

from aggregator.central_dp import CentralDP
from aggregator.secagg import SecAggPlan, SecAggStage
from federation.config import RunConfig
from federation.errors import PolicyRefusedError
from federation.ingest import ImageSet, Preprocess
from federation.metrics import ClassificationMetrics, classification_metrics
from federation.model import build_model, set_weights
from federation.plots import plot_rounds
from federation.records import FitMetric
from federation.storage import atomic_write_json, save_checkpoint
from federation.train import predict_proba

__all__ = ["RunRecorder", "refusal_rule"]

log = logging.getLogger(__name__)

def refusal_rule(reply: Message) -> str | None:
    """The policy rule a site named when it refused a round (``None``: not a policy refusal)."""
    return PolicyRefusedError.rule_in(reply.error.reason or "") if reply.has_error() else None


class RunRecorder:
    """Collects what each round did and writes ``out-dir``'s files.

    Parameters
    ----------
    cfg
        The run configuration (recorded in ``metrics.json``).
    test
        Held-out set for centralised evaluation.
    out
        Run folder: ``metrics.json``, ``privacy_ledger.json`` (what the sites reported of their
        privacy spend, per round), ``global_model.pt``, ``checkpoints/round-NNN.pt``, ``training.png``.
    initial
        Provenance of the initial global model; its round-0 evaluation is added here.
    val
        The validation split (choices are made on it): ``val_auc_macro`` per round.
    """

    def __init__(self, cfg: RunConfig, test: ImageSet, out: Path, *, initial: dict[str, Any] | None = None,
                 val: ImageSet | None = None) -> None:
        self.cfg, self.test, self.out, self.val = cfg, test, Path(out), val
        self.initial: dict[str, Any] = dict(initial or {})
        self.arch = cfg.arch()
        self.rounds: list[dict[str, Any]] = []
        self.sites: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, Any] = {}
        self._reports: list[dict[str, Any]] = []
        self.privacy_reports: list[dict[str, Any]] = []
        self._refusals: dict[str, dict[int, str]] = {}  # round → node id → rule
        self._start = time.perf_counter()
        self._mark = self._start  # end of the last round's record (round 0: the initial evaluation)
        self._secagg: dict[str, Any] = {}
        self.final: dict[str, Any] = {}
        self.central: CentralDP | None = None  # set by the ServerApp when central DP is on

    # -- Flower callbacks (legacy strategy hooks) -------------------------------------------
    def on_reply(self, reply: Message) -> None:
        """Note a site's refusal (an error reply naming a policy rule) under its round."""
        rule = refusal_rule(reply)
        if rule is not None:
            self._refusals.setdefault(reply.metadata.group_id, {})[reply.metadata.src_node_id] = rule

    def note_secagg(self, server_round: int, plan: SecAggPlan, stages: dict[SecAggStage, float]) -> None:
        """Keep a SecAgg+ round's plan and stage seconds for that round's record."""
        self._secagg = {"secagg_shares": plan.shares, "secagg_threshold": plan.threshold,
                        "secagg_stage_seconds": {str(k): v for k, v in stages.items()}}

    def aggregate_fit_metrics(self, results: Sequence[tuple[int, Metrics]]) -> Metrics:
        """Reduce the clients' fit metrics (the allow-list: ε, δ, σ, steps); remember per-site ε."""
        per_site = (FitMetric.EPSILON, FitMetric.DELTA, FitMetric.NOISE_MULTIPLIER)  # kept per site for the record
        reported = (*per_site, FitMetric.STEPS)
        self._reports = [{"site": str(m.get(FitMetric.SITE, "?")),
                          **{str(k): float(m[k]) for k in reported if k in m}}
                         for _, m in results]
        for _, m in results:
            entry = self.sites.setdefault(str(m.get(FitMetric.SITE, "?")), {})
            for key in per_site:
                if key in m:
                    entry[str(key)] = float(m[key])
        eps = [float(m[FitMetric.EPSILON]) for _, m in results if FitMetric.EPSILON in m]
        self._pending = {"sites_contributed": sum(1 for n, _ in results if n > 0),
                         "epsilon_max": max(eps) if eps else 0.0}
        out: dict[str, Scalar] = {k: v for k, v in self._pending.items()}
        return out

    def evaluate(self, server_round: int, parameters: NDArrays, config: dict[str, Scalar]
                 ) -> tuple[float, dict[str, Scalar]]:
        """Centralised evaluation of the global model; checkpoint it; write the record.

        A round's row has ``fit_seconds`` (from the end of the previous round's record to
        this evaluation: sampling, SecAgg+, local training, aggregation) and
        ``round_seconds`` (that plus evaluation and checkpoint; the record's files are written
        after it and count in the next round).
        """
        fit_seconds = time.perf_counter() - self._mark
        model = build_model(self.arch)
        set_weights(model, parameters)
        probs = predict_proba(model, self.test.images)
        labels = self.test.labels.numpy()
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
        metrics = classification_metrics(probs, labels, self.test.classes)
        val: dict[str, float] = {}
        if self.val is not None:
            val_probs = predict_proba(model, self.val.images)
            val = {"val_auc_macro": classification_metrics(val_probs, self.val.labels.numpy(),
                                                           self.val.classes).auc_macro}
        if server_round == 0:
            self.initial.update(auc_macro=metrics.auc_macro, auc_per_class=metrics.auc_per_class, loss=loss,
                                **val)
            log.info("round 0 (initial model, %s): AUC %.3f", self.initial.get("source"), metrics.auc_macro)
            self._mark = time.perf_counter()
        else:
            aggregated: dict[str, Any] = {"aggregated": True, **self._pending} if self._pending else {
                "aggregated": False, "sites_contributed": 0}
            refusals = self._refusals.pop(str(server_round), {})
            aggregated["sites_refused"] = len(refusals)
            if refusals:
                rules = dict(sorted(Counter(refusals.values()).items()))
                aggregated["refusals"] = rules
                log.warning("round %d: %d sites refused (%s)", server_round, len(refusals),
                            ", ".join(f"{k} ×{v}" for k, v in rules.items()))
            central = dict(self.central.last) if self.central is not None else {}
            row: dict[str, Any] = {"round": server_round, "auc_macro": metrics.auc_macro, "loss": loss,
                   "accuracy": metrics.accuracy, **val, **aggregated, **central, **self._secagg,
                   "seconds": time.perf_counter() - self._start, "fit_seconds": fit_seconds}
            self.rounds.append(row)
            self.privacy_reports += [{"round": server_round, **r} for r in self._reports]
            self._pending, self._reports, self._secagg = {}, [], {}
            sha = save_checkpoint(self.out / "checkpoints" / f"round-{server_round:03d}.pt", model,
                                  meta=self._meta(metrics, server_round))
            row["checkpoint_sha256"] = sha
            self.final = {"model": model, "metrics": metrics}
            now = time.perf_counter()
            row["round_seconds"], self._mark = now - self._mark, now  # this round's files count in the next
            self.write()
            log.info("round %d: AUC %.3f, loss %.3f, eps_max %.2f", server_round, metrics.auc_macro, loss,
                     row.get("epsilon_max", 0.0))
        return loss, {"auc_macro": metrics.auc_macro, "accuracy": metrics.accuracy}

    # -- outputs ------------------------------------------------------------------------------
    def _meta(self, metrics: ClassificationMetrics, server_round: int) -> dict[str, Any]:
        return {
            "classes": list(self.test.classes),
            "preprocess": dataclasses.asdict(Preprocess(size=self.cfg.image_size)),
            "test_sha256": self.test.digest(),
            "training": {"mode": "federated", "round": server_round, **self.cfg.to_flower()},
            "metrics": metrics.to_dict(),
            "privacy": self._privacy(),
        }

    def _privacy(self) -> dict[str, Any]:
        """The privacy the model was trained under: ε spent, max over the sites that reported it, at δ."""
        if not self.cfg.dp:
            return {"dp": False}
        spent = [float(e["epsilon"]) for e in self.sites.values() if e.get("epsilon") is not None]
        deltas = [float(e["delta"]) for e in self.sites.values() if e.get("delta") is not None]
        return {"dp": True, "epsilon_max": max(spent) if spent else None, "delta": max(deltas) if deltas else None}

    def summary(self) -> dict[str, Any]:
        """The content of ``metrics.json``."""
        final: dict[str, Any] = {}
        if self.final:
            m: ClassificationMetrics = self.final["metrics"]
            final = {
                "auc_macro": m.auc_macro, "auc_per_class": m.auc_per_class,
                "auprc_per_class": m.auprc_per_class, "accuracy": m.accuracy,
                "epsilon": {s: e.get("epsilon", 0.0) for s, e in sorted(self.sites.items())},
                "delta": {s: e.get("delta") for s, e in sorted(self.sites.items())},
                "secagg": self.cfg.secagg, "dp": self.cfg.dp,
                "central_dp": self.central.describe() if self.central is not None else None,
                "rounds_completed": len(self.rounds),
                **({"val_auc_macro": self.rounds[-1]["val_auc_macro"]} if self.rounds and self.val is not None
                   else {}),
            }
        return {"initial": self.initial, "rounds": self.rounds, "final": final, "sites": self.sites,
                "config": self.cfg.to_flower(),
                "seconds": time.perf_counter() - self._start}

    def write(self) -> None:
        """Write ``metrics.json``, ``global_model.pt`` and ``training.png`` (atomically)."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "metrics.json", self.summary())
        atomic_write_json(self.out / "privacy_ledger.json", {
            "about": "ε (at δ) each site reported after each round; every site's own ledger, which it "
                     "checks before it trains, stays at the site (its policy's ledger-dir; DATA/ledgers/ by "
                     "default in a simulation)",
            "dp": self.cfg.dp, "epsilon_budget": self.cfg.epsilon_budget,
            "sites": {s: e for s, e in sorted(self.sites.items())}, "reports": self.privacy_reports,
            "central_dp": self.central.describe() if self.central is not None else None})
        if self.final:
            save_checkpoint(self.out / "global_model.pt", self.final["model"],
                            meta=self._meta(self.final["metrics"], len(self.rounds)))
        if self.rounds:
            plot_rounds(self.rounds, self.out / "training.png", title=self._title(),
                        initial_auc=self.initial.get("auc_macro"))

    def _title(self) -> str:
        parts = ["DP-SGD" if self.cfg.dp else "no DP", "SecAgg+" if self.cfg.secagg else "no SecAgg"]
        if self.cfg.central_dp:
            parts.append("central DP")
        return f"federated {self.cfg.strategy} ({', '.join(parts)})"
