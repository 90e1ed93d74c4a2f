"""Child processes privrad starts (nginx, Orthanc, the HE service): one way to stop them."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

__all__ = ["stop_child", "stop_on_sigterm"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``) raise KeyboardInterrupt, so a foreground command stops its child as Ctrl-C does."""
    signal.signal(signal.SIGTERM, _interrupt)


def stop_child(proc: subprocess.Popen[Any] | None, *, grace_s: float = 10.0) -> None:
    """SIGTERM, up to ``grace_s`` for a clean exit, then SIGKILL; returns once the process is reaped."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(timeout=grace_s)
