"""Exploratory study of a fixed scattering front end under DP-SGD, as run for docs/federated-training.md (issue 19).

``python docs/experiments/scatter_study.py NAME key=value ...`` from the repository root with runs/asan made
(see ``make bench-fl``) and Kymatio installed (``.[dev]``); appends to /tmp/ix/scat.jsonl. One site (site=0)
or, with fed=1, all five sites averaged by sample count after each round (FedAvg without Flower or SecAgg+,
the same DP-SGD and accountant: ε per site over all rounds). Features are Kymatio's Scattering2D (mode=mod)
or its squared-modulus variant (mode=sq); norm: public-archive channel standardisation (default), none, or
gnG (per-image GroupNorm with G groups). Kept as run; not part of the package.
"""
import sys, time, json
from pathlib import Path
sys.path.insert(0, "/work/main")
import torch, torch.nn as nn
import scipy.special
scipy.special.sph_harm = getattr(scipy.special, "sph_harm", None) or scipy.special.sph_harm_y
from kymatio.torch import Scattering2D
from federation.ingest import Preprocess, load_dataset, site_folders, ImageSet
from federation.model import WSConv2d, PolyAct, ActInit
from federation.train import TrainConfig, evaluate, train_epochs
from privacy.dp import DPRandomness, RoundPlan, noise_for_target, sample_rate, steps_per_epoch, train_dp_round
torch.set_num_threads(2)
name, kv = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
mode = kv.get("mode", "mod"); J = int(kv.get("J", 2)); L = int(kv.get("L", 8)); order = int(kv.get("order", 2))
lr = float(kv.get("lr", 3e-3)); epochs = int(kv.get("epochs", 10)); bs = int(kv.get("bs", 256)); C = float(kv.get("C", 1.0))
dp = kv.get("dp", "1") == "1"; eps = float(kv.get("eps", 8)); clf = kv.get("clf", "cnn"); every = int(kv.get("every", 2))
site_i = int(kv.get("site", 0)); opt = kv.get("opt", "adamw")
data = Path("/work/main/runs/asan"); pre = Preprocess(size=64)
site = load_dataset(site_folders(data)[site_i], preprocess=pre); val = load_dataset(data / "val", preprocess=pre)
pub = load_dataset(data / "public", preprocess=pre)
if mode == "sq":
    import kymatio.backend.torch_backend as kb
    from kymatio.scattering2d.backend import torch_backend as sb
    def sqmod(cls, x):
        return (x[..., 0] ** 2 + x[..., 1] ** 2)[..., None]
    sb.TorchBackend2D.modulus = classmethod(lambda cls, x: (x[..., 0] ** 2 + x[..., 1] ** 2)[..., None].contiguous())
S = Scattering2D(J=J, shape=(64, 64), L=L, max_order=order)
def feats(x):
    out = []
    for i in range(0, len(x), 500):
        out.append(S(x[i:i + 500]).flatten(1, 2))
    return torch.cat(out)
