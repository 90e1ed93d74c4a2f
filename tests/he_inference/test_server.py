"""The inference server on one process and on the worker pool, against the plaintext network."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from torch import nn

from federation.errors import CiphertextError, HEError, KeyMaterialError
from federation.model import PolyAct
from he_inference import engine as engine_module
from he_inference.client import decrypt_logits, encrypt_image
from he_inference.compiler import compile_model
from he_inference.engine import Engine
from he_inference.keys import PublicKeys, SecretKeys
from he_inference.passes.interpret import run_plain
from he_inference.server import InferenceServer
from he_inference.service import create_app
from he_inference.tokens import TokenStore
from tests.he_inference.conftest import Compiled
from tests.he_inference.models import SHAPE
from tests.he_inference.tiny import tiny_compiled

HE_REL_TOL = 1e-4   # CKKS at a 40-bit scale, relative to the largest logit magnitude
STRANGER_FACTOR = 1e3   # a stranger's decryption misses by at least this many tolerances
DOWN_BUDGET_S = 30.0    # /health turns 503 within this once every worker is dead for good (measured: under 1 s)


@pytest.mark.slow
def test_one_and_two_worker_servers_match_plaintext_and_only_the_owner_decrypts(compiled: Compiled) -> None:
    net, x, model, path, keys = compiled.net, compiled.images, compiled.model, compiled.path, compiled.keys
    upload = encrypt_image(model, keys, x[0])
    ref = run_plain(net, x[:1])[0]
    tol = HE_REL_TOL * np.abs(ref).max()

    public = PublicKeys.from_bytes(keys.public_bytes(), model.params)
    with InferenceServer(model, public) as one:
        reply1, _ = one.infer(upload)
    with InferenceServer(model, public, workers=2, model_path=path) as two:
        reply2, timings = two.infer(upload)
        reply2b, _ = two.infer(upload)  # the pool serves several requests

    for reply in (reply1, reply2, reply2b):
        np.testing.assert_allclose(decrypt_logits(model, keys, reply), ref, atol=tol, rtol=0)
    assert [t.name for t in timings] == [name for name, _, _ in model.plan.layers]
    stranger = SecretKeys.generate(model.params, model.plan.steps)
    assert np.abs(decrypt_logits(model, stranger, reply1) - ref).max() > STRANGER_FACTOR * tol


def test_tampered_or_mismatched_ciphertexts_are_refused(compiled: Compiled) -> None:
    x, model, keys = compiled.images, compiled.model, compiled.keys
    upload = bytearray(encrypt_image(model, keys, x[0]))
    server = InferenceServer(model, keys.public())

    upload[-100] ^= 0x01
    with pytest.raises(CiphertextError, match="modified"):
        server.infer(bytes(upload))
    with pytest.raises(CiphertextError, match="holds encrypted-image, expected encrypted-logits"):
        decrypt_logits(model, keys, encrypt_image(model, keys, x[0]))
    with pytest.raises(CiphertextError, match="not a privrad HE file"):
        server.infer(b"\x00" * 100)

    other = compile_model(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(2, 0.5, channels=2),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).eval(),
                          image_shape=SHAPE)
    foreign = encrypt_image(other, SecretKeys.generate(other.params, other.plan.steps), x[0])
    with pytest.raises(CiphertextError, match=r"made for other (model|CKKS parameters)"):
        server.infer(foreign)
    with pytest.raises(KeyMaterialError, match="generated for another model"):
        InferenceServer(model, SecretKeys.generate(model.params, other.plan.steps).public())
    with pytest.raises(HEError, match=r"image shape \(1, 8, 8\) does not match the model's input \(1, 16, 16\)"):
        encrypt_image(model, keys, np.zeros((1, 8, 8)))


def _health(app: FastAPI) -> tuple[int, dict[str, Any]]:
    """The service's own /health handler, called as the router would (status, JSON body)."""
    route = next(r for r in app.routes if isinstance(r, APIRoute) and r.path == "/health")
    response = route.endpoint()
    return response.status_code, json.loads(response.body)


def test_health_reports_the_pool_and_is_503_once_no_worker_can_run(tmp_path: Path) -> None:
    tiny = tiny_compiled(tmp_path)
    TokenStore().save(tmp_path / "tokens.json")   # /health needs no token
    app = create_app(tiny.path, tokens=tmp_path / "tokens.json", workers=2)
    try:
        ok = _health(app)
        tiny.path.unlink()   # the model file is gone: a replacement worker cannot start
        for pid in app.state.inference.pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + DOWN_BUDGET_S
        while (down := _health(app))[0] != 503:
            assert time.monotonic() < deadline, down
            time.sleep(0.05)
    finally:
        app.state.inference.close()

    assert ok == (200, {"status": "ok", "model_sha256": tiny.model.digest, "clients_loaded": 0,
                        "pool": {"workers": 2, "alive": 2, "respawns": 0, "state": "ok", "passes": 0, "failures": 0}})
    assert down[1]["status"] == "degraded"
    assert down[1]["pool"]["alive"] == 0
    assert down[1]["pool"]["state"] == "degraded"


def test_a_model_whose_plaintexts_exceed_the_free_memory_is_refused_with_the_figures(
        compiled: Compiled, monkeypatch: pytest.MonkeyPatch) -> None:
    free = compiled.model.plaintext_bytes // 2

    class Tight:
        available = free

    encoded = Engine(compiled.model)   # what SEAL holds: 8 bytes per coefficient of every encoded plaintext
    assert compiled.model.plaintext_bytes == sum(8 * pt.coeff_count() for pt in encoded._plain.values())

    monkeypatch.setattr(engine_module.psutil, "virtual_memory", lambda: Tight())
    with pytest.raises(HEError, match=r"plaintexts takes [\d.]+ GiB and this machine has [\d.]+ GiB available"):
        Engine(compiled.model)
