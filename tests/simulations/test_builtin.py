from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import RunConfig
from federation.errors import ConfigError
from simulations.builtin import builtin_federation
from simulations.phantoms import PhantomConfig

SMALL = PhantomConfig(sites=2, per_site=3, test=3, size=16, seed=9)


def test_the_builtin_federation_is_generated_once_into_the_cache(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVRAD_CACHE", str(tmp_path))

    first = builtin_federation(SMALL)
    stamp = (first / "sites.json").stat().st_mtime_ns
    second = builtin_federation(SMALL)

    assert first == second
    assert first.parent == tmp_path
    assert (second / "sites.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in first.iterdir()) == ["site-1", "site-2", "sites.json", "test"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".phantoms-")]


def test_run_config_reads_flower_keys_and_names_a_bad_one() -> None:
    cfg = RunConfig.from_flower({"num-server-rounds": 3, "dp": "false", "delta": 1e-5, "augment": "false"})

    assert cfg.num_server_rounds == 3
    assert cfg.dp is False
    assert cfg.augment is False
    assert cfg.delta == 1e-5
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    with pytest.raises(ConfigError, match="unknown run-config key `rounds`"):
        RunConfig.from_flower({"rounds": 3})
    with pytest.raises(ConfigError, match=r"`target-epsilon` 9\.0 exceeds `epsilon-budget` 8\.0"):
        RunConfig(target_epsilon=9.0)
    scat = RunConfig.from_flower({"channels": "", "scatter": 2})
    assert (scat.arch().channels, scat.arch().scatter) == ((), 2)
    assert RunConfig.from_flower(scat.to_flower()) == scat
    with pytest.raises(ConfigError, match="`channels` must be comma-separated integers, got '16,x'"):
        RunConfig.from_flower({"channels": "16,x"})
    with pytest.raises(ConfigError, match="none only with `scatter`"):
        RunConfig.from_flower({"channels": ""})
    for key, choices in (("act-init", "relu, identity"), ("head", "flatten, gap"),
                         ("strategy", "fedavg, fedprox, fedadam")):
        with pytest.raises(ConfigError, match=f"`{key}` must be one of {choices}, got 'linear'"):
            RunConfig.from_flower({key: "linear"})
