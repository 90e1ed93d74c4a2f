"""How federated DP-SGD + SecAgg+ scales with the number of sites on Flower's Simulation Engine.

For each number of sites ``n`` the benchmark runs ``rounds`` rounds of DP-SGD inside
SecAgg+ and, as the baseline that isolates SecAgg+'s cost, the same rounds of plain
DP-SGD FedAvg, each in a fresh process (Ray and the DP engine keep process-wide state).
It records the wall time, every round's time (the ServerApp's ``fit_seconds`` and
``round_seconds``), the four SecAgg+ stages' seconds, and the peak resident memory of
the process tree (driver, Ray's daemons and workers). Results go to ``OUT/points/`` one
file per run, so an interrupted benchmark resumes where it stopped; ``scaling.json``,
``scaling.md`` and ``scaling.png`` are rewritten after every run.

The federation is a tiny phantom one (``per_site`` slices of ``size``² pixels per site,
one data folder for the largest ``n``; smaller runs use its first ``n`` sites), so the
benchmark measures the federation's overheads, not local training.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from federation.config import RunConfig
from federation.errors import ConfigError, DataError
from federation.plots import plot_scaling
from federation.storage import atomic_write_bytes, atomic_write_json
from privacy.policy import SitePolicy
from simulations.federated import fresh_process_env, run_federated
from simulations.phantoms import PhantomConfig, generate_phantoms

__all__ = ["Mode", "ScalingConfig", "ScalingPoint", "ScalingSummary", "run_scaling"]

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
CRYPTO_STAGES = ("setup", "share_keys", "unmask")
"""The stages that are SecAgg+ only (collect-masked-vectors also runs the local training)."""


class Mode(enum.StrEnum):
    """What aggregates the updates: SecAgg+ or plain FedAvg (the baseline)."""

    SECAGG = "secagg"
    PLAIN = "plain"


@dataclass(frozen=True)
class ScalingConfig:
    """One scaling benchmark.

    Parameters
    ----------
    out
        Benchmark folder: ``data/`` (unless ``data`` is given), ``points/``, ``scaling.json``,
        ``scaling.md``, ``scaling.png``.
    sites
        Numbers of sites, ascending.
    rounds
        Federated rounds per run.
    per_site, size, test
        The phantom federation: training slices per site, image side, held-out slices.
    baseline
        Also run plain DP-SGD FedAvg at every ``n`` (SecAgg+'s share of the round time).
    secagg_num_shares
        The run config's ``secagg-num-shares`` (0: the server's logarithmic rule, 1.0:
        all-to-all).
    batch_size, seed
        Local batch size; seed of the phantoms and the initial model.
    data
        An existing phantom federation with at least ``max(sites)`` sites (default: made in ``out/data``).
    point_timeout
        Seconds one run may take before it is stopped and reported as failed.
    """

    out: Path
    sites: tuple[int, ...] = (20, 50, 100, 200)
    rounds: int = 3
    per_site: int = 40
    size: int = 32
    test: int = 60
    baseline: bool = True
    secagg_num_shares: float = 0.0
    batch_size: int = 16
    seed: int = 0
    data: Path | None = None
    point_timeout: float = 7200.0

    def __post_init__(self) -> None:
        if not self.sites or any(n < 2 for n in self.sites):
            raise ConfigError(f"`sites` must be numbers of at least 2 sites, got {self.sites}")
        if list(self.sites) != sorted(set(self.sites)):
            raise ConfigError(f"`sites` must be ascending without repeats, got {self.sites}")
        for name in ("rounds", "per_site", "test", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.point_timeout <= 0:
            raise ConfigError(f"`point_timeout` must be positive, got {self.point_timeout}")

    @property
    def data_dir(self) -> Path:
        """The phantom federation every run reads."""
        return self.data if self.data is not None else self.out / "data"

    def phantoms(self) -> PhantomConfig:
        """The phantom federation made when ``data`` is not given."""
        return PhantomConfig(sites=max(self.sites), per_site=self.per_site, test=self.test, size=self.size,
                             seed=self.seed)

    def run_config(self, n: int, mode: Mode, out: Path) -> RunConfig:
        """The run of ``n`` sites in ``mode``, writing to ``out``."""
        return RunConfig(data_dir=str(self.data_dir), out_dir=str(out), num_server_rounds=self.rounds,
                         image_size=self.size, batch_size=self.batch_size, pretrain_epochs=0, seed=self.seed,
                         secagg=mode is Mode.SECAGG, secagg_num_shares=self.secagg_num_shares,
                         secagg_timeout=max(600.0, self.point_timeout / 2), min_clients=2)

    def key(self) -> dict[str, Any]:
        """What a finished run must match to be reused."""
        return {"rounds": self.rounds, "per_site": self.per_site, "size": self.size, "test": self.test,
                "secagg_num_shares": self.secagg_num_shares, "batch_size": self.batch_size, "seed": self.seed,
                "data": str(self.data_dir)}


@dataclass(frozen=True)
class ScalingPoint:
    """One run: ``sites`` sites, ``rounds`` rounds in ``mode``.

    ``fit_seconds`` and ``round_seconds`` are per round (see
    :meth:`aggregator.metrics.RunRecorder.evaluate`); ``stage_seconds`` the SecAgg+ stages
    per round (empty without SecAgg+); ``peak_rss_mb`` the process tree's peak.
    """

    sites: int
    mode: Mode
    wall_seconds: float
    fit_seconds: tuple[float, ...]
    round_seconds: tuple[float, ...]
    stage_seconds: tuple[dict[str, float], ...]
    peak_rss_mb: float
    shares: int
    threshold: int
    sites_contributed: int

    @property
    def steady_round_seconds(self) -> float:
        """Mean round time after the first (the first also starts Ray's workers and loads data)."""
        rest = self.round_seconds[1:] or self.round_seconds
        return mean(rest)

    @property
    def crypto_seconds(self) -> float:
        """Mean seconds per round of the SecAgg+-only stages (setup, share keys, unmask), after the first."""
        per_round = [sum(s.get(k, 0.0) for k in CRYPTO_STAGES) for s in self.stage_seconds]
        rest = per_round[1:] or per_round
        return mean(rest) if rest else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        out = dataclasses.asdict(self)
        out.update(mode=str(self.mode), fit_seconds=list(self.fit_seconds), round_seconds=list(self.round_seconds),
                   stage_seconds=list(self.stage_seconds), steady_round_seconds=self.steady_round_seconds)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalingPoint:
        """Read :meth:`to_dict`'s form."""
        return cls(sites=int(d["sites"]), mode=Mode(d["mode"]), wall_seconds=float(d["wall_seconds"]),
                   fit_seconds=tuple(d["fit_seconds"]), round_seconds=tuple(d["round_seconds"]),
                   stage_seconds=tuple(d["stage_seconds"]), peak_rss_mb=float(d["peak_rss_mb"]),
                   shares=int(d["shares"]), threshold=int(d["threshold"]),
                   sites_contributed=int(d["sites_contributed"]))


@dataclass(frozen=True)
class ScalingSummary:
    """Every finished run and the figures drawn from them.

    ``exponent`` is the slope of log(steady SecAgg+ round time) against log(sites): 1 is
    linear growth, 2 quadratic.
    """

    points: tuple[ScalingPoint, ...]
    exponent: float | None
    json_path: Path
    markdown_path: Path
    plot_path: Path

    def point(self, n: int, mode: Mode) -> ScalingPoint | None:
        """The run of ``n`` sites in ``mode``, if finished."""
        return next((p for p in self.points if p.sites == n and p.mode is mode), None)


def _point_dir(cfg: ScalingConfig, n: int, mode: Mode) -> Path:
    return cfg.out / "points" / f"{mode}-{n:04d}"


def _ensure_data(cfg: ScalingConfig, progress: Callable[[str], None]) -> None:
    manifest = cfg.data_dir / "sites.json"
    if cfg.data is not None:
        if not manifest.is_file():
            raise DataError(cfg.data, "is not a phantom federation (no sites.json)")
        sites = len(json.loads(manifest.read_text())["sites"])
        if sites < max(cfg.sites):
            raise DataError(cfg.data, f"has {sites} sites, the benchmark needs {max(cfg.sites)}")
        return
    wanted = dataclasses.asdict(cfg.phantoms())
    if manifest.is_file():
        made = json.loads(manifest.read_text())["config"]
        if {k: made.get(k) for k in wanted} != {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in wanted.items()}:
            raise DataError(cfg.data_dir, f"holds phantoms made with {made}, not {wanted}: use another --out")
        return
    progress(f"making {max(cfg.sites)} phantom sites ({cfg.per_site} slices of {cfg.size}x{cfg.size}) "
             f"in {cfg.data_dir}")
    generate_phantoms(cfg.data_dir, config=cfg.phantoms())


def _finished(cfg: ScalingConfig, n: int, mode: Mode) -> ScalingPoint | None:
    path = _point_dir(cfg, n, mode) / "point.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return ScalingPoint.from_dict(saved["point"]) if saved.get("key") == cfg.key() else None


def _run_point(cfg: ScalingConfig, n: int, mode: Mode) -> ScalingPoint:
    """Run one point in a fresh process; its log is ``points/MODE-N/run.log``."""
    folder = _point_dir(cfg, n, mode)
    if folder.exists():  # an unfinished or outdated run: start it again, with fresh ledgers
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    request = {"run_config": cfg.run_config(n, mode, folder / "run").to_flower(), "sites": n,
               "policy": {"ledger-dir": str(folder / "ledgers"), "secagg-required": mode is Mode.SECAGG},
               "key": cfg.key(), "mode": str(mode)}
    atomic_write_json(folder / "request.json", request)
    env = {**fresh_process_env(),
           "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with (folder / "run.log").open("w") as logfile:
        try:
            proc = subprocess.run([sys.executable, "-m", "simulations.scaling", str(folder / "request.json")],
                                  stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
                                  timeout=cfg.point_timeout, check=False)
        except subprocess.TimeoutExpired:
            raise DataError(folder, f"the run of {n} sites ({mode}) took over {cfg.point_timeout:.0f} s and was "
                                    f"stopped (log: {folder / 'run.log'})") from None
    point = _finished(cfg, n, mode)
    if proc.returncode != 0 or point is None:
        raise DataError(folder, f"the run of {n} sites ({mode}) failed with exit status {proc.returncode} "
                                f"(log: {folder / 'run.log'})")
    return point


def _exponent(points: Sequence[ScalingPoint]) -> float | None:
    xy = [(math.log(p.sites), math.log(p.steady_round_seconds)) for p in points if p.steady_round_seconds > 0]
    if len(xy) < 2:
        return None
    mx, my = mean(x for x, _ in xy), mean(y for _, y in xy)
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sxx if sxx > 0 else None


def _markdown(cfg: ScalingConfig, points: Sequence[ScalingPoint], exponent: float | None) -> str:
    lines = [f"Federated DP-SGD + SecAgg+ on Flower's Simulation Engine: {cfg.rounds} rounds, {cfg.per_site} "
             f"slices of {cfg.size}x{cfg.size} per site, batch {cfg.batch_size}; `secagg-num-shares` "
             f"{cfg.secagg_num_shares:g} ({'the logarithmic rule' if cfg.secagg_num_shares == 0 else 'fixed'}).",
             "",
             "| sites | shares / threshold | wall s | round 1 s | later rounds s | plain later rounds s "
             "| SecAgg+ share | setup / share keys / masked vectors / unmask s | peak RSS MB | plain peak RSS MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sorted({p.sites for p in points}):
        s = next((p for p in points if p.sites == n and p.mode is Mode.SECAGG), None)
        b = next((p for p in points if p.sites == n and p.mode is Mode.PLAIN), None)
        if s is None:
            continue
        stages = s.stage_seconds[1:] or s.stage_seconds
        per_stage = " / ".join(f"{mean(st.get(k, 0.0) for st in stages):.1f}" for k in STAGES) if stages else "–"
        share = f"{1 - b.steady_round_seconds / s.steady_round_seconds:.0%}" if b is not None else "–"
        lines.append(f"| {n} | {s.shares} / {s.threshold} | {s.wall_seconds:.0f} | {s.round_seconds[0]:.1f} | "
                     f"{s.steady_round_seconds:.1f} | {f'{b.steady_round_seconds:.1f}' if b else '–'} | {share} | "
                     f"{per_stage} | {s.peak_rss_mb:.0f} | {f'{b.peak_rss_mb:.0f}' if b else '–'} |")
    if exponent is not None:
        lines += ["", f"Later-round time grows as sites^{exponent:.2f} (log-log slope; 1 = linear)."]
    lines += ["", "SecAgg+ share: 1 − plain / SecAgg+ later-round time at the same number of sites. "
              "The masked-vectors stage includes the sites' local training."]
    return "\n".join(lines) + "\n"


def _write(cfg: ScalingConfig, points: list[ScalingPoint]) -> ScalingSummary:
    secagg = sorted((p for p in points if p.mode is Mode.SECAGG), key=lambda p: p.sites)
    exponent = _exponent(secagg)
    summary = ScalingSummary(points=tuple(sorted(points, key=lambda p: (p.sites, p.mode))), exponent=exponent,
                             json_path=cfg.out / "scaling.json", markdown_path=cfg.out / "scaling.md",
                             plot_path=cfg.out / "scaling.png")
    atomic_write_json(summary.json_path, {"config": cfg.key(), "sites": list(cfg.sites), "exponent": exponent,
                                          "points": [p.to_dict() for p in summary.points]})
    atomic_write_bytes(summary.markdown_path, _markdown(cfg, summary.points, exponent).encode())
    series = {str(mode): [(p.sites, p.steady_round_seconds, p.peak_rss_mb) for p in summary.points
                          if p.mode is mode] for mode in Mode}
    shares = "logarithmic" if cfg.secagg_num_shares == 0 else (
        "all-to-all" if cfg.secagg_num_shares == 1 else f"{cfg.secagg_num_shares:g}")
    plot_scaling(series, summary.plot_path, title=f"DP-SGD federated rounds vs sites ({cfg.rounds} rounds, "
                                                  f"{cfg.per_site} slices/site, SecAgg+ shares: {shares})")
    return summary


def run_scaling(cfg: ScalingConfig, *, progress: Callable[[str], None] | None = None) -> ScalingSummary:
    """Run (or resume) the benchmark and write its figures.

    ``progress`` is told what starts and what each run measured.

    Raises
    ------
    DataError
        A run failed or timed out (the message names its log), or ``data`` cannot be used.
    """
    say = progress or (lambda _msg: None)
    cfg.out.mkdir(parents=True, exist_ok=True)
    _ensure_data(cfg, say)
    modes = (Mode.SECAGG, Mode.PLAIN) if cfg.baseline else (Mode.SECAGG,)
    points: list[ScalingPoint] = []
    for n in cfg.sites:
        for mode in modes:
            point = _finished(cfg, n, mode)
            if point is not None:
                say(f"{n} sites, {mode}: done before ({point.wall_seconds:.0f} s)")
            else:
                say(f"{n} sites, {mode}: running {cfg.rounds} rounds …")
                point = _run_point(cfg, n, mode)
                say(f"{n} sites, {mode}: {point.wall_seconds:.0f} s, rounds "
                    f"{', '.join(f'{s:.1f}' for s in point.round_seconds)} s, peak RSS {point.peak_rss_mb:.0f} MB"
                    + (f", {point.shares} shares" if mode is Mode.SECAGG else ""))
            points.append(point)
            _write(cfg, points)
    return _write(cfg, points)


def _point_from_run(request: dict[str, Any], seconds: float, peak_rss_mb: float,
                    metrics: dict[str, Any]) -> ScalingPoint:
    rounds = metrics["rounds"]
    if len(rounds) != int(request["run_config"]["num-server-rounds"]):
        raise DataError(None, f"the run completed {len(rounds)} of {request['run_config']['num-server-rounds']} "
                              "rounds")
    return ScalingPoint(sites=int(request["sites"]), mode=Mode(request["mode"]), wall_seconds=seconds,
                        fit_seconds=tuple(float(r["fit_seconds"]) for r in rounds),
                        round_seconds=tuple(float(r["round_seconds"]) for r in rounds),
                        stage_seconds=tuple(dict(r.get("secagg_stage_seconds", {})) for r in rounds),
                        peak_rss_mb=peak_rss_mb, shares=int(rounds[-1].get("secagg_shares", 0)),
                        threshold=int(rounds[-1].get("secagg_threshold", 0)),
                        sites_contributed=min(int(r.get("sites_contributed", 0)) for r in rounds))


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.scaling REQUEST.json``: one benchmark run, in a process of its own.

    Writes ``point.json`` beside the request when every round aggregated every site.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m simulations.scaling REQUEST.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    request_path = Path(args[0])
    request = json.loads(request_path.read_text())
    policy = SitePolicy.from_mapping(request["policy"], source=str(request_path))
    cfg = RunConfig.from_flower(request["run_config"])
    start = time.perf_counter()
    result = run_federated(cfg, sites=int(request["sites"]), policies=policy)
    point = _point_from_run(request, result.seconds, result.peak_rss_mb, result.metrics)
    if point.sites_contributed != point.sites:
        log.error("only %d of %d sites contributed to some round", point.sites_contributed, point.sites)
        return 1
    atomic_write_json(request_path.parent / "point.json", {"key": request["key"], "point": point.to_dict()})
    log.info("%d sites (%s): %.0f s (%.0f s with start-up), peak RSS %.0f MB", point.sites, point.mode,
             result.seconds, time.perf_counter() - start, point.peak_rss_mb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
