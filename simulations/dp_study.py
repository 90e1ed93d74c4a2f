"""A fast in-process study of DP-SGD settings for the federation, scored on the validation split.

Each trial is federated averaging of per-site DP-SGD rounds (every site's σ derived from
ε over all of its planned steps, as the ClientApp does), run in one process without
Flower: SecAgg+ only hides the individual updates, the mean it yields is the same (to
its quantisation, ~1e-5), so the choice it informs carries over. The chosen settings
are then run on Flower's Simulation Engine by ``privrad benchmark federated``.

``python -m simulations.dp_study DATA OUT [TRIAL ...]`` appends one JSON line per trial
to ``OUT/trials.jsonl`` (val macro-AUC after each round, wall time) and skips trials
already there.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aggregator.initial import initial_model
from federation.config import RunConfig, parse_flat
from federation.ingest import ImageSet, Preprocess, load_dataset, site_folders
from federation.model import PrivradCNN, get_weights, set_weights
from federation.train import TrainConfig, evaluate
from privacy.dp import DPRandomness, RoundPlan, noise_for_target, sample_rate, steps_per_epoch, train_dp_round

__all__ = ["Trial", "run_trial"]

EMA_DECAYS = (0.5, 0.8)


@dataclass(frozen=True)
class Trial:
    """One setting of the study."""

    name: str
    epsilon: float = 8.0
    rounds: int = 10
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    aug_mult: int = 1
    shift: int = 0
    pretrain: bool = True
    freeze: str = ""
    seed: int = 0
    act_init: str = "relu"
    conv_gain: float = 1.0


def average(weights: list[list[Any]]) -> list[Any]:
    """Unweighted mean of each array (DP: every site's weight is 1)."""
    return [sum(ws) / len(ws) for ws in zip(*weights, strict=True)]


def run_trial(trial: Trial, sites: list[ImageSet], val: ImageSet, init: PrivradCNN) -> dict[str, Any]:
    """Federated DP-SGD for ``trial``; val macro-AUC after every round."""
    torch.manual_seed(trial.seed)
    model = copy.deepcopy(init)
    for name, p in model.named_parameters():
        if trial.freeze and any(name.startswith(f) for f in trial.freeze.split("+")):
            p.requires_grad_(False)
    plans = []
    for data in sites:
        q = sample_rate(len(data), trial.batch_size)
        steps = trial.local_epochs * steps_per_epoch(len(data), trial.batch_size)
        sigma = noise_for_target(trial.epsilon, delta=1e-5, sample_rate=q, steps=steps * trial.rounds)
        plans.append(RoundPlan(sigma, trial.max_grad_norm, q, steps, 1e-5))
    emas: dict[float, list[Any]] = {}
    curve: list[float] = []
    ema_curves: dict[str, list[float]] = {f"{d:g}": [] for d in EMA_DECAYS}
    start = time.perf_counter()
    for r in range(1, trial.rounds + 1):
        updates = []
        for k, (data, plan) in enumerate(zip(sites, plans, strict=True)):
            local = copy.deepcopy(model)
            train = TrainConfig(epochs=trial.local_epochs, batch_size=trial.batch_size, lr=trial.lr,
                                optimizer=trial.optimizer, schedule="constant", seed=1000 * r + k,
                                aug_mult=trial.aug_mult, shift=trial.shift)
            train_dp_round(local, data, train=train, plan=plan, randomness=DPRandomness.fresh())
            updates.append(get_weights(local))
        set_weights(model, average(updates))
        curve.append(evaluate(model, val).auc_macro)
        for d in EMA_DECAYS:  # server-side averaging of the released global models: post-processing, free
            w = get_weights(model)
            emas[d] = w if d not in emas else [d * e + (1 - d) * x for e, x in zip(emas[d], w, strict=True)]
            scored = copy.deepcopy(model)
            set_weights(scored, emas[d])
            ema_curves[f"{d:g}"].append(evaluate(scored, val).auc_macro)
        print(f"{trial.name} round {r}: val macro-AUC {curve[-1]:.4f}, EMA "
              + ", ".join(f"{k} {v[-1]:.4f}" for k, v in ema_curves.items())
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"trial": dataclasses.asdict(trial), "sigmas": [p.noise_multiplier for p in plans],
            "val_auc": curve, "val_auc_ema": ema_curves, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    """Run the trials named on the command line (``name:key=value,key=value``; ``freeze=a+b`` freezes two prefixes)."""
    args = sys.argv[1:] if argv is None else argv
    data, out = Path(args[0]), Path(args[1])
    out.mkdir(parents=True, exist_ok=True)
    log = out / "trials.jsonl"
    done = {json.loads(line)["trial"]["name"] for line in log.read_text().splitlines()} if log.exists() else set()
    torch.set_num_threads(2)
    pre = Preprocess(size=64)
    sites = [load_dataset(f, preprocess=pre) for f in site_folders(data)]
    val = load_dataset(data / "val", preprocess=pre)
    inits: dict[tuple[bool, str, float], PrivradCNN] = {}
    for spec in args[2:]:
        name, _, rest = spec.partition(":")
        if name in done:
            continue
        settings = dict(item.partition("=")[::2] for item in filter(None, rest.split(",")))
        trial = Trial(name=name, **parse_flat(Trial, settings, what="trial"))
        key = (trial.pretrain, trial.act_init, trial.conv_gain)
        if key not in inits:
            cfg = RunConfig(data_dir=str(data), out_dir=str(out), pretrain_epochs=15 if trial.pretrain else 0,
                            head="flatten", act_init=trial.act_init, conv_gain=trial.conv_gain)
            inits[key] = initial_model(cfg).model
            print(f"initial model (pretrain={trial.pretrain}, act-init {trial.act_init}, gain {trial.conv_gain:g}): "
                  f"val macro-AUC {evaluate(inits[key], val).auc_macro:.4f}", flush=True)
        result = run_trial(trial, sites, val, inits[key])
        with log.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
