"""Certificates and keys for a Flower deployment: one SuperLink, one SuperNode per hospital.

``make_certs`` writes a private CA, the SuperLink's TLS certificate (its SANs name every
address the SuperNodes and the operator will dial) and, per site, an ECDSA P-384 key pair in
OpenSSH format for SuperNode authentication (what ``ssh-keygen -t ecdsa -b 384`` makes, the
format Flower reads). Private keys are written owner-only; nothing is overwritten without
``overwrite``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import ConfigError
from federation.storage import atomic_write_bytes

__all__ = ["CertSet", "LocalFederation", "make_certs", "write_connection"]


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


def write_connection(flwr_home: Path, *, name: str, address: str, ca_cert: Path, default: bool = True) -> Path:
    """Add (or replace) a TLS SuperLink connection in ``FLWR_HOME/config.toml`` for ``flwr run/ls/stop``."""
    import tomllib

    path = Path(flwr_home) / "config.toml"
    current = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = current.setdefault("superlink", {})
    links[name] = {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
    if default or "default" not in links:
        links["default"] = name
    lines = ["[superlink]", f'default = "{links["default"]}"', ""]
    for conn, body in links.items():
        if isinstance(body, dict):
            _table(lines, f"superlink.{conn}", body)
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _table(lines: list[str], name: str, body: dict[str, object]) -> None:
    lines.append(f"[{name}]")
    lines += [f"{k} = {_toml(v)}" for k, v in body.items() if not isinstance(v, dict)]
    lines.append("")
    for k, v in body.items():
        if isinstance(v, dict):
            _table(lines, f"{name}.{k}", v)


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- a whole federation on one machine (tests, rehearsals) -------------------------------------
class LocalFederation:
    """A real SuperLink (TLS + SuperNode authentication) and one SuperNode per site, on 127.0.0.1.

    The same processes and flags as across hospitals (see the README's "Deploy across
    hospitals"), with every address on loopback. Use as a context manager: everything it
    started is stopped on the way out, and logs are kept under ``root/logs``.
    """

    def __init__(self, root: Path, sites: dict[str, Path], *, port: int = 9190, name: str = "hospitals") -> None:
        self.root, self.sites, self.port, self.name = Path(root), dict(sites), port, name
        self.env = {**os.environ, "FLWR_HOME": str(self.root / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.certs = make_certs(self.root / "certs", sites=[*self.sites, "unregistered"],
                                hosts=["127.0.0.1", "localhost"], overwrite=True)
        write_connection(self.root / "flwr", name=name, address=f"127.0.0.1:{port}", ca_cert=self.certs.ca_cert)

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        fh = (self.root / "logs" / log).open("wb")
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> str:
        """Run the ``flwr`` CLI against this federation; returns stdout (raises on failure)."""
        done = subprocess.run([self._bin("flwr"), *args], env=self.env, cwd=cwd or self.root, capture_output=True,
                              timeout=timeout, check=False)
        if done.returncode != 0:
            raise ConfigError(f"flwr {' '.join(args)} failed ({done.returncode}): "
                              f"{(done.stdout + done.stderr).decode(errors='replace')[-1500:]}")
        return done.stdout.decode()

    def start(self) -> None:
        """SuperLink, site registration, then one SuperNode per site."""
        c = self.certs
        self._spawn([self._bin("flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile",
                     str(c.superlink_cert), "--ssl-keyfile", str(c.superlink_key), "--enable-supernode-auth",
                     "--disable-runtime-dependency-installation", "--port", str(self.port),
                     "--database", str(self.root / "superlink.db")], "superlink.log")
        deadline = time.monotonic() + 60
        for site in self.sites:
            while True:
                try:
                    self.flwr("supernode", "register", str(c.site_keys[site][1]), self.name)
                    break
                except ConfigError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        for n, (site, data) in enumerate(self.sites.items()):
            self.supernode(site, data, port=self.port + 10 + n)

    def supernode(self, site: str, data: Path, *, port: int) -> subprocess.Popen[bytes]:
        """Start the SuperNode of ``site`` (its own key, data folder, privacy policy and ledger)."""
        from privacy.policy import SitePolicy

        policy = self.root / "policies" / f"{site}.toml"
        SitePolicy(ledger_dir=str(self.root / "ledgers")).save(policy)
        return self._spawn([self._bin("flower-supernode"), "--root-certificates", str(self.certs.ca_cert),
                            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key",
                            str(self.certs.site_keys[site][0]), "--node-config",
                            f"data-path='{data}' policy-file='{policy}' site='{site}'", "--port", str(port)],
                           f"supernode-{site}.log")

    def run(self, app: Path, run_config: str) -> str:
        """``flwr run`` the app against the federation; returns the run id."""
        out = self.flwr("run", str(app), self.name, "--run-config", run_config, "--format", "json", cwd=app)
        return str(json.loads(out[out.index("{"):])["run-id"])

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's entry from ``flwr ls --format json`` (Flower's own status, not an exit code)."""
        out = self.flwr("ls", self.name, "--run-id", run_id, "--format", "json")
        runs: list[dict[str, Any]] = json.loads(out[out.index("{"):])["runs"]
        return runs[0]

    def wait(self, run_id: str, *, timeout: float = 900, poll: float = 5) -> dict[str, Any]:
        """Follow the run until Flower reports it finished; stop it on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(run_id)
            if str(st.get("status", "")).startswith("finished"):
                return st
            if time.monotonic() > deadline:
                self.flwr("stop", run_id, self.name)
                raise ConfigError(f"run {run_id} did not finish in {timeout:.0f} s (status {st.get('status')})")
            time.sleep(poll)

    def stop(self) -> None:
        """Terminate every process started here (SuperNodes first)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
