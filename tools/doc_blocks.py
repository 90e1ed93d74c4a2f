"""Run the ```bash blocks of Markdown files as written, one fresh shell per block, from the repository root.

Usage: ``python tools/doc_blocks.py docs/storage.md [docs/he-inference.md:2 ...]`` (``:N``: from the
N-th block of that file on). Each block runs
under ``bash -e -o pipefail``; its output goes to ``runs/doc-blocks/<file>-<n>.log``. Prints the
wall time of every block and exits non-zero at the first block that fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def main(files: list[str]) -> int:
    """Run every bash block of ``files`` in order; 0 if all succeed."""
    logs = ROOT / "runs" / "doc-blocks"
    logs.mkdir(parents=True, exist_ok=True)
    for spec in files:
        name, _, first = spec.partition(":")
        text = (ROOT / name).read_text()
        for n, match in enumerate(BLOCK.finditer(text), start=1):
            if n < int(first or 1):
                continue
            line = text[:match.start()].count("\n") + 1
            log = logs / f"{Path(name).stem}-{n}.log"
            start = time.perf_counter()
            with log.open("wb") as fh:
                done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", match.group(1)], cwd=ROOT,
                                      stdout=fh, stderr=subprocess.STDOUT, check=False)
            seconds = time.perf_counter() - start
            status = "ok" if done.returncode == 0 else f"FAILED ({done.returncode})"
            print(f"{name}:{line}  block {n}  {seconds:7.1f} s  {status}  log {log.relative_to(ROOT)}", flush=True)
            if done.returncode != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
