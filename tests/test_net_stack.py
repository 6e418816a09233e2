"""The guest IP stack on its own: two interfaces joined by a fake wire (no domains)."""

import ipaddress
import socket
import struct
from collections import deque

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from domains.guest.net import AddressInUse, HostUnreachable, Interface, NetworkUnreachable
from domains.guest.net import arp as arp_module
from domains.guest.net.wire import (
    ARP,
    ETH_UDP,
    ETH_UDP_FLOW,
    ETHERNET,
    ICMP_ECHO,
    IPV4,
    UDP,
    arp_packet,
    ethernet_header,
    icmp_echo,
    ipv4_header,
    udp_header,
)
from drivers.netif.protocol import checksum, fill_checksum, pseudo_header_sum, rx_flags_of
from xenlike.abi.netif import NETRXF_csum_blank, NETTXF_csum_blank, NETTXF_data_validated


class FakeVif:
    """What the stack uses of a Netfront; frames go to the other end of a `Wire`."""

    def __init__(self, mac: str, ip: str | None, offload: bool) -> None:
        self.mac = bytes.fromhex(mac.replace(":", ""))
        self.ip = ip
        self.csum_offload = offload
        self.receiver = None
        self.sent: list[tuple[bytes, int]] = []
        self.wire: Wire | None = None

    def transmit_nowait(self, frame: bytes, flags: int = 0) -> bool:
        self.sent.append((frame, flags))
        assert self.wire is not None
        self.wire.carry(self, frame, flags)
        return True

    async def transmit(self, frame: bytes, flags: int = 0) -> None:
        self.transmit_nowait(frame, flags)


class Wire:
    """Carries frames between two fake vifs as netback and the bridge would (flags included)."""

    def __init__(self, a: FakeVif, b: FakeVif) -> None:
        self.ends = (a, b)
        a.wire = b.wire = self
        self.queue: deque[tuple[FakeVif, bytes, int]] = deque()
        self.arrived = trio.Event()
        self.cut = False

    def carry(self, sender: FakeVif, frame: bytes, flags: int) -> None:
        if self.cut:
            return
        peer = self.ends[1] if sender is self.ends[0] else self.ends[0]
        rx_flags = rx_flags_of(flags)
        if rx_flags & NETRXF_csum_blank and not peer.csum_offload:
            frame, rx_flags = fill_checksum(frame), rx_flags & ~NETRXF_csum_blank
        self.queue.append((peer, frame, rx_flags))
        self.arrived.set()

    async def run(self) -> None:
        while True:
            await self.arrived.wait()
            self.arrived = trio.Event()
            while self.queue:
                peer, frame, flags = self.queue.popleft()
                if peer.receiver is not None:
                    peer.receiver(frame, flags)
            await trio.sleep(0)


def make_pair(nursery: trio.Nursery, offload: bool) -> tuple[Interface, Interface]:
    a = FakeVif("00:16:3e:00:00:01", "10.0.0.1/24", offload)
    b = FakeVif("00:16:3e:00:00:02", "10.0.0.2/24", offload)
    wire = Wire(a, b)
    nursery.start_soon(wire.run)
    return Interface(a), Interface(b)


@pytest.fixture(params=[True, False], ids=["offload", "no-offload"])
async def pair(
    request: pytest.FixtureRequest, nursery: trio.Nursery
) -> tuple[Interface, Interface]:
    """Two interfaces whose back ends offer checksum offload, or do not."""
    return make_pair(nursery, request.param)


def naive_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=2000))
def test_checksum_matches_rfc1071_word_by_word(data: bytes) -> None:
    assert checksum(data) == naive_checksum(data)


@pytest.mark.parametrize(
    ("layout", "fmt", "values"),
    [
        (ethernet_header, ETHERNET, (b"\xff" * 6, b"\x00\x16\x3e\x00\x00\x01", 0x0806)),
        (
            arp_packet,
            ARP,
            (
                1,
                0x0800,
                6,
                4,
                1,
                b"\x00\x16\x3e\x00\x00\x01",
                b"\x0a\0\0\x01",
                bytes(6),
                b"\x0a\0\0\x02",
            ),
        ),
        (
            ipv4_header,
            IPV4,
            (0x45, 0, 84, 7, 0x4000, 64, 1, 0x1234, b"\x0a\0\0\x01", b"\x0a\0\0\x02"),
        ),
        (icmp_echo, ICMP_ECHO, (8, 0, 0xBEEF, 1, 2)),
        (udp_header, UDP, (5000, 9000, 20, 0)),
    ],
)
def test_struct_formats_give_the_construct_layouts_bytes(layout, fmt, values) -> None:  # type: ignore[no-untyped-def]
    names = [sub.name for sub in layout.subcons]
    assert fmt.pack(*values) == layout.build(dict(zip(names, values, strict=True)))
    assert fmt.size == layout.sizeof()
    assert ETH_UDP.size == 14 + 20 + 8


