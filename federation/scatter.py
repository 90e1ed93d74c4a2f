# ruff: noqa: N803, N806  (J, L, U1, X: the notation of Mallat and of Kymatio)
"""A fixed scattering front end: data-independent features that DP-SGD learns from well.

Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better features")
showed that a linear model on the wavelet scattering transform of Oyallon & Mallat beats
end-to-end CNNs under DP-SGD: the features are fixed (they cost no privacy and no
gradient), so the noise falls on few parameters that separate the classes linearly.

:class:`Scattering` is the 2D scattering transform of order 2 with Morlet wavelets at
``J`` scales and ``L`` angles, the algorithm and filters of Kymatio
(``kymatio.torch.Scattering2D``, BSD-3-Clause; Andreux et al., JMLR 2020), written
here in torch because Kymatio 0.3.0 no longer imports beside SciPy ≥ 1.17. The tests
check it against Kymatio itself. Its ``K = 1 + J L + L² J (J - 1) / 2`` channels sit at
``H / 2**J``; :class:`ScatterFront` takes their logarithm and standardises each channel of
each image (an instance norm, no parameters), so nothing in it depends on any data set.

Under HE the front end is part of the client's input transform: the hospital computes it
in plaintext on its own slice, then encrypts the features (the modulus is not a
polynomial; the transform is public and holds no weights).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ScatterFront", "Scattering", "morlet_filter_bank", "scatter_channels"]

FloatArray = npt.NDArray[np.float64]

CHUNK = 8
"""Images per pass of :meth:`Scattering.forward` (0.31 s per 256 64×64 images at J = 2 here, against 2.0 s
for one pass of 256 and Kymatio's 0.41 s)."""


def scatter_channels(J: int, L: int) -> int:
    """Channels of the order-2 transform: ``1 + J L + L² J (J - 1) / 2``."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def padded_size(n: int, J: int) -> int:
    """Kymatio's padded side (``compute_padding``): ``2**J (⌊n / 2**J⌋ + 2)``, e.g. 72 for 64 at J = 2."""
    step = 1 << J
    return ((n + step) // step + 1) * step


def _gabor(m: int, sigma: float, theta: float, xi: float, slant: float = 1.0) -> npt.NDArray[np.complex128]:
    """Gabor filter on an ``m × m`` grid, periodised over 5 × 5 tiles (Kymatio's ``gabor_2d``)."""
    c, s = math.cos(theta), math.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    curv = rot @ np.diag([1.0, slant * slant]) @ rot.T / (2 * sigma * sigma)
    base = np.arange(m)
    out = np.zeros((m, m), np.complex128)
    for ex in range(-2, 3):
        for ey in range(-2, 3):
            xx, yy = np.meshgrid(base + ex * m, base + ey * m, indexing="ij")
            arg = -(curv[0, 0] * xx * xx + (curv[0, 1] + curv[1, 0]) * xx * yy + curv[1, 1] * yy * yy)
            out += np.exp(arg + 1j * xi * (xx * c + yy * s))
    out /= 2 * 3.1415 * sigma * sigma / slant  # sic: Kymatio's normalisation constant
    return out


def _morlet(m: int, sigma: float, theta: float, xi: float, slant: float) -> npt.NDArray[np.complex128]:
    """Gabor minus its envelope scaled to zero mean (Kymatio's ``morlet_2d``)."""
    wave, env = _gabor(m, sigma, theta, xi, slant), _gabor(m, sigma, theta, 0.0, slant)
    out: npt.NDArray[np.complex128] = wave - (wave.sum() / env.sum()) * env
    return out


def _periodize(f: FloatArray, res: int) -> FloatArray:
    """Fourier filter cropped to resolution ``res``: high frequencies masked, then folded (Kymatio)."""
    m = f.shape[0]
    mask = np.ones_like(f)
    length, start = int(m * (1 - 2.0**-res)), int(m * 2.0 ** (-res - 1))
    mask[start:start + length, :] = 0
    mask[:, start:start + length] = 0
    k = m // 2**res
    folded: FloatArray = (f * mask).reshape(2**res, k, 2**res, k).sum(axis=(0, 2))
    return folded


def morlet_filter_bank(m: int, J: int, L: int) -> tuple[list[list[FloatArray]], list[FloatArray]]:
    """Fourier-domain filters on an ``m × m`` grid, as Kymatio's ``filter_bank(m, m, J, L)``.

    Returns ``psi[n][res]`` for the ``J L`` wavelets in ``(j, θ)`` order and ``phi[res]``
    for the low-pass, at each resolution the transform needs.
    """
    psi: list[list[FloatArray]] = []
    for j in range(J):
        for t in range(L):
            theta = (int(L - L / 2 - 1) - t) * math.pi / L
            f = np.real(np.fft.fft2(_morlet(m, 0.8 * 2**j, theta, 0.75 * math.pi / 2**j, 4.0 / L)))
            psi.append([_periodize(f, r) for r in range(min(j + 1, max(J - 1, 1)))])
    f = np.real(np.fft.fft2(_gabor(m, 0.8 * 2 ** (J - 1), 0.0, 0.0)))
    return psi, [_periodize(f, r) for r in range(J)]


def _filter_subsample(x: torch.Tensor, bank: torch.Tensor | None, k: int) -> torch.Tensor:
    """Spectrum of ``x[..., None, :, :] * bank`` subsampled by ``k`` in space, tile by tile (no full product).

    ``x`` is ``(..., H, W)``, ``bank`` ``(F, H, W)`` (or None: no filter, no new axis). The
    spectrum is folded over its ``k × k`` tiles; summing the tiles' products in place keeps
    the largest temporary at ``1 / k²`` of the product's size, 3× faster here at J = 2.
    """
    h, w = x.shape[-2] // k, x.shape[-1] // k
    out: torch.Tensor | None = None
    for a in range(k):
        for b in range(k):
            tile = x[..., a * h:(a + 1) * h, b * w:(b + 1) * w]
            t = tile if bank is None else tile[..., None, :, :] * bank[:, a * h:(a + 1) * h, b * w:(b + 1) * w]
            out = t.clone() if out is None else out + t
    assert out is not None
    return out / (k * k)


class Scattering(nn.Module):
    """Order-2 2D scattering transform: ``(N, 1, H, W)`` → ``(N, K, H / 2**J, W / 2**J)``.

    Kymatio's algorithm: reflect-pad, wavelet products in the Fourier domain, modulus,
    low-pass and subsampling by periodisation, crop. Output channels in Kymatio's order:
    ``S0``, then ``S1`` for each ``(j1, θ1)``, then ``S2`` for each ``(j1, θ1)`` and
    ``(j2 > j1, θ2)``. The filters are non-persistent buffers: they follow from
    ``(size, J, L)`` and travel in no checkpoint or federated update.
    """

    def __init__(self, size: int, J: int = 2, L: int = 8) -> None:
        super().__init__()
        if J < 1 or L < 1 or size % 2**J:
            raise ValueError(f"scattering needs J ≥ 1, L ≥ 1 and a side divisible by 2**J, got "
                             f"J={J}, L={L}, side {size}")
        self.size, self.J, self.L = size, J, L
        self.padded = padded_size(size, J)
        psi, phi = morlet_filter_bank(self.padded, J, L)
        for r in range(len(psi[-1])):
            bank = np.stack([p[r] if len(p) > r else np.zeros_like(psi[-1][r]) for p in psi])
            self.register_buffer(f"psi{r}", torch.tensor(bank, dtype=torch.float32), persistent=False)
        for r, p in enumerate(phi):
            self.register_buffer(f"phi{r}", torch.tensor(p, dtype=torch.float32), persistent=False)

    @property
    def channels(self) -> int:
        """``K``, the number of output channels."""
        return scatter_channels(self.J, self.L)

    def _buf(self, name: str) -> torch.Tensor:
        buf: torch.Tensor = self.get_buffer(name)
        return buf

    def _low(self, u: torch.Tensor, res: int) -> torch.Tensor:
        """Low-pass at resolution ``res``, subsample to ``H / 2**J``, back to space, crop."""
        phi = self._buf(f"phi{res}")[None]
        s: torch.Tensor = torch.fft.ifft2(_filter_subsample(u, phi, 2 ** (self.J - res))[..., 0, :, :]).real
        return s[..., 1:-1, 1:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients of a batch of single-channel images."""
        if x.dim() != 4 or x.shape[1] != 1 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"scattering expects (N, 1, {self.size}, {self.size}), got {tuple(x.shape)}")
        # a few images at a time: the temporaries stay small enough for the allocator to reuse
        # (fresh page-faulted buffers for a batch of 256 made it 3x slower here)
        return torch.cat([self._forward(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)]) if len(x) else \
            x.new_zeros((0, self.channels, self.size >> self.J, self.size >> self.J))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        J, L = self.J, self.L
        p = (self.padded - self.size) // 2
        xp = F.pad(x[:, 0], (p, self.padded - self.size - p, p, self.padded - self.size - p), mode="reflect")
        X = torch.fft.fft2(xp.to(torch.float32))
        out0, out1, out2 = [self._low(X[:, None], 0)], [], []
        psi0 = self._buf("psi0")
        for j1 in range(J):
            u1 = _filter_subsample(X, psi0[j1 * L:(j1 + 1) * L], 2**j1)               # (N, L, ·, ·)
            U1 = torch.fft.fft2(torch.fft.ifft2(u1).abs())
            out1.append(self._low(U1, j1))
            second = []
            for j2 in range(j1 + 1, J):
                bank = self._buf(f"psi{j1}")[j2 * L:(j2 + 1) * L]                       # (L, ·, ·)
                u2 = _filter_subsample(U1, bank, 2 ** (j2 - j1))                        # (N, L1, L2, ·, ·)
                U2 = torch.fft.fft2(torch.fft.ifft2(u2).abs())
                second.append(self._low(U2, j2))
            if second:
                out2.append(torch.cat(second, dim=2).flatten(1, 2))                    # n1-major, then (j2, θ2)
        return torch.cat(out0 + out1 + out2, dim=1)


LOG_FLOOR = 1e-2
"""``log(LOG_FLOOR + S)``: chosen on the validation split over 1e-4, 1e-3, 3e-2 and 1e-1. On 64×64 CT slices
in [0, 1], 89 % of the coefficients (72 of the 81 channels' medians) lie below it, where the map is nearly
linear (``log F + S / F``); it compresses the large ones (the low-pass and the strong first-order channels)."""


class ScatterFront(nn.Module):
    """:class:`Scattering`, then ``log(LOG_FLOOR + S)``, then each channel of each image standardised (no parameters).

    Both steps were chosen on the validation split (five sites, DP-SGD ε = 8 from scratch,
    40 rounds × 2 epochs): the logarithm turns the coefficients' multiplicative spread into
    an additive one a linear classifier separates better (val 0.953 against 0.921); the
    per-image standardisation (``GroupNorm`` with one group per channel) beat groups of 3
    and 9 channels and no normalisation. A standardisation with the public archive's
    channel statistics scored higher in an early study (val 0.927 against 0.913) but is not
    data-independent. See ``docs/federated-training.md``.
    """

    def __init__(self, size: int, J: int = 2, L: int = 8) -> None:
        super().__init__()
        self.scattering = Scattering(size, J, L)
        k = self.scattering.channels
        self.norm = nn.GroupNorm(k, k, affine=False)

    @property
    def channels(self) -> int:
        """``K``, the number of output channels."""
        return self.scattering.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised log-scattering features (differentiable in the images, for attacks that need it)."""
        out: torch.Tensor = self.norm(torch.log(LOG_FLOOR + self.scattering(x).clamp_min(0)))
        return out
