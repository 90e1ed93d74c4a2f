"""The Flower apps ``flwr run .`` starts (``[tool.flwr.app.components]`` in pyproject.toml).

The same ClientApp and ServerApp as everywhere (:func:`clients.client_app.make_client_app`,
:func:`aggregator.server_app.make_server_app`); what this top layer adds is the default for a
run config that names no data: the built-in synthetic federation (generated on first use)
and an output folder in the cache. A SuperNode's ``data-path`` and ``policy-file`` still
take precedence at each hospital.
"""

from __future__ import annotations

import dataclasses

from aggregator.server_app import make_server_app
from clients.client_app import make_client_app
from federation.config import RunConfig
from simulations.builtin import builtin_federation, cache_root

__all__ = ["builtin_defaults", "clientapp", "serverapp"]


def builtin_defaults(cfg: RunConfig, run_id: int | str) -> RunConfig:
    """``cfg`` with an empty ``data-dir`` / ``out-dir`` set to the built-in defaults.

    ``data-dir`` becomes the built-in synthetic federation (generated on first use);
    ``out-dir`` becomes ``<cache>/runs/run-<run_id>``.
    """
    data = cfg.data_dir or str(builtin_federation())
    out = cfg.out_dir or str(cache_root() / "runs" / f"run-{run_id}")
    return dataclasses.replace(cfg, data_dir=data, out_dir=out)


clientapp = make_client_app(resolve=builtin_defaults)
serverapp = make_server_app(resolve=builtin_defaults)
