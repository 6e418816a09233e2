"""Helpers for testing drivers and protocols without a whole topology."""

from xenlike._eventfd import EventFd

__all__ = ["CrossedDoorbell", "doorbell_pair"]


class CrossedDoorbell:
    """An event channel stand-in: waits on its own eventfd, rings the other end's.

    Real eventfds, so the pair also works across a fork.
    """

    def __init__(self, mine: EventFd, theirs: EventFd) -> None:
        self.mine, self.theirs = mine, theirs

    def notify(self) -> None:
        self.theirs.notify()

    async def wait(self) -> int:
        return await self.mine.wait()


def doorbell_pair() -> tuple[CrossedDoorbell, CrossedDoorbell]:
    """Two connected ends, like both sides of an interdomain event channel."""
    a, b = EventFd.create(), EventFd.create()
    return CrossedDoorbell(a, b), CrossedDoorbell(b, a)
