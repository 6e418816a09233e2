"""netback's data path against a hand-driven front end: good packets, and hostile ones.

The vif runs in this process over rings in local memory, with real eventfd
doorbells and a stand-in for the grant table (the front end's pages by
grant ref; a ref never granted fails its GNTTABOP_copy as Xen's does). The
test plays the front end with `FrontRing`s, as a guest of any make would.
"""

import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from domains.dom0.hw.bridge import Bridge
from drivers.netif import Vif
from drivers.netif.back import RX_QUEUE_MAX
from drivers.netif.protocol import CTRL_RING, GREF, MAX_STATIC_GRANTS, RX_RING, TX_RING
from xenlike.abi.grant_table import GntStatus
from xenlike.abi.netif import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER,
    XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED,
    XEN_NETIF_CTRL_STATUS_SUCCESS,
    XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING,
    XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE,
    XEN_NETIF_CTRL_TYPE_SET_HASH_KEY,
    XEN_NETIF_EXTRA_TYPE_GSO,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    XEN_NETIF_CTRLF_GREF_readonly,
)
from xenlike.domain.grant_table import GrantCopy, GrantStatusError, LocalFrame
from xenlike.ring import BackRing, FrontRing
from xenlike.testing import doorbell_pair
from xenlike.xenbus import ChannelBroken, FrontChannel, RingGroup

PAGE = 4096
GUEST_MAC = bytes.fromhex("00163e000001")
PEER_MAC = bytes.fromhex("00163e0000ff")
FIRST_REF = 8


class FakeGrants:
    """The grant ops netback uses, over the front end's pages (by ref) and Dom0's frames."""

    def __init__(self, front: dict[int, bytearray], dom0: bytearray) -> None:
        self.front, self.dom0 = front, dom0
        self.copies = self.maps = 0

    def _side(self, side: Any, length: int) -> memoryview | None:
        if isinstance(side, LocalFrame):
            start = side.gfn * PAGE + side.offset
            return memoryview(self.dom0)[start : start + length]
        page = self.front.get(side.ref)
        if page is None or side.offset + length > PAGE:
            return None
        return memoryview(page)[side.offset : side.offset + length]

    async def copy(self, ops: list[GrantCopy]) -> None:
        self.copies += 1
        statuses = []
        for op in ops:
            source, dest = self._side(op.source, op.length), self._side(op.dest, op.length)
            if source is None or dest is None:
                statuses.append(GntStatus.bad_gntref)
                continue
            dest[:] = source
            statuses.append(GntStatus.okay)
        if any(statuses):
            raise GrantStatusError("GNTTABOP_copy", [str(i) for i in range(len(ops))], statuses)

    async def map(self, domid: int, refs: list[int], readonly: bool = False) -> Any:
        self.maps += 1
        missing = [ref for ref in refs if ref not in self.front]
        if missing:
            raise GrantStatusError(
                "GNTTABOP_map_grant_ref",
                [str(r) for r in refs],
                [GntStatus.bad_gntref if r in missing else 0 for r in refs],
            )
        return FakeMapping(tuple(refs), readonly, self.front)

    async def unmap(self, mapping: Any) -> None:
        mapping.unmapped = True


class FakeMapping:
    def __init__(self, refs: tuple[int, ...], readonly: bool, pages: dict[int, bytearray]) -> None:
        self.refs, self.readonly, self._pages, self.unmapped = refs, readonly, pages, False

    def page(self, index: int) -> memoryview:
        view = memoryview(self._pages[self.refs[index]])
        return view.toreadonly() if self.readonly else view


class FakeDomain:
    def __init__(self, front: dict[int, bytearray]) -> None:
        self.domid = 0
        self.dom0 = bytearray(2048 * PAGE)
        self.grants = FakeGrants(front, self.dom0)
        self.allocator = self
        self.memory = self
        self._next = 1

    def allocate_run(self, count: int) -> int:
        first, self._next = self._next, self._next + count
        return first

    def allocate(self) -> int:
        return self.allocate_run(1)

    def free_run(self, first: int, count: int) -> None:
        pass

    def frames(self, first: int, count: int) -> memoryview:
        return memoryview(self.dom0)[first * PAGE : (first + count) * PAGE]


class Sink:
    """A bridge port that keeps what it is given (the other side of the bridge)."""

    name, mac = "sink", None

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, int]] = []

    def deliver(self, frame: bytes, flags: int, source: object) -> None:
        self.frames.append((frame, flags))


