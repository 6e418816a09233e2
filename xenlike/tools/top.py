"""`xenlike top`: each domain's CPU, memory, hypercalls and I/O, refreshed, as xentop shows.

CPU time, memory, its maximum and the vCPUs come from getdomaininfo, as
xentop's do; `--json` adds each domain's metering since its creation
(`uptime_s`, `mem_mib_s`: what `xenlike usage` reports). Hypercalls
per second and event sends per second come from the trace buffers: top is
a trace reader while it runs, so tracing is on meanwhile (a reader costs
a few percent; see bench/trace.py). Records a buffer lost before top read
them still count, by which buffer lost them.

Block and network counters are what the back ends publish in XenStore, in
each device's back-end directory under `statistics/`, with Linux blkback's
and netback's names; a key that is absent reads 0::

    backend/vbd/<domid>/<devid>/statistics/rd_req     read requests
                                          /wr_req     write requests
                                          /rd_sect    512-byte sectors read
                                          /wr_sect    512-byte sectors written
                                          /oo_req     requests that waited for a free slot
    backend/vif/<domid>/<devid>/statistics/tx_packets frames the guest transmitted
                                          /tx_bytes
                                          /rx_packets frames delivered to the guest
                                          /rx_bytes

Counts are totals since the device connected, from the guest's side (tx is
what the guest sent), as xentop shows them; a back end updates them at
whatever pace suits it (once a second is plenty).

A device of any other type shows what its back end publishes under
`statistics/` (`Backend.publish_statistics`), summed per type, in the last
column (`faulty served=12`) and in `--json` as `devices`.

On a terminal the table fits its width (the least telling columns go
first) and `q` quits.
"""

import functools
import json
import os
import shutil
import sys
import termios
import time
import tty
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import click
import trio

from xenlike.abi.domctl import (
    XEN_DOMINF_blocked,
    XEN_DOMINF_dying,
    XEN_DOMINF_paused,
    XEN_DOMINF_running,
    XEN_DOMINF_shutdown,
    XEN_DOMINF_shutdownshift,
)
from xenlike.abi.event_channel import EvtchnOp
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import Hypercall
from xenlike.tools.session import NotRunning, find_run_dir
from xenlike.trace import LostRecords, TraceReader
from xenlike.trace.events import is_event
from xenlike.trace.live import run_until_interrupted

__all__ = [
    "VBD_KEYS",
    "VIF_KEYS",
    "TopSampler",
    "device_counters",
    "format_frame",
    "open_sampler",
    "rows",
    "state_letters",
    "top",
]

VBD_KEYS = ("rd_req", "wr_req", "rd_sect", "wr_sect", "oo_req")
VIF_KEYS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")
READ_INTERVAL = 0.05  # seconds between reads of the trace buffers
RESCAN_INTERVAL = 0.5  # ... and between looks for new domains' buffers
SEND = (int(Hypercall.event_channel_op), int(EvtchnOp.send))
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
CLEAR = "\x1b[H\x1b[2J"


def state_letters(flags: int) -> str:
    """xentop's STATE column: d(ying) s(hutdown) b(locked) p(aused) c(rashed) r(unning)."""
    shutdown = bool(flags & XEN_DOMINF_shutdown)
    crashed = shutdown and (flags >> XEN_DOMINF_shutdownshift & 0xFF) == ShutdownReason.crash
    return "".join(
        letter if on else "-"
        for letter, on in (
            ("d", flags & XEN_DOMINF_dying),
            ("s", shutdown and not crashed),
            ("b", flags & XEN_DOMINF_blocked),
            ("p", flags & XEN_DOMINF_paused),
            ("c", crashed),
            ("r", flags & XEN_DOMINF_running),
        )
    )


@attrs.frozen
class Sample:
    """What one look at the topology found; rates come from two of them."""

    time: float  # time.monotonic()
    total_pages: int
    infos: dict[int, Any]  # domid -> getdomaininfo
    names: dict[int, str]
    hypercalls: dict[int, int]  # since top started
    sends: dict[int, int]
    devices: dict[int, dict[str, Any]]  # domid -> VBD_KEYS and VIF_KEYS summed, and "devices"
    usage: dict[int, Any] = attrs.field(factory=dict)  # domid -> metering (xenlike_usage)


