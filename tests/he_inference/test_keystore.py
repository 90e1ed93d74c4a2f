"""Registered key sets survive a restart of the service: written atomically, checked when reloaded, deleted when
released."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest

from federation.model import ArchConfig, HeadKind, build_model
from federation.net import free_port
from federation.storage import save_checkpoint
from he_inference.ckks import CKKSParams
from he_inference.client import ServiceClient
from he_inference.compiler import compile_checkpoint
from he_inference.keys import SecretKeys, key_id
from he_inference.keystore import KeyStore, hospital_key_id
from he_inference.tokens import TokenStore
from simulations.children import stop_child
from simulations.he_demo import start_service

PARAMS = CKKSParams(8192, (60, 40, 60), 40)
LOGIT_REL_TOL = 1e-4   # two fresh encryptions of one image: CKKS noise only, relative to the largest logit


def _blob() -> bytes:
    return SecretKeys.generate(PARAMS, [1]).public_bytes()


def test_a_saved_key_set_is_read_back_checked_and_private_to_its_owner(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "store", params_sha256=PARAMS.digest())
    blob = _blob()
    pool = key_id(blob)
    kid = hospital_key_id("hospital-a", pool)

    store.save(kid, hospital="hospital-a", pool_id=pool, blob=blob)
    entries = list(store.entries())

    assert [(e.key_id, e.hospital, e.pool_id, e.blob) for e in entries] == [(kid, "hospital-a", pool, blob)]
    for name in (f"{kid}.keys", f"{kid}.json"):
        assert stat.S_IMODE((tmp_path / "store" / name).stat().st_mode) == 0o600
    assert list(KeyStore(tmp_path / "store", params_sha256="other").entries()) == []   # other parameters
    store.remove(kid)
    assert list(store.entries()) == []
    assert not list((tmp_path / "store").glob(f"{kid}.*"))


def test_altered_incomplete_or_unreadable_entries_are_skipped_by_name(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    store = KeyStore(root, params_sha256=PARAMS.digest())
    blob = _blob()
    pool = key_id(blob)
    good, stolen = hospital_key_id("a", pool), hospital_key_id("b", pool)
    store.save(good, hospital="a", pool_id=pool, blob=blob)
    store.save(stolen, hospital="b", pool_id=pool, blob=blob)
    meta = json.loads((root / f"{stolen}.json").read_text())
    (root / f"{stolen}.json").write_text(json.dumps({**meta, "hospital": "a"}))   # b's entry claimed for a
    (root / "torn.keys").write_bytes(blob)                                         # a crash before the .json
    (root / "junk.json").write_text("{not json")
    altered = hospital_key_id("c", pool)
    store.save(altered, hospital="c", pool_id=pool, blob=blob)
    (root / f"{altered}.keys").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))      # one bit of the keys flipped

    with caplog.at_level("WARNING"):
        entries = list(store.entries())

    assert [e.key_id for e in entries] == [good]
    assert "junk.json is unreadable" in caplog.text
    assert caplog.text.count("does not hash to its ids") == 2


@pytest.mark.slow
def test_a_hospital_uploads_its_keys_once_across_restarts_and_a_replaced_set_is_deleted(tmp_path: Path) -> None:
    size = 16
    model = build_model(ArchConfig(input_size=size, channels=(2,), head=HeadKind.FLATTEN), seed=7).eval()
    save_checkpoint(tmp_path / "model.pt", model, meta={"classes": ["normal", "cyst", "tumour"],
                                                        "preprocess": {"size": size}})
    compile_checkpoint(tmp_path / "model.pt").compiled.save(tmp_path / "model.he")
    tokens = tmp_path / "tokens.json"
    TokenStore().save(tokens)
    token = TokenStore.add(tokens, "hospital-a")
    port = free_port()
    image = np.random.default_rng(0).uniform(0, 1, (1, size, size))
    store = tmp_path / "registered-keys"

    def run(keys_dir: str) -> tuple[ServiceClient, np.ndarray]:
        proc, url = start_service(tmp_path / "model.he", tokens=tokens, port=port, workers=1)
        try:
            with ServiceClient(url, tmp_path / keys_dir, token=token) as client:
                logits = np.array(list(client.classify(image).prediction.logits.values()))
        finally:
            stop_child(proc)
        return client, logits

    first, before = run("keys-a")
    again, after = run("keys-a")        # restarted: the same key id still works, nothing is uploaded
    stored = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))
    other, _ = run("keys-a2")           # a second workstation: one key set per hospital, so it replaces the first
    replaced = sorted(p.name for p in store.iterdir() if not p.name.startswith("."))

    assert (first.registrations, again.registrations, other.registrations) == (1, 0, 1)
    assert again.key_id == first.key_id
    np.testing.assert_allclose(after, before, atol=LOGIT_REL_TOL * np.abs(before).max(), rtol=0)
    assert stored == [f"{first.key_id}.json", f"{first.key_id}.keys"]
    assert replaced == [f"{other.key_id}.json", f"{other.key_id}.keys"]
