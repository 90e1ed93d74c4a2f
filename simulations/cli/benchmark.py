"""``privrad benchmark ...``: benchmarks that print figures and write tables and plots (not tests)."""

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from federation.console import console, out_console, progress_bar
from federation.errors import ConfigError
from simulations.fl_benchmark import BenchConfig, Cell, cells, run_benchmark
from simulations.scaling import Mode, ScalingConfig, ScalingSummary, run_scaling

__all__ = ["benchmark_app"]

benchmark_app = typer.Typer(help="Benchmarks: figures, tables and plots measured on this machine (resumable): "
                            "`federated` (what federation, DP and SecAgg+ give and cost), `scaling` (sites).",
                            no_args_is_help=True)


def _run_overrides(items: list[str]) -> tuple[tuple[str, Any], ...]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: use KEY=VALUE with a run-config key, e.g. num-server-rounds=5")
        out[key.strip()] = value.strip()
    return tuple(sorted(out.items()))


@benchmark_app.command()
def federated(
    data: Annotated[Path, typer.Option(help="Federation folder (site-K/, public/, val/, test/), e.g. from "
                                            "`privrad phantoms` with the Asan-scale settings of docs/federated-"
                                            "training.md.")],
    out: Annotated[Path, typer.Option(help="Benchmark folder (resumed if it holds the same settings).")],
    epsilons: Annotated[str, typer.Option(help="Target ε per site of the DP-SGD + SecAgg+ rows, comma separated.")
                        ] = "1,2,4,8",
    seeds: Annotated[int, typer.Option(help="Seeds per row.")] = 3,
    central_epochs: Annotated[int, typer.Option(help="Epochs of the centralised (pooled, non-private) row.")] = 20,
    scratch: Annotated[bool, typer.Option(help="Add DP-SGD + SecAgg+ from random weights at the largest ε.")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a default of the run configuration "
                                                                 "(KEY=VALUE, repeatable), e.g. "
                                                                 "--set num-server-rounds=5.")] = None,
    rows: Annotated[str, typer.Option(help="Run only these rows (comma-separated keys, e.g. scratch-eps-8; the "
                                           "public start comes along when a row starts from it). Default: all.")
                    ] = "",
) -> None:
    """Public start, local only, FedAvg, DP-SGD + SecAgg+ per ε, from scratch, centralised: AUC, time, memory."""
    try:
        eps = tuple(float(e) for e in epsilons.split(","))
    except ValueError:
        raise ConfigError(f"--epsilons: {epsilons!r} is not a comma-separated list of numbers") from None
    cfg = BenchConfig(data=str(data), out=str(out), epsilons=eps, seeds=seeds, central_epochs=central_epochs,
                      scratch=scratch, run=_run_overrides(set_ or []),
                      only=tuple(r.strip() for r in rows.split(",") if r.strip()))
    start = time.perf_counter()
    with progress_bar("info") as bar:
        task = bar.add_task("federated benchmark", total=len(cells(cfg)), info="")
        done = sum(1 for c in cells(cfg) if (c.folder(cfg) / "result.json").is_file())
        bar.update(task, completed=done)

        def on_cell(cell: Cell, result: dict[str, Any] | None) -> None:
            if result is None:
                bar.update(task, info=f"running {cell.row} seed {cell.seed}")
            else:
                bar.update(task, advance=1, info=f"{cell.row} seed {cell.seed}: AUC {result['auc_macro']:.3f} "
                                                 f"in {result['seconds']:.0f} s")

        summary = run_benchmark(cfg, on_cell=on_cell)
    table = Table(title=f"federated benchmark: {data}")
    for col in ("row", "test macro-AUC", "ε max", "wall time s", "peak GB", "seeds"):
        table.add_column(col)
    for r in summary["rows"]:
        auc, sec, mem = r["auc_macro"], r.get("seconds"), r.get("peak_rss_mb")
        table.add_row(r["label"], f"{auc['mean']:.3f} ± {auc['std']:.3f}",
                      "–" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.2f}",
                      "–" if sec is None else f"{sec['mean']:.0f}",
                      "–" if mem is None else f"{mem['mean'] / 1024:.1f}", str(len(r["seeds"])))
    out_console.print(table)
    for key, ratio in summary["wall_time_vs_fedavg"].items():
        out_console.print(f"{key}: wall time {ratio:.2f}× plain FedAvg")
    out_console.print(f"wall time {time.perf_counter() - start:.0f} s; wrote {out}/benchmark.json, benchmark.md, "
                      "benchmark.png")


@benchmark_app.command("scaling")
def benchmark_scaling(
    out: Annotated[Path, typer.Option(help="Benchmark folder (rerun to resume): scaling.json, .md, .png.")],
    sites: Annotated[str, typer.Option(help="Numbers of sites, comma separated.")] = "20,50,100,200",
    rounds: Annotated[int, typer.Option(help="Federated rounds per run.")] = 3,
    per_site: Annotated[int, typer.Option(help="Phantom training slices per site.")] = 40,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    baseline: Annotated[bool, typer.Option(help="Also run plain DP-SGD FedAvg (SecAgg+'s share).")] = True,
    secagg_num_shares: Annotated[float, typer.Option(help="SecAgg+ shares: 0 = the logarithmic rule, "
                                                          "1.0 = all-to-all, above 1 a count.")] = 0.0,
    data: Annotated[Path | None, typer.Option(help="Reuse this phantom federation (default: OUT/data).")] = None,
    point_timeout: Annotated[float, typer.Option(help="Seconds one run may take.")] = 7200.0,
) -> None:
    """DP-SGD + SecAgg+ on the Simulation Engine at growing numbers of sites: time per round, memory, SecAgg+'s share.

    Every run is a fresh process; finished runs are kept and skipped on a rerun.
    """
    try:
        counts = tuple(int(v) for v in sites.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--sites must be comma-separated integers, got {sites!r}") from None
    cfg = ScalingConfig(out=out, sites=counts, rounds=rounds, per_site=per_site, size=size, baseline=baseline,
                        secagg_num_shares=secagg_num_shares, data=data, point_timeout=point_timeout)
    summary = run_scaling(cfg, progress=lambda msg: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}"))
    _print_scaling(summary)


def _print_scaling(summary: ScalingSummary) -> None:
    table = Table("sites", "shares", "wall s", "round 1 s", "later rounds s", "plain s", "SecAgg+ share",
                  "peak RSS MB", title="scaling")
    for n in sorted({p.sites for p in summary.points}):
        s, b = summary.point(n, Mode.SECAGG), summary.point(n, Mode.PLAIN)
        if s is None:
            continue
        share = f"{1 - b.steady_round_seconds / s.steady_round_seconds:.0%}" if b is not None else "–"
        table.add_row(str(n), f"{s.shares}/{s.threshold}", f"{s.wall_seconds:.0f}", f"{s.round_seconds[0]:.1f}",
                      f"{s.steady_round_seconds:.1f}", f"{b.steady_round_seconds:.1f}" if b else "–", share,
                      f"{s.peak_rss_mb:.0f}")
    out_console.print(table)
    if summary.exponent is not None:
        out_console.print(f"later-round time grows as sites^{summary.exponent:.2f} (1 = linear)")
    out_console.print(f"{summary.markdown_path}, {summary.json_path}, {summary.plot_path}")
