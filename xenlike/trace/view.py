"""How `xenlike trace` shows records: the filters that pick them, and one line each.

Filters take what a Xen developer would type: a domid, an op by Xen's name
or number with an optional sub-op (`event_channel_op.send`,
`grant_table_op`, `20`, `32.4`), xenlike's own events by theirs
(`xenbus`, `ring.push_requests`), and durations with a unit (`100us`).
"""

import datetime
import functools
import re
from collections.abc import Callable

import attrs
import click

from xenlike.abi.event_channel import EvtchnStat
from xenlike.abi.xen import Hypercall
from xenlike.abi.xenbus import XenbusState
from xenlike.trace._record import LostRecords, TraceEvent, TraceRecord
from xenlike.trace.events import (
    EVENT_CMDS,
    EvtchnEvent,
    RingEvent,
    XenbusEvent,
    XenlikeOp,
    is_event,
    unpack_name,
)

__all__ = ["Filter", "OpSpec", "describe", "format_event", "parse_duration", "parse_op"]

_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
_PALETTE = (
    "cyan",
    "green",
    "magenta",
    "blue",
    "yellow",
    "bright_cyan",
    "bright_green",
    "bright_magenta",
)


def parse_duration(text: str) -> int:
    """'100us', '2ms', '1.5s', '500ns' as nanoseconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s)\s*", text)
    if found is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit "
            f"(ns, us, ms, s), e.g. 100us or 2ms"
        )
    return round(float(found.group(1)) * _UNITS[found.group(2)])


@functools.cache
def _op_names() -> dict[str, int]:
    names = {h.name: int(h) for h in Hypercall}
    names.update({op.name: int(op) for op in XenlikeOp})
    return names


@functools.cache
def _cmd_names(op: int) -> dict[str, int]:
    """The sub-ops the hypercall table (or xenlike's events) knows for `op`."""
    if is_event(op):
        cmds = EVENT_CMDS.get(op)
        return {c.name: int(c) for c in cmds} if cmds else {}
    from xenlike.hypervisor import HYPERCALLS

    return {entry.name.partition(".")[2]: entry.cmd for entry in HYPERCALLS if entry.op == op}


def _number(text: str) -> int | None:
    try:
        return int(text, 0)
    except ValueError:
        return None


@attrs.frozen
class OpSpec:
    """An op, and optionally one of its sub-ops, that `--op` selects."""

    op: int
    cmd: int | None = None

    def matches(self, record: TraceRecord) -> bool:
        return record.op == self.op and (self.cmd is None or record.cmd == self.cmd)


def parse_op(text: str) -> OpSpec:
    """'event_channel_op.send', 'grant_table_op', '20', '32.4', 'ring.push_requests'."""
    op_text, _, cmd_text = text.strip().partition(".")
    op = _number(op_text)
    if op is None:
        op = _op_names().get(op_text)
    if op is None:
        known = ", ".join(sorted(_op_names()))
        raise ValueError(f"no op named {op_text!r}; ops: {known}")
    if not cmd_text:
        return OpSpec(op)
    cmd = _number(cmd_text)
    if cmd is None:
        cmds = _cmd_names(op)
        if cmd_text not in cmds:
            known = ", ".join(sorted(cmds)) or "none known by name"
            raise ValueError(f"{op_text} has no sub-op named {cmd_text!r}; sub-ops: {known}")
        cmd = cmds[cmd_text]
    return OpSpec(op, cmd)


@attrs.frozen
class Filter:
    """Which records to show: all of the given conditions hold.

    Lost-record marks pass whenever their domain does: they say the view
    has a hole, whatever was asked for.
    """

    domains: frozenset[int] = frozenset()
    ops: tuple[OpSpec, ...] = ()
    errors: bool = False
    slower_than_ns: int | None = None

    def __call__(self, event: TraceEvent) -> bool:
        if self.domains and event.domid not in self.domains:
            return False
        if isinstance(event, LostRecords):
            return True
        if self.ops and not any(spec.matches(event) for spec in self.ops):
            return False
        if self.errors and event.result >= 0:
            return False
        return self.slower_than_ns is None or event.duration_ns > self.slower_than_ns


def format_duration(ns: int) -> str:
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.1f}us"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.2f}ms"
    return f"{ns / 1_000_000_000:.3f}s"


