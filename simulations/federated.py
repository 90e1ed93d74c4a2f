"""Federated runs on Flower's Simulation Engine (Ray), one virtual SuperNode per hospital."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from aggregator.server_app import make_server_app
from clients.client_app import make_client_app
from federation.config import RunConfig
from federation.errors import DataError
from simulations.centralised import site_folders

__all__ = ["FederatedResult", "run_federated"]

log = logging.getLogger(__name__)


class TreeMemorySampler:
    """Peak resident memory of this process and all its descendants (Ray's workers too), sampled."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self) -> TreeMemorySampler:
        self.peak_mb = self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class FederatedResult:
    """What a simulated federated run wrote and cost."""

    metrics: dict[str, Any]
    out: Path
    seconds: float
    peak_rss_mb: float


def run_federated(cfg: RunConfig, *, sites: int | None = None, cpus_per_client: float = 1.0,
                  verbose: bool = False) -> FederatedResult:
    """Run ``cfg`` on the Simulation Engine over ``data-dir``'s ``site-K`` folders.

    ``sites`` defaults to every ``site-K`` folder found. Writes ``out-dir`` as the
    ServerApp does (metrics.json, global_model.pt, checkpoints, ledger, training.png).
    """
    from flwr.simulation import run_simulation

    data = Path(cfg.data_dir)
    found = site_folders(data)
    if not found:
        raise DataError(data, "has no site-K folders to federate")
    n = sites or len(found)
    if n > len(found):
        raise DataError(data, f"has {len(found)} site folders, {n} sites requested")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = cfg.to_flower()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start = time.perf_counter()
    with TreeMemorySampler() as sampler:
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=make_client_app(overrides),
            num_supernodes=n,
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                            "init_args": {"num_cpus": os.cpu_count() or 2, "include_dashboard": False,
                                          "log_to_driver": verbose}},
            verbose_logging=verbose,
        )
    seconds = time.perf_counter() - start
    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        raise DataError(out, "the federated run wrote no metrics.json: the ServerApp failed (see the log)")
    metrics = json.loads(metrics_file.read_text())
    return FederatedResult(metrics=metrics, out=out, seconds=seconds, peak_rss_mb=sampler.peak_mb)


def main(argv: list[str] | None = None) -> int:
    """``python -m simulations.federated CONFIG.json``: one run from a flat run-config file.

    Runners that need a fresh process per run (a parameter sweep: Ray and Opacus keep
    process-wide state) call this; the exit status is 0 when ``metrics.json`` was written.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m simulations.federated CONFIG.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = RunConfig.from_flower(json.loads(Path(args[0]).read_text()))
    result = run_federated(cfg)
    log.info("finished in %.0f s, final macro-AUC %s", result.seconds, result.metrics["final"].get("auc_macro"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
