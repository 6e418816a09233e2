"""`Frontend` and `Backend`: the XenBus handshake done for a driver.

A PV driver is a pair of subclasses. The base classes run Xen's handshake
(`xenlike.xenbus.state`) over XenStore, publish and read features, grant or
map the ring pages (one, or 2^ring-page-order with `ring-ref0..N`), allocate
or bind the event channel, and hand the driver a ring channel once both
ends are Connected. A driver author writes the protocol only::

    class EchoBackend(Backend):
        device_type = "echo"
        ring = ECHO_RING

        async def handle(self, request):
            return ECHO_RING.response.record(id=request.id, value=request.value)

    class EchoFrontend(Frontend):
        device_type = "echo"
        ring = ECHO_RING

        async def echo(self, value):
            return (await self.call(ECHO_RING.request.record(value=value))).value

Keys and paths are Xen's: the front end lives at `device/<type>/<devid>`
in the guest's tree, the back end at `backend/<type>/<domid>/<devid>` in the
driver domain's, each with `state`, and cross links `backend` /
`backend-id` and `frontend` / `frontend-id`; the front end writes
`ring-ref` (or `ring-ref0..N` and `ring-page-order`), `event-channel` and
`protocol`; the back end offers `max-ring-page-order`.

Reconnection: when either end goes away and comes back, the pair passes
through Closing and Closed and connects again; requests that were in flight
are resubmitted on the new ring (their callers keep waiting), never lost.
"""

import logging
from typing import Any, ClassVar

import attrs
import trio

from xenlike.abi.xen import XEN_IO_PROTO_ABI_NATIVE
from xenlike.domain.grant_table import GrantInUse
from xenlike.abi.xenbus import XenbusState
from xenlike.ring import MAX_RING_PAGE_ORDER, BackRing, FrontRing, RingSpec
from xenlike.xenbus.channel import BackChannel, ChannelBroken, Disconnected, FrontChannel, fail_orphans
from xenlike.xenbus.state import Action, Handshake, Role
from xenlike.xenstore import XenStoreError

__all__ = ["Backend", "DeviceInfo", "Frontend", "XenbusContext", "XenbusDriver"]

log = logging.getLogger("xenlike.xenbus")


@attrs.frozen
class DeviceInfo:
    """One end of a device, as Linux's xenbus_device and Mini-OS's records say it."""

    type: str
    devid: int
    nodename: str  # this end's directory
    otherend: str  # the peer's directory
    otherend_id: int  # the peer's domid


@attrs.define(eq=False)
class XenbusContext:
    """What a driver needs from its domain: ports, grants, memory, and XenStore."""

    domain: Any  # xenlike.domain.Domain
    xs: Any  # xenlike.xenstore.Client
    nursery: trio.Nursery


