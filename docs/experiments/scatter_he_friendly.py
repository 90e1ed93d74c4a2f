"""Exploratory study: HE-friendly (polynomial) stand-ins for the scattering modulus, one site, DP-SGD ε 8.

First-order Morlet responses (11×11 kernels), squared modulus, then sqrt (mod=sqrt, not a polynomial), a
least-squares polynomial fit of sqrt on [0, quantile q of the public archive] (mod=poly deg=d), or nothing
(mod=none); 4×4 average pool, linear classifier. Appends to /tmp/ix/front.jsonl. Kept as run.
"""
import sys, time, json
sys.path.insert(0, "/work/main")
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
import scipy.special; scipy.special.sph_harm = scipy.special.sph_harm_y
from kymatio.scattering2d.filter_bank import filter_bank
from pathlib import Path
from federation.ingest import Preprocess, load_dataset, site_folders, ImageSet
from federation.model import WSConv2d, PolyAct, ActInit
from federation.train import TrainConfig, evaluate, train_epochs
from privacy.dp import DPRandomness, RoundPlan, noise_for_target, sample_rate, steps_per_epoch, train_dp_round
torch.set_num_threads(2)
name, kv = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
J = int(kv.get("J", 2)); L = int(kv.get("L", 8)); k = int(kv.get("k", 11)); modf = kv.get("mod", "sqrt"); pool = int(kv.get("pool", 4))
lr = float(kv.get("lr", 3e-3)); epochs = int(kv.get("epochs", 10)); bs = int(kv.get("bs", 256)); C = float(kv.get("C", 1.0))
dp = kv.get("dp", "1") == "1"; eps = float(kv.get("eps", 8)); every = int(kv.get("every", 2)); order = int(kv.get("order", 1))
fb = filter_bank(64, 64, J, L); r = k // 2
def spatial(f):
    s = np.fft.fftshift(np.fft.ifft2(f)); return s[32 - r:32 + r + 1, 32 - r:32 + r + 1]
ker = [spatial(p['levels'][0]) for p in fb['psi']]
W = torch.tensor(np.stack([np.real(ker), np.imag(ker)], 1).reshape(-1, 1, k, k), dtype=torch.float32)  # (2*JL,1,k,k) re,im interleaved
phi = torch.tensor(np.real(spatial(fb['phi']['levels'][0])), dtype=torch.float32)[None, None]
data = Path("/work/main/runs/asan"); pre = Preprocess(size=64)
site = load_dataset(site_folders(data)[int(kv.get("site", 0))], preprocess=pre); val = load_dataset(data / "val", preprocess=pre)
pub = load_dataset(data / "public", preprocess=pre)
def u1(x):  # squared modulus of each wavelet response, full res
    y = F.conv2d(x, W, padding=r); return (y ** 2).view(len(x), -1, 2, 64, 64).sum(2)
with torch.no_grad():
    up = torch.cat([u1(pub.images[i:i+250]) for i in range(0, len(pub), 250)])
    scale = torch.quantile(up.transpose(0, 1).flatten(1)[:, ::97], float(kv.get("q", 0.999)), dim=1)[None, :, None, None]
deg = int(kv.get("deg", 3)); t = np.linspace(0, 1, 2001); cf = np.polynomial.polynomial.polyfit(t, np.sqrt(t), deg)
def compress(u):
    if modf == "sqrt": return u.clamp(min=0).sqrt()
    if modf == "none": return u / scale
    z = u / scale; out = torch.zeros_like(z)
    for kk in range(deg, -1, -1): out = out * z + float(cf[kk])
    return out
def feats(x):
    with torch.no_grad():
        out = []
        for i in range(0, len(x), 250):
            xb = x[i:i+250]; m = compress(u1(xb))
            lp = F.avg_pool2d(F.conv2d(xb, phi, padding=r), pool) if kv.get("lp", "1") == "1" else None
            parts = [F.avg_pool2d(m, pool)] + ([lp] if lp is not None else [])
            out.append(torch.cat(parts, 1))
        return torch.cat(out)
t0 = time.perf_counter()
fs, fv, fp = feats(site.images), feats(val.images), feats(pub.images)
mu = fp.mean((0, 2, 3), keepdim=True); sd = fp.std((0, 2, 3), keepdim=True) + 1e-6
fs, fv = (fs - mu) / sd, (fv - mu) / sd
print("features", fs.shape, f"{time.perf_counter()-t0:.1f}s", flush=True)
S_tr = ImageSet(fs.contiguous(), site.labels, site.classes, site.files); S_va = ImageSet(fv.contiguous(), val.labels, val.classes, val.files)
class Flat(nn.Module):
    def forward(self, x): return x.flatten(1)
torch.manual_seed(0)
m = nn.Sequential(Flat(), nn.Linear(fs[0].numel(), 3)); nn.init.zeros_(m[-1].weight); nn.init.zeros_(m[-1].bias)
res = {"name": name, "kv": kv, "val": []}
if dp:
    q = sample_rate(len(site), bs); spe = steps_per_epoch(len(site), bs)
    sigma = noise_for_target(eps, delta=1e-5, sample_rate=q, steps=spe * epochs); res["sigma"] = sigma
for e in range(0, epochs, every):
    tc = TrainConfig(epochs=every, batch_size=bs, lr=lr, optimizer="adamw", schedule="constant", seed=e, augment=False)
    if dp:
        rr = train_dp_round(m, S_tr, train=tc, plan=RoundPlan(sigma, C, q, every * spe, 1e-5), randomness=DPRandomness.fresh()); loss = rr.loss
    else:
        loss = train_epochs(m, S_tr, config=tc)[-1].loss
    auc = evaluate(m, S_va).auc_macro; res["val"].append(round(auc, 4))
    print(f"{name} ep {e+every}: loss {loss:.3f} val {auc:.4f} ({time.perf_counter()-t0:.0f}s)", flush=True)
res["s"] = time.perf_counter() - t0
with open("/tmp/ix/front.jsonl", "a") as f: f.write(json.dumps(res) + "\n")
