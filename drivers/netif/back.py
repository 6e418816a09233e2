"""netback: the back end of a vif, in the driver domain, as a port of a bridge.

What Linux netback does, in its order, with its limits:

- tx: each drain copies every published request once, parses packets (the
  first slot's `size` is the whole packet, NETTXF_extra_info slots follow it,
  NETTXF_more_data chains fragments), checks them, reads the data (static
  grants straight from the mapped page, anything else with one batched
  GNTTABOP_copy per drain), answers every slot (extra-info slots with
  NETIF_RSP_NULL) and hands the frames to the bridge.
- A packet that is merely wrong is dropped with NETIF_RSP_ERROR (shorter
  than an Ethernet header, more than XEN_NETIF_NR_SLOTS_MIN slots,
  fragments larger than the packet, a grant the hypervisor refuses, an
  extra-info type that was not negotiated), one longer than the MTU allows
  with NETIF_RSP_DROPPED.
  What only a malicious front end sends disconnects the vif, as
  xenvif_fatal_tx_err does: a fragment crossing its page, more than
  FATAL_SKB_SLOTS slots, a chain running past the published requests, an
  unknown extra-info type, an impossible ring index.
- rx (rx-copy only): frames from the bridge wait in one bounded queue per
  port they came from, taken in turn, and are copied into the buffers the
  front end posted, responses in request order (Linux netfront reads them by
  slot, not by id). A sender flooding a guest overflows only its own queue;
  a front end that posts nothing loses only its own frames. A vif that
  fills another's queue is pushed back first (RX_HOLD_TIMEOUT): it takes no
  more tx requests until there is room, so its guest's sends wait for ring
  space instead of being dropped; every frame still dropped counts in
  rx_dropped. A checksum a
  guest left blank (NETTXF_csum_blank) stays blank for a front end that
  takes offload and is filled in for one that does not.
- ctrl ring: netif.h's static grants (GET_GREF_MAPPING_SIZE,
  ADD_GREF_MAPPING); the pages stay mapped until the vif disconnects.

Each vif drains at most one ring's worth per turn and then yields, so a
guest flooding its tx ring gets its turn like every other vif, no more; and
its frames reach each other guest through that guest's fair queue.
"""

import functools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, cast

import trio

from drivers.netif.protocol import (
    DEFAULT_MTU,
    GREF,
    GREFS_PER_PAGE,
    MAX_STATIC_GRANTS,
    NETIF_RINGS,
    Refusal,
    check_size,
    check_slot,
    fill_checksum,
    max_frame,
    parse_mac,
    parse_tx_packet,
    rx_flags_of,
)
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
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_more_data,
    NETTXF_extra_info,
    NETTXF_more_data,
    XEN_NETIF_CTRLF_GREF_readonly,
)
from xenlike.abi.ring import XEN_PAGE_SIZE
from xenlike.domain.grant_table import GrantCopy, GrantError, GrantRef, GrantStatusError, LocalFrame
from xenlike.ring import BackRing, RingOverflow
from xenlike.xenbus import (
    BackChannel,
    Backend,
    ChannelBroken,
    DeviceInfo,
    Drain,
    ProtocolError,
    RingGroup,
    XenbusContext,
)

__all__ = ["Bridge", "BridgePort", "Netback", "Vif"]

log = logging.getLogger("xenlike.netif.back")

# Frames from one port waiting for rx buffers before more are dropped: twice a tx
# ring, so that the drain after the one that filled half of it still fits.
RX_QUEUE_MAX = 512
# A vif whose frames fill half another's rx queue stops taking its guest's tx
# requests until it is a quarter full (its guest's sends then wait for ring space), for
# at most this long; then the receiver counts as stalled (frames to it are dropped
# and counted, no one waits) until it takes a frame again, as Linux netback turns
# a vif's carrier off after rx_stall_timeout. Bounded: a guest that posts no rx
# buffers cannot hold its senders for longer.
RX_HOLD_TIMEOUT = 0.5
Frame = tuple[bytes, int]  # a frame and its NETRXF_* checksum flags


class _Unread(NamedTuple):
    """A packet whose grants are not statically mapped: the drain's GNTTABOP_copy reads it."""

    frame: int  # its place among the drain's frames
    pieces: list[tuple[int, int, int]]  # (gref, offset, size) of each slot's data
    first_response: int  # its slots' responses: [first_response, first_response + slots)
    slots: int
    flags: int  # the NETRXF_* checksum flags it goes on with


