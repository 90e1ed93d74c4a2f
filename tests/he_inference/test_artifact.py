"""The ``.he`` file: it reloads without PyTorch, runs the same, and refuses tampering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from federation.errors import CiphertextError
from he_inference.artifact import ClientModel, CompiledModel
from he_inference.compiler import compile_model
from he_inference.passes.interpret import SlotSimulator, run_plain
from he_inference.passes.trace import trace
from tests.he_inference.models import CASES, images

SIM_TOL = 1e-9          # the slot simulator is exact up to float64 rounding


def test_a_compiled_model_reloads_without_pytorch_and_runs_the_same(tmp_path: Path) -> None:
    model = CASES[2].values[0]()
    x = images((1, 16, 16))
    compiled = compile_model(model, calibration=x, image_shape=(1, 16, 16))

    compiled.save(tmp_path / "m.he")
    loaded = CompiledModel.load(tmp_path / "m.he")

    assert loaded.params == compiled.params
    assert loaded.plan.instrs == compiled.plan.instrs
    assert loaded.levels == compiled.levels
    assert loaded.stats == compiled.stats
    assert loaded.digest == compiled.digest
    got = SlotSimulator(loaded.plan).run(loaded.pack(x[0]))
    np.testing.assert_allclose(got, run_plain(trace(model, image_shape=(1, 16, 16)), x[:1])[0], atol=SIM_TOL)


def test_saving_what_was_loaded_writes_the_same_bytes(tmp_path: Path) -> None:
    compiled = compile_model(CASES[4].values[0](), calibration=images((1, 16, 16)), image_shape=(1, 16, 16),
                             meta={"source": "test"})
    first = compiled.to_bytes()

    rebuilt = CompiledModel.assemble(compiled.params, compiled.plan, image_shape=compiled.image_shape,
                                     transform=compiled.transform, classes=compiled.classes,
                                     calibrated_max=compiled.calibrated_max, meta=compiled.meta)

    assert rebuilt.to_bytes() == first
    assert CompiledModel.from_bytes(first).to_bytes() == first


def test_a_tampered_model_file_is_refused(tmp_path: Path) -> None:
    compiled = compile_model(CASES[0].values[0](), calibration=images((1, 16, 16)))
    data = bytearray(compiled.to_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bad.he").write_bytes(bytes(data))

    with pytest.raises(CiphertextError, match="does not match its hash"):
        CompiledModel.load(tmp_path / "bad.he")


def test_the_client_view_round_trips_and_packs_as_the_model_does() -> None:
    compiled = compile_model(CASES[4].values[0](), calibration=images((1, 16, 16)), image_shape=(1, 16, 16))
    image = images((1, 16, 16), 1)[0]

    client = ClientModel.from_dict(compiled.client().to_dict())

    assert client == compiled.client()
    assert client.steps == compiled.plan.steps
    assert all(np.array_equal(a, b) for a, b in zip(client.pack(image), compiled.pack(image), strict=True))


def test_a_client_view_with_a_wrong_parameter_hash_is_refused() -> None:
    compiled = compile_model(CASES[4].values[0](), calibration=images((1, 16, 16)), image_shape=(1, 16, 16))

    with pytest.raises(CiphertextError, match="model description: parameter hash mismatch"):
        ClientModel.from_dict({**compiled.client().to_dict(), "params_sha256": "0" * 64})


# sha256 of this model's .he file as the compiler wrote it before it was split into passes (commit 06f871f)
PATCHIFY_DIGEST = "0b7a262edaf0e1418f6e8e43e5bd313972251a48f596ba136d54c267096ad224"


def test_the_artifact_bytes_are_those_the_single_module_compiler_wrote() -> None:
    compiled = compile_model(CASES[4].values[0](), calibration=images((1, 16, 16)), image_shape=(1, 16, 16),
                             meta={"case": "patch4"})

    assert compiled.digest == PATCHIFY_DIGEST
