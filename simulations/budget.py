"""Privacy-budget sweep: utility and membership leakage of the federated model versus ε.

For every target ε (``inf`` = DP-SGD off) and seed, one federated DP-SGD + SecAgg+ run on
Flower's Simulation Engine, in its own process. σ is derived per site from the target ε
and the run's planned steps (:func:`privacy.dp.plan_round`), so each point spends
its target and no more. The sweep plays the hospitals too: each point gives its sites a
policy (``points/P/site_policy.toml``: budget = the point's ε, δ, SecAgg+ required, DP
required except at ε = ∞) with a fresh ledger folder of the point's own, since each point
is another world in which the same patients were trained on once. Every point is then audited with membership inference
(:mod:`privacy.membership`) on records of the same sites that were held out of training.

Layout of ``RUN``::

    sweep.json              the settings (a resumed sweep must match them)
    data/site-K/            the training records (links into DATA) and labels.csv
    holdout/site-K/         the held-out records of each site: the audit's non-members
    init/seed-S.pt          public-pretrained initial model of seed S (costs no privacy)
    central/seed-S.json     centralised, non-private reference on the pooled training records
    points/eps-E-seed-S/    one federated run (site_policy.toml, ledgers/); point.json is written last
    budget.json, audit.json, budget.png, audit.png

Resumable: a point whose ``point.json`` exists is not run again; a point that was
interrupted (folder without ``point.json``) is deleted and rerun, since its sites'
ledgers already hold the rounds it spent.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.initial import initial_model, save_initial_model
from federation.config import RunConfig
from federation.errors import ConfigError, DataError, PrivradError
from federation.ingest import Preprocess, concat, load_dataset, site_folders
from federation.metrics import seed_stats
from federation.model import PrivradCNN
from federation.plots import plot_audit_roc, plot_budget
from federation.storage import atomic_write_json, load_checkpoint
from federation.train import TrainConfig, evaluate, train_epochs
from privacy.membership import LOW_FPRS, dp_tpr_bound, membership_audit
from privacy.policy import SitePolicy
from simulations.federated import fresh_process_env

__all__ = [
    "PointSummary",
    "Stats",
    "SweepConfig",
    "SweepPoint",
    "SweepSummary",
    "aggregate",
    "load_sweep",
    "parse_epsilons",
    "plan",
    "run_sweep",
    "split_members",
    "summarise",
]

log = logging.getLogger(__name__)

SWEEP_FORMAT = "privrad-budget-sweep/1"
AUDIT_VERSION = 2
"""Version of the membership audit; finished points audited by another version are re-audited
from their saved models (no retraining) when the sweep is resumed."""


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,2,4,8,inf"`` → ``(1.0, 2.0, 4.0, 8.0, inf)``, validated and sorted.

    Raises
    ------
    ConfigError
        An entry is not a number, not positive, or repeated.
    """
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--epsilons: {part!r} is not a number (use e.g. 1,2,4,8,inf)") from None
        if not value > 0:
            raise ConfigError(f"--epsilons: ε must be positive, got {part!r}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"--epsilons: repeated value in {text!r}")
    if not values:
        raise ConfigError("--epsilons: no value given")
    return tuple(sorted(values))


def eps_label(epsilon: float) -> str:
    """``1.0`` → ``"1"``, ``inf`` → ``"inf"`` (keys of the JSON files, folder names)."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class SweepConfig:
    """One sweep; every field is recorded in ``sweep.json``."""

    data: str
    out: str
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, math.inf)
    seeds: int = 3
    rounds: int = 10
    local_epochs: int = 2
    holdout: float = 0.5
    delta: float = 1e-5
    pretrain_epochs: int = 15
    image_size: int = 64
    batch_size: int = 32
    learning_rate: float = 3e-3
    max_grad_norm: float = 1.0
    secagg: bool = True
    augment: bool = True
    split_seed: int = 0

    def __post_init__(self) -> None:
        if not self.epsilons or any(not e > 0 for e in self.epsilons):
            raise ConfigError(f"epsilons must be positive, got {self.epsilons}")
        for name in ("seeds", "rounds", "local_epochs", "image_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name.replace('_', '-')}` must be at least 1, got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"`holdout` must be in (0, 1), got {self.holdout}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"`delta` must be in (0, 1), got {self.delta}")
        if self.pretrain_epochs < 0:
            raise ConfigError(f"`pretrain-epochs` must not be negative, got {self.pretrain_epochs}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``inf`` as the string ``"inf"``)."""
        d = dataclasses.asdict(self)
        d["epsilons"] = [eps_label(e) for e in self.epsilons]
        return d

    @property
    def run(self) -> Path:
        """The sweep folder."""
        return Path(self.out)


@dataclass(frozen=True)
class SweepPoint:
    """One federated run of the sweep."""

    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        """Folder name of the point."""
        return f"eps-{eps_label(self.epsilon)}-seed-{self.seed}"

    @property
    def private(self) -> bool:
        """Whether DP-SGD is on (finite ε)."""
        return not math.isinf(self.epsilon)


def load_sweep(run: Path) -> SweepConfig:
    """The settings of the sweep in ``run`` (from its ``sweep.json``).

    Raises
    ------
    DataError
        ``run`` holds no sweep.
    """
    path = Path(run) / "sweep.json"
    if not path.is_file():
        raise DataError(run, "holds no sweep.json: not a `privrad budget` folder")
    d = json.loads(path.read_text())
    if d.pop("format", None) != SWEEP_FORMAT:
        raise DataError(path, f"is not a {SWEEP_FORMAT} file")
    d["epsilons"] = tuple(float(e) for e in d["epsilons"])
    d["out"] = str(run)
    known = {f.name for f in dataclasses.fields(SweepConfig)}
    if set(d) - known:
        raise DataError(path, f"has unknown settings {sorted(set(d) - known)}")
    return SweepConfig(**d)


def plan(cfg: SweepConfig) -> list[SweepPoint]:
    """Every (ε, seed) point, seed-major so that a partial sweep already covers every ε.

    Within a seed the largest ε (no DP first) runs first: it shows soonest whether the
    setting lets the membership attack succeed at all.
    """
    return [SweepPoint(e, s) for s in range(cfg.seeds) for e in sorted(cfg.epsilons, reverse=True)]


# ----------------------------------------------------------------------------- data split
def split_members(data: Path, run: Path, *, holdout: float, seed: int) -> dict[str, dict[str, int]]:
    """Split each ``data/site-K`` into training records ``run/data/site-K`` and held-out ``run/holdout/site-K``.

    The split is random per site (seeded) and stratified by label. Records are linked, not
    copied; each new folder gets its own ``labels.csv``. ``test/`` and ``public/`` are
    linked as they are. Returns the counts per site.

    Raises
    ------
    DataError
        ``data`` has no ``site-K`` folders, a site is not a labelled DICOM folder, or a
        site has too few records of a class to hold one out.
    """
    sites = site_folders(data)
    if not sites:
        raise DataError(data, "has no site-K folders to sweep over")
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {}
    for site in sites:
        table = site / "labels.csv"
        if not table.is_file():
            raise DataError(table, "is missing: the sweep splits labelled DICOM site folders")
        with table.open(newline="") as fh:
            rows = [(r["file"], r["label"]) for r in csv.DictReader(fh)]
        by_label: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            by_label.setdefault(row[1], []).append(row)
        members: list[tuple[str, str]] = []
        held: list[tuple[str, str]] = []
        for _, group in sorted(by_label.items()):
            order = rng.permutation(len(group))
            k = round(len(group) * holdout)
            if len(group) >= 2 and not 0 < k < len(group):
                k = min(max(k, 1), len(group) - 1)
            held += [group[i] for i in order[:k]]
            members += [group[i] for i in order[k:]]
        if not members or not held:
            raise DataError(site, f"has {len(rows)} records: too few to hold {holdout:.0%} out")
        for dest, chosen in ((run / "data" / site.name, members), (run / "holdout" / site.name, held)):
            dest.mkdir(parents=True, exist_ok=True)
            for name, _ in chosen:
                link = dest / name
                if not link.exists():
                    link.symlink_to((site / name).resolve())
            with (dest / "labels.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["file", "label"])
                writer.writerows(sorted(chosen))
        counts[site.name] = {"train": len(members), "holdout": len(held)}
    for extra in ("test", "public"):
        link = run / "data" / extra
        if (data / extra).is_dir() and not link.exists():
            link.symlink_to((data / extra).resolve(), target_is_directory=True)
    return counts


# ----------------------------------------------------------------------------- one point
def _initial_model(cfg: SweepConfig, seed: int) -> Path:
    """Public-pretrained (or random, without a public archive) initial model of ``seed``, cached."""
    path = cfg.run / "init" / f"seed-{seed}.pt"
    if path.is_file():
        return path
    run_cfg = RunConfig(data_dir=str(cfg.run / "data"), image_size=cfg.image_size, seed=seed,
                        batch_size=cfg.batch_size, pretrain_batch_size=cfg.batch_size,
                        pretrain_epochs=cfg.pretrain_epochs)
    test = load_dataset(cfg.run / "data" / "test", preprocess=Preprocess(size=cfg.image_size))
    save_initial_model(initial_model(run_cfg), path, test)
    return path


def _run_config(cfg: SweepConfig, point: SweepPoint, out: Path, init: Path) -> RunConfig:
    eps = point.epsilon
    return RunConfig(
        num_server_rounds=cfg.rounds, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, image_size=cfg.image_size, data_dir=str(cfg.run / "data"),
        out_dir=str(out), seed=point.seed, initial_model=str(init), pretrain_epochs=0,
        dp=point.private, max_grad_norm=cfg.max_grad_norm,
        target_epsilon=eps if point.private else 0.0, epsilon_budget=eps if point.private else 8.0,
        delta=0.0, secagg=cfg.secagg, augment=cfg.augment)


def site_policy(cfg: SweepConfig, point: SweepPoint, folder: Path) -> SitePolicy:
    """The virtual hospitals' policy for one point: its ε as the budget, a ledger folder of its own."""
    return SitePolicy(dp_required=point.private, epsilon_budget=point.epsilon if point.private else 8.0,
                      delta=cfg.delta, max_grad_norm=cfg.max_grad_norm, secagg_required=cfg.secagg,
                      ledger_dir=str(folder / "ledgers"))


def _audit_sets(cfg: SweepConfig) -> tuple[Any, Any]:
    pre = Preprocess(size=cfg.image_size)
    members = concat(load_dataset(s, preprocess=pre) for s in site_folders(cfg.run / "data"))
    nonmembers = concat(load_dataset(s, preprocess=pre) for s in site_folders(cfg.run / "holdout"))
    return members, nonmembers


def run_point(cfg: SweepConfig, point: SweepPoint, *, audit_sets: tuple[Any, Any]) -> dict[str, Any]:
    """Run one federated point in a fresh process, audit it, write ``point.json`` last; return it."""
    folder = cfg.run / "points" / point.name
    if folder.exists():  # an interrupted point: its ledgers hold spent rounds, start it over
        log.warning("%s was interrupted; running it again from the start", point.name)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    init = _initial_model(cfg, point.seed)
    run_cfg = _run_config(cfg, point, folder, init)
    atomic_write_json(folder / "run_config.json", run_cfg.to_flower())
    site_policy(cfg, point, folder).save(folder / "site_policy.toml")
    start = time.perf_counter()
    env = fresh_process_env()
    with (folder / "run.log").open("w") as logf:
        proc = subprocess.run([sys.executable, "-m", "simulations.federated", str(folder / "run_config.json"),
                               str(folder / "site_policy.toml")],
                              stdout=logf, stderr=subprocess.STDOUT, env=env, check=False)
    seconds = time.perf_counter() - start
    metrics_file = folder / "metrics.json"
    if proc.returncode != 0 or not metrics_file.is_file():
        raise PrivradError(f"sweep point {point.name} failed (exit {proc.returncode}); see {folder / 'run.log'}")
    metrics = json.loads(metrics_file.read_text())
    final = metrics["final"]
    if final.get("rounds_completed") != cfg.rounds:
        raise PrivradError(f"sweep point {point.name} completed {final.get('rounds_completed')} of "
                           f"{cfg.rounds} rounds; see {folder / 'run.log'}")
    result = {
        "epsilon_target": eps_label(point.epsilon), "seed": point.seed,
        "auc_macro": final["auc_macro"], "auc_per_class": final["auc_per_class"], "accuracy": final["accuracy"],
        "initial_auc_macro": metrics["initial"].get("auc_macro"),
        "rounds": [{"round": r["round"], "auc_macro": r["auc_macro"], "epsilon_max": r.get("epsilon_max", 0.0)}
                   for r in metrics["rounds"]],
        "epsilon": final["epsilon"] if point.private else None,
        "delta": final["delta"] if point.private else None,
        "noise_multiplier": {s: v.get("noise_multiplier") for s, v in metrics["sites"].items()}
        if point.private else None,
        "seconds": seconds,
    }
    return audit_point(cfg, point, result, audit_sets=audit_sets)


def audit_point(cfg: SweepConfig, point: SweepPoint, result: dict[str, Any], *,
                audit_sets: tuple[Any, Any]) -> dict[str, Any]:
    """Add the membership audit of the point's saved global model to ``result``; write ``point.json``."""
    folder = cfg.run / "points" / point.name
    target = load_checkpoint(folder / "global_model.pt").model
    reference = load_checkpoint(_initial_model(cfg, point.seed)).model
    attacks = membership_audit(target, *audit_sets, reference=reference)
    result = {**result, "membership": {k: v.to_dict() for k, v in attacks.items()}, "audit_version": AUDIT_VERSION}
    atomic_write_json(folder / "point.json", result)
    return result


def run_centralised(cfg: SweepConfig, seed: int, *, audit_sets: tuple[Any, Any]) -> dict[str, Any]:
    """The non-private centralised reference of ``seed``: pooled training records, same epochs, same start."""
    path = cfg.run / "central" / f"seed-{seed}.json"
    if path.is_file():
        done = dict(json.loads(path.read_text()))
        if done.get("audit_version") == AUDIT_VERSION:
            return done
    init = _initial_model(cfg, seed)
    reference = load_checkpoint(init).model
    model: PrivradCNN = copy.deepcopy(reference)
    members, _ = audit_sets
    test = load_dataset(cfg.run / "data" / "test", preprocess=Preprocess(size=cfg.image_size))
    train = TrainConfig(epochs=cfg.rounds * cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.learning_rate,
                        augment=cfg.augment, seed=seed)
    start = time.perf_counter()
    initial_auc = evaluate(reference, test).auc_macro
    train_epochs(model, members, config=train)
    metrics = evaluate(model, test)
    attacks = membership_audit(model, *audit_sets, reference=reference)
    result = {"seed": seed, "auc_macro": metrics.auc_macro, "auc_per_class": metrics.auc_per_class,
              "accuracy": metrics.accuracy, "initial_auc_macro": initial_auc, "epochs": train.epochs,
              "train_images": len(members),
              "membership": {k: v.to_dict() for k, v in attacks.items()}, "audit_version": AUDIT_VERSION,
              "seconds": time.perf_counter() - start}
    atomic_write_json(path, result)
    return result


# ----------------------------------------------------------------------------- the sweep
def _check_settings(cfg: SweepConfig) -> None:
    """Record the settings, or refuse to resume a folder that holds another sweep."""
    path = cfg.run / "sweep.json"
    mine = {"format": SWEEP_FORMAT, **cfg.to_dict()}
    if path.is_file():
        defaults = SweepConfig(data=cfg.data, out=cfg.out).to_dict()
        theirs = {"format": SWEEP_FORMAT, **defaults, **json.loads(path.read_text())}  # older files: defaults
        mine_cmp = {k: v for k, v in mine.items() if k != "out"}
        theirs_cmp = {k: v for k, v in theirs.items() if k != "out"}
        if theirs_cmp != mine_cmp:
            diff = sorted(k for k in mine_cmp.keys() | theirs_cmp.keys() if mine_cmp.get(k) != theirs_cmp.get(k))
            raise ConfigError(f"{cfg.run} holds a sweep with other settings ({', '.join(diff)}); "
                              f"resume it with the same settings or choose another --out")
        return
    cfg.run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, mine)


def run_sweep(cfg: SweepConfig, *, on_point: Callable[[SweepPoint, dict[str, Any] | None], None] | None = None
              ) -> SweepSummary:
    """Run (or resume) the sweep; write the summaries and plots after every point; return their summary.

    ``on_point(point, result)`` is called before each point (``result=None``) and after it.
    """
    if not Path(cfg.data).is_dir():
        raise DataError(cfg.data, "is not a folder")
    _check_settings(cfg)
    if not (cfg.run / "data").is_dir() or not (cfg.run / "holdout").is_dir():
        counts = split_members(Path(cfg.data), cfg.run, holdout=cfg.holdout, seed=cfg.split_seed)
        atomic_write_json(cfg.run / "split.json", counts)
    if not (cfg.run / "data" / "test").is_dir():
        raise DataError(Path(cfg.data) / "test", "is missing: the sweep evaluates every point on DATA/test")
    audit_sets = _audit_sets(cfg)
    for seed in range(cfg.seeds):
        run_centralised(cfg, seed, audit_sets=audit_sets)
    for point in plan(cfg):
        done = cfg.run / "points" / point.name / "point.json"
        if done.is_file():
            result = json.loads(done.read_text())
            if result.get("audit_version") != AUDIT_VERSION:
                log.info("%s: audited by another version of the audit; auditing its saved model again", point.name)
                result = audit_point(cfg, point, result, audit_sets=audit_sets)
            if on_point is not None:
                on_point(point, result)
            continue
        if on_point is not None:
            on_point(point, None)
        result = run_point(cfg, point, audit_sets=audit_sets)
        write_summaries(cfg)
        if on_point is not None:
            on_point(point, result)
    return write_summaries(cfg)


def _attack_stats(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per attack, over the seeds of one setting: AUC, advantage and TPR at low FPR (mean, sd), ROC curves."""
    out: dict[str, Any] = {}
    for name in runs[0]["membership"]:
        res = [r["membership"][name] for r in runs]
        out[name] = {"auc": seed_stats([a["auc"] for a in res]),
                     "advantage": seed_stats([a["advantage"] for a in res]),
                     "tpr_at_fpr": {k: seed_stats([a["tpr_at_fpr"][k] for a in res]) for k in res[0]["tpr_at_fpr"]},
                     "roc": [{"fpr": a["roc_fpr"], "tpr": a["roc_tpr"]} for a in res]}
    return out


def aggregate(cfg: SweepConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``budget.json`` and ``audit.json`` contents from the finished points (partial sweeps too)."""
    points: dict[str, list[dict[str, Any]]] = {}
    for p in plan(cfg):
        f = cfg.run / "points" / p.name / "point.json"
        if f.is_file():
            points.setdefault(eps_label(p.epsilon), []).append(json.loads(f.read_text()))
    central = [json.loads(f.read_text()) for f in sorted((cfg.run / "central").glob("seed-*.json"))]
    budget_rows, audit_rows = [], []
    for eps in cfg.epsilons:
        rows = points.get(eps_label(eps), [])
        if not rows:
            continue
        classes = list(rows[0]["auc_per_class"])
        row: dict[str, Any] = {
            "epsilon": eps_label(eps), "seeds": [r["seed"] for r in rows],
            "auc_macro": seed_stats([r["auc_macro"] for r in rows]),
            "auc_per_class": {c: seed_stats([r["auc_per_class"][c] for r in rows]) for c in classes},
            "accuracy": seed_stats([r["accuracy"] for r in rows]),
            "seconds": seed_stats([r["seconds"] for r in rows]),
        }
        if not math.isinf(eps):
            achieved = [v for r in rows for v in r["epsilon"].values()]
            row["epsilon_achieved"] = {"max": max(achieved), "min": min(achieved),
                                       "per_seed": [r["epsilon"] for r in rows]}
            row["delta"] = sorted({v for r in rows for v in r["delta"].values()})
            row["noise_multiplier"] = sorted({round(v, 6) for r in rows for v in r["noise_multiplier"].values()})
        budget_rows.append(row)
        attacks = _attack_stats(rows)
        n1, n0 = rows[0]["membership"]["loss"]["members"], rows[0]["membership"]["loss"]["nonmembers"]
        audit_rows.append({"epsilon": eps_label(eps), "attacks": attacks, "members": n1, "nonmembers": n0,
                           "chance_auc_sd": math.sqrt((n1 + n0 + 1) / (12 * n1 * n0)),
                           "dp_bound_tpr_at_fpr": {f"{a:g}": dp_tpr_bound(eps, cfg.delta, a) for a in LOW_FPRS}})
    references: dict[str, Any] = {}
    inf_rows = points.get("inf", [])
    if inf_rows:
        references["federated_nonprivate"] = seed_stats([r["auc_macro"] for r in inf_rows])
    if central:
        references["centralised"] = seed_stats([c["auc_macro"] for c in central])
    if central:
        references["initial_model"] = seed_stats([c["initial_auc_macro"] for c in central])
    total = len(plan(cfg))
    finished = sum(len(v) for v in points.values())
    budget = {"format": SWEEP_FORMAT, "config": cfg.to_dict(), "complete": finished == total,
              "points_finished": finished, "points_planned": total,
              "federated_seconds": sum(r["seconds"] for rows in points.values() for r in rows),
              "metric": "macro-AUC on DATA/test", "points": budget_rows, "references": references}
    central_audit = _attack_stats(central) if central else {}
    audit = {"format": SWEEP_FORMAT,
             "about": "membership inference against each point's global model: training records of the sites "
                      "(members) versus records of the same sites held out of training",
             "attacks": {"loss": "score = −loss of the global model (Yeom et al. 2018)",
                         "calibrated": "score = loss of the public-pretrained initial model − loss of the global "
                                       "model (Watson et al. 2022)"},
             "points": audit_rows, "centralised_nonprivate": central_audit}
    return budget, audit


@dataclass(frozen=True)
class Stats:
    """Mean, sample standard deviation and range of one figure over the seeds."""

    mean: float
    std: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> Stats:
        """From a ``_stats`` record (``budget.json``)."""
        return cls(float(record["mean"]), float(record["std"]), float(record["min"]), float(record["max"]),
                   int(record["n"]))


@dataclass(frozen=True)
class PointSummary:
    """One target ε of the sweep over its seeds: utility, the ε reached, σ, and the membership attacks."""

    epsilon: str
    auc_macro: Stats
    epsilon_achieved_max: float | None
    noise_multiplier: tuple[float, ...]
    attack_auc: Stats
    attack_tpr_at_1pct_fpr: Stats
    attack: str


@dataclass(frozen=True)
class SweepSummary:
    """What :func:`run_sweep` returns: the points so far and the references (``budget.json`` has it all)."""

    complete: bool
    points_finished: int
    points_planned: int
    points: tuple[PointSummary, ...]
    references: dict[str, Stats]


def summarise(budget: Mapping[str, Any], audit: Mapping[str, Any]) -> SweepSummary:
    """The typed summary of ``budget.json`` and ``audit.json`` (the calibrated attack where there is one)."""
    attacks = {r["epsilon"]: r["attacks"] for r in audit["points"]}
    points = []
    for row in budget["points"]:
        name = "calibrated" if attacks[row["epsilon"]].get("calibrated") else "loss"
        attack = attacks[row["epsilon"]][name]
        achieved = row.get("epsilon_achieved")
        points.append(PointSummary(
            epsilon=row["epsilon"], auc_macro=Stats.of(row["auc_macro"]),
            epsilon_achieved_max=float(achieved["max"]) if achieved else None,
            noise_multiplier=tuple(row.get("noise_multiplier", ())), attack_auc=Stats.of(attack["auc"]),
            attack_tpr_at_1pct_fpr=Stats.of(attack["tpr_at_fpr"]["0.01"]), attack=name))
    return SweepSummary(complete=bool(budget["complete"]), points_finished=int(budget["points_finished"]),
                        points_planned=int(budget["points_planned"]), points=tuple(points),
                        references={k: Stats.of(v) for k, v in budget["references"].items()})


def write_summaries(cfg: SweepConfig) -> SweepSummary:
    """Write ``budget.json``, ``audit.json``, ``budget.png`` and ``audit.png``; return their summary."""
    budget, audit = aggregate(cfg)
    atomic_write_json(cfg.run / "budget.json", budget)
    atomic_write_json(cfg.run / "audit.json", audit)
    if budget["points"]:
        plot_budget(budget, audit, cfg.run / "budget.png")
        plot_audit_roc(audit, cfg.run / "audit.png")
    return summarise(budget, audit)
