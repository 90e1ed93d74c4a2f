"""Tuning study for the public-start row of the scattering + linear classifier under federated DP-SGD (issue 19).

``python docs/experiments/scatter_pub_tune.py NAME key=value ...`` from the repository root with runs/asan made
(``make bench-fl``); appends one JSON line per run to docs/experiments/scatter_pub_tune-results.jsonl. As
scatter_fed_tune.py (five sites, FedAvg without Flower or SecAgg+, privrad's DP-SGD and accountant, σ per site for
ε over all rounds; _fedsim.py) but starting from the public start (``start=public``: the linear classifier
pretrained on the public archive's features, 15 epochs at batch 32 as aggregator.initial does, without flips;
``start=zero``: from zeros), on the features privrad's ScatterFront makes (log(1e-2 + S), per-image GroupNorm;
federation.train.front_features). Post-processing of the released global models costs no privacy, so one run
also scores the server's exponential moving averages of the global weights (``ema`` decays, comma-separated) every
round. ``sched=cos`` decays the sites' learning rate over the rounds, ``weights=n`` weights sites by their size
(equal by default, as privrad's DP clients send), ``pca=k`` projects the features on the first k principal
directions of the public archive's features (data-independent for the sites); ``data=DIR`` another federation
(default runs/asan), ``wd`` the sites' AdamW weight decay (default 1e-4), ``pre_aug=1`` pretrains with flips and
shifts as the benchmark's public start does (default off, as in the runs before it); ``channels=c1[:c2...]`` trains
privrad's model instead (ArchConfig(scatter=2, channels=...): convolution stages on the same front end, with its
feature cache) on the images. ``smom=β`` (with ``slr``, default 1) moves the server by server momentum over the
released averages (FedAvgM, Hsu et al. 2019: m ← β·m + Δ, w ← w + slr·m; post-processing, no privacy cost).
Results up to cnn64 came from an earlier version that computed the same features by
hand (the same operations) and kept them in a file.
Kept as run; choices are read on the validation split only.
"""
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from _fedsim import fedavg_round, site_plans
from torch import nn

from federation.ingest import ImageSet, Preprocess, load_dataset, site_folders
from federation.model import ArchConfig, HeadKind, build_model
from federation.train import TrainConfig, evaluate, front_features, train_epochs

torch.set_num_threads(2)
name, kv = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
lr, bs, C = float(kv.get("lr", 3e-3)), int(kv.get("bs", 256)), float(kv.get("C", 1.0))
R, E, eps = int(kv.get("rounds", 40)), int(kv.get("local", 2)), float(kv.get("eps", 8))
opt, sched, weights = kv.get("opt", "adamw"), kv.get("sched", "const"), kv.get("weights", "equal")
emas = [float(b) for b in kv.get("ema", "0.5,0.8,0.9").split(",")]
data, pre = Path(kv.get("data", "runs/asan")), Preprocess(size=64)
wd, pre_aug = float(kv.get("wd", 1e-4)), kv.get("pre_aug", "0") == "1"
smom, slr = float(kv.get("smom", 0)), float(kv.get("slr", 1))
t0 = time.perf_counter()
cnn = tuple(int(c) for c in kv["channels"].split(":")) if "channels" in kv else ()
sites = [load_dataset(f, preprocess=pre) for f in site_folders(data)]
val = load_dataset(data / "val", preprocess=pre)
public = load_dataset(data / "public", classes=val.classes, preprocess=pre)
if not cnn:  # the linear classifier trains on privrad's own front-end features (ScatterFront), flattened
    front = build_model(ArchConfig(input_size=64, head=HeadKind.FLATTEN, scatter=2, channels=()), seed=0)

    def flat(d: ImageSet) -> ImageSet:
        f = front_features(front, d)
        assert f is not None
        return ImageSet(f.images.flatten(1), d.labels, d.classes, d.files)

    sites, val, public = [flat(s) for s in sites], flat(val), flat(public)
if "pca" in kv:  # principal directions of the public features only
    k = int(kv["pca"])
    mu = public.images.mean(0)
    _, _, V = torch.linalg.svd(public.images - mu, full_matrices=False)
    P = V[:k].T.contiguous()
    scale = ((public.images - mu) @ P).std(0).mean()

    def proj(d: ImageSet) -> ImageSet:
        return ImageSet(((d.images - mu) @ P / scale).contiguous(), d.labels, d.classes, d.files)

    sites, val, public = [proj(s) for s in sites], proj(val), proj(public)
print("features", f"{time.perf_counter() - t0:.1f}s", public.images.shape, flush=True)
torch.manual_seed(0)
g: nn.Module
if cnn:
    g = build_model(ArchConfig(input_size=64, head=HeadKind.FLATTEN, scatter=2, channels=cnn), seed=0)
else:
    g = nn.Sequential(nn.Linear(val.images.shape[1], 3))
    nn.init.zeros_(g[-1].weight)
    nn.init.zeros_(g[-1].bias)
res = {"name": name, "kv": kv}
if kv.get("start", "public") == "public":
    train_epochs(g, public, config=TrainConfig(epochs=15, batch_size=32, lr=3e-3, seed=0, augment=pre_aug))
    res["start_val"] = round(evaluate(g, val).auc_macro, 4)
    print("public start val", res["start_val"], flush=True)
plans = site_plans(sites, bs=bs, local=E, rounds=R, eps=eps, C=C)
res.update(sigmas=[round(p.noise_multiplier, 3) for p in plans], val=[], ema={str(b): [] for b in emas})
avg = {b: copy.deepcopy(g.state_dict()) for b in emas}
mom = {k: torch.zeros_like(v) for k, v in g.state_dict().items()}
for r in range(R):
    lr_r = lr * 0.5 * (1 + math.cos(math.pi * r / R)) if sched == "cos" else lr
    tc = TrainConfig(epochs=E, batch_size=bs, lr=lr_r, weight_decay=wd, optimizer=opt, schedule="constant", seed=r,
                     augment=False)
    before = copy.deepcopy(g.state_dict())
    fedavg_round(g, sites, plans, tc, by_size=weights == "n")
    if smom:
        now = g.state_dict()
        mom = {k: smom * mom[k] + (now[k] - before[k]) for k in mom}
        g.load_state_dict({k: before[k] + slr * mom[k] for k in mom})
    res["val"].append(round(evaluate(g, val).auc_macro, 4))
    for b in emas:
        avg[b] = {k: b * avg[b][k] + (1 - b) * g.state_dict()[k] for k in avg[b]}
        e = copy.deepcopy(g)
        e.load_state_dict(avg[b])
        res["ema"][str(b)].append(round(evaluate(e, val).auc_macro, 4))
    if (r + 1) % 5 == 0:
        print(f"{name} round {r + 1}: val {res['val'][-1]:.4f} ema "
              + " ".join(f"{b}:{res['ema'][str(b)][-1]:.4f}" for b in emas)
              + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
res["s"] = round(time.perf_counter() - t0)
with open("docs/experiments/scatter_pub_tune-results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
