"""Key material as types, the wire format, and the multi-process engine."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal
import torch
from torch import nn

from federation.errors import CiphertextError, HEError, KeyMaterialError
from federation.model import PolyAct, Residual
from he_inference.compiler import CompiledModel, compile_model
from he_inference.ir import run_plain, trace
from he_inference.keys import PublicKeys, SecretKeys, galois_elements
from he_inference.parallel import instr_cost, schedule
from he_inference.plan import SlotSimulator
from he_inference.serial import unpack
from he_inference.server import InferenceServer, decrypt_logits, encrypt_image

SHAPE = (1, 16, 16)
HE_REL_TOL = 1e-4   # CKKS at a 40-bit scale, relative to the largest logit magnitude
SIM_TOL = 1e-9


def _model() -> nn.Module:
    with torch.random.fork_rng():   # the layers' default initialisation draws from the global generator
        torch.manual_seed(3)
        return _model_unseeded()


def _model_unseeded() -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), PolyAct(2, 0.5, channels=4), nn.AvgPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), PolyAct(2, 0.5, channels=4))),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), PolyAct(2, 0.5, channels=6),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # type: ignore[no-untyped-def]
    net = trace(_model(), image_shape=SHAPE)
    x = np.random.default_rng(0).uniform(0, 1, (2, *SHAPE))
    model = compile_model(net, calibration=x)
    path = tmp_path_factory.mktemp("he") / "m.he"
    model.save(path)
    keys = SecretKeys.generate(model.params, model.plan.steps)
    return net, x, CompiledModel.load(path), path, keys


def test_public_keys_hold_only_evaluation_keys_for_the_plans_rotations(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, model, _, keys = setup
    head, parts = unpack(keys.public_bytes(), "public-keys", params_sha256=model.params.digest())
    public = keys.public()

    assert set(parts) == {"relin", "galois"}
    assert sorted(public.elements) == galois_elements(model.plan.steps, model.params.poly_degree)
    assert all(public.galois.has_key(e) for e in public.elements)
    assert public.galois.size() == len(set(public.elements))
    assert {f.name for f in dataclasses.fields(PublicKeys)} == {"params", "context", "relin", "galois", "elements",
                                                                "blob"}
    assert head["params_sha256"] == model.params.digest()


def test_the_server_refuses_secret_material(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, _, model, _, keys = setup
    private = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    raw = seal.KeyGenerator(keys.public().context).secret_key()
    spath, _ = keys.save(tmp_path / "keys")

    for bad, why in [(keys, "SecretKeys"), (private, "holds a secret key"), (raw, "SecretKey")]:
        with pytest.raises(KeyMaterialError, match=why):
            InferenceServer(model, bad)
    with pytest.raises(KeyMaterialError, match="secret key file"):
        PublicKeys.load(spath, model.params)
    with pytest.raises(KeyMaterialError, match="cannot be pickled"):
        pickle.dumps(keys)
    assert oct(spath.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_one_and_two_worker_servers_match_plaintext_and_only_the_owner_decrypts(setup) -> None:  # type: ignore[no-untyped-def]
    net, x, model, path, keys = setup
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
    assert np.abs(decrypt_logits(model, stranger, reply1) - ref).max() > 1e3 * tol


def test_the_schedule_run_on_plain_slots_equals_the_plan(setup) -> None:  # type: ignore[no-untyped-def]
    _, x, model, _, _ = setup
    plan = model.plan
    sim = SlotSimulator(plan)
    want = sim.run(model.pack(x[0]))
    for workers in (2, 3):
        tasks = schedule(plan, workers, lambda i: instr_cost(plan, i, 3, 7))
        regs = [dict(enumerate(model.pack(x[0]))) for _ in range(workers)]
        files: dict[int, np.ndarray] = {}
        ran = set()
        for row in tasks:
            for k, t in enumerate(row):
                for r, _ in t.loads:
                    regs[k][r] = files[r]  # KeyError: loaded before its producer saved it
                for i in t.instrs:
                    sim.apply(i, regs[k])
                    ran.add(i)
            for k, t in enumerate(row):
                files.update({r: regs[k][r] for r in t.saves})
                for r in t.drop:
                    regs[k].pop(r, None)
        assert ran == set(range(len(plan.instrs)))
        got = np.array([files[r][0] for r in plan.outputs])
        np.testing.assert_allclose(got, want, atol=SIM_TOL, rtol=0)
        assert all(any(row[k].instrs for row in tasks) for k in range(workers))  # every worker gets work


def test_tampered_or_mismatched_ciphertexts_are_refused(setup) -> None:  # type: ignore[no-untyped-def]
    _, x, model, _, keys = setup
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
