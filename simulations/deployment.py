"""A whole Flower deployment on one machine: each party in its own folder, real processes on loopback.

The same processes, flags and hand-overs as across hospitals (docs/deployment.md), with every
address on 127.0.0.1 and every port free at start: what the deployment tests and rehearsals run.

``root/`` holds one folder per party, and only what that party would hold:

* ``hospitals/SITE/``: the SuperNode key pair the hospital made itself (``node``, ``node.pub``),
  the CA certificate it was handed (``ca.crt``), its privacy policy and ε ledger, its logs;
* ``coordinator/``: the CA (key in ``pki/ca-private/``), the SuperLink's certificate, the
  hospitals' public keys as received (``received/SITE.pub``), the SuperLink database, nginx's
  prefix; never a hospital's private key;
* ``operator/``: ``flwr``'s config (``FLWR_HOME``) with the connection through the operator listener.

The SuperLink listens on 127.0.0.1 only; nginx (:mod:`simulations.proxy`) exposes the Fleet API
to hospitals and the Control API to the operator.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from federation.errors import ConfigError
from federation.net import free_port
from federation.pki import NodeKey, NodePublicKey, make_certs, make_node_key, read_node_public_key, write_connection
from privacy.policy import SitePolicy
from simulations.proxy import NginxProxy, ProxyConfig

__all__ = ["LocalFederation", "flower_env", "register_supernode"]

UNREGISTERED = "unregistered"
"""A hospital whose key the coordinator never registers: its SuperNode must be refused."""


def _bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's CLIs: ``FLWR_HOME``, no telemetry or update check, this venv first on ``PATH``."""
    env = dict(os.environ if base is None else base)
    return {**env, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}


