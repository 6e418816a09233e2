"""xenlike's own trace events: XenBus handshakes and ring traffic, beside the hypercalls.

A stuck handshake or a lost wake-up never shows in the hypercalls alone:
both happen in shared memory and XenStore. So a domain also writes these
events into its own trace buffer (the one its fast-path event sends go to),
as `trace_record`s whose op lies in a range of xenlike's own, far above
Xen's hypercall numbers (which stop below 64)::

    op 0x10000 "xenbus"  state   this end wrote its `state` node (xenbus_switch_state);
                                 args device, devid, state, otherend (the peer's domid);
                                 result and duration are the XenStore write's
                         peer    the watch on the peer's `state` fired and it read `state`:
                                 the write that the next `xenbus.state` answers
    op 0x10001 "ring"    attach  a ring is traced from now on: device, devid, port, otherend
                         push_requests / push_responses
                                 port, prod, pushed (entries since the last push), notify
                                 (1 sent, 0 suppressed by the peer's req_event / rsp_event)
                         final_check_requests / final_check_responses
                                 port, cons, more (0: the consumer goes to sleep)
    op 0x10002 "evtchn"  peer    port `port` of the record's domain is bound to
                                 remote_dom:remote_port (status: EVTCHNSTAT_*); written into
                                 a recording by `xenlike trace --record`, from
                                 EVTCHNOP_status, so a saved trace can follow each send to
                                 its receiver

`device` is the device type's name packed into a u64 (`pack_name`); in
xenbus and ring.attach records `count` is 1 on the back end's side, 0 on
the front end's. A ring is known by its event channel port: `ring.attach`
names the device behind it.

XenBus events are written whenever a reader is attached: a handshake makes
a handful. Ring events are written only for the devices whose
`trace-rings` key (in the directory of the end that writes them) reads
"1": `xenlike trace --rings` writes it in both ends' directories, and each
driver watches its own, so it takes effect on a running device. With the
key unset a push costs one attribute test; with it set and no reader, one
load of the buffer's `enabled` word more.
"""

import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import IntEnum
from typing import Any

from xenlike.trace._buffer import _ENABLED, _PROD, TraceBuffer
from xenlike.trace._layout import BUFFER_RECORDS_OFFSET, RECORD, TRACE_RECORD_SIZE
from xenlike.xenstore.wire import XenStoreError

__all__ = [
    "EVENT_CMDS",
    "RING_TRACE_KEY",
    "XENLIKE_TRACE_OP_BASE",
    "DeviceTrace",
    "EventRecorder",
    "EvtchnEvent",
    "RingEvent",
    "RingTrace",
    "XenbusEvent",
    "XenlikeOp",
    "describe_event",
    "is_event",
    "pack_name",
    "unpack_name",
]

XENLIKE_TRACE_OP_BASE = 0x10000
RING_TRACE_KEY = "trace-rings"
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1

# A ring event's `trace_record` with only what varies packed: time_ns, args[0..3], op, cmd,
# domid; result, duration, count and flags are zero pad bytes (cheaper, on every push).
RING_RECORD = struct.Struct("<Q16xQQQQ4xLLH2x")
assert RING_RECORD.size == TRACE_RECORD_SIZE and RING_RECORD.pack(
    1, 2, 3, 4, 5, 6, 7, 8
) == RECORD.format.pack(1, 0, 0, 2, 3, 4, 5, 0, 6, 7, 8, 0)


class XenlikeOp(IntEnum):
    """The ops of xenlike's own events: none is a Xen hypercall number."""

    xenbus = XENLIKE_TRACE_OP_BASE
    ring = XENLIKE_TRACE_OP_BASE + 1
    evtchn = XENLIKE_TRACE_OP_BASE + 2


class XenbusEvent(IntEnum):
    state = 0
    peer = 1


class RingEvent(IntEnum):
    attach = 0
    push_requests = 1
    push_responses = 2
    final_check_requests = 3
    final_check_responses = 4


class EvtchnEvent(IntEnum):
    peer = 0


