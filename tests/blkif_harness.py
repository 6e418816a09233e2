"""blkback without processes: xenlike.testing's fake XenStore and grant table,
and a raw front end.

The back end under test is the real `BlkBack` serving a real image file; the
front end's memory is a real memfd, mapped by blkback through the fake grant
table (`xenlike.testing.FakeGrantTable`). `RawFront` plays the guest: it writes
whatever requests it likes into the shared ring (`FrontRing`), grants pages
as it likes, and reads the responses, so tests can be as hostile as they
want.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import trio

from domains.dom0.hw import Disk
from drivers.blkif import BLKIF_RING, BlkBack
from xenlike.domain import Hardware
from xenlike.ring import BackRing, FrontRing
from xenlike.testing import FakeGrantTable, FakeXenStore, doorbell_pair
from xenlike.xenbus import BackChannel, DeviceInfo, XenbusContext

FRONT_DOMID = 1
BACK = f"/local/domain/0/backend/vbd/{FRONT_DOMID}/51712"
FRONT = f"/local/domain/{FRONT_DOMID}/device/vbd/51712"
PAGE = 4096


class RawFront:
    """A front end that writes raw requests into the ring and collects the responses."""

    def __init__(self, ring: FrontRing, port: Any, grants: FakeGrantTable) -> None:
        self.ring, self.port, self.grants = ring, port, grants
        self._next_gfn = 16  # gfn 0 holds the ring

    def page(
        self, *, domid: int = 0, readonly: bool = False, data: bytes | None = None
    ) -> tuple[int, memoryview]:
        """A fresh guest page, granted as asked; (ref, its memory)."""
        gfn, self._next_gfn = self._next_gfn, self._next_gfn + 1
        view = self.grants.page(gfn)
        if data is not None:
            view[: len(data)] = data
        return self.grants.grant(gfn, domid=domid, readonly=readonly), view

    async def submit(self, *requests: Any) -> list[Any]:
        """Push `requests` at once; their responses, in the order they came."""
        for request in requests:
            self.ring.put_request(request)
        if self.ring.push_requests():
            self.port.notify()
        return await self.responses(len(requests))

    async def responses(self, count: int) -> list[Any]:
        got: list[Any] = []
        with trio.fail_after(10):
            while len(got) < count:
                got += self.ring.get_responses()
                if len(got) < count and not self.ring.final_check_for_responses():
                    await self.port.wait()
        return got


@attrs.define
class Served:
    back: BlkBack
    front: RawFront
    grants: FakeGrantTable
    store: FakeXenStore
    image: Path


@asynccontextmanager
async def serving(
    image: Path,
    *,
    persistent: bool = True,
    mode: str = "w",
    discard: bool = True,
    direct: bool = False,
) -> AsyncIterator[Served]:
    """A BlkBack connected to a RawFront over a one-page ring, serving `image`."""
    grants = FakeGrantTable()
    store = FakeXenStore(
        {
            f"{BACK}/state": "1",  # as the toolstack writes it: a removed device has none
            f"{BACK}/params": str(image),
            f"{BACK}/mode": mode,
            f"{BACK}/type": "file",
            f"{BACK}/discard-enable": "1" if discard else "0",
            f"{BACK}/direct-io-safe": "1" if direct else "0",
            f"{FRONT}/feature-persistent": "1" if persistent else "0",
        }
    )
    domain = SimpleNamespace(domid=0, grants=grants, trace=None, hardware=Hardware(disks=Disk.open))
    async with trio.open_nursery() as nursery:
        ctx = XenbusContext(domain, store, nursery)
        back = BlkBack(ctx, DeviceInfo("vbd", 51712, BACK, FRONT, FRONT_DOMID))
        await back.open_disk()
        await store.transact(lambda tx: _publish(tx, back.features()))
        await back.connected()
        await store.transact(lambda tx: _publish(tx, back.properties()))
        ring_memory = grants.page(0)
        front_port, back_port = doorbell_pair()
        front = RawFront(FrontRing(BLKIF_RING, ring_memory), front_port, grants)
        back.channel = channel = BackChannel(BackRing(BLKIF_RING, ring_memory), back_port)
        # As Backend's own connect starts it, so that disconnect waits for it.
        nursery.start_soon(back._serve_until_stopped, channel)
        try:
            yield Served(back, front, grants, store, image)
        finally:
            await back.disconnect()
            nursery.cancel_scope.cancel()
    assert back.disk is not None
    back.disk.close()


async def _publish(tx: FakeXenStore, values: dict[str, Any]) -> None:
    for key, value in values.items():
        await tx.write(f"{BACK}/{key}", value)


def make_image(path: Path, sectors: int) -> bytes:
    """An image of `sectors` random sectors; returns its contents."""
    data = os.urandom(sectors * 512)
    path.write_bytes(data)
    return data
