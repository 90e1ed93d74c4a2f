"""The nginx proxy in front of the SuperLink: real nginx, a real TLS upstream that echoes what reached it."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from federation.errors import ConfigError
from federation.net import free_port
from federation.pki import CertSet, make_certs
from simulations.proxy import NginxProxy, ProxyConfig


class _Echo(BaseHTTPRequestHandler):
    """Answers every POST with the path it received (what nginx let through, as nginx sent it)."""

    def do_POST(self) -> None:
        body = json.dumps({"upstream-path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[CertSet, int]]:
    certs = make_certs(tmp_path / "pki", hosts=["127.0.0.1"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.superlink_cert, certs.superlink_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield certs, int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _config(tmp_path: Path, certs: CertSet, superlink: str, **kw: object) -> ProxyConfig:
    args: dict[str, object] = {"prefix": tmp_path / "nginx", "superlink": superlink,
                               "hospital_listen": f"127.0.0.1:{free_port()}",
                               "operator_listen": f"127.0.0.1:{free_port()}", "cert": certs.superlink_cert,
                               "key": certs.superlink_key, "ca_cert": certs.ca_cert, **kw}
    return ProxyConfig(**args)  # type: ignore[arg-type]


def test_the_operator_listener_must_be_loopback_and_the_superlink_behind_it_too(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki", hosts=["127.0.0.1"])

    with pytest.raises(ConfigError, match="operator_listen must be loopback unless operator_network"):
        _config(tmp_path, certs, "127.0.0.1:9092", operator_listen="0.0.0.0:9094")
    with pytest.raises(ConfigError, match="superlink must be a loopback address"):
        _config(tmp_path, certs, "10.0.0.5:9092")
    with pytest.raises(ConfigError, match="must differ"):
        _config(tmp_path, certs, "127.0.0.1:9092", hospital_listen="127.0.0.1:9092")
    with pytest.raises(ConfigError, match=r"hospital_listen must be HOST:PORT .* got '9093'"):
        _config(tmp_path, certs, "127.0.0.1:9092", hospital_listen="9093")
    assert _config(tmp_path, certs, "127.0.0.1:9092", operator_listen="10.8.0.1:9094",
                   operator_network=True).operator_network


def test_hospitals_reach_only_the_fleet_api_and_the_operator_only_the_control_api(
        nginx: Path, upstream: tuple[CertSet, int], tmp_path: Path) -> None:
    certs, port = upstream
    cfg = _config(tmp_path, certs, f"127.0.0.1:{port}")
    trust = ssl.create_default_context(cafile=certs.ca_cert)

    def post(listen: str, path: str) -> httpx.Response:
        return httpx.post(f"https://{listen}{path}", content=b"x", verify=trust, timeout=10)

    with NginxProxy(cfg, nginx=nginx):
        fleet = post(cfg.hospital_listen, "/v1/fleet/pull-messages")
        hospital_refused = {p: post(cfg.hospital_listen, p) for p in
                            ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/pull-task-input",
                             "/v1/fleet/%2e%2e/control/start-run", "/docs", "/health")}
        fleet_get = httpx.get(f"https://{cfg.hospital_listen}/v1/fleet/get-run", verify=trust)
        control = post(cfg.operator_listen, "/v1/control/list-runs")
        operator_refused = {p: post(cfg.operator_listen, p) for p in ("/v1/runtime/pull-task-input", "/v1/fleet/x")}

    assert (fleet.status_code, fleet.json()) == (200, {"upstream-path": "/v1/fleet/pull-messages"})
    assert (control.status_code, control.json()) == (200, {"upstream-path": "/v1/control/list-runs"})
    for path, r in hospital_refused.items():
        assert r.status_code == 403, path
        assert "serves the Flower Fleet API (/v1/fleet/) only" in r.json()["detail"], path
    assert fleet_get.status_code == 403
    for path, r in operator_refused.items():
        assert r.status_code == 403, path
        assert "serves the Flower Control API (/v1/control/) only" in r.json()["detail"], path


def test_the_proxy_refuses_an_upstream_whose_certificate_the_federation_ca_did_not_sign(
        nginx: Path, upstream: tuple[CertSet, int], tmp_path: Path) -> None:
    certs, port = upstream
    other = make_certs(tmp_path / "other", hosts=["127.0.0.1"])
    cfg = _config(tmp_path, certs, f"127.0.0.1:{port}", ca_cert=other.ca_cert)

    with NginxProxy(cfg, nginx=nginx):
        r = httpx.post(f"https://{cfg.hospital_listen}/v1/fleet/pull-messages", content=b"x",
                       verify=ssl.create_default_context(cafile=certs.ca_cert), timeout=10)

    assert r.status_code == 502
    assert "upstream SSL certificate verify error" in cfg.error_log.read_text()
