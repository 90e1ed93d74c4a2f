"""Every figure privrad draws, each written atomically as PNG by :func:`save_figure`.

Training curves (AUC and ε per round), the privacy-budget sweep (utility and membership
leakage versus ε, attack ROC curves), gradient-inversion panels and the leakage panel of
protected storage. Inputs are plain records and tensors, so any layer may draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from federation.storage import atomic_write_bytes

__all__ = ["plot_audit_roc", "plot_budget", "plot_fl_benchmark", "plot_inversion", "plot_leakage", "plot_rounds",
           "plot_scaling", "save_figure"]

ATTACK_STYLE = {"loss": ("tab:orange", "o", "loss attack"), "calibrated": ("tab:red", "s", "calibrated attack")}


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _positions(labels: list[str]) -> tuple[list[float], list[str]]:
    """X positions on a log axis; ``inf`` is drawn one octave right of the largest finite ε."""
    finite = [float(e) for e in labels if e != "inf"]
    right = max(finite) * 2 if finite else 1.0
    xs = [right if e == "inf" else float(e) for e in labels]
    names = ["∞\n(no DP)" if e == "inf" else e for e in labels]
    return xs, names


def _eps_axis(ax: Axes, xs: list[float], names: list[str]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(xs, names)
    ax.minorticks_off()
    ax.set_xlabel("target ε per site")
    ax.grid(alpha=0.3)


def plot_budget(budget: dict[str, Any], audit: dict[str, Any], path: Path) -> None:
    """Three panels: macro-AUC versus ε (mean ± sd over seeds) with reference lines; attack AUC; TPR at 1% FPR."""
    rows = budget["points"]
    labels = [r["epsilon"] for r in rows]
    xs, names = _positions(labels)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=110)
    ax = axes[0]
    ax.errorbar(xs, [r["auc_macro"]["mean"] for r in rows], yerr=[r["auc_macro"]["std"] for r in rows],
                fmt="o-", capsize=4, color="tab:blue", label="federated DP-SGD + SecAgg+")
    refs = budget["references"]
    styles = {"federated_nonprivate": ("--", "tab:green", "federated, no DP"),
              "centralised": (":", "black", "centralised, no DP"),
              "initial_model": ("-.", "tab:gray", "initial (public-pretrained)")}
    for key, (ls, color, label) in styles.items():
        if key in refs:
            m, s = refs[key]["mean"], refs[key]["std"]
            ax.axhline(m, ls=ls, color=color, label=f"{label} {m:.3f}")
            if s > 0:
                ax.axhspan(m - s, m + s, color=color, alpha=0.08)
    ax.set_ylabel("test macro-AUC")
    n = max((r["auc_macro"]["n"] for r in rows), default=0)
    ax.set_title(f"utility (mean ± sd, {n} seed{'s' if n != 1 else ''})")
    _eps_axis(ax, xs, names)
    ax.legend(fontsize=8, loc="lower right")

    arows = {r["epsilon"]: r for r in audit["points"]}
    for panel, (key, title) in enumerate((("auc", "membership attack AUC"),
                                          ("tpr", "attack TPR at 1% FPR"))):
        ax = axes[panel + 1]
        for name, (color, marker, label) in ATTACK_STYLE.items():
            ys, es = [], []
            for e in labels:
                a = arows[e]["attacks"].get(name)
                stat = None if a is None else a["auc"] if key == "auc" else a["tpr_at_fpr"]["0.01"]
                y = stat["mean"] if stat else math.nan
                ys.append(max(y, 1e-3) if key == "tpr" else y)
                es.append(stat["std"] if stat else 0.0)
            ax.errorbar(xs, ys, yerr=es, fmt=f"{marker}-", capsize=4, color=color, label=label)
        central = audit.get("centralised_nonprivate", {}).get("calibrated")
        if key == "auc":
            ax.axhline(0.5, color="tab:gray", lw=1, label="chance")
            sd = audit["points"][0].get("chance_auc_sd")
            if sd:
                ax.axhspan(0.5 - 2 * sd, 0.5 + 2 * sd, color="tab:gray", alpha=0.15,
                           label="chance ± 2 sd (no leakage)")
            if central:
                ax.axhline(central["auc"]["mean"], ls=":", color="black",
                           label=f"centralised, no DP (calibrated) {central['auc']['mean']:.3f}")
            ax.set_ylabel("attack ROC AUC")
        else:
            ax.axhline(0.01, color="tab:gray", lw=1, label="chance (TPR = FPR)")
            bx = [x for x, e in zip(xs, labels, strict=True) if e != "inf"]
            by = [arows[e]["dp_bound_tpr_at_fpr"]["0.01"] for e in labels if e != "inf"]
            if bx:
                ax.plot(bx, by, "^--", color="tab:purple", label="DP bound e^ε·FPR + δ")
            ax.set_yscale("log")
            ax.set_ylim(5e-4, 1.5)
            ax.set_ylabel("TPR at FPR = 0.01 (0 drawn at 1e-3)")
        ax.set_title(title)
        _eps_axis(ax, xs, names)
        ax.legend(fontsize=8)
    fig.suptitle("privacy budget sweep: what each ε costs in accuracy and what it buys against membership inference",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_audit_roc(audit: dict[str, Any], path: Path) -> None:
    """Log-log ROC of the calibrated (else loss) attack per ε, first seed, with the diagonal."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=110)
    cmap = plt.get_cmap("viridis")
    rows = audit["points"]
    for i, row in enumerate(rows):
        attacks = row["attacks"]
        name = "calibrated" if "calibrated" in attacks else "loss"
        roc = attacks[name]["roc"][0]
        color = cmap(i / max(len(rows) - 1, 1))
        eps = "∞ (no DP)" if row["epsilon"] == "inf" else row["epsilon"]
        ax.plot(roc["fpr"], roc["tpr"], color=color, label=f"ε = {eps}: AUC {attacks[name]['auc']['values'][0]:.3f}")
    ax.plot([1e-4, 1], [1e-4, 1], color="tab:gray", lw=1, ls="--", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("membership attack ROC (calibrated, seed 0)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def plot_rounds(rounds: Sequence[dict[str, Any]], path: Path, *, title: str,
                initial_auc: float | None = None) -> None:
    """AUC and ε per round (round 0: the initial model), two axes."""
    r = [row["round"] for row in rounds]
    auc = [row["auc_macro"] for row in rounds]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    if initial_auc is not None:
        ax.plot(0, initial_auc, "D", color="tab:gray", label="initial model")
        ax.plot([0, r[0]], [initial_auc, auc[0]], ":", color="tab:blue")
    ax.plot(r, auc, "o-", color="tab:blue", label="test macro-AUC")
    ax.set_xlabel("round")
    ax.set_ylabel("macro-AUC", color="tab:blue")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    eps = [row.get("epsilon_max", 0.0) for row in rounds]
    central = [row.get("central_epsilon", 0.0) for row in rounds]
    if any(eps) or any(central):
        ax2 = ax.twinx()
        if any(eps):
            ax2.plot(r, eps, "s--", color="tab:red", label="max ε per site (DP-SGD, record level)")
        if any(central):
            ax2.plot(r, central, "^--", color="tab:purple", label="central ε (site level)")
        ax2.set_ylabel("ε spent", color="tab:red")
        ax2.legend(loc="lower right", fontsize=7)
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_inversion(panel: Sequence[tuple[str, torch.Tensor, torch.Tensor, float, float]], path: Path,
                   *, columns: int) -> None:
    """Pairs of rows (true image over the attacker's best reconstruction), ``columns`` settings per pair."""
    pairs = -(-len(panel) // columns)
    fig, axes = plt.subplots(2 * pairs, columns, figsize=(2.3 * columns, 2.8 * 2 * pairs), dpi=100,
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (name, truth, rec, ssim, psnr) in enumerate(panel):
        top, bottom = axes[2 * (i // columns)][i % columns], axes[2 * (i // columns) + 1][i % columns]
        top.imshow(truth.squeeze(0).numpy(), cmap="gray", vmin=0, vmax=1)
        top.set_title(f"{name}\ntrue image", fontsize=8)
        bottom.imshow(rec.squeeze(0).numpy(), cmap="gray", vmin=0, vmax=1)
        shown = "∞" if math.isinf(psnr) else f"{psnr:.1f}"
        bottom.set_title(f"reconstruction\nSSIM {ssim:.3f}, PSNR {shown} dB", fontsize=8)
    fig.suptitle("gradient inversion against what the server receives (best match per setting)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_leakage(examples: Sequence[dict[str, np.ndarray]], result: dict[str, Any], path: Path,
                 *, tiers: Sequence[str]) -> None:
    """One row per slice: the original and what an attacker holds under each storage tier."""
    cols = ["original", *tiers]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(2.2 * len(cols), 2.4 * len(examples)), dpi=100,
                             squeeze=False)
    for r, ex in enumerate(examples):
        for c, name in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(ex[name], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                tier = result["tiers"].get(name)
                extra = f"\nSSIM {tier['ssim']['mean']:.3f}, pHash {tier['phash']['mean']:.0f}" if tier else ""
                ax.set_title(f"{name}{extra}", fontsize=8)
    fig.suptitle(f"what an attacker holds, rendered as images (means over {result['slices']} slices)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_fl_benchmark(summary: dict[str, Any], path: Path) -> None:
    """Test macro-AUC (mean ± sd over seeds) of DP-SGD + SecAgg+ versus ε, with every other row as a reference line."""
    rows = {r["row"]: r for r in summary["rows"]}
    fig, ax = plt.subplots(figsize=(9.0, 4.0), dpi=110)
    dp = sorted((float(k.removeprefix("dp-eps-")), r) for k, r in rows.items() if k.startswith("dp-eps-"))
    if dp:
        xs = [e for e, _ in dp]
        means = [r["auc_macro"]["mean"] for _, r in dp]
        sds = [r["auc_macro"]["std"] for _, r in dp]
        ax.errorbar(xs, means, yerr=sds, fmt="o-", color="tab:blue", capsize=3, label="DP-SGD + SecAgg+ (public start)")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{e:g}" for e in xs])
        ax.minorticks_off()
    for key, r in rows.items():
        if key.startswith("scratch-eps-"):
            e = float(key.removeprefix("scratch-eps-"))
            ax.errorbar([e], [r["auc_macro"]["mean"]], yerr=[r["auc_macro"]["std"]], fmt="s", color="tab:purple",
                        capsize=3, label=f"DP-SGD + SecAgg+ from scratch (ε = {e:g}): {r['auc_macro']['mean']:.3f}")
            if not dp:
                ax.set_xticks([e], [f"{e:g}"])
    styles = {"central": ("tab:green", "-"), "fedavg": ("tab:orange", "--"), "local": ("tab:red", ":"),
              "public": ("tab:gray", "-.")}
    for key, (color, line) in styles.items():
        if key in rows:
            m = rows[key]["auc_macro"]
            ax.axhline(m["mean"], color=color, linestyle=line, label=f"{rows[key]['label']}: {m['mean']:.3f}")
            ax.axhspan(m["mean"] - m["std"], m["mean"] + m["std"], color=color, alpha=0.1)
    ax.set_xlabel("target ε per site (δ = 1e-5)")
    ax.set_ylabel("test macro-AUC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    seeds = max((len(r["seeds"]) for r in rows.values()), default=0)
    ax.set_title(f"Federated training on {summary['data']} ({seeds} seed{'s' if seeds != 1 else ''})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_scaling(series: Mapping[str, Sequence[tuple[int, float, float]]], path: Path, *, title: str) -> None:
    """Per-round time and peak memory against the number of sites, with linear references.

    ``series`` maps a label (``secagg``, ``plain``) to ``(sites, seconds per round, peak RSS
    MB)`` points; each panel's dotted line is linear growth through the first series'
    smallest point.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    styles = {"secagg": ("tab:blue", "o", "DP-SGD + SecAgg+"), "plain": ("tab:gray", "s", "DP-SGD, plain FedAvg")}
    for ax, column, label in ((axes[0], 1, "seconds per round (after the first)"), (axes[1], 2, "peak RSS (MB)")):
        reference: tuple[int, float] | None = None
        for name, points in series.items():
            if not points:
                continue
            color, marker, legend = styles.get(name, ("tab:green", "^", name))
            pts = sorted(points)
            ax.plot([p[0] for p in pts], [p[column] for p in pts], marker=marker, color=color, label=legend)
            if reference is None:
                reference = (pts[0][0], pts[0][column])
        if reference is not None:
            xs = sorted({p[0] for points in series.values() for p in points})
            ax.plot(xs, [reference[1] * x / reference[0] for x in xs], ":", color="black",
                    label=f"linear from {reference[0]} sites")
            top = max(p[column] for points in series.values() for p in points)
            ax.set_ylim(0, 1.15 * max(top, min(reference[1] * xs[-1] / reference[0], 2 * top)))
        ax.set_xlabel("sites")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
