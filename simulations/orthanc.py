"""A real PACS for a simulated hospital: Orthanc with its DICOMweb plugin, as a child process on loopback.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``scripts/install-orthanc.sh``, ``make
orthanc``). Each :class:`OrthancServer` has its own folder (configuration, storage, logs) and
nothing system-wide: the HTTP server takes loopback connections only (``RemoteAccessAllowed``
false), requires a user and password generated here (HTTP basic auth), and the DICOM (DIMSE)
port stays closed; DICOMweb is served under ``/dicom-web/``.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests

from federation.errors import ConfigError
from federation.net import free_port
from federation.storage import atomic_write_bytes
from simulations.children import stop_child

__all__ = ["OrthancConfig", "OrthancServer", "find_dicomweb_plugin", "find_orthanc"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "install it with scripts/install-orthanc.sh (`make orthanc`; Debian's orthanc and orthanc-dicomweb)"
PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
USER = "privrad"


def find_orthanc() -> Path:
    """The Orthanc binary, or a :class:`ConfigError` saying how to install it."""
    found = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
                                             if Path(p).is_file()), None)
    if found is None:
        raise ConfigError(f"Orthanc is not installed: {INSTALL_HINT}")
    return Path(found)


def find_dicomweb_plugin() -> Path:
    """Orthanc's DICOMweb plugin (``libOrthancDicomWeb.so``)."""
    for folder in PLUGIN_DIRS:
        hits = sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []
        if hits:
            return hits[0]
    raise ConfigError(f"Orthanc's DICOMweb plugin is not installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class OrthancConfig:
    """One PACS: its folder, HTTP port, name and credentials (a random password by default)."""

    folder: Path
    http_port: int = 0
    name: str = "privrad-pacs"
    password: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if not self.http_port:
            object.__setattr__(self, "http_port", free_port())
        if not 0 < self.http_port < 65536:
            raise ConfigError(f"http_port must be in 1..65535, got {self.http_port}")
        if not self.password:
            object.__setattr__(self, "password", secrets.token_urlsafe(18))

    @property
    def url(self) -> str:
        """The REST root, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root, what :class:`clients.pacs.PacsSource` takes."""
        return f"{self.url}/dicom-web"

    @property
    def user(self) -> str:
        """The HTTP basic-auth user."""
        return USER

    def render(self, plugin: Path) -> dict[str, object]:
        """Orthanc's JSON configuration."""
        storage = (self.folder / "storage").resolve()
        return {
            "Name": self.name,
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,     # loopback only
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: self.password},
            "DicomServerEnabled": False,      # no DIMSE port: DICOMweb only
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpTimeout": 60,
            "StableAge": 1,
        }


class OrthancServer:
    """Orthanc as a child process for one :class:`OrthancConfig`; a context manager.

    The storage survives :meth:`stop`: a restarted server with the same folder serves the same
    studies (the tests break a retrieval that way and resume it).
    """

    def __init__(self, cfg: OrthancConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def auth(self) -> tuple[str, str]:
        """``(user, password)`` for HTTP basic auth."""
        return self.cfg.user, self.cfg.password

    def env(self) -> dict[str, str]:
        """The environment variables :func:`clients.pacs.connect` reads its credentials from."""
        return {"PRIVRAD_PACS_USER": self.cfg.user, "PRIVRAD_PACS_PASSWORD": self.cfg.password}

    def write(self) -> Path:
        """Write ``orthanc.json`` (mode 600: it holds the password) and the folders it names."""
        (self.cfg.folder / "storage").mkdir(parents=True, exist_ok=True)
        (self.cfg.folder / "logs").mkdir(parents=True, exist_ok=True)
        path = self.cfg.folder / "orthanc.json"
        atomic_write_bytes(path, json.dumps(self.cfg.render(find_dicomweb_plugin()), indent=2).encode())
        path.chmod(0o600)
        return path

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.cfg.url}/system", auth=self.auth, timeout=2).ok
        except requests.RequestException:
            return False

    def start(self, *, timeout: float = 30) -> OrthancServer:
        """Start Orthanc and wait until its REST API answers."""
        config = self.write()
        self._log = (self.cfg.folder / "logs" / "orthanc.out").open("ab")
        self.proc = subprocess.Popen([str(find_orthanc()), f"--logdir={(self.cfg.folder / 'logs').resolve()}",
                                      str(config.resolve())], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self.stop()
                logs = sorted((self.cfg.folder / "logs").glob("*"))
                tail = logs[-1].read_text(errors="replace")[-1500:] if logs else ""
                raise ConfigError(f"Orthanc did not answer on {self.cfg.url} (exit {code}): {tail}")
            time.sleep(0.2)
        logger.info("Orthanc pid %s: DICOMweb at %s", self.proc.pid, self.cfg.dicomweb)
        return self

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 15 s) and wait for it."""
        stop_child(self.proc, grace_s=15)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