class BridgePort(Protocol):
    """What a bridge needs of a port: where frames for it go. A port may also have
    `deliver_many(frames, source)` (a vif does), `deliver` of each frame in order in
    one call: the bridge then hands it each run of a drain's frames that goes its way."""

    @property
    def name(self) -> str: ...

    @property
    def mac(self) -> bytes | None:
        """The only source address it may send from (None: an uplink carrying many)."""

    def deliver(self, frame: bytes, flags: int, source: "BridgePort") -> None:
        """Queue one frame leaving the bridge through this port (it came in through
        `source`); never blocks."""


class Bridge(Protocol):
    """The driver domain's software switch (`domain.hardware.net.bridge(name)`)."""

    name: str

    def attach(self, port: BridgePort) -> None: ...

    def detach(self, port: BridgePort) -> None: ...

    def forward(self, port: BridgePort, frames: list[Frame]) -> None:
        """Switch frames that entered through `port`."""


class Netback(Backend):
    """The vif back end: features, the handshake's checks, and one `Vif` per connection."""

    device_type = "vif"
    rings = NETIF_RINGS

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        super().__init__(ctx, device)
        self.vif: Vif | None = None

    def features(self) -> dict[str, str | int]:
        return {"feature-sg": 1, "feature-rx-copy": 1, "feature-rx-flip": 0, "feature-ctrl-ring": 1}

    def properties(self) -> dict[str, str | int]:
        return {"hotplug-status": "connected"}  # what libxl waits for from vif-bridge

    async def connected(self) -> None:
        """Check what the front end asked for and plug the vif into its bridge."""
        if await self.read_int("request-rx-copy", 0) != 1:
            raise ProtocolError(
                "request-rx-copy is not 1: this back end only copies into "
                "posted rx buffers (page flipping is gone from Xen)"
            )
        if await self.read_int("feature-rx-notify", 0) != 1:
            raise ProtocolError(
                "feature-rx-notify is not 1: without it the back end is never "
                "told of new rx buffers"
            )
        try:
            mac = parse_mac(await self.read("mac"))
        except ValueError as exc:
            raise ProtocolError(f"{self.device.nodename}/mac: {exc}") from None
        bridge_name = await self.read("bridge", "xenbr0") or "xenbr0"
        network = self.ctx.domain.hardware.net
        if network is None:
            raise ProtocolError(
                f"d{self.ctx.domain.domid} has no network hardware (domain.hardware.net)"
            )
        try:
            bridge = network.bridge(bridge_name)
        except LookupError as exc:
            raise ProtocolError(str(exc)) from None
        handle = await self.read("handle", str(self.device.devid))
        self.vif = Vif(
            name=f"vif{self.device.otherend_id}.{handle}",
            mac=mac,
            mtu=await self.read_int("mtu", DEFAULT_MTU),
            sg=bool(await self.read_int("feature-sg", 0)),
            csum_offload=not await self.read_int("feature-no-csum-offload", 0),
            domain=self.ctx.domain,
            peer=self.device.otherend_id,
            bridge=bridge,
        )

    async def serve(self, channel: RingGroup) -> None:
        """The vif `connected` made, and its counters published in XenStore meanwhile."""
        vif = self.vif
        assert vif is not None, "connected() runs before the data path starts"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.publish_statistics, lambda: vif.stats)
            await vif.run(channel)  # ChannelBroken: the base class disconnects the device
            nursery.cancel_scope.cancel()

    async def disconnected(self) -> None:
        if self.vif is not None:
            vif, self.vif = self.vif, None
            await vif.close()


