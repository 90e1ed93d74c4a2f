"""The encrypted-inference web service, run for real (uvicorn on loopback, a separate process, bearer tokens)."""

from __future__ import annotations

import json
import socket
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from federation.errors import ConfigError
from federation.model import ArchConfig, HeadKind, build_model
from federation.pki import make_certs
from federation.storage import load_checkpoint, save_checkpoint
from he_inference.client import ServiceClient, encrypt_image
from he_inference.compiler import compile_checkpoint, compile_model
from he_inference.images import read_image
from he_inference.keys import SecretKeys
from he_inference.service import serve
from he_inference.tokens import TokenStore
from simulations.cli import app
from simulations.he_demo import start_service
from simulations.he_load import load_test

CLASSES = ["normal", "cyst", "tumour"]
OCTET = {"content-type": "application/octet-stream"}
SIZE = 16
PROB_TOL = 1e-4         # HE class probabilities vs PyTorch float32's
LOGIT_REL_TOL = 1e-3    # HE logits vs PyTorch float32's, relative to the largest logit magnitude
MAX_QUEUE = 16          # the service's admission limit in this module (the load test never exceeds it)
LOAD_HOSPITALS = 4
LOAD_CLIENTS, LOAD_REQUESTS = 16, 5


@dataclass(frozen=True)
class Service:
    url: str
    pid: int
    ckpt: Path
    root: Path
    tokens: Path

    def token(self, hospital: str) -> str:
        """A fresh token for ``hospital`` (the running service reads the file anew)."""
        return TokenStore.add(self.tokens, hospital)

    def auth(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("service")
    model = build_model(ArchConfig(input_size=SIZE, channels=(2,), head=HeadKind.FLATTEN), seed=7).eval()
    ckpt = root / "model.pt"
    save_checkpoint(ckpt, model, meta={"classes": CLASSES, "preprocess": {"size": SIZE}})
    compile_checkpoint(ckpt).compiled.save(root / "model.he")
    tokens = root / "tokens.json"
    TokenStore().save(tokens)
    proc, url = start_service(root / "model.he", tokens=tokens, workers=2,
                              extra=["--max-clients", "12", "--keys-per-hospital", "1", "--max-queue", str(MAX_QUEUE)])
    try:
        yield Service(url, proc.pid, ckpt, root, tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def reference_logits(ckpt: Path, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return load_checkpoint(ckpt).model.eval()(torch.as_tensor(images, dtype=torch.float32)).double().numpy()


@pytest.mark.slow
def test_classify_through_the_service_matches_the_plaintext_model(service: Service, tiny_federation: Path) -> None:
    dicoms = sorted((tiny_federation / "test").glob("*.dcm"))[:2]
    token_file = service.root / "st-luke.token"
    token_file.write_text(service.token("st-luke") + "\n")

    result = CliRunner().invoke(app, ["he", "classify", *map(str, dicoms), "--server", service.url,
                                      "--keys", str(service.root / "keys"), "--token-file", str(token_file)])
    no_token = CliRunner().invoke(app, ["he", "classify", str(dicoms[0]), "--server", service.url,
                                        "--keys", str(service.root / "keys")], env={"PRIVRAD_HE_TOKEN": ""})

    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("["):])
    images = np.stack([read_image(p, {"size": SIZE}) for p in dicoms])
    ref = torch.softmax(torch.as_tensor(reference_logits(service.ckpt, images)), 1).numpy()
    got = np.array([[item["probabilities"][c] for c in CLASSES] for item in out])
    np.testing.assert_allclose(got, ref, atol=PROB_TOL, rtol=0)
    assert (service.root / "keys" / "secret.key").is_file()
    assert isinstance(no_token.exception, ConfigError)
    assert "PRIVRAD_HE_TOKEN" in str(no_token.exception)


def _post_declared_only(url: str, path: str, token: str, length: int) -> int:
    """Send only the headers of a POST declaring ``length`` bytes; the status the service answers with."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {token}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


@pytest.mark.slow
def test_every_malformed_request_gets_a_named_4xx_and_the_service_keeps_serving(service: Service) -> None:
    token = service.token("st-mary")
    auth = service.auth(token)
    client = ServiceClient(service.url, service.root / "keys2", token=token)
    image = np.random.default_rng(1).uniform(0, 1, client.model.image_shape)
    good = encrypt_image(client.model, client.keys, image)
    other = compile_model(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(),   # shallower: N = 8192
                                        nn.Linear(2 * SIZE * SIZE, 3)).eval(), image_shape=(1, SIZE, SIZE))
    assert other.params != client.model.params
    foreign = encrypt_image(other, SecretKeys.generate(other.params, other.plan.steps), image)
    info = httpx.get(f"{service.url}/model", headers=auth).json()
    upload_bound, key_bound = info["limits"]["max_upload_bytes"], info["limits"]["max_key_bytes"]
    infer, keys = f"{service.url}/infer/{client.key_id}", f"{service.url}/keys"
    secret = (service.root / "keys2" / "secret.key").read_bytes()
    nested = b"PRIVRAD-HE encrypted-image v1\n" + b"[" * 100_000 + b"\n"

    cases = [
        (infer, b"garbage" * 100, OCTET, 400, "bad_ciphertext", "not a privrad HE file"),
        (infer, good[: len(good) - 1000], OCTET, 400, "bad_ciphertext", "truncated or modified"),
        (infer, foreign, OCTET, 400, "bad_ciphertext", "other CKKS parameters"),
        (infer, nested, OCTET, 400, "bad_ciphertext", "unreadable header"),
        (f"{service.url}/infer/{'0' * 32}", good, OCTET, 404, "unknown_key_id", "POST /keys first"),
        (f"{service.url}/infer/not-a-key-id", good, OCTET, 422, "invalid_request", "key_id"),
        (infer, b"\0" * (upload_bound + 1), OCTET, 413, "payload_too_large", "bound"),
        (infer, good, {"content-type": "application/json"}, 415, "unsupported_media_type", "application/json"),
        (infer, b"", OCTET, 400, "empty_body", "empty"),
        (keys, secret, OCTET, 422, "bad_keys", "secret key file"),
        (keys, b"junk", OCTET, 400, "malformed_keys", "not a privrad HE file"),
        (keys, b"PRIVRAD-HE public-keys v1\n" + b"{" * 100_000 + b"\n", OCTET, 400, "malformed_keys", "unreadable"),
    ]
    for target, body, headers, status, error, detail in cases:
        reply = httpx.post(target, content=body, headers={**headers, **auth}, timeout=120)
        assert reply.status_code == status, (error, reply.text)
        assert set(reply.json()) == {"error", "detail"}
        assert reply.json()["error"] == error
        assert detail in reply.json()["detail"]
        assert "Traceback" not in reply.text

    # the size is refused from the headers alone: the service answers before any body byte is sent
    assert _post_declared_only(service.url, "/keys", token, key_bound + 1) == 413
    assert _post_declared_only(service.url, f"/infer/{client.key_id}", token, upload_bound + 1) == 413
    assert len(good) <= upload_bound < 1.1 * len(good)
    assert len(client.keys.public_bytes()) <= key_bound < 1.05 * len(client.keys.public_bytes())
    assert client.classify(image).prediction.label in CLASSES  # still serving
    assert info["model_sha256"] == client.model.digest
    assert info["input_ciphertexts"] == 1
    assert info["classes"] == CLASSES
    assert "source" not in info["meta"]   # the server-side checkpoint path stays on the server
    assert str(service.root) not in json.dumps(info)


@pytest.mark.slow
def test_an_unauthenticated_client_gets_401_or_403_on_every_endpoint_but_health(service: Service) -> None:
    token = service.token("st-anne")
    kid = ServiceClient(service.url, service.root / "keys-anne", token=token).key_id
    endpoints = [("GET", "/model"), ("GET", "/openapi.json"), ("POST", "/keys"), ("POST", f"/infer/{kid}")]
    wrong = {"authorization": "Bearer " + "x" * 43}

    missing = [httpx.request(m, service.url + p, content=b"x", headers=OCTET) for m, p in endpoints]
    refused = [httpx.request(m, service.url + p, content=b"x", headers={**OCTET, **wrong}) for m, p in endpoints]
    basic = httpx.get(f"{service.url}/model", headers={"authorization": "Basic dXNlcjpwYXNz"})
    health = httpx.get(f"{service.url}/health")
    TokenStore.revoke(service.tokens, "st-anne")
    revoked = httpx.get(f"{service.url}/model", headers=service.auth(token))

    assert [r.status_code for r in missing] == [401] * 4
    assert all(r.headers["www-authenticate"].startswith("Bearer") for r in missing)
    assert all(r.json()["error"] == "unauthenticated" for r in missing)
    assert [r.status_code for r in refused] == [403] * 4
    assert all(r.json()["error"] == "forbidden" for r in refused)
    assert basic.status_code == 401
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert revoked.status_code == 403   # a revoked token stops working at the next request


@pytest.mark.slow
def test_a_hospital_cannot_use_another_hospitals_keys_and_a_client_re_registers_after_its_own_are_replaced(
        service: Service) -> None:
    a_token, b_token = service.token("hospital-a"), service.token("hospital-b")
    a = ServiceClient(service.url, service.root / "keys-a", token=a_token)
    b = ServiceClient(service.url, service.root / "keys-b", token=b_token)
    image = np.random.default_rng(4).uniform(0, 1, a.model.image_shape)
    upload = encrypt_image(a.model, a.keys, image)

    with_b_token = httpx.post(f"{service.url}/infer/{a.key_id}", content=upload, headers={**OCTET,
                                                                                         **service.auth(b_token)})
    with_a_token = httpx.post(f"{service.url}/infer/{a.key_id}", content=upload, headers={**OCTET,
                                                                                         **service.auth(a_token)})
    a_second_workstation = ServiceClient(service.url, service.root / "keys-a2", token=a_token)  # A's only key set now
    replaced = httpx.post(f"{service.url}/infer/{a.key_id}", content=upload, headers={**OCTET,
                                                                                     **service.auth(a_token)})
    again = a.classify(image)          # 404 unknown_key_id → registers its keys again → retries
    b_still = b.classify(image)        # A's churn never touched B's keys

    assert with_b_token.status_code == 404   # another hospital's key id does not exist for B
    assert with_b_token.json()["error"] == "unknown_key_id"
    assert with_a_token.status_code == 200
    assert replaced.status_code == 404      # one key set per hospital here: the second workstation replaced it
    assert a.registrations == 2
    assert b.registrations == 1
    assert a_second_workstation.key_id != a.key_id
    ref = reference_logits(service.ckpt, image[None])[0]
    for got in (again, b_still):
        np.testing.assert_allclose([got.prediction.logits[c] for c in CLASSES], ref,
                                   atol=LOGIT_REL_TOL * np.abs(ref).max(), rtol=0)


@pytest.mark.slow
def test_requests_beyond_the_queue_limit_get_503_with_retry_after(service: Service) -> None:
    token = service.token("st-jude")
    client = ServiceClient(service.url, service.root / "keys-jude", token=token)
    upload = encrypt_image(client.model, client.keys, np.random.default_rng(5).uniform(0, 1, client.model.image_shape))

    def post(_: int) -> httpx.Response:
        return httpx.post(f"{service.url}/infer/{client.key_id}", content=upload,
                          headers={**OCTET, **service.auth(token)}, timeout=300)

    with ThreadPoolExecutor(MAX_QUEUE + 8) as pool:
        replies = list(pool.map(post, range(MAX_QUEUE + 8)))

    busy = [r for r in replies if r.status_code == 503]
    assert {r.status_code for r in replies} == {200, 503}
    assert len(replies) - len(busy) >= MAX_QUEUE
    assert all(r.json()["error"] == "busy" and int(r.headers["retry-after"]) >= 1 for r in busy)


@pytest.mark.slow
def test_sixteen_concurrent_clients_of_four_hospitals_all_get_their_own_correct_answers(
        service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hospitals = {f"load-{k}": (service.token(f"load-{k}"), tmp_path / f"keys-{k}") for k in range(LOAD_HOSPITALS)}
    images = np.random.default_rng(2).uniform(0, 1, (LOAD_CLIENTS * LOAD_REQUESTS, 1, SIZE, SIZE))

    result = load_test(service.url, hospitals=hospitals, images=images, clients=LOAD_CLIENTS,
                       requests=LOAD_REQUESTS, server_pid=service.pid)

    ref = reference_logits(service.ckpt, images)[list(result.image_index)]
    assert sorted(result.image_index) == list(range(len(images)))   # each reply is its own image's
    np.testing.assert_allclose(result.logits, ref, atol=LOGIT_REL_TOL * np.abs(ref).max(), rtol=0)
    assert result.rss_peak_bytes is not None
    assert result.rss_start_bytes is not None
    assert result.rss_keys_bytes is not None
    figures = {"classifications": len(result.latency_s), "p50_s": result.percentile(50),
               "p95_s": result.percentile(95), "server_s_median": float(np.median(result.server_s)),
               "wall_s": result.wall_s, "rss_start_mb": result.rss_start_bytes / 2**20,
               "rss_per_key_set_mb": (result.rss_keys_bytes - result.rss_start_bytes) / LOAD_HOSPITALS / 2**20,
               "rss_peak_mb": result.rss_peak_bytes / 2**20, "registrations": result.registrations}
    (tmp_path / "load.json").write_text(json.dumps(figures, indent=2))
    with capsys.disabled():
        print(f"\nservice load, {LOAD_CLIENTS} clients of {LOAD_HOSPITALS} hospitals × {LOAD_REQUESTS}: "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    assert figures["p95_s"] >= figures["p50_s"] > 0


@pytest.mark.slow
def test_the_service_over_tls_answers_only_clients_that_trust_its_ca(tmp_path: Path) -> None:
    model = build_model(ArchConfig(input_size=16, channels=(2,), head=HeadKind.FLATTEN), seed=9).eval()
    save_checkpoint(tmp_path / "m.pt", model, meta={"classes": CLASSES, "preprocess": {"size": 16}})
    compile_checkpoint(tmp_path / "m.pt").compiled.save(tmp_path / "m.he")
    certs = make_certs(tmp_path / "certs", hosts=["127.0.0.1"])
    token = TokenStore.add(tmp_path / "tokens.json", "st-tls")
    proc, url = start_service(tmp_path / "m.he", tokens=tmp_path / "tokens.json", workers=1,
                              tls=(certs.superlink_cert, certs.superlink_key, certs.ca_cert))
    try:
        assert url.startswith("https://")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/health", timeout=10)   # the system trust store does not know this CA
        with ServiceClient(url, tmp_path / "keys", token=token, ca_cert=certs.ca_cert) as client:
            image = np.random.default_rng(3).uniform(0, 1, client.model.image_shape)
            got = client.classify(image).prediction.logits
        with torch.no_grad():
            ref = model(torch.as_tensor(image[None], dtype=torch.float32))[0].double().numpy()
        np.testing.assert_allclose([got[c] for c in CLASSES], ref, atol=LOGIT_REL_TOL * np.abs(ref).max(),
                                   rtol=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_plaintext_http_on_a_non_loopback_host_is_refused_unless_insecure(tmp_path: Path) -> None:
    TokenStore().save(tmp_path / "tokens.json")

    with pytest.raises(ConfigError, match=r"`--host` 0\.0\.0\.0 is not a loopback address and no TLS"):
        serve(tmp_path / "missing.he", tokens=tmp_path / "tokens.json", host="0.0.0.0")
    with pytest.raises(ConfigError, match="no such file"):   # --insecure passes the TLS rule, then needs the tokens
        serve(tmp_path / "missing.he", tokens=tmp_path / "none.json", host="0.0.0.0", insecure=True)
    with pytest.raises(ConfigError, match="both `--tls-cert` and `--tls-key`"):
        serve(tmp_path / "missing.he", tokens=tmp_path / "tokens.json", tls_cert=tmp_path / "c.pem")
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
