"""Child processes that do not outlive their parent (Linux's PR_SET_PDEATHSIG).

A domain must not survive its hypervisor, nor a foreground topology the
`xenlike up` that started it: the kernel kills the child when the parent
goes, whatever way the parent dies, SIGKILL included.
"""

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable

import trio

__all__ = ["ChildProcess", "die_with_parent"]

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A `preexec_fn` that arms the death signal, closing the race with a parent
    that died between fork and prctl."""
    parent = os.getpid()

    def arm() -> None:
        if _libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:
            os._exit(1)

    return arm


class ChildProcess:
    """A child spawned from the calling thread, awaited through a pidfd.

    trio's `open_process` forks from a worker thread, and PR_SET_PDEATHSIG
    fires when the forking *thread* exits, which an idle worker does after
    ten seconds: children must be forked from the thread that stays.
    """

    def __init__(
        self, argv: list[str], *, setup: Callable[[], None] | None = None, **popen_kwargs: object
    ) -> None:
        """`setup` runs in the child after the death signal is armed, before exec
        (the sandbox goes there); if it raises, Popen raises SubprocessError."""
        arm = die_with_parent()

        def prepare() -> None:
            arm()
            if setup is not None:
                setup()

        self.popen = subprocess.Popen(argv, preexec_fn=prepare, **popen_kwargs)  # type: ignore[call-overload]
        self._pidfd = os.pidfd_open(self.popen.pid)
        self._exited: trio.Event | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """None while the child runs (reaps it if it has just exited)."""
        return self.popen.poll()

    def send_signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    async def wait(self) -> int:
        """The exit status, once the child exits; any number of tasks may wait."""
        while self.popen.poll() is None:
            if self._exited is not None:  # another task watches the pidfd
                await self._exited.wait()
                continue
            self._exited = trio.Event()
            try:
                await trio.lowlevel.wait_readable(self._pidfd)
            finally:
                exited, self._exited = self._exited, None
                exited.set()
        if self._pidfd >= 0 and self._exited is None:
            os.close(self._pidfd)
            self._pidfd = -1
        return self.popen.returncode
