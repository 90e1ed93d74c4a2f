"""Federated runs on Flower's Simulation Engine (Ray), one virtual SuperNode per hospital."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from aggregator.server_app import make_server_app
from clients.client_app import Policies, make_client_app
from federation.config import RunConfig
from federation.errors import ConfigError, DataError
from federation.ingest import site_folders
from privacy.policy import SitePolicy

__all__ = ["FederatedResult", "fresh_process_env", "run_federated"]

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


def fresh_process_env() -> dict[str, str]:
    """The environment of a federated run started in a fresh process (sweeps and benchmarks).

    No Flower telemetry or update check, Ray's log lines not deduplicated, output unbuffered
    so the run's log is complete when it stops.
    """
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class FederatedResult:
    """What a simulated federated run wrote and cost."""

    metrics: dict[str, Any]
    out: Path
    seconds: float
    peak_rss_mb: float


def check_policies_allow(cfg: RunConfig, policies: Policies | None, names: list[str]) -> None:
    """Refuse up front a run the virtual sites' policies would refuse every round (a clear error, not empty rounds).

    In a simulation this runner plays the hospitals, so it may read their policies; each
    site still reviews every round itself.

    Raises
    ------
    ConfigError
        The run turns DP-SGD or SecAgg+ off and a site's policy requires it.
    """
    for name in names:
        policy = policies.get(name, SitePolicy()) if isinstance(policies, Mapping) else (policies or SitePolicy())
        if not cfg.dp and policy.dp_required:
            raise ConfigError(f"DP-SGD is off, but {name}'s policy requires it (dp-required = true): give the "
                              "sites a policy that allows it, e.g. `privrad policy init --out site.toml "
                              "--allow-no-dp` and `--site-policy site.toml`")
        if not cfg.secagg and policy.secagg_required:
            raise ConfigError(f"SecAgg+ is off, but {name}'s policy requires it (secagg-required = true): give the "
                              "sites a policy that allows it (`privrad policy init --allow-no-secagg`)")


def run_federated(cfg: RunConfig, *, sites: int | None = None, policies: Policies | None = None,
                  cpus_per_client: float = 1.0, verbose: bool = False) -> FederatedResult:
    """Run ``cfg`` on the Simulation Engine over ``data-dir``'s ``site-K`` folders.

    ``sites`` defaults to every ``site-K`` folder found. ``policies`` are the virtual
    hospitals' (one for all, or one per site name; default: the secure default policy,
    ledgers in ``data-dir/ledgers/``). Writes ``out-dir`` as the ServerApp does
    (metrics.json, global_model.pt, checkpoints, training.png).
    """
    from flwr.simulation import run_simulation

    data = Path(cfg.data_dir)
    found = site_folders(data)
    if not found:
        raise DataError(data, "has no site-K folders to federate")
    n = sites or len(found)
    if n > len(found):
        raise DataError(data, f"has {len(found)} site folders, {n} sites requested")
    check_policies_allow(cfg, policies, [f.name for f in found[:n]])
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = cfg.to_flower()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    start = time.perf_counter()
    with TreeMemorySampler() as sampler:
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=make_client_app(overrides, policies=policies),
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
    """``python -m simulations.federated CONFIG.json [POLICY.toml]``: one run from a flat run-config file.

    Runners that need a fresh process per run (a parameter sweep: Ray and Opacus keep
    process-wide state) call this; ``POLICY.toml`` is every virtual site's policy. The
    exit status is 0 when ``metrics.json`` was written.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m simulations.federated CONFIG.json [POLICY.toml]", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = RunConfig.from_flower(json.loads(Path(args[0]).read_text()))
    policy = SitePolicy.load(Path(args[1])) if len(args) == 2 else None
    result = run_federated(cfg, policies=policy)
    log.info("finished in %.0f s, final macro-AUC %s", result.seconds, result.metrics["final"].get("auc_macro"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
