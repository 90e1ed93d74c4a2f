"""The encrypted-inference web service, run for real (uvicorn on loopback, a separate process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from federation.model import ArchConfig, HeadKind, PolyAct, build_model
from federation.pki import make_certs
from federation.storage import load_checkpoint, save_checkpoint
from he_inference.client import ServiceClient, decrypt_logits, encrypt_image
from he_inference.compiler import compile_checkpoint, compile_model
from he_inference.images import read_image
from he_inference.keys import SecretKeys
from simulations.cli import app
from simulations.he_demo import start_service

CLASSES = ["normal", "cyst", "tumour"]
OCTET = {"content-type": "application/octet-stream"}
MAX_UPLOAD_MB = 2.0
PROB_TOL = 1e-4         # HE class probabilities vs PyTorch float32's
LOGIT_REL_TOL = 1e-3    # HE logits vs PyTorch float32's, relative to the largest logit magnitude


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("service")
    model = build_model(ArchConfig(input_size=32, channels=(2, 4), head=HeadKind.FLATTEN), seed=7).eval()
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, model, meta={"classes": CLASSES, "preprocess": {"size": 32}})
    compiled = compile_checkpoint(ckpt).compiled
    he = root / "model.he"
    compiled.save(he)
    proc, url = start_service(he, workers=2, extra=["--max-upload-mb", str(MAX_UPLOAD_MB)])
    try:
        yield url, ckpt, root
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_classify_through_the_service_matches_the_plaintext_model(service, tiny_federation: Path) -> None:  # type: ignore[no-untyped-def]
    url, ckpt, root = service
    dicoms = sorted((tiny_federation / "test").glob("*.dcm"))[:2]

    result = CliRunner().invoke(app, ["he", "classify", *map(str, dicoms), "--server", url,
                                      "--keys", str(root / "keys")])

    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("["):])
    model = load_checkpoint(ckpt).model.eval()
    for item, path in zip(out, dicoms, strict=True):
        with torch.no_grad():
            ref = torch.softmax(model(torch.as_tensor(read_image(path, {"size": 32})[None],
                                                      dtype=torch.float32)), 1)[0].double().numpy()
        got = np.array([item["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, ref, atol=PROB_TOL, rtol=0)
    assert (root / "keys" / "secret.key").is_file()


@pytest.mark.slow
def test_every_malformed_request_gets_a_named_4xx_and_the_service_keeps_serving(service) -> None:  # type: ignore[no-untyped-def]
    url, _, root = service
    client = ServiceClient(url, root / "keys2")
    image = np.random.default_rng(1).uniform(0, 1, client.model.image_shape)
    good = encrypt_image(client.model, client.keys, image)
    other = compile_model(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), PolyAct(2, 0.5, channels=2), nn.Flatten(),
                                        nn.Linear(2 * 32 * 32, 3)).eval(), image_shape=(1, 32, 32))
    assert other.params != client.model.params
    foreign = encrypt_image(other, SecretKeys.generate(other.params, other.plan.steps), image)
    infer = f"{url}/infer/{client.key_id}"
    secret = (root / "keys2" / "secret.key").read_bytes()

    cases = [
        (infer, b"garbage" * 100, OCTET, 400, "bad_ciphertext", "not a privrad HE file"),
        (infer, good[: len(good) - 1000], OCTET, 400, "bad_ciphertext", "truncated or modified"),
        (infer, foreign, OCTET, 400, "bad_ciphertext", "other CKKS parameters"),
        (f"{url}/infer/{'0' * 32}", good, OCTET, 404, "unknown_key_id", "POST /keys first"),
        (infer, b"\0" * int(MAX_UPLOAD_MB * 2**20 + 1), OCTET, 413, "payload_too_large", "limit"),
        (infer, good, {"content-type": "application/json"}, 415, "unsupported_media_type", "application/json"),
        (infer, b"", OCTET, 400, "empty_body", "empty"),
        (f"{url}/keys", secret, OCTET, 422, "bad_keys", "secret key file"),
        (f"{url}/keys", b"junk", OCTET, 400, "malformed_keys", "not a privrad HE file"),
    ]
    for target, body, headers, status, error, detail in cases:
        reply = httpx.post(target, content=body, headers=headers, timeout=120)
        assert reply.status_code == status, (error, reply.text)
        assert reply.json()["error"] == error
        assert detail in reply.json()["detail"]

    assert client.classify(image).prediction.label in CLASSES  # still serving
    info = httpx.get(f"{url}/model").json()
    assert info["model_sha256"] == client.model.digest
    assert info["input_ciphertexts"] == 1
    assert info["classes"] == CLASSES


@pytest.mark.slow
def test_eight_concurrent_classifications_all_succeed(service) -> None:  # type: ignore[no-untyped-def]
    url, ckpt, root = service
    client = ServiceClient(url, root / "keys3")
    images = np.random.default_rng(2).uniform(0, 1, (8, *client.model.image_shape))
    uploads = [encrypt_image(client.model, client.keys, x) for x in images]

    def post(body: bytes) -> bytes:
        reply = httpx.post(f"{url}/infer/{client.key_id}", content=body, headers=OCTET, timeout=600)
        assert reply.status_code == 200, reply.text
        return reply.content

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, uploads))

    with torch.no_grad():
        ref = load_checkpoint(ckpt).model.eval()(torch.as_tensor(images, dtype=torch.float32)).double().numpy()
    got = np.array([decrypt_logits(client.model, client.keys, r) for r in replies])
    assert got.shape == (8, 3)
    # each reply is its own image's
    np.testing.assert_allclose(got, ref, atol=LOGIT_REL_TOL * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_the_service_over_tls_answers_only_clients_that_trust_its_ca(tmp_path: Path) -> None:
    model = build_model(ArchConfig(input_size=16, channels=(2,), head=HeadKind.FLATTEN), seed=9).eval()
    save_checkpoint(tmp_path / "m.pt", model, meta={"classes": CLASSES, "preprocess": {"size": 16}})
    compile_checkpoint(tmp_path / "m.pt").compiled.save(tmp_path / "m.he")
    certs = make_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    proc, url = start_service(tmp_path / "m.he", workers=1,
                              tls=(certs.superlink_cert, certs.superlink_key, certs.ca_cert))
    try:
        assert url.startswith("https://")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health", timeout=10)   # the system trust store does not know this CA
        with ServiceClient(url, tmp_path / "keys", ca_cert=certs.ca_cert) as client:
            image = np.random.default_rng(3).uniform(0, 1, client.model.image_shape)
            got = client.classify(image).prediction.logits
        with torch.no_grad():
            ref = model(torch.as_tensor(image[None], dtype=torch.float32))[0].double().numpy()
        np.testing.assert_allclose([got[c] for c in CLASSES], ref, atol=LOGIT_REL_TOL * np.abs(ref).max(),
                                   rtol=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
