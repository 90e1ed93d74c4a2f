"""Gradient-inversion audit: whether the server can rebuild a hospital's image from what it receives.

The attacker knows the global weights (it sent them). Two attacks (:class:`InversionConfig`):

* ``features`` (default): the input of the final linear layer is read off its weight and
  bias gradients exactly (Phong et al. 2017), then an image is optimised until the
  model's features match it, under a total-variation prior (feature inversion).
* ``gradients``: gradient matching (Geiping et al. 2020, "Inverting Gradients"): dummy
  images, labels known, optimised until the gradient they induce has the direction of
  the observed update.

Setting: FedSGD, the attack's best case. A site computes the gradient of one small batch
at the global weights and sends it (a plain SGD step ``w − η·g`` gives ``g`` exactly).
What the server holds differs per protection:

* ``plain``: the site's gradient itself.
* ``secagg-masked``: the same update as Flower's SecAgg+ client uploads it, quantised with
  Flower's own ``quantize`` and masked with ``pseudo_rand_gen`` (a private mask and a
  pairwise mask from an ECDH shared key). The server dequantises it as if unmasked.
* ``secagg-aggregate``: what SecAgg+ lets the server learn, the sum of all sites' updates.
* ``dp``: the site's step under DP-SGD, per-sample clipped and noised by Opacus's own
  ``DPOptimizer`` at the σ a sweep point used.

Success is the SSIM/PSNR of each true image against its best-matching reconstruction
(scikit-image); the attacker keeps the restart with the lowest matching loss, it never
sees the true images.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from federation.errors import ConfigError

__all__ = [
    "InversionConfig",
    "Reconstruction",
    "batch_gradient",
    "dp_gradient",
    "image_similarity",
    "invert",
    "recover_head_input",
    "secagg_masked_gradient",
]

log = logging.getLogger(__name__)

Grads = list[torch.Tensor]


@dataclass(frozen=True)
class InversionConfig:
    """Attack settings; the defaults are the feature attack's, measured on the 64×64 phantoms.

    ``method``: ``features`` (analytic recovery of the classifier's input, then feature
    inversion: the stronger attack on a pretrained model, whose gradient-matching
    landscape through the polynomial activations is too rough from a random start) or
    ``gradients`` (Inverting Gradients; ``lr`` 0.1 and ``tv_weight`` 1e-3 suit it).
    """

    method: str = "features"
    iterations: int = 1000
    lr: float = 0.05
    tv_weight: float = 0.1
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("features", "gradients"):
            raise ConfigError(f"method must be 'features' or 'gradients', got {self.method!r}")
        if self.iterations < 1 or self.restarts < 1:
            raise ConfigError(f"iterations and restarts must be at least 1, got {self.iterations}, {self.restarts}")
        if not self.lr > 0 or self.tv_weight < 0:
            raise ConfigError(f"lr must be positive and tv_weight not negative, got {self.lr}, {self.tv_weight}")


@dataclass(frozen=True)
class Reconstruction:
    """The attacker's best restart and how close it came to the truth."""

    images: torch.Tensor  # (K, 1, H, W) in [0, 1]
    matching_loss: float
    ssim: list[float] = field(default_factory=list)  # per true image, against its best match
    psnr: list[float] = field(default_factory=list)
    match: list[int] = field(default_factory=list)  # index of each true image's best reconstruction
    seconds: float = 0.0


def batch_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Grads:
    """The mean cross-entropy gradient of a batch: a FedSGD site's plain update."""
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    return [g.detach() for g in torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]


def dp_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, noise_multiplier: float,
                max_grad_norm: float, seed: int = 0) -> Grads:
    """The same step under DP-SGD: Opacus clips each sample's gradient, sums, adds N(0, σ²C²), averages."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    net = copy.deepcopy(model).train()  # Opacus records activations only in training mode (no BN, no dropout here)
    gsm = GradSampleModule(net)
    params = [p for p in gsm.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # Opacus draws its noise from torch's generator (secure_mode off)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=noise_multiplier,
                          max_grad_norm=max_grad_norm, expected_batch_size=len(images))
    opt.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss: torch.Tensor = nn.functional.cross_entropy(gsm(images), labels)
        loss.backward()  # type: ignore[no-untyped-call]
    opt.pre_step()  # clip per sample, add noise, scale: p.grad is what the site would apply
    grads = [p.grad.detach().clone() for p in params if p.grad is not None]
    gsm._close()
    return grads


def secagg_masked_gradient(grads: Grads, *, lr: float, clipping_range: float = 8.0,
                           target_range: int = 1 << 22, mod_range: int = 1 << 32) -> Grads:
    """What the server receives from one site under SecAgg+, read as if it were a plain update.

    The site's step ``-lr·g`` is quantised and masked exactly as Flower's ``secaggplus_mod``
    does (private mask + one pairwise mask, modulo ``mod_range``); the attacker dequantises
    the masked integers and divides by ``-lr`` to get a "gradient".
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    update = [(-lr * g).numpy().astype(np.float64) for g in grads]
    quantized = quantize(update, clipping_range, target_range)
    dims = [a.shape for a in quantized]
    private = pseudo_rand_gen(os.urandom(32), mod_range, dims)
    mine, peer = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    pairwise = pseudo_rand_gen(generate_shared_key(mine, peer.public_key()), mod_range, dims)
    masked = parameters_mod(parameters_addition(parameters_addition(quantized, private), pairwise), mod_range)
    seen = dequantize([a % target_range for a in masked], clipping_range, target_range)  # no unmasking possible
    return [torch.as_tensor(a / -lr, dtype=torch.float32) for a in seen]