class TopSampler:
    """Samples the topology: domctl for CPU and memory, XenStore for I/O, traces for calls."""

    def __init__(self, xc: Any, xs: Any, reader: TraceReader) -> None:
        self._xc = xc
        self._xs = xs
        self._reader = reader
        self._hypercalls: Counter[int] = Counter()
        self._sends: Counter[int] = Counter()

    async def count_calls(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Count every domain's records until cancelled or the hypervisor stops."""
        task_status.started()
        try:
            await self._count_calls()
        except ConnectionError:
            pass  # the hypervisor stopped: the next sample says so

    async def _count_calls(self) -> None:
        next_scan = trio.current_time() + RESCAN_INTERVAL
        while True:
            self._absorb()
            await trio.sleep(READ_INTERVAL)
            if trio.current_time() >= next_scan:
                next_scan = trio.current_time() + RESCAN_INTERVAL
                await self._reader.rescan()

    def _absorb(self) -> None:
        """Count the records written since the last look."""
        for event in self._reader.read_available():
            if isinstance(event, LostRecords):
                counter = self._sends if event.fast_path else self._hypercalls
                counter[event.domid] += event.count
            elif (event.op, event.cmd) == SEND:
                self._sends[event.domid] += 1
                self._hypercalls[event.domid] += not event.fast_path
            elif not is_event(event.op):
                self._hypercalls[event.domid] += 1

    async def sample(self) -> Sample:
        from xenlike.tools.domains import usage_records

        physinfo = await self._xc.physinfo()
        infos = {info.domain: info for info in await self._xc.list_domains()}
        usage = await usage_records(self._xc)
        names = {}
        devices = {}
        for domid in infos:
            name = await self._xs.read_optional(f"/local/domain/{domid}/name")
            names[domid] = name or f"d{domid}"
            devices[domid] = {
                **await device_counters(self._xs, domid),
                "devices": await self._custom_counters(domid),
            }
        self._absorb()  # up to now, not up to the counting task's last look
        return Sample(
            time.monotonic(),
            physinfo.total_pages,
            infos,
            names,
            dict(self._hypercalls),
            dict(self._sends),
            devices,
            usage,
        )

    async def _custom_counters(self, domid: int) -> dict[str, dict[str, int]]:
        """Every other device type's published statistics, summed per type."""
        found: dict[str, dict[str, int]] = {}
        home = f"/local/domain/{domid}/device"
        for device_type in await self._xs.ls_optional(home):
            if device_type in ("vbd", "vif"):
                continue
            for devid in await self._xs.ls_optional(f"{home}/{device_type}"):
                backend = await self._xs.read_optional(f"{home}/{device_type}/{devid}/backend")
                if backend is None:
                    continue
                stats = f"{backend}/statistics"
                for key in await self._xs.ls_optional(stats):
                    value = await self._xs.read_optional(f"{stats}/{key}")
                    if value is not None and value.isascii() and value.isdigit():
                        counters = found.setdefault(device_type, {})
                        counters[key] = counters.get(key, 0) + int(value)
        return found


async def device_counters(xs: Any, domid: int) -> dict[str, int]:
    """The domain's vbd and vif counters (VBD_KEYS, VIF_KEYS) summed over its devices,
    and how many of each it has (`vbds`, `vifs`)."""
    totals = dict.fromkeys((*VBD_KEYS, *VIF_KEYS), 0)
    for device_type, keys in (("vbd", VBD_KEYS), ("vif", VIF_KEYS)):
        home = f"/local/domain/{domid}/device/{device_type}"
        devids = await xs.ls_optional(home)
        totals[f"{device_type}s"] = len(devids)
        for devid in devids:
            backend = await xs.read_optional(f"{home}/{devid}/backend")
            if backend is None:
                continue
            for key in keys:
                value = await xs.read_optional(f"{backend}/statistics/{key}")
                totals[key] += int(value) if value and value.isdigit() else 0
    return totals


@asynccontextmanager
async def open_sampler(run_dir: Path) -> AsyncIterator[TopSampler]:
    """A sampler of the topology in `run_dir`, counting calls in the background."""
    from xenlike.xc import XenControl
    from xenlike.xenstore import open_client

    async with (
        XenControl.connect(run_dir) as xc,
        open_client(run_dir / "xenstored" / "socket") as xs,
        trio.open_nursery() as nursery,
    ):
        with await TraceReader.open(run_dir) as reader:
            sampler = TopSampler(xc, xs, reader)
            await nursery.start(sampler.count_calls)
            yield sampler
            nursery.cancel_scope.cancel()


def rows(before: Sample, after: Sample) -> list[dict[str, Any]]:
    """One row per domain present in `after`, with rates over the time between the two."""
    elapsed = max(after.time - before.time, 1e-9)
    out = []
    for domid, info in sorted(after.infos.items()):
        old = before.infos.get(domid)
        cpu_ns = info.cpu_time - (old.cpu_time if old is not None else info.cpu_time)
        io = after.devices.get(domid, {})
        metered = after.usage.get(domid)
        out.append(
            {
                "name": after.names.get(domid, f"d{domid}"),
                "domid": domid,
                "state": state_letters(info.flags),
                "cpu_s": round(info.cpu_time / 1e9, 1),
                "cpu_pct": round(max(cpu_ns, 0) / 1e9 / elapsed * 100, 1),
                "mem_k": info.tot_pages * 4,
                "maxmem_k": info.max_pages * 4,
                "mem_pct": round(info.tot_pages / after.total_pages * 100, 1)
                if after.total_pages
                else 0.0,
                "maxmem_pct": round(info.max_pages / after.total_pages * 100, 1)
                if after.total_pages
                else 0.0,
                "vcpus": info.nr_online_vcpus,
                "uptime_s": round(metered.uptime_ms / 1000, 1) if metered else None,
                "mem_mib_s": round(metered.memory_kib_seconds / 1024, 1) if metered else None,
                "hypercalls_s": round(
                    (after.hypercalls.get(domid, 0) - before.hypercalls.get(domid, 0)) / elapsed, 1
                ),
                "evtchn_sends_s": round(
                    (after.sends.get(domid, 0) - before.sends.get(domid, 0)) / elapsed, 1
                ),
                **io,
            }
        )
    return out


_COLUMNS = (  # header, key, width, format
    ("NAME", "name", 12, "{}"),
    ("ID", "domid", 4, "{}"),
    ("STATE", "state", 6, "{}"),
    ("CPU(sec)", "cpu_s", 8, "{:.1f}"),
    ("CPU(%)", "cpu_pct", 6, "{:.1f}"),
    ("MEM(k)", "mem_k", 8, "{}"),
    ("MEM(%)", "mem_pct", 6, "{:.1f}"),
    ("MAXMEM(k)", "maxmem_k", 9, "{}"),
    ("MAXMEM(%)", "maxmem_pct", 9, "{:.1f}"),
    ("VCPUS", "vcpus", 5, "{}"),
    ("HCALL/s", "hypercalls_s", 8, "{:.0f}"),
    ("EVTCHN/s", "evtchn_sends_s", 8, "{:.0f}"),
    ("VBDS", "vbds", 4, "{}"),
    ("VBD_OO", "oo_req", 6, "{}"),
    ("VBD_RD", "rd_req", 7, "{}"),
    ("VBD_WR", "wr_req", 7, "{}"),
    ("VBD_RSECT", "rd_sect", 9, "{}"),
    ("VBD_WSECT", "wr_sect", 9, "{}"),
    ("NETS", "vifs", 4, "{}"),
    ("NETTX(pk)", "tx_packets", 9, "{}"),
    ("NETRX(pk)", "rx_packets", 9, "{}"),
    ("NETTX(k)", "tx_bytes", 8, "{}"),
    ("NETRX(k)", "rx_bytes", 8, "{}"),
)


# Which columns stay when the terminal is narrow: the first ones of this order.
_PRIORITY = (
    "name",
    "domid",
    "state",
    "cpu_pct",
    "mem_k",
    "hypercalls_s",
    "evtchn_sends_s",
    "rd_req",
    "wr_req",
    "tx_packets",
    "rx_packets",
    "cpu_s",
    "mem_pct",
    "maxmem_k",
    "maxmem_pct",
    "vcpus",
    "vbds",
    "vifs",
    "oo_req",
    "rd_sect",
    "wr_sect",
    "tx_bytes",
    "rx_bytes",
)


def format_frame(table: list[dict[str, Any]], width: int | None = None) -> str:
    """xentop's table: a header, then one line per domain; at most `width` columns
    wide (the least telling columns left out), with other devices' statistics last."""
    clock = time.strftime("%H:%M:%S")
    running = sum("r" in row["state"] for row in table)
    columns = list(_COLUMNS)
    if width is not None:
        kept, used = set(), -1
        for key in _PRIORITY:
            column_width = next(w for _, k, w, _ in _COLUMNS if k == key)
            if used + 1 + column_width > width:
                break
            kept.add(key)
            used += 1 + column_width
        columns = [column for column in _COLUMNS if column[1] in kept]
    header = " ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, _, w, _) in enumerate(columns))
    lines = [f"xenlike top - {clock}   {len(table)} domains: {running} running", header]
    for row in table:
        cells = []
        for i, (_, key, column_width, fmt) in enumerate(columns):
            value = row[key]
            if key in ("tx_bytes", "rx_bytes"):
                value //= 1024
            text = fmt.format(value)
            cells.append(
                f"{text[:column_width]:<{column_width}}" if i == 0 else f"{text:>{column_width}}"
            )
        custom = " ".join(
            f"{device_type} " + " ".join(f"{k}={v}" for k, v in counters.items())
            for device_type, counters in row.get("devices", {}).items()
        )
        lines.append(" ".join(cells) + (f"  {custom}" if custom else ""))
    return "\n".join(line[:width] if width is not None else line for line in lines)


async def run_top(
    run_dir: Path,
    delay: float,
    iterations: int | None,
    emit: Callable[[list[dict[str, Any]]], None],
    *,
    stop: trio.Event,
    keys: int | None = None,
) -> None:
    """Emit a table every `delay` seconds, `iterations` times (None: until `stop`);
    `q` on the terminal `keys` (a file descriptor in cbreak mode) stops too."""
    async with open_sampler(run_dir) as sampler, trio.open_nursery() as nursery:
        if keys is not None:
            nursery.start_soon(_quit_on_q, keys, stop)
        before = await sampler.sample()
        shown = 0
        while iterations is None or shown < iterations:
            with trio.move_on_after(delay):
                await stop.wait()
            if stop.is_set():
                break
            after = await sampler.sample()
            emit(rows(before, after))
            before = after
            shown += 1
        nursery.cancel_scope.cancel()


async def _quit_on_q(fd: int, stop: trio.Event) -> None:
    while True:
        await trio.lowlevel.wait_readable(fd)
        data = os.read(fd, 64)
        if not data or b"q" in data.lower():
            stop.set()
            return


@click.command(context_settings=CONTEXT)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The topology's run directory (default: the running one; $XENLIKE_RUN_DIR).",
)
@click.option(
    "--batch",
    "-b",
    is_flag=True,
    help="Print each table after the last instead of redrawing (for scripts).",
)
@click.option(
    "--iterations",
    "-i",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after N tables (default: until Ctrl-C).",
)
@click.option(
    "--delay",
    "-d",
    type=click.FloatRange(min=0.05),
    default=1.0,
    show_default=True,
    help="Seconds between tables.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print each table as one JSON object per line instead."
)
def top(
    run_dir: Path | None, batch: bool, iterations: int | None, delay: float, as_json: bool
) -> None:
    """Show each domain's CPU, memory, hypercalls, event sends and I/O, as xentop does.

    CPU seconds and %, memory and its maximum, vCPUs, hypercalls and
    event-channel sends per second (from the trace buffers: tracing is on while
    top runs), and the block and network counters the back ends publish under
    statistics/ in XenStore. --json adds each domain's uptime and memory
    MiB-seconds since its creation (see `xenlike usage`).

    \b
    Example:
        xenlike top
        xenlike top --batch --iterations 3 --delay 2
        xenlike top --json -i 1 | jq '.domains[] | {name, cpu_pct}'
    """
    try:
        rd = find_run_dir(run_dir)
    except NotRunning as exc:
        click.echo(f"xenlike top: {exc}", err=True)
        sys.exit(1)
    redraw = not batch and not as_json and sys.stdout.isatty()

    def emit(table: list[dict[str, Any]]) -> None:
        if as_json:
            click.echo(json.dumps({"time": time.time(), "domains": table}))
        elif redraw:
            width = shutil.get_terminal_size().columns
            click.echo(CLEAR + format_frame(table, width) + "\n(q quits)")
        else:
            click.echo(format_frame(table) + "\n")

    stdin = sys.stdin.fileno()
    interactive = redraw and os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if interactive else None
    try:
        if saved is not None:
            tty.setcbreak(stdin)
        run_until_interrupted(
            functools.partial(run_top, keys=stdin if interactive else None),
            rd.path,
            delay,
            iterations,
            emit,
        )
    except BrokenPipeError:  # the reader went away: the CLI ends quietly
        raise
    except ConnectionError as exc:
        click.echo(f"xenlike top: {exc}", err=True)
        sys.exit(1)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
