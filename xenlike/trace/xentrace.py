"""A trace in Xen's binary trace format, the one xentrace writes and xenalyze reads.

Sans-I/O: records in, bytes out (`xentrace`). What lands where:

* pCPUs: xenlike records carry no CPU, so the mapping is stated: the n-th
  domain of the trace (by domid, from 0) is pCPU n, and its process is its
  vCPU 0, d<domid>v0, which never leaves that pCPU. Each pCPU's records are
  one stream introduced by TRC_TRACE_CPU_CHANGE (cpu, bytes that follow),
  as xentrace writes a buffer.
* The clock: every other record carries a TSC, the record's CLOCK_MONOTONIC
  nanoseconds as cycles of a 1 GHz clock (`CPU_HZ`): `xenalyze --cpu-hz 1G`
  shows real time.
* Scheduling: TRC_SCHED_RUNSTATE_CHANGE runnable->running at a domain's
  first record, so that xenalyze charges what follows to d<domid>v0.
* Hypercalls, fast-path event sends included (in Xen each is a hypercall):
  TRC_PV_HYPERCALL_V2, the op and the argument-present mask in word 0. Xen
  traces the guest's registers; xenlike has the sub-op and the count of the
  call, not the guest pointer, so argument 0 is the sub-op (32-bit),
  argument 1 (the pointer) is marked absent and, for grant_table_op, whose
  third argument is the count, argument 2 is the count.
* Grants: TRC_MEM_PAGE_GRANT_MAP (the granting domain) for each entry of a
  successful map, as grant_table.c traces it; a batch is summarised by its
  first entry, so every entry names the first entry's domain. Unmaps are
  left out: xenlike's unmap record does not say the granting domain that
  TRC_MEM_PAGE_GRANT_UNMAP carries. Xen has no event-channel trace points,
  so event-channel operations are only their hypercalls.
* Lost records: TRC_LOST_RECORDS (count, domid, vcpu, first TSC).
* xenlike's own events (XenBus, rings, `evtchn.peer`) are left out: Xen has
  no records for them (`skipped` counts them).
"""

import struct
from collections.abc import Iterable
from typing import Any

import attrs

from xenlike.abi.grant_table import GnttabOp
from xenlike.abi.trace import (
    TRC_LOST_RECORDS,
    TRC_MEM_PAGE_GRANT_MAP,
    TRC_PV_HYPERCALL_V2,
    TRC_PV_HYPERCALL_V2_ARG_32,
    TRC_SCHED_RUNSTATE_CHANGE,
    TRC_TRACE_CPU_CHANGE,
    t_rec_header,
    trc_cpu_change,
    trc_lost_records,
    trc_runstate_change,
)
from xenlike.abi.xen import Hypercall
from xenlike.trace._record import LostRecords, TraceEvent, TraceRecord
from xenlike.trace.events import is_event

__all__ = [
    "CPU_HZ",
    "FORMATS",
    "ExportTooLarge",
    "RUNSTATE_RUNNABLE",
    "RUNSTATE_RUNNING",
    "XentraceExport",
    "xentrace",
]

CPU_HZ = 1_000_000_000  # cycles are nanoseconds

# Xen's runstates (public/vcpu.h), as TRC_SCHED_RUNSTATE_CHANGE encodes them in its event id:
# the new one in bits 4-7, the old one in bits 8-11.
RUNSTATE_RUNNING = 0
RUNSTATE_RUNNABLE = 1

_RUNNABLE_TO_RUNNING = TRC_SCHED_RUNSTATE_CHANGE | RUNSTATE_RUNNABLE << 8 | RUNSTATE_RUNNING << 4

# xentrace_format's definitions for every record an export holds, in the syntax and with
# the names of the `formats` file Xen shipped beside it (no catch-all line for event 0:
# a record missing here prints nothing, so a count of lines checks the list).
_PREFIX = "CPU%(cpu)d  %(tsc)d (+%(reltsc)8d)  "
FORMATS = "".join(
    f"{event:#010x}  {_PREFIX}{text}\n"
    for event, text in [
        (TRC_LOST_RECORDS, "lost_records      0x%(1)08x"),
        (TRC_TRACE_CPU_CHANGE, "cpu_change        0x%(1)08x"),
        (_RUNNABLE_TO_RUNNING, "runnable_to_running [ dom:vcpu = 0x%(1)08x ]"),
        (TRC_PV_HYPERCALL_V2, "hypercall  [ op = 0x%(1)08x ]"),
        (TRC_MEM_PAGE_GRANT_MAP, "page_grant_map      [ domid = %(1)d ]"),
    ]
)

