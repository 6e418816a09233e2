"""Xen's trace readers, xenalyze and xentrace_format, as the judges of an export.

Both come from Debian's xen-utils-common, never installed as a package (its
dependencies pull in the hypervisor's tools): `apt-get download` and `dpkg
-x` unpack it into a cache directory, once. xenalyze needs only libc.
Debian's xentrace_format is Python 2 code under a python3 shebang, so it
runs under Debian 11's Python 2.7 (the last release that shipped one),
unpacked the same way. Nothing of Xen or Python 2 is kept in the repository.

    python -m tests.xentrace_tools fetch    # what scripts/test runs
"""

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.debian_package import CACHE, Unavailable, unpacked

__all__ = ["Unavailable", "bin_dir", "python2", "xenalyze", "xentrace_format"]

PACKAGE = "xen-utils-common"


def package_root() -> Path:
    """Where xen-utils-common is unpacked (fetched on first use)."""
    return unpacked(PACKAGE)


def _tool(name: str) -> Path:
    path = package_root() / "usr/bin" / name
    if not path.exists():
        raise Unavailable(f"{PACKAGE} holds no usr/bin/{name}")
    return path


def xenalyze() -> Path:
    return _tool("xenalyze")


def xentrace_format() -> Path:
    return _tool("xentrace_format")


def python2() -> list[str]:
    """The command line of Debian 11's Python 2.7 for xentrace_format: `-E`, so the
    caller's PYTHON* variables (set for Python 3) do not reach it."""
    root = unpacked("python2.7-minimal", also=("libpython2.7-minimal",), suite="bullseye")
    interpreter = root / "usr/bin/python2.7"
    check = subprocess.run(
        [str(interpreter), "-E", "-c", "import re, struct, signal, getopt; print(2)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.stdout.strip() != "2":
        raise Unavailable(f"Debian 11's python2.7 does not run here: {check.stderr.strip()}")
    return [str(interpreter), "-E"]


def bin_dir() -> Path:
    """A directory for PATH with both tools by their names, xentrace_format wrapped to run
    under Python 2: what the docs' console sessions call."""
    binaries = CACHE / "xentrace-bin"
    wrapper = f'#!/bin/sh\nexec {shlex.join([*python2(), str(xentrace_format())])} "$@"\n'
    if (
        not (binaries / "xentrace_format").exists()
        or (binaries / "xentrace_format").read_text() != wrapper
    ):
        partial = Path(tempfile.mkdtemp(prefix=".xentrace-bin-", dir=CACHE))
        (partial / "xenalyze").symlink_to(xenalyze())
        (partial / "xentrace_format").write_text(wrapper)
        (partial / "xentrace_format").chmod(0o755)
        shutil.rmtree(binaries, ignore_errors=True)
        try:
            partial.rename(binaries)  # a concurrent maker either wins or left the same
        except OSError:
            shutil.rmtree(partial)
    return binaries


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m tests.xentrace_tools fetch")
    try:
        print(f"xenalyze: {xenalyze()}; xentrace_format: {xentrace_format()} under {python2()[0]}")
    except Unavailable as exc:
        sys.exit(f"xentrace tools: {exc}")
