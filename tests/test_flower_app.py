"""The Flower app components named in pyproject.toml resolve and work on real data."""

from __future__ import annotations

import tomllib
from importlib import import_module
from pathlib import Path

import numpy as np
from flwr.clientapp import ClientApp
from flwr.common import Context, RecordDict
from flwr.server import ServerApp

from clients.client_app import HospitalClient, get_weights, set_weights, site_data_path
from clients.ingest import Preprocess, load_dataset
from federation.config import RunConfig
from federation.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def _component(ref: str) -> object:
    module, attr = ref.split(":")
    return getattr(import_module(module), attr)


def test_pyproject_components_are_a_server_app_and_a_client_app() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]

    assert isinstance(_component(cfg["serverapp"]), ServerApp)
    assert isinstance(_component(cfg["clientapp"]), ClientApp)


def test_partition_id_selects_the_site_folder(tmp_path: Path) -> None:
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                  state=RecordDict(), run_config={"data-dir": str(tmp_path)})

    assert site_data_path(ctx) == tmp_path / "site-2"


def test_a_hospital_client_trains_from_the_sent_weights(tiny_federation: Path) -> None:
    cfg = RunConfig(image_size=32, dp=False, local_epochs=1)
    arch = cfg.arch()
    data = load_dataset(tiny_federation / "site-1", preprocess=Preprocess(size=32))
    client = HospitalClient(data, cfg, site="site-1", ledger=None)
    start = get_weights(build_model(arch, seed=0))

    weights, n, metrics = client.fit(start, {"server-round": 1})

    assert n == len(data)
    assert np.isfinite(metrics["loss"])
    assert metrics["site"] == "site-1"
    assert metrics["refused"] == 0
    assert len(weights) == len(start)
    assert any(not np.array_equal(a, b) for a, b in zip(weights, start, strict=True))
    model = build_model(arch)
    set_weights(model, weights)
    assert all(np.array_equal(a, b) for a, b in zip(get_weights(model), weights, strict=True))
