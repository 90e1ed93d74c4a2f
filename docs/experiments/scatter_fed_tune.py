"""Tuning study for the scattering + linear classifier under federated DP-SGD from scratch (issue 19).

``python docs/experiments/scatter_fed_tune.py NAME key=value ...`` from the repository root with runs/asan made
(``make bench-fl``); appends one JSON line per run to docs/experiments/scatter_fed_tune-results.jsonl. Five sites,
FedAvg with equal site weights as privrad's DP clients send (weight 1), without Flower or SecAgg+ (which change
nothing in the sum), the same DP-SGD (privacy.dp.train_dp_round) and accountant (σ per site for ε over all rounds):
_fedsim.py.
Features: privrad's Scattering (federation.scatter), then ``post`` (none | log: log(floor + S), floor 1e-3 unless given,
then the standardisation), ``norm`` (gnG: per-image GroupNorm with G groups; the default gn81 is ScatterFront's) and
``pool`` (k: k × k average pooling of the standardised features before the classifier).
Kept as run; choices are read on the validation split only.
"""
import json
import sys
import time
from pathlib import Path

import torch
from _fedsim import fedavg_round, site_plans
from torch import nn

from federation.ingest import ImageSet, Preprocess, load_dataset, site_folders
from federation.scatter import Scattering
from federation.train import TrainConfig, evaluate

torch.set_num_threads(2)
name, kv = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
J, L = int(kv.get("J", 2)), int(kv.get("L", 8))
lr, bs, C = float(kv.get("lr", 3e-3)), int(kv.get("bs", 256)), float(kv.get("C", 1.0))
R, E, eps = int(kv.get("rounds", 20)), int(kv.get("local", 2)), float(kv.get("eps", 8))
opt, post, norm = kv.get("opt", "adamw"), kv.get("post", "none"), kv.get("norm", "gn81")
weights = kv.get("weights", "equal")
data, pre = Path("runs/asan"), Preprocess(size=64)
t0 = time.perf_counter()
S = Scattering(64, J, L)


def feats(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        f = torch.cat([S(x[i:i + 256]) for i in range(0, len(x), 256)])
        if post == "log":
            f = torch.log(float(kv.get("floor", 1e-3)) + f.clamp_min(0))
        if norm.startswith("gn"):
            f = nn.functional.group_norm(f, int(norm[2:]), eps=1e-5)
        if int(kv.get("pool", 1)) > 1:  # average-pool the standardised features: fewer weights for the noise
            f = nn.functional.avg_pool2d(f, int(kv["pool"]))
        return f.contiguous()


def fset(d: ImageSet) -> ImageSet:
    return ImageSet(feats(d.images), d.labels, d.classes, d.files)


sites = [fset(load_dataset(f, preprocess=pre)) for f in site_folders(data)]
val = fset(load_dataset(data / "val", preprocess=pre))
print("features", f"{time.perf_counter() - t0:.1f}s", flush=True)
ch, side = val.images.shape[1], val.images.shape[-1]
torch.manual_seed(0)
g = nn.Sequential(nn.Flatten(), nn.Linear(ch * side * side, 3))
nn.init.zeros_(g[-1].weight)
nn.init.zeros_(g[-1].bias)
plans = site_plans(sites, bs=bs, local=E, rounds=R, eps=eps, C=C)
res = {"name": name, "kv": kv, "sigmas": [round(p.noise_multiplier, 3) for p in plans], "val": []}
for r in range(R):
    tc = TrainConfig(epochs=E, batch_size=bs, lr=lr, optimizer=opt, schedule="constant", seed=r, augment=False)
    fedavg_round(g, sites, plans, tc, by_size=weights == "n")
    res["val"].append(round(evaluate(g, val).auc_macro, 4))
    if (r + 1) % 5 == 0:
        print(f"{name} round {r + 1}: val {res['val'][-1]:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
res["s"] = round(time.perf_counter() - t0)
with open("docs/experiments/scatter_fed_tune-results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