class _Kick:
    """Wakes one sleeping task; kicks while it is awake are not lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class _FairQueue:
    """Frames waiting for a guest's rx buffers: one bounded queue per port they came
    from, taken round-robin, so a flooding sender overflows only its own queue."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queues: dict[Any, deque[Frame]] = {}
        self._turns: deque[Any] = deque()  # the sources with frames, in turn order

    def __bool__(self) -> bool:
        return bool(self._turns)

    def put(self, source: Any, items: list[Frame]) -> int:
        """Queue `items` (not empty) behind `source`'s others, as many as its queue has
        room for; how many (the rest are dropped)."""
        queue = self._queues.get(source)
        if queue is None:
            queue = self._queues[source] = deque()
            self._turns.append(source)
        room = self.limit - len(queue)
        if room < len(items):
            items = items[:room]
        queue.extend(items)
        return len(items)

    def peek(self) -> Frame:
        return self._queues[self._turns[0]][0]

    def length(self, source: Any) -> int:
        queue = self._queues.get(source)
        return 0 if queue is None else len(queue)

    def pop(self) -> Frame:
        """The next source's oldest frame; that source then waits for its next turn."""
        source = self._turns.popleft()
        queue = self._queues[source]
        item = queue.popleft()
        if queue:
            self._turns.append(source)
        else:
            del self._queues[source]
        return item

    def clear(self) -> None:
        self._queues.clear()
        self._turns.clear()


class _Staging:
    """Dom0 pages a batched GNTTABOP_copy copies through, for grants not statically mapped."""

    def __init__(self, domain: Any, count: int) -> None:
        self._domain = domain
        self.first = domain.allocator.allocate_run(count)
        self.count = count
        self.view = domain.memory.frames(self.first, count)
        self._page = self._offset = 0
        self.busy = False  # a copy is in flight: the pages must not be reused yet

    def reset(self) -> None:
        self._page = self._offset = 0

    def take(self, length: int) -> tuple[int, int]:
        """Room for `length` bytes (at most a page) inside one page: (gfn, offset)."""
        if self._offset + length > XEN_PAGE_SIZE:
            self._page, self._offset = self._page + 1, 0
        if self._page >= self.count:
            raise OverflowError("staging pages exhausted")  # bounded by the ring: a bug
        where = (self.first + self._page, self._offset)
        self._offset += length
        return where

    def read(self, gfn: int, offset: int, length: int) -> bytes:
        start = (gfn - self.first) * XEN_PAGE_SIZE + offset
        return bytes(self.view[start : start + length])

    def write(self, gfn: int, offset: int, data: bytes) -> None:
        start = (gfn - self.first) * XEN_PAGE_SIZE + offset
        self.view[start : start + len(data)] = data

    def free(self) -> None:
        self.view.release()
        if self.busy:
            log.debug("a grant copy into staging pages was cut short; leaking them")
        else:
            self._domain.allocator.free_run(self.first, self.count)