class Guest:
    """The test's front end: raw rings, the granted pages, and the vif it talks to."""

    def __init__(
        self, nursery: trio.Nursery, *, mtu: int = 1500, offload: bool = True, ctrl: bool = False
    ) -> None:
        self.pages = {FIRST_REF + i: bytearray(PAGE) for i in range(64)}
        self.domain = FakeDomain(self.pages)
        memory = {name: memoryview(bytearray(PAGE)) for name in ("tx", "rx", "ctrl")}
        self.tx = FrontRing(TX_RING, memory["tx"])
        self.rx = FrontRing(RX_RING, memory["rx"])
        self.port, back_port = doorbell_pair()
        rings = {"tx": BackRing(TX_RING, memory["tx"]), "rx": BackRing(RX_RING, memory["rx"])}
        ports = {"tx": back_port, "rx": back_port}
        if ctrl:
            ctrl_port, ports["ctrl"] = doorbell_pair()
            self.ctrl = FrontChannel(FrontRing(CTRL_RING, memory["ctrl"]), ctrl_port)
            rings["ctrl"] = BackRing(CTRL_RING, memory["ctrl"])
            nursery.start_soon(self.ctrl.run)
        self.bridge = Bridge("xenbr0")
        self.sink = Sink()
        self.bridge.attach(self.sink)
        self.vif = Vif(
            name="vif1.0",
            mac=GUEST_MAC,
            mtu=mtu,
            sg=True,
            csum_offload=offload,
            domain=self.domain,
            peer=1,
            bridge=self.bridge,
        )
        self.group = RingGroup(rings, ports)
        self.broken: BaseException | None = None
        self.stopped = trio.Event()
        self.next_id = 0
        nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await self.vif.run(self.group)
        except ChannelBroken as exc:
            self.broken = exc
        finally:
            self.stopped.set()

    def frame(self, size: int, source: bytes = GUEST_MAC) -> bytes:
        body = bytes((i * 7) & 0xFF for i in range(max(size - 14, 0)))
        return (PEER_MAC + source + b"\x88\xb5" + body)[:size]

    def request(
        self, ref: int, offset: int, flags: int, size: int, rid: int | None = None
    ) -> tuple[int, int, int, int, int]:
        if rid is None:
            rid, self.next_id = self.next_id, self.next_id + 1
        return (ref, offset, flags, rid, size)

    def put(self, data: bytes, ref: int, offset: int = 0) -> None:
        self.pages[ref][offset : offset + len(data)] = data

    async def send(self, *requests: tuple[int, ...]) -> list[tuple[int, int]]:
        """Publish requests, notify, and collect one response per slot (or the vif breaking)."""
        self.tx.put_requests(requests)
        if self.tx.push_requests():
            self.port.notify()
        responses: list[tuple[int, int]] = []
        with trio.fail_after(5):
            while len(responses) < len(requests) and not self.stopped.is_set():
                responses += [tuple(r) for r in self.tx.get_responses()]
                if len(responses) < len(requests) and not self.tx.final_check_for_responses():
                    with trio.move_on_after(0.05):
                        await self.port.wait()
        return responses

    def post_rx(self, refs: list[int]) -> None:
        self.rx.put_requests((ref, 0, ref) for ref in refs)  # id = ref, for the test's reading
        if self.rx.push_requests():
            self.port.notify()

    async def receive(self, count: int) -> list[tuple[int, int, int, int]]:
        responses: list[tuple[int, int, int, int]] = []
        with trio.fail_after(5):
            while len(responses) < count:
                responses += [tuple(r) for r in self.rx.get_responses()]
                if len(responses) < count and not self.rx.final_check_for_responses():
                    with trio.move_on_after(0.05):
                        await self.port.wait()
        return responses


@pytest.fixture
async def guest(nursery: trio.Nursery) -> AsyncIterator[Guest]:
    yield Guest(nursery)


async def test_a_frame_goes_to_the_bridge_with_its_checksum_flags(guest: Guest) -> None:
    frame = guest.frame(100)
    guest.put(frame, FIRST_REF, 200)
    blank = guest.frame(60)
    guest.put(blank, FIRST_REF + 1)
    responses = await guest.send(
        guest.request(FIRST_REF, 200, NETTXF_data_validated, 100),
        guest.request(FIRST_REF + 1, 0, NETTXF_csum_blank | NETTXF_data_validated, 60),
    )
    assert responses == [(0, NETIF_RSP_OKAY), (1, NETIF_RSP_OKAY)]
    assert guest.sink.frames == [
        (frame, NETRXF_data_validated),
        (blank, NETRXF_csum_blank | NETRXF_data_validated),
    ]
    assert guest.vif.stats["tx_packets"] == 2 and guest.broken is None


