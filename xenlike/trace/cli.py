"""`xenlike trace ...`: follow, record, show, summarise and export hypercall traces.

Thin commands: they parse, call `xenlike.trace.live` / `view` / `report` /
`export`, and print.
"""

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
import trio

from xenlike.tools.session import NotRunning, find_run_dir
from xenlike.trace._file import BadTraceFile, load
from xenlike.trace._record import TraceEvent
from xenlike.trace.export import perfetto
from xenlike.trace.live import (
    monotonic_to_wallclock,
    run_until_interrupted,
    trace_topology,
)
from xenlike.trace.report import render, summarize
from xenlike.trace.view import Filter, format_event, parse_duration, parse_op
from xenlike.trace.xentrace import CPU_HZ, FORMATS, ExportTooLarge, XentraceExport, xentrace

__all__ = ["trace"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
HYPERVISOR_WAIT = 10.0  # seconds `trace --record` waits for a topology that is starting


def _fail(message: str) -> None:
    click.echo(f"xenlike trace: {message}", err=True)
    sys.exit(1)


def _filter_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--domain",
                "-d",
                "domains",
                multiple=True,
                help="Only this domain: a domid, or a guest's name while the topology "
                "runs. Repeatable.",
            ),
            click.option(
                "--op",
                "ops",
                multiple=True,
                help="Only this op, by Xen's name or number, with or without a sub-op: "
                "event_channel_op.send, grant_table_op, 20, xenbus. Repeatable.",
            ),
            click.option("--errors", is_flag=True, help="Only failed calls."),
            click.option(
                "--slower-than",
                metavar="DURATION",
                help="Only calls that took longer, e.g. 100us, 2ms.",
            ),
        ]
    ):
        func = option(func)
    return func


def _filter(
    domains: tuple[str, ...],
    ops: tuple[str, ...],
    errors: bool,
    slower_than: str | None,
    names: dict[str, int] | None = None,
) -> Filter:
    """The filter the options describe; bad values are usage errors, with what is valid."""
    domids = set()
    for domain in domains:
        text = domain[1:] if domain[:1] == "d" and domain[1:].isdigit() else domain
        if text.isdigit():
            domids.add(int(text))
        elif names is not None and domain in names:
            domids.add(names[domain])
        elif names is None:
            raise click.BadParameter(
                f"{domain!r}: a saved trace knows domids only, not names", param_hint="--domain"
            )
        else:
            raise click.BadParameter(
                f"no domain named {domain!r}; running: {', '.join(sorted(names)) or 'none'}",
                param_hint="--domain",
            )
    try:
        specs = tuple(parse_op(op) for op in ops)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--op") from None
    try:
        slower = parse_duration(slower_than) if slower_than is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--slower-than") from None
    return Filter(frozenset(domids), specs, errors, slower)


async def _domain_names(run_dir: Path) -> dict[str, int]:
    from xenlike.xenstore import XenStoreError, open_client

    names: dict[str, int] = {}
    try:
        async with open_client(run_dir / "xenstored" / "socket") as xs:
            for domid in await xs.ls("/local/domain"):
                try:
                    names[(await xs.read(f"/local/domain/{domid}/name")).decode()] = int(domid)
                except XenStoreError:
                    pass
    except OSError:
        pass  # no xenstored (yet): domids only
    return names


def _load(file: Path) -> Any:
    try:
        return load(file)
    except BadTraceFile as exc:
        _fail(str(exc))


@click.group(invoke_without_command=True, context_settings=CONTEXT)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The topology's run directory (default: the running one; $XENLIKE_RUN_DIR).",
)
@_filter_options
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Save every record to FILE as it comes (the filters choose only what is printed).",
)
@click.option(
    "--rings",
    metavar="DEVICE",
    is_flag=False,
    flag_value="all",
    default=None,
    help="Record ring events too: pushes, notifies sent or suppressed, final checks. "
    "All devices, or NAME, NAME/TYPE, NAME/TYPE/DEVID.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["xltrace", "xentrace"]),
    default="xltrace",
    show_default=True,
    help="The --record file's format: xenlike's own, or Xen's binary trace format for "
    "xenalyze and xentrace_format (written when the recording ends).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print no records (with --record).")