@given(
    macs=st.tuples(st.binary(min_size=6, max_size=6), st.binary(min_size=6, max_size=6)),
    words=st.lists(st.integers(0, 0xFFFF), min_size=7, max_size=7),
    ttl=st.integers(0, 255),
    addresses=st.binary(min_size=8, max_size=8),
)
def test_a_flows_header_runs_give_the_full_packs_bytes(
    macs: tuple[bytes, bytes], words: list[int], ttl: int, addresses: bytes
) -> None:
    """send_udp packs a datagram's headers from a flow's constant runs (ETH_UDP_FLOW):
    the same 42 bytes as ETH_UDP from every field."""
    total, ident, fragment, sum_, sport, dport, length = words
    full = ETH_UDP.pack(
        *macs, 0x0800, 0x45, 0, total, ident, fragment, ttl, 17, sum_,
        addresses[:4], addresses[4:], sport, dport, length, 0,
    )  # fmt: skip
    runs = ETH_UDP_FLOW.pack(
        ETHERNET.pack(*macs, 0x0800) + b"\x45\x00",
        total,
        ident,
        struct.pack("!HBB", fragment, ttl, 17),
        sum_,
        addresses + struct.pack("!HH", sport, dport),
        length,
        0,
    )
    assert runs == full


async def test_a_flow_follows_its_next_hop_and_the_interfaces_address(
    pair: tuple[Interface, Interface],
) -> None:
    """A flow's kept header runs name the next hop and our address: a new MAC for the
    destination, or a new address the interface took, is in the next datagram."""
    a, b = pair
    with b.udp(9000) as server, a.udp(5000) as client:
        await client.sendto(b"one", ("10.0.0.2", 9000))
        await server.recvfrom()
        other = bytes.fromhex("00163e0000ee")
        a.arp.learn(socket.inet_aton("10.0.0.2"), other, create=True)
        await client.sendto(b"two", ("10.0.0.2", 9000))
        assert a.vif.sent[-1][0][:6] == other
        a.vif.ip = "10.0.0.9/24"
        assert str(a.ip) == "10.0.0.9"  # the interface takes the vif's new address
        await client.sendto(b"three", ("10.0.0.2", 9000))
        frame = a.vif.sent[-1][0]
        assert frame[26:30] == socket.inet_aton("10.0.0.9") and checksum(frame[14:34]) == 0


async def test_ping_resolves_with_arp_then_answers(pair: tuple[Interface, Interface]) -> None:
    a, b = pair
    rtt = await a.ping("10.0.0.2")
    assert 0 < rtt < 1
    assert a.arp.lookup(socket.inet_aton("10.0.0.2")) == b.mac
    assert b.arp.lookup(socket.inet_aton("10.0.0.1")) == a.mac  # learned from the request
    kinds = [frame[12:14] for frame, _ in a.vif.sent]
    assert kinds.count(b"\x08\x06") == 2  # the announcement, then one request


async def test_every_header_checksum_is_right_on_the_wire(
    pair: tuple[Interface, Interface],
) -> None:
    a, b = pair
    with b.udp(9000) as server, a.udp() as client:
        await client.sendto(b"payload" * 10, ("10.0.0.2", 9000))
        await server.recvfrom()
    await a.ping("10.0.0.2")
    for frame, flags in a.vif.sent:
        if frame[12:14] != b"\x08\x00":
            continue
        assert checksum(frame[14:34]) == 0, "IPv4 header"
        if frame[23] == 17 and flags & NETTXF_csum_blank:
            assert flags & NETTXF_data_validated
            frame = fill_checksum(frame)
        segment = frame[34:]
        extra = (
            pseudo_header_sum(frame[26:30], frame[30:34], 17, len(segment))
            if frame[23] == 17
            else 0
        )
        assert checksum(segment, extra) == 0, f"protocol {frame[23]}"


