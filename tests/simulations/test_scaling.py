"""The scaling benchmark: its figures from finished runs (resume), and one real run end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from federation.errors import ConfigError, DataError
from federation.storage import atomic_write_json
from simulations.cli import app
from simulations.scaling import Mode, ScalingConfig, ScalingPoint, run_scaling

PNG_MAGIC = b"\x89PNG"
# Times in the synthetic runs: 0.5 s per site and round with SecAgg+, 0.4 s without.
SECAGG_PER_SITE, PLAIN_PER_SITE = 0.5, 0.4


def _fake_federation(folder: Path, sites: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "sites.json").write_text(json.dumps({"sites": [{"name": f"site-{k + 1}"} for k in range(sites)]}))
    return folder


def _synthetic(cfg: ScalingConfig, n: int, mode: Mode) -> ScalingPoint:
    per_round = n * (SECAGG_PER_SITE if mode is Mode.SECAGG else PLAIN_PER_SITE)
    stages = {"setup": 0.1 * per_round, "share_keys": 0.1 * per_round, "collect_masked_vectors": 0.6 * per_round,
              "unmask": 0.1 * per_round} if mode is Mode.SECAGG else {}
    point = ScalingPoint(sites=n, mode=mode, wall_seconds=20 + 3 * per_round, fit_seconds=(19.0, per_round - 0.1,
                         per_round - 0.1), round_seconds=(20.0, per_round, per_round),
                         stage_seconds=(stages, stages, stages), peak_rss_mb=3000 + 2 * n,
                         shares=min(n, 15) if mode is Mode.SECAGG else 0,
                         threshold=9 if mode is Mode.SECAGG else 0, sites_contributed=n)
    atomic_write_json(cfg.out / "points" / f"{mode}-{n:04d}" / "point.json",
                      {"key": cfg.key(), "point": point.to_dict()})
    return point


def test_finished_runs_are_reused_and_drawn_with_the_growth_exponent(tmp_path: Path) -> None:
    cfg = ScalingConfig(out=tmp_path / "bench", sites=(10, 20, 40), rounds=3,
                        data=_fake_federation(tmp_path / "data", 40))
    made = {(n, m): _synthetic(cfg, n, m) for n in cfg.sites for m in Mode}
    told: list[str] = []

    start = time.perf_counter()
    summary = run_scaling(cfg, progress=told.append)
    seconds = time.perf_counter() - start

    assert seconds < 10  # nothing ran: every point was finished
    assert sum("done before" in line for line in told) == 6
    assert summary.exponent == pytest.approx(1.0)
    assert summary.point(20, Mode.SECAGG) == made[(20, Mode.SECAGG)]
    saved = json.loads(summary.json_path.read_text())
    assert [(p["sites"], p["mode"]) for p in saved["points"]] == [(n, str(m)) for n in cfg.sites
                                                                  for m in sorted(Mode)]
    table = summary.markdown_path.read_text()
    assert "| 20 | 15 / 9 | 50 | 20.0 | 10.0 | 8.0 | 20% | 1.0 / 1.0 / 6.0 / 1.0 | 3040 | 3040 |" in table
    assert "sites^1.00" in table
    assert summary.plot_path.read_bytes()[:4] == PNG_MAGIC


def test_a_federation_too_small_and_unordered_site_counts_are_clear_errors(tmp_path: Path) -> None:
    small = _fake_federation(tmp_path / "data", 10)

    with pytest.raises(DataError, match="has 10 sites, the benchmark needs 20"):
        run_scaling(ScalingConfig(out=tmp_path / "bench", sites=(10, 20), data=small))
    with pytest.raises(ConfigError, match=r"`sites` must be ascending without repeats, got \(50, 20\)"):
        ScalingConfig(out=tmp_path / "bench", sites=(50, 20))
    with pytest.raises(ConfigError, match=r"`sites` must be numbers of at least 2 sites, got \(1, 20\)"):
        ScalingConfig(out=tmp_path / "bench", sites=(1, 20))


def test_the_cli_prints_the_table_of_a_finished_benchmark(tmp_path: Path) -> None:
    cfg = ScalingConfig(out=tmp_path / "bench", sites=(10, 20), rounds=3, data=_fake_federation(tmp_path / "d", 20))
    for n in cfg.sites:
        for mode in Mode:
            _synthetic(cfg, n, mode)

    result = CliRunner().invoke(app, ["benchmark", "scaling", "--out", str(cfg.out), "--sites", "10,20",
                                      "--data", str(cfg.data)])

    assert result.exit_code == 0, result.output
    assert "sites^1.00" in result.output
    assert "20%" in result.output


@pytest.mark.slow
def test_a_real_benchmark_run_records_rounds_stages_and_memory(tmp_path: Path) -> None:
    cfg = ScalingConfig(out=tmp_path / "bench", sites=(3,), rounds=2, per_site=8, size=16, test=9, batch_size=4,
                        baseline=False, point_timeout=600.0)

    summary = run_scaling(cfg)
    point = summary.point(3, Mode.SECAGG)

    assert point is not None
    assert (point.shares, point.threshold, point.sites_contributed) == (3, 2, 3)
    assert len(point.round_seconds) == len(point.fit_seconds) == len(point.stage_seconds) == 2
    assert all(0 < f <= r for f, r in zip(point.fit_seconds, point.round_seconds, strict=True))
    assert sum(point.round_seconds) < point.wall_seconds
    for stages, fit in zip(point.stage_seconds, point.fit_seconds, strict=True):
        assert set(stages) == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
        assert all(s > 0 for s in stages.values())
        assert sum(stages.values()) <= fit
    assert point.peak_rss_mb > 500  # Ray's daemons and a worker with torch
    assert summary.markdown_path.is_file()
    assert summary.plot_path.read_bytes()[:4] == PNG_MAGIC
