"""Trace records as values: what a reader yields and a trace file holds."""

import functools
from typing import Any

import attrs

from xenlike.abi.errno import Errno
from xenlike.abi.xen import Hypercall
from xenlike.hypercall import HypercallError
from xenlike.trace._layout import RECORD, TRACE_FLAG_FAST_PATH, TRACE_FLAG_LOST, TRACE_NR_ARGS
from xenlike.trace.events import describe_event

__all__ = ["LostRecords", "TraceEvent", "TraceRecord", "decode_records", "summarize"]

_U64 = (1 << 64) - 1
_NO_ARGS = (0,) * TRACE_NR_ARGS


@attrs.frozen
class TraceRecord:
    """One hypercall, or one event send that skipped the hypervisor (`fast_path`).

    `args` holds the first integer fields of the call's (first) argument
    struct, as unsigned 64-bit values; `arguments` names them. `count` is
    how many structs the call carried (a batch), or the bytes of a raw
    payload such as a console write.
    """

    time_ns: int
    domid: int
    op: int
    cmd: int
    args: tuple[int, ...]
    count: int
    result: int
    duration_ns: int
    fast_path: bool = False

    @property
    def name(self) -> str:
        """Xen's name with the sub-op, as the hypercall table has it: "event_channel_op.send"."""
        op_name, cmd_name, _ = _describe(self.op, self.cmd)
        return f"{op_name}.{cmd_name}"

    @property
    def op_name(self) -> str:
        return _describe(self.op, self.cmd)[0]

    @property
    def cmd_name(self) -> str:
        return _describe(self.op, self.cmd)[1]

    @property
    def error(self) -> str | None:
        """The errno name of a failed call ("EINVAL"), None for a success."""
        if self.result >= 0:
            return None
        errno = -self.result
        return Errno(errno).name if errno in Errno._value2member_map_ else f"errno {errno}"

    @property
    def arguments(self) -> dict[str, int]:
        """`args` by the names of the fields they came from."""
        return dict(zip(_describe(self.op, self.cmd)[2], self.args))

    def fields(self) -> tuple[int, ...]:
        """The record's values in `trace_record` order, args flattened."""
        return (
            self.time_ns,
            self.result,
            self.duration_ns,
            *self.args,
            self.count,
            self.op,
            self.cmd,
            self.domid,
            TRACE_FLAG_FAST_PATH if self.fast_path else 0,
        )


@attrs.frozen
class LostRecords:
    """`count` records of one buffer were overwritten before the reader saw them.

    Xen's TRC_LOST_RECORDS: it stands where they were, and `fast_path` says
    which of the domain's two buffers lost them.
    """

    time_ns: int
    domid: int
    count: int
    fast_path: bool = False

    def fields(self) -> tuple[int, ...]:
        flags = TRACE_FLAG_LOST | (TRACE_FLAG_FAST_PATH if self.fast_path else 0)
        return (self.time_ns, 0, 0, *_NO_ARGS, self.count, 0, 0, self.domid, flags)


TraceEvent = TraceRecord | LostRecords


def decode_records(
    data: bytes | memoryview, *, domid: int | None = None, flags: int | None = None
) -> list[TraceEvent]:
    """Records from raw `trace_record` bytes.

    A reader passes the `domid` and `flags` the hypervisor vouches for,
    which replace what the bytes say: a domain writes its own buffer and
    could otherwise pose as another domain, or forge lost-record marks.
    """
    events: list[TraceEvent] = []
    for (
        time_ns,
        result,
        duration_ns,
        a0,
        a1,
        a2,
        a3,
        count,
        op,
        cmd,
        rec_domid,
        rec_flags,
    ) in RECORD.format.iter_unpack(data):
        if domid is not None:
            rec_domid = domid
        if flags is not None:
            rec_flags = flags
        fast_path = bool(rec_flags & TRACE_FLAG_FAST_PATH)
        if rec_flags & TRACE_FLAG_LOST:
            events.append(LostRecords(time_ns, rec_domid, count, fast_path))
        else:
            events.append(
                TraceRecord(
                    time_ns,
                    rec_domid,
                    op,
                    cmd,
                    (a0, a1, a2, a3),
                    count,
                    result,
                    duration_ns,
                    fast_path,
                )
            )
    return events


def summarize(arg: Any) -> tuple[int, ...]:
    """A record's args and count fields (in that order) for a decoded hypercall argument.

    `arg` is what the dispatcher decoded: None, raw bytes, one record, or a
    list of them (a batch, summarised by its first).
    """
    if arg is None:
        return (*_NO_ARGS, 0)
    if isinstance(arg, bytes | bytearray):
        return (*_NO_ARGS, len(arg))
    count = 1
    if isinstance(arg, list):
        count, arg = len(arg), arg[0]
    values = [arg[i] & _U64 for i, _ in _summary_fields(arg.__class__)]
    return (*values, *_NO_ARGS[len(values) :], count)


@functools.cache
def _summary_fields(record: Any) -> tuple[tuple[int, str], ...]:
    """(index, name) of the first integer fields of a codec's record type.

    The codec gives every field a default: 0 for integers, bytes, tuples or
    records for the rest, so the defaults tell which fields are integers.
    """
    blank = record()
    picked = [
        (i, name)
        for i, (name, value) in enumerate(zip(record._fields, blank))
        if isinstance(value, int)
    ]
    return tuple(picked[:TRACE_NR_ARGS])


@functools.cache
def _describe(op: int, cmd: int) -> tuple[str, str, tuple[str, ...]]:
    """(op name, sub-op name, argument names) from the hypercall table.

    Imported here, not at the top: the hypervisor package builds the table
    from its subsystems, and a domain process that records fast-path sends
    has no business importing the hypervisor.
    """
    from xenlike.hypervisor import HYPERCALLS

    try:
        entry = HYPERCALLS.lookup(op, cmd)
    except HypercallError:
        event = describe_event(op, cmd)  # xenlike's own ring and XenBus events
        if event is not None:
            return event
        op_name = Hypercall(op).name if op in Hypercall._value2member_map_ else str(op)
        return op_name, str(cmd), ()
    op_name, _, cmd_name = entry.name.partition(".")
    if entry.args is None:
        return op_name, cmd_name, ()
    return op_name, cmd_name, tuple(name for _, name in _summary_fields(entry.args.record))
