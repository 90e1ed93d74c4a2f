"""``privrad benchmark federated`` on a tiny federation: every row, ε spent, resumption, refusals, table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from federation.errors import ConfigError, DataError, PrivradError
from simulations.fl_benchmark import (
    BenchConfig,
    Cell,
    cells,
    incomplete_rounds,
    markdown,
    rows,
    run_benchmark,
    run_order,
    summarise,
)
from simulations.phantoms import PhantomConfig, generate_phantoms

RUN = (("batch-size", 4), ("image-size", 32), ("local-epochs", 1), ("num-server-rounds", 1), ("pretrain-epochs", 1))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fl-bench-data")
    generate_phantoms(out, config=PhantomConfig(sites=2, per_site=12, test=9, val=9, public=12, size=32, seed=3))
    return out


def test_settings_are_checked_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="positive and finite"):
        BenchConfig(data=".", out=str(tmp_path), epsilons=(0.0,))
    with pytest.raises(ConfigError, match="repeated"):
        BenchConfig(data=".", out=str(tmp_path), epsilons=(2.0, 2.0))
    with pytest.raises(ConfigError, match="unknown run-config key `num-rounds`"):
        BenchConfig(data=".", out=str(tmp_path), run=(("num-rounds", 3),))
    with pytest.raises(ConfigError, match="`local-epochs` must be int"):
        BenchConfig(data=".", out=str(tmp_path), run=(("local-epochs", "two"),))


def test_rows_are_in_table_order_and_cells_seed_major(tmp_path: Path) -> None:
    cfg = BenchConfig(data=".", out=str(tmp_path), epsilons=(8.0, 1.0), seeds=2)
    assert [k for k, _ in rows(cfg)] == ["public", "local", "fedavg", "dp-eps-1", "dp-eps-8", "scratch-eps-8",
                                         "central"]
    assert [c.row for c in cells(cfg)[:7]] == ["public", "central", "fedavg", "dp-eps-8", "local", "scratch-eps-8",
                                               "dp-eps-1"]
    assert {c.seed for c in cells(cfg)[:7]} == {0}
    assert cells(cfg)[7] == Cell("public", 1)


def test_a_subset_of_rows_brings_the_public_start_only_when_a_row_starts_from_it(tmp_path: Path) -> None:
    scratch = BenchConfig(data=".", out=str(tmp_path), seeds=2, only=("scratch-eps-8",))
    local = BenchConfig(data=".", out=str(tmp_path), seeds=1, only=("central", "local"))

    assert cells(scratch) == [Cell("scratch-eps-8", 0), Cell("scratch-eps-8", 1)]
    assert [c.row for c in cells(local)] == ["public", "central", "local"]
    assert scratch.to_dict()["only"] == ["scratch-eps-8"]
    assert "only" not in BenchConfig(data=".", out=str(tmp_path)).to_dict()  # older bench.json files resume
    with pytest.raises(ConfigError, match="--rows: unknown row 'dp-eps-3'; the rows are public, local"):
        BenchConfig(data=".", out=str(tmp_path), only=("dp-eps-3",))


def test_a_cell_whose_round_lost_sites_does_not_count_and_names_the_stage_that_timed_out() -> None:
    full = {"aggregated": True, "sites_contributed": 3}
    timed_out = {"round": 2, "aggregated": False, "sites_contributed": 0,
                 "secagg_stage_seconds": {"setup": 0.1, "collect_masked_vectors": 120.02}}
    short = {"round": 3, "aggregated": True, "sites_contributed": 2, "secagg_stage_seconds": {"setup": 0.1}}

    incomplete_rounds([{"round": 1, **full}], sites=3, timeout=120)
    with pytest.raises(PrivradError, match=r"round 2 aggregated 0 of 3 sites \(SecAgg\+ stage "
                                           r"'collect_masked_vectors' reached its timeout of 120 s"):
        incomplete_rounds([{"round": 1, **full}, timed_out], sites=3, timeout=120)
    with pytest.raises(PrivradError, match=r"round 3 aggregated 2 of 3 sites \(see the cell's log\)"):
        incomplete_rounds([short], sites=3, timeout=120)


def test_summary_gives_mean_and_sample_sd_over_seeds(tmp_path: Path) -> None:
    cfg = BenchConfig(data="fed", out=str(tmp_path), epsilons=(8.0,), seeds=2, scratch=False)
    records: dict[str, list[dict[str, Any]]] = {
        "fedavg": [{"auc_macro": 0.90, "seconds": 100.0, "peak_rss_mb": 1024.0},
                   {"auc_macro": 0.94, "seconds": 120.0, "peak_rss_mb": 2048.0}],
        "dp-eps-8": [{"auc_macro": 0.88, "seconds": 150.0, "peak_rss_mb": 1024.0, "epsilon_max": 7.9},
                     {"auc_macro": 0.92, "seconds": 180.0, "peak_rss_mb": 1024.0, "epsilon_max": 7.99}]}
    for row, recs in records.items():
        for seed, rec in enumerate(recs):
            path = Cell(row, seed).folder(cfg) / "result.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"row": row, "seed": seed, **rec}))
    summary = summarise(cfg)
    by = {r["row"]: r for r in summary["rows"]}
    assert set(by) == {"fedavg", "dp-eps-8"}
    assert by["fedavg"]["auc_macro"]["mean"] == pytest.approx(0.92)
    assert by["fedavg"]["auc_macro"]["std"] == pytest.approx(0.0282843, rel=1e-5)  # sqrt(2) * 0.02
    assert by["dp-eps-8"]["epsilon_max"] == pytest.approx(7.99)
    assert summary["wall_time_vs_fedavg"]["dp-eps-8"] == pytest.approx(165.0 / 110.0)
    table = markdown(summary)
    assert "| FedAvg, no DP, no SecAgg+ | 0.920 ± 0.028 |" in table
    assert "1.5 ± 0.7" in table  # peak memory in GB
    assert "ε = 8: 1.50×" in table
    assert "Settings: 10 rounds × 1 local epoch at batch 32, adamw lr 0.003, clipping norm 1" in table
    assert "Model: Approx-CNN, channels 16-32-64, act-init relu, conv-gain 1." in table
    assert (tmp_path / "benchmark.png").stat().st_size > 10_000
    scatter = BenchConfig(data="fed", out=str(tmp_path / "s"), epsilons=(8.0,), seeds=2, scratch=False,
                          run=(("scatter", 2), ("channels", "")))
    assert "Model: scattering J = 2, L = 8 (log, per-image standardised) + linear classifier." in markdown(
        summarise(scatter))


@pytest.mark.slow
def test_a_tiny_benchmark_runs_every_row_spends_at_most_its_epsilon_and_resumes(federation: Path,
                                                                               tmp_path: Path) -> None:
    cfg = BenchConfig(data=str(federation), out=str(tmp_path / "bench"), epsilons=(8.0,), seeds=1,
                      central_epochs=1, run=RUN)
    started: list[str] = []
    summary = run_benchmark(cfg, on_cell=lambda c, r: started.append(c.row) if r is None else None)
    assert started == run_order(cfg)
    by = {r["row"]: r for r in summary["rows"]}
    assert set(by) == {k for k, _ in rows(cfg)}
    for key in ("dp-eps-8", "scratch-eps-8", "local"):
        assert 0 < by[key]["epsilon_max"] <= 8.0 + 1e-9, key
    for key in ("public", "fedavg", "central"):
        assert "epsilon_max" not in by[key], key
    for row in summary["rows"]:
        assert 0.0 <= row["auc_macro"]["mean"] <= 1.0
        assert row["seconds"]["mean"] > 0, row["row"]
        assert row["peak_rss_mb"]["mean"] > 100, row["row"]
    public = json.loads((Cell("public", 0).folder(cfg) / "result.json").read_text())
    assert public["source"] == "public-pretrained"
    assert summary["wall_time_vs_fedavg"]["dp-eps-8"] > 0
    assert (cfg.folder / "benchmark.md").read_text().count("\n|") == len(rows(cfg)) + 1
    # resumed: nothing runs again; the same folder with other settings is refused
    again: list[str] = []
    assert run_benchmark(cfg, on_cell=lambda c, r: again.append(c.row))["rows"] == summary["rows"]
    assert again == []
    other = BenchConfig(data=str(federation), out=str(tmp_path / "bench"), epsilons=(4.0,), seeds=1, run=RUN)
    with pytest.raises(DataError, match="other settings"):
        run_benchmark(other)


def test_a_federation_without_a_validation_split_is_refused(tmp_path: Path) -> None:
    generate_phantoms(tmp_path / "fed", config=PhantomConfig(sites=2, per_site=4, test=3, public=3, size=32, seed=1))
    with pytest.raises(DataError, match="val"):
        run_benchmark(BenchConfig(data=str(tmp_path / "fed"), out=str(tmp_path / "bench"), run=RUN))
