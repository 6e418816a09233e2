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

A driver with several rings names them in `rings` instead (netif: `tx-ring-ref`
and `rx-ring-ref` on one `event-channel`, an optional ctrl ring on its own
`event-channel-ctrl`); the base classes grant or map every ring the same
way, keep them in a `RingGroup` (`self.group`), and serve it with the
handlers `ring_handlers` names: what to do with each ring's batch, as
`handle` says what to do with one request.

Reconnection: when either end goes away and comes back, the pair passes
through Closing and Closed and connects again; requests that were in flight
are resubmitted on the new ring (their callers keep waiting), never lost.

Failure: an exception escaping a driver's code (`handle`, `serve`,
`connected`, `features`, `properties`, statistics, work started with
`start_background`) fails that device alone, as xenbus_dev_fatal does: the
traceback goes to the domain's log, one line to the hypervisor log
(`xenlike dmesg`), "errno message" to `error/<device path>/error` in the
domain's tree, and the device heads for Closing. A front end's callers then
get `DeviceFailed`. The domain and its other devices run on.

Removal (hot unplug): the toolstack closes the device (the back end's state
to Closing, as libxl does), the two ends close it between them, then the
toolstack removes both directories and the bus stops the driver
(`XenbusDriver.remove`). A front end's callers, and requests kept for a
resubmission that will never come, then get `DeviceRemoved` (an OSError,
ENODEV). Pages a peer still maps when a front end ends its grants are
released once it lets go (Linux's deferred gnttab_end_foreign_access).
"""

import errno
import logging
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import attrs
import trio

from xenlike.abi.ring import XEN_PAGE_SIZE
from xenlike.abi.xen import XEN_IO_PROTO_ABI_NATIVE
from xenlike.abi.xenbus import XenbusState
from xenlike.domain.grant_table import GrantError, GrantInUse
from xenlike.hypercall import HypercallError
from xenlike.ring import MAX_RING_PAGE_ORDER, BackRing, FrontRing, RingOverflow, RingSpec
from xenlike.trace.events import DeviceTrace
from xenlike.xenbus.channel import (
    BackChannel,
    ChannelBroken,
    Disconnected,
    Drain,
    FrontChannel,
    Handler,
    RingGroup,
    fail_orphans,
)
from xenlike.xenbus.state import Action, Handshake, Role
from xenlike.xenstore import Client, XenStoreError

__all__ = [
    "Backend",
    "DeviceFailed",
    "DeviceInfo",
    "DeviceRemoved",
    "Frontend",
    "SharedRing",
    "XenbusContext",
    "XenbusDriver",
    "error_node",
]

log = logging.getLogger("xenlike.xenbus")
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1  # grant_ref_t, evtchn_port_t
STATISTICS_INTERVAL = 1.0  # seconds between updates of a back end's statistics/ in XenStore
RELEASE_TIMEOUT = 10.0  # seconds a peer may keep mapping pages whose grants were ended
SUSPEND_DRAIN = 5.0  # seconds a suspending front end gives its requests in flight
SUSPEND_POLL = 0.01  # seconds between looks at what is still in flight


class DeviceFailed(Disconnected):
    """This device has failed (its driver raised, or the peer broke the protocol);
    the message is what its error node says. Other devices are not affected."""


class DeviceRemoved(DeviceFailed, OSError):
    """The toolstack removed this device (hot unplug): ENODEV, as Linux fails the
    requests of a disk or interface that has gone."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENODEV, message)

    def __str__(self) -> str:
        return str(self.strerror)


def error_node(nodename: str) -> str:
    """Where xenbus_dev_fatal reports a device's failure: `error/<nodename>/error`
    in the domain's own tree (a nodename outside /local/domain stays relative)."""
    parts = nodename.split("/")
    if nodename.startswith("/local/domain/") and len(parts) > 4:
        home, relative = "/".join(parts[:4]), "/".join(parts[4:])
        return f"{home}/error/{relative}/error"
    return f"error/{nodename}/error"


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
    xs: Client
    nursery: trio.Nursery


@attrs.frozen
class SharedRing:
    """One ring of a device: its layout, and the keys of its grant refs and port.

    Rings naming the same `port_key` share one event channel. A ring with a
    `feature` is optional: the front end sets it up only when the back end
    offers that feature, and the back end maps it only when the front end
    published its ref (netif's ctrl ring and `feature-ctrl-ring`).
    """

    spec: RingSpec
    ref_key: str = "ring-ref"
    port_key: str = "event-channel"
    feature: str | None = None

    def ref_keys(self, order: int) -> list[str]:
        """`ring-ref` for one page, `ring-ref0..N` for 2^order pages."""
        return [self.ref_key] if order == 0 else [f"{self.ref_key}{i}" for i in range(1 << order)]


class XenbusDriver:
    """What both ends share: the handshake loop and XenStore helpers."""

    device_type: ClassVar[str]
    ring: ClassVar[RingSpec | None] = None
    rings: ClassVar[Mapping[str, SharedRing]] = {}
    role: ClassVar[Role]

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        self.ctx = ctx
        self.device = device
        self.handshake = Handshake(self.role)
        self._restart = False  # reconnect(): start over once both ends are Closed
        self._ports: list[Any] = []  # this end's event channels
        self.connected_event = trio.Event()
        self.failed: str | None = None  # the error node's text once the device has failed
        self.removed = False  # the toolstack removed the device: it is never coming back
        self.log = logging.getLogger(f"xenlike.xenbus.{self.device_type}")
        # handshake and ring events (xenlike.trace.events)
        self.trace = DeviceTrace.for_driver(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device.nodename}>"

    def ring_handlers(self, group: RingGroup) -> Mapping[str, Handler | Drain]:
        """What to do with each ring's batches, for a driver with `rings`: ring name
        -> an async callable taking a batch (or a `Drain` of one). The default
        `serve` runs them over `group`, one loop per event channel; answer a
        back end's requests through `group.back_channel(name)`, collect a front
        end's responses with `group.front_channel(name).collect`."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement ring_handlers() or serve()"
        )

    def shared_rings(self) -> Mapping[str, SharedRing]:
        """The device's rings by name: `ring` alone (as "ring"), or `rings`."""
        if self.ring is not None:
            return {"ring": SharedRing(self.ring)}
        return self.rings

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

    async def read_int(
        self, key: str, default: int, *, otherend: bool = True, maximum: int = U64_MAX
    ) -> int:
        """An unsigned number the peer (or the toolstack) published, as xenbus_scanf
        "%u" reads it; `default` when the key is absent. Anything else (words,
        signs, non-ASCII digits, more than `maximum`) is the peer's ProtocolError,
        so a hostile value fails this device before any use."""
        text = await (self.read_otherend(key) if otherend else self.read(key))
        if text is None:
            return default
        return parse_uint(key, text, maximum)

    async def publish(self, values: dict[str, str | int]) -> None:
        """Write keys of this end's directory in one transaction (none once it is removed)."""

        async def write_all(tx: Any) -> None:
            try:
                await tx.read(f"{self.device.nodename}/state")
            except XenStoreError as exc:
                if exc.name == "ENOENT":
                    return  # removed (see _write_state)
                raise
            for key, value in values.items():
                await tx.write(f"{self.device.nodename}/{key}", str(value))

        if values:
            await self.ctx.xs.transact(write_all)

    async def switch_state(self, state: XenbusState) -> None:
        """xenbus_switch_state: record and publish this end's new state."""
        self.handshake.advance(state)
        async with self.trace.state_write(state):
            await self._write_state(state)
        if state == XenbusState.Connected:
            self.connected_event.set()
            if self.failed is not None:  # connected again: the failure is over
                self.failed = None
                try:
                    await self.ctx.xs.rm(error_node(self.device.nodename))
                except XenStoreError:
                    pass

    # --- removal ------------------------------------------------------------

    def remove(self) -> None:
        """The device's directory is gone (the toolstack removed it): the bus stops
        the driver next. Override to wake whoever waits on the device."""
        self.removed = True

    async def released(self) -> None:
        """After a removal, once the driver has stopped and disconnected: give back
        what the device kept for its whole life (buffer pools and their grants)."""

    async def _write_state(self, state: XenbusState) -> None:
        """Write `state` only while the node is there, in one transaction, as Linux's
        xenbus_switch_state does: a device the toolstack has just removed is not
        brought back by its driver's last word."""
        path = f"{self.device.nodename}/state"

        async def write(tx: Any) -> None:
            try:
                await tx.read(path)
            except XenStoreError as exc:
                if exc.name == "ENOENT":
                    return
                raise
            await tx.write(path, str(int(state)))

        await self.ctx.xs.transact(write)

    # --- the handshake loop -------------------------------------------------

    async def run(self) -> None:
        """Follow the peer's state until cancelled, acting as the handshake table says."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.trace.follow_switch, self.ctx.xs)
            async with self.ctx.xs.watch(f"{self.device.otherend}/state") as events:
                async for _ in events:
                    peer_state = _peer_state(await self._peer_state_node())
                    self.trace.saw_peer(peer_state)
                    reaction = self.handshake.peer_changed(peer_state)
                    await self._react(reaction)

    async def _peer_state_node(self) -> str | None:
        """The peer's state node; None (Unknown) once its directory is gone, which
        xenstored says as EACCES when the parent is not ours to read."""
        try:
            return await self.read_otherend("state", "0")
        except XenStoreError as exc:
            if exc.name == "EACCES":
                return None
            raise

    def start_background(self, work: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `work(*args)` beside the handshake until the device goes away; an
        exception escaping it fails this device alone (never the domain)."""
        self._nursery.start_soon(self._guarded, work, args)

    async def _guarded(self, work: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await work(*args)
        except Exception as exc:  # a driver bug or a broken peer: this device only
            with trio.CancelScope(shield=True):
                await self.failed_with(getattr(work, "__name__", "background work"), exc)

    async def failed_with(self, what: str, exc: BaseException) -> None:
        """Fail the device because `what` raised `exc`: the peer's fault (a protocol
        violation) is said in a line, a driver bug with its traceback too."""
        exc = _first(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(exc, (ProtocolError, ChannelBroken, RingOverflow)):
            await self.fatal(f"{what} failed: {exc}", code=errno.EPROTO)
            return
        if isinstance(exc, XenStoreError):
            await self.fatal(f"{what} failed: {exc}", code=getattr(errno, exc.name, errno.EIO))
            return
        if isinstance(exc, (HypercallError, GrantError)):  # refused what the peer published
            code = int(getattr(exc, "errno", 0) or errno.EINVAL)
            await self.fatal(f"{what} failed: {exc}", code=code)
            return
        if isinstance(exc, OSError) and exc.errno:
            await self.fatal(f"{what} failed: {exc.strerror or exc}", code=exc.errno)
            return
        self.log.error(
            "%s: %s raised:\n%s",
            self.device.nodename,
            what,
            "".join(traceback.format_exception(exc)).rstrip(),
        )
        await self.fatal(f"{what} raised {type(exc).__name__}: {exc}")

    async def _react(self, reaction: Any) -> None:
        while True:
            if reaction.action is None:
                if not await self._after_closed():
                    return
                reaction = self.handshake.start()
                continue
            try:
                await self._perform(reaction.action)
            except Exception as exc:
                await self.failed_with(reaction.action.value, exc)
                return
            if reaction.next_state is not None:
                await self.switch_state(reaction.next_state)
            reaction = self.handshake.start()

    async def reconnect(self) -> None:
        """Close and connect again, as a reloaded driver does.

        Either end may do it: the device passes through Closing and Closed,
        then this end starts over from Initialising and the peer follows.
        A front end's requests in flight are resubmitted on the new ring
        (with `resubmit`). A reconnect asked for while one is under way joins it.
        """
        self._restart = True
        await self.switch_state(XenbusState.Closing)

    async def _close_ports(self) -> None:
        """EVTCHNOP_close on this end's ports; the peer may be gone already."""
        ports, self._ports = self._ports, []
        for port in ports:
            try:
                await port.close()
            except Exception as exc:
                self.log.debug("closing port: %s", exc)

    async def _after_closed(self) -> bool:
        """Start over once both ends are Closed (the peer has let go of everything)."""
        if (
            self._restart
            and self.handshake.state == XenbusState.Closed
            and self.handshake.peer_state == XenbusState.Closed
        ):
            self._restart = False
            await self.switch_state(XenbusState.Initialising)
            return True
        return False

    async def fatal(self, message: str, *, code: int = errno.EIO) -> None:
        """xenbus_dev_fatal: say what went wrong and head for Closing.

        `error/<nodename>/error` = "<errno> <message>" in this domain's tree,
        readable by the peer; one line in the hypervisor log; this end's data
        path stopped and its ring released.
        """
        self.failed = message
        self.log.error("%s: %s", self.device.nodename, message)
        await self._dmesg(f"xenbus: {self.device.nodename}: {message}")
        if self.removed:  # nobody is left to read it, and its directory is gone
            await self.disconnect()
            return
        path = error_node(self.device.nodename)
        try:
            await self.ctx.xs.write(path, f"{code} {message}")
            set_perms = getattr(self.ctx.xs, "set_perms", None)  # a test's store may have none
            if set_perms is not None:
                await set_perms(path, [f"n{self.ctx.domain.domid}", f"r{self.device.otherend_id}"])
        except XenStoreError as exc:
            self.log.debug("%s: %s", path, exc)
        try:
            await self.disconnect()
        except Exception as exc:
            self.log.error("%s: disconnect after a failure: %s", self.device.nodename, exc)
        try:
            state = self.handshake.fail()
            async with self.trace.state_write(state):
                await self.ctx.xs.write(f"{self.device.nodename}/state", str(int(state)))
        except XenStoreError:
            pass

    async def _dmesg(self, line: str) -> None:
        """One line in the hypervisor log, where `xenlike dmesg` shows it."""
        write = getattr(self.ctx.domain, "console_write", None)
        if write is None:
            return
        try:
            await write(line)
        except Exception as exc:  # the hypervisor refuses or rate-limits: the log has it
            self.log.debug("dmesg: %s", exc)

    async def _perform(self, action: Action) -> None:
        raise NotImplementedError

    async def disconnect(self) -> None:
        """Stop the data path and release ring pages and port (both ends)."""

    async def _data_path_failed(self, exc: BaseException) -> None:
        if isinstance(exc, (ChannelBroken, RingOverflow)):
            await self.fatal(f"ring protocol violation: {exc}", code=errno.EPROTO)
        else:
            frames = {frame.f_code.co_name for frame, _ in traceback.walk_tb(exc.__traceback__)}
            await self.failed_with("handle" if "handle" in frames else "serve", exc)


def _first(group: BaseExceptionGroup) -> BaseException:
    """The first failure of a data path: `except*` hands them over in a group (one
    task's, or several of a driver's nursery at once)."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


class ProtocolError(Exception):
    """The peer published something the protocol does not allow."""


def parse_uint(key: str, text: str, maximum: int = U64_MAX) -> int:
    """`text` as an unsigned decimal number of at most `maximum`, or ProtocolError."""
    stripped = text.strip()
    if (
        not (stripped.isascii() and stripped.isdigit())
        or len(stripped) > 20
        or int(stripped) > maximum
    ):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ProtocolError(f"{key} = {shown!r} is not a number from 0 to {maximum}")
    return int(stripped)


def _peer_state(text: str | None) -> int:
    """The peer's `state` node, which the peer owns: anything but a XenbusState
    number (a huge one, words, nothing) is Unknown."""
    try:
        value = int(text or 0)
    except ValueError:
        return XenbusState.Unknown
    return value if value in XenbusState._value2member_map_ else XenbusState.Unknown


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
        self.channel: BackChannel | None = None  # the data path of `ring`
        self.group: RingGroup | None = None  # or of `rings`
        self._mapping: Any = None
        self._serving: trio.CancelScope | None = None
        self._served = trio.Event()
        self._serve_task: Any = None

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

    async def publish_statistics(self, counters: Callable[[], Mapping[str, int]]) -> None:
        """Publish `statistics/<counter>` in this end's directory every
        STATISTICS_INTERVAL while `counters()` changes, as `xenlike top` (xentop)
        reads them; run it beside the data path until it is cancelled."""
        published: dict[str, int] = {}
        while True:
            try:
                current = {str(key): int(value) for key, value in counters().items()}
            except Exception as exc:
                await self.failed_with("statistics", exc)
                return
            if current != published:
                published = dict(current)
                try:
                    await self.publish(
                        {f"statistics/{key}": value for key, value in published.items()}
                    )
                except XenStoreError as exc:  # the toolstack is removing the device
                    self.log.debug("%s: statistics: %s", self.device.nodename, exc)
            await trio.sleep(STATISTICS_INTERVAL)

    async def reconnect(self) -> None:
        """Reload: let go of the ring first (the front end cannot end its grants
        while they are mapped), then pass through Closing and Closed."""
        await self.disconnect()
        await super().reconnect()

    async def handle(self, request: Any) -> Any:
        """Answer one request (the default `serve` calls this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle() or serve()")

    async def serve(self, channel: Any) -> None:
        """Answer requests until cancelled: each batch handled, then answered at once.

        `channel` is the `BackChannel` of `ring`, or for a driver with
        `rings` their `RingGroup`, served with `ring_handlers`.
        """
        if isinstance(channel, RingGroup):
            await channel.serve(self.ring_handlers(channel))
            return

        async def one(responses: list[Any], index: int, request: Any) -> None:
            responses[index] = await self.handle(request)

        async def answer(batch: list[Any]) -> None:
            if self.concurrent:
                responses: list[Any] = [None] * len(batch)
                async with trio.open_nursery() as nursery:
                    for index, request in enumerate(batch):
                        nursery.start_soon(one, responses, index, request)
            else:
                responses = [await self.handle(request) for request in batch]
            channel.respond_many(responses)

        await channel.serve(answer)

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
        layout = self.shared_rings()
        if not layout:
            await self.connected()
            await self.publish(self.properties())
            return
        order = await self.read_int("ring-page-order", 0, maximum=MAX_RING_PAGE_ORDER)
        if not 0 <= order <= min(self.max_ring_page_order, MAX_RING_PAGE_ORDER):
            raise ProtocolError(
                f"ring-page-order {order} over max-ring-page-order {self.max_ring_page_order}"
            )
        refs: dict[str, list[int]] = {}
        for name, shared in layout.items():
            keys = shared.ref_keys(order)
            found = [await self.read_int(key, -1, maximum=U32_MAX) for key in keys]
            if shared.feature is not None and all(ref < 0 for ref in found):
                continue  # an optional ring the front end did not set up
            if any(ref < 0 for ref in found):
                raise ProtocolError(f"the front end published no {keys[0]}")
            refs[name] = found
        protocol = await self.read_otherend("protocol", XEN_IO_PROTO_ABI_NATIVE)
        if protocol != XEN_IO_PROTO_ABI_NATIVE:
            raise ProtocolError(f"protocol {protocol!r}: only {XEN_IO_PROTO_ABI_NATIVE} is spoken")
        remote_ports: dict[str, int] = {}
        for key in dict.fromkeys(layout[name].port_key for name in refs):
            remote_ports[key] = await self.read_int(key, 0, maximum=U32_MAX)
            if remote_ports[key] == 0:
                raise ProtocolError(f"the front end published no {key}")
        # Every value the front end published is checked; now they may be used.
        domain, peer = self.ctx.domain, self.device.otherend_id
        self._mapping = await domain.grants.map(
            peer, [ref for ring in refs.values() for ref in ring]
        )
        ports: dict[str, Any] = {}
        for key, remote in remote_ports.items():
            ports[key] = await domain.evtchn.bind_interdomain(peer, remote)
            self._ports.append(ports[key])
        size = XEN_PAGE_SIZE << order
        rings = {
            name: BackRing(layout[name].spec, self._mapping.view[i * size : (i + 1) * size])
            for i, name in enumerate(refs)
        }
        data_path: BackChannel | RingGroup
        if self.ring is not None:
            data_path = self.channel = BackChannel(rings["ring"], ports["event-channel"])
            self.trace.attach(self.channel)
        else:
            data_path = self.group = RingGroup(
                rings, {name: ports[layout[name].port_key] for name in rings}
            )
        await self.connected()
        await self.publish(self.properties())
        self._nursery.start_soon(self._serve_until_stopped, data_path)

    async def _serve_until_stopped(self, channel: Any) -> None:
        broken: BaseException | None = None
        self._served = stopped = trio.Event()
        self._serve_task = trio.lowlevel.current_task()
        try:
            with trio.CancelScope() as scope:
                self._serving = scope
                try:
                    await self.serve(channel)
                except* Exception as group:
                    broken = _first(group)
        finally:
            stopped.set()
        if broken is not None:  # outside the scope that fatal's disconnect cancels
            await self._data_path_failed(broken)

    async def disconnect(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
            self._serving = None
            if trio.lowlevel.current_task() is not self._serve_task:
                # The ring and the grants go away below: the data path must be
                # out of them first, not just told to leave.
                with trio.CancelScope(shield=True):
                    await self._served.wait()
        for data_path in (self.channel, self.group):
            if data_path is not None:
                data_path.release()
        self.channel = self.group = None
        await self._close_ports()
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
    ring_page_order: int = 0
    resubmit: ClassVar[bool] = True

    def __init__(self, ctx: XenbusContext, device: DeviceInfo) -> None:
        super().__init__(ctx, device)
        self.channel: FrontChannel | None = None  # the data path of `ring`
        self.group: RingGroup | None = None  # or of `rings`
        self._pages: tuple[int, int] | None = None  # first gfn, count
        self._refs: list[int] = []
        self._orphans: list[Any] = []
        self._collector: trio.CancelScope | None = None
        self._ready = trio.Event()
        self._failure_type: type[DeviceFailed] = DeviceFailed  # what callers get once failed

    def front_keys(self) -> dict[str, str | int]:
        """Keys published with the ring refs (the front end's own features)."""
        return {}

    async def connected(self) -> None:
        """The back end is Connected: read its properties here."""

    @property
    def connected_now(self) -> bool:
        """Whether the data path is up at this moment."""
        return self._ready.is_set() and (self.channel is not None or self.group is not None)

    async def wait_connected(self) -> None:
        """Until the data path is up (again); DeviceFailed when either end has failed it."""
        while True:
            if self.failed is not None:
                raise self._failure_type(f"{self.device.nodename}: {self.failed}")
            ready = self._ready
            await ready.wait()
            if ready is self._ready and self.connected_now:
                return

    def for_program(self) -> Any:
        """What a guest program gets for this device (`guest.device(type)`): the
        driver itself, unless it keeps the program's calls apart from its own."""
        return self

    async def _channel(self) -> FrontChannel:
        """The current channel of `ring`, once the device is connected (again)."""
        while True:
            await self.wait_connected()
            if self.channel is not None:
                return self.channel
            raise TypeError(f"{type(self).__name__} has `rings`: call() needs a driver with `ring`")

    async def call(self, request: Any) -> Any:
        """One request, one response; waits for the device to be connected."""
        (response,) = await self.call_many([request])
        return response

    async def call_many(self, requests: list[Any]) -> list[Any]:
        """Requests in one push; across a reconnect they are resubmitted (`resubmit`)."""
        while True:
            channel = self.channel
            if channel is None or not self._ready.is_set():
                channel = await self._channel()
            try:
                return await channel.call_many(requests)
            except Disconnected:
                if self.failed is not None:
                    raise self._failure_type(f"{self.device.nodename}: {self.failed}") from None
                if not self.resubmit:
                    raise

    async def _perform(self, action: Action) -> None:
        if action is Action.setup:
            await self._setup()
        elif action is Action.connected:
            await self.connected()
            self._ready.set()
            if self._orphans and isinstance(self.channel, FrontChannel):
                orphans, self._orphans = self._orphans, []
                await self.channel.adopt(orphans)
        elif action is Action.disconnect:
            await self.disconnect()
            if not self._restart and self.failed is None:
                error = await self._peer_error()
                if error:  # the back end failed the device: nothing will be answered
                    self._fail_callers(f"the back end failed: {error}")

    async def _peer_error(self) -> str | None:
        """The back end's error node: readable when it failed the device, refused
        (EACCES) or missing otherwise."""
        try:
            return (await self.ctx.xs.read(error_node(self.device.otherend))).decode()
        except XenStoreError:
            return None

    async def fatal(self, message: str, *, code: int = errno.EIO) -> None:
        await super().fatal(message, code=code)
        self._fail_callers(message)

    def remove(self) -> None:
        """Callers, queued and in-flight requests get DeviceRemoved (ENODEV) now."""
        super().remove()
        self._failure_type = DeviceRemoved
        self._fail_callers("the device was removed")

    def _fail_callers(self, message: str) -> None:
        """Callers waiting for this device, and requests kept for resubmission, get
        DeviceFailed instead of waiting for a reconnection that may never come."""
        self.failed = message
        orphans, self._orphans = self._orphans, []
        fail_orphans(orphans, self._failure_type(message))
        ready, self._ready = self._ready, trio.Event()
        ready.set()

    async def _setup(self) -> None:
        layout = self.shared_rings()
        if not layout:
            await self.publish(self.front_keys())
            return
        domain, peer = self.ctx.domain, self.device.otherend_id
        wanted = [
            name
            for name, shared in layout.items()
            if shared.feature is None or await self.read_int(shared.feature, 0)
        ]
        offered = await self.read_int("max-ring-page-order", 0)
        order = min(self.ring_page_order, offered, MAX_RING_PAGE_ORDER)
        count = 1 << order
        first = domain.allocator.allocate_run(count * len(wanted))
        self._pages = (first, count * len(wanted))
        self._refs = [
            domain.grants.grant_access(peer, first + i) for i in range(count * len(wanted))
        ]
        keys: dict[str, str | int] = {"protocol": XEN_IO_PROTO_ABI_NATIVE}
        if order:
            keys["ring-page-order"] = order
        ports: dict[str, Any] = {}
        rings: dict[str, FrontRing] = {}
        for index, name in enumerate(wanted):
            shared = layout[name]
            if shared.port_key not in ports:
                ports[shared.port_key] = await domain.evtchn.alloc_unbound(peer)
                self._ports.append(ports[shared.port_key])
                keys[shared.port_key] = ports[shared.port_key].number
            view = domain.memory.frames(first + index * count, count)
            view[:] = bytes(len(view))
            rings[name] = FrontRing(shared.spec, view)
            keys.update(
                zip(shared.ref_keys(order), self._refs[index * count : (index + 1) * count])
            )
        data_path: FrontChannel | RingGroup
        if self.ring is not None:
            data_path = self.channel = FrontChannel(rings["ring"], ports["event-channel"])
            self.trace.attach(self.channel)
        else:
            data_path = self.group = RingGroup(
                rings, {name: ports[layout[name].port_key] for name in rings}
            )
        keys.update(self.front_keys())
        await self.publish(keys)
        self._nursery.start_soon(self._collect, data_path)

    async def _collect(self, channel: Any) -> None:
        broken: BaseException | None = None
        with trio.CancelScope() as scope:
            self._collector = scope
            try:
                await self.serve(channel)
            except* Exception as group:
                broken = _first(group)
        if broken is not None:  # outside the scope that fatal's disconnect cancels
            await self._data_path_failed(broken)

    async def serve(self, channel: Any) -> None:
        """The data path until cancelled: by default, collect the responses of
        the `FrontChannel` of `ring`, or serve the `RingGroup` of `rings` (from
        Initialised on) with `ring_handlers`."""
        if isinstance(channel, RingGroup):
            await channel.serve(self.ring_handlers(channel))
        else:
            await channel.run()

    async def disconnect(self) -> None:
        if self._ready.is_set():  # callers already waiting for a reconnect keep their event
            self._ready = trio.Event()
        if self._collector is not None:
            self._collector.cancel()
            self._collector = None
        if self.channel is not None:
            orphans = self.channel.fail(Disconnected(f"{self.device.nodename} disconnected"))
            if self.resubmit and self.failed is None:
                self._orphans.extend(orphans)
            else:
                fail_orphans(orphans, Disconnected(f"{self.device.nodename} disconnected"))
        for data_path in (self.channel, self.group):
            if data_path is not None:
                data_path.release()
        self.channel = self.group = None
        await self._close_ports()
        if self._pages is not None:
            (first, count), refs = self._pages, self._refs
            self._pages, self._refs = None, []
            await self.release_grants(refs, first, count)

    async def suspend(self, drain: float = SUSPEND_DRAIN) -> None:
        """Before the domain suspends (xenbus_dev_suspend): new requests wait, and
        those in flight get `drain` seconds to be answered. A cancelled suspend
        then calls `resume`; a saved domain is destroyed, and a restore boots
        new front ends."""
        if self._ready.is_set():
            self._ready = trio.Event()
        channel = self.channel
        if isinstance(channel, FrontChannel):
            with trio.move_on_after(drain):
                while channel.in_flight and self.channel is channel:
                    await trio.sleep(SUSPEND_POLL)

    async def resume(self) -> None:
        """After a cancelled suspend (xenbus_dev_resume): the handshake again from
        Initialising, with the same back end; the requests that waited go on the new
        ring."""
        await self.reconnect()

    async def release_grants(self, refs: list[int], first: int, count: int) -> None:
        """End access to pages granted to the back end, then free the run of pages.

        The back end unmaps when it disconnects, which may come later (it
        may wait for this end to say Closing first, as a removal goes): refs
        it still maps are ended, and their run freed, in the background
        (Linux's deferred gnttab_end_foreign_access), retried for
        RELEASE_TIMEOUT; if it never lets go their pages are leaked rather
        than reused under its feet.
        """
        still_mapped = self._end_grants(refs)
        if not still_mapped:
            self.ctx.domain.allocator.free_run(first, count)
            return
        self.ctx.nursery.start_soon(self._release_later, still_mapped, first, count)

    def _end_grants(self, refs: list[int]) -> list[int]:
        """End access to each ref; those the peer still maps."""
        still_mapped = []
        for ref in refs:
            try:
                self.ctx.domain.grants.end_access(ref)
            except GrantInUse:
                still_mapped.append(ref)
        return still_mapped

    async def _release_later(self, still_mapped: list[int], first: int, count: int) -> None:
        domain = self.ctx.domain
        with trio.move_on_after(RELEASE_TIMEOUT):
            while still_mapped:
                await trio.sleep(0.02)
                still_mapped = self._end_grants(still_mapped)
        if still_mapped:
            self.log.warning(
                "%s: back end still maps refs %s; leaking their pages",
                self.device.nodename,
                still_mapped,
            )
        else:
            domain.allocator.free_run(first, count)