@click.option(
    "--history",
    is_flag=True,
    help="First replay what the buffers still hold from before (an earlier "
    "reader's time); by default a reader starts at the present.",
)
@click.pass_context
def trace(
    ctx: click.Context,
    run_dir: Path | None,
    domains: tuple[str, ...],
    ops: tuple[str, ...],
    errors: bool,
    slower_than: str | None,
    record: Path | None,
    rings: str | None,
    fmt: str,
    quiet: bool,
    history: bool,
) -> None:
    """Follow the running topology's hypercalls, one line each, until Ctrl-C.

    Each line: time, domain, Xen's op.sub-op, decoded arguments, the result
    (an errno name on failure) and how long the hypervisor took. Fast-path
    event sends and XenBus handshakes show too. Lines come about a quarter
    of a second behind.

    \b
    Example:
        xenlike trace                                  # everything, live
        xenlike trace -d alpha --op event_channel_op.send
        xenlike trace --errors --slower-than 100us
        xenlike trace --record boot.xltrace --rings    # save; ring events too
        xenlike trace --record boot.xentrace --format xentrace   # for xenalyze
        xenlike trace show boot.xltrace --op grant_table_op
    """
    if ctx.invoked_subcommand is not None:
        return
    if fmt == "xentrace" and record is None:
        raise click.BadParameter("is for --record FILE, which is missing", param_hint="--format")
    # Xen's format is written in one go at the end (each pCPU's stream starts with its
    # length): until then the records stream into a xenlike file beside it.
    recording = (
        record
        if fmt == "xltrace" or record is None
        else record.with_name(f".{record.name}.{os.getpid()}.xltrace")
    )
    try:
        rd = find_run_dir(run_dir, running=record is None)
    except NotRunning as exc:
        _fail(str(exc))
    wait = HYPERVISOR_WAIT if record is not None else 0.0
    names = trio.run(_domain_names, rd.path)
    target = (rings or "all").split("/")[0]
    if target != "all" and names and target not in names:
        _fail(f"--rings {rings}: no domain named {target!r}; running: {', '.join(sorted(names))}")
    keep = _filter(domains, ops, errors, slower_than, names)
    wallclock = monotonic_to_wallclock()
    color = sys.stdout.isatty()
    seen = [0]

    def show(event: TraceEvent) -> None:
        seen[0] += 1
        if not quiet and keep(event):
            click.echo(format_event(event, wallclock, color=color))

    def ready(touched: list[str]) -> None:
        if rings is not None and not quiet:
            click.echo(f"ring events on for: {', '.join(touched) or 'no device'}", err=True)

    try:
        run_until_interrupted(
            functools.partial(
                trace_topology,
                rd.path,
                show,
                record=recording,
                rings=rings,
                wait=wait,
                on_ready=ready,
                history=history,
            )
        )
    except BrokenPipeError:  # the reader went away: the CLI ends quietly
        raise
    except ConnectionError as exc:
        _fail(str(exc))
    finally:
        if record is not None and recording is not None and recording != record:
            _convert(recording, record)
    if record is not None and not quiet:
        click.echo(f"recorded {seen[0]} records to {record}", err=True)


def _convert(recording: Path, record: Path) -> None:
    """The xenlike file `recording` as Xen's format in `record`; the xenlike file goes."""
    try:
        exported = xentrace(load(recording).events)
    except (OSError, BadTraceFile):
        return  # nothing was recorded: no file, as with --record FILE alone
    except ExportTooLarge as exc:
        _fail(f"{exc}; the records are kept in {recording}")
    _write(record, exported.data)
    recording.unlink()


@trace.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_filter_options
def show(
    file: Path,
    domains: tuple[str, ...],
    ops: tuple[str, ...],
    errors: bool,
    slower_than: str | None,
) -> None:
    """Print a saved trace, one line a record, with the same filters as live.

    \b
    Example:
        xenlike trace show boot.xltrace
        xenlike trace show boot.xltrace -d 1 --op event_channel_op --errors
    """
    keep = _filter(domains, ops, errors, slower_than)
    loaded = _load(file)
    color = sys.stdout.isatty()
    for event in loaded.events:
        if keep(event):
            click.echo(format_event(event, loaded.wallclock, color=color))


@trace.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def report(file: Path, as_json: bool) -> None:
    """Summarise a saved trace, as xenalyze does.

    Per domain and per hypercall: counts, failures by errno, latency
    percentiles (p50, p99, max); event-channel sends per port with the share
    of notifies the ring's event fields suppressed; grant maps and unmaps;
    the busiest rings.

    \b
    Example:
        xenlike trace report boot.xltrace
        xenlike trace report boot.xltrace --json | jq '.hypercalls[0]'
    """
    summary = summarize(_load(file).events)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@trace.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["perfetto", "xentrace"]),
    default="perfetto",
    show_default=True,
    help="Chrome / Perfetto trace-event JSON, or Xen's binary trace format (xentrace's, "
    "for xenalyze and xentrace_format).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write it.",
)
def export(file: Path, fmt: str, output: Path) -> None:
    """Write a saved trace for a trace viewer: ui.perfetto.dev or chrome://tracing,
    or Xen's own tools.

    Perfetto: a track per domain, hypercalls as slices, event-channel sends
    as flows from sender to receiver, XenBus state changes and ring events as
    instants. xentrace: each domain's vCPU 0 runs on a pCPU of its own, its
    calls are TRC_PV_HYPERCALL_V2 records, cycles are nanoseconds (1 GHz).

    \b
    Example:
        xenlike trace export boot.xltrace --format perfetto -o boot.json
        xenlike trace export boot.xltrace --format xentrace -o boot.xentrace
        xenalyze -s --cpu-hz 1G boot.xentrace
    """
    if fmt == "xentrace":
        try:
            exported = xentrace(_load(file).events)
        except ExportTooLarge as exc:
            _fail(str(exc))
        _write(output, exported.data)
        click.echo(_xentrace_line(exported, output))
        return
    document = perfetto(_load(file).events)
    _write(output, json.dumps(document).encode())
    click.echo(f"wrote {len(document['traceEvents'])} trace events to {output}")


@trace.command(context_settings=CONTEXT)
def formats() -> None:
    """Print xentrace_format's definitions for the records of a xentrace export.

    \b
    Example:
        xenlike trace formats > formats
        xentrace_format formats < boot.xentrace
    """
    click.echo(FORMATS, nl=False)


def _xentrace_line(exported: XentraceExport, output: Path) -> str:
    """What was written, where each domain ran and the clock rate xenalyze needs."""
    pcpus = ", ".join(f"d{domid}v0 on pCPU {cpu}" for domid, cpu in exported.pcpus.items())
    left_out = f"; {exported.skipped} xenlike events left out" if exported.skipped else ""
    return (
        f"wrote {exported.records} xentrace records to {output} ({pcpus or 'no domain'}"
        f"{left_out}); cycles are nanoseconds: xenalyze --cpu-hz {CPU_HZ // 10**9}G"
    )


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        _fail(f"cannot write {path}: {exc.strerror}")
