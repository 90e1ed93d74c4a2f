"""The service's rules without a server: tokens, the key registry's eviction, the size bounds."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from federation.errors import ConfigError
from he_inference.ckks import CKKSParams
from he_inference.keys import SecretKeys, galois_elements
from he_inference.service import KeyRegistry, RefusalError, ServiceLimits, is_loopback, wire_bounds
from he_inference.tokens import TokenFile, TokenStore, token_digest
from simulations.cli import app
from tests.he_inference.conftest import Compiled

BOUND_SLACK = 1.05   # the bounds may exceed real key sets and uploads by at most 5 %


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_token_is_printed_once_and_only_its_hash_is_stored_owner_only(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"

    added = CliRunner().invoke(app, ["he", "token", "add", "st-luke", "--tokens", str(tokens)])
    listed = CliRunner().invoke(app, ["he", "token", "list", "--tokens", str(tokens)])
    token = added.stdout.strip()

    assert added.exit_code == 0, added.output
    assert len(token) == 43   # token_urlsafe(32)
    text = tokens.read_text()
    assert token not in text
    assert json.loads(text)["tokens"][0]["sha256"] == token_digest(token)
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert TokenStore.load(tokens).verify(token) == "st-luke"
    assert TokenStore.load(tokens).verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert listed.exit_code == 0
    assert "st-luke" in listed.stdout
    assert token not in listed.stdout
    assert token_digest(token)[:12] in listed.stdout


def test_revoking_a_hospital_stops_its_tokens_in_a_running_reader(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    luke, mary = TokenStore.add(tokens, "st-luke"), TokenStore.add(tokens, "st-mary")
    reader = TokenFile(tokens)
    before = reader.verify(luke), reader.verify(mary)

    revoked = CliRunner().invoke(app, ["he", "token", "revoke", "st-luke", "--tokens", str(tokens)])
    after = reader.verify(luke), reader.verify(mary)
    tokens.unlink()

    assert revoked.exit_code == 0, revoked.output
    assert before == ("st-luke", "st-mary")
    assert after == (None, "st-mary")
    assert reader.verify(mary) is None   # a missing file admits nobody
    TokenStore.add(tokens, "st-mary")
    with pytest.raises(ConfigError, match="`hospital` 'st-luke' holds no token"):
        TokenStore.revoke(tokens, "st-luke")


@pytest.mark.parametrize("name", ["", "../etc", "a b", "x" * 65, "-lead"])
def test_a_hospital_name_outside_the_pattern_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="`hospital` must match"):
        TokenStore.add(tmp_path / "tokens.json", name)


def test_one_hospital_replaces_only_its_own_key_sets_and_a_full_service_waits_for_idle_ones() -> None:
    clock = Clock()
    reg = KeyRegistry(ServiceLimits(max_clients=3, keys_per_hospital=2, key_idle_s=600), clock=clock)
    a1, a2 = reg.admit("a", "p-a1"), reg.admit("a", "p-a2")
    b1 = reg.admit("b", "p-b1")

    clock.now = 10
    a3 = reg.admit("a", "p-a3")          # A at its 2: its own least recently used (a1) leaves
    with pytest.raises(RefusalError) as full:
        reg.admit("c", "p-c1")           # full, nobody idle for 600 s: C waits
    clock.now = 700
    assert reg.lookup("a", a3.key_id) == "p-a3"
    c1 = reg.admit("c", "p-c1")          # a2 and b1 idle since t ≤ 10: the least recently used (a2) leaves

    assert a3.released == ("p-a1",)
    assert reg.lookup("a", a1.key_id) is None
    assert reg.lookup("b", b1.key_id) == "p-b1"   # A's churn never touched B
    assert reg.lookup("b", a3.key_id) is None     # another hospital's id finds nothing
    assert full.value.status == 503
    assert int(full.value.headers["Retry-After"]) == 590
    assert c1.released == ("p-a2",)
    assert reg.lookup("a", a2.key_id) is None
    assert len(reg) == 3
    assert reg.admit("c", "p-c1") == type(c1)(c1.key_id, new=False)


def test_two_hospitals_with_the_same_keys_hold_separate_ids_and_the_pool_keeps_them_while_one_holds_them() -> None:
    reg = KeyRegistry(ServiceLimits(max_clients=4, keys_per_hospital=1))
    a, b = reg.admit("a", "same"), reg.admit("b", "same")

    replaced = reg.admit("a", "other")

    assert a.key_id != b.key_id
    assert replaced.released == ()   # B still holds "same"
    assert reg.lookup("b", b.key_id) == "same"


def test_limits_name_the_field_they_break() -> None:
    with pytest.raises(ConfigError, match="`max_queue` must be ≥ 1, got 0"):
        ServiceLimits(max_queue=0)
    with pytest.raises(ConfigError, match="`keys_per_hospital` \\(3\\) must not exceed `max_clients` \\(2\\)"):
        ServiceLimits(max_clients=2, keys_per_hospital=3)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.3.0.1", True), ("::1", True),
                                                ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False),
                                                ("example.org", False)])
def test_only_loopback_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_size_bounds_hold_real_key_sets_and_uploads_within_five_percent(compiled: Compiled) -> None:
    model, keys = compiled.model, compiled.keys
    n_galois = len(galois_elements(model.plan.steps, model.params.poly_degree))
    upload = keys.encrypt(model.pack(compiled.images[0]), model_sha256=model.digest)
    small = CKKSParams(16384, (60, 40, 40, 40, 60), 40)
    small_keys = SecretKeys.generate(small, [1, 2, 4])
    small_upload = small_keys.encrypt([np.zeros(small.slots)], model_sha256="x")

    bounds = wire_bounds(model.params, n_galois=n_galois, n_inputs=model.plan.n_inputs)
    small_bounds = wire_bounds(small, n_galois=3, n_inputs=1)

    for real, bound in [(len(keys.public_bytes()), bounds.key_bytes), (len(upload), bounds.upload_bytes),
                        (len(small_keys.public_bytes()), small_bounds.key_bytes),
                        (len(small_upload), small_bounds.upload_bytes)]:
        assert real <= bound <= BOUND_SLACK * real + 8192, (real, bound)
