"""Following a running topology's trace: what `xenlike trace` (and `up --trace`) runs.

Records come from `follow`, in time order. A recording also resolves, once
per port, where each event send goes: the first send seen on port P of
domain A is preceded in the file by an `evtchn.peer` record, from
EVTCHNOP_status asked of the hypervisor then, so a saved trace can draw
each send as a flow to its receiver. A close or a new binding of the port
asks again at the next send. The answer is as of the moment the send is
read (about a quarter of a second later), so a port closed and rebound in
between is attributed to its new peer.
"""

import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import trio

from xenlike.abi.event_channel import EvtchnOp, EvtchnStat, evtchn_status
from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import HypercallError
from xenlike.trace._file import TraceWriter
from xenlike.trace._reader import TraceReader, follow
from xenlike.trace._record import TraceEvent, TraceRecord
from xenlike.trace.events import (
    RING_TRACE_KEY,
    EvtchnEvent,
    RingEvent,
    XenlikeOp,
    unpack_name,
)

__all__ = [
    "PortPeers",
    "last_device_events",
    "monotonic_to_wallclock",
    "run_until_interrupted",
    "set_ring_tracing",
    "trace_topology",
    "wait_for_hypervisor",
]

STATUS = compile_struct(evtchn_status, "evtchn_status")
EVTCHN_OP = int(Hypercall.event_channel_op)
FLUSH_INTERVAL = 0.25  # seconds between flushes of a recording
NEW_DEVICE_INTERVAL = 0.5  # seconds between looks for devices to trace the rings of


class PortPeers:
    """Where each sending port leads, asked of the hypervisor once per binding."""

    def __init__(self, xc: Any) -> None:
        self._xc = xc
        self._known: set[tuple[int, int]] = set()

    async def before(self, record: TraceRecord) -> TraceRecord | None:
        """The `evtchn.peer` record to put before `record`, if it is a send on a new port."""
        if record.op != EVTCHN_OP:
            return None
        if record.cmd == EvtchnOp.close:
            self._known.discard((record.domid, record.args[0]))
            return None
        if record.cmd == EvtchnOp.bind_interdomain:  # args: remote_dom, remote_port
            self._known.discard((record.args[0], record.args[1]))
            return None
        if record.cmd != EvtchnOp.send or (record.domid, record.args[0]) in self._known:
            return None
        port = record.args[0]
        self._known.add((record.domid, port))
        try:
            _, out, _ = await self._xc.hypercalls.call_struct(
                EVTCHN_OP,
                EvtchnOp.status,
                evtchn_status,
                STATUS.record(dom=record.domid, port=port),
            )
        except HypercallError:  # the domain is gone already
            return None
        remote_dom = remote_port = 0
        if out.status == EvtchnStat.interdomain:
            remote_dom = int.from_bytes(out.u[0:2], "little")
            remote_port = int.from_bytes(out.u[4:8], "little")
        return TraceRecord(
            record.time_ns,
            record.domid,
            XenlikeOp.evtchn,
            EvtchnEvent.peer,
            (port, remote_dom, remote_port, out.status),
            0,
            0,
            0,
        )


async def wait_for_hypervisor(run_dir: Path, timeout: float) -> None:
    """Until the run directory's control socket exists (`up --trace` starts before it)."""
    with trio.move_on_after(timeout):
        while not (Path(run_dir) / "hypervisor.sock").exists():
            await trio.sleep(0.02)


async def set_ring_tracing(
    xs: Any, devices: str, on: bool, done: set[str] | None = None
) -> list[str]:
    """Write (or remove) `trace-rings` in both ends' directories of the chosen devices.

    `devices` is "all", a guest's name, or NAME/TYPE or NAME/TYPE/DEVID.
    Returns the devices touched, as NAME/TYPE/DEVID. Front-end paths in `done`
    are left as they are, and those touched now are added to it.
    """
    from xenlike.xenstore import XenStoreError

    wanted = [] if devices == "all" else devices.split("/")
    touched = []
    for domid in await xs.ls("/local/domain"):
        try:
            name = (await xs.read(f"/local/domain/{domid}/name")).decode()
            types = await xs.ls(f"/local/domain/{domid}/device")
        except XenStoreError:
            continue
        if wanted and wanted[0] != name:
            continue
        for device_type in types:
            if len(wanted) > 1 and wanted[1] != device_type:
                continue
            for devid in await xs.ls(f"/local/domain/{domid}/device/{device_type}"):
                front = f"/local/domain/{domid}/device/{device_type}/{devid}"
                if len(wanted) > 2 and wanted[2] != devid or done is not None and front in done:
                    continue
                try:
                    back = (await xs.read(f"{front}/backend")).decode()
                except XenStoreError:
                    continue
                for end in (front, back):
                    try:
                        if on:
                            await xs.write(f"{end}/{RING_TRACE_KEY}", "1")
                        else:
                            await xs.rm(f"{end}/{RING_TRACE_KEY}")
                    except XenStoreError:
                        pass  # the device went away meanwhile
                touched.append(f"{name}/{device_type}/{devid}")
                if done is not None:
                    done.add(front)
    return touched


