"""netfront and netback joined in one process: real rings, doorbells, static grants.

The guest is a `LocalDomain` (real memory and page allocator, a grant table
of its own) whose granted pages the back end's grant ops resolve against,
so what netfront grants is what netback maps or copies.
"""

import pytest
import trio
import trio.testing

from domains.dom0.hw.bridge import Bridge
from drivers.netif import Netfront, Vif
from drivers.netif.front import RX_BACKLOG
from drivers.netif.protocol import CTRL_RING, RX_RING, TX_RING
from tests.test_netif_back import GUEST_MAC, PAGE, PEER_MAC, FakeDomain, Sink
from xenlike.abi.netif import (
    NETIF_RSP_OKAY,
    NETRXF_data_validated,
    NETTXF_csum_blank,
    NETTXF_data_validated,
)
from xenlike.ring import BackRing, FrontRing
from xenlike.testing import LocalDomain, detached, doorbell_pair
from xenlike.xenbus import RingGroup


class Pair:
    def __init__(self, nursery: trio.Nursery, *, front_serves: bool = True) -> None:
        self.guest = LocalDomain(1100)
        self.dom0 = FakeDomain(self.guest.granted)  # type: ignore[arg-type]
        self.memory = memory = {name: memoryview(bytearray(PAGE)) for name in ("tx", "rx", "ctrl")}
        specs = {"tx": TX_RING, "rx": RX_RING, "ctrl": CTRL_RING}
        front_rings = {name: FrontRing(spec, memory[name]) for name, spec in specs.items()}
        back_rings = {name: BackRing(spec, memory[name]) for name, spec in specs.items()}
        front_port, back_port = doorbell_pair()
        front_ctrl, back_ctrl = doorbell_pair()
        ports = (
            {"tx": front_port, "rx": front_port, "ctrl": front_ctrl},
            {"tx": back_port, "rx": back_port, "ctrl": back_ctrl},
        )
        self.front = detached(Netfront)
        self.front.ctx.domain = self.guest
        self.front.mac, self.front.sg, self.front.csum_offload = GUEST_MAC, True, True
        self.front.mtu = 9000
        self.received: list[tuple[bytes, int]] = []
        self.front.receiver = lambda frame, flags: self.received.append((frame, flags))
        self.group = group = RingGroup(front_rings, ports[0])  # type: ignore[arg-type]
        self.front.group = group
        self.front._ready.set()  # as the handshake would at Connected
        self.bridge = Bridge("xenbr0")
        self.sink = Sink()
        self.bridge.attach(self.sink)
        self.vif = Vif(
            name="vif1.0",
            mac=GUEST_MAC,
            mtu=9000,
            sg=True,
            csum_offload=True,
            domain=self.dom0,
            peer=1,
            bridge=self.bridge,
        )
        if front_serves:
            nursery.start_soon(self.front.serve, group)
        nursery.start_soon(self.vif.run, RingGroup(back_rings, ports[1]))  # type: ignore[arg-type]

    def frame(self, size: int, tag: int = 0) -> bytes:
        return (PEER_MAC + GUEST_MAC + b"\x88\xb5" + bytes([tag & 0xFF]) * size)[:size]


@pytest.fixture
async def pair(nursery: trio.Nursery) -> Pair:
    pair = Pair(nursery)
    with trio.fail_after(5):
        while not pair.front.static_grants:
            await trio.sleep(0.01)
    return pair


async def test_every_buffer_is_mapped_once_and_copied_without_hypercalls(pair: Pair) -> None:
    assert len(pair.vif._pages) == 2 * TX_RING.nr_ents()
    await pair.front.transmit(pair.frame(100), NETTXF_csum_blank | NETTXF_data_validated)
    pair.vif.deliver(pair.frame(200, 1), NETRXF_data_validated, pair.sink)
    with trio.fail_after(5):
        while not (pair.sink.frames and pair.received):
            await trio.sleep(0.01)
    assert pair.received == [(pair.frame(200, 1), NETRXF_data_validated)]
    assert pair.dom0.grants.copies == 0


async def test_a_burst_larger_than_the_ring_arrives_whole_and_in_order(pair: Pair) -> None:
    frames = [pair.frame(60 + n % 1400, n) for n in range(2000)]
    for frame in frames:  # waits for room whenever the 256 slots are in flight
        await pair.front.transmit(frame)
    with trio.fail_after(10):
        while len(pair.sink.frames) < len(frames):
            await trio.sleep(0.01)
    assert [frame for frame, _ in pair.sink.frames] == frames
    assert pair.front.stats["tx_packets"] == 2000 and pair.vif.stats["tx_packets"] == 2000


async def test_jumbo_frames_travel_over_several_slots_each_way(pair: Pair) -> None:
    jumbo = pair.frame(9018, 7)
    await pair.front.transmit(jumbo)
    pair.vif.deliver(pair.frame(6000, 9), 0, pair.sink)
    with trio.fail_after(5):
        while not (pair.sink.frames and pair.received):
            await trio.sleep(0.01)
    assert pair.sink.frames == [(jumbo, 0)]
    assert pair.received == [(pair.frame(6000, 9), 0)]
    assert pair.front.stats["rx_packets"] == 1 and pair.vif.stats["rx_packets"] == 1


