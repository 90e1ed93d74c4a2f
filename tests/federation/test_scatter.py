# ruff: noqa: N803  (J, L: the notation of Mallat and of Kymatio)
"""The scattering front end against Kymatio, the reference implementation it follows."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch

from federation.scatter import ScatterFront, Scattering, morlet_filter_bank, padded_size, scatter_channels

# Kymatio 0.3.0 imports ``scipy.special.sph_harm`` (for its 3D transform), which SciPy 1.17
# removed; the 2D code under test never calls it.
if not hasattr(scipy.special, "sph_harm"):
    scipy.special.sph_harm = scipy.special.sph_harm_y
from kymatio.scattering2d.filter_bank import filter_bank
from kymatio.torch import Scattering2D

FILTER_ATOL = 1e-6   # Kymatio builds its filters in float32/complex64, these in float64
OUTPUT_RTOL = 1e-5   # relative to the largest coefficient: float32 FFTs on both sides


@pytest.mark.parametrize(("size", "J", "L"), [(64, 2, 8), (32, 3, 4), (16, 1, 6)])
def test_filters_match_kymatio(size: int, J: int, L: int) -> None:
    m = padded_size(size, J)
    psi, phi = morlet_filter_bank(m, J, L)
    ref = filter_bank(m, m, J, L)
    assert len(psi) == len(ref["psi"]) == J * L
    for mine, theirs in zip(psi, ref["psi"], strict=True):
        assert len(mine) == len(theirs["levels"])
        for a, b in zip(mine, theirs["levels"], strict=True):
            np.testing.assert_allclose(a, b, atol=FILTER_ATOL)
    for a, b in zip(phi, ref["phi"]["levels"], strict=True):
        np.testing.assert_allclose(a, b, atol=FILTER_ATOL)


@pytest.mark.parametrize(("size", "J", "L"), [(64, 2, 8), (32, 3, 4), (32, 1, 6)])
def test_transform_matches_kymatio(size: int, J: int, L: int) -> None:
    x = torch.rand(11, 1, size, size, generator=torch.Generator().manual_seed(size + J))  # > CHUNK: two passes
    ours = Scattering(size, J, L)(x)
    theirs = Scattering2D(J=J, shape=(size, size), L=L)(x[:, 0])
    assert ours.shape == theirs.shape == (11, scatter_channels(J, L), size // 2**J, size // 2**J)
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < OUTPUT_RTOL


def test_front_standardises_each_channel_and_has_no_state() -> None:
    front = ScatterFront(32, 2, 4)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out = front(x)
    assert out.shape == (3, scatter_channels(2, 4), 8, 8)
    torch.testing.assert_close(out.mean(dim=(2, 3)), torch.zeros(3, out.shape[1]), atol=1e-5, rtol=0)
    assert front.state_dict() == {}        # nothing to ship
    assert not list(front.parameters())   # nothing to train
    x.requires_grad_(True)
    front(x).square().sum().backward()                                 # differentiable in the image
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("size", "J", "L"), [(30, 2, 8), (64, 0, 8), (64, 2, 0)])
def test_bad_shapes_are_refused(size: int, J: int, L: int) -> None:
    with pytest.raises(ValueError, match="scattering needs"):
        Scattering(size, J, L)


def test_wrong_input_shape_names_the_expected_one() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        Scattering(32, 2, 4)(torch.zeros(2, 1, 64, 64))
