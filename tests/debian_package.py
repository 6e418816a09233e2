"""Debian packages unpacked into a cache, never installed: Xen's real tools
(xenstored, verify-stream-v2, xenalyze) without the hypervisor their
packages' dependencies pull in. `apt-get download` and `dpkg -x`, once."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["CACHE", "Unavailable", "unpacked"]

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "xenlike"


class Unavailable(Exception):
    """A tool cannot be had on this machine; the message says why."""


def unpacked(package: str, hint: str = "") -> Path:
    """Where `package` is unpacked (fetched on first use); `hint` is added to the
    reason when the machine cannot fetch it."""
    root = CACHE / package
    if root.exists():
        return root
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise Unavailable(f"no {tool}: cannot fetch {package}{hint}")
    with tempfile.TemporaryDirectory(prefix=f"{package}-") as tmp:
        download = subprocess.run(
            ["apt-get", "download", package], cwd=tmp, capture_output=True, text=True, check=False
        )
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise Unavailable(
                f"apt-get download {package} failed: {download.stderr.strip().splitlines()[-1:]}"
            )
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=CACHE))
        subprocess.run(["dpkg", "-x", str(debs[0]), str(partial)], check=True)
        try:
            partial.rename(root)  # atomic: a concurrent fetch either wins or finds it
        except OSError:
            shutil.rmtree(partial)
    return root
