"""Certificates and keys for a Flower deployment: one SuperLink, one SuperNode per hospital.

``make_certs`` writes a private CA, the SuperLink's TLS certificate (its SANs name every
address the SuperNodes and the operator will dial) and, per site, an ECDSA P-384 key pair in
OpenSSH format for SuperNode authentication (what ``ssh-keygen -t ecdsa -b 384`` makes, the
format Flower reads). Private keys are written owner-only; nothing is overwritten without
``overwrite``.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError
from federation.storage import atomic_write_bytes

__all__ = ["CertSet", "make_certs", "write_connection"]


@dataclass(frozen=True)
class CertSet:
    """Paths of what :func:`make_certs` wrote."""

    ca_cert: Path
    superlink_cert: Path
    superlink_key: Path
    site_keys: dict[str, tuple[Path, Path]]   # site → (private key, public key)


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite (--force) to replace it")
    atomic_write_bytes(path, data)
    if private:
        os.chmod(path, 0o600)
    return path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out: Path, *, sites: list[str], hosts: list[str], days: int = 365,
               overwrite: bool = False) -> CertSet:
    """Write the CA, the SuperLink certificate for ``hosts`` (DNS names or IPs) and one key pair per site."""
    if not sites:
        raise ConfigError("at least one site is needed")
    if not hosts:
        raise ConfigError("the SuperLink certificate needs at least one host name or IP")
    if len(set(sites)) != len(sites):
        raise ConfigError(f"site names must be unique, got {sites}")
    out = Path(out)
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privrad federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    link_key = _key()
    link = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(link_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    ca_cert = _write(out / "ca.crt", ca.public_bytes(pem), private=False, overwrite=overwrite)
    _write(out / "ca.key", _pem_key(ca_key), private=True, overwrite=overwrite)
    link_cert = _write(out / "superlink.crt", link.public_bytes(pem), private=False, overwrite=overwrite)
    link_keyf = _write(out / "superlink.key", _pem_key(link_key), private=True, overwrite=overwrite)
    site_keys = {}
    for site in sites:
        key = _key()
        priv = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        site_keys[site] = (_write(out / site / "node", priv, private=True, overwrite=overwrite),
                           _write(out / site / "node.pub", pub + f" {site}\n".encode(), private=False,
                                  overwrite=overwrite))
    return CertSet(ca_cert, link_cert, link_keyf, site_keys)


FLOWER_DEFAULTS = {"superlink": {"default": "local", "local": {"address": ":local:"}}}
"""What ``flwr`` itself writes into a new ``config.toml``: the local simulation connection, as default."""


def write_connection(flwr_home: Path, *, name: str, address: str, ca_cert: Path, default: bool = False) -> Path:
    """Add (or replace) a TLS SuperLink connection in ``FLWR_HOME/config.toml`` for ``flwr run/ls/stop``.

    Other connections are kept; a new file starts from Flower's own defaults (the ``local``
    simulation connection), so a plain ``flwr run .`` still simulates. ``default`` makes
    ``name`` the connection ``flwr`` uses when none is named.
    """
    path = Path(flwr_home) / "config.toml"
    current = tomllib.loads(path.read_text()) if path.is_file() else copy.deepcopy(FLOWER_DEFAULTS)
    links = current.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
    if default or "default" not in links:
        links["default"] = name
    atomic_write_bytes(path, tomli_w.dumps(current).encode())
    return path