def _run_flwr(args: list[str], *, env: Mapping[str, str], cwd: Path | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([_bin("flwr"), *args], env=dict(env), cwd=cwd, capture_output=True, timeout=timeout,
                          check=False)


def _output(done: subprocess.CompletedProcess[bytes]) -> str:
    return (done.stdout + done.stderr).decode(errors="replace")


def register_supernode(pub: NodePublicKey, *, connection: str, env: Mapping[str, str]) -> int:
    """Register a hospital's checked public key with ``flwr supernode register``; returns the node id.

    ``connection`` names the operator's SuperLink connection in ``env["FLWR_HOME"]``.
    """
    done = _run_flwr(["supernode", "register", str(pub.path), connection, "--name", pub.site, "--format", "json"],
                     env=env)
    out = done.stdout.decode(errors="replace")
    reply = json.loads(out[out.index("{"):]) if "{" in out else {}
    if done.returncode != 0 or "node-id" not in reply:
        raise ConfigError(f"flwr supernode register {pub.path} {connection} failed ({done.returncode}): "
                          f"{reply.get('error-message') or _output(done)[-1500:]}")
    return int(reply["node-id"])


class LocalFederation:
    """A real SuperLink behind nginx, and one SuperNode per site, on 127.0.0.1.

    The SuperLink (TLS + SuperNode authentication) binds to loopback; hospitals dial the
    proxy's hospital-facing port (Fleet API only), the operator its operator port (Control
    API only). Each site makes its own key pair in its own folder and hands over only
    ``node.pub``. Use as a context manager: everything it started is stopped on the way
    out; logs are kept under ``root/logs``.
    """

    def __init__(self, root: Path, sites: dict[str, Path], *, name: str = "hospitals") -> None:
        self.root, self.sites, self.name = Path(root), dict(sites), name
        if UNREGISTERED in self.sites:
            raise ConfigError(f"sites: {UNREGISTERED!r} is reserved for the never-registered SuperNode")
        self.superlink_port, self.fleet_port, self.control_port = free_port(), free_port(), free_port()
        self.coordinator, self.operator = self.root / "coordinator", self.root / "operator"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.superlink: subprocess.Popen[bytes] | None = None
        # coordinator: CA (key apart), SuperLink certificate, the one file handed out
        self.certs = make_certs(self.coordinator / "pki", hosts=["127.0.0.1", "localhost"], overwrite=True)
        # each hospital, in its own folder: its own key pair and the CA certificate it was handed
        self.node_keys = {site: self._hospital_setup(site) for site in [*self.sites, UNREGISTERED]}
        # operator: flwr's connection through the proxy's operator listener
        write_connection(self.operator / "flwr", name=name, address=f"127.0.0.1:{self.control_port}",
                         ca_cert=self._handed_ca(self.operator), default=True)
        self.env = flower_env(self.operator / "flwr")
        self.proxy = NginxProxy(ProxyConfig(
            prefix=self.coordinator / "nginx", superlink=f"127.0.0.1:{self.superlink_port}",
            hospital_listen=f"127.0.0.1:{self.fleet_port}", operator_listen=f"127.0.0.1:{self.control_port}",
            cert=self.certs.superlink_cert, key=self.certs.superlink_key, ca_cert=self.certs.ca_cert))

    def _handed_ca(self, party: Path) -> Path:
        party.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(self.certs.ca_cert, party / "ca.crt"))

    def hospital(self, site: str) -> Path:
        """The folder of ``site``: what that hospital holds."""
        return self.root / "hospitals" / site

    def _hospital_setup(self, site: str) -> NodeKey:
        home = self.hospital(site)
        key = make_node_key(home, site=site, overwrite=True)
        ca = self._handed_ca(home)
        # what a hospital can reach: the proxy's hospital-facing port, with the CA it was handed
        write_connection(home / "flwr", name=self.name, address=f"127.0.0.1:{self.fleet_port}", ca_cert=ca,
                         default=True)
        if site != UNREGISTERED:   # the hospital sends node.pub, and nothing else, to the coordinator
            received = self.coordinator / "received"
            received.mkdir(parents=True, exist_ok=True)
            shutil.copy2(key.public_key, received / f"{site}.pub")
        return key

    def _spawn(self, args: list[str], log: str, *, cwd: Path,
               env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        with (self.root / "logs" / log).open("wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=dict(env or self.env), cwd=cwd)
        self.procs.append(proc)
        return proc

    def flwr_call(self, *args: str, site: str | None = None, cwd: Path | None = None,
                  timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        """Run the ``flwr`` CLI as the operator, or as hospital ``site`` (its config, its reach)."""
        env = self.env if site is None else flower_env(self.hospital(site) / "flwr")
        return _run_flwr(list(args), env=env, cwd=cwd or (self.operator if site is None else self.hospital(site)),
                         timeout=timeout)

    def flwr(self, *args: str, cwd: Path | None = None, timeout: float = 120) -> str:
        """Run the ``flwr`` CLI as the operator; returns stdout (raises on failure)."""
        done = self.flwr_call(*args, cwd=cwd, timeout=timeout)
        if done.returncode != 0:
            raise ConfigError(f"flwr {' '.join(args)} failed ({done.returncode}): {_output(done)[-1500:]}")
        return done.stdout.decode()

    def start(self) -> None:
        """SuperLink on loopback, nginx in front, registration of the received keys, one SuperNode per site."""
        c = self.certs
        args = [_bin("flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert), "--ssl-certfile",
                str(c.superlink_cert), "--ssl-keyfile", str(c.superlink_key), "--enable-supernode-auth",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                "--port", str(self.superlink_port), "--database", str(self.coordinator / "superlink.db")]
        self.superlink = self._spawn(args, "superlink.log", cwd=self.coordinator)
        self.proxy.start()
        deadline = time.monotonic() + 60
        for site in self.sites:
            pub = read_node_public_key(self.coordinator / "received" / f"{site}.pub")
            while True:
                try:
                    register_supernode(pub, connection=self.name, env=self.env)
                    break
                except ConfigError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        for site, data in self.sites.items():
            self.supernode(site, data)

    def supernode(self, site: str, data: Path, *, port: int | None = None) -> subprocess.Popen[bytes]:
        """Start the SuperNode of ``site`` at its hospital (its own key, data, privacy policy and ledger).

        It dials the proxy's hospital-facing port; its ClientAppIo port is ``port``, or one free now.
        """
        home = self.hospital(site)
        policy = home / "policy.toml"
        SitePolicy(ledger_dir=str(home / "ledgers")).save(policy)
        return self._spawn([_bin("flower-supernode"), "--root-certificates", str(home / "ca.crt"),
                            "--superlink", f"127.0.0.1:{self.fleet_port}", "--auth-supernode-private-key",
                            str(self.node_keys[site].private_key), "--node-config",
                            f"data-path='{data}' policy-file='{policy}' site='{site}'",
                            "--port", str(free_port() if port is None else port)],
                           f"supernode-{site}.log", cwd=home, env=flower_env(home / "flwr"))

    def run(self, app: Path, run_config: str) -> str:
        """``flwr run`` the app through the operator listener; returns the run id."""
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
        """Terminate every process started here (SuperNodes first, nginx before the SuperLink)."""
        for proc in reversed(self.procs):
            if proc is not self.superlink and proc.poll() is None:
                proc.terminate()
        self.proxy.stop()
        if self.superlink is not None and self.superlink.poll() is None:
            self.superlink.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
