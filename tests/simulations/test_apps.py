from __future__ import annotations

from pathlib import Path

import pytest

from federation.config import RunConfig, require_paths
from federation.errors import ConfigError
from simulations.apps import builtin_defaults


def test_below_the_top_layer_an_empty_data_dir_or_out_dir_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="`data-dir` is empty"):
        require_paths(RunConfig(out_dir="out"), 7)
    with pytest.raises(ConfigError, match="`out-dir` is empty"):
        require_paths(RunConfig(data_dir="data"), 7)

    given = RunConfig(data_dir="data", out_dir="out")
    assert require_paths(given, 7) is given


def test_flwr_run_defaults_fill_only_what_the_run_config_left_empty(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVRAD_CACHE", str(tmp_path))

    kept = builtin_defaults(RunConfig(data_dir="mine", out_dir="there"), 3)
    out_only = builtin_defaults(RunConfig(data_dir="mine"), 3)

    assert (kept.data_dir, kept.out_dir) == ("mine", "there")
    assert out_only.data_dir == "mine"
    assert Path(out_only.out_dir) == tmp_path / "runs" / "run-3"
