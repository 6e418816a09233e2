"""A trace summarised as xenalyze does: who called what, how often, how fast, what failed.

`summarize` turns the records of a trace file into plain data (what
`xenlike trace report --json` prints); `render` lays it out as tables.
Latencies are the hypervisor's: from a call's entry to its result, so
fast-path sends (which never reach it) and xenlike's own events have none.
Ring figures need ring events (`xenlike trace --rings`): without them a
port's suppressed share is unknown (null), not zero.
"""

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from xenlike.abi.event_channel import EvtchnOp, EvtchnStat
from xenlike.abi.grant_table import GnttabOp
from xenlike.abi.xen import Hypercall
from xenlike.trace._record import LostRecords, TraceEvent, TraceRecord
from xenlike.trace.events import (
    EvtchnEvent,
    RingEvent,
    XenlikeOp,
    is_event,
    unpack_name,
)

__all__ = ["percentile", "render", "summarize"]

EVTCHN_OP = int(Hypercall.event_channel_op)
GNTTAB_OP = int(Hypercall.grant_table_op)
BUSIEST_RINGS = 10


def percentile(sorted_values: list[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending list (which must not be empty)."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def summarize(events: Iterable[TraceEvent]) -> dict[str, Any]:
    """Counts, failures, latencies, event-channel sends, grants and rings, per domain."""
    events = list(events)
    records = [e for e in events if isinstance(e, TraceRecord)]
    lost = [e for e in events if isinstance(e, LostRecords)]
    calls = [r for r in records if not is_event(r.op)]

    per_domain: dict[int, Counter[str]] = defaultdict(Counter)
    for event in events:
        tally = per_domain[event.domid]
        if isinstance(event, LostRecords):
            tally["lost"] += event.count
        elif is_event(event.op):
            tally["events"] += 1
        else:
            tally["hypercalls"] += not event.fast_path
            tally["fast_path_sends"] += event.fast_path
            tally["failures"] += event.result < 0

    latencies: dict[tuple[int, str], list[int]] = defaultdict(list)
    counts: Counter[tuple[int, str]] = Counter()
    failures: Counter[tuple[int, str, str]] = Counter()
    failed: Counter[tuple[int, str]] = Counter()
    for record in calls:
        key = (record.domid, record.name)
        counts[key] += 1
        if not record.fast_path:
            latencies[key].append(record.duration_ns)
        if record.result < 0:
            failures[(record.domid, record.name, record.error or str(record.result))] += 1
            failed[key] += 1
    hypercalls = []
    for (domid, name), count in sorted(counts.items()):
        row: dict[str, Any] = {
            "domid": domid,
            "name": name,
            "count": count,
            "failures": failed[(domid, name)],
        }
        durations = sorted(latencies.get((domid, name), []))
        if durations:
            row.update(
                p50_us=_us(percentile(durations, 0.5)),
                p99_us=_us(percentile(durations, 0.99)),
                max_us=_us(durations[-1]),
            )
        else:
            row.update(p50_us=None, p99_us=None, max_us=None)
        hypercalls.append(row)

    return {
        "records": len(records),
        "lost": sum(e.count for e in lost),
        "duration_s": round((events[-1].time_ns - events[0].time_ns) / 1e9, 6) if events else 0.0,
        "domains": [
            {
                "domid": domid,
                "hypercalls": c["hypercalls"],
                "fast_path_sends": c["fast_path_sends"],
                "failures": c["failures"],
                "events": c["events"],
                "lost": c["lost"],
            }
            for domid, c in sorted(per_domain.items())
        ],
        "hypercalls": hypercalls,
        "failures": [
            {"domid": d, "name": n, "error": e, "count": c}
            for (d, n, e), c in sorted(failures.items())
        ],
        "evtchn_sends": _sends(records),
        "grants": _grants(calls),
        "rings": _rings(records),
    }


def _ring_pushes(records: list[TraceRecord]) -> dict[tuple[int, int], Counter[str]]:
    pushes: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for r in records:
        if r.op == XenlikeOp.ring and r.cmd in (RingEvent.push_requests, RingEvent.push_responses):
            ring = pushes[(r.domid, r.args[0])]
            ring["pushes"] += 1
            ring["entries"] += r.args[2]
            ring["notified"] += bool(r.args[3])
        elif r.op == XenlikeOp.ring and r.cmd in (
            RingEvent.final_check_requests,
            RingEvent.final_check_responses,
        ):
            ring = pushes[(r.domid, r.args[0])]
            ring["final_checks"] += 1
            ring["sleeps"] += not r.args[2]
    return pushes


def _sends(records: list[TraceRecord]) -> list[dict[str, Any]]:
    """Sends per (domain, port), each port's peer, and how many notifies its ring held back."""
    sends: Counter[tuple[int, int]] = Counter()
    fast: Counter[tuple[int, int]] = Counter()
    peers: dict[tuple[int, int], str] = {}
    for r in records:
        if (r.op, r.cmd) == (EVTCHN_OP, EvtchnOp.send):
            sends[(r.domid, r.args[0])] += 1
            fast[(r.domid, r.args[0])] += r.fast_path
        elif (r.op, r.cmd) == (XenlikeOp.evtchn, EvtchnEvent.peer) and r.args[
            3
        ] == EvtchnStat.interdomain:
            peers[(r.domid, r.args[0])] = f"d{r.args[1]}:{r.args[2]}"
    pushes = _ring_pushes(records)
    rows = []
    for (domid, port), count in sorted(sends.items()):
        ring = pushes.get((domid, port))
        row: dict[str, Any] = {
            "domid": domid,
            "port": port,
            "peer": peers.get((domid, port)),
            "sends": count,
            "fast_path": fast[(domid, port)],
            "ring_pushes": None,
            "suppressed": None,
            "suppressed_share": None,
        }
        if ring and ring["pushes"]:
            suppressed = ring["pushes"] - ring["notified"]
            row.update(
                ring_pushes=ring["pushes"],
                suppressed=suppressed,
                suppressed_share=round(suppressed / ring["pushes"], 4),
            )
        rows.append(row)
    return rows


def _grants(calls: list[TraceRecord]) -> list[dict[str, Any]]:
    """Grant maps and unmaps per domain: calls, and grant refs in their batches."""
    rows: dict[int, Counter[str]] = defaultdict(Counter)
    for r in calls:
        if r.op != GNTTAB_OP or r.cmd not in (GnttabOp.map_grant_ref, GnttabOp.unmap_grant_ref):
            continue
        kind = "map" if r.cmd == GnttabOp.map_grant_ref else "unmap"
        row = rows[r.domid]
        row[f"{kind}_calls"] += 1
        row[f"{kind}_refs"] += r.count
        row[f"{kind}_failures"] += r.result < 0
    keys = ("map_calls", "map_refs", "map_failures", "unmap_calls", "unmap_refs", "unmap_failures")
    return [{"domid": domid, **{k: row[k] for k in keys}} for domid, row in sorted(rows.items())]


def _rings(records: list[TraceRecord]) -> list[dict[str, Any]]:
    """The busiest rings by entries pushed, each named by its `ring.attach` record."""
    names: dict[tuple[int, int], tuple[str, str]] = {}
    for r in records:
        if (r.op, r.cmd) == (XenlikeOp.ring, RingEvent.attach):
            names[(r.domid, r.args[2])] = (
                f"{unpack_name(r.args[0])}/{r.args[1]}",
                "backend" if r.count else "frontend",
            )
    rows: list[dict[str, Any]] = []
    for (domid, port), ring in _ring_pushes(records).items():
        device, side = names.get((domid, port), (None, None))
        rows.append(
            {
                "domid": domid,
                "port": port,
                "device": device,
                "side": side,
                "pushes": ring["pushes"],
                "entries": ring["entries"],
                "notified": ring["notified"],
                "suppressed": ring["pushes"] - ring["notified"],
                "final_checks": ring["final_checks"],
                "sleeps": ring["sleeps"],
            }
        )
    rows.sort(key=lambda row: (-row["entries"], -row["pushes"], row["domid"], row["port"]))
    return rows[:BUSIEST_RINGS]


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    numeric = [all(_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: list[str]) -> str:
        return (
            "  "
            + "  ".join(
                v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric)
            ).rstrip()
        )

    return [line(headers), *(line(r) for r in cells)]


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("%", "").lstrip("-").isdigit() or text == "-"


def render(summary: dict[str, Any]) -> str:
    """The summary as the tables `xenlike trace report` prints."""
    out = [f"{summary['records']} records, {summary['lost']} lost, {summary['duration_s']:.3f} s"]

    def section(title: str, headers: list[str], rows: list[list[Any]]) -> None:
        out.append("")
        out.append(title)
        out.extend(_table(headers, rows) if rows else ["  (none)"])

    section(
        "domains",
        ["domain", "hypercalls", "fast-path sends", "failures", "events", "lost"],
        [
            [
                f"d{d['domid']}",
                d["hypercalls"],
                d["fast_path_sends"],
                d["failures"],
                d["events"],
                d["lost"],
            ]
            for d in summary["domains"]
        ],
    )
    section(
        "hypercalls",
        ["domain", "hypercall", "count", "failures", "p50 us", "p99 us", "max us"],
        [
            [
                f"d{h['domid']}",
                h["name"],
                h["count"],
                h["failures"],
                h["p50_us"],
                h["p99_us"],
                h["max_us"],
            ]
            for h in summary["hypercalls"]
        ],
    )
    section(
        "failures",
        ["domain", "hypercall", "error", "count"],
        [[f"d{f['domid']}", f["name"], f["error"], f["count"]] for f in summary["failures"]],
    )
    section(
        "event-channel sends",
        ["domain", "port", "peer", "sends", "fast path", "ring pushes", "suppressed"],
        [
            [
                f"d{s['domid']}",
                s["port"],
                s["peer"],
                s["sends"],
                s["fast_path"],
                s["ring_pushes"],
                None if s["suppressed_share"] is None else f"{s['suppressed_share']:.1%}",
            ]
            for s in summary["evtchn_sends"]
        ],
    )
    section(
        "grant maps",
        [
            "domain",
            "map calls",
            "refs mapped",
            "map failures",
            "unmap calls",
            "refs unmapped",
            "unmap failures",
        ],
        [
            [
                f"d{g['domid']}",
                g["map_calls"],
                g["map_refs"],
                g["map_failures"],
                g["unmap_calls"],
                g["unmap_refs"],
                g["unmap_failures"],
            ]
            for g in summary["grants"]
        ],
    )
    section(
        "busiest rings",
        [
            "domain",
            "port",
            "device",
            "side",
            "pushes",
            "entries",
            "notified",
            "suppressed",
            "sleeps",
        ],
        [
            [
                f"d{r['domid']}",
                r["port"],
                r["device"],
                r["side"],
                r["pushes"],
                r["entries"],
                r["notified"],
                r["suppressed"],
                r["sleeps"],
            ]
            for r in summary["rings"]
        ],
    )
    return "\n".join(out)
