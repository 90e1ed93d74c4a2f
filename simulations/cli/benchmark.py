"""``privrad benchmark ...``: benchmarks that print figures and write tables and plots (not tests)."""

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from federation.console import out_console, progress_bar
from federation.errors import ConfigError
from simulations.fl_benchmark import BenchConfig, Cell, cells, run_benchmark

__all__ = ["benchmark_app"]

benchmark_app = typer.Typer(help="Benchmarks: figures, tables and plots measured on this machine (resumable).",
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
) -> None:
    """Public start, local only, FedAvg, DP-SGD + SecAgg+ per ε, from scratch, centralised: AUC, time, memory."""
    try:
        eps = tuple(float(e) for e in epsilons.split(","))
    except ValueError:
        raise ConfigError(f"--epsilons: {epsilons!r} is not a comma-separated list of numbers") from None
    cfg = BenchConfig(data=str(data), out=str(out), epsilons=eps, seeds=seeds, central_epochs=central_epochs,
                      scratch=scratch, run=_run_overrides(set_ or []))
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
        table.add_row(r["label"], f"{auc['mean']:.3f} ± {auc['sd']:.3f}",
                      "–" if r.get("epsilon_max") is None else f"{r['epsilon_max']:.2f}",
                      "–" if sec is None else f"{sec['mean']:.0f}",
                      "–" if mem is None else f"{mem['mean'] / 1024:.1f}", str(len(r["seeds"])))
    out_console.print(table)
    for key, ratio in summary["wall_time_vs_fedavg"].items():
        out_console.print(f"{key}: wall time {ratio:.2f}× plain FedAvg")
    out_console.print(f"wall time {time.perf_counter() - start:.0f} s; wrote {out}/benchmark.json, benchmark.md, "
                      "benchmark.png")
