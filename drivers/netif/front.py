"""netfront: the vif front end in a guest, as Linux netfront and Mini-OS run it.

It grants one page per tx slot (read-only) and one per rx slot, posts every
rx buffer at once and reposts each as soon as its frame is read, and asks
the back end, over the control ring when offered, to map all of them once
(netif.h's static grants), so the back end copies frames with a memory copy
rather than a hypercall. Every tx slot id is the index of its buffer.

The framework's loop serves both rings on the shared port (`RingGroup.serve`):
rx responses are delivered to `receiver` (the guest's IP stack) as they
come, tx responses reclaim their buffers. The tx response event index is
armed only while a sender waits for room (`Drain.wait`, `armed=False`), so a
guest that keeps sending is not woken for every tx completion.

Frames that arrive before the guest's stack has attached itself (`receiver`
is set when the kernel hands the vif to the program, after every device has
connected) wait in a backlog of RX_BACKLOG frames, as Linux's per-CPU
netdev backlog keeps them for the stack; beyond it they count in
`rx_dropped`. A frame is never dropped without a counter: the peer's first
packets (an ARP reply, a ping) often arrive in exactly that window.

Each time the back end is Connected, the interface announces itself with a
gratuitous ARP, as Linux's netfront does (netback_changed → Connected →
netdev_notify_peers): after a resume, a restore or a migration to another
host, every bridge on the way learns at once where its MAC lives now.
"""

import ipaddress
import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from drivers.netif.protocol import (
    CTRL_RING,
    DEFAULT_MTU,
    ETH_P_ARP,
    ETH_P_IP,
    GREF,
    NETIF_RINGS,
    max_frame,
    parse_mac,
)
from xenlike.abi.netif import (
    NETIF_RSP_DROPPED,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    XEN_NETIF_CTRL_STATUS_SUCCESS,
    XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING,
    XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE,
    XEN_NETIF_MAX_TX_SIZE,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_more_data,
    XEN_NETIF_CTRLF_GREF_readonly,
)
from xenlike.abi.ring import XEN_PAGE_SIZE
from xenlike.xenbus import (
    Action,
    ChannelBroken,
    DeviceInfo,
    Drain,
    FrontChannel,
    Frontend,
    ProtocolError,
    RingGroup,
    XenbusContext,
)

__all__ = ["Netfront", "gratuitous_arp"]

ARPOP_REQUEST = 1
# Frames kept for the stack until it attaches (`Netfront.receiver`): an rx ring's worth.
RX_BACKLOG = 256
_ARP = struct.Struct("!6s6sHHHBBH6s4s6s4s")  # Ethernet header, then RFC 826's packet


def gratuitous_arp(mac: bytes, ip: str) -> bytes:
    """A broadcast ARP request for our own address (sender = target = `ip`), the
    announcement Linux's inetdev_send_gratuitous_arp sends."""
    address = ipaddress.IPv4Interface(ip).ip.packed
    header = (b"\xff" * 6, mac, ETH_P_ARP)
    return _ARP.pack(*header, 1, ETH_P_IP, 6, 4, ARPOP_REQUEST, mac, address, bytes(6), address)


class _Buffers:
    """The pages behind the tx and rx slots, granted to the back end for the connection."""

    def __init__(self, domain: Any, peer: int, tx_count: int, rx_count: int) -> None:
        self.count = tx_count + rx_count
        self.first = domain.allocator.allocate_run(self.count)
        self.view = domain.memory.frames(self.first, self.count)
        self.tx_refs = [
            domain.grants.grant_access(peer, self.first + i, readonly=True) for i in range(tx_count)
        ]
        self.rx_refs = [
            domain.grants.grant_access(peer, self.first + tx_count + i) for i in range(rx_count)
        ]
        pages = [self.view[i * XEN_PAGE_SIZE : (i + 1) * XEN_PAGE_SIZE] for i in range(self.count)]
        self.tx_pages, self.rx_pages = pages[:tx_count], pages[tx_count:]

    def release_views(self) -> None:
        for page in self.tx_pages + self.rx_pages:
            page.release()
        self.view.release()