async def test_received_frames_keep_coming_as_buffers_are_reposted(pair: Pair) -> None:
    frames = [pair.frame(64 + n % 500, n) for n in range(1000)]
    for start in range(0, 1000, 100):  # ten bursts, each within the fair queue's bound
        for frame in frames[start : start + 100]:
            pair.vif.deliver(frame, 0, pair.sink)
        with trio.fail_after(5):
            while len(pair.received) < start + 100:
                await trio.sleep(0.005)
    assert [frame for frame, _ in pair.received] == frames
    assert pair.vif.stats["rx_dropped"] == 0


async def test_frames_before_the_stack_attaches_wait_for_it_or_are_counted(
    pair: Pair,
) -> None:
    """The peer's first frames may come before the guest's stack is attached: they
    wait (RX_BACKLOG of them) and reach it in order; the rest count in rx_dropped."""
    pair.front.receiver = None
    frames = [pair.frame(64, n) for n in range(RX_BACKLOG + 10)]
    for start in range(0, len(frames), 100):  # bursts within the fair queue's bound
        for frame in frames[start : start + 100]:
            pair.vif.deliver(frame, 0, pair.sink)
        with trio.fail_after(5):
            while pair.front.stats["rx_packets"] < min(start + 100, len(frames)):
                await trio.sleep(0.005)
    assert pair.received == []
    assert pair.front.stats["rx_dropped"] == 10
    pair.front.receiver = lambda frame, flags: pair.received.append((frame, flags))
    assert [frame for frame, _ in pair.received] == frames[:RX_BACKLOG]
    pair.vif.deliver(frames[-1], 0, pair.sink)  # and then straight to the stack
    with trio.fail_after(5):
        while len(pair.received) < RX_BACKLOG + 1:
            await trio.sleep(0.005)
    assert pair.received[-1][0] == frames[-1]


async def test_a_back_end_breaking_the_ring_fails_the_device_not_the_guest(
    nursery: trio.Nursery,
) -> None:
    """An impossible rsp_prod is a protocol violation for this device alone: the
    front end's data path stops and the device heads for Closing (fatal)."""
    pair = Pair(nursery, front_serves=False)
    fatal: list[str] = []

    async def record(message: str, *, code: int = 0) -> None:
        fatal.append(message)

    pair.front.fatal = record  # type: ignore[method-assign]
    collecting = trio.Event()

    async def collect() -> None:
        await pair.front._collect(pair.group)
        collecting.set()

    nursery.start_soon(collect)
    with trio.fail_after(5):
        while not pair.front.static_grants:
            await trio.sleep(0.01)
    header = pair.memory["rx"][:16].cast("I")
    header[2] += 100_000  # rsp_prod far past anything requested
    header.release()
    pair.vif._port.notify()  # the front end looks at its rings
    with trio.fail_after(5):
        await collecting.wait()
    assert len(fatal) == 1 and "ring protocol violation" in fatal[0]


async def test_a_frame_over_the_mtu_is_refused_before_it_reaches_the_ring(pair: Pair) -> None:
    pair.front.mtu, pair.front.sg = 1500, False  # one page per frame at most
    produced = pair.front._tx.req_prod_pvt  # type: ignore[union-attr]
    for size in (pair.front.max_frame + 1, 2 * PAGE):  # in one slot, and over several
        with pytest.raises(ValueError, match="over this vif's limit"):
            pair.front.transmit_nowait(pair.frame(size))
    assert pair.front._tx.req_prod_pvt == produced  # type: ignore[union-attr]
    assert pair.front.transmit_nowait(pair.frame(pair.front.max_frame))


async def test_a_sender_reclaiming_tx_slots_wakes_the_senders_waiting_for_room(
    nursery: trio.Nursery,
) -> None:
    """A sender that finds the ring full waits with rsp_event armed; when another
    sender takes the back end's responses first (transmit_nowait reclaims slots
    without yielding), the loop wakes to an empty ring, so the waiter must be
    woken by the sender that took them, or it sleeps for good."""
    memory = {name: memoryview(bytearray(PAGE)) for name in ("tx", "rx")}
    rings = {"tx": FrontRing(TX_RING, memory["tx"]), "rx": FrontRing(RX_RING, memory["rx"])}
    back_tx = BackRing(TX_RING, memory["tx"])
    front_port, back_port = doorbell_pair()
    front = detached(Netfront)
    front.ctx.domain = LocalDomain(1100)
    front.mac = GUEST_MAC
    front.group = group = RingGroup(rings, {"tx": front_port, "rx": front_port})  # type: ignore[arg-type]
    front._ready.set()  # as the handshake would at Connected
    nursery.start_soon(front.serve, group)
    await trio.testing.wait_all_tasks_blocked()
    frame = PEER_MAC + GUEST_MAC + b"\x88\xb5" + bytes(46)
    while front.transmit_nowait(frame):
        pass
    sent = trio.Event()

    async def waiting_sender() -> None:
        await front.transmit(frame)
        sent.set()

    nursery.start_soon(waiting_sender)
    await trio.testing.wait_all_tasks_blocked()
    requests = back_tx.get_requests()
    assert len(requests) == TX_RING.nr_ents()
    back_tx.put_responses((request[3], NETIF_RSP_OKAY) for request in requests)
    assert back_tx.push_responses() is True  # the waiting sender armed rsp_event
    back_port.notify()
    assert front.transmit_nowait(frame)  # takes every response before the loop runs
    with trio.fail_after(5):
        await sent.wait()