t0 = time.perf_counter()
if kv.get('fed') == '1':
    
    sites = [load_dataset(f, preprocess=pre) for f in site_folders(data)]
    fp = feats(pub.images); fv = feats(val.images)
    mu = fp.mean((0, 2, 3), keepdim=True); sd = fp.std((0, 2, 3), keepdim=True) + 1e-6
    if kv.get('norm') == 'none': mu, sd = 0 * mu, 0 * sd + 1
    if kv.get('norm', '').startswith('gn'):
        G = int(kv['norm'][2:]); mu, sd = 0 * mu, 0 * sd + 1
        _f = feats
        feats = lambda x: torch.nn.functional.group_norm(_f(x), G, eps=1e-5)
        fv = feats(val.images)
    fv = (fv - mu) / sd
    S_va = ImageSet(fv.contiguous(), val.labels, val.classes, val.files)
    S_sites = [ImageSet(((feats(s.images) - mu) / sd).contiguous(), s.labels, s.classes, s.files) for s in sites]
    print("features", f"{time.perf_counter()-t0:.1f}s", flush=True)
    ch = fv.shape[1]; side = fv.shape[-1]
    class Flat(nn.Module):
        def forward(self, x): return x.flatten(1)
    torch.manual_seed(0)
    g = nn.Sequential(Flat(), nn.Linear(ch * side * side, 3)); nn.init.zeros_(g[-1].weight); nn.init.zeros_(g[-1].bias)
    R = int(kv.get("rounds", 10)); E = int(kv.get("local", 3))
    import copy
    plans = []
    for s in S_sites:
        q = sample_rate(len(s), bs); spe = steps_per_epoch(len(s), bs)
        plans.append(RoundPlan(noise_for_target(eps, delta=1e-5, sample_rate=q, steps=spe * E * R), C, q, E * spe, 1e-5))
    print("sigmas", [round(p.noise_multiplier, 3) for p in plans])
    res = {"name": name, "kv": kv, "val": []}
    for r in range(R):
        tc = TrainConfig(epochs=E, batch_size=bs, lr=lr, optimizer=opt, schedule="constant", seed=r, augment=False)
        states, ns = [], []
        for s, pl in zip(S_sites, plans):
            m = copy.deepcopy(g); train_dp_round(m, s, train=tc, plan=pl, randomness=DPRandomness.fresh())
            states.append(m.state_dict()); ns.append(len(s))
        tot = sum(ns)
        g.load_state_dict({k: sum(st[k] * n for st, n in zip(states, ns)) / tot for k in states[0]})
        auc = evaluate(g, S_va).auc_macro; res["val"].append(round(auc, 4))
        print(f"{name} round {r+1}: val {auc:.4f} ({time.perf_counter()-t0:.0f}s)", flush=True)
    res["s"] = time.perf_counter() - t0
    with open("/tmp/ix/scat.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
    raise SystemExit
fs, fv, fp = feats(site.images), feats(val.images), feats(pub.images)
post = kv.get("post", "")
if post == "sqrt":
    fs, fv, fp = fs.clamp(min=0).sqrt(), fv.clamp(min=0).sqrt(), fp.clamp(min=0).sqrt()
elif post.startswith("poly"):  # least-squares polynomial fit of sqrt on [0, q-quantile of public], per channel scale
    import numpy as np
    deg = int(post[4:] or 2)
    scale = fp.transpose(0, 1).flatten(1).quantile(0.99, dim=1)[None, :, None, None] if False else torch.quantile(fp.transpose(0,1).flatten(1)[:, ::7], 0.99, dim=1)[None, :, None, None]
    t = np.linspace(0, 1, 2001); c = np.polynomial.polynomial.polyfit(t, np.sqrt(t), deg)
    def pf(f):
        u = f / scale; out = torch.zeros_like(u)
        for k in range(deg, -1, -1): out = out * u + float(c[k])
        return out
    fs, fv, fp = pf(fs), pf(fv), pf(fp)
mu = fp.mean((0, 2, 3), keepdim=True); sd = fp.std((0, 2, 3), keepdim=True) + 1e-6
fs, fv = (fs - mu) / sd, (fv - mu) / sd
print("features", fs.shape, f"{time.perf_counter()-t0:.1f}s", flush=True)
S_tr = ImageSet(fs.contiguous(), site.labels, site.classes, site.files); S_va = ImageSet(fv.contiguous(), val.labels, val.classes, val.files)
ch = fs.shape[1]; side = fs.shape[-1]; w = int(kv.get("w", 64))
class Flat(nn.Module):
    def forward(self, x): return x.flatten(1)
torch.manual_seed(0)
if clf == "lin":
    m = nn.Sequential(Flat(), nn.Linear(ch * side * side, 3))
else:
    m = nn.Sequential(WSConv2d(ch, w, 3, padding=1), PolyAct(2, 0.5, channels=w, init=ActInit(kv.get("act", "identity"))), nn.AvgPool2d(2),
                      WSConv2d(w, w, 3, padding=1), PolyAct(2, 0.5, channels=w, init=ActInit(kv.get("act", "identity"))), nn.AvgPool2d(2),
                      Flat(), nn.Linear(w * (side // 4) ** 2, 3))
    if "gain" in kv:
        for mod in m.modules():
            if isinstance(mod, WSConv2d): mod.gain.data.fill_(float(kv["gain"]))
if kv.get("zero", "1") == "1":
    nn.init.zeros_(m[-1].weight); nn.init.zeros_(m[-1].bias)
res = {"name": name, "kv": kv, "val": []}
if dp:
    q = sample_rate(len(site), bs); spe = steps_per_epoch(len(site), bs)
    sigma = noise_for_target(eps, delta=1e-5, sample_rate=q, steps=spe * epochs); res["sigma"] = sigma
for e in range(0, epochs, every):
    tc = TrainConfig(epochs=every, batch_size=bs, lr=lr, optimizer=opt, schedule="constant", seed=e, augment=False)
    if dp:
        r = train_dp_round(m, S_tr, train=tc, plan=RoundPlan(sigma, C, q, every * spe, 1e-5), randomness=DPRandomness.fresh()); loss = r.loss
    else:
        loss = train_epochs(m, S_tr, config=tc)[-1].loss
    auc = evaluate(m, S_va).auc_macro; res["val"].append(round(auc, 4))
    print(f"{name} ep {e+every}: loss {loss:.3f} val {auc:.4f} ({time.perf_counter()-t0:.0f}s)", flush=True)
res["s"] = time.perf_counter() - t0
with open("/tmp/ix/scat.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