class Netfront(Frontend):
    """A guest's network interface: raw Ethernet frames in and out.

    `transmit(frame)` sends one frame; `receiver(frame, flags)` is called
    with every frame received (flags are NETRXF_*: `data_validated` means
    the checksums need no checking). `mac`, `ip` (the vif line's `ip=`,
    from the back end's directory) and `mtu` are read at connection.
    """

    device_type = "vif"
    rings = NETIF_RINGS

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        super().__init__(ctx, device)
        self.mac = b""
        self.ip: str | None = None  # "10.0.0.2/24"
        self._mtu = DEFAULT_MTU
        self._sg = False
        self._tx_limit = self._frame_limit()
        self.csum_offload = False  # the back end takes NETTXF_csum_blank
        self.static_grants = False  # the back end mapped every buffer once
        self._receiver: Callable[[bytes, int], None] | None = None
        self._backlog: deque[tuple[bytes, int]] = deque()  # frames before a receiver attached
        self.stats = {
            "tx_packets": 0,
            "tx_bytes": 0,
            "tx_errors": 0,
            "tx_dropped": 0,
            "rx_packets": 0,
            "rx_bytes": 0,
            "rx_errors": 0,
            "rx_dropped": 0,  # received before the stack attached, past RX_BACKLOG
        }
        self._buffers: _Buffers | None = None
        self._tx: Any = None  # FrontRing, while there is a data path
        self._rx: Any = None
        self._port: Any = None
        self._tx_pages: list[memoryview] = []
        self._tx_refs: list[int] = []
        self._rx_pages: list[memoryview] = []
        self._tx_free: list[int] = []
        self._tx_busy = bytearray()  # per tx slot id: sent, not yet answered
        self._rx_posted = bytearray()  # per rx buffer: posted, not yet filled
        self._rx_requests: list[tuple[int, int, int]] = []  # each buffer's rx request
        self._rx_partial: list[bytes | None] = []  # a frame's slots so far (None: in error)
        self._rx_partial_flags = 0
        self._tx_drain = Drain(self._on_tx, armed=False)  # senders wait on it for room

    @property
    def receiver(self) -> Callable[[bytes, int], None] | None:
        """What every received frame is handed to (the guest's IP stack), with its flags."""
        return self._receiver

    @receiver.setter
    def receiver(self, receiver: Callable[[bytes, int], None] | None) -> None:
        """Attach the stack; it gets the frames that waited for it first, in order."""
        self._receiver = receiver
        backlog = self._backlog
        while receiver is not None and backlog and self._receiver is receiver:
            self._deliver(*backlog.popleft())

    def front_keys(self) -> dict[str, str | int]:
        return {"request-rx-copy": 1, "feature-rx-notify": 1, "feature-sg": 1}

    async def connected(self) -> None:
        try:
            self.mac = parse_mac(await self.read("mac"))
        except ValueError as exc:
            raise ProtocolError(f"{self.device.nodename}/mac: {exc}") from None
        self.ip = await self.read_otherend("ip")
        self.mtu = await self.read_int("mtu", DEFAULT_MTU, otherend=False)
        self.sg = bool(await self.read_int("feature-sg", 0))
        self.csum_offload = not await self.read_int("feature-no-csum-offload", 0)

    async def _perform(self, action: Action) -> None:
        await super()._perform(action)
        if action is Action.connected:
            self.notify_peers()

    def notify_peers(self) -> bool:
        """Announce this interface's MAC and address (netdev_notify_peers); False when
        it has no address (no `ip=`) or the tx ring has no room."""
        if self.ip is None:
            return False
        try:
            frame = gratuitous_arp(self.mac, self.ip)
        except ValueError:
            self.log.warning("%s: ip %r is not an IPv4 address", self.device.nodename, self.ip)
            return False
        return self.transmit_nowait(frame)

    @property
    def mtu(self) -> int:
        return self._mtu

    @mtu.setter
    def mtu(self, mtu: int) -> None:
        self._mtu = mtu
        self._tx_limit = self._frame_limit()

    @property
    def sg(self) -> bool:
        """The back end takes packets over several tx slots."""
        return self._sg

    @sg.setter
    def sg(self, sg: bool) -> None:
        self._sg = sg
        self._tx_limit = self._frame_limit()

    @property
    def max_frame(self) -> int:
        """The longest frame this interface sends (header, VLAN tag, MTU)."""
        return max_frame(self._mtu) if self._sg else min(max_frame(self._mtu), XEN_PAGE_SIZE)

    def _frame_limit(self) -> int:
        """The longest frame `transmit_nowait` takes: kept as mtu and sg change, so a
        send does not work it out again."""
        return min(self.max_frame, XEN_NETIF_MAX_TX_SIZE)

    # --- sending ---------------------------------------------------------------

    def transmit_nowait(self, frame: bytes, flags: int = 0) -> bool:
        """Put one frame on the tx ring (flags: NETTXF_* checksum flags).

        False, with nothing sent, when the device is not connected or the
        ring has no room; ValueError for a frame no back end would take.
        """
        tx = self._tx
        if tx is None or not self.connected_now:
            return False
        length = len(frame)
        if length > self._tx_limit:
            raise ValueError(
                f"a {length}-byte frame is over this vif's limit of {self._tx_limit} bytes"
            )
        free = self._tx_free
        if length <= XEN_PAGE_SIZE:
            if not free:
                self._collect_tx()
                if not free:
                    return False
            slot = free.pop()
            self._tx_pages[slot][:length] = frame
            self._tx_busy[slot] = 1
            tx.put_request((self._tx_refs[slot], 0, flags, slot, length))
        else:
            if len(free) < -(-length // XEN_PAGE_SIZE):
                self._collect_tx()
            if not self._transmit_fragments(frame, flags):
                return False
        if tx.push_requests():
            self._port.notify()
        stats = self.stats
        stats["tx_packets"] += 1
        stats["tx_bytes"] += length
        return True

    def _transmit_fragments(self, frame: bytes, flags: int) -> bool:
        """A frame over one page: one slot per page, chained with NETTXF_more_data."""
        length = len(frame)
        slots = -(-length // XEN_PAGE_SIZE)  # <= 16 (64 KiB), under XEN_NETIF_NR_SLOTS_MIN
        if len(self._tx_free) < slots:
            return False
        for number, start in enumerate(range(0, length, XEN_PAGE_SIZE)):
            chunk = frame[start : start + XEN_PAGE_SIZE]
            slot = self._tx_free.pop()
            self._tx_pages[slot][: len(chunk)] = chunk
            self._tx_busy[slot] = 1
            more = NETTXF_more_data if start + XEN_PAGE_SIZE < length else 0
            size = length if number == 0 else len(chunk)  # the first slot carries the total
            self._tx.put_request(
                (self._tx_refs[slot], 0, (flags if number == 0 else 0) | more, slot, size)
            )
        return True

    async def transmit(self, frame: bytes, flags: int = 0) -> None:
        """Send one frame, waiting for the device and for ring room when needed.

        With room on the ring it returns at once without yielding, as a
        socket send that does not block.
        """
        while not self.transmit_nowait(frame, flags):
            if not self.connected_now:
                await self.wait_connected()
                continue
            await self._tx_drain.wait()  # rsp_event armed: the back end notifies

    def _collect_tx(self) -> None:
        """Reclaim the buffers of answered tx requests: a sender short of free slots
        looks before giving up (not on every send: the loop reclaims them too).

        The loop will not see these responses, so the senders waiting for room
        are woken here."""
        responses = self._tx.get_responses()
        if responses:
            self._tx_answered(responses)
            self._tx_drain.wake()

    async def _on_tx(self, responses: list[Any]) -> None:
        self._tx_answered(responses)

    def _tx_answered(self, responses: list[Any]) -> None:
        """Free the slots of answered tx requests (the loop then wakes waiting senders)."""
        busy, free, stats = self._tx_busy, self._tx_free, self.stats
        for slot, status in responses:
            if status == NETIF_RSP_NULL:
                continue
            if slot >= len(busy) or not busy[slot]:
                raise ChannelBroken(f"tx response for id {slot}, which is not in flight")
            busy[slot] = 0
            free.append(slot)
            if status != NETIF_RSP_OKAY:
                stats["tx_dropped" if status == NETIF_RSP_DROPPED else "tx_errors"] += 1

    # --- the data path -----------------------------------------------------------

    async def serve(self, channel: RingGroup) -> None:
        """Post the rx buffers, map them statically if offered, then serve both
        rings until cancelled (a driver's own serve: it sets up buffers first)."""
        self._tx, self._rx = channel.rings["tx"], channel.rings["rx"]
        self._port = channel.ports["tx"]
        self._tx_drain.bind(self._tx)  # before any sender can wait on it
        buffers = self._buffers = _Buffers(
            self.ctx.domain, self.device.otherend_id, self._tx.nr_ents, self._rx.nr_ents
        )
        self._tx_pages, self._tx_refs = buffers.tx_pages, buffers.tx_refs
        self._rx_pages = buffers.rx_pages
        self._tx_free = list(range(self._tx.nr_ents))
        self._tx_busy = bytearray(self._tx.nr_ents)
        self._rx_posted = bytearray(b"\1" * self._rx.nr_ents)
        self._rx_partial = []
        self._rx_requests = [(i, 0, ref) for i, ref in enumerate(buffers.rx_refs)]
        self._rx.put_requests(self._rx_requests)
        if self._rx.push_requests():
            self._port.notify()
        async with trio.open_nursery() as nursery:
            if "ctrl" in channel.rings:
                nursery.start_soon(self._map_statically, channel.front_channel("ctrl"), buffers)
            await channel.serve({"rx": self._on_rx, "tx": self._tx_drain})

    async def _on_rx(self, responses: list[Any]) -> None:
        """Deliver the frames received and repost their buffers; then the other tasks' turn."""
        self._collect_rx(responses)
        await trio.lowlevel.checkpoint()

    def _collect_rx(self, responses: list[Any]) -> None:
        pages, posted = self._rx_pages, self._rx_posted
        partial, stats = self._rx_partial, self.stats
        reposts = []
        packets = received = 0  # single-slot frames, counted once per batch
        for buffer, offset, flags, status in responses:
            if buffer >= len(posted) or not posted[buffer]:
                raise ChannelBroken(f"rx response for buffer {buffer}, which is not posted")
            if flags & NETRXF_extra_info:
                raise ChannelBroken("rx extra info, which this front end never negotiated")
            posted[buffer] = 0
            reposts.append(buffer)
            good = status >= 0 and offset + status <= XEN_PAGE_SIZE
            if not partial and not flags & NETRXF_more_data:  # a frame in one slot
                if good:
                    packets += 1
                    received += status
                    self._deliver(pages[buffer][offset : offset + status].tobytes(), flags)
                else:
                    stats["rx_errors"] += 1
                continue
            if not partial:
                self._rx_partial_flags = flags & ~NETRXF_more_data  # the first slot's csum flags
            partial.append(bytes(pages[buffer][offset : offset + status]) if good else None)
            if flags & NETRXF_more_data:
                continue
            pieces = [piece for piece in partial if piece is not None]
            complete = len(pieces) == len(partial)
            partial.clear()
            if complete:
                data = b"".join(pieces)
                stats["rx_packets"] += 1
                stats["rx_bytes"] += len(data)
                self._deliver(data, self._rx_partial_flags)
            else:
                stats["rx_errors"] += 1
        stats["rx_packets"] += packets
        stats["rx_bytes"] += received
        for buffer in reposts:
            posted[buffer] = 1
        requests = self._rx_requests
        self._rx.put_requests([requests[buffer] for buffer in reposts])
        if self._rx.push_requests():
            self._port.notify()

    def _deliver(self, frame: bytes, flags: int) -> None:
        receiver = self._receiver
        if receiver is None:
            if len(self._backlog) < RX_BACKLOG:
                self._backlog.append((frame, flags))
            else:
                self.stats["rx_dropped"] += 1
            return
        try:
            receiver(frame, flags)
        except Exception:
            self.log.exception(
                "%s: the receiver failed on a %d-byte frame", self.device.nodename, len(frame)
            )

    async def _map_statically(self, ctrl: FrontChannel, buffers: _Buffers) -> None:
        """XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING of every buffer, through one list page."""
        wanted = [(ref, XEN_NETIF_CTRLF_GREF_readonly) for ref in buffers.tx_refs] + [
            (ref, 0) for ref in buffers.rx_refs
        ]
        request = CTRL_RING.request.record
        domain, peer = self.ctx.domain, self.device.otherend_id
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ctrl.run)
                size = await ctrl.call(request(type=XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE))
                if size.status == XEN_NETIF_CTRL_STATUS_SUCCESS and size.data >= len(wanted):
                    gfn = domain.allocator.allocate()
                    page = domain.memory.frame(gfn)
                    for i, (ref, flags) in enumerate(wanted):
                        GREF.pack_into(page, i * GREF.size, (ref, flags, 0))
                    page.release()
                    list_ref = domain.grants.grant_access(peer, gfn, readonly=True)
                    try:
                        added = await ctrl.call(
                            request(
                                type=XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING,
                                data=(0, list_ref, len(wanted)),
                            )
                        )
                    finally:
                        with trio.CancelScope(shield=True):
                            await self.release_grants([list_ref], gfn, 1)
                    self.static_grants = added.status == XEN_NETIF_CTRL_STATUS_SUCCESS
                nursery.cancel_scope.cancel()
        except* ChannelBroken as group:
            self.log.warning(
                "%s: control ring broken: %s", self.device.nodename, group.exceptions[0]
            )
        if not self.static_grants:
            self.log.info(
                "%s: no static grants; the back end copies with GNTTABOP_copy", self.device.nodename
            )

    async def disconnect(self) -> None:
        self._tx_drain.wake()  # senders waiting for room see the device gone
        await super().disconnect()
        self._tx = self._rx = self._port = None
        self.static_grants = False
        if self._buffers is not None:
            buffers, self._buffers = self._buffers, None
            buffers.release_views()
            await self.release_grants(
                buffers.tx_refs + buffers.rx_refs, buffers.first, buffers.count
            )
