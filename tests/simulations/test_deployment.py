"""Deployment: a real federation on loopback, SuperLink behind nginx, each party holding only its own keys."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from federation.errors import DataError
from federation.storage import load_checkpoint
from simulations.cli import app
from simulations.deployment import LocalFederation

ROOT = Path(__file__).resolve().parents[2]
REFUSED = "the hospital-facing address serves the Flower Fleet API (/v1/fleet/) only"


def _private_keys_under(folder: Path) -> dict[Path, bytes]:
    """Every private key (OpenSSH or PEM) in ``folder``, as its public key in OpenSSH form."""
    found: dict[Path, bytes] = {}
    for path in (p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if b"PRIVATE KEY" not in data:
            continue
        load = serialization.load_ssh_private_key if b"OPENSSH" in data else serialization.load_pem_private_key
        key = load(data, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), path
        found[path] = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return found


def _superlink_addresses(pid: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


@pytest.mark.slow
def test_hospitals_reach_only_the_fleet_api_and_the_operators_dp_secagg_run_completes(
        nginx: Path, tiny_federation: Path, tmp_path: Path) -> None:
    sites = {s: tiny_federation / s for s in ("site-1", "site-2")}
    out = tmp_path / "run"
    with LocalFederation(tmp_path / "fed", sites) as fed:
        intruder = fed.supernode("unregistered", tiny_federation / "site-1")  # key never registered
        run_id = fed.run(ROOT, f"num-server-rounds=2 image-size=32 batch-size=4 local-epochs=1 dp=true secagg=true "
                               f"secagg-timeout=120 data-dir='{tiny_federation}' out-dir='{out}'")
        # while the run goes on: what site-1 holds (its key, the CA, the hospital-facing address) is refused
        hospital = {"ls": fed.flwr_call("ls", fed.name, "--format", "json", site="site-1"),
                    "run": fed.flwr_call("run", str(ROOT), fed.name, "--run-config", "num-server-rounds=1",
                                         "--format", "json", site="site-1", cwd=ROOT),
                    "register": fed.flwr_call("supernode", "register", str(fed.hospital("site-1") / "node.pub"),
                                              fed.name, "--format", "json", site="site-1")}
        assert fed.superlink is not None
        listening = _superlink_addresses(fed.superlink.pid)
        status = fed.wait(run_id, timeout=900)
        runs = fed.flwr("ls", fed.name, "--format", "json")
        try:
            refused = intruder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            refused = None

    assert status["status"] == "finished:completed", status
    assert runs.count('"run-id"') == 1                         # the hospital's `flwr run` started nothing
    model = load_checkpoint(out / "global_model.pt").model
    assert model.config.input_size == 32
    for what, done in hospital.items():   # flwr's exit code is 0 even then: its JSON says what happened
        reply = json.loads(done.stdout[done.stdout.index(b"{"):])
        assert reply["success"] is False, (what, reply)
        assert REFUSED in reply["error-message"], (what, reply)
    assert listening == {"127.0.0.1"}                           # the SuperLink itself: loopback only
    log = (tmp_path / "fed" / "logs" / "supernode-unregistered.log").read_text()
    assert refused not in (None, 0)   # the unregistered SuperNode gave up...
    assert "Exit Code: 305" in log                 # ...because the SuperLink would not activate it
    assert "Failed to activate SuperNode" in log
    ledgers = sorted((tmp_path / "fed" / "hospitals").glob("*/ledgers/*.json"))
    assert [p.stem for p in ledgers] == ["site-1", "site-2"]


def test_no_hospital_private_key_exists_at_the_coordinator_and_the_handout_holds_only_the_ca_cert(
        tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path / "fed", {"site-1": tmp_path / "d1", "site-2": tmp_path / "d2"})

    at_hospitals = {site: k.public_key.read_bytes().split()[:2] for site, k in fed.node_keys.items()}
    at_coordinator = _private_keys_under(fed.coordinator)

    assert set(at_hospitals) == {"site-1", "site-2", "unregistered"}
    for site, key in fed.node_keys.items():
        assert key.private_key.is_relative_to(fed.hospital(site))
        assert os.stat(key.private_key).st_mode & 0o077 == 0
    assert set(at_coordinator) == {fed.certs.ca_key, fed.certs.superlink_key}   # its own two, no site's
    site_pubs = {b" ".join(v) for v in at_hospitals.values()}
    assert not site_pubs & set(at_coordinator.values())
    assert [p.name for p in fed.certs.handout.iterdir()] == ["ca.crt"]
    assert sorted(p.name for p in (fed.coordinator / "received").iterdir()) == ["site-1.pub", "site-2.pub"]
    assert _private_keys_under(fed.operator) == {}


def test_the_deploy_commands_keep_each_key_with_its_party_and_register_refuses_a_private_key(tmp_path: Path) -> None:
    runner = CliRunner()

    node = runner.invoke(app, ["deploy", "node-key", "--site", "site-1", "--out", str(tmp_path / "site-1")])
    certs = runner.invoke(app, ["deploy", "certs", "--out", str(tmp_path / "coordinator"), "--host", "10.0.0.7"])
    leaked = runner.invoke(app, ["deploy", "register", "--pub", str(tmp_path / "site-1" / "node"),
                                 "--flwr-home", str(tmp_path / "flwr")])

    assert node.exit_code == 0, node.output
    assert "stays here" in node.output
    assert sorted(p.name for p in (tmp_path / "site-1").iterdir()) == ["node", "node.pub"]
    assert certs.exit_code == 0, certs.output
    assert sorted(str(p.relative_to(tmp_path / "coordinator")) for p in (tmp_path / "coordinator").rglob("*")
                  if p.is_file()) == ["ca-private/ca.key", "handout/ca.crt", "superlink.crt", "superlink.key"]
    assert isinstance(leaked.exception, DataError)
    assert "holds a private key" in str(leaked.exception)
    assert not (tmp_path / "flwr").exists()          # refused before anything was sent
