"""``privrad benchmark federated``: what federation, DP-SGD and SecAgg+ each give and cost, on one federation.

Rows (each over ``seeds`` seeds, mean ± sd of the test macro-AUC, wall time, peak memory
of the whole process tree):

==================  ==========================================================================
``public``          the public-pretrained start every other row (but two) begins from
``local``           each site alone with DP-SGD at the largest ε, mean over the sites
``fedavg``          federated, no DP, no SecAgg+ (plain FedAvg): the wall-time baseline
``dp-eps-E``        federated DP-SGD + SecAgg+ at target ε = E per site
``scratch-eps-E``   the same at the largest ε, from random weights (no public start)
``central``         every site's records pooled, non-private, from random weights
==================  ==========================================================================

Every federated row runs on Flower's Simulation Engine with the project's default run
configuration (:class:`~federation.config.RunConfig`, chosen on the validation split) and
its virtual hospitals' policy (budget = the row's ε, SecAgg+ and DP required where the row
uses them, a ledger folder of the cell's own). Each cell runs in a fresh process (Ray and
Opacus keep process-wide state) and writes ``cells/ROW/seed-S/result.json`` last, so an
interrupted benchmark resumes where it stopped. Outputs: ``benchmark.json``,
``benchmark.md`` (the table) and ``benchmark.png``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.server.strategy import FedAvg

from aggregator.initial import initial_model, save_initial_model
from federation.config import RunConfig
from federation.errors import ConfigError, DataError, PrivradError
from federation.ingest import Preprocess, load_dataset, site_folders
from federation.metrics import seed_stats
from federation.plots import plot_fl_benchmark
from federation.storage import atomic_write_bytes, atomic_write_json
from federation.train import TrainConfig, evaluate
from privacy.policy import SitePolicy
from simulations.centralised import train_centralised
from simulations.federated import TreeMemorySampler, fresh_process_env, run_federated
from simulations.local import run_local

__all__ = ["BenchConfig", "Cell", "cells", "run_benchmark", "run_cell", "run_order", "summarise"]

log = logging.getLogger(__name__)

BENCH_FORMAT = "privrad-fl-benchmark/1"


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark; recorded in ``bench.json`` (a resumed benchmark must match it).

    ``run`` overrides the default run configuration of the federated and local rows (flat
    run-config keys, e.g. ``{"num-server-rounds": 5}``); ``central_epochs`` is the
    centralised row's number of epochs. ``only`` (row keys) runs a subset of the rows, with the
    public start added when a chosen row starts from it.
    """

    data: str
    out: str
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    seeds: int = 3
    central_epochs: int = 20
    scratch: bool = True
    run: tuple[tuple[str, Any], ...] = ()
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.epsilons or any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ConfigError(f"--epsilons must be positive and finite, got {self.epsilons}")
        if len(set(self.epsilons)) != len(self.epsilons):
            raise ConfigError(f"--epsilons has a repeated value: {self.epsilons}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        if self.central_epochs < 1:
            raise ConfigError(f"--central-epochs must be at least 1, got {self.central_epochs}")
        RunConfig.from_flower(dict(self.run))  # unknown keys or bad values fail here, before any work
        known = [k for k, _ in all_rows(self)]
        unknown = [k for k in self.only if k not in known]
        if unknown:
            raise ConfigError(f"--rows: unknown row {unknown[0]!r}; the rows are {', '.join(known)}")

    @property
    def folder(self) -> Path:
        """The benchmark's output folder."""
        return Path(self.out)

    def base(self, seed: int, out: Path) -> RunConfig:
        """The run configuration of a federated or local cell of ``seed``, writing to ``out``."""
        return RunConfig.from_flower({**dict(self.run), "data-dir": self.data, "out-dir": str(out), "seed": seed})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = {"format": BENCH_FORMAT, "data": self.data, "epsilons": list(self.epsilons), "seeds": self.seeds,
               "central_epochs": self.central_epochs, "scratch": self.scratch, "run": dict(self.run)}
        if self.only:  # only when set: a benchmark of every row resumes from a bench.json written before it
            out["only"] = list(self.only)
        return out


@dataclass(frozen=True)
class Cell:
    """One row of the table for one seed."""

    row: str
    seed: int

    def folder(self, cfg: BenchConfig) -> Path:
        """``OUT/cells/ROW/seed-S``."""
        return cfg.folder / "cells" / self.row / f"seed-{self.seed}"


def _eps(e: float) -> str:
    return f"{e:g}"


FROM_PUBLIC = ("local", "fedavg", "dp-eps-")
"""Rows (key prefixes) that start from the public start's model."""


def rows(cfg: BenchConfig) -> list[tuple[str, str]]:
    """``(row key, label)`` in table order: those of :func:`all_rows` that ``cfg.only`` keeps."""
    keep = set(cfg.only)
    if any(k.startswith(FROM_PUBLIC) for k in keep):
        keep.add("public")
    return [(k, label) for k, label in all_rows(cfg) if not keep or k in keep]


def all_rows(cfg: BenchConfig) -> list[tuple[str, str]]:
    """Every ``(row key, label)`` of the benchmark, in table order."""
    top = _eps(max(cfg.epsilons))
    out = [("public", "public start (no site data)"),
           ("local", f"local only, DP-SGD ε = {top} (mean over sites)"),
           ("fedavg", "FedAvg, no DP, no SecAgg+")]
    out += [(f"dp-eps-{_eps(e)}", f"DP-SGD + SecAgg+, ε = {_eps(e)}") for e in sorted(cfg.epsilons)]
    if cfg.scratch:
        out.append((f"scratch-eps-{top}", f"DP-SGD + SecAgg+, ε = {top}, from scratch"))
    out.append(("central", "centralised, non-private (from scratch)"))
    return out


def run_order(cfg: BenchConfig) -> list[str]:
    """The rows in the order each seed runs them.

    The public start first (the others start from it), then the rows the headline figures compare
    (centralised, FedAvg, the largest ε, local only, from scratch), then the other ε from the largest down.
    """
    top = f"dp-eps-{_eps(max(cfg.epsilons))}"
    kept = [k for k, _ in rows(cfg)]
    first = ["public", "central", "fedavg", top, "local"] + [k for k in kept if k.startswith("scratch-")]
    rest = sorted((k for k in kept if k.startswith("dp-eps-") and k != top),
                  key=lambda k: -float(k.removeprefix("dp-eps-")))
    return [k for k in first + rest if k in kept]


def cells(cfg: BenchConfig) -> list[Cell]:
    """Every cell, seed-major (a partial benchmark already covers every row), in :func:`run_order`."""
    return [Cell(row, seed) for seed in range(cfg.seeds) for row in run_order(cfg)]


def _init_path(cfg: BenchConfig, seed: int) -> Path:
    return cfg.folder / "cells" / "public" / f"seed-{seed}" / "model.pt"


def _policy(folder: Path, *, epsilon: float, dp: bool, secagg: bool) -> SitePolicy:
    return SitePolicy(dp_required=dp, secagg_required=secagg, epsilon_budget=epsilon, delta=1e-5,
                      ledger_dir=str(folder / "ledgers"))


def incomplete_rounds(rounds: list[dict[str, Any]], *, sites: int, timeout: float) -> None:
    """Refuse a federated cell in which a round did not aggregate the update of every site it sampled (``sites``).

    Such a cell measured another training than its row names (fewer rounds, or fewer sites
    in a round), so it fails, and a rerun starts it over. It happens when the machine is
    too busy for SecAgg+'s stage timeout: the stage that timed out is named.

    Raises
    ------
    PrivradError
        The first such round, with its sites and its SecAgg+ stages' durations.
    """
    for r in rounds:
        if r.get("aggregated") and int(r.get("sites_contributed", 0)) == sites:
            continue
        stages = r.get("secagg_stage_seconds") or {}
        slow = [name for name, sec in stages.items() if sec >= timeout * 0.99]
        why = (f"SecAgg+ stage {slow[0]!r} reached its timeout of {timeout:g} s (a busy machine? raise "
               f"secagg-timeout)") if slow else "see the cell's log"
        raise PrivradError(f"round {r['round']} aggregated {int(r.get('sites_contributed', 0))} of {sites} sites "
                           f"({why}); the cell does not count")


def _federated(cfg: BenchConfig, cell: Cell, folder: Path, *, epsilon: float | None, scratch: bool = False
               ) -> dict[str, Any]:
    base = cfg.base(cell.seed, folder / "run")
    dp = epsilon is not None
    run = dataclasses.replace(
        base, dp=dp, secagg=dp, initial_model="" if scratch else str(_init_path(cfg, cell.seed)),
        pretrain_epochs=0, target_epsilon=epsilon or 0.0, epsilon_budget=epsilon or base.epsilon_budget,
        delta=1e-5 if dp else 0.0)
    policy = _policy(folder, epsilon=epsilon or base.epsilon_budget, dp=dp, secagg=dp)
    result = run_federated(run, policies=policy)
    sites = len(site_folders(Path(cfg.data)))
    sampler = FedAvg(fraction_fit=run.fraction_fit, min_fit_clients=run.min_clients)  # the run's sampling rule
    sampled = min(sites, sampler.num_fit_clients(sites)[0])
    incomplete_rounds(result.metrics["rounds"], sites=sampled, timeout=run.secagg_timeout)
    final = result.metrics["final"]
    eps = final.get("epsilon") or {}
    return {"auc_macro": final["auc_macro"], "val_auc_macro": final.get("val_auc_macro"),
            "epsilon_max": max(eps.values()) if dp and eps else None, "rounds": len(result.metrics["rounds"]),
            "seconds": result.seconds, "peak_rss_mb": result.peak_rss_mb}


def run_cell(cfg: BenchConfig, cell: Cell) -> dict[str, Any]:
    """Run one cell in this process and return its record (``result.json``'s content)."""
    folder = cell.folder(cfg)
    start = time.perf_counter()
    top = max(cfg.epsilons)
    with TreeMemorySampler() as sampler:
        if cell.row == "public":
            init = initial_model(dataclasses.replace(cfg.base(cell.seed, folder), initial_model=""))
            pre = Preprocess(size=init.model.config.input_size)
            test = load_dataset(Path(cfg.data) / "test", preprocess=pre)
            val = load_dataset(Path(cfg.data) / "val", classes=test.classes, preprocess=pre)
            metrics = save_initial_model(init, _init_path(cfg, cell.seed), test)
            record: dict[str, Any] = {"auc_macro": metrics.auc_macro,
                                      "val_auc_macro": evaluate(init.model, val).auc_macro,
                                      "source": str(init.kind)}
        elif cell.row == "local":
            run = dataclasses.replace(cfg.base(cell.seed, folder / "run"),
                                      initial_model=str(_init_path(cfg, cell.seed)), pretrain_epochs=0, dp=True,
                                      target_epsilon=top, epsilon_budget=top, delta=1e-5)
            summary = run_local(run)
            record = {"auc_macro": summary["mean_auc_macro"],
                      "sites": {k: v["auc_macro"] for k, v in summary["sites"].items()},
                      "epsilon_max": max(v["epsilon"] for v in summary["sites"].values())}
        elif cell.row == "fedavg":
            record = _federated(cfg, cell, folder, epsilon=None)
        elif cell.row.startswith("dp-eps-"):
            record = _federated(cfg, cell, folder, epsilon=float(cell.row.removeprefix("dp-eps-")))
        elif cell.row.startswith("scratch-eps-"):
            record = _federated(cfg, cell, folder, epsilon=float(cell.row.removeprefix("scratch-eps-")), scratch=True)
        elif cell.row == "central":
            base = cfg.base(cell.seed, folder)
            result = train_centralised(Path(cfg.data), test=Path(cfg.data) / "test", val=Path(cfg.data) / "val",
                                       out=folder / "run", arch=base.arch(),
                                       train=TrainConfig(epochs=cfg.central_epochs, batch_size=base.batch_size,
                                                         lr=3e-3, augment=base.augment, seed=cell.seed))
            record = {"auc_macro": result.metrics.auc_macro, "val_auc_macro": result.val_auc_macro}
        else:
            raise ConfigError(f"unknown benchmark row {cell.row!r}")
    record.setdefault("seconds", time.perf_counter() - start)
    record["peak_rss_mb"] = max(float(record.get("peak_rss_mb", 0.0)), sampler.peak_mb)
    return {"row": cell.row, "seed": cell.seed, **record}


def _check_data(data: Path) -> None:
    if not site_folders(data):
        raise DataError(data, "has no site-K folders (make a federation with `privrad phantoms`)")
    for part in ("test", "val"):
        if not (data / part / "labels.csv").is_file():
            raise DataError(data / part, "is missing: the benchmark reports on test/ and needs val/ for the record")
    if not (data / "public" / "labels.csv").is_file():
        raise DataError(data / "public", "is missing: the public start is pretrained on it")


def summarise(cfg: BenchConfig) -> dict[str, Any]:
    """Aggregate the finished cells; write ``benchmark.json``, ``benchmark.md`` and ``benchmark.png``."""
    table = []
    for key, label in rows(cfg):
        results = [json.loads(p.read_text()) for p in sorted((cfg.folder / "cells" / key).glob("seed-*/result.json"))]
        if not results:
            continue
        entry: dict[str, Any] = {"row": key, "label": label, "seeds": [r["seed"] for r in results]}
        for field in ("auc_macro", "val_auc_macro", "seconds", "peak_rss_mb"):
            values = [float(r[field]) for r in results if r.get(field) is not None]
            if values:
                entry[field] = seed_stats(values)
        eps = [r["epsilon_max"] for r in results if r.get("epsilon_max") is not None]
        if eps:
            entry["epsilon_max"] = max(eps)
        table.append(entry)
    by = {e["row"]: e for e in table}
    ratios: dict[str, float] = {}
    if "fedavg" in by:
        for e in table:
            if e["row"].startswith("dp-eps-") and "seconds" in e:
                ratios[e["row"]] = e["seconds"]["mean"] / by["fedavg"]["seconds"]["mean"]
    base = cfg.base(0, cfg.folder)
    settings = {"num_server_rounds": base.num_server_rounds, "local_epochs": base.local_epochs,
                "batch_size": base.batch_size, "optimizer": base.optimizer, "learning_rate": base.learning_rate,
                "lr_schedule": base.lr_schedule, "max_grad_norm": base.max_grad_norm, "delta": 1e-5,
                "central_epochs": cfg.central_epochs,
                "model": _model_text(base)}
    summary = {**cfg.to_dict(), "settings": settings, "rows": table, "wall_time_vs_fedavg": ratios}
    atomic_write_json(cfg.folder / "benchmark.json", summary)
    atomic_write_bytes(cfg.folder / "benchmark.md", markdown(summary).encode())
    if table:
        plot_fl_benchmark(summary, cfg.folder / "benchmark.png")
    return summary


def _model_text(run: RunConfig) -> str:
    """The architecture in words, e.g. ``Approx-CNN, channels 16-32-64`` or ``scattering J = 2, L = 8 + linear``."""
    arch = run.arch()
    stages = "-".join(str(c) for c in arch.channels)
    if arch.scatter:
        front = f"scattering J = {arch.scatter}, L = {arch.scatter_angles} (log, per-image standardised)"
        return f"{front} + " + (f"Approx-CNN, channels {stages}" if stages else "linear classifier")
    return f"Approx-CNN, channels {stages}, act-init {run.act_init}, conv-gain {run.conv_gain:g}"


def _pm(stats: dict[str, Any] | None, fmt: str, scale: float = 1.0) -> str:
    if stats is None:
        return "–"
    mean, std = stats["mean"] / scale, stats["std"] / scale
    return f"{mean:{fmt}} ± {std:{fmt}}" if stats["n"] > 1 else f"{mean:{fmt}}"


def markdown(summary: dict[str, Any]) -> str:
    """The table of ``summary`` as Markdown."""
    lines = ["| row | test macro-AUC | val macro-AUC | ε (max over sites) | wall time (s) | peak memory (GB) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for e in summary["rows"]:
        eps = e.get("epsilon_max")
        lines.append(f"| {e['label']} | {_pm(e.get('auc_macro'), '.3f')} | {_pm(e.get('val_auc_macro'), '.3f')} | "
                     f"{'–' if eps is None else f'{eps:.2f}'} | {_pm(e.get('seconds'), '.0f')} | "
                     f"{_pm(e.get('peak_rss_mb'), '.1f', 1024)} | {len(e['seeds'])} |")
    ratios = summary.get("wall_time_vs_fedavg") or {}
    if ratios:
        lines += ["", "Wall time of DP-SGD + SecAgg+ against plain FedAvg (same federation, same run): " + ", ".join(
            f"ε = {k.removeprefix('dp-eps-')}: {v:.2f}×" for k, v in ratios.items()) + "."]
    st = summary.get("settings")
    if st:  # what actually ran, defaults included, so a table cannot be read against settings it did not use
        epochs = f"{st['local_epochs']} local epoch" + "s" * (st["local_epochs"] != 1)
        lines += ["", f"Settings: {st['num_server_rounds']} rounds × {epochs} at batch "
                      f"{st['batch_size']}, {st['optimizer']} lr {st['learning_rate']:g}"
                      + (" with a cosine decay over the rounds" if st.get("lr_schedule") == "cosine" else "")
                      + f", clipping norm "
                      f"{st['max_grad_norm']:g}, δ = {st['delta']:g}; centralised: {st['central_epochs']} epochs."
                      + (f" Model: {st['model']}." if st.get("model") else "")]
    return "\n".join(lines) + "\n"


def _last_error(log: Path) -> str:
    """``: <the last privrad error line of the log>``, or nothing."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if "Error: " in line]
    return f": {lines[-1].strip()}" if lines else ""


def run_benchmark(cfg: BenchConfig, *, on_cell: Callable[[Cell, dict[str, Any] | None], None] | None = None
                  ) -> dict[str, Any]:
    """Run every unfinished cell (each in a fresh process), then :func:`summarise`.

    ``on_cell`` is called before a cell starts (record ``None``) and after it ends.

    Raises
    ------
    DataError
        The federation lacks a part, or ``OUT`` holds a benchmark with other settings.
    PrivradError
        A cell failed (its log is named).
    """
    data = Path(cfg.data)
    _check_data(data)
    cfg.folder.mkdir(parents=True, exist_ok=True)
    settings = cfg.folder / "bench.json"
    if settings.is_file():
        old = json.loads(settings.read_text())
        if old != cfg.to_dict():
            raise DataError(settings, f"holds a benchmark with other settings ({old}); use another --out")
    else:
        atomic_write_json(settings, cfg.to_dict())
    env = fresh_process_env()
    summary: dict[str, Any] | None = None
    for cell in cells(cfg):
        folder = cell.folder(cfg)
        if (folder / "result.json").is_file():
            continue
        if folder.exists():  # interrupted: its ledgers hold spent rounds, start the cell over
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        if on_cell is not None:
            on_cell(cell, None)
        with (folder / "cell.log").open("w") as logf:
            proc = subprocess.run([sys.executable, "-m", "simulations.fl_benchmark", str(settings), cell.row,
                                   str(cell.seed)], stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
        if proc.returncode != 0 or not (folder / "result.json").is_file():
            raise PrivradError(f"benchmark cell {cell.row} seed {cell.seed} failed (exit {proc.returncode})"
                               f"{_last_error(folder / 'cell.log')}; see {folder / 'cell.log'}")
        if on_cell is not None:
            on_cell(cell, json.loads((folder / "result.json").read_text()))
        summary = summarise(cfg)  # after every cell, so a stopped benchmark leaves its table
    return summary if summary is not None else summarise(cfg)


def load_config(settings: Path) -> BenchConfig:
    """The :class:`BenchConfig` recorded in ``bench.json`` (its folder is the output folder)."""
    d = json.loads(settings.read_text())
    if d.pop("format", None) != BENCH_FORMAT:
        raise DataError(settings, f"is not a {BENCH_FORMAT} file")
    return BenchConfig(data=d["data"], out=str(settings.parent), epsilons=tuple(float(e) for e in d["epsilons"]),
                       seeds=int(d["seeds"]), central_epochs=int(d["central_epochs"]), scratch=bool(d["scratch"]),
                       run=tuple(sorted(d["run"].items())), only=tuple(d.get("only", ())))


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.fl_benchmark BENCH.json ROW SEED``: one cell, in a process of its own."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m simulations.fl_benchmark BENCH.json ROW SEED", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(Path(args[0]))
    cell = Cell(args[1], int(args[2]))
    record = run_cell(cfg, cell)
    atomic_write_json(cell.folder(cfg) / "result.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
