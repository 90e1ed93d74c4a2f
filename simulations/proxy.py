"""nginx in front of the SuperLink: hospitals reach the Fleet API only, the operator the Control API.

Flower 1.41 serves its Fleet API (``/v1/fleet/…``, what SuperNodes call), its Control API
(``/v1/control/…``: start runs, register nodes, pull results, what ``flwr`` calls) and its
Runtime API (``/v1/runtime/…``, the ServerApp's) as one FastAPI app on one HTTPS port, and
without Flower Enterprise the Control API authenticates nobody (its no-op plugin accepts every
request). So the SuperLink binds to 127.0.0.1 and nginx, started here as a child process with
its own prefix (config, pid, logs, temp files; nothing system-wide), listens twice:

* the **hospital-facing** listener (``hospital_listen``) passes ``POST /v1/fleet/…`` and answers
  everything else with 403 and a JSON ``detail`` that ``flwr`` prints;
* the **operator** listener (``operator_listen``, loopback unless an operator network is named
  on purpose) passes ``/v1/control/…`` only: the Runtime API stays on the SuperLink's loopback port.

Both terminate TLS with the SuperLink's certificate and dial the SuperLink over TLS, checking
its certificate against the federation CA (``proxy_ssl_verify``). :func:`render_nginx_conf` is
pure; :class:`NginxProxy` runs it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import shutil
import socket
import string
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from federation.errors import ConfigError
from simulations.children import stop_child

__all__ = ["NginxProxy", "ProxyConfig", "find_nginx", "render_nginx_conf"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "install it with scripts/install-nginx.sh (`make nginx`; Debian's nginx package)"
FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
REFUSAL_HOSPITAL = ("privrad proxy: 403 Forbidden, the hospital-facing address serves the Flower Fleet API "
                    "(/v1/fleet/) only; runs, registrations and results go through the operator address")
REFUSAL_OPERATOR = ("privrad proxy: 403 Forbidden, the operator address serves the Flower Control API "
                    "(/v1/control/) only")


def _split(address: str, *, field: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{field} must be HOST:PORT with a port in 1..65535, got {address!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ProxyConfig:
    """Where nginx listens, what it dials and with which certificate.

    Parameters
    ----------
    prefix
        nginx's own folder: ``nginx.conf``, ``nginx.pid``, ``logs/``, ``temp/``.
    superlink
        The SuperLink's ``HOST:PORT``; must be loopback (the SuperLink binds to 127.0.0.1).
    hospital_listen
        ``HOST:PORT`` the SuperNodes dial (``0.0.0.0:9093`` across hospitals).
    operator_listen
        ``HOST:PORT`` of the operator's ``flwr`` (loopback: the operator works on the
        coordinator or through ``ssh -L``).
    cert, key
        TLS pair nginx presents on both listeners (the SuperLink's; its SANs name the
        hospital-facing host).
    ca_cert
        The federation CA, to check the SuperLink's certificate on the hop behind nginx.
    operator_network
        Allow a non-loopback ``operator_listen`` (an operator-only VPN interface). Off by default.
    """

    prefix: Path
    superlink: str
    hospital_listen: str
    operator_listen: str
    cert: Path
    key: Path
    ca_cert: Path
    operator_network: bool = False

    def __post_init__(self) -> None:
        link_host, _ = _split(self.superlink, field="superlink")
        if not _is_loopback(link_host):
            raise ConfigError(f"superlink must be a loopback address (the SuperLink binds to 127.0.0.1 behind the "
                              f"proxy), got {self.superlink!r}")
        _split(self.hospital_listen, field="hospital_listen")
        op_host, _ = _split(self.operator_listen, field="operator_listen")
        if not _is_loopback(op_host) and not self.operator_network:
            raise ConfigError(f"operator_listen must be loopback unless operator_network is set (an address only the "
                              f"operator reaches), got {self.operator_listen!r}")
        if len({self.superlink, self.hospital_listen, self.operator_listen}) != 3:
            raise ConfigError(f"superlink, hospital_listen and operator_listen must differ, got {self.superlink!r}, "
                              f"{self.hospital_listen!r}, {self.operator_listen!r}")

    @property
    def conf(self) -> Path:
        """The generated ``nginx.conf``."""
        return self.prefix / "nginx.conf"

    @property
    def error_log(self) -> Path:
        """The error log of nginx (startup errors included)."""
        return self.prefix / "logs" / "error.log"


def _listen(address: str) -> str:
    host, port = _split(address, field="listen")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


NGINX_TEMPLATE = string.Template("""\
# generated by privrad (simulations/proxy.py): SuperLink $superlink behind two listeners
${user}worker_processes 1;
pid $prefix/nginx.pid;
error_log $prefix/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log $prefix/logs/access.log;
    client_body_temp_path $prefix/temp/body;
    proxy_temp_path $prefix/temp/proxy;
    fastcgi_temp_path $prefix/temp/fastcgi;
    uwsgi_temp_path $prefix/temp/uwsgi;
    scgi_temp_path $prefix/temp/scgi;
    server_tokens off;
    client_max_body_size 0;                 # FABs and model parameters
    proxy_http_version 1.1;
    proxy_buffering off;                    # log streams, long pulls
    proxy_request_buffering off;
    proxy_read_timeout 3600s;
    proxy_send_timeout 3600s;
    proxy_set_header Host $$http_host;
    proxy_set_header Connection "";
    proxy_set_header X-Forwarded-For $$remote_addr;
    # the hop to the SuperLink is TLS too, its certificate checked against the federation CA
    # (by DNS name: nginx matches the name with X509_check_host; every SuperLink certificate names localhost)
    proxy_ssl_trusted_certificate $ca_cert;
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_name localhost;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    proxy_ssl_session_reuse on;
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.2 TLSv1.3;
    upstream superlink { server $upstream; keepalive 16; }

    # hospitals: the Fleet API only
    server {
        listen $hospital_listen ssl;
        location $fleet {                   # proxy_pass with a URI: the normalised path goes upstream
            limit_except POST { deny all; }
            proxy_pass https://superlink$fleet;
        }
        location / {
            default_type application/json;
            return 403 '{"detail": "$hospital_refusal"}';
        }
    }

    # operator: the Control API only (runs, node registration, logs, results)
    server {
        listen $operator_listen ssl;
        location $control {
            limit_except POST { deny all; }
            proxy_pass https://superlink$control;
        }
        location / {
            default_type application/json;
            return 403 '{"detail": "$operator_refusal"}';
        }
    }
}
""")
"""The whole ``nginx.conf``; :func:`render_nginx_conf` fills it in."""


def render_nginx_conf(cfg: ProxyConfig) -> str:
    """The ``nginx.conf`` for ``cfg``: two TLS listeners, one path prefix each, 403 for the rest.

    Started by root, nginx would switch its workers to ``nobody``, who cannot enter the
    caller's owner-only folders: the ``user`` line keeps them as the caller. In production run
    the proxy as an unprivileged account of its own (docs/deployment.md).
    """
    link_host, link_port = _split(cfg.superlink, field="superlink")
    return NGINX_TEMPLATE.substitute(
        superlink=cfg.superlink, prefix=cfg.prefix.resolve(), ca_cert=cfg.ca_cert.resolve(),
        cert=cfg.cert.resolve(), key=cfg.key.resolve(),
        user=f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else "",
        upstream=f"127.0.0.1:{link_port}" if link_host == "localhost" else _listen(cfg.superlink),
        hospital_listen=_listen(cfg.hospital_listen), operator_listen=_listen(cfg.operator_listen),
        fleet=FLEET_PREFIX, control=CONTROL_PREFIX, hospital_refusal=REFUSAL_HOSPITAL,
        operator_refusal=REFUSAL_OPERATOR)


def find_nginx() -> Path:
    """The nginx binary (``PATH``, then ``/usr/sbin``); a named error if it is missing."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        raise ConfigError(f"nginx: no nginx binary on PATH or in /usr/sbin; {INSTALL_HINT}")
    return Path(found)


