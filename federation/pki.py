"""Certificates and keys for a Flower deployment, each made where it is used.

Three parties, three functions, and no private key ever leaves the party that made it:

* a **hospital** runs :func:`make_node_key`: an ECDSA P-384 key pair in OpenSSH format (what
  ``ssh-keygen -t ecdsa -b 384`` makes, the format Flower's SuperNode reads). ``node`` (mode
  600) stays inside the hospital; only ``node.pub`` is sent to the coordinator;
* the **coordinator** runs :func:`make_certs`: a private CA whose key lies apart in
  ``ca-private/ca.key`` (folder 700, file 600, to be kept offline), the SuperLink's TLS
  certificate (its SANs name every address the SuperNodes and the operator dial) and
  ``handout/ca.crt``, the one file every hospital and the operator receive;
* the coordinator checks each hospital's ``node.pub`` with :func:`read_node_public_key`
  before registering it: a private key sent by mistake is refused (and is then exposed).

The certificates carry Subject and Authority Key Identifiers and a leaf KeyUsage, so they pass
strict X.509 verification (``openssl verify -x509_strict``, Python's ``ssl.VERIFY_X509_STRICT``,
the default from Python 3.13). Nothing is overwritten without ``overwrite``.
"""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError, DataError
from federation.storage import atomic_write_bytes

__all__ = ["CertSet", "NodeKey", "NodePublicKey", "make_certs", "make_node_key", "read_node_public_key",
           "write_connection"]

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
"""What a site name may be: it names a folder, an OpenSSH key comment and a SuperNode."""

CA_PRIVATE_DIR = "ca-private"
"""The coordinator's folder for the CA key (mode 700): nothing in it is handed out."""

HANDOUT_DIR = "handout"
"""The coordinator's folder of what every hospital and the operator receive: ``ca.crt`` only."""

LOOPBACK_NAMES = ("127.0.0.1", "localhost")
"""Names every SuperLink certificate carries: the proxy and the SuperLink's own processes dial loopback."""

_NO_USAGE = {"content_commitment": False, "key_encipherment": False, "data_encipherment": False,
             "key_agreement": False, "encipher_only": False, "decipher_only": False}


@dataclass(frozen=True)
class CertSet:
    """Paths of what :func:`make_certs` wrote at the coordinator.

    Attributes
    ----------
    ca_cert
        ``handout/ca.crt``: the federation's trust anchor, given to every hospital and the operator.
    ca_key
        ``ca-private/ca.key``: signs certificates; keep it offline, never hand it out.
    superlink_cert, superlink_key
        The TLS certificate (and its key) of the SuperLink and of the proxy in front of it.
    """

    ca_cert: Path
    ca_key: Path
    superlink_cert: Path
    superlink_key: Path

    @property
    def handout(self) -> Path:
        """The folder of what leaves the coordinator (``ca.crt`` only)."""
        return self.ca_cert.parent


@dataclass(frozen=True)
class NodeKey:
    """A hospital's SuperNode key pair, as :func:`make_node_key` wrote it at the hospital."""

    site: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class NodePublicKey:
    """A hospital's SuperNode public key, read and checked at the coordinator."""

    site: str
    path: Path
    openssh: bytes


def _check_site(site: str) -> str:
    if not SITE_NAME.fullmatch(site):
        raise ConfigError(f"site name must match {SITE_NAME.pattern} (letters, digits, '.', '_', '-'), got {site!r}")
    return site


def _write(path: Path, data: bytes, *, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite (--force) to replace it")
    atomic_write_bytes(path, data)   # created owner-only, then opened up if public
    os.chmod(path, 0o600 if private else 0o644)
    return path


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _ca_cert(key: ec.EllipticCurvePrivateKey, name: x509.Name, *, now: dt.datetime, days: int) -> x509.Certificate:
    public = key.public_key()
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **_NO_USAGE),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
            .sign(key, hashes.SHA384()))


def _server_cert(key: ec.EllipticCurvePrivateKey, *, hosts: list[str], ca: x509.Certificate,
                 ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime, days: int) -> x509.Certificate:
    # ECDSA signs the TLS handshake (no key transport): digital_signature is the whole KeyUsage.
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **_NO_USAGE),
                           critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))


