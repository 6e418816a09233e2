"""blkback without processes: a fake XenStore and grant table, a raw front end.

The back end under test is the real `BlkBack` serving a real image file; the
front end's memory is a real memfd, mapped by blkback through `map_frames`
as the hypervisor would hand it over. `RawFront` plays the guest: it writes
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
from xenlike.abi.grant_table import GntStatus
from xenlike.domain.grant_table import GrantMapping, GrantStatusError
from xenlike.memory import DomainMemory, map_frames
from xenlike.ring import BackRing, FrontRing
from xenlike.testing import doorbell_pair
from xenlike.xenbus import BackChannel, DeviceInfo, XenbusContext
from xenlike.xenstore import XenStoreError

FRONT_DOMID = 1
BACK = f"/local/domain/0/backend/vbd/{FRONT_DOMID}/51712"
FRONT = f"/local/domain/{FRONT_DOMID}/device/vbd/51712"
PAGE = 4096


class Store:
    """The XenStore calls a back end makes, over a dict."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = dict(values)

    async def read(self, path: str) -> bytes:
        try:
            return self.values[path].encode()
        except KeyError:
            raise XenStoreError("ENOENT", path) from None

    async def write(self, path: str, value: Any) -> None:
        self.values[path] = str(value)

    async def transact(self, body: Any) -> None:
        await body(self)


@attrs.define
class _Grant:
    gfn: int
    domid: int
    readonly: bool


class GuestGrants:
    """The guest's grant table, and the map/unmap hypercalls blkback makes on it.

    A map is refused, element by element, as Xen refuses it: a ref never
    granted, granted to another domain, or read-only for a writable map.
    """

    def __init__(self, nr_pages: int = 16384) -> None:
        self.memory = DomainMemory.create(nr_pages)
        self.entries: dict[int, _Grant] = {}
        self._next = 8
        self.maps = self.unmaps = 0
        self.mapped: set[int] = set()
        self.map_delay = 0.0

    def grant(self, gfn: int, *, domid: int = 0, readonly: bool = False) -> int:
        ref, self._next = self._next, self._next + 1
        self.entries[ref] = _Grant(gfn, domid, readonly)
        return ref

    def page(self, gfn: int) -> memoryview:
        return self.memory.frame(gfn)

    async def map(self, domid: int, refs: Any, readonly: bool = False) -> GrantMapping:
        assert domid == FRONT_DOMID
        refs = tuple(refs)
        self.maps += 1
        with trio.CancelScope(shield=True):  # as GrantTable's: a hypercall is not cancelled
            await trio.sleep(self.map_delay)
        statuses = []
        for ref in refs:
            entry = self.entries.get(ref)
            if entry is None:
                statuses.append(GntStatus.bad_gntref)
            elif entry.domid != 0 or (entry.readonly and not readonly):
                statuses.append(GntStatus.general_error)
            else:
                statuses.append(GntStatus.okay)
        if any(statuses):
            raise GrantStatusError("GNTTABOP_map_grant_ref", [f"ref {r}" for r in refs], statuses)
        frames = tuple(self.entries[ref].gfn for ref in refs)
        self.mapped.update(refs)
        pages = map_frames(self.memory.fd, frames, writable=not readonly)
        return GrantMapping(domid, refs, tuple(range(len(refs))), frames, readonly, pages)

    async def unmap(self, mapping: GrantMapping) -> None:
        self.unmaps += 1
        mapping._mapped().close()  # as GrantTable.unmap: refuses while views are alive
        mapping._pages = None
        self.mapped.difference_update(mapping.refs)


class RawFront:
    """A front end that writes raw requests into the ring and collects the responses."""

    def __init__(self, ring: FrontRing, port: Any, grants: GuestGrants) -> None:
        self.ring, self.port, self.grants = ring, port, grants
        self._next_gfn = 16  # gfn 0 holds the ring

    def page(self, *, domid: int = 0, readonly: bool = False, data: bytes | None = None
             ) -> tuple[int, memoryview]:
        """A fresh guest page, granted as asked; (ref, its memory)."""
        gfn, self._next_gfn = self._next_gfn, self._next_gfn + 1
        view = self.grants.page(gfn)
        if data is not None:
            view[:len(data)] = data
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
    grants: GuestGrants
    store: Store
    image: Path


@asynccontextmanager
async def serving(image: Path, *, persistent: bool = True, mode: str = "w",
                  discard: bool = True, direct: bool = False) -> AsyncIterator[Served]:
    """A BlkBack connected to a RawFront over a one-page ring, serving `image`."""
    grants = GuestGrants()
    store = Store({f"{BACK}/params": str(image), f"{BACK}/mode": mode, f"{BACK}/type": "file",
                   f"{BACK}/discard-enable": "1" if discard else "0",
                   f"{BACK}/direct-io-safe": "1" if direct else "0",
                   f"{FRONT}/feature-persistent": "1" if persistent else "0"})
    domain = SimpleNamespace(domid=0, grants=grants, ext={"disks": Disk.open})
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


async def _publish(tx: Store, values: dict[str, Any]) -> None:
    for key, value in values.items():
        await tx.write(f"{BACK}/{key}", value)


def make_image(path: Path, sectors: int) -> bytes:
    """An image of `sectors` random sectors; returns its contents."""
    data = os.urandom(sectors * 512)
    path.write_bytes(data)
    return data
