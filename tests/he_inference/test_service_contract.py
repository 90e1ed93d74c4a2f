"""The service's OpenAPI contract: complete, and schemathesis (every check, stateful phase too) finds nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from federation.model import ArchConfig, HeadKind, build_model
from federation.storage import save_checkpoint
from he_inference.client import ServiceClient
from he_inference.compiler import compile_checkpoint
from he_inference.tokens import TokenStore
from simulations.he_demo import start_service

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
MAX_EXAMPLES = 100  # per operation and phase: about 10 s here
# A binary body's schema (format: binary) cannot say "a privrad container": schema-valid random bytes are
# rightly refused with 400 (not a container) or 422 (unusable keys), each documented on the operation.
CONFIG = """
[[operations]]
include-name = "POST /keys"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "422"]

[[operations]]
include-name = "POST /infer/{{key_id}}"
parameters = {{ "path.key_id" = "{key_id}" }}
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "422"]
"""


@dataclass(frozen=True)
class Running:
    url: str
    token: str
    key_id: str
    root: Path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("contract")
    model = build_model(ArchConfig(input_size=16, channels=(2,), head=HeadKind.FLATTEN), seed=3).eval()
    save_checkpoint(root / "m.pt", model, meta={"classes": ["normal", "cyst", "tumour"], "preprocess": {"size": 16}})
    compile_checkpoint(root / "m.pt").compiled.save(root / "m.he")
    token = TokenStore.add(root / "tokens.json", "fuzzer")
    proc, url = start_service(root / "m.he", tokens=root / "tokens.json", workers=1)
    try:
        with ServiceClient(url, root / "keys", token=token) as client:   # a real key id: fuzzed uploads reach SEAL
            key_id = client.key_id
        yield Running(url, token, key_id, root)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_contract_documents_bodies_security_errors_and_links(running: Running) -> None:
    spec = httpx.get(f"{running.url}/openapi.json", headers={"authorization": f"Bearer {running.token}"}).json()
    paths = spec["paths"]
    keys, infer, model = paths["/keys"]["post"], paths["/infer/{key_id}"]["post"], paths["/model"]["get"]

    for op in (keys, infer):
        assert op["requestBody"]["required"] is True
        assert op["requestBody"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "A hospital's token, issued with `privrad he token add`."}
    assert all(op["security"] == [{"bearer": []}] for op in (keys, infer, model))
    assert "security" not in paths["/health"]["get"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for op, codes in [(keys, {"400", "401", "403", "413", "415", "422", "500", "503"}),
                      (infer, {"400", "401", "403", "404", "413", "415", "422", "500", "503"}),
                      (model, {"401", "403", "500"})]:
        assert codes <= set(op["responses"])
        assert all(op["responses"][c]["content"]["application/json"]["schema"] == error_ref for c in codes)
    assert "Retry-After" in infer["responses"]["503"]["headers"]
    assert "WWW-Authenticate" in keys["responses"]["401"]["headers"]
    assert set(infer["responses"]["200"]["content"]) == {"application/octet-stream"}
    assert keys["responses"]["200"]["links"]["infer"] == {"operationId": "infer",
                                                          "parameters": {"key_id": "$response.body#/key_id"}}
    for name in ("Health", "ModelInfo", "KeysReply"):
        assert name in spec["components"]["schemas"]


@pytest.mark.slow
def test_schemathesis_with_every_check_and_the_stateful_phase_finds_no_failure(running: Running) -> None:
    config = running.root / "schemathesis.toml"
    config.write_text(CONFIG.format(key_id=running.key_id))

    run = subprocess.run(
        [str(SCHEMATHESIS), "--config-file", str(config), "--no-color", "run", f"{running.url}/openapi.json",
         "--checks", "all", "--phases", "examples,coverage,fuzzing,stateful",
         "-H", f"Authorization: Bearer {running.token}", "--max-examples", str(MAX_EXAMPLES), "--seed", "18",
         "--workers", "1", "--request-timeout", "60", "--suppress-health-check", "all",
         "--report", "junit", "--report-dir", str(running.root / "report")],
        capture_output=True, text=True, timeout=300, check=False)

    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Stateful" in run.stdout
    assert "failure" not in run.stdout.rsplit("SUMMARY", 1)[-1].lower()
    assert httpx.get(f"{running.url}/health").json()["status"] == "ok"   # still serving after the fuzzing
