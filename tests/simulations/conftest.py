from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from federation.errors import ConfigError
from simulations.orthanc import find_dicomweb_plugin, find_orthanc
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


@pytest.fixture(scope="session")
def orthanc() -> Path:
    """Debian's Orthanc with its DICOMweb plugin (and dciodvfy), installed by the project's script when missing.

    The PACS tests claim PACS support, so they run against the real server and are never skipped.
    """
    try:
        find_dicomweb_plugin()
        if shutil.which("dciodvfy") is None:
            raise ConfigError("dciodvfy (dicom3tools) is missing")
        return find_orthanc()
    except ConfigError:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "install-orthanc.sh")], capture_output=True, text=True,
                              timeout=900, check=False)
        assert done.returncode == 0, f"scripts/install-orthanc.sh failed: {done.stdout[-1000:]}{done.stderr[-2000:]}"
        find_dicomweb_plugin()
        return find_orthanc()