_DEVICE = ("device", "devid")
_ARGUMENTS: dict[tuple[int, int], tuple[str, ...]] = {
    (XenlikeOp.xenbus, XenbusEvent.state): (*_DEVICE, "state", "otherend"),
    (XenlikeOp.xenbus, XenbusEvent.peer): (*_DEVICE, "state", "otherend"),
    (XenlikeOp.ring, RingEvent.attach): (*_DEVICE, "port", "otherend"),
    (XenlikeOp.ring, RingEvent.push_requests): ("port", "prod", "pushed", "notify"),
    (XenlikeOp.ring, RingEvent.push_responses): ("port", "prod", "pushed", "notify"),
    (XenlikeOp.ring, RingEvent.final_check_requests): ("port", "cons", "more"),
    (XenlikeOp.ring, RingEvent.final_check_responses): ("port", "cons", "more"),
    (XenlikeOp.evtchn, EvtchnEvent.peer): ("port", "remote_dom", "remote_port", "status"),
}
EVENT_CMDS: dict[int, type[IntEnum]] = {  # each event op's sub-ops
    XenlikeOp.xenbus: XenbusEvent,
    XenlikeOp.ring: RingEvent,
    XenlikeOp.evtchn: EvtchnEvent,
}


def is_event(op: int) -> bool:
    """Whether `op` is one of xenlike's events rather than a hypercall."""
    return op >= XENLIKE_TRACE_OP_BASE


def describe_event(op: int, cmd: int) -> tuple[str, str, tuple[str, ...]] | None:
    """(op name, sub-op name, argument names) of a xenlike event, None for anything else."""
    if op not in EVENT_CMDS:
        return None
    cmds = EVENT_CMDS[op]
    cmd_name = cmds(cmd).name if cmd in cmds._value2member_map_ else str(cmd)
    return XenlikeOp(op).name, cmd_name, _ARGUMENTS.get((op, cmd), ())


def pack_name(text: str) -> int:
    """A device type's name (8 bytes at most) as one record argument."""
    return int.from_bytes(text.encode("ascii", "replace")[:8].ljust(8, b"\0"), "little")


def unpack_name(value: int) -> str:
    return (value & (1 << 64) - 1).to_bytes(8, "little").rstrip(b"\0").decode("ascii", "replace")


class EventRecorder:
    """Writes xenlike events into a domain's own trace buffer, while a reader is attached.

    The domain's process is the buffer's one producer: this and the
    fast-path send recorder share the buffer's record count, and all run in
    the domain's one thread.
    """

    def __init__(self, buffer: TraceBuffer, domid: int) -> None:
        self.buffer = buffer
        self.domid = domid
        self._words = buffer._words
        self._prods = buffer._prods
        self._mapping = buffer._mapping

    def record(
        self,
        op: int,
        cmd: int,
        a0: int = 0,
        a1: int = 0,
        a2: int = 0,
        a3: int = 0,
        count: int = 0,
        result: int = 0,
        duration_ns: int = 0,
        time_ns: int | None = None,
    ) -> None:
        """One event, if a reader is attached; stamped now unless `time_ns` says when."""
        if not self._words[_ENABLED]:
            return
        # Arguments may come from a peer (a state it wrote): whatever they are,
        # the record holds their low 64 bits, never an exception in the caller.
        self.buffer.write(
            time.monotonic_ns() if time_ns is None else time_ns,
            result,
            duration_ns,
            a0 & _MASK64,
            a1 & _MASK64,
            a2 & _MASK64,
            a3 & _MASK64,
            count,
            op,
            cmd,
            self.domid,
            0,
        )

    def ring(self, cmd: int, a0: int, a1: int, a2: int, a3: int = 0) -> None:
        """A ring event, stamped now: `record` without the keywords, for the data path."""
        if not self._words[_ENABLED]:
            return
        buffer = self.buffer
        index = buffer._next
        RING_RECORD.pack_into(
            self._mapping,
            BUFFER_RECORDS_OFFSET + index % buffer.nr_records * TRACE_RECORD_SIZE,
            time.monotonic_ns(),
            a0,
            a1,
            a2,
            a3,
            XenlikeOp.ring,
            cmd,
            self.domid,
        )
        buffer._next = index + 1
        self._prods[_PROD] = index + 1


