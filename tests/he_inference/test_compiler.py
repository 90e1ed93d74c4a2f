"""The whole compiler: an encrypted forward pass against the plaintext PyTorch model, and its refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation.errors import DepthError, HEError
from federation.model import ArchConfig, HeadKind, build_model
from federation.storage import save_checkpoint
from he_inference.artifact import CompiledModel
from he_inference.client import decrypt_logits, encrypt_image
from he_inference.compiler import Calibration, CompileOptions, compile_checkpoint, compile_model
from he_inference.keys import SecretKeys
from he_inference.passes.interpret import run_plain
from he_inference.passes.trace import trace
from he_inference.server import InferenceServer
from tests.he_inference.models import CASES, images, perturbed

HE_REL_TOL = 1e-4       # CKKS at a 40-bit scale: error relative to the largest logit magnitude


@pytest.mark.parametrize(("make", "shape"), [CASES[0], CASES[2], CASES[4]])
def test_the_encrypted_forward_pass_matches_plaintext(make, shape) -> None:  # type: ignore[no-untyped-def]
    net = trace(make(), image_shape=shape)
    x = images(shape, 1)
    model = compile_model(net, calibration=x)
    keys = SecretKeys.generate(model.params, model.plan.steps)
    with InferenceServer(model, keys.public()) as server:
        reply, timings = server.infer(encrypt_image(model, keys, x[0]))
    got = decrypt_logits(model, keys, reply)
    ref = run_plain(net, x)[0]
    np.testing.assert_allclose(got, ref, atol=HE_REL_TOL * np.abs(ref).max(), rtol=0)
    assert [t.name for t in timings][-1] == net.dense.name


def test_the_depth_and_ring_follow_from_the_plan() -> None:
    model = compile_model(CASES[0].values[0](), calibration=images((1, 16, 16)))

    assert model.depth == model.levels.depth == 5   # two conv + x² stages, then the classifier
    assert model.params.depth >= model.depth
    assert model.params.poly_degree == 16384
    assert model.plan.slots == model.params.slots


def test_values_beyond_the_ckks_headroom_are_refused_at_compile_time() -> None:
    model = CASES[0].values[0]()
    with torch.no_grad():
        model.classifier.weight.mul_(1e6)

    with pytest.raises(HEError, match=r"values reach .* at classifier .* exceeds the CKKS headroom"):
        compile_model(model, calibration=images((1, 16, 16)))


def test_a_model_too_deep_for_any_ring_is_refused_with_the_figures() -> None:
    # 7 x 3 + 1; perturbed, as a trained model is: a plain ReLU fit's cubic coefficient is ~0 and is trimmed
    model = perturbed(build_model(ArchConfig(input_size=128, channels=(2,) * 7, degree=3), seed=0), 0)

    with pytest.raises(DepthError, match=r"needs multiplicative depth 22; the largest 128-bit ring .* allows 19"):
        compile_model(model)


def test_a_checkpoint_compiles_with_its_preprocessing_and_says_what_calibrated_it(tmp_path: Path) -> None:
    model = build_model(ArchConfig(input_size=16, channels=(2,), head=HeadKind.FLATTEN), seed=9).eval()
    save_checkpoint(tmp_path / "m.pt", model, meta={"classes": ["a", "b", "c"], "preprocess": {"size": 16}})
    calib = Calibration(images((1, 16, 16)), "public: 2 images")

    default = compile_checkpoint(tmp_path / "m.pt")
    calibrated = compile_checkpoint(tmp_path / "m.pt", checkpoint=default.checkpoint, calibration=calib)

    assert default.compiled.meta["calibration"] == "uniform noise"
    assert calibrated.compiled.meta["calibration"] == "public: 2 images"
    assert calibrated.compiled.meta["preprocess"] == {"size": 16}
    assert calibrated.compiled.meta["source_sha256"] == default.checkpoint.sha256
    assert calibrated.compiled.classes == ("a", "b", "c")
    assert calibrated.compiled.plan.instrs == default.compiled.plan.instrs


def test_a_rotation_key_budget_gives_fewer_keys_and_the_same_encrypted_answer() -> None:
    make, shape = CASES[0].values
    net = trace(make(), image_shape=shape)
    x = images(shape, 1)
    full = compile_model(net, calibration=x)
    budget = len(full.plan.steps) - 3
    model = compile_model(net, calibration=x, options=CompileOptions(max_rotation_keys=budget))
    keys = SecretKeys.generate(model.params, model.key_steps)

    with InferenceServer(model, keys.public()) as server:
        reply, _ = server.infer(encrypt_image(model, keys, x[0]))

    got, ref = decrypt_logits(model, keys, reply), run_plain(net, x)[0]
    np.testing.assert_allclose(got, ref, atol=HE_REL_TOL * np.abs(ref).max(), rtol=0)
    assert len(model.key_steps) <= budget < len(full.key_steps)
    assert model.plan.steps == full.plan.steps
    assert model.key_switches > full.key_switches
    assert len(keys.public().elements) == len(model.key_steps)
    assert CompiledModel.from_bytes(model.to_bytes()).key_steps == model.key_steps
    assert model.client().steps == model.key_steps   # what a client served GET /model makes keys for
