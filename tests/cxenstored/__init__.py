"""The real C xenstored (Xen 4.17, Debian's xen-utils-4.17) as a reference peer.

It runs without Xen: `xsshim.c`, an LD_PRELOAD shim compiled here with gcc,
answers the few hypervisor interfaces xenstored touches at start-up. The
binary is never installed as a package (that pulls in the hypervisor):
`apt-get download xen-utils-4.17` and `dpkg -x` unpack it into a cache
directory, once. Nothing of Xen is kept in the repository.

    python -m tests.cxenstored fetch    # what scripts/test runs

`CXenStored` starts one daemon on a Unix socket; its socket clients are
privileged (domain 0), so quotas do not apply to them, as in Xen.
"""

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.debian_package import CACHE, Unavailable, unpacked

__all__ = ["CXenStored", "Unavailable", "package_root", "running", "shim", "xenstored_binary"]

PACKAGE = "xen-utils-4.17"
BINARY = Path("usr/lib/xen-4.17/bin/xenstored")
SHIM_SOURCE = Path(__file__).with_name("xsshim.c")


def xenstored_binary() -> Path:
    """The xenstored binary: `$CXENSTORED`, or the cached one, unpacked on first use."""
    if override := os.environ.get("CXENSTORED"):
        if not os.access(override, os.X_OK):
            raise Unavailable(f"CXENSTORED={override} is no executable")
        return Path(override)
    binary = package_root() / BINARY
    if not binary.exists():
        raise Unavailable(f"{PACKAGE} holds no {BINARY}")
    return binary


def package_root() -> Path:
    """Where xen-utils-4.17 is unpacked (fetched on first use): its other tools, e.g.
    verify-stream-v2, live under it too."""
    return unpacked(PACKAGE, hint=" (set CXENSTORED)")


def shim() -> Path:
    """The LD_PRELOAD shim, compiled once per version of its source."""
    source = SHIM_SOURCE.read_bytes()
    built = CACHE / f"xsshim-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if built.exists():
        return built
    if shutil.which("gcc") is None:
        raise Unavailable("no gcc to build the LD_PRELOAD shim")
    if not Path("/usr/include/xenctrl.h").exists():
        raise Unavailable("no Xen headers (install libxen-dev) to build the LD_PRELOAD shim")
    built.parent.mkdir(parents=True, exist_ok=True)
    partial = built.with_suffix(f".{os.getpid()}.tmp")
    compiled = subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Wno-unused-parameter",
            "-shared",
            "-fPIC",
            "-o",
            str(partial),
            str(SHIM_SOURCE),
            "-ldl",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if compiled.returncode:
        raise Unavailable(f"building the shim failed: {compiled.stderr.strip()}")
    partial.rename(built)
    return built


class CXenStored:
    """One C xenstored process serving `socket_path` (no fork, in-memory database)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        domains: str | None = None,
        ring_dir: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        """`domains`: the domids that exist ("0,2,5-9"; default all). `ring_dir`: where
        introduced domains' ring pages are files (`dom<ID>.ring`), for tests playing guests."""
        self.socket_path = os.fspath(socket_path)
        binary, preload = xenstored_binary(), shim()
        self._rundir = tempfile.mkdtemp(prefix="cxenstored-run-")
        self.log_path = Path(self._rundir) / "xenstored.log"
        env = {
            **os.environ,
            "XENSTORED_RUNDIR": self._rundir,
            "XENSTORED_PATH": self.socket_path,
            "LD_PRELOAD": str(preload),
        }
        if domains is not None:
            env["XSHIM_DOMAINS"] = domains
        self.ring_dir = ring_dir
        if ring_dir is not None:
            env["XSHIM_RINGDIR"] = ring_dir
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "-N", *extra_args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._wait_listening()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Unavailable(
                    f"xenstored exited with {self.process.returncode}: "
                    f"{self.log_path.read_text(errors='replace')[-500:]}"
                )
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(self.socket_path)
                except OSError:
                    time.sleep(0.02)
                    continue
                return
        self.stop()
        raise Unavailable("xenstored did not listen within 10 s")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self._rundir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


@contextlib.contextmanager
def running(**kwargs: object) -> Iterator[CXenStored]:
    """A CXenStored on a socket in a fresh short directory (Unix socket paths are short)."""
    with tempfile.TemporaryDirectory(prefix="cxs") as tmp:
        daemon = CXenStored(os.path.join(tmp, "xs.sock"), **kwargs)  # type: ignore[arg-type]
        try:
            yield daemon
        finally:
            daemon.stop()


def main(argv: list[str]) -> int:
    if argv != ["fetch"]:
        print("usage: python -m tests.cxenstored fetch", file=sys.stderr)
        return 2
    try:
        print(f"cxenstored: {xenstored_binary()}, shim {shim()}")
    except Unavailable as error:
        print(f"cxenstored unavailable: {error}", file=sys.stderr)
        return 1
    return 0
