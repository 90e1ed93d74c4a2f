"""An attacker with a valid token against a real ``he serve`` process with two workers.

Mutated uploads (junk SEAL parts under a recomputed body hash, wrong level, size 3, other
parameters, truncated or renamed parts, deeply nested JSON headers, ...) each get a 4xx with a
named error and no server internals; a worker killed with SIGKILL mid-request fails only that
request (503, Retry-After), and the next valid request is answered correctly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from he_inference.client import ServiceClient, encrypt_image
from he_inference.passes.interpret import run_plain
from he_inference.serial import ContainerKind, unpack
from he_inference.tokens import TokenStore
from simulations.he_demo import start_service
from tests.he_inference.conftest import Compiled
from tests.he_inference.mutations import MAY_DECODE, mutated_uploads
from tests.he_inference.tiny import TINY_HE_ATOL, tiny_compiled

HTTP_CASES = 300
NAMED_REFUSALS = {"bad_ciphertext", "payload_too_large", "empty_body"}
LEAKS = ("Traceback", 'File "', "site-packages", "/tmp", "/dev/shm")   # nothing of the server's insides
RESPAWN_WAIT_S = 60.0     # a killed worker is back (model load + encoding + keys) well within this


@dataclass(frozen=True)
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    tiny: Compiled
    root: Path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("fuzz")
    tiny = tiny_compiled(root)
    tokens = root / "tokens.json"
    token = TokenStore.add(tokens, "st-attacker")
    proc, url = start_service(tiny.path, tokens=tokens, workers=2)
    try:
        yield Service(proc, url, token, tiny, root)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(s: Service, name: str) -> ServiceClient:
    return ServiceClient(s.url, s.root / name, token=s.token, keys=s.tiny.keys)


def _answers_correctly(s: Service, client: ServiceClient, image: np.ndarray) -> None:
    logits = client.classify(image).prediction.logits
    ref = run_plain(s.tiny.net, image[None])[0]
    np.testing.assert_allclose([logits[c] for c in client.model.classes], ref, atol=TINY_HE_ATOL, rtol=0)


def _workers(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The HE workers: grandchildren of the service (its children are the forkserver and resource tracker)."""
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if p.ppid() != proc.pid]


@pytest.mark.slow
def test_every_mutated_upload_gets_a_named_4xx_and_a_valid_request_is_answered_afterwards(service: Service) -> None:
    client = _client(service, "keys-fuzz")
    good = encrypt_image(client.model, client.keys, service.tiny.images[0])
    headers = {"authorization": f"Bearer {service.token}", "content-type": "application/octet-stream"}
    seen = Counter[str]()

    with httpx.Client(base_url=service.url, headers=headers, timeout=60) as http:
        for label, body in mutated_uploads(good, service.tiny.model, client.keys, HTTP_CASES, seed=18):
            reply = http.post(f"/infer/{client.key_id}", content=body)
            if reply.status_code == 200:
                assert label in MAY_DECODE, f"{label} was answered"
                unpack(reply.content, ContainerKind.ENCRYPTED_LOGITS, params_sha256=client.model.params.digest(),
                       model_sha256=client.model.digest)
                seen[f"{label}: answered"] += 1
                continue
            assert 400 <= reply.status_code < 500, (label, reply.status_code, reply.text[:300])
            err = reply.json()
            assert err["error"] in NAMED_REFUSALS, (label, err)
            assert err["detail"], (label, err)
            assert not any(leak in reply.text for leak in LEAKS), (label, reply.text[:300])
            seen[f"{label}: {err['error']}"] += 1

    print("\nhttp fuzz, 2 workers:", dict(sorted(seen.items())))
    assert sum(seen.values()) == HTTP_CASES
    assert sum(n for k, n in seen.items() if "answered" not in k) >= HTTP_CASES * 0.9, seen
    health = httpx.get(f"{service.url}/health", timeout=10).json()
    assert health["status"] == "ok", health
    assert health["pool"]["alive"] == 2, health
    _answers_correctly(service, client, service.tiny.images[1])


@pytest.mark.slow
def test_a_worker_killed_mid_request_fails_only_that_request_and_the_next_is_served(service: Service) -> None:
    client = _client(service, "keys-kill")
    image = service.tiny.images[1]
    upload = encrypt_image(client.model, client.keys, image)
    victim = _workers(service.proc)[0]
    respawns = httpx.get(f"{service.url}/health", timeout=10).json()["pool"]["respawns"]
    replies: list[httpx.Response] = []

    def post() -> None:
        replies.append(httpx.post(f"{service.url}/infer/{client.key_id}", content=upload, timeout=120,
                                  headers={"authorization": f"Bearer {service.token}",
                                           "content-type": "application/octet-stream"}))

    os.kill(victim.pid, signal.SIGSTOP)   # the worker cannot finish the pass: the request is certainly in flight
    sender = threading.Thread(target=post)
    sender.start()
    time.sleep(1.0)
    assert sender.is_alive(), "the request finished although a worker was stopped"
    os.kill(victim.pid, signal.SIGKILL)
    sender.join(timeout=60)

    assert not sender.is_alive()
    reply = replies[0]
    assert reply.status_code == 503, reply.text
    assert reply.json()["error"] == "he_unavailable"
    assert "Retry-After" in reply.headers
    assert not any(leak in reply.text for leak in LEAKS), reply.text
    deadline = time.monotonic() + RESPAWN_WAIT_S
    while (health := httpx.get(f"{service.url}/health", timeout=10).json())["pool"]["alive"] < 2:
        assert time.monotonic() < deadline, health
        time.sleep(0.5)
    assert health["pool"]["respawns"] == respawns + 1
    assert victim.pid not in {p.pid for p in _workers(service.proc)}
    _answers_correctly(service, client, image)
