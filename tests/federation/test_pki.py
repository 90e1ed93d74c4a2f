from __future__ import annotations

import shutil
import ssl
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from federation.errors import ConfigError, DataError
from federation.pki import CertSet, make_certs, make_node_key, read_node_public_key, write_connection


def test_a_new_connection_keeps_flowers_local_simulation_as_the_default(tmp_path: Path) -> None:
    path = write_connection(tmp_path, name="hospitals", address="10.0.0.1:9093", ca_cert=tmp_path / "ca.crt")

    links = tomllib.loads(path.read_text())["superlink"]
    assert links["default"] == "local"
    assert links["local"] == {"address": ":local:"}
    assert links["hospitals"]["address"] == "10.0.0.1:9093"
    assert links["hospitals"]["root-certificates"] == str((tmp_path / "ca.crt").resolve())


def test_a_connection_made_default_replaces_only_the_default_and_keeps_the_others(tmp_path: Path) -> None:
    write_connection(tmp_path, name="a", address="h1:1", ca_cert=tmp_path / "ca.crt")

    path = write_connection(tmp_path, name="b", address="h2:2", ca_cert=tmp_path / "ca.crt", default=True)

    links = tomllib.loads(path.read_text())["superlink"]
    assert links["default"] == "b"
    assert set(links) == {"default", "local", "a", "b"}


# ---------------------------------------------------------------- keys and certificates

def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _leaf_without_key_ids(certs: CertSet) -> bytes:
    """The SuperLink certificate as it was before SKI/AKI: same issuer and key, no key identifiers."""
    ca_key = serialization.load_pem_private_key(certs.ca_key.read_bytes(), password=None)
    leaf = x509.load_pem_x509_certificate(certs.superlink_cert.read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    builder = (x509.CertificateBuilder().subject_name(leaf.subject).issuer_name(leaf.issuer)
               .public_key(leaf.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(leaf.not_valid_before_utc).not_valid_after(leaf.not_valid_after_utc))
    for ext in leaf.extensions:
        if not isinstance(ext.value, x509.SubjectKeyIdentifier | x509.AuthorityKeyIdentifier):
            builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)


def _openssl_verify(ca: Path, leaf: Path) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed for the strict X.509 check (Debian package openssl)"
    return subprocess.run([openssl, "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(ca), str(leaf)],
                          capture_output=True, text=True, timeout=30, check=False)


def _strict_handshake(certs: CertSet, server_hostname: str, *, leaf: Path | None = None) -> None:
    """A TLS handshake in memory: the SuperLink's pair against a client with VERIFY_X509_STRICT."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf or certs.superlink_cert, certs.superlink_key)
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, end, out, peer in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[side]:
                try:
                    end.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if side == "client":
                        raise
                    done[side] = True   # the server's view of a client that hung up
            peer.write(out.read())
        if all(done.values()):
            return
    raise AssertionError(f"handshake did not complete: {done}")


def test_a_hospital_makes_its_own_key_pair_and_only_the_public_half_is_readable(tmp_path: Path) -> None:
    key = make_node_key(tmp_path / "site-1", site="site-1")

    private = load_ssh_private_key(key.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(key.public_key.read_bytes())
    assert private.public_key() == public
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp384r1"
    assert key.public_key.read_text().split()[2] == "site-1"
    assert (_mode(key.private_key), _mode(key.public_key), _mode(tmp_path / "site-1")) == (0o600, 0o644, 0o700)
    with pytest.raises(ConfigError, match="exists"):
        make_node_key(tmp_path / "site-1", site="site-1")
    with pytest.raises(ConfigError, match="site name must match"):
        make_node_key(tmp_path / "x", site="../etc")


def test_the_coordinator_keeps_the_ca_key_apart_and_hands_out_only_the_ca_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "coordinator", hosts=["link.hospital.example", "10.1.2.3"])

    assert [p.name for p in certs.handout.iterdir()] == ["ca.crt"]
    assert certs.ca_key.parent.name == "ca-private"
    assert certs.ca_key.parent != certs.handout
    assert (_mode(certs.ca_key.parent), _mode(certs.ca_key), _mode(certs.superlink_key)) == (0o700, 0o600, 0o600)
    assert b"PRIVATE KEY" not in certs.ca_cert.read_bytes()
    assert not list((tmp_path / "coordinator").rglob("node"))          # no SuperNode key is made here
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(certs.superlink_cert.read_bytes())
    link.verify_directly_issued_by(ca)
    sans = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["link.hospital.example", "localhost"]
    usage = link.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    with pytest.raises(ConfigError, match="exists"):
        make_certs(tmp_path / "coordinator", hosts=["127.0.0.1"])


def test_the_superlink_certificate_passes_strict_x509_verification_in_openssl_and_python(tmp_path: Path) -> None:
    certs = make_certs(tmp_path, hosts=["link.hospital.example"])
    (tmp_path / "old.crt").write_bytes(_leaf_without_key_ids(certs))

    strict = _openssl_verify(certs.ca_cert, certs.superlink_cert)
    old = _openssl_verify(certs.ca_cert, tmp_path / "old.crt")

    assert strict.returncode == 0, strict.stdout + strict.stderr
    assert old.returncode != 0                                        # the check is real:
    assert "key identifier" in (old.stdout + old.stderr).lower()     # without SKI/AKI it fails
    for name in ("link.hospital.example", "127.0.0.1", "localhost"):
        _strict_handshake(certs, name)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Kk]ey [Ii]dentifier"):
        _strict_handshake(certs, "localhost", leaf=tmp_path / "old.crt")


def test_the_coordinator_reads_a_hospitals_public_key_and_refuses_a_private_one(tmp_path: Path) -> None:
    key = make_node_key(tmp_path / "site-2", site="site-2")
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "rsa.pub").write_bytes(rsa_pub + b" site-3\n")

    got = read_node_public_key(key.public_key)

    assert got.site == "site-2"
    assert got.openssh == b" ".join(key.public_key.read_bytes().split()[:2])
    assert read_node_public_key(key.public_key, site="renamed").site == "renamed"
    with pytest.raises(DataError, match=r"holds a private key: a hospital hands over only node\.pub"):
        read_node_public_key(key.private_key)
    with pytest.raises(DataError, match="SuperNode keys are ECDSA"):
        read_node_public_key(tmp_path / "rsa.pub")
    with pytest.raises(DataError, match="cannot read"):
        read_node_public_key(tmp_path / "missing.pub")