class Vif:
    """One connected vif: the netback data path, and a port of its bridge."""

    def __init__(
        self,
        *,
        name: str,
        mac: bytes,
        mtu: int,
        sg: bool,
        csum_offload: bool,
        domain: Any,
        peer: int,
        bridge: Bridge,
    ) -> None:
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self._max_tx = max_frame(mtu)
        self._max_rx = self._max_tx if sg else min(self._max_tx, XEN_PAGE_SIZE)
        self._csum_offload = csum_offload
        self._domain = domain
        self._peer = peer
        self._bridge = bridge
        self._pages: dict[int, memoryview] = {}  # static grants: gref -> its mapped page
        self._writable: dict[int, memoryview] = {}  # the ones an rx copy may write to
        self._mappings: list[Any] = []
        self._tx_staging: _Staging | None = None
        self._rx_staging: _Staging | None = None
        self._rx_queue = _FairQueue(RX_QUEUE_MAX)
        self._rx_buffers: deque[tuple[int, int, int]] = deque()  # consumed rx requests
        self._rx_kick = _Kick()
        self._rx_drain = Drain()  # watched: the rx task takes buffers, and waits on it for more
        self._room: dict[Any, trio.Event] = {}  # vifs held until their queue has room
        self._stalled = False  # took no frame within RX_HOLD_TIMEOUT: nobody waits for it
        self._holders: set[Vif] = set()  # the vifs whose queues this one's frames filled
        self._closed = False
        self._warned: dict[str, float] = {}
        self.stats = {
            "tx_packets": 0,
            "tx_bytes": 0,
            "tx_errors": 0,
            "tx_dropped": 0,
            "rx_packets": 0,
            "rx_bytes": 0,
            "rx_errors": 0,
            "rx_dropped": 0,
        }

    def __repr__(self) -> str:
        return f"<Vif {self.name} {self.mac.hex(':')}>"

    # --- the bridge's side ----------------------------------------------------

    def deliver(self, frame: bytes, flags: int, source: BridgePort) -> None:
        """A frame for the guest: queued for its rx buffers, or dropped when it cannot fit."""
        self.deliver_many([(frame, flags)], source)

    def deliver_many(self, frames: list[Frame], source: BridgePort) -> None:
        """Frames for the guest, in order: queued for its rx buffers, or dropped (and
        counted) when they cannot fit. One call per run of a drain's frames, not one
        per frame: the queue, the kick and the push-back check are paid once."""
        if self._closed:
            self.stats["rx_dropped"] += len(frames)
            return
        accepted = self._fit(frames)
        queue = self._rx_queue
        taken = queue.put(source, accepted) if accepted else 0
        self.stats["rx_dropped"] += len(frames) - taken
        if taken:
            self._rx_kick.set()
            if not self._stalled and queue.length(source) >= queue.limit // 2:
                hold = getattr(source, "hold", None)  # a vif: push back on its guest
                if hold is not None:
                    hold(self)

    def _fit(self, frames: list[Frame]) -> list[Frame]:
        """The frames this guest can take: none longer than its rx buffers allow, and
        the checksums it left to offload filled in when it does not take offload."""
        limit, offload = self._max_rx, self._csum_offload
        fitting = []
        for frame, flags in frames:
            if len(frame) > limit:
                continue
            if flags & NETRXF_csum_blank and not offload:
                completed = fill_checksum(frame)
                if completed is None:
                    continue
                frame, flags = completed, NETRXF_data_validated
            fitting.append((frame, flags))
        return fitting

    def hold(self, destination: "Vif") -> None:
        """This vif's frames filled `destination`'s queue: take no more tx requests
        until it has room (see RX_HOLD_TIMEOUT)."""
        self._holders.add(destination)

    async def room_for(self, source: Any) -> None:
        """Until `source`'s queue here is at most a quarter full (or this vif closes)."""
        if self._closed or self._rx_queue.length(source) <= self._rx_queue.limit // 4:
            return
        event = self._room.get(source)
        if event is None:
            event = self._room[source] = trio.Event()
        await event.wait()

    def stall(self) -> None:
        if not self._stalled:
            self._stalled = True
            self._warn("stalled", f"no frame taken for {RX_HOLD_TIMEOUT} s; dropping, not waiting")

    def _wake_held(self) -> None:
        """Frames were taken: release the vifs held for room."""
        self._stalled = False
        quarter = self._rx_queue.limit // 4
        for source, event in list(self._room.items()):
            if self._rx_queue.length(source) <= quarter:
                del self._room[source]
                event.set()

    # --- running ---------------------------------------------------------------

    async def run(self, group: RingGroup) -> None:
        """The data path until cancelled; a malicious front end raises ChannelBroken.

        The framework's loop serves the rings (tx and rx on one port, ctrl on
        its own): tx requests are transmitted; the rx ring is only watched
        (a `Drain` without a handler): the rx task takes buffers from it as
        frames from the bridge need them, and the ring's event index is armed
        only while frames wait for buffers (`Drain.wait`).
        """
        self._tx = cast(BackRing, group.rings["tx"])
        self._rx = cast(BackRing, group.rings["rx"])
        self._port = group.ports["tx"]
        self._rx_drain.bind(self._rx)
        handlers: dict[str, Any] = {"tx": self._on_tx, "rx": self._rx_drain}
        if "ctrl" in group.rings:
            handlers["ctrl"] = functools.partial(self._on_ctrl, group.back_channel("ctrl"))
        broken: list[ChannelBroken] = []

        async def guarded(loop: Callable[..., Any], *args: Any) -> None:
            try:
                await loop(*args)
            except* (ChannelBroken, RingOverflow) as errors:
                exc: BaseException = errors
                while isinstance(exc, BaseExceptionGroup):  # one port's loop of several
                    exc = exc.exceptions[0]
                broken.append(ChannelBroken(str(exc)))
                nursery.cancel_scope.cancel()

        self._bridge.attach(self)
        log.info(
            "%s: connected to %s (%s, mtu %d)",
            self.name,
            self._bridge.name,
            self.mac.hex(":"),
            self.mtu,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, self._rx_loop)
                nursery.start_soon(guarded, group.serve, handlers)
        finally:
            self._bridge.detach(self)
        if broken:
            raise broken[0]

    async def close(self) -> None:
        """Let go of the static grants and staging pages (the rings are already gone)."""
        self._closed = True
        self._rx_queue.clear()
        self._wake_held()
        for view in self._pages.values():
            view.release()
        self._pages.clear()
        self._writable.clear()
        mappings, self._mappings = self._mappings, []
        for mapping in mappings:
            await self._domain.grants.unmap(mapping)
        for staging in (self._tx_staging, self._rx_staging):
            if staging is not None:
                staging.free()
        self._tx_staging = self._rx_staging = None
        log.info(
            "%s: disconnected; %s",
            self.name,
            ", ".join(f"{key} {value}" for key, value in self.stats.items()),
        )

    def _warn(self, what: str, detail: str) -> None:
        """Log a dropped or refused packet, at most once a second per kind."""
        now = time.monotonic()
        if now - self._warned.get(what, -math.inf) >= 1.0:
            self._warned[what] = now
            log.warning("%s: %s: %s", self.name, what, detail)

    # --- tx: guest -> bridge ---------------------------------------------------------

    async def _on_tx(self, requests: list[Any]) -> None:
        await self._transmit(requests)
        if self._holders:
            await self._wait_for_room()
        await trio.lowlevel.checkpoint()  # the other vifs' turn

    async def _wait_for_room(self) -> None:
        """Push back: the tx ring is not drained while a receiver's queue is full of
        this vif's frames, so the guest's sends wait for ring space (netfront's tx
        flow control) instead of being dropped — for RX_HOLD_TIMEOUT at most."""
        holders, self._holders = self._holders, set()
        for destination in holders:
            with trio.move_on_after(RX_HOLD_TIMEOUT) as waited:
                await destination.room_for(self)
            if waited.cancelled_caught:
                destination.stall()

    async def _transmit(self, requests: list[Any]) -> None:
        """One drain: parse, read, answer every slot, then switch the good frames."""
        pages = self._pages
        responses: list[tuple[int, int]] = []
        frames: list[Frame | None] = []
        unread: list[_Unread] = []
        index, count = 0, len(requests)
        max_tx, mtu = self._max_tx, self.mtu
        while index < count:
            gref, offset, flags, rid, size = requests[index]
            if flags & (NETTXF_more_data | NETTXF_extra_info):
                index = self._parse_packet(requests, index, responses, frames, unread)
                continue
            index += 1
            check_slot(rid, offset, size)
            refusal = check_size(size, max_tx, mtu)
            status = NETIF_RSP_OKAY if refusal is None else self._refuse(refusal)
            if status == NETIF_RSP_OKAY:
                page = pages.get(gref)
                if page is None:
                    unread.append(
                        _Unread(
                            len(frames),
                            [(gref, offset, size)],
                            len(responses),
                            1,
                            rx_flags_of(flags),
                        )
                    )
                    frames.append(None)
                else:
                    frames.append((page[offset : offset + size].tobytes(), rx_flags_of(flags)))
            responses.append((rid, status))
        if unread:
            await self._copy_in(unread, responses, frames)
        self._tx.put_responses(responses)
        if self._tx.push_responses():
            self._port.notify()
        good = [frame for frame in frames if frame is not None]
        stats = self.stats
        stats["tx_packets"] += len(good)
        stats["tx_bytes"] += sum(len(frame) for frame, _ in good)
        if good:
            self._bridge.forward(self, good)

    def _refuse(self, refusal: Refusal) -> int:
        """Count and log a refused packet; its status."""
        self.stats[refusal.counter] += 1
        self._warn(refusal.what, f"{refusal.size} bytes")
        return NETIF_RSP_ERROR if refusal.counter == "tx_errors" else NETIF_RSP_DROPPED

    def _parse_packet(
        self,
        requests: list[Any],
        index: int,
        responses: list[tuple[int, int]],
        frames: list[Frame | None],
        unread: list[_Unread],
    ) -> int:
        """A packet with extra-info slots or fragments; returns the index after it."""
        packet = parse_tx_packet(requests, index, self._max_tx, self.mtu)
        rid, flags = requests[index][3], requests[index][2]
        status = NETIF_RSP_OKAY if packet.refusal is None else self._refuse(packet.refusal)
        first_response = len(responses)
        responses.append((rid, status))
        responses.extend((0, NETIF_RSP_NULL) for _ in range(packet.extras))
        responses.extend((fid, status) for fid in packet.fragment_ids)
        if status != NETIF_RSP_OKAY:
            return packet.after
        pieces = packet.pieces
        if all(piece[0] in self._pages for piece in pieces):
            data = b"".join(bytes(self._pages[g][o : o + s]) for g, o, s in pieces)
            frames.append((data, rx_flags_of(flags)))
        else:
            unread.append(
                _Unread(
                    len(frames),
                    pieces,
                    first_response,
                    len(responses) - first_response,
                    rx_flags_of(flags),
                )
            )
            frames.append(None)
        return packet.after

    async def _copy_in(
        self, unread: list[_Unread], responses: list[tuple[int, int]], frames: list[Frame | None]
    ) -> None:
        """Read the packets whose grants are not mapped: one GNTTABOP_copy for the drain.

        A grant the hypervisor refuses fails its packet (NETIF_RSP_ERROR), no other.
        """
        if self._tx_staging is None:
            self._tx_staging = _Staging(self._domain, self._tx.nr_ents)
        staging = self._tx_staging
        staging.reset()
        ops: list[GrantCopy] = []
        owner: list[int] = []
        spots: list[list[tuple[int, int, int]]] = []
        for number, packet in enumerate(unread):
            placed = []
            for gref, offset, size in packet.pieces:
                gfn, at = staging.take(size)
                ops.append(GrantCopy(GrantRef(self._peer, gref, offset), LocalFrame(gfn, at), size))
                owner.append(number)
                placed.append((gfn, at, size))
            spots.append(placed)
        failed: set[int] = set()
        staging.busy = True
        try:
            await self._domain.grants.copy(ops)
        except GrantStatusError as exc:
            failed = {owner[i] for i, status in enumerate(exc.statuses) if status}
            self._warn("grant copy refused", str(exc))
        staging.busy = False
        for number, packet in enumerate(unread):
            if number in failed:
                self.stats["tx_errors"] += 1
                for slot in range(packet.first_response, packet.first_response + packet.slots):
                    rid, status = responses[slot]
                    if status != NETIF_RSP_NULL:
                        responses[slot] = (rid, NETIF_RSP_ERROR)
                continue
            data = b"".join(staging.read(*spot) for spot in spots[number])
            frames[packet.frame] = (data, packet.flags)

    # --- rx: bridge -> guest ------------------------------------------------------------

    async def _rx_loop(self) -> None:
        while True:
            await self._rx_kick.wait()
            await self._receive()

    async def _receive(self) -> None:
        """Copy queued frames into posted buffers until either runs out."""
        rx, queue, buffers = self._rx, self._rx_queue, self._rx_buffers
        while queue:
            buffers.extend(rx.get_requests())
            if len(buffers) < -(-len(queue.peek()[0]) // XEN_PAGE_SIZE):
                await self._rx_drain.wait()  # req_event armed: the front end notifies
                continue
            responses: list[tuple[int, int, int, int]] = []
            copies: list[tuple[int, int, bytes]] = []  # response index, gref, data
            writable = self._writable
            while queue and buffers:
                frame, flags = queue.peek()
                length = len(frame)
                if length <= XEN_PAGE_SIZE:
                    queue.pop()
                    rid, _, gref = buffers.popleft()
                    page = writable.get(gref)
                    if page is None:
                        copies.append((len(responses), gref, frame))
                    else:
                        page[:length] = frame
                    responses.append((rid, 0, flags, length))
                    continue
                slots = -(-length // XEN_PAGE_SIZE)
                if slots > len(buffers):
                    break
                queue.pop()
                for start in range(0, length, XEN_PAGE_SIZE):
                    chunk = frame[start : start + XEN_PAGE_SIZE]
                    rid, _, gref = buffers.popleft()
                    page = writable.get(gref)
                    if page is None:
                        copies.append((len(responses), gref, chunk))
                    else:
                        page[: len(chunk)] = chunk
                    more = NETRXF_more_data if start + XEN_PAGE_SIZE < length else 0
                    responses.append((rid, 0, (flags if start == 0 else 0) | more, len(chunk)))
            if copies:
                await self._copy_out(copies, responses)
            self._count_received(responses)
            rx.put_responses(responses)
            if rx.push_responses():
                self._port.notify()
            if responses:
                self._wake_held()
            await trio.lowlevel.checkpoint()

    def _count_received(self, responses: list[tuple[int, int, int, int]]) -> None:
        """rx_packets and rx_bytes of what reached the guest: a packet with a slot whose
        copy was refused (already an rx_error) counts for neither."""
        packets = received = pending = 0
        failed = False
        for _, _, flags, size in responses:
            if size < 0:
                failed = True
            else:
                pending += size
            if not flags & NETRXF_more_data:  # the packet's last slot
                if not failed:
                    packets += 1
                    received += pending
                pending, failed = 0, False
        self.stats["rx_packets"] += packets
        self.stats["rx_bytes"] += received

    async def _copy_out(
        self, copies: list[tuple[int, int, bytes]], responses: list[tuple[int, int, int, int]]
    ) -> None:
        """Copy into buffers that are not statically mapped: one GNTTABOP_copy."""
        if self._rx_staging is None:
            self._rx_staging = _Staging(self._domain, self._rx.nr_ents)
        staging = self._rx_staging
        staging.reset()
        ops = []
        for _, gref, data in copies:
            gfn, at = staging.take(len(data))
            staging.write(gfn, at, data)
            ops.append(GrantCopy(LocalFrame(gfn, at), GrantRef(self._peer, gref, 0), len(data)))
        staging.busy = True
        try:
            await self._domain.grants.copy(ops)
        except GrantStatusError as exc:
            self._warn("grant copy into rx buffers refused", str(exc))
            for number, status in enumerate(exc.statuses):
                if status:
                    index = copies[number][0]
                    rid, offset, flags, _ = responses[index]
                    responses[index] = (rid, offset, flags, NETIF_RSP_ERROR)
                    self.stats["rx_errors"] += 1
        staging.busy = False

    # --- ctrl: static grants -------------------------------------------------------------------

    async def _on_ctrl(self, channel: BackChannel, requests: list[Any]) -> None:
        channel.respond_many([await self._control(request) for request in requests])

    async def _control(self, request: Any) -> tuple[int, int, int, int]:
        rid, kind, data = request
        if kind == XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE:
            if data[0] != 0:
                return rid, kind, XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER, 0
            return rid, kind, XEN_NETIF_CTRL_STATUS_SUCCESS, MAX_STATIC_GRANTS
        if kind == XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING:
            queue, list_ref, entries = data
            if (
                queue != 0
                or not 0 < entries <= GREFS_PER_PAGE
                or len(self._pages) + entries > MAX_STATIC_GRANTS
            ):
                return rid, kind, XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER, 0
            try:
                await self._add_static_grants(list_ref, entries)
            except (GrantError, ValueError) as exc:
                self._warn("ADD_GREF_MAPPING refused", str(exc))
                return rid, kind, XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER, 0
            return rid, kind, XEN_NETIF_CTRL_STATUS_SUCCESS, 0
        return rid, kind, XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED, 0

    async def _add_static_grants(self, list_ref: int, entries: int) -> None:
        """Map every grant of the front end's list page; all of them, or none."""
        grants = self._domain.grants
        listing = await grants.map(self._peer, [list_ref], readonly=True)
        try:
            page = listing.page(0)
            table = [GREF.unpack_from(page, i * GREF.size) for i in range(entries)]
            page.release()
        finally:
            await grants.unmap(listing)
        refs = [entry.ref for entry in table]
        if len(set(refs)) != len(refs) or any(ref in self._pages for ref in refs):
            raise ValueError("the list repeats a grant, or names one already mapped")
        readonly = [e.ref for e in table if e.flags & XEN_NETIF_CTRLF_GREF_readonly]
        writable = [e.ref for e in table if not e.flags & XEN_NETIF_CTRLF_GREF_readonly]
        mapped: list[Any] = []
        try:
            for group, is_readonly in ((readonly, True), (writable, False)):
                if group:
                    mapped.append(await grants.map(self._peer, group, readonly=is_readonly))
        except BaseException:
            for mapping in mapped:
                await grants.unmap(mapping)
            raise
        if self._closed:  # the vif went away while the grants were being mapped
            for mapping in mapped:
                await grants.unmap(mapping)
            return
        for mapping in mapped:
            for i, ref in enumerate(mapping.refs):
                self._pages[ref] = mapping.page(i)
                if not mapping.readonly:
                    self._writable[ref] = self._pages[ref]
        self._mappings.extend(mapped)
        log.info("%s: %d static grants mapped", self.name, len(refs))