def _accepts(address: str) -> bool:
    host, port = _split(address, field="listen")
    try:
        with socket.create_connection(("127.0.0.1" if host in ("0.0.0.0", "::") else host, port), timeout=1):
            return True
    except OSError:
        return False


class NginxProxy:
    """nginx as a foreground child process (``daemon off``) for one :class:`ProxyConfig`.

    Use as a context manager, or :meth:`start` / :meth:`stop`. The config is checked with
    ``nginx -t`` first, so a bad one fails with nginx's own message.
    """

    def __init__(self, cfg: ProxyConfig, *, nginx: Path | None = None) -> None:
        self.cfg = cfg
        self.nginx = nginx or find_nginx()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _args(self) -> list[str]:
        return [str(self.nginx), "-p", str(self.cfg.prefix.resolve()), "-c", str(self.cfg.conf.resolve()),
                "-e", str(self.cfg.error_log.resolve())]

    def write(self) -> Path:
        """Write ``nginx.conf`` and the folders it names, then check it with ``nginx -t``."""
        for sub in ("logs", "temp"):
            (self.cfg.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.cfg.conf.write_text(render_nginx_conf(self.cfg))
        done = subprocess.run([*self._args(), "-t", "-q"], capture_output=True, timeout=30, check=False)
        if done.returncode != 0:
            raise ConfigError(f"nginx -t refused {self.cfg.conf}: {(done.stdout + done.stderr).decode().strip()}")
        return self.cfg.conf

    def start(self, *, timeout: float = 20) -> subprocess.Popen[bytes]:
        """Write and check the config, start nginx, wait until both listeners accept connections."""
        self.write()
        self._log = (self.cfg.prefix / "logs" / "nginx.out").open("wb")
        self.proc = subprocess.Popen([*self._args(), "-g", "daemon off;"], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not (_accepts(self.cfg.hospital_listen) and _accepts(self.cfg.operator_listen)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.cfg.error_log.read_text()[-1500:] if self.cfg.error_log.is_file() else ""
                raise ConfigError(f"nginx did not start listening on {self.cfg.hospital_listen} and "
                                  f"{self.cfg.operator_listen}: {tail}")
            time.sleep(0.1)
        logger.info("nginx pid %s: hospitals %s, operator %s → SuperLink %s", self.proc.pid,
                    self.cfg.hospital_listen, self.cfg.operator_listen, self.cfg.superlink)
        return self.proc

    def stop(self) -> None:
        """Stop nginx (SIGTERM: fast shutdown), then wait for it."""
        if self.proc is None:
            return
        stop_child(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> NginxProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
