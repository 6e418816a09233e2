"""A benchmark's smoke run (`--quick`), as the bench tests start it: its own process,
from the project's root, as a user types `python bench/NAME.py --quick`."""

import subprocess
import sys
from pathlib import Path

__all__ = ["quick"]

ROOT = Path(__file__).resolve().parent.parent


def quick(name: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, f"bench/{name}.py", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
