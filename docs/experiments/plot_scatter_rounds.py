"""Macro-AUC by round of the benchmark's scattering scratch row (3 seeds): docs/figures/bench-fl-scatter/rounds.png.

``python docs/experiments/plot_scatter_rounds.py runs/bench-fl-scatter`` after ``make bench-fl``.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

bench = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench-fl-scatter")
fig, ax = plt.subplots(figsize=(7, 4))
for i, seed in enumerate(sorted((bench / "cells" / "scratch-eps-8").glob("seed-*"))):
    rounds = json.loads((seed / "run" / "metrics.json").read_text())["rounds"]
    r = [x["round"] for x in rounds]
    ax.plot(r, [x["auc_macro"] for x in rounds], color="tab:purple", alpha=0.8, label="test" if i == 0 else None)
    ax.plot(r, [x["val_auc_macro"] for x in rounds], color="tab:green", alpha=0.8, ls="--",
            label="val" if i == 0 else None)
ax.axhline(0.90, color="grey", lw=0.8, ls=":", label="target 0.90 (test)")
ax.axhline(0.761, color="tab:red", lw=0.8, ls=":", label="end-to-end Approx-CNN from scratch, 5 rounds (test)")
ax.set(xlabel="round (2 local epochs each)", ylabel="macro-AUC", ylim=(0.6, 1.0),
       )
ax.set_title("DP-SGD + SecAgg+ from scratch, ε = 8: scattering + linear, 5 sites, 3 seeds", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(Path("docs/figures/bench-fl-scatter/rounds.png"), dpi=120)