async def test_udp_both_ways_and_the_sender_address(pair: tuple[Interface, Interface]) -> None:
    a, b = pair
    with b.udp(7) as echo, a.udp() as client:
        await client.sendto(b"hello", ("10.0.0.2", 7))
        data, (host, port) = await echo.recvfrom()
        assert (data, host, port) == (b"hello", "10.0.0.1", client.port)
        await echo.sendto(data.upper(), (host, port))
        assert await client.recvfrom() == (b"HELLO", ("10.0.0.2", 7))


async def test_a_datagram_with_a_bad_checksum_is_dropped(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = make_pair(nursery, offload=False)
    with b.udp(9000) as server:
        frame = (
            ETH_UDP.pack(
                b.mac,
                a.mac,
                0x0800,
                0x45,
                0,
                33,
                1,
                0x4000,
                64,
                17,
                0,
                socket.inet_aton("10.0.0.1"),
                socket.inet_aton("10.0.0.2"),
                1234,
                9000,
                13,
                0xDEAD,
            )
            + b"abcde"
        )
        frame = frame[:24] + checksum(frame[14:34]).to_bytes(2, "big") + frame[26:]
        b._receive(frame, 0)
        assert b.stats["bad_checksum"] == 1
        # Absence, on the mock clock: the timeout passes only once every task of the
        # in-process stack is blocked, so a delivery would have happened by then.
        with trio.move_on_after(0.05):
            await server.recvfrom()
            pytest.fail("a corrupt datagram was delivered")


async def test_no_socket_means_icmp_port_unreachable(pair: tuple[Interface, Interface]) -> None:
    a, b = pair
    with a.udp() as client:
        await client.sendto(b"anyone?", ("10.0.0.2", 4444))
        await trio.testing.wait_all_tasks_blocked()  # the wire and both stacks are done
    assert b.stats["no_port"] == 1
    assert a.stats["icmp_unreachable"] == 1


async def test_ports_are_exclusive_and_ephemeral_ones_distinct(
    pair: tuple[Interface, Interface],
) -> None:
    a, _ = pair
    with a.udp(5000):
        with pytest.raises(AddressInUse):
            a.udp(5000)
        assert a.udp().port != a.udp().port
    a.udp(5000).close()


async def test_unknown_hosts_and_other_networks_fail_clearly(
    pair: tuple[Interface, Interface], autojump_clock: trio.testing.MockClock
) -> None:
    """Timeouts and ARP retries run on the mock clock."""
    a, _ = pair
    with pytest.raises(TimeoutError, match="no echo reply within 0.1 s"):
        await a.ping("10.0.0.9", timeout=0.1)
    with pytest.raises(NetworkUnreachable, match="192.168.1.1 is not on 10.0.0.0/24"):
        await a.ping("192.168.1.1")
    with pytest.raises(HostUnreachable, match="10.0.0.9: no ARP reply to 3 requests"):
        await a.resolve("10.0.0.9")


async def test_arp_entries_expire(
    pair: tuple[Interface, Interface],
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = pair
    await a.ping("10.0.0.2")
    peer = socket.inet_aton("10.0.0.2")
    clock = arp_module.time.monotonic() + arp_module.REACHABLE_TIME + 1
    monkeypatch.setattr(arp_module.time, "monotonic", lambda: clock)
    assert a.arp.lookup(peer) is None
    b.vif.wire.cut = True  # the peer is gone: resolving again fails (retries on the mock clock)
    with pytest.raises(HostUnreachable):
        await a.resolve("10.0.0.2")


async def test_broadcast_datagrams_reach_every_listener(pair: tuple[Interface, Interface]) -> None:
    a, b = pair
    with b.udp(7) as listener, a.udp() as client:
        await client.sendto(b"who is there?", ("10.0.0.255", 7))
        assert (await listener.recvfrom())[0] == b"who is there?"
    assert a.vif.sent[-1][0][:6] == b"\xff" * 6


async def test_an_interface_without_address_says_so(nursery: trio.Nursery) -> None:
    vif = FakeVif("00:16:3e:00:00:03", None, True)
    Wire(vif, FakeVif("00:16:3e:00:00:04", None, True))
    iface = Interface(vif)
    assert iface.ip is None and vif.sent == []  # no announcement without an address
    with pytest.raises(NetworkUnreachable, match="has no IPv4 address"):
        await iface.ping("10.0.0.1")
    vif.ip = "10.1.0.5/16"
    assert iface.ip == ipaddress.IPv4Address("10.1.0.5")
