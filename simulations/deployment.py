"""A whole Flower deployment on one machine: a real SuperLink and one SuperNode per site on loopback.

The same processes and flags as across hospitals (docs/deployment.md), with every address on
127.0.0.1 and every port free at start: what the deployment tests and rehearsals run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from federation.errors import ConfigError
from federation.net import free_port
from federation.pki import make_certs, write_connection
from privacy.policy import SitePolicy

__all__ = ["LocalFederation"]


class LocalFederation:
    """A real SuperLink (TLS + SuperNode authentication) and one SuperNode per site, on 127.0.0.1.

    The same processes and flags as across hospitals (see the README's "Deploy across
    hospitals"), with every address on loopback. Use as a context manager: everything it
    started is stopped on the way out, and logs are kept under ``root/logs``.
    """

    def __init__(self, root: Path, sites: dict[str, Path], *, port: int | None = None,
                 name: str = "hospitals") -> None:
        self.root, self.sites, self.name = Path(root), dict(sites), name
        self.port = free_port() if port is None else port
        self.env = {**os.environ, "FLWR_HOME": str(self.root / "flwr"), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.certs = make_certs(self.root / "certs", sites=[*self.sites, "unregistered"],
                                hosts=["127.0.0.1", "localhost"], overwrite=True)
        write_connection(self.root / "flwr", name=name, address=f"127.0.0.1:{self.port}", ca_cert=self.certs.ca_cert,
                         default=True)

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
        for site, data in self.sites.items():
            self.supernode(site, data)

    def supernode(self, site: str, data: Path, *, port: int | None = None) -> subprocess.Popen[bytes]:
        """Start the SuperNode of ``site`` (its own key, data folder, privacy policy and ledger).

        Its ClientAppIo port is ``port``, or one free now.
        """
        policy = self.root / "policies" / f"{site}.toml"
        SitePolicy(ledger_dir=str(self.root / "ledgers")).save(policy)
        return self._spawn([self._bin("flower-supernode"), "--root-certificates", str(self.certs.ca_cert),
                            "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key",
                            str(self.certs.site_keys[site][0]), "--node-config",
                            f"data-path='{data}' policy-file='{policy}' site='{site}'",
                            "--port", str(free_port() if port is None else port)],
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