class RingTrace:
    """One traced ring: its channel calls `pushed` and `final_check` (see channel.py)."""

    __slots__ = ("_backend", "_check_cmd", "_last_prod", "_port", "_push_cmd", "_ring", "_write")

    def __init__(self, recorder: EventRecorder, ring: Any, port: int, *, backend: bool) -> None:
        self._write = recorder.ring
        self._ring = ring
        self._port = port
        self._backend = backend
        self._last_prod = self._prod()
        self._push_cmd = RingEvent.push_responses if backend else RingEvent.push_requests
        self._check_cmd = (
            RingEvent.final_check_requests if backend else RingEvent.final_check_responses
        )

    def _prod(self) -> int:
        return self._ring.rsp_prod_pvt if self._backend else self._ring.req_prod_pvt

    def pushed(self, notify: bool) -> None:
        """After RING_PUSH_*_AND_CHECK_NOTIFY: what was pushed, and whether the peer is woken."""
        prod = self._prod()
        pushed = (prod - self._last_prod) & _MASK32
        self._last_prod = prod
        self._write(self._push_cmd, self._port, prod, pushed, notify)

    def final_check(self, more: bool) -> None:
        """After RING_FINAL_CHECK_FOR_*: False means the consumer sleeps until notified."""
        cons = self._ring.req_cons if self._backend else self._ring.rsp_cons
        self._write(self._check_cmd, self._port, cons, more)


class DeviceTrace:
    """The trace of one end of one device: its handshake, and its ring when asked for.

    Every driver has one (`XenbusDriver.trace`); in a domain without a
    trace buffer (a driver tested alone) it records nothing.
    """

    def __init__(
        self,
        recorder: EventRecorder | None,
        device_type: str,
        devid: int,
        nodename: str,
        otherend_id: int,
        *,
        backend: bool,
    ) -> None:
        self._recorder = recorder
        self._device = (pack_name(device_type), devid)
        self._nodename = nodename
        self._otherend = otherend_id
        self._backend = int(backend)
        self._channel: Any = None
        self.rings = False

    @classmethod
    def for_driver(cls, driver: Any) -> "DeviceTrace":
        recorder = getattr(driver.ctx.domain, "trace", None)
        device = driver.device
        return cls(
            recorder,
            device.type,
            device.devid,
            device.nodename,
            device.otherend_id,
            backend=driver.role.name == "backend",
        )

    @asynccontextmanager
    async def state_write(self, state: int) -> AsyncIterator[None]:
        """Around the XenStore write of this end's `state`: records it, with its outcome."""
        start = time.monotonic_ns()
        result = 0
        try:
            yield
        except XenStoreError as exc:
            result = -exc.errno
            raise
        finally:
            if self._recorder is not None:
                self._recorder.record(
                    XenlikeOp.xenbus,
                    XenbusEvent.state,
                    *self._device,
                    int(state),
                    self._otherend,
                    self._backend,
                    result=result,
                    duration_ns=time.monotonic_ns() - start,
                    time_ns=start,
                )

    def saw_peer(self, state: int) -> None:
        """The peer's `state` as the watch found it: the cause of what this end does next."""
        if self._recorder is not None:
            self._recorder.record(
                XenlikeOp.xenbus,
                XenbusEvent.peer,
                *self._device,
                int(state),
                self._otherend,
                self._backend,
            )

    def attach(self, channel: Any) -> None:
        """A new ring channel for the device: traced at once if the device's rings are."""
        self._channel = channel
        if self.rings:
            self._trace_channel()

    def _trace_channel(self) -> None:
        channel = self._channel
        if channel is None or self._recorder is None:
            return
        port = getattr(channel.port, "number", 0)
        channel.trace = RingTrace(self._recorder, channel.ring, port, backend=bool(self._backend))
        self._recorder.record(
            XenlikeOp.ring, RingEvent.attach, *self._device, port, self._otherend, self._backend
        )

    def set_rings(self, on: bool) -> None:
        if on == self.rings:
            return
        self.rings = on
        if on:
            self._trace_channel()
        elif self._channel is not None:
            self._channel.trace = None

    async def follow_switch(self, xs: Any) -> None:
        """Follow this end's `trace-rings` key until cancelled (a watch fires at once)."""
        if self._recorder is None:
            return
        path = f"{self._nodename}/{RING_TRACE_KEY}"
        async with xs.watch(path) as events:
            async for _ in events:
                try:
                    value = (await xs.read(path)).decode().strip()
                except XenStoreError:  # absent (ENOENT) or unreadable: the rings stay quiet
                    value = ""
                self.set_rings(value == "1")
