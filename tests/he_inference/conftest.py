"""One small compiled model, saved and reloaded, with a client's keys: shared by the key, server and pool tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from he_inference.artifact import CompiledModel
from he_inference.compiler import compile_model
from he_inference.keys import SecretKeys
from he_inference.passes.ir import Network
from he_inference.passes.trace import trace
from tests.he_inference.models import SHAPE, residual_net


@dataclass(frozen=True)
class Compiled:
    net: Network
    images: np.ndarray
    model: CompiledModel   # as reloaded from its file
    path: Path
    keys: SecretKeys


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    net = trace(residual_net(), image_shape=SHAPE)
    x = np.random.default_rng(0).uniform(0, 1, (2, *SHAPE))
    model = compile_model(net, calibration=x)
    path = tmp_path_factory.mktemp("he") / "m.he"
    model.save(path)
    return Compiled(net, x, CompiledModel.load(path), path, SecretKeys.generate(model.params, model.plan.steps))
