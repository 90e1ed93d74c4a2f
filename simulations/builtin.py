"""Built-in synthetic hospitals for runs started with no data (``flwr run .``, ``make demo``).

Generated on first use into ``$PRIVRAD_CACHE`` (default ``~/.cache/privrad``), atomically:
the federation is written to a temporary folder and renamed into place, so a crash or a
concurrent start never leaves a half-written data set behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from simulations.phantoms import PhantomConfig, generate_phantoms

__all__ = ["BUILTIN", "builtin_federation", "cache_root"]

BUILTIN = PhantomConfig(sites=5, per_site=300, test=300, size=64, seed=0, public=1500, val=300)


def cache_root() -> Path:
    """``$PRIVRAD_CACHE``, else ``~/.cache/privrad``."""
    return Path(os.environ.get("PRIVRAD_CACHE", Path.home() / ".cache" / "privrad"))


def builtin_federation(config: PhantomConfig = BUILTIN) -> Path:
    """The folder of the built-in federation for ``config``, generated if missing."""
    c = config
    name = f"phantoms-{c.sites}x{c.per_site}-{c.size}px-seed{c.seed}-d{c.difficulty:g}-pub{c.public}"
    target = cache_root() / (name + (f"-val{c.val}" if c.val else ""))
    if (target / "sites.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".phantoms-"))
    try:
        generate_phantoms(tmp, config=config)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "sites.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