async def test_runts_empty_and_oversized_frames_are_dropped_not_fatal(guest: Guest) -> None:
    for ref in (FIRST_REF, FIRST_REF + 1, FIRST_REF + 2, FIRST_REF + 3):
        guest.put(guest.frame(2000), ref)
    responses = await guest.send(
        guest.request(FIRST_REF, 0, 0, 10),  # shorter than an Ethernet header
        guest.request(FIRST_REF + 1, 0, 0, 0),  # size 0
        guest.request(FIRST_REF + 2, 0, 0, 1519),  # over MTU 1500 + header + VLAN tag
        guest.request(FIRST_REF + 3, 0, 0, 1518),
    )  # the largest a 1500 MTU allows
    assert [status for _, status in responses] == [
        NETIF_RSP_ERROR,
        NETIF_RSP_ERROR,
        NETIF_RSP_DROPPED,
        NETIF_RSP_OKAY,
    ]
    assert len(guest.sink.frames) == 1 and guest.broken is None
    assert guest.vif.stats["tx_errors"] == 2 and guest.vif.stats["tx_dropped"] == 1


async def test_a_grant_never_given_fails_its_packet_only(guest: Guest) -> None:
    first, last = guest.frame(64), guest.frame(80)
    guest.put(first, FIRST_REF)
    guest.put(last, FIRST_REF + 1)
    responses = await guest.send(
        guest.request(FIRST_REF, 0, 0, 64),
        guest.request(2000, 0, 0, 64),  # no such grant
        guest.request(FIRST_REF + 1, 0, 0, 80),
    )
    assert [status for _, status in responses] == [NETIF_RSP_OKAY, NETIF_RSP_ERROR, NETIF_RSP_OKAY]
    assert [frame for frame, _ in guest.sink.frames] == [first, last]  # in order
    assert guest.domain.grants.copies == 1  # one batched GNTTABOP_copy for the drain


async def test_a_frame_over_several_slots_is_joined(nursery: trio.Nursery) -> None:
    guest = Guest(nursery, mtu=9000)
    frame = guest.frame(3000)
    guest.put(frame[:1000], FIRST_REF, 3096)
    guest.put(frame[1000:2500], FIRST_REF + 1)
    guest.put(frame[2500:], FIRST_REF + 2, 100)
    responses = await guest.send(
        guest.request(FIRST_REF, 3096, NETTXF_more_data, 3000),
        guest.request(FIRST_REF + 1, 0, NETTXF_more_data, 1500),
        guest.request(FIRST_REF + 2, 100, 0, 500),
    )
    assert responses == [(0, NETIF_RSP_OKAY), (1, NETIF_RSP_OKAY), (2, NETIF_RSP_OKAY)]
    assert guest.sink.frames == [(frame, 0)]


async def test_fragments_larger_than_their_packet_are_dropped(guest: Guest) -> None:
    responses = await guest.send(
        guest.request(FIRST_REF, 0, NETTXF_more_data, 100), guest.request(FIRST_REF + 1, 0, 0, 200)
    )
    assert [status for _, status in responses] == [NETIF_RSP_ERROR, NETIF_RSP_ERROR]
    assert guest.sink.frames == [] and guest.broken is None


async def test_a_packet_claiming_over_64_kib_is_dropped(guest: Guest) -> None:
    # The first slot's 16-bit size cannot say more than 65535: a front end that
    # wants more can only chain fragments past it, which the total gives away.
    big = [guest.request(FIRST_REF, 0, NETTXF_more_data, 0xFFFF)]
    big += [
        guest.request(FIRST_REF + i, 0, NETTXF_more_data if i < 17 else 0, PAGE)
        for i in range(1, 18)
    ]
    responses = await guest.send(*big)
    assert {status for _, status in responses} == {NETIF_RSP_ERROR} and guest.broken is None
    assert guest.sink.frames == []


def chain(guest: Guest, slots: int) -> list[tuple[int, int, int, int, int]]:
    return [
        guest.request(
            FIRST_REF + i, 0, NETTXF_more_data if i < slots - 1 else 0, slots * 60 if i == 0 else 60
        )
        for i in range(slots)
    ]