def make_certs(out: Path, *, hosts: list[str], days: int = 365, overwrite: bool = False) -> CertSet:
    """Write the coordinator's CA and the SuperLink certificate for ``hosts`` (DNS names or IPs).

    ``out/ca-private/ca.key`` (folder 700, file 600) is the CA key, ``out/handout/ca.crt``
    what hospitals and the operator receive, ``out/superlink.crt`` and ``out/superlink.key``
    (600) the server's pair. No SuperNode key is made here: each hospital makes its own
    (:func:`make_node_key`) and sends only the public half.

    The SANs are ``hosts`` plus ``127.0.0.1`` and ``localhost``: behind the proxy the SuperLink
    listens on loopback only, where its own ServerApp processes and the proxy dial it.
    """
    if not hosts:
        raise ConfigError("hosts: the SuperLink certificate needs at least one host name or IP, got []")
    if days < 1:
        raise ConfigError(f"days must be at least 1, got {days}")
    out = Path(out)
    hosts = [*hosts, *(h for h in LOOPBACK_NAMES if h not in hosts)]
    now = dt.datetime.now(dt.UTC)
    ca_key, link_key = _key(), _key()
    ca = _ca_cert(ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "privrad federation CA")]),
                  now=now, days=days)
    link = _server_cert(link_key, hosts=hosts, ca=ca, ca_key=ca_key, now=now, days=days)
    pem = serialization.Encoding.PEM
    ca_keyf = _write(_private_dir(out / CA_PRIVATE_DIR) / "ca.key", _pem_key(ca_key), private=True,
                     overwrite=overwrite)
    ca_cert = _write(out / HANDOUT_DIR / "ca.crt", ca.public_bytes(pem), private=False, overwrite=overwrite)
    link_cert = _write(out / "superlink.crt", link.public_bytes(pem), private=False, overwrite=overwrite)
    link_keyf = _write(out / "superlink.key", _pem_key(link_key), private=True, overwrite=overwrite)
    return CertSet(ca_cert=ca_cert, ca_key=ca_keyf, superlink_cert=link_cert, superlink_key=link_keyf)


def make_node_key(out: Path, *, site: str, overwrite: bool = False) -> NodeKey:
    """Write a hospital's SuperNode key pair: ``out/node`` (600, stays here) and ``out/node.pub``.

    Run at the hospital. ``out`` is made owner-only (700) if new; the public key's comment
    is the site name, which the coordinator reads back when it registers the key.
    """
    _check_site(site)
    out = Path(out)
    if not out.exists():
        _private_dir(out)
    key = _key()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKey(site=site,
                   private_key=_write(out / "node", priv, private=True, overwrite=overwrite),
                   public_key=_write(out / "node.pub", pub + f" {site}\n".encode(), private=False,
                                     overwrite=overwrite))


def read_node_public_key(path: Path, *, site: str | None = None) -> NodePublicKey:
    """Read a hospital's ``node.pub`` at the coordinator, refusing anything but an ECDSA public key.

    A private key is refused with a message saying so (the hospital must make a new pair: the
    one sent has left it). ``site`` defaults to the key's OpenSSH comment.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read the SuperNode public key: {exc.strerror}") from exc
    if b"PRIVATE KEY" in data:
        raise DataError(path, "holds a private key: a hospital hands over only node.pub; this key has left the "
                              "hospital, so it must make a new pair (privrad deploy node-key --force)")
    fields = data.split()
    try:
        key = serialization.load_ssh_public_key(b" ".join(fields[:2]))
    except (ValueError, IndexError, UnsupportedAlgorithm) as exc:
        raise DataError(path, f"not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DataError(path, f"SuperNode keys are ECDSA (ssh-keygen -t ecdsa -b 384), got {fields[0].decode()}")
    name = site if site is not None else (fields[2].decode(errors="replace") if len(fields) > 2 else path.stem)
    return NodePublicKey(site=_check_site(name), path=path, openssh=b" ".join(fields[:2]))


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
