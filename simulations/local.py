"""The no-collaboration baseline: every site trains alone on its own data, with the same budget."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.initial import initial_model
from federation.config import RunConfig
from federation.errors import DataError
from federation.ingest import Preprocess, load_dataset, site_folders
from federation.storage import atomic_write_json, save_checkpoint
from federation.train import TrainConfig, evaluate, train_epochs
from privacy.dp import private_round
from privacy.ledger import PrivacyLedger
from privacy.policy import RoundRequest, SitePolicy

__all__ = ["run_local"]


def run_local(cfg: RunConfig, *, on_site: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train one model per site for ``rounds x local-epochs`` epochs, evaluate each on the test set.

    Every site starts from the federated run's initial model (:func:`aggregator.initial.initial_model`:
    public pretraining where a public archive exists), so the comparison isolates collaboration.
    With DP on, each site spends its budget exactly as in the federated run (σ derived
    from the same target ε over the same number of steps), recorded in a ledger of this
    experiment (``out-dir/ledger/site-K.json``; the hospital's own federated ledgers are not
    touched). Here the hospital runs everything itself, so its policy is the run's
    settings, with no SecAgg+ to require: nothing leaves the site but the model.
    Writes ``out-dir/site-K/model.pt`` and ``out-dir/metrics.json``.
    """
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    sites = site_folders(data)
    if not sites:
        raise DataError(data, "has no site-K folders")
    pre = Preprocess(size=cfg.image_size)
    test = load_dataset(Path(cfg.test_dir or data / "test"), preprocess=pre)
    train = TrainConfig(epochs=cfg.num_server_rounds * cfg.local_epochs, batch_size=cfg.batch_size,
                        lr=cfg.learning_rate, optimizer=cfg.optimizer, seed=cfg.seed, augment=cfg.augment,
                        shift=cfg.shift, aug_mult=cfg.aug_mult)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    init = initial_model(cfg)
    initial = {"source": str(init.kind), **init.info, **evaluate(init.model, test).to_dict()}
    for folder in sites:
        site_data = load_dataset(folder, preprocess=pre)
        model = copy.deepcopy(init.model)
        entry: dict[str, Any] = {"train_images": len(site_data)}
        if cfg.dp:
            policy = SitePolicy(epsilon_budget=cfg.epsilon_budget, delta=cfg.delta or SitePolicy().delta,
                                max_grad_norm=cfg.max_grad_norm, secagg_required=False,
                                ledger_dir=str(out / "ledger"))
            request = RoundRequest(dp=True, secagg=False, epsilon_budget=cfg.epsilon_budget,
                                   target_epsilon=cfg.target_epsilon or None,
                                   noise_multiplier=cfg.noise_multiplier or None, max_grad_norm=cfg.max_grad_norm,
                                   delta=None, rounds=1)
            ledger = PrivacyLedger(policy.ledger_file(folder.name, folder), site=folder.name,
                                   budget=policy.epsilon_budget, delta=policy.delta)
            result, eps, _ = private_round(model, site_data, train=train, policy=policy, request=request,
                                           ledger=ledger, run=f"local-{time.time_ns()}", round_=1)
            entry.update(epsilon=eps, delta=ledger.delta, noise_multiplier=result.step_set[0])
        else:
            train_epochs(model, site_data, config=train)
        metrics = evaluate(model, test).to_dict()
        entry.update(metrics)
        save_checkpoint(out / folder.name / "model.pt", model, meta={
            "classes": list(test.classes), "preprocess": dataclasses.asdict(pre),
            "data_sha256": site_data.digest(), "metrics": metrics,
            "training": {"mode": "local", "site": folder.name, **cfg.to_flower()}})
        results[folder.name] = entry
        if on_site is not None:
            on_site(folder.name, entry)
    summary = {
        "initial": initial,
        "sites": results,
        "mean_auc_macro": float(np.mean([r["auc_macro"] for r in results.values()])),
        "dp": cfg.dp,
        "config": cfg.to_flower(),
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(out / "metrics.json", summary)
    return summary