def _tv(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _cosine_distance(a: Grads, b: Grads) -> torch.Tensor:
    dot = torch.stack([(x * y).sum() for x, y in zip(a, b, strict=True)]).sum()
    na = torch.stack([(x * x).sum() for x in a]).sum().sqrt()
    nb = torch.stack([(y * y).sum() for y in b]).sum().sqrt()
    return 1 - dot / (na * nb + 1e-12)


def recover_head_input(model: nn.Module, target: Grads) -> torch.Tensor:
    """The input of the model's final ``nn.Linear`` read off its gradients (Phong et al. 2017).

    For one record, ``dL/dW_k = dL/dz_k · h`` and ``dL/db_k = dL/dz_k``, so ``h = dW_k / db_k``
    exactly (largest ``|dL/db_k|`` for stability); for a batch or a sum it is a weighted
    mix of the records' features.

    Raises
    ------
    ConfigError
        The model does not end in a linear layer with a bias.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or linears[-1].bias is None:
        raise ConfigError("feature recovery needs a model that ends in nn.Linear with a bias; use method='gradients'")
    head = linears[-1]
    index = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    gw, gb = target[index[id(head.weight)]], target[index[id(head.bias)]]
    k = int(gb.abs().argmax())
    return gw[k] / gb[k]


def invert(model: nn.Module, target: Grads, labels: torch.Tensor, *, shape: Sequence[int],
           config: InversionConfig = InversionConfig(),
           progress: Callable[[int], None] | None = None) -> Reconstruction:
    """Reconstruct the images behind the update ``target`` of ``model``.

    ``method="features"``: recover the classifier's input analytically
    (:func:`recover_head_input`), then optimise one image until the model's features
    match it (relative L2) under a total-variation prior. ``method="gradients"``: Inverting
    Gradients, one dummy image per label optimised until its gradient has the direction
    of ``target`` (signed Adam steps). The attacker keeps the restart with the lowest
    matching loss. ``progress(n)`` is called every 100 iterations with the number done.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(target):
        raise ConfigError(f"target has {len(target)} gradients, the model {len(params)} parameters")
    model.eval()
    features = config.method == "features"
    captured: dict[str, torch.Tensor] = {}
    hook = None
    if features:
        wanted = recover_head_input(model, target)
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        hook = head.register_forward_hook(lambda _m, inp, _out: captured.__setitem__("h", inp[0]))
    count = 1 if features else len(labels)

    def matching(x: torch.Tensor, *, graph: bool) -> torch.Tensor:
        if features:
            model(x)
            return ((captured["h"][0] - wanted) ** 2).sum() / (wanted**2).sum()
        loss = nn.functional.cross_entropy(model(x), labels)
        return _cosine_distance(list(torch.autograd.grad(loss, params, create_graph=graph)), target)

    gen = torch.Generator().manual_seed(config.seed)
    best: tuple[float, torch.Tensor] | None = None
    start = time.perf_counter()
    milestones = [int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    try:
        for _ in range(config.restarts):
            x = (0.5 + 0.01 * torch.randn((count, *shape), generator=gen)).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=config.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            for it in range(config.iterations):
                opt.zero_grad()
                objective = matching(x, graph=True) + config.tv_weight * _tv(x)
                x.grad, = torch.autograd.grad(objective, [x])
                if not features:
                    x.grad.sign_()  # signed gradients, as in Inverting Gradients
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(0, 1)
                if progress is not None and (it + 1) % 100 == 0:
                    progress(100)
            final = float(matching(x.detach(), graph=False).detach())
            if best is None or final < best[0]:
                best = (final, x.detach().clone())
    finally:
        if hook is not None:
            hook.remove()
    assert best is not None
    return Reconstruction(images=best[1], matching_loss=best[0], seconds=time.perf_counter() - start)


def image_similarity(truth: torch.Tensor, recon: torch.Tensor) -> tuple[float, float]:
    """SSIM and PSNR (dB) of two ``(1, H, W)`` images in [0, 1] (scikit-image, data range 1)."""
    a, b = truth.squeeze(0).double().numpy(), recon.squeeze(0).double().numpy()
    ssim = float(structural_similarity(a, b, data_range=1.0))  # type: ignore[no-untyped-call]
    with np.errstate(divide="ignore"):
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))  # type: ignore[no-untyped-call]
    return ssim, psnr


def score(truth: torch.Tensor, rec: Reconstruction) -> Reconstruction:
    """``rec`` with SSIM/PSNR of each true image against its best-matching reconstruction (by SSIM)."""
    ssim, psnr, match = [], [], []
    for t in truth:
        pairs = [image_similarity(t, r) for r in rec.images]
        k = int(np.argmax([s for s, _ in pairs]))
        ssim.append(pairs[k][0])
        psnr.append(pairs[k][1])
        match.append(k)
    return Reconstruction(rec.images, rec.matching_loss, ssim, psnr, match, rec.seconds)
