"""Mutated uploads against the server on one process and on a real two-worker pool: each is refused by name, and
the server answers the next valid upload correctly."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
import tenseal.sealapi as seal

from federation.errors import CiphertextError, HEError
from he_inference.ckks import make_context
from he_inference.client import decrypt_logits, encrypt_image
from he_inference.engine import Engine
from he_inference.keys import load_upload
from he_inference.parallel import PoolState
from he_inference.passes.interpret import run_plain
from he_inference.serial import ContainerKind, unpack
from he_inference.server import InferenceServer
from tests.he_inference.conftest import Compiled
from tests.he_inference.mutations import MAY_DECODE, mutated_uploads
from tests.he_inference.tiny import TINY_HE_ATOL, tiny_compiled

POOL_CASES, ONE_PROCESS_CASES = 320, 120
VALIDATE_BUDGET_S = 0.05   # one upload's checks on the tiny ring (measured: about 2 ms)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return tiny_compiled(tmp_path_factory.mktemp("tiny"))


def _fuzz(server: InferenceServer, tiny: Compiled, n: int, seed: int) -> Counter[str]:
    """Send ``n`` mutations; every one is refused with a CiphertextError, or (a flip SEAL decodes) answered."""
    model, keys = tiny.model, tiny.keys
    good = encrypt_image(model, keys, tiny.images[0])
    seen = Counter[str]()
    for label, upload in mutated_uploads(good, model, keys, n, seed):
        try:
            reply, _ = server.infer(upload)
        except CiphertextError:
            seen[f"{label}: refused"] += 1
            continue
        assert label in MAY_DECODE, f"{label} was accepted"
        unpack(reply, ContainerKind.ENCRYPTED_LOGITS, params_sha256=model.params.digest(), model_sha256=model.digest)
        seen[f"{label}: answered"] += 1
    return seen


def _answers_correctly(server: InferenceServer, tiny: Compiled) -> None:
    reply, _ = server.infer(encrypt_image(tiny.model, tiny.keys, tiny.images[1]))
    ref = run_plain(tiny.net, tiny.images[1:2])[0]
    np.testing.assert_allclose(decrypt_logits(tiny.model, tiny.keys, reply), ref, atol=TINY_HE_ATOL, rtol=0)


@pytest.mark.slow
def test_a_two_worker_pool_refuses_every_mutated_upload_by_name_and_then_answers_correctly(tiny: Compiled) -> None:
    with InferenceServer(tiny.model, tiny.keys.public(), workers=2, model_path=tiny.path) as server:
        seen = _fuzz(server, tiny, POOL_CASES, seed=1)
        _answers_correctly(server, tiny)
        health = server.health()

    assert sum(seen.values()) == POOL_CASES
    assert sum(n for k, n in seen.items() if k.endswith("refused")) >= POOL_CASES * 0.9
    assert seen["byte-flip: refused"] > 0
    assert (health.state, health.alive, health.respawns) == (PoolState.OK, 2, 0)
    assert health.passes == 1 + sum(n for k, n in seen.items() if k.endswith("answered"))


def test_the_one_process_server_refuses_every_mutated_upload_by_name_and_then_answers_correctly(
        tiny: Compiled) -> None:
    with InferenceServer(tiny.model, tiny.keys.public()) as server:
        seen = _fuzz(server, tiny, ONE_PROCESS_CASES, seed=2)
        _answers_correctly(server, tiny)

        assert sum(seen.values()) == ONE_PROCESS_CASES
        assert server.health().failures == 0


def test_an_upload_is_refused_naming_its_size_level_and_scale(tiny: Compiled) -> None:
    model, keys = tiny.model, tiny.keys
    ctx = make_context(model.params)
    good = encrypt_image(model, keys, tiny.images[0])
    mutations = {label: upload for label, upload in mutated_uploads(good, model, keys, 16, seed=3)}

    def refusal(label: str) -> str:
        with pytest.raises(CiphertextError) as info:
            load_upload(mutations[label], model.params, ctx, model_sha256=model.digest, n_inputs=model.plan.n_inputs)
        return str(info.value)

    assert refusal("size-3") == "upload (ct0): size 3, expected 2 (a fresh or relinearised ciphertext)"
    assert refusal("wrong-level") == "upload (ct0): at level 2, the model takes its inputs at level 3"
    assert refusal("scale-doubled").startswith("upload (ct0): scale 6.87195e+10, expected 2^35")
    assert refusal("zero-ciphertext") == "upload (ct0): not in NTT form, as every CKKS ciphertext is"
    assert refusal("extra-part").startswith("upload: the model takes 1 ciphertexts, got")
    t0 = time.perf_counter()
    cts = load_upload(good, model.params, ctx, model_sha256=model.digest, n_inputs=model.plan.n_inputs)
    assert time.perf_counter() - t0 < VALIDATE_BUDGET_S
    assert [ct.size() for ct in cts] == [2]


def test_deeply_nested_json_in_the_header_is_a_ciphertext_error_not_a_recursion_error() -> None:
    nested = b"PRIVRAD-HE encrypted-image v1\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n"

    with pytest.raises(CiphertextError, match=r"unreadable header \(RecursionError\)"):
        unpack(nested, ContainerKind.ENCRYPTED_IMAGE)


def test_the_engine_names_what_seal_refuses_when_a_bad_ciphertext_gets_past_validation(tiny: Compiled) -> None:
    model, keys = tiny.model, tiny.keys.public()
    engine = Engine(model, keys)
    good = load_upload(encrypt_image(model, tiny.keys, tiny.images[0]), model.params, keys.context,
                       model_sha256=model.digest, n_inputs=1)
    size3 = seal.Ciphertext()
    seal.Evaluator(keys.context).multiply(good[0], good[0], size3)

    with pytest.raises(CiphertextError, match=r"instruction \d+ \(\w+\) of layer '\w+': SEAL refuses its operands") \
            as info:
        engine.run([size3])
    assert isinstance(info.value, HEError)
    assert "Traceback" not in str(info.value)

