"""A trace as Chrome / Perfetto trace-event JSON (ui.perfetto.dev, chrome://tracing).

Each domain is a process track (pid = domid) with two threads: tid 0, the
hypercalls as the hypervisor dispatched them (complete slices, "X"), and
tid 1, what the domain wrote itself: fast-path event sends (zero-length
slices), XenBus state changes and ring events (instants, "i"). An event
send is a flow ("s" on the sender's send, "f" on a zero-length "evtchn
wake" slice on the receiver's domain thread, at the same time): the
receiver is the `evtchn.peer` record a recording made for the port, or
else the domain whose bind_interdomain connected to it. Times are
microseconds from the first record; lost records are process instants.
"""

from collections.abc import Iterable
from typing import Any

from xenlike.abi.event_channel import EvtchnOp, EvtchnStat
from xenlike.abi.xen import Hypercall
from xenlike.trace._record import LostRecords, TraceEvent, TraceRecord
from xenlike.trace.events import EvtchnEvent, XenlikeOp, is_event
from xenlike.trace.view import describe

__all__ = ["DOMAIN_TID", "HYPERCALL_TID", "perfetto"]

HYPERCALL_TID = 0
DOMAIN_TID = 1
EVTCHN_OP = int(Hypercall.event_channel_op)


def perfetto(events: Iterable[TraceEvent]) -> dict[str, Any]:
    """The trace-event JSON object: {"traceEvents": [...], "displayTimeUnit": "ns"}."""
    events = list(events)
    t0 = events[0].time_ns if events else 0

    def ts(time_ns: int) -> float:
        return round((time_ns - t0) / 1000, 3)

    out: list[dict[str, Any]] = []
    for domid in sorted({e.domid for e in events}):
        out += [
            {
                "ph": "M",
                "name": "process_name",
                "pid": domid,
                "tid": 0,
                "args": {"name": f"d{domid}"},
            },
            {
                "ph": "M",
                "name": "process_sort_index",
                "pid": domid,
                "tid": 0,
                "args": {"sort_index": domid},
            },
            {
                "ph": "M",
                "name": "thread_name",
                "pid": domid,
                "tid": HYPERCALL_TID,
                "args": {"name": "hypercalls"},
            },
            {
                "ph": "M",
                "name": "thread_name",
                "pid": domid,
                "tid": DOMAIN_TID,
                "args": {"name": "domain"},
            },
        ]
    peers: dict[tuple[int, int], tuple[int, int]] = {}  # (domid, port) -> (domid, port)
    flow = 0
    for event in events:
        if isinstance(event, LostRecords):
            out.append(
                {
                    "ph": "i",
                    "s": "p",
                    "name": describe(event),
                    "cat": "lost",
                    "pid": event.domid,
                    "tid": DOMAIN_TID,
                    "ts": ts(event.time_ns),
                }
            )
            continue
        key = (event.op, event.cmd)
        if key == (XenlikeOp.evtchn, EvtchnEvent.peer):
            if event.args[3] == EvtchnStat.interdomain:
                peers[(event.domid, event.args[0])] = (event.args[1], event.args[2])
            continue
        if key == (EVTCHN_OP, EvtchnOp.bind_interdomain) and event.result >= 0:
            peers.setdefault((event.args[0], event.args[1]), (event.domid, 0))
        if is_event(event.op):
            out.append(
                {
                    "ph": "i",
                    "s": "t",
                    "name": describe(event),
                    "cat": event.op_name,
                    "pid": event.domid,
                    "tid": DOMAIN_TID,
                    "ts": ts(event.time_ns),
                    "args": _args(event),
                }
            )
            continue
        tid = DOMAIN_TID if event.fast_path else HYPERCALL_TID
        out.append(
            {
                "ph": "X",
                "name": event.name,
                "cat": event.op_name,
                "pid": event.domid,
                "tid": tid,
                "ts": ts(event.time_ns),
                "dur": round(event.duration_ns / 1000, 3),
                "args": _args(event),
            }
        )
        peer = peers.get((event.domid, event.args[0]))
        if key == (EVTCHN_OP, EvtchnOp.send) and event.result >= 0 and peer is not None:
            flow += 1
            receiver, port = peer
            out += [
                {
                    "ph": "s",
                    "id": flow,
                    "name": "evtchn",
                    "cat": "evtchn",
                    "pid": event.domid,
                    "tid": tid,
                    "ts": ts(event.time_ns),
                },
                {
                    "ph": "X",
                    "name": f"evtchn wake port {port}" if port else "evtchn wake",
                    "cat": "evtchn",
                    "pid": receiver,
                    "tid": DOMAIN_TID,
                    "ts": ts(event.time_ns),
                    "dur": 0,
                    "args": {"from": f"d{event.domid}:{event.args[0]}"},
                },
                {
                    "ph": "f",
                    "bp": "e",
                    "id": flow,
                    "name": "evtchn",
                    "cat": "evtchn",
                    "pid": receiver,
                    "tid": DOMAIN_TID,
                    "ts": ts(event.time_ns),
                },
            ]
    return {"traceEvents": out, "displayTimeUnit": "ns"}


def _args(record: TraceRecord) -> dict[str, Any]:
    args: dict[str, Any] = dict(record.arguments)
    if record.count:
        args["count"] = record.count
    args["result"] = record.error or record.result
    return args
