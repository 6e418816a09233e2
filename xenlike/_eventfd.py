"""An eventfd as a trio wake-up: the fast path of an event channel.

A notify is one `write(2)` to the peer's eventfd; a wait first tries to
collect pending notifications without sleeping and only then parks in trio's
epoll. Several notifies before a wait collapse into one wake-up, as a
pending bit does in Xen.
"""

import os

import trio

__all__ = ["EventFd"]


class EventFd:
    """One side of a doorbell between processes (the fd may travel by SCM_RIGHTS)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> "EventFd":
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def notify(self) -> None:
        os.eventfd_write(self.fd, 1)

    def collect(self) -> int:
        """Take the pending notifications without blocking; 0 when there are none."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    async def wait(self) -> int:
        """Sleep until notified; return how many notifies this wake-up collected."""
        while True:
            count = self.collect()
            if count:
                await trio.lowlevel.checkpoint_if_cancelled()
                return count
            await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
