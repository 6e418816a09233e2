"""The run directory of a topology: where its sockets, logs and state live.

    <run-dir>/
        lock                  held by the hypervisor while the topology runs
        hypervisor.sock       the privileged control socket (Dom0 tools)
        hypervisor.log        the hypervisor's log (`xenlike dmesg`)
        hypervisor.pid
        topology.toml         the topology this run was started with
        toolstack.sock        Dom0's toolstack service (create, shutdown, destroy)
        xenstored/socket      xenstored (XENSTORED_PATH / XENSTORED_RUNDIR for real clients)
        console/<name>.log    each guest's console output, kept by xenconsoled
        console/<name>.sock   interactive console connections
        domains/<id>.log      each domain process's own stdout and stderr
        net/<bridge>.pcap.sock  each bridge's capture socket (`xenlike capture`)
        <name>.img            Dom0's disk images (and a pcap NIC's file): here and only here

The default is `$XDG_RUNTIME_DIR/xenlike/<topology name>` (or
`/tmp/xenlike-<uid>/<name>` without XDG_RUNTIME_DIR); `XENLIKE_RUN_DIR` and
`--run-dir` override it.
"""

import fcntl
import os
from pathlib import Path

import attrs

__all__ = ["RunDir", "RunDirBusy", "default_run_dir"]


class RunDirBusy(RuntimeError):
    """Another topology is running from this run directory."""


def default_run_dir(topology_name: str) -> Path:
    override = os.environ.get("XENLIKE_RUN_DIR")
    if override:
        return Path(override)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "xenlike" if runtime else Path(f"/tmp/xenlike-{os.getuid()}")
    return base / topology_name


@attrs.frozen
class RunDir:
    path: Path

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def control(self) -> Path:
        return self.path / "hypervisor.sock"

    @property
    def hypervisor_log(self) -> Path:
        return self.path / "hypervisor.log"

    @property
    def pid_file(self) -> Path:
        return self.path / "hypervisor.pid"

    @property
    def topology(self) -> Path:
        return self.path / "topology.toml"

    @property
    def toolstack(self) -> Path:
        return self.path / "toolstack.sock"

    @property
    def xenstored_dir(self) -> Path:
        return self.path / "xenstored"

    @property
    def xenstored_socket(self) -> Path:
        return self.xenstored_dir / "socket"

    @property
    def consoles(self) -> Path:
        return self.path / "console"

    def console_log(self, name: str) -> Path:
        return self.consoles / f"{name}.log"

    def console_socket(self, name: str) -> Path:
        return self.consoles / f"{name}.sock"

    def create(self) -> None:
        for directory in (self.path, self.xenstored_dir, self.consoles, self.path / "domains"):
            directory.mkdir(parents=True, exist_ok=True)

    def acquire(self) -> int:
        """Take the run directory's lock; the returned fd holds it until closed.

        The lock is a flock, so it goes with the process that holds it: a
        crashed topology leaves the directory reusable.
        """
        self.create()
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(
                f"{self.path} is in use by a running topology "
                f"(`xenlike down --run-dir {self.path}` stops it)"
            ) from None
        return fd

    def leftovers(self) -> list[Path]:
        """The sockets and pid file a topology that is no longer running left behind
        (killed processes do not clean up); logs, images and consoles' logs stay."""
        if not self.path.is_dir():
            return []
        found = [
            self.control,
            self.pid_file,
            self.toolstack,
            self.xenstored_socket,
            *self.consoles.glob("*.sock"),
            *(self.path / "net").glob("*.sock"),
        ]
        return [
            path for path in found if path.is_socket() or path == self.pid_file and path.exists()
        ]

    def remove_leftovers(self) -> list[Path]:
        """Remove `leftovers` unless a topology runs here now; what was removed."""
        if self.busy():
            return []
        removed = self.leftovers()
        for path in removed:
            path.unlink(missing_ok=True)
        return removed

    def busy(self) -> bool:
        """Whether a topology holds the lock right now."""
        if not self.lock.exists():
            return False
        fd = os.open(self.lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False
