"""Key material as types: what the public keys hold, and that secret material never reaches the server."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal

from federation.errors import KeyMaterialError
from he_inference.ckks import CKKSParams
from he_inference.keys import PublicKeys, SecretKeys, galois_elements, key_switches, naf, power_of_two_steps
from he_inference.serial import ContainerKind, unpack
from he_inference.server import InferenceServer
from tests.he_inference.conftest import Compiled

ROTATION_ATOL = 1e-5   # a fresh encryption and up to a few key switches at a 40-bit scale, N = 8192


def test_public_keys_hold_only_evaluation_keys_for_the_plans_rotations(compiled: Compiled) -> None:
    model, keys = compiled.model, compiled.keys
    head, parts = unpack(keys.public_bytes(), ContainerKind.PUBLIC_KEYS, params_sha256=model.params.digest())
    public = keys.public()

    assert set(parts) == {"relin", "galois"}
    assert sorted(public.elements) == galois_elements(model.plan.steps, model.params.poly_degree)
    assert all(public.galois.has_key(e) for e in public.elements)
    assert public.galois.size() == len(set(public.elements))
    assert {f.name for f in dataclasses.fields(PublicKeys)} == {"params", "context", "relin", "galois", "elements",
                                                                "blob"}
    assert head["params_sha256"] == model.params.digest()


def test_the_server_refuses_secret_material(compiled: Compiled, tmp_path: Path) -> None:
    model, keys = compiled.model, compiled.keys
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


def test_a_saved_secret_key_reloads_with_the_parameters_it_names(compiled: Compiled, tmp_path: Path) -> None:
    keys = compiled.keys
    keys.save(tmp_path / "keys")

    again = SecretKeys.load(tmp_path / "keys")

    assert again.params == keys.params
    assert again.public_bytes() == keys.public_bytes()


def test_naf_is_seals_and_composed_rotations_equal_the_rotation_itself() -> None:
    params = CKKSParams(8192, (60, 40, 60), 40)
    sk = SecretKeys.generate(params, power_of_two_steps(params.poly_degree))
    public = sk.public()
    ctx = public.context
    encoder, evaluator = seal.CKKSEncoder(ctx), seal.Evaluator(ctx)
    encryptor = seal.Encryptor(ctx, sk._secret)
    decryptor = seal.Decryptor(ctx, sk._secret)
    v = np.arange(params.slots, dtype=np.float64) / params.slots
    pt, ct = seal.Plaintext(), seal.Ciphertext()
    encoder.encode(v.tolist(), params.scale, pt)
    encryptor.encrypt_symmetric(pt, ct)

    for step in (3, -5, 37, 1000, -2047, params.slots // 2):
        assert sum(naf(step)) == step
        assert all(abs(t) & (abs(t) - 1) == 0 for t in naf(step))
        assert key_switches(step, public.elements, params.poly_degree) == (1 if len(naf(step)) == 1 else
                                                                          len(naf(step)))
        out, dec = seal.Ciphertext(), seal.Plaintext()
        evaluator.rotate_vector(ct, step, public.galois, out)
        decryptor.decrypt(out, dec)
        got = np.array(encoder.decode_double(dec))
        np.testing.assert_allclose(got, np.roll(v, -step), atol=ROTATION_ATOL, rtol=0)
    public.require_steps([3, -5, 37])


def test_keys_that_cannot_compose_a_step_are_refused_by_name() -> None:
    params = CKKSParams(8192, (60, 40, 60), 40)
    public = SecretKeys.generate(params, [1, 2]).public()

    assert key_switches(3, public.elements, params.poly_degree) is None      # 3 = 4 - 1: no key for 4 or -1
    assert key_switches(2, public.elements, params.poly_degree) == 1
    with pytest.raises(KeyMaterialError, match="lack 1 of the model's rotations"):
        public.require_steps([1, 2, 3])