_GNTTAB_OP = int(Hypercall.grant_table_op)
_U32 = 0xFFFFFFFF


@attrs.frozen
class XentraceExport:
    """The bytes of a trace file, and what went into it."""

    data: bytes
    records: int  # t_recs written, TRC_TRACE_CPU_CHANGE included
    pcpus: dict[int, int]  # domid -> the pCPU its vCPU 0 ran on
    skipped: int  # xenlike's own events, which have no Xen record


def _words(layout: Any, **fields: int) -> list[int]:
    """A record's data, laid out as `layout` (one of trace.h's record data), as words."""
    data = layout.build(fields)
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def _record(event: int, words: Iterable[int], tsc: int | None) -> bytes:
    """One struct t_rec: the header word, the TSC if any, the data words."""
    data = [w & _U32 for w in words]
    head = t_rec_header(event, len(data), tsc is not None)
    if tsc is None:
        return struct.pack(f"<I{len(data)}I", head, *data)
    return struct.pack(f"<IQ{len(data)}I", head, tsc, *data)


def _hypercall(record: TraceRecord, tsc: int) -> bytes:
    mask = TRC_PV_HYPERCALL_V2_ARG_32(0)
    words = [record.cmd]
    if record.op == _GNTTAB_OP:
        mask |= TRC_PV_HYPERCALL_V2_ARG_32(2)
        words.append(record.count)
    return _record(TRC_PV_HYPERCALL_V2, [record.op | mask, *words], tsc)


def _grant_maps(record: TraceRecord, tsc: int) -> tuple[bytes, int]:
    """One record and how many times it stands: at the call's TSC, since the end of the
    call would be out of order with the next record."""
    if record.op != _GNTTAB_OP or record.cmd != GnttabOp.map_grant_ref or record.result < 0:
        return b"", 0
    dom = record.arguments.get("dom", 0)
    return _record(TRC_MEM_PAGE_GRANT_MAP, [dom], tsc), max(record.count, 1)


class ExportTooLarge(ValueError):
    """A pCPU's records would not fit the 32-bit window size of TRC_TRACE_CPU_CHANGE."""


_WINDOW_MAX = 0xFFFFFFFF


def xentrace(events: Iterable[TraceEvent]) -> XentraceExport:
    """The trace file for `events` (in time order, as a trace file holds them)."""
    streams: dict[int, bytearray] = {}
    counts: dict[int, int] = {}  # records in each stream
    last: dict[int, int] = {}  # each stream's latest TSC: xenalyze wants them never to go back
    skipped = 0
    for event in events:
        if isinstance(event, TraceRecord) and is_event(event.op):
            skipped += 1
            continue
        stream = streams.get(event.domid)
        if stream is None:
            vcpu = _words(trc_runstate_change, vcpu=0, domain=event.domid)
            stream = streams[event.domid] = bytearray(
                _record(_RUNNABLE_TO_RUNNING, vcpu, event.time_ns)
            )
            counts[event.domid] = 1
            last[event.domid] = event.time_ns
        if isinstance(event, LostRecords):
            # Lost after the stream's last record, noted strictly later (xenalyze checks).
            first = last[event.domid]
            tsc = last[event.domid] = max(event.time_ns, first + 1)
            lost = _words(
                trc_lost_records,
                lost_records=event.count,
                did=event.domid,
                vid=0,
                first_tsc=first,
            )
            stream += _record(TRC_LOST_RECORDS, lost, tsc)
            counts[event.domid] += 1
        else:
            tsc = last[event.domid] = max(event.time_ns, last[event.domid])
            stream += _hypercall(event, tsc)
            grant_map, maps = _grant_maps(event, tsc)
            if len(stream) + len(grant_map) * maps > _WINDOW_MAX:
                raise ExportTooLarge(
                    f"d{event.domid}'s records exceed the {_WINDOW_MAX} bytes of one pCPU's window"
                )
            stream += grant_map * maps
            counts[event.domid] += 1 + maps
    pcpus = {domid: cpu for cpu, domid in enumerate(sorted(streams))}
    out = bytearray()
    for domid, cpu in pcpus.items():
        window = _words(trc_cpu_change, cpu=cpu, window_size=len(streams[domid]))
        out += _record(TRC_TRACE_CPU_CHANGE, window, None)
        out += streams[domid]
    records = sum(counts.values()) + len(pcpus)
    return XentraceExport(bytes(out), records, pcpus, skipped)