async def test_over_the_slot_limit_drops_and_far_over_it_disconnects(guest: Guest) -> None:
    responses = await guest.send(*chain(guest, 18))  # XEN_NETIF_NR_SLOTS_MIN: accepted
    assert {status for _, status in responses} == {NETIF_RSP_OKAY}
    responses = await guest.send(*chain(guest, 20))
    assert {status for _, status in responses} == {NETIF_RSP_ERROR} and guest.broken is None
    await guest.send(*chain(guest, 21))
    await guest.stopped.wait()
    assert "more than 20 slots" in str(guest.broken)


@pytest.mark.parametrize(
    ("requests", "why"),
    [
        ([(FIRST_REF, 4000, 0, 0, 200)], "crosses its page"),
        (
            [(FIRST_REF, 0, NETTXF_more_data, 0, 300), (FIRST_REF + 1, 4000, 0, 1, 200)],
            "crosses its page",
        ),
        ([(FIRST_REF, 0, NETTXF_more_data, 0, 300)], "runs past the published requests"),
        ([(FIRST_REF, 0, NETTXF_extra_info, 0, 300)], "runs past the published requests"),
        (
            [(FIRST_REF, 0, NETTXF_extra_info, 0, 300), (0x0107, 0, 0, 0, 0)],  # extra type 7
            "none of netif.h's",
        ),
    ],
    ids=["past-page", "fragment-past-page", "chain-unpublished", "extra-unpublished", "extra-type"],
)
async def test_what_only_a_malicious_front_end_sends_disconnects(
    guest: Guest, requests: list[tuple[int, ...]], why: str
) -> None:
    await guest.send(*requests)
    await guest.stopped.wait()
    assert why in str(guest.broken)


async def test_extra_info_not_negotiated_drops_and_answers_null(guest: Guest) -> None:
    gso = XEN_NETIF_EXTRA_TYPE_GSO | 1400 << 16  # type, flags, then u.gso.size
    responses = await guest.send(
        guest.request(FIRST_REF, 0, NETTXF_extra_info, 100), (gso, 0, 0, 0, 0)
    )
    assert [status for _, status in responses] == [NETIF_RSP_ERROR, NETIF_RSP_NULL]
    assert guest.broken is None


async def test_received_frames_fill_posted_buffers_in_request_order(nursery: trio.Nursery) -> None:
    guest = Guest(nursery, mtu=9000)
    guest.post_rx([FIRST_REF + i for i in range(4)])
    small, big = guest.frame(300), guest.frame(6000)
    guest.vif.deliver(small, NETRXF_data_validated, guest.sink)
    guest.vif.deliver(big, 0, guest.sink)
    responses = await guest.receive(3)
    assert responses == [
        (FIRST_REF, 0, NETRXF_data_validated, 300),
        (FIRST_REF + 1, 0, NETRXF_more_data, 4096),
        (FIRST_REF + 2, 0, 0, 6000 - 4096),
    ]
    assert bytes(guest.pages[FIRST_REF][:300]) == small
    assert bytes(guest.pages[FIRST_REF + 1]) + bytes(guest.pages[FIRST_REF + 2][:1904]) == big


async def test_a_guest_that_posts_no_buffers_loses_only_its_own_frames(guest: Guest) -> None:
    for number in range(RX_QUEUE_MAX + 100):
        guest.vif.deliver(guest.frame(64 + number % 100), 0, guest.sink)
    assert guest.vif.stats["rx_dropped"] == 100
    await trio.testing.wait_all_tasks_blocked()  # the vif has done all it would
    assert guest.broken is None
    guest.post_rx([FIRST_REF + i for i in range(32)])
    responses = await guest.receive(32)
    assert [status for *_, status in responses] == [64 + n % 100 for n in range(32)]


class Held(Sink):
    """A sending vif as the bridge sees it: it can be held for room."""

    def __init__(self) -> None:
        super().__init__()
        self.held_by: list[Any] = []

    def hold(self, destination: Any) -> None:
        self.held_by.append(destination)


