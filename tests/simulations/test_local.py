from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.config import RunConfig
from federation.storage import load_checkpoint
from simulations.local import run_local


def test_each_site_trains_alone_within_its_budget(tiny_federation: Path, tmp_path: Path) -> None:
    cfg = RunConfig(data_dir=str(tiny_federation), out_dir=str(tmp_path), image_size=32, batch_size=4,
                    num_server_rounds=2, local_epochs=1, epsilon_budget=6.0, delta=1e-5)

    summary = run_local(cfg)

    assert set(summary["sites"]) == {"site-1", "site-2"}
    for site, entry in summary["sites"].items():
        ledger = json.loads((tmp_path / "ledger" / f"{site}.json").read_text())
        assert entry["epsilon"] == pytest.approx(ledger["epsilon"])
        assert 5.0 < entry["epsilon"] <= 6.0  # sigma derived from the budget over all planned steps
        assert load_checkpoint(tmp_path / site / "model.pt").meta["training"]["site"] == site
    assert summary["mean_auc_macro"] == pytest.approx(
        sum(e["auc_macro"] for e in summary["sites"].values()) / 2)
