"""Deployment: certificates, and a real TLS + node-authenticated federation on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from federation.errors import ConfigError
from federation.pki import make_certs
from federation.storage import load_checkpoint
from simulations.deployment import LocalFederation

ROOT = Path(__file__).resolve().parents[2]


def test_certs_chain_to_the_ca_name_the_hosts_and_keep_private_keys_private(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, sites=["site-1", "site-2"], hosts=["127.0.0.1", "link.hospital.example"])
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(certs.superlink_cert.read_bytes())

    link.verify_directly_issued_by(ca)
    sans = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["link.hospital.example"]
    for private, public in certs.site_keys.values():
        key = load_ssh_private_key(private.read_bytes(), password=None)
        assert key.public_key() == load_ssh_public_key(public.read_bytes())
        assert private.stat().st_mode & 0o077 == 0
    assert certs.superlink_key.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="exists"):
        make_certs(tmp_path, sites=["site-1"], hosts=["127.0.0.1"])


@pytest.mark.slow
def test_a_dp_secagg_run_completes_on_a_tls_authenticated_federation(tiny_federation: Path, tmp_path: Path) -> None:
    sites = {s: tiny_federation / s for s in ("site-1", "site-2")}
    out = tmp_path / "run"
    with LocalFederation(tmp_path / "fed", sites) as fed:
        intruder = fed.supernode("unregistered", tiny_federation / "site-1")  # key never registered
        run_id = fed.run(ROOT, f"num-server-rounds=2 image-size=32 batch-size=4 local-epochs=1 dp=true secagg=true "
                               f"secagg-timeout=120 data-dir='{tiny_federation}' out-dir='{out}'")
        status = fed.wait(run_id, timeout=900)
        try:
            refused = intruder.wait(timeout=120)
        except subprocess.TimeoutExpired:
            refused = None

    assert status["status"] == "finished:completed", status
    model = load_checkpoint(out / "global_model.pt").model
    assert model.config.input_size == 32
    log = (tmp_path / "fed" / "logs" / "supernode-unregistered.log").read_text()
    assert refused not in (None, 0)   # the unregistered SuperNode gave up...
    assert "Exit Code: 305" in log                 # ...because the SuperLink would not activate it
    assert "Failed to activate SuperNode" in log
    ledgers = sorted((tmp_path / "fed" / "ledgers").glob("*.json"))
    assert [p.stem for p in ledgers] == ["site-1", "site-2"]
