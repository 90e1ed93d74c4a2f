from __future__ import annotations

import tomllib
from pathlib import Path

from federation.pki import write_connection


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
