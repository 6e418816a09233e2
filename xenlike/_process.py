"""Child processes that do not outlive their parent (Linux's PR_SET_PDEATHSIG).

A domain must not survive its hypervisor, nor a foreground topology the
`xenlike up` that started it: the kernel kills the child when the parent
goes, whatever way the parent dies, SIGKILL included.
"""

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["die_with_parent"]

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