async def trace_topology(
    run_dir: Path,
    on_event: Callable[[TraceEvent], None],
    *,
    record: Path | None = None,
    rings: str | None = None,
    wait: float = 0.0,
    on_ready: Callable[[list[str]], None] | None = None,
    stop: trio.Event | None = None,
    history: bool = False,
) -> int:
    """Follow every record until the hypervisor stops or `stop` is set.

    Each record goes to `on_event`, and to the file `record` if given
    (every record, flushed every quarter second). With `rings`, the chosen
    devices' ring events are switched on once the reader is attached (and
    for chosen devices that appear later: a guest created or rebooted), and
    off again at the end. Returns how many records the file holds.
    """
    from xenlike.xc import XenControl

    await wait_for_hypervisor(run_dir, wait)
    writer = TraceWriter(record) if record is not None else None
    touched: list[str] = []
    try:
        async with XenControl.connect(run_dir) as xc, trio.open_nursery() as nursery:
            peers = PortPeers(xc) if writer is not None else None
            if writer is not None:
                nursery.start_soon(_flush_periodically, writer)
            started = False
            async with aclosing(follow(run_dir, until=stop, history=history)) as events:
                async for event in events:
                    if not started:  # the reader's own sysctl comes first: tracing is on
                        started = True
                        if rings is not None:
                            done: set[str] = set()
                            touched = await _switch_rings(run_dir, rings, True, done)
                            nursery.start_soon(_follow_new_devices, run_dir, rings, touched, done)
                        if on_ready is not None:
                            on_ready(touched)
                    if peers is not None and isinstance(event, TraceRecord):
                        peer = await peers.before(event)
                        if peer is not None:
                            _deliver(peer, writer, on_event)
                    _deliver(event, writer, on_event)
            nursery.cancel_scope.cancel()
    finally:
        if touched:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await _switch_rings(run_dir, rings or "all", False)
        if writer is not None:
            writer.close()
    return writer.count if writer is not None else 0


async def _follow_new_devices(
    run_dir: Path, devices: str, touched: list[str], done: set[str]
) -> None:
    """Switch ring events on for the chosen devices as they appear (a guest booting,
    created or rebooted), adding them to `touched` and `done`, until cancelled."""
    from xenlike.xenstore import XenStoreError, open_client

    while True:
        try:
            async with open_client(Path(run_dir) / "xenstored" / "socket") as xs:
                while True:
                    try:
                        touched.extend(await set_ring_tracing(xs, devices, True, done))
                    except XenStoreError:
                        pass  # a domain went away while we looked
                    await trio.sleep(NEW_DEVICE_INTERVAL)
        except OSError:  # no xenstored yet (a recording from the boot on), or any more
            await trio.sleep(NEW_DEVICE_INTERVAL)


async def _switch_rings(
    run_dir: Path, devices: str, on: bool, done: set[str] | None = None
) -> list[str]:
    from xenlike.xenstore import open_client

    try:
        async with open_client(Path(run_dir) / "xenstored" / "socket") as xs:
            return await set_ring_tracing(xs, devices, on, done)
    except OSError:  # no xenstored (yet, or any more)
        return []


async def last_device_events(run_dir: Path) -> dict[tuple[int, str, int, int], TraceRecord]:
    """The latest XenBus or ring event of each device end that the trace buffers still hold.

    Keyed (domid of the end, device type, devid, the other end's domid).
    A buffer holds its domain's last few thousand records from whenever a
    reader was attached, so this finds something only if the topology was
    traced (or is being traced) since the device got stuck. Opening a
    reader turns tracing on for the moment it takes.
    """
    ports: dict[tuple[int, int], tuple[int, str, int, int]] = {}
    last: dict[tuple[int, str, int, int], TraceRecord] = {}
    with await TraceReader.open(run_dir, history=True) as reader:
        events = reader.read_available()
    for event in events:
        if not isinstance(event, TraceRecord) or event.op not in (XenlikeOp.xenbus, XenlikeOp.ring):
            continue
        key: tuple[int, str, int, int] | None
        if event.op == XenlikeOp.xenbus or event.cmd == RingEvent.attach:
            key = (event.domid, unpack_name(event.args[0]), event.args[1], event.args[3])
            if event.op == XenlikeOp.ring:
                ports[(event.domid, event.args[2])] = key
        else:
            key = ports.get((event.domid, event.args[0]))
        if key is not None:
            last[key] = event
    return last


def _deliver(
    event: TraceEvent, writer: TraceWriter | None, on_event: Callable[[TraceEvent], None]
) -> None:
    if writer is not None:
        writer.write(event)
    on_event(event)


async def _flush_periodically(writer: TraceWriter) -> None:
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        writer.flush()


def monotonic_to_wallclock() -> Callable[[int], int]:
    """CLOCK_MONOTONIC ns -> CLOCK_REALTIME ns, as the two clocks stand now."""
    offset = time.time_ns() - time.monotonic_ns()
    return lambda ns: ns + offset


def run_until_interrupted(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """`trio.run(fn, *args, stop=EVENT)`, ended cleanly by Ctrl-C or SIGTERM.

    The first signal sets `stop`, so `fn` can finish its work (write out
    the records it still holds); a second one cancels it. Either way its
    finally blocks run, rather than KeyboardInterrupt cutting in anywhere.
    An error comes out as itself, not wrapped in the exception groups of
    the nurseries it passed.
    """

    async def main() -> Any:
        stop = trio.Event()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for _ in signals:
                        if stop.is_set():
                            nursery.cancel_scope.cancel()
                        stop.set()

                nursery.start_soon(watch)
                result = await fn(*args, stop=stop)
                nursery.cancel_scope.cancel()
                return result
        return None

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