class XenbusDriver:
    """What both ends share: the handshake loop and XenStore helpers."""

    device_type: ClassVar[str]
    ring: ClassVar[RingSpec | None] = None
    role: ClassVar[Role]

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        self.ctx = ctx
        self.device = device
        self.handshake = Handshake(self.role)
        self.connected_event = trio.Event()
        self.log = logging.getLogger(f"xenlike.xenbus.{self.device_type}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device.nodename}>"

    # --- XenStore helpers ---------------------------------------------------

    async def read(self, key: str, default: str | None = None) -> str | None:
        """A key of this end's directory."""
        return await self._read(f"{self.device.nodename}/{key}", default)

    async def read_otherend(self, key: str, default: str | None = None) -> str | None:
        """A key of the peer's directory (features, properties, ring refs)."""
        return await self._read(f"{self.device.otherend}/{key}", default)

    async def _read(self, path: str, default: str | None) -> str | None:
        try:
            return (await self.ctx.xs.read(path)).decode()
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return default
            raise

    async def read_int(self, key: str, default: int, *, otherend: bool = True) -> int:
        text = await (self.read_otherend(key) if otherend else self.read(key))
        try:
            return int(text) if text is not None else default
        except ValueError:
            raise ProtocolError(f"{key} = {text!r} is not a number") from None

    async def publish(self, values: dict[str, str | int]) -> None:
        """Write keys of this end's directory in one transaction."""
        async def write_all(tx: Any) -> None:
            for key, value in values.items():
                await tx.write(f"{self.device.nodename}/{key}", str(value))

        if values:
            await self.ctx.xs.transact(write_all)

    async def switch_state(self, state: XenbusState) -> None:
        """xenbus_switch_state: record and publish this end's new state."""
        self.handshake.advance(state)
        await self.ctx.xs.write(f"{self.device.nodename}/state", str(int(state)))
        if state == XenbusState.Connected:
            self.connected_event.set()

    # --- the handshake loop -------------------------------------------------

    async def run(self) -> None:
        """Follow the peer's state until cancelled, acting as the handshake table says."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with self.ctx.xs.watch(f"{self.device.otherend}/state") as events:
                async for _ in events:
                    peer = await self.read_otherend("state", "0")
                    try:
                        peer_state = int(peer or 0)
                    except ValueError:
                        peer_state = XenbusState.Unknown
                    reaction = self.handshake.peer_changed(peer_state)
                    await self._react(reaction)

    async def _react(self, reaction: Any) -> None:
        while True:
            if reaction.action is None:
                if not await self._after_closed():
                    return
                reaction = self.handshake.start()
                continue
            try:
                await self._perform(reaction.action)
            except (ProtocolError, ChannelBroken, XenStoreError, OSError) as exc:
                await self.fatal(f"{reaction.action.value} failed: {exc}")
                return
            if reaction.next_state is not None:
                await self.switch_state(reaction.next_state)
            reaction = self.handshake.start()

    async def _after_closed(self) -> bool:
        """A hook for an end that starts over once Closed; True if it moved."""
        return False

    async def fatal(self, message: str) -> None:
        """xenbus_dev_fatal: say what went wrong in XenStore and head for Closing."""
        self.log.error("%s: %s", self.device.nodename, message)
        try:
            await self.ctx.xs.write(f"{self.device.nodename}/error", message)
            await self.disconnect()
            state = self.handshake.fail()
            await self.ctx.xs.write(f"{self.device.nodename}/state", str(int(state)))
        except XenStoreError:
            pass

    async def _perform(self, action: Action) -> None:
        raise NotImplementedError

    async def disconnect(self) -> None:
        """Stop the data path and release ring pages and port (both ends)."""


class ProtocolError(Exception):
    """The peer published something the protocol does not allow."""


class Backend(XenbusDriver):
    """The back end of a device type, in the driver domain (Dom0).

    Override `handle` (one request → its response) or `serve` (the whole
    loop), and optionally `features`, `properties`, `connected`,
    `disconnected`. `max_ring_page_order` caps multi-page rings.
    """

    role = Role.backend
    max_ring_page_order: ClassVar[int] = 0
    concurrent: ClassVar[bool] = False  # handle requests of a batch concurrently

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        super().__init__(ctx, device)
        self.channel: BackChannel | None = None
        self._mapping: Any = None
        self._port: Any = None
        self._serving: trio.CancelScope | None = None

    def features(self) -> dict[str, str | int]:
        """Keys published before InitWait (feature-*, limits)."""
        return {}

    def properties(self) -> dict[str, str | int]:
        """Keys published just before Connected (sizes, modes)."""
        return {}

    async def connected(self) -> None:
        """The ring is mapped and the port bound; called before Connected is published."""

    async def disconnected(self) -> None:
        """The data path has stopped."""

    async def handle(self, request: Any) -> Any:
        """Answer one request (the default `serve` calls this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle() or serve()")

    async def serve(self, channel: BackChannel) -> None:
        """Answer requests until cancelled: each batch handled, then answered at once."""
        async for batch in channel.batches_of_requests():
            if self.concurrent:
                responses: list[Any] = [None] * len(batch)

                async def one(index: int, request: Any) -> None:
                    responses[index] = await self.handle(request)

                async with trio.open_nursery() as nursery:
                    for index, request in enumerate(batch):
                        nursery.start_soon(one, index, request)
            else:
                responses = [await self.handle(request) for request in batch]
            channel.respond_many(responses)

    async def _perform(self, action: Action) -> None:
        if action is Action.publish_features:
            features = dict(self.features())
            if self.max_ring_page_order:
                features["max-ring-page-order"] = self.max_ring_page_order
            await self.publish(features)
        elif action is Action.connect:
            await self._connect()
        elif action is Action.disconnect:
            await self.disconnect()

    async def _connect(self) -> None:
        if self.ring is None:
            await self.connected()
            await self.publish(self.properties())
            return
        order = await self.read_int("ring-page-order", 0)
        if not 0 <= order <= min(self.max_ring_page_order, MAX_RING_PAGE_ORDER):
            raise ProtocolError(f"ring-page-order {order} over max-ring-page-order "
                                f"{self.max_ring_page_order}")
        if order == 0:
            refs = [await self.read_int("ring-ref", -1)]
        else:
            refs = [await self.read_int(f"ring-ref{i}", -1) for i in range(1 << order)]
        if any(ref < 0 for ref in refs):
            raise ProtocolError("the front end published no ring-ref")
        protocol = await self.read_otherend("protocol", XEN_IO_PROTO_ABI_NATIVE)
        if protocol != XEN_IO_PROTO_ABI_NATIVE:
            raise ProtocolError(f"protocol {protocol!r}: only {XEN_IO_PROTO_ABI_NATIVE} is spoken")
        evtchn = await self.read_int("event-channel", -1)
        domain = self.ctx.domain
        self._mapping = await domain.grants.map(self.device.otherend_id, refs)
        self._port = await domain.evtchn.bind_interdomain(self.device.otherend_id, evtchn)
        self.channel = BackChannel(BackRing(self.ring, self._mapping.view), self._port)
        await self.connected()
        await self.publish(self.properties())
        self._nursery.start_soon(self._serve_until_stopped, self.channel)

    async def _serve_until_stopped(self, channel: BackChannel) -> None:
        with trio.CancelScope() as scope:
            self._serving = scope
            try:
                await self.serve(channel)
            except ChannelBroken as exc:
                await self.fatal(f"ring protocol violation: {exc}")

    async def disconnect(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
        if self.channel is not None:
            self.channel.ring.release()
            self.channel = None
        if self._port is not None:
            port, self._port = self._port, None
            try:
                await port.close()
            except Exception as exc:  # the peer may be gone already
                self.log.debug("closing port: %s", exc)
        if self._mapping is not None:
            mapping, self._mapping = self._mapping, None
            await self.ctx.domain.grants.unmap(mapping)
        await self.disconnected()


class Frontend(XenbusDriver):
    """The front end of a device type, in the guest.

    Call `self.call(request)` (or `call_many`) from the driver's own API; the
    channel matches responses by id. Override `front_keys` to publish the
    front end's own features, and `connected` to read the back end's
    properties. `ring_page_order` asks for a multi-page ring (granted if the
    back end offers it). `resubmit` keeps requests across reconnection.
    """

    role = Role.frontend
    ring_page_order: ClassVar[int] = 0
    resubmit: ClassVar[bool] = True

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        super().__init__(ctx, device)
        self.channel: FrontChannel | None = None
        self._pages: tuple[int, int] | None = None  # first gfn, count
        self._refs: list[int] = []
        self._port: Any = None
        self._orphans: list[Any] = []
        self._collector: trio.CancelScope | None = None
        self._ready = trio.Event()
        self._restart = False

    def front_keys(self) -> dict[str, str | int]:
        """Keys published with the ring refs (the front end's own features)."""
        return {}

    async def connected(self) -> None:
        """The back end is Connected: read its properties here."""

    @property
    def connected_now(self) -> bool:
        """Whether the data path is up at this moment."""
        return self._ready.is_set() and self.channel is not None

    async def wait_connected(self) -> None:
        await self._channel()

    async def _channel(self) -> FrontChannel:
        """The current channel, once the device is connected (again)."""
        while True:
            ready = self._ready
            await ready.wait()
            if ready is self._ready and self.channel is not None:
                return self.channel

    async def call(self, request: Any) -> Any:
        """One request, one response; waits for the device to be connected."""
        (response,) = await self.call_many([request])
        return response

    async def call_many(self, requests: list[Any]) -> list[Any]:
        """Requests in one push; across a reconnect they are resubmitted (`resubmit`)."""
        while True:
            channel = await self._channel()
            try:
                return await channel.call_many(requests)
            except Disconnected:
                if not self.resubmit:
                    raise

    async def reconnect(self) -> None:
        """Close and connect again, as a reloaded front end does; requests in
        flight are resubmitted on the new ring (with `resubmit`)."""
        self._restart = True
        await self.switch_state(XenbusState.Closing)

    async def _after_closed(self) -> bool:
        """Start over once both ends are Closed (the back end has let go of everything)."""
        if self._restart and self.handshake.state == XenbusState.Closed and \
                self.handshake.peer_state == XenbusState.Closed:
            self._restart = False
            await self.switch_state(XenbusState.Initialising)
            return True
        return False

    async def _perform(self, action: Action) -> None:
        if action is Action.setup:
            await self._setup()
        elif action is Action.connected:
            await self.connected()
            self._ready.set()
            if self._orphans and self.channel is not None:
                orphans, self._orphans = self._orphans, []
                await self.channel.adopt(orphans)
        elif action is Action.disconnect:
            await self.disconnect()

    async def _setup(self) -> None:
        if self.ring is None:
            await self.publish(self.front_keys())
            return
        domain = self.ctx.domain
        offered = await self.read_int("max-ring-page-order", 0)
        order = min(self.ring_page_order, offered, MAX_RING_PAGE_ORDER)
        count = 1 << order
        first = domain.allocator.allocate_run(count)
        self._pages = (first, count)
        view = domain.memory.frames(first, count)
        view[:] = bytes(len(view))
        self._refs = [domain.grants.grant_access(self.device.otherend_id, first + i)
                      for i in range(count)]
        self._port = await domain.evtchn.alloc_unbound(self.device.otherend_id)
        self.channel = FrontChannel(FrontRing(self.ring, view), self._port)
        keys: dict[str, str | int] = {"event-channel": self._port.number,
                                      "protocol": XEN_IO_PROTO_ABI_NATIVE}
        if order == 0:
            keys["ring-ref"] = self._refs[0]
        else:
            keys["ring-page-order"] = order
            keys.update({f"ring-ref{i}": ref for i, ref in enumerate(self._refs)})
        keys.update(self.front_keys())
        await self.publish(keys)
        self._nursery.start_soon(self._collect, self.channel)

    async def _collect(self, channel: FrontChannel) -> None:
        with trio.CancelScope() as scope:
            self._collector = scope
            try:
                await channel.run()
            except ChannelBroken as exc:
                await self.fatal(f"ring protocol violation: {exc}")

    async def disconnect(self) -> None:
        if self._ready.is_set():  # callers already waiting for a reconnect keep their event
            self._ready = trio.Event()
        if self._collector is not None:
            self._collector.cancel()
            self._collector = None
        if self.channel is not None:
            orphans = self.channel.fail(Disconnected(f"{self.device.nodename} disconnected"))
            if self.resubmit:
                self._orphans.extend(orphans)
            else:
                fail_orphans(orphans, Disconnected(f"{self.device.nodename} disconnected"))
            self.channel.ring.release()
            self.channel = None
        if self._port is not None:
            port, self._port = self._port, None
            try:
                await port.close()
            except Exception as exc:
                self.log.debug("closing port: %s", exc)
        await self._release_pages()

    async def _release_pages(self) -> None:
        """End access to the ring pages; pages the back end still maps are kept, not reused."""
        if self._pages is None:
            return
        first, count = self._pages
        domain = self.ctx.domain
        still_mapped = list(self._refs)
        for _ in range(50):
            self._refs, still_mapped = still_mapped, []
            for ref in self._refs:
                try:
                    domain.grants.end_access(ref)
                except GrantInUse:
                    still_mapped.append(ref)
            if not still_mapped:
                break
            await trio.sleep(0.02)
        if still_mapped:
            self.log.warning("%s: back end still maps refs %s; leaking their pages",
                             self.device.nodename, still_mapped)
        else:
            domain.allocator.free_run(first, count)
        self._pages = None
        self._refs = []