def _state(value: int) -> str:
    return XenbusState(value).name if value in XenbusState._value2member_map_ else str(value)


def _side(backend: int) -> str:
    return "backend" if backend else "frontend"


def _value(value: int) -> str:
    return str(value) if value < 0x7FF0 else hex(value)


def _describe_event(record: TraceRecord) -> str:
    a = record.args
    key = (record.op, record.cmd)
    if record.op == XenlikeOp.xenbus:
        device = f"{_side(record.count)} {unpack_name(a[0])}/{a[1]}"
        if record.cmd == XenbusEvent.state:
            return f"{device} -> {_state(a[2])}"
        return f"{device} saw {_side(not record.count)} (d{a[3]}) {_state(a[2])}"
    if key == (XenlikeOp.ring, RingEvent.attach):
        return f"{_side(record.count)} {unpack_name(a[0])}/{a[1]} (peer d{a[3]}) on port {a[2]}"
    if record.op == XenlikeOp.ring and record.cmd in (
        RingEvent.push_requests,
        RingEvent.push_responses,
    ):
        return f"port {a[0]} prod {a[1]} +{a[2]} {'notify' if a[3] else 'suppressed'}"
    if record.op == XenlikeOp.ring:
        return f"port {a[0]} cons {a[1]} {'more' if a[2] else 'sleep'}"
    if key == (XenlikeOp.evtchn, EvtchnEvent.peer):
        status = EvtchnStat(a[3]).name if a[3] in EvtchnStat._value2member_map_ else str(a[3])
        if a[3] == EvtchnStat.interdomain:
            return f"port {a[0]} -> d{a[1]}:{a[2]}"
        return f"port {a[0]} {status}"
    return " ".join(str(v) for v in a)


def describe(event: TraceEvent) -> str:
    """What happened, without time or domain: 'event_channel_op.send port=5'."""
    if isinstance(event, LostRecords):
        source = "domain" if event.fast_path else "hypervisor"
        return f"lost {event.count} records ({source} buffer)"
    if is_event(event.op):
        return f"{event.name} {_describe_event(event)}"
    words = [f"{k}={_value(v)}" for k, v in event.arguments.items()]
    if event.count > 1:  # a batch, or the bytes of a raw payload
        words.append(f"count={event.count}")
    return " ".join([event.name, *words])


def _result(record: TraceRecord) -> str:
    if record.result < 0:
        return record.error or str(record.result)
    if is_event(record.op):
        return ""
    return str(record.result)


def format_event(event: TraceEvent, wallclock: Callable[[int], int], *, color: bool = False) -> str:
    """One line: wall-clock time, domain, name and arguments, result, duration.

    `wallclock` turns a record's CLOCK_MONOTONIC time into CLOCK_REALTIME
    nanoseconds (`TraceFile.wallclock`, or the offset read when following).
    """
    stamp = datetime.datetime.fromtimestamp(wallclock(event.time_ns) / 1e9).strftime("%H:%M:%S.%f")
    domain = (
        click.style(f"d{event.domid:<4}", fg=_PALETTE[event.domid % len(_PALETTE)])
        if color
        else f"d{event.domid:<4}"
    )
    if isinstance(event, LostRecords):
        text = describe(event)
        return f"{stamp} {domain} {click.style(text, fg='red', bold=True) if color else text}"
    name, _, arguments = describe(event).partition(" ")
    result = _result(event)
    if event.fast_path and not is_event(event.op):
        timing = "fast path"
    elif event.duration_ns:
        timing = format_duration(event.duration_ns)
    else:
        timing = ""
    if color:
        name = click.style(f"{name:<34}", dim=is_event(event.op), bold=not is_event(event.op))
        if event.result < 0:
            result = click.style(result, fg="red", bold=True)
        if event.duration_ns >= 1_000_000:
            timing = click.style(timing, fg="yellow")
    else:
        name = f"{name:<34}"
    tail = "  ".join(part for part in (f"= {result}" if result else "", timing) if part)
    return f"{stamp} {domain} {name} {arguments:<40} {tail}".rstrip()
