from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from federation.errors import ConfigError
from simulations.proxy import find_nginx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def nginx() -> Path:
    """Debian's nginx, installed by the project's own script when missing (CI starts on a clean machine).

    A missing nginx that the script cannot install fails the test: the proxy is what keeps
    hospitals off the Control API, so its tests must never be skipped.
    """
    try:
        return find_nginx()
    except ConfigError:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "install-nginx.sh")], capture_output=True, text=True,
                              timeout=600, check=False)
        assert done.returncode == 0, f"scripts/install-nginx.sh failed: {done.stdout[-1000:]}{done.stderr[-2000:]}"
        return find_nginx()
