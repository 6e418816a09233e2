"""A malicious blkfront: a guest program that speaks to blkback with raw ring entries.

Its disk is a custom device line, of its own type served by the real
blkback but with no front end (`DRIVER`), so the guest kernel leaves the
device alone and this program does the handshake itself: it grants a ring page, allocates the event
channel, publishes them and goes to Initialised. Then it sends, one at a
time, requests blkback must refuse — grants never made, made to another
domain, read-only for a read, slots of random bytes, the same id twice —
one legitimate write, and finally a req_prod far past the ring, which must
close the device. Each outcome is printed on the console.
"""

import random
from typing import Any

import trio

from drivers.blkif import BLKIF_RING, BlkBack
from drivers.blkif.protocol import RW, SEGMENT_ARRAY, segment_words
from tests.blkif_guests import pattern
from xenlike.abi.blkif import BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BlkifOp
from xenlike.ring import FrontRing
from xenlike.xenbus import Driver, error_node
from xenlike.xenstore import XenStoreError

DEVICE_TYPE = "vbd-hostile"
DRIVER = Driver(DEVICE_TYPE, backend=BlkBack)  # the program below plays the front end
LEGIT = (100, "legit")  # the one write that may change the image: sector, pattern label
NOT_A_DOMAIN = 42


def rw(op: int, sector: int, ref: int, rid: int) -> Any:
    return RW.record(
        op, 1, 51712, rid, sector, SEGMENT_ARRAY(segment_words([ref], 8).ljust(88, b"\0"))
    )


class Ring:
    def __init__(self, view: memoryview, port: Any) -> None:
        self.view, self.port = view, port
        self.front = FrontRing(BLKIF_RING, view)

    async def submit(self, *requests: Any) -> list[Any]:
        for request in requests:
            self.front.put_request(request)
        return await self._push(len(requests))

    async def submit_raw(self, slots: list[bytes]) -> list[Any]:
        """Write bytes straight into the next slots, as no honest front end would."""
        for slot in slots:
            index = self.front.req_prod_pvt & (self.front.nr_ents - 1)
            self.view[64 + 112 * index : 64 + 112 * (index + 1)] = slot
            self.front.req_prod_pvt += 1
        return await self._push(len(slots))

    async def _push(self, count: int) -> list[Any]:
        if self.front.push_requests():
            self.port.notify()
        got: list[Any] = []
        with trio.fail_after(10):
            while len(got) < count:
                got += self.front.get_responses()
                if len(got) < count and not self.front.final_check_for_responses():
                    await self.port.wait()
        return got


async def wait_state(xs: Any, path: str, state: int) -> None:
    """Until the number at `path` is `state`."""
    with trio.fail_after(60):
        async with xs.watch(path) as events:
            async for _ in events:
                try:
                    if int((await xs.read(path)).decode()) == state:
                        return
                except (XenStoreError, ValueError):
                    pass


async def hostile(guest: Any) -> None:
    xs, domain, name = guest.xs, guest.domain, guest.name
    node = f"device/{DEVICE_TYPE}/51712"
    backend = (await xs.read(f"{node}/backend")).decode()
    backend_id = int((await xs.read(f"{node}/backend-id")).decode())
    await wait_state(xs, f"{backend}/state", 2)  # InitWait

    ring_gfn = domain.allocator.allocate()
    ring = Ring(domain.memory.frame(ring_gfn), await domain.evtchn.alloc_unbound(backend_id))
    for key, value in {
        "ring-ref": domain.grants.grant_access(backend_id, ring_gfn),
        "event-channel": ring.port.number,
        "feature-persistent": 1,
        "state": 3,
    }.items():
        await xs.write(f"{node}/{key}", str(value))
    await wait_state(xs, f"{backend}/state", 4)  # Connected
    await xs.write(f"{node}/state", "4")
    await wait_state(xs, "data/attack", 1)  # the test says when (`xenlike up` has returned)

    def page(*, domid: int = backend_id, readonly: bool = False, data: bytes = b"") -> int:
        gfn = domain.allocator.allocate()
        domain.memory.frame(gfn)[: len(data)] = data
        return domain.grants.grant_access(domid, gfn, readonly)

    attacks = [
        ("a grant never made", rw(BlkifOp.WRITE, 0, 2000, 1)),
        ("a grant made to another domain", rw(BlkifOp.WRITE, 0, page(domid=NOT_A_DOMAIN), 2)),
        ("a read-only grant for a read", rw(BlkifOp.READ, 0, page(readonly=True), 3)),
    ]
    for what, request in attacks:
        (response,) = await ring.submit(request)
        assert response.status == BLKIF_RSP_ERROR, (what, response)
        print(f"[{name}] {what}: refused")

    rng = random.Random(7)
    slots = [bytes([op]) + rng.randbytes(111) for op in (0, 1, 5, 6, 9, 200, 255)]
    responses = await ring.submit_raw(slots)
    assert [r.status for r in responses] == [BLKIF_RSP_ERROR] * len(slots), responses
    print(f"[{name}] {len(slots)} slots of random bytes: refused")

    good = page()
    responses = await ring.submit(rw(BlkifOp.READ, 0, good, 9), rw(BlkifOp.READ, 8, good, 9))
    assert sorted(r.status for r in responses) == [BLKIF_RSP_ERROR, BLKIF_RSP_OKAY], responses
    print(f"[{name}] the same id twice: the second refused")

    sector, label = LEGIT
    (response,) = await ring.submit(rw(BlkifOp.WRITE, sector, page(data=pattern(label, 4096)), 10))
    assert response.status == BLKIF_RSP_OKAY, response
    print(f"[{name}] a legitimate write: done")

    header = ring.view.cast("I")
    header[0] += 1000  # req_prod, far past anything the ring holds
    header.release()
    ring.port.notify()
    await wait_state(xs, f"{backend}/state", 5)  # Closing
    error = (await xs.read(error_node(backend))).decode()
    print(f"[{name}] a runaway req_prod: the back end is Closing ({error})")
    print(f"[{name}] hostile done")
    await trio.sleep_forever()
