"""Exploratory study of from-scratch DP-SGD on one site, as run for docs/federated-training.md (issue 19).

``python docs/experiments/scratch_start.py NAME key=value ...`` from the repository root (after
``privrad phantoms`` made runs/asan, see ``make bench-fl``); appends to /tmp/ix/results.jsonl.
Keys: act (relu|lin|linsq), c2, gain, dp (1|0), lr, epochs, bs, C, site, ch, head, eps, opt,
groups (layer|param: clip each group to C/sqrt(groups)), ema (per-step decay), actscale
(coefficients reparametrised as actscale x theta). Kept as run; not part of the package.
"""
import sys, time, json, math
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch, numpy as np
from federation.model import ArchConfig, build_model, WSConv2d, PolyAct
from federation.ingest import Preprocess, load_dataset, site_folders
from federation.train import TrainConfig, evaluate, train_epochs
from privacy.dp import DPRandomness, RoundPlan, noise_for_target, sample_rate, steps_per_epoch, train_dp_round
torch.set_num_threads(2)
name, kv = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
act = kv.get("act", "relu"); gain = float(kv.get("gain", 1)); dp = kv.get("dp", "1") == "1"
lr = float(kv.get("lr", 3e-3)); epochs = int(kv.get("epochs", 10)); bs = int(kv.get("bs", 256))
C = float(kv.get("C", 1.0)); site_i = int(kv.get("site", 0)); chans = tuple(int(c) for c in kv.get("ch", "16,32,64").split(","))
head = kv.get("head", "flatten"); eps = float(kv.get("eps", 8)); seed = int(kv.get("seed", 0)); c2 = float(kv.get("c2", 0.1))
cls_scale = float(kv.get("cls", 1)); every = int(kv.get("every", 2)); opt = kv.get("opt", "adamw")
data = Path("runs/asan"); pre = Preprocess(size=64)
site = load_dataset(site_folders(data)[site_i], preprocess=pre); val = load_dataset(data / "val", preprocess=pre)
torch.manual_seed(seed)
m = build_model(ArchConfig(input_size=64, channels=chans, head=head))
with torch.no_grad():
    for mod in m.modules():
        if isinstance(mod, WSConv2d): mod.gain.fill_(gain)
        if isinstance(mod, PolyAct) and act != "relu":
            c = mod.coefficients; c.zero_()
            c[1] = 1.0
            if act == "linsq": c[2] = c2
    m.classifier.weight.mul_(cls_scale)
groups = kv.get("groups", "")
if groups:
    import privacy.dp as pdp
    orig = pdp.PerSampleGradients.__call__
    def grouped(self, x, y):
        grads, losses = orig(self, x, y)
        keys = [".".join(n.split(".")[:2]) if n.startswith("features") else n.split(".")[0] for n in self.names]
        if groups == "param": keys = list(self.names)
        uniq = sorted(set(keys)); cg = C / len(uniq) ** 0.5
        for u in uniq:
            idx = [i for i, k in enumerate(keys) if k == u]
            norm = torch.sqrt(sum((grads[i].flatten(1) ** 2).sum(1) for i in idx))
            f = (cg / (norm + 1e-6)).clamp(max=1.0)
            for i in idx: grads[i] = grads[i] * f.view(-1, *[1] * (grads[i].dim() - 1))
        return grads, losses
    pdp.PerSampleGradients.__call__ = grouped
actscale = float(kv.get("actscale", 1))
if actscale != 1:
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, PolyAct): mod.coefficients.div_(actscale)
    def fwd(self, x):
        c = self.coefficients * actscale
        out = c[-1] * x + c[-2]
        for k in range(self.degree - 2, -1, -1):
            out = out * x + c[k]
        return out
    PolyAct.forward = fwd
ema_decay = float(kv.get("ema", 0))
import copy
ema_model = copy.deepcopy(m)
if ema_decay:
    import privacy.dp as pdp
    orig_mo = pdp.make_optimizer
    def mo(model, train, steps):
        opt, sched = orig_mo(model, train, steps)
        def hook(o, a, k):
            with torch.no_grad():
                for pe, pm in zip(ema_model.parameters(), m.parameters()):
                    pe.mul_(ema_decay).add_(pm, alpha=1 - ema_decay)
        opt.register_step_post_hook(hook)
        return opt, sched
    pdp.make_optimizer = mo
res = {"name": name, "kv": kv, "val": []}
t0 = time.perf_counter()
if dp:
    q = sample_rate(len(site), bs); spe = steps_per_epoch(len(site), bs)
    sigma = noise_for_target(eps, delta=1e-5, sample_rate=q, steps=spe * epochs)
    res["sigma"] = sigma
for e in range(0, epochs, every):
    tc = TrainConfig(epochs=every, batch_size=bs, lr=lr, optimizer=opt, schedule="constant", seed=e)
    if dp:
        r = train_dp_round(m, site, train=tc, plan=RoundPlan(sigma, C, q, every * spe, 1e-5), randomness=DPRandomness.fresh())
        loss = r.loss
    else:
        loss = train_epochs(m, site, config=tc)[-1].loss
    auc = evaluate(m, val).auc_macro
    res["val"].append(round(auc, 4))
    if ema_decay:
        ea = evaluate(ema_model, val).auc_macro
        res.setdefault("ema", []).append(round(ea, 4))
        print(f"   ema {ea:.4f}")
    print(f"{name} ep {e+every}: loss {loss:.3f} val {auc:.4f} ({time.perf_counter()-t0:.0f}s)", flush=True)
res["s"] = time.perf_counter() - t0
Path("/tmp/ix").mkdir(exist_ok=True)
with open("/tmp/ix/results.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
