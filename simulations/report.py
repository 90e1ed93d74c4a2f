"""``privrad report RUN``: one self-contained HTML page (PNG plots inlined) for a sweep or a federated run.

A sweep folder (``budget.json``) gives the settings, the utility and membership tables
versus ε, achieved ε per site, per-round curves of every point, the budget, audit-ROC
and gradient-inversion figures. A federated run folder (``metrics.json``) gives its
configuration, initial model, per-round table and curve and ε per site.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from federation.errors import DataError
from federation.plots import save_figure
from federation.storage import atomic_write_bytes

__all__ = ["render_report"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9em}code{background:#f5f5f5;padding:0 .2em}
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p class='note'>({html.escape(path.name)} not written yet)</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pm(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _kv(d: dict[str, Any]) -> str:
    return _table(["setting", "value"], ((k, v) for k, v in d.items()))


def _rounds_plot(run: Path, budget: dict[str, Any]) -> Path:
    """Per-round macro-AUC and ε of every point (one line per seed, one colour per ε)."""
    import matplotlib.pyplot as plt


    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
    cmap = plt.get_cmap("viridis")
    labels = [r["epsilon"] for r in budget["points"]]
    for i, eps in enumerate(labels):
        color = cmap(i / max(len(labels) - 1, 1))
        for j, f in enumerate(sorted((run / "points").glob(f"eps-{eps}-seed-*/point.json"))):
            p = json.loads(f.read_text())
            r = [0] + [row["round"] for row in p["rounds"]]
            auc = [p["initial_auc_macro"]] + [row["auc_macro"] for row in p["rounds"]]
            name = "∞ (no DP)" if eps == "inf" else eps
            ax.plot(r, auc, "-", color=color, alpha=0.8, label=f"ε = {name}" if j == 0 else None)
            if eps != "inf":
                bx.plot(r, [0.0] + [row["epsilon_max"] for row in p["rounds"]], "-", color=color, alpha=0.8,
                        label=f"target ε = {eps}" if j == 0 else None)
    ax.set(xlabel="round (0 = initial model)", ylabel="test macro-AUC", title="utility per round, every seed")
    bx.set(xlabel="round", ylabel="ε spent (max over sites)", title="privacy spent per round")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path = run / "rounds.png"
    save_figure(fig, path)
    return path


def _sweep_html(run: Path) -> str:
    budget = json.loads((run / "budget.json").read_text())
    audit = json.loads((run / "audit.json").read_text()) if (run / "audit.json").is_file() else {"points": []}
    cfg = budget["config"]
    parts = [f"<h1>privrad privacy-budget sweep: {html.escape(str(run))}</h1>",
             f"<p class='note'>{budget['points_finished']} of {budget['points_planned']} federated runs finished"
             f"{'' if budget['complete'] else ' (sweep incomplete: rerun the same command to resume)'}; "
             f"{budget['federated_seconds'] / 60:.1f} min of federated training. Metric: {budget['metric']}.</p>",
             "<h2>Settings</h2>", _kv(cfg)]
    split = run / "split.json"
    if split.is_file():
        counts = json.loads(split.read_text())
        parts += ["<p>Each site's records are split into training records and held-out records "
                  "(the membership audit's non-members):</p>",
                  _table(["site", "training", "held out"], ((s, c["train"], c["holdout"]) for s, c in counts.items()))]
    rows = []
    for r in budget["points"]:
        ach = r.get("epsilon_achieved")
        classes = r["auc_per_class"]
        rows.append([r["epsilon"], f"{ach['min']:.3f} – {ach['max']:.3f}" if ach else "–",
                     ", ".join(f"{s:.3f}" for s in r.get("noise_multiplier", [])) or "–",
                     ", ".join(f"{d:g}" for d in r.get("delta", [])) or "–", _pm(r["auc_macro"]),
                     *(_pm(classes[c]) for c in classes), len(r["seeds"])])
    classes = list(budget["points"][0]["auc_per_class"]) if budget["points"] else []
    parts += ["<h2>Utility versus ε</h2>",
              _table(["target ε", "achieved ε (sites)", "σ", "δ", "macro-AUC", *(f"AUC {c}" for c in classes),
                      "seeds"], rows),
              _table(["reference", "macro-AUC"],
                     ((k.replace("_", " "), _pm(v)) for k, v in budget["references"].items())),
              _img(run / "budget.png", "AUC and membership attack versus epsilon")]
    arows = []
    for r in audit["points"]:
        for name, a in r["attacks"].items():
            arows.append([r["epsilon"], name, _pm(a["auc"]), _pm(a["tpr_at_fpr"]["0.01"]),
                          _pm(a["tpr_at_fpr"]["0.1"]), _pm(a["advantage"]),
                          f"{r['dp_bound_tpr_at_fpr']['0.01']:.3f}"])
    central = audit.get("centralised_nonprivate", {})
    for name, a in central.items():
        arows.append(["centralised, no DP", name, _pm(a["auc"]), _pm(a["tpr_at_fpr"]["0.01"]),
                      _pm(a["tpr_at_fpr"]["0.1"]), "", "1.000"])
    if audit["points"]:
        first = audit["points"][0]
        parts += ["<h2>Membership inference</h2>",
                  f"<p>{html.escape(audit.get('about', ''))}: {first['members']} members, "
                  f"{first['nonmembers']} non-members. An attack that learns nothing has AUC 0.5 ± "
                  f"{first.get('chance_auc_sd', 0):.3f} (1 sd at these sizes).</p>",
                  _table(["target ε", "attack", "attack AUC", "TPR @ 1% FPR", "TPR @ 10% FPR", "advantage",
                          "DP bound on TPR @ 1% FPR"], arows),
                  "<p class='note'>" + "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}"
                                                   for k, v in audit.get("attacks", {}).items()) + "</p>",
                  _img(run / "audit.png", "membership attack ROC")]
    if budget["points"] and (run / "points").is_dir():
        parts += ["<h2>Per-round curves</h2>", _img(_rounds_plot(run, budget), "per-round curves")]
        eps_rows = []
        for f in sorted((run / "points").glob("*/point.json")):
            p = json.loads(f.read_text())
            if p["epsilon"]:
                eps_rows.append([f.parent.name, *(f"{v:.3f}" for v in p["epsilon"].values())])
        if eps_rows:
            sites = list(json.loads(next((run / "points").glob("eps-[0-9]*/point.json")).read_text())["epsilon"])
            parts += ["<p>ε spent per site (each site's own ledger):</p>", _table(["point", *sites], eps_rows)]
    inversion = run / "inversion.json"
    if inversion.is_file():
        inv = json.loads(inversion.read_text())
        rows_inv = [(b, k, v["about"], v["images_in_update"], f"{v['best_ssim']:.3f}", f"{v['population_ssim']:.3f}",
                     f"{v['best_psnr']:.1f}", f"{v['matching_loss']:.4f}")
                    for b, settings in inv["results"].items() for k, v in settings.items()]
        parts += ["<h2>Gradient inversion</h2>",
                  f"<p>{html.escape(inv['about'])} Model: <code>{html.escape(inv['model'])}</code>; "
                  f"attack <b>{html.escape(inv['attack']['method'])}</b>, {inv['attack']['iterations']} "
                  f"iterations × {inv['attack']['restarts']} restart(s). <i>Other patient SSIM</i> is the best "
                  "SSIM any held-out record reaches against the same true image: a reconstruction at or below "
                  "it reveals nothing specific to the record.</p>",
                  _table(["batch per site", "setting", "what the server holds", "images in update", "best SSIM",
                          "other patient SSIM", "PSNR (dB)", "matching loss"], rows_inv),
                  _img(run / "inversion.png", "gradient inversion panel")]
    return "".join(parts)


def _run_html(run: Path) -> str:
    m = json.loads((run / "metrics.json").read_text())
    final, init = m.get("final", {}), m.get("initial", {})
    parts = [f"<h1>privrad federated run: {html.escape(str(run))}</h1>",
             f"<p>final macro-AUC <b>{final.get('auc_macro', float('nan')):.3f}</b> after "
             f"{final.get('rounds_completed', 0)} rounds; DP-SGD {'on' if final.get('dp') else 'off'}, "
             f"SecAgg+ {'on' if final.get('secagg') else 'off'}; {m.get('seconds', 0):.0f} s.</p>",
             "<h2>Configuration</h2>", _kv(m.get("config", {})),
             "<h2>Initial model</h2>", _kv({k: v for k, v in init.items() if not isinstance(v, dict)}),
             "<h2>Rounds</h2>",
             _table(["round", "macro-AUC", "test loss", "max ε", "sites", "s"],
                    ((r["round"], f"{r['auc_macro']:.3f}", f"{r['loss']:.3f}", f"{r.get('epsilon_max', 0):.3f}",
                      r.get("sites_contributed", ""), f"{r['seconds']:.1f}") for r in m.get("rounds", []))),
             _img(run / "training.png", "training curve")]
    if final.get("epsilon"):
        parts += ["<h2>Privacy per site</h2>",
                  _table(["site", "ε", "δ", "σ"],
                         ((s, f"{v.get('epsilon', 0):.3f}", v.get("delta"), f"{v.get('noise_multiplier') or 0:.3f}")
                          for s, v in sorted(m.get("sites", {}).items())))]
    if final.get("auc_per_class"):
        parts += ["<h2>Per class</h2>",
                  _table(["class", "AUC", "AUPRC"],
                         ((c, f"{a:.3f}" if a is not None else "n/a",
                           f"{final['auprc_per_class'][c]:.3f}" if final["auprc_per_class"][c] is not None else "n/a")
                          for c, a in final["auc_per_class"].items()))]
    return "".join(parts)


def render_report(run: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``RUN/report.html``) for a sweep or federated run folder; return its path.

    Raises
    ------
    DataError
        ``run`` holds neither ``budget.json`` nor ``metrics.json``.
    """
    run = Path(run)
    if (run / "budget.json").is_file():
        body = _sweep_html(run)
    elif (run / "metrics.json").is_file():
        body = _run_html(run)
    else:
        raise DataError(run, "holds neither budget.json (a sweep) nor metrics.json (a federated run)")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>privrad report {html.escape(run.name)}"
            f"</title><style>{CSS}</style></head><body>{body}"
            f"<p class='note'>written by <code>privrad report</code> at {stamp}</p></body></html>")
    path = out or run / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