async def test_a_vif_filling_half_a_queue_is_held_until_it_has_room(guest: Guest) -> None:
    """Push back instead of loss: the sender is held once its frames fill half the
    receiver's queue (a drain more still fits), and let go once the guest has
    taken enough of them; nothing is dropped."""
    sender = Held()
    for number in range(RX_QUEUE_MAX // 2 - 1):
        guest.vif.deliver(guest.frame(64 + number % 100), 0, sender)
    assert sender.held_by == []
    guest.vif.deliver(guest.frame(64), 0, sender)
    assert sender.held_by == [guest.vif]
    room = trio.Event()

    async def wait_for_room() -> None:
        await guest.vif.room_for(sender)
        room.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_room)
        await trio.testing.wait_all_tasks_blocked()
        assert not room.is_set()  # nothing was taken yet
        for _ in range(RX_QUEUE_MAX // 4 // 32):
            guest.post_rx([FIRST_REF + i for i in range(32)])
            await guest.receive(32)
        with trio.fail_after(5):
            await room.wait()
    assert guest.vif.stats["rx_dropped"] == 0


async def test_a_flooding_sender_overflows_only_its_own_queue(guest: Guest) -> None:
    flood, quiet = Sink(), Sink()
    for _ in range(RX_QUEUE_MAX + 50):
        guest.vif.deliver(guest.frame(100), 0, flood)
    for size in (61, 62, 63):
        guest.vif.deliver(guest.frame(size), 0, quiet)
    assert guest.vif.stats["rx_dropped"] == 50
    guest.post_rx([FIRST_REF + i for i in range(8)])
    sizes = [status for *_, status in await guest.receive(8)]
    assert sizes == [100, 61, 100, 62, 100, 63, 100, 100]  # taken in turn


async def test_a_checksum_left_blank_is_filled_for_a_front_end_without_offload(
    nursery: trio.Nursery,
) -> None:
    guest = Guest(nursery, offload=False)
    guest.post_rx([FIRST_REF])
    udp = bytes.fromhex("0a0000010a000002")  # 10.0.0.1 -> 10.0.0.2
    payload = b"hi!!"
    ip = struct.pack("!BBHHHBBH8s", 0x45, 0, 32, 1, 0x4000, 64, 17, 0, udp)
    frame = PEER_MAC + GUEST_MAC + b"\x08\x00" + ip + struct.pack("!HHHH", 1, 2, 12, 0) + payload
    guest.vif.deliver(frame, NETRXF_csum_blank | NETRXF_data_validated, guest.sink)
    (response,) = await guest.receive(1)
    assert response[2] == NETRXF_data_validated
    assert bytes(guest.pages[FIRST_REF][40:42]) != b"\0\0"  # the UDP checksum, filled in


async def test_static_grants_through_the_control_ring(nursery: trio.Nursery) -> None:
    guest = Guest(nursery, ctrl=True)
    request = CTRL_RING.request.record
    size = await guest.ctrl.call(request(type=XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE))
    assert (size.status, size.data) == (XEN_NETIF_CTRL_STATUS_SUCCESS, MAX_STATIC_GRANTS)
    listing = FIRST_REF + 63
    for i in range(8):  # tx buffers read-only, rx buffers writable
        GREF.pack_into(
            guest.pages[listing],
            i * GREF.size,
            (FIRST_REF + i, XEN_NETIF_CTRLF_GREF_readonly if i < 4 else 0, 0),
        )
    added = await guest.ctrl.call(
        request(type=XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING, data=(0, listing, 8))
    )
    assert added.status == XEN_NETIF_CTRL_STATUS_SUCCESS
    again = await guest.ctrl.call(
        request(type=XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING, data=(0, listing, 8))
    )
    assert again.status == XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER  # already mapped
    other = await guest.ctrl.call(request(type=XEN_NETIF_CTRL_TYPE_SET_HASH_KEY))
    assert other.status == XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED
    frame = guest.frame(200)
    guest.put(frame, FIRST_REF)
    guest.post_rx([FIRST_REF + 4])
    assert await guest.send(guest.request(FIRST_REF, 0, 0, 200)) == [(0, NETIF_RSP_OKAY)]
    guest.vif.deliver(frame, 0, guest.sink)
    assert (await guest.receive(1))[0][3] == 200
    assert guest.domain.grants.copies == 0  # both copies were plain memory copies
    mappings = list(guest.vif._mappings)
    await guest.vif.close()
    assert len(mappings) == 2 and all(mapping.unmapped for mapping in mappings)


async def test_a_refused_rx_copy_is_an_error_not_a_packet(guest: Guest) -> None:
    guest.post_rx([FIRST_REF, 9999, FIRST_REF + 1])  # 9999: never granted
    for size in (100, 200, 300):
        guest.vif.deliver(guest.frame(size), 0, guest.sink)
    responses = await guest.receive(3)
    assert [status for *_, status in responses] == [100, NETIF_RSP_ERROR, 300]
    stats = guest.vif.stats
    assert (stats["rx_packets"], stats["rx_bytes"], stats["rx_errors"]) == (2, 400, 1)
