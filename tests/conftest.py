"""Shared fixtures: a tiny phantom federation, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from simulations.phantoms import PhantomConfig, generate_phantoms

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
torch.set_num_threads(1)

TINY = PhantomConfig(sites=2, per_site=12, test=9, size=32, seed=3)


@pytest.fixture(scope="session")
def tiny_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sites of 12 slices and a test set of 9, at 32x32."""
    out = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(out, config=TINY)
    return out
