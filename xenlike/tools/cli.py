"""The `xenlike` command line: thin commands that parse, call the library, print.

Each command is a small sync function that calls `trio.run`; the work is in
`xenlike.tools.session`, `xenlike.xc` and `xenlike.xenstore`.
"""

import contextlib
import hmac
import importlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import trio

from xenlike.rundir import RunDir, RunDirBusy, default_run_dir
from xenlike.tools.session import (
    RECORDER_PID,
    NoSuchDomain,
    NotRunning,
    ToolstackRefused,
    dom0_failure,
    find_run_dir,
    start_topology,
    stop,
    toolstack_request,
    wait_ready,
)

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

LAZY_COMMANDS = {
    "capture": "xenlike.tools.capture:capture",
    "top": "xenlike.tools.top:top",
    "trace": "xenlike.trace.cli:trace",
    "xenstore": "xenlike.xenstore.cli:xenstore",
}
"""The command groups with modules of their own, imported only when chosen: each drags in
its own corner of xenlike (the trace decoders, pcap, xentop's views), and every CLI call
paid for all of them before."""


def run_dir_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--run-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="The topology's run directory (default: the running one; $XENLIKE_RUN_DIR).",
    )(func)


def json_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(
        func
    )


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"xenlike: {message}", err=True)
    sys.exit(code)


def running(run_dir: Path | None) -> RunDir:
    try:
        return find_run_dir(run_dir)
    except NotRunning as exc:
        fail(str(exc))


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside trio's exception groups (the first, if several)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def explain(exc: BaseException) -> str | None:
    """The one line a user gets for an expected failure; None for a bug."""
    from xenlike.hypercall import HypercallError
    from xenlike.topology import TopologyError
    from xenlike.xenstore import XenStoreError

    if isinstance(exc, (NotRunning, NoSuchDomain, ToolstackRefused, RunDirBusy)):
        return "; ".join(str(exc).strip("'\"").splitlines())  # a topology's problems, one line
    if isinstance(exc, TopologyError):
        return "; ".join(str(problem) for problem in exc.problems)
    if isinstance(exc, XenStoreError):
        return f"xenstored: {exc}"
    if isinstance(exc, HypercallError):
        return f"the hypervisor refused: {exc}"
    if isinstance(exc, trio.TooSlowError):
        return "the topology did not answer in time"
    if isinstance(
        exc,
        (ConnectionError, FileNotFoundError, trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        reason = getattr(exc, "strerror", None) or str(exc) or "connection lost"
        return (
            f"the topology does not answer ({reason}): see `xenlike dmesg` and the "
            "domain logs in its run directory"
        )
    return None


class Cli(click.Group):
    """Expected failures end in one line and a non-zero exit, never a traceback; so
    do Ctrl-C (exit 130) and a reader that goes away (`xenlike trace | head`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, name = target.partition(":")
        command: click.Command = getattr(importlib.import_module(module), name)
        return command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BaseException as group:
            exc = _leaf(group)
            if isinstance(exc, (SystemExit, click.ClickException, click.exceptions.Exit)):
                raise exc from None
            if isinstance(exc, KeyboardInterrupt):
                click.echo("", err=True)
                sys.exit(130)
            if isinstance(exc, BrokenPipeError):
                _quiet_stdout()
                sys.exit(1)
            message = explain(exc)
            if message is None:
                if os.environ.get("XENLIKE_DEBUG"):
                    raise
                fail(f"unexpected error: {exc!r} (XENLIKE_DEBUG=1 shows the traceback)")
            fail(message)


def _quiet_stdout() -> None:
    """The reader of stdout has gone: send what is left to /dev/null, not an error."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@click.group(cls=Cli, context_settings=CONTEXT)
@click.version_option(package_name="xenlike", prog_name="xenlike")  # looked up when asked
def main() -> None:
    """Run and inspect a Xen-style paravirtualized topology.

    \b
    Example:
        xenlike up --detach      # the embedded default topology
        xenlike list
        xenlike console alpha --no-follow
        xenlike down
    """


# --- up / down -------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("topology", required=False, type=click.Path(path_type=Path))
@run_dir_option
@click.option("--detach", is_flag=True, help="Return once every device is Connected.")
@click.option(
    "--trace",
    "trace_file",
    type=click.Path(path_type=Path),
    help="Record every hypercall trace record, and ring events, to FILE.",
)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the boot.")
def up(
    topology: Path | None,
    run_dir: Path | None,
    detach: bool,
    trace_file: Path | None,
    timeout: float,
) -> None:
    """Start a topology: the hypervisor, Dom0, then every guest.

    Without TOPOLOGY the embedded default runs: Dom0 and two guests, alpha
    and beta. In the foreground it streams the guests' consoles until
    Ctrl-C, which shuts everything down cleanly.

    \b
    Example:
        xenlike up                       # foreground, Ctrl-C stops it
        xenlike up demo.toml --detach    # background; `xenlike down` stops it
    """
    from xenlike.topology import TopologyError, default_topology, load_topology

    try:
        topo = (
            load_topology(topology, check_imports=True)
            if topology is not None
            else default_topology(check_imports=True)
        )
    except TopologyError as exc:
        click.echo(
            f"xenlike: the topology has {len(exc.problems)} problem(s); nothing started:", err=True
        )
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(2)
    rd = RunDir(run_dir or default_run_dir(topo.name))
    try:
        session = start_topology(topo, rd, detach=detach, topology_path=topology)
    except RunDirBusy as exc:
        fail(str(exc))
    if not detach:  # `kill` stops a foreground topology as cleanly as Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    if trace_file is not None:  # before the boot, so the recording has the guests' creation
        start_trace_recorder(rd, trace_file, detach)
    view = ProgressView(sys.stdout.isatty())
    click.echo(f"starting topology {topo.name!r} in {rd.path}")
    try:
        problems = trio.run(wait_ready, session, view.update, timeout)
    except KeyboardInterrupt:
        problems = ["interrupted"]
    view.finish()
    if problems:
        click.echo("xenlike: the topology did not come up:", err=True)
        for not_up in problems:
            click.echo(f"  {not_up}", err=True)
        if detach:
            if session.alive():
                click.echo(f"  (it is still running: `xenlike down --run-dir {rd.path}`)", err=True)
        else:
            click.echo("shutting down ...", err=True)
            stop(rd, grace=5)
            session.process.wait()
        sys.exit(1)
    else:
        click.echo(f"up: {len(topo.domains)} guest(s) running, every device Connected")
    if detach:
        return
    try:
        follow_consoles(rd, session.alive)
    except KeyboardInterrupt:
        click.echo("\nshutting down ...")
    else:  # the hypervisor stopped on its own
        click.echo("xenlike: the topology stopped: Dom0 has exited", err=True)
        for line in dom0_failure(rd):
            click.echo(f"  {line}", err=True)
        stop(rd)
        sys.exit(1)
    stop(rd)
    session.process.wait()
    click.echo("down")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def start_trace_recorder(rd: RunDir, trace_file: Path, detach: bool) -> None:
    """`xenlike trace --record FILE --rings` alongside the topology (ring events of every
    device, as they appear); its errors go to trace.log."""
    import signal
    import subprocess

    from xenlike._process import die_with_parent

    with (rd.path / "trace.log").open("ab") as log:
        recorder = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xenlike",
                "trace",
                "--run-dir",
                str(rd.path),
                "--record",
                str(trace_file),
                "--rings",
                "--quiet",
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=None if detach else die_with_parent(signal.SIGTERM),
        )
    (rd.path / RECORDER_PID).write_text(f"{recorder.pid}\n")


class ProgressView:
    """Boot progress: redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.lines: list[str] = []
        self.drawn = 0

    def update(self, status: dict[str, Any]) -> None:
        lines = []
        for guest in status.get("guests", []):
            console = "console up" if guest["console"] else "console pending"
            lines.append(f"{guest['name']:<12} d{guest['domid']:<3} {guest['state']:<10} {console}")
            for device in guest["devices"]:
                lines.append(
                    f"  {device['type']} {device['devid']:<8} frontend "
                    f"{device['frontend']}, backend {device['backend']}"
                )
        if lines == self.lines:
            return
        if self.tty:
            sys.stdout.write("\x1b[F\x1b[K" * self.drawn + "".join(f"{line}\n" for line in lines))
            self.drawn = len(lines)
        else:
            for line in lines:
                if line not in self.lines:
                    sys.stdout.write(line + "\n")
        sys.stdout.flush()
        self.lines = lines

    def finish(self) -> None:
        sys.stdout.flush()


def follow_consoles(rd: RunDir, alive: Callable[[], bool]) -> None:
    """Print every guest's console output as it comes, each line prefixed by its name."""
    offsets: dict[Path, int] = {}
    partial: dict[Path, bytes] = {}
    while alive():
        for log in sorted(rd.consoles.glob("*.log")):
            size = log.stat().st_size
            offset = offsets.get(log, 0)
            if size <= offset:
                continue
            with log.open("rb") as f:
                f.seek(offset)
                data = partial.pop(log, b"") + f.read(size - offset)
            offsets[log] = size
            *lines, rest = data.split(b"\n")
            if rest:
                partial[log] = rest
            for line in lines:
                click.echo(f"{log.stem:>8} | {line.decode('utf-8', 'replace').rstrip()}")
        time.sleep(0.1)


@main.command(context_settings=CONTEXT)
@run_dir_option
@click.option(
    "--grace",
    default=15.0,
    show_default=True,
    help="Seconds guests get to power off before they are destroyed.",
)
def down(run_dir: Path | None, grace: float) -> None:
    """Shut every guest down cleanly, then Dom0 and the hypervisor.

    \b
    Example:
        xenlike down
        xenlike down --grace 0     # destroy the guests at once
    """
    try:
        rd = find_run_dir(run_dir, running=False)
    except NotRunning as exc:
        click.echo(f"nothing to stop: {exc}")
        return
    if stop(rd, grace):
        click.echo(f"down: {rd.path}")
    else:
        click.echo(f"nothing is running in {rd.path}")


# --- domains -----------------------------------------------------------------------


@main.command(name="list", context_settings=CONTEXT)
@click.argument("domain", required=False)
@click.option("-l", "--long", "long_", is_flag=True, help="Each guest's configuration, as JSON.")
@run_dir_option
@json_option
def list_(domain: str | None, long_: bool, run_dir: Path | None, as_json: bool) -> None:
    """List the domains (or DOMAIN, by name or domid), as `xl list` does.

    State letters: r running, b blocked (waiting for an event), p paused,
    s shut down, then the shutdown reason (r reboot, s suspend, c crash,
    w watchdog), d dying. `-l` prints each guest's configuration as `xl list
    -l` does: libxl_domain_config's JSON.

    \b
    Example:
        xenlike list
        xenlike list alpha
        xenlike list -l alpha
        xenlike list --json
    """
    from xenlike.tools.domains import (
        LIST_HEADER,
        domain_rows,
        find_domain,
        format_list_row,
        long_listing,
    )

    rd = running(run_dir)
    only = trio.run(find_domain, rd, domain) if domain is not None else None
    if long_:
        click.echo(json.dumps(trio.run(long_listing, rd, only), indent=4))
        return
    rows = trio.run(domain_rows, rd, only)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(LIST_HEADER)
    for row in rows:
        click.echo(format_list_row(row))


@main.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@run_dir_option
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait for the guest to boot (its console and devices up).",
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for its boot.")
def create(file: Path, run_dir: Path | None, wait: bool, timeout: float) -> None:
    """Create a guest from an xl.cfg-style file in the running topology.

    It returns once the guest's console and devices are up, and fails at once
    (naming the cause) if the guest dies while booting or a device fails.

    \b
    Example:
        printf 'name = "gamma"\\nmemory = 32\\n' > gamma.cfg
        xenlike create gamma.cfg
    """
    rd = running(run_dir)
    answer = trio.run(
        toolstack_request, rd, {"op": "create", "config": file.read_text(), "path": str(file)}
    )
    click.echo(f"created {answer['name']} as domain {answer['domid']}")
    if not wait:
        return
    problems = trio.run(wait_created, rd, answer["name"], answer["domid"], timeout)
    if problems:
        click.echo(f"xenlike: {answer['name']} did not come up:", err=True)
        for problem in problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)


async def wait_created(rd: RunDir, name: str, domid: int, timeout: float) -> list[str]:
    """Follow a new guest until its console and devices are up; what went wrong if not."""
    from xenlike.tools.session import failed_devices, failures

    problems = ["timed out"]
    with trio.move_on_after(timeout):
        while True:
            status = await toolstack_request(rd, {"op": "status"}, timeout=10)
            dead = failures(status, {name}, domid) + failed_devices(status, {name})
            if dead:
                return dead
            guest = next((g for g in status["guests"] if g["domid"] == domid), None)
            if guest is None:
                return [f"{name} (d{domid}) is gone"]
            problems = [
                f"{name}: {d['type']} {d['devid']} is frontend {d['frontend']}, "
                f"backend {d['backend']}"
                for d in guest["devices"]
                if (d["frontend"], d["backend"]) != ("Connected", "Connected")
            ]
            if not guest["console"]:
                problems.append(f"{name}: console not connected")
            elif not guest.get("booted", True):
                problems.append(f"{name}: still booting")
            if guest["state"] != "running":
                return [f"{name}: {guest['state']}"]
            if not problems:
                return []
            await trio.sleep(0.05)
    return problems


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--reboot", is_flag=True, help="Ask for a reboot instead of a poweroff.")
@run_dir_option
def shutdown(name: str, reboot: bool, run_dir: Path | None) -> None:
    """Ask a guest (by name or domid) to shut down (control/shutdown); its on_poweroff
    applies.

    \b
    Example:
        xenlike shutdown alpha
    """
    trio.run(
        toolstack_request,
        running(run_dir),
        {"op": "shutdown", "name": name, "reason": "reboot" if reboot else "poweroff"},
    )
    click.echo(f"asked {name} to {'reboot' if reboot else 'power off'}")


@main.command(context_settings=CONTEXT)
@click.argument("name")
@run_dir_option
def destroy(name: str, run_dir: Path | None) -> None:
    """Destroy a guest (by name or domid) at once (no clean shutdown).

    \b
    Example:
        xenlike destroy beta
    """
    trio.run(toolstack_request, running(run_dir), {"op": "destroy", "name": name})
    click.echo(f"destroyed {name}")


@main.command(context_settings=CONTEXT)
@run_dir_option
def dmesg(run_dir: Path | None) -> None:
    """Print the hypervisor log, as `xl dmesg` does.

    \b
    Example:
        xenlike dmesg | grep d1
    """
    from xenlike.xc import XenControl

    async def read(rd: RunDir) -> str:
        async with XenControl.connect(rd.path) as xc:
            return await xc.dmesg()

    click.echo(trio.run(read, running(run_dir)), nl=False)


# --- consoles ----------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--no-follow", is_flag=True, help="Print what the console holds and exit.")
@run_dir_option
def console(name: str, no_follow: bool, run_dir: Path | None) -> None:
    """Attach to a guest's console (by name or domid); Ctrl-] detaches.

    \b
    Example:
        xenlike console alpha --no-follow
    """
    rd = running(run_dir)
    if name.isdigit():
        name = trio.run(_domain_name, rd, int(name))
    log = rd.console_log(name)
    if not log.exists():
        known = ", ".join(p.stem for p in rd.consoles.glob("*.log")) or "none"
        fail(f"no console named {name!r} (consoles: {known})")
    sys.stdout.buffer.write(log.read_bytes())
    sys.stdout.flush()
    if no_follow:
        return
    trio.run(_interactive_console, rd.console_socket(name))


def raw_newlines(data: bytes) -> bytes:
    """A raw terminal moves down on LF but not back to the margin: each line ends in
    CR LF there (the terminal's own ONLCR is off), or lines draw as a staircase."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


async def _domain_name(rd: RunDir, domid: int) -> str:
    """The name of domain `domid`, as XenStore has it."""
    from xenlike.xenstore import open_client

    async with open_client(rd.xenstored_socket) as xs:
        found = await xs.read_optional(f"/local/domain/{domid}/name")
    if found is None:
        raise NoSuchDomain(f"no domain {domid}")
    return found


async def _interactive_console(path: Path) -> None:
    import termios
    import tty

    stream = await trio.open_unix_socket(str(path))
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
    try:
        async with stream, trio.open_nursery() as nursery:

            async def output() -> None:
                while data := await stream.receive_some(4096):
                    os.write(sys.stdout.fileno(), raw_newlines(data) if saved else data)
                nursery.cancel_scope.cancel()

            async def keyboard() -> None:
                while True:
                    await trio.lowlevel.wait_readable(stdin)
                    data = os.read(stdin, 1024)
                    if not data or b"\x1d" in data:  # EOF or Ctrl-]
                        nursery.cancel_scope.cancel()
                        return
                    await stream.send_all(data)

            nursery.start_soon(output)
            nursery.start_soon(keyboard)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        click.echo("")


# --- devices -------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@click.argument("name", required=False)
@run_dir_option
@json_option
def devices(name: str | None, run_dir: Path | None, as_json: bool) -> None:
    """Each device's front-end and back-end states, features, and what a stuck one waits for.

    \b
    Example:
        xenlike devices
        xenlike devices alpha --json
    """
    from xenlike.tools.devices import describe_devices

    report = trio.run(describe_devices, running(run_dir), name)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if not report:
        click.echo("no devices" + (f" for {name}" if name else ""))
    for device in report:
        click.echo(
            f"{device['domain']} {device['type']} {device['devid']}: "
            f"frontend {device['frontend_state']}, backend {device['backend_state']}"
        )
        for key, value in device["features"].items():
            click.echo(f"    {key} = {value}")
        if device["waiting"]:
            click.echo(f"    waiting: {device['waiting']}")
        if device["last_event"]:
            click.echo(f"    last event: {device['last_event']}")
        if device["errors"]:
            for error in device["errors"]:
                click.echo(f"    error: {error}")


def parse_mem_size_kb(text: str) -> int:
    """xl's parse_mem_size_kb: a number with one optional suffix b, k, m, g or t
    (any case); no suffix means MiB. KiB out; ValueError for anything else."""
    digits = text[:-1] if text[-1:].isalpha() else text
    suffix = text[len(digits) :].lower() or "m"
    if not digits.isdigit() or suffix not in "bkmgt":
        raise ValueError(f"invalid memory size: {text}")
    number = int(digits)
    kib = number >> 10 if suffix == "b" else number << 10 * "kmgt".index(suffix)
    if kib <= 0:
        raise ValueError(f"invalid memory size: {text}")
    return kib


def _memory_request(op: str, name: str, mem: str, run_dir: Path | None) -> None:
    try:
        kib = parse_mem_size_kb(mem)
    except ValueError as exc:
        fail(str(exc))
    trio.run(toolstack_request, running(run_dir), {"op": op, "name": name, "kib": kib})


@main.command(name="mem-set", context_settings=CONTEXT)
@click.argument("name")
@click.argument("mem")
@run_dir_option
def mem_set(name: str, mem: str, run_dir: Path | None) -> None:
    """Set a guest's memory target, as `xl mem-set`: its balloon driver follows.

    MEM is xl's size: a number with an optional b, k, m, g or t; MiB without one.
    It may not exceed the guest's maximum (`mem-max`, `maxmem`); the guest gives
    memory back to the host's pool, or takes it from there, within seconds.

    \b
    Example:
        xenlike mem-set beta 16m
    """
    _memory_request("mem-set", name, mem, run_dir)


@main.command(name="mem-max", context_settings=CONTEXT)
@click.argument("name")
@click.argument("mem")
@run_dir_option
def mem_max(name: str, mem: str, run_dir: Path | None) -> None:
    """Set the most memory a guest may hold, as `xl mem-max`.

    MEM is xl's size, as for mem-set. It may not be below the guest's current
    target, nor above the `maxmem` its memory was sized for at create.

    \b
    Example:
        xenlike mem-max beta 32m
    """
    _memory_request("mem-max", name, mem, run_dir)


# --- domain control: pause, names, uptime, host info, usage ---------------------------


@main.command(context_settings=CONTEXT)
@click.argument("domain")
@run_dir_option
def pause(domain: str, run_dir: Path | None) -> None:
    """Pause a domain (by name or domid): XEN_DOMCTL_pausedomain. It runs no code
    until `unpause`, its console is silent and its rings wait; `list` shows it p.

    \b
    Example:
        xenlike pause beta
    """
    _pause_or_unpause(domain, run_dir, pause=True)
    click.echo(f"paused {domain}")


@main.command(context_settings=CONTEXT)
@click.argument("domain")
@run_dir_option
def unpause(domain: str, run_dir: Path | None) -> None:
    """Unpause a paused domain: XEN_DOMCTL_unpausedomain; it goes on where it stopped.

    \b
    Example:
        xenlike unpause beta
    """
    _pause_or_unpause(domain, run_dir, pause=False)
    click.echo(f"unpaused {domain}")


def _pause_or_unpause(domain: str, run_dir: Path | None, *, pause: bool) -> None:
    from xenlike.tools.domains import find_domain
    from xenlike.xc import XenControl

    async def run(rd: RunDir) -> None:
        domid = await find_domain(rd, domain)
        if domid == 0 and pause:
            fail("Domain-0 cannot be paused: the tools that would unpause it run there")
        async with XenControl.connect(rd.path) as xc:
            await (xc.pause(domid) if pause else xc.unpause(domid))

    trio.run(run, running(run_dir))


@main.command(context_settings=CONTEXT)
@click.argument("name")
@run_dir_option
def domid(name: str, run_dir: Path | None) -> None:
    """Print the domid of the domain called NAME, as `xl domid`.

    \b
    Example:
        xenlike domid alpha
    """
    from xenlike.tools.domains import find_domain

    if name.isdigit():
        fail(f"{name!r} is a domid; `xenlike domname {name}` gives its name")
    click.echo(trio.run(find_domain, running(run_dir), name))


@main.command(context_settings=CONTEXT)
@click.argument("domid", type=int)
@run_dir_option
def domname(domid: int, run_dir: Path | None) -> None:
    """Print the name of domain DOMID, as `xl domname`.

    \b
    Example:
        xenlike domname 1
    """
    from xenlike.tools.domains import domain_rows

    rows = trio.run(domain_rows, running(run_dir), domid)
    if not rows:
        fail(f"domain {domid} does not exist")
    click.echo(rows[0]["name"])


@main.command(context_settings=CONTEXT)
@click.argument("domain")
@click.argument("new_name")
@run_dir_option
def rename(domain: str, new_name: str, run_dir: Path | None) -> None:
    """Rename a guest (by name or domid), as `xl rename`: its XenStore name and /vm
    entry change in one transaction; a name in use is refused.

    \b
    Example:
        xenlike rename beta db
    """
    trio.run(
        toolstack_request,
        running(run_dir),
        {"op": "rename", "name": domain, "new_name": new_name},
    )
    click.echo(f"renamed {domain} to {new_name}")


@main.command(context_settings=CONTEXT)
@click.argument("domains", nargs=-1)
@run_dir_option
def uptime(domains: tuple[str, ...], run_dir: Path | None) -> None:
    """Print how long each domain (or each DOMAIN named) has run, as `xl uptime`.

    \b
    Example:
        xenlike uptime
        xenlike uptime alpha
    """
    from xenlike.tools.domains import UPTIME_HEADER, find_domain, format_uptime_row, usage_rows

    async def run(rd: RunDir) -> list[dict[str, Any]]:
        wanted = [await find_domain(rd, name) for name in domains]
        rows = {row["domid"]: row for row in await usage_rows(rd)}
        return [rows[d] for d in wanted if d in rows] if wanted else list(rows.values())

    click.echo(UPTIME_HEADER)
    for row in trio.run(run, running(run_dir)):
        click.echo(format_uptime_row(row["name"], row["domid"], int(row["uptime_s"])))


@main.command(context_settings=CONTEXT)
@run_dir_option
@json_option
def info(run_dir: Path | None, as_json: bool) -> None:
    """Print the host's facts, as `xl info`: its CPUs, memory (MiB) and Xen version
    (from XEN_SYSCTL_physinfo and xen_version), and what confines each DomU's
    process (dN_protections).

    \b
    Example:
        xenlike info
        xenlike info --json | jq .free_memory
    """
    from xenlike.tools.domains import format_info, host_info

    facts = trio.run(host_info, running(run_dir))
    click.echo(json.dumps(facts, indent=2) if as_json else format_info(facts))


@main.command(context_settings=CONTEXT)
@run_dir_option
@json_option
def usage(run_dir: Path | None, as_json: bool) -> None:
    """Each domain's metered service since it was created: uptime, CPU seconds,
    memory in MiB-seconds (its frames integrated over time), block requests and
    512-byte sectors, network packets and bytes (the guest's side: TX is what it sent).

    \b
    Example:
        xenlike usage
        xenlike usage --json | jq '.[] | {name, cpu_s, mem_mib_s}'
    """
    from xenlike.tools.domains import format_usage, usage_rows

    rows = trio.run(usage_rows, running(run_dir))
    click.echo(json.dumps(rows, indent=2) if as_json else format_usage(rows))


# --- devices that come and go (xl block-attach, network-attach, ...) ------------------


@main.command("block-attach", context_settings=CONTEXT)
@click.argument("name")
@click.argument("diskspec", nargs=-1, required=True)
@run_dir_option
def block_attach(name: str, diskspec: tuple[str, ...], run_dir: Path | None) -> None:
    """Give a running guest a disk: xl's DISKSPEC (`vdev=xvdb, target=IMAGE` or
    positional `IMAGE,raw,xvdb,rw`), IMAGE one of Dom0's images.

    \b
    Example:
        xenlike block-attach beta 'format=raw, vdev=xvdb, access=rw, target=spare.img'
    """
    _attach(name, "vbd", diskspec, run_dir)


@main.command("block-detach", context_settings=CONTEXT)
@click.argument("name")
@click.argument("vdev")
@run_dir_option
def block_detach(name: str, vdev: str, run_dir: Path | None) -> None:
    """Remove a guest's disk (by vdev, e.g. xvdb, or its number), as libxl does:
    the back end closes it (10 s at most, then it is forced).

    \b
    Example:
        xenlike block-detach beta xvdb
    """
    _detach(name, "vbd", vdev, run_dir)


@main.command("block-list", context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True)
@run_dir_option
def block_list_(names: tuple[str, ...], run_dir: Path | None) -> None:
    """A guest's disks, as `xl block-list` prints them.

    \b
    Example:
        xenlike block-list beta
    """
    _list_devices(names, "vbd", run_dir)


@main.command("network-attach", context_settings=CONTEXT)
@click.argument("name")
@click.argument("vifspec", nargs=-1)
@run_dir_option
def network_attach(name: str, vifspec: tuple[str, ...], run_dir: Path | None) -> None:
    """Give a running guest a vif: xl's VIFSPEC (`mac=..., bridge=xenbr0, ip=...`).

    \b
    Example:
        xenlike network-attach beta ip=10.0.0.9/24
    """
    _attach(name, "vif", vifspec, run_dir)


@main.command("network-detach", context_settings=CONTEXT)
@click.argument("name")
@click.argument("device", metavar="MAC|DEVID")
@run_dir_option
def network_detach(name: str, device: str, run_dir: Path | None) -> None:
    """Remove a guest's vif (by devid or mac), as libxl does.

    \b
    Example:
        xenlike network-detach beta 1
    """
    _detach(name, "vif", device, run_dir)


@main.command("network-list", context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True)
@run_dir_option
def network_list_(names: tuple[str, ...], run_dir: Path | None) -> None:
    """A guest's vifs, as `xl network-list` prints them.

    \b
    Example:
        xenlike network-list beta
    """
    _list_devices(names, "vif", run_dir)


def _attach(name: str, device_type: str, spec: tuple[str, ...], run_dir: Path | None) -> None:
    request = {"op": "attach", "name": name, "type": device_type, "spec": ",".join(spec)}
    answer = trio.run(toolstack_request, running(run_dir), request)
    click.echo(f"attached {device_type} {answer['devid']} to {name}")


def _detach(name: str, device_type: str, device: str, run_dir: Path | None) -> None:
    request = {"op": "detach", "name": name, "type": device_type, "device": device}
    answer = trio.run(toolstack_request, running(run_dir), request)
    forced = " (forced: the back end did not close in time)" if answer["forced"] else ""
    click.echo(f"detached {device_type} {answer['devid']} from {name}{forced}")


def _list_devices(names: tuple[str, ...], device_type: str, run_dir: Path | None) -> None:
    from xenlike.tools.devices import BLOCK_LIST_HEADER, NETWORK_LIST_HEADER

    click.echo(BLOCK_LIST_HEADER if device_type == "vbd" else NETWORK_LIST_HEADER)
    for line in trio.run(_device_rows, running(run_dir), names, device_type):
        click.echo(line)


async def _device_rows(rd: RunDir, names: tuple[str, ...], device_type: str) -> list[str]:
    from xenlike.tools.devices import block_list, network_list

    rows = []
    for name in names:
        request = {"op": "device-list", "name": name, "type": device_type}
        devices = (await toolstack_request(rd, request))["devices"]
        rows += block_list(devices) if device_type == "vbd" else network_list(devices)
    return rows


# --- save and restore ----------------------------------------------------------------


SAVE_TIMEOUT = 300.0  # libxl's 60 s for the ack and 60 s to suspend, and the writing


@main.command(context_settings=CONTEXT)
@click.option(
    "-c", "--checkpoint", is_flag=True, help="Leave the domain running after the save (xl -c)."
)
@click.argument("name")
@click.argument("file", type=click.Path(path_type=Path))
@run_dir_option
def save(name: str, file: Path, checkpoint: bool, run_dir: Path | None) -> None:
    """Save a guest to FILE in xl's save format, as `xl save`: the guest suspends
    (its program must be resumable), its memory and state are written, and it
    is destroyed; with -c it runs on where it was.

    \b
    Example:
        xenlike save beta beta.sav
        xenlike save -c beta beta.sav
    """
    rd = running(run_dir)
    path = file.resolve()
    click.echo(f"Saving domain {name} to {path}", err=True)
    request = {"op": "save", "name": name, "path": str(path), "checkpoint": checkpoint}
    answer = _hand_to_dom0(rd, {**request, "progress": True}, [], SAVE_TIMEOUT)  # xl's progress
    what = "running on" if checkpoint else "destroyed"
    click.echo(f"saved {name} (d{answer['domid']}): {answer['bytes']} bytes; {what}", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("file", type=click.Path(path_type=Path))
@run_dir_option
def restore(file: Path, run_dir: Path | None) -> None:
    """Restore a guest saved with `save`, as `xl restore`: a new domain from the
    file's config and memory, whose program continues from its saved state.
    A truncated, corrupt or foreign file is refused and nothing starts.

    \b
    Example:
        xenlike restore beta.sav
    """
    path = file.resolve()
    request = {"op": "restore", "path": str(path), "progress": True}  # xl's, on stderr
    answer = _hand_to_dom0(running(run_dir), request, [], SAVE_TIMEOUT)
    click.echo(f"restored {answer['name']} from {path} as domain {answer['domid']}")


# --- migration ---------------------------------------------------------------------


MIGRATE_TIMEOUT = 900.0  # a whole migration: pre-copy rounds, the suspend, the handshake
RECEIVER_EXIT = 10.0  # seconds the sender waits for its receiver process to exit (xl: 2)
TOKEN_TIMEOUT = 30.0  # seconds a connection to `migrate-receive --listen` has to log in


def migration_rune(host: str, ssh_command: str, debug: bool) -> list[str]:
    """The receiver's command line for HOST, as xl migrate builds it: `sh -c "exec
    SSH HOST xenlike migrate-receive"` for ssh://[user@]host, HOST itself when
    SSHCOMMAND is empty (xl's `-s ""`), or `xenlike migrate-receive --run-dir HOST`
    for a run directory on this machine."""
    extra = " -d" if debug else ""
    if not ssh_command:
        return ["sh", "-c", host]
    if host.startswith("ssh://"):
        target = host.removeprefix("ssh://")
        if not target or "/" in target:
            fail(f"{host}: expected ssh://[user@]host")
        return [
            "sh",
            "-c",
            f"exec {ssh_command} {shlex.quote(target)} xenlike migrate-receive{extra}",
        ]
    command = [sys.executable, "-m", "xenlike", "migrate-receive", "--run-dir", host]
    return command + (["-d"] if debug else [])


def _tcp_target(host: str) -> tuple[str, str, int]:
    """tcp://TOKEN@HOST:PORT as (token, host, port)."""
    rest = host.removeprefix("tcp://")
    token, at, address = rest.rpartition("@")
    hostname, colon, port = address.rpartition(":")
    if not at or not token or not colon or not port.isdigit() or not hostname:
        fail(
            f"{host}: expected tcp://TOKEN@HOST:PORT, with the token "
            "`xenlike migrate-receive --listen` printed"
        )
    return token, hostname.strip("[]"), int(port)


def _connect_tcp(host: str) -> socket.socket:
    """A connection to a `migrate-receive --listen` that took our token."""
    token, hostname, port = _tcp_target(host)
    try:
        connection = socket.create_connection((hostname, port), timeout=TOKEN_TIMEOUT)
    except OSError as exc:
        fail(f"cannot reach the receiver at {hostname}:{port}: {exc.strerror or exc}")
    try:
        connection.sendall(token.encode() + b"\n")
        first = connection.recv(1, socket.MSG_PEEK)  # the banner, or the refusal's first byte
    except OSError as exc:
        fail(f"the receiver at {hostname}:{port} went away: {exc.strerror or exc}")
    if first != b"x":  # both begin "x": "xl migration receiver ..." or "xenlike: ..."
        fail(f"the receiver at {hostname}:{port} closed the connection")
    refusal = connection.recv(len(b"xenlike:"), socket.MSG_PEEK)
    if refusal == b"xenlike:":
        fail(f"the receiver at {hostname}:{port} refused the token")
    connection.settimeout(None)
    return connection


def _hand_to_dom0(
    rd: RunDir, request: dict[str, Any], fds: list[int], timeout: float = MIGRATE_TIMEOUT
) -> dict[str, Any]:
    """Pass the stream's descriptors to Dom0's toolstack with `request`, print its
    progress on stderr, and return its answer (fail() on a refusal)."""
    if not rd.toolstack.exists():
        fail(f"Dom0's toolstack is not running in {rd.path}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
        try:
            control.connect(str(rd.toolstack))
        except OSError as exc:
            fail(f"Dom0's toolstack does not answer ({exc.strerror})")
        control.settimeout(timeout)
        socket.send_fds(control, [json.dumps(request).encode() + b"\n"], fds)
        for fd in fds:
            os.close(fd)
        lines = control.makefile("rb")
        for line in lines:
            answer = json.loads(line)
            if "progress" in answer:
                click.echo(answer["progress"], err=True)
                continue
            if not answer.get("ok"):
                fail(answer.get("error", "the toolstack refused"))
            return dict(answer)
    fail("the toolstack closed the connection")


@main.command(context_settings=CONTEXT)
@click.option(
    "-s",
    "ssh_command",
    default="ssh",
    show_default=True,
    metavar="SSHCOMMAND",
    help='Use SSHCOMMAND instead of ssh for ssh:// (xl -s); with -s "" HOST is the '
    "receiver's whole command line.",
)
@click.option(
    "--stop-and-copy",
    is_flag=True,
    help="Suspend first and send everything once (no pre-copy): the baseline the "
    "benchmark compares live migration with.",
)
@click.option("--debug", is_flag=True, help="Print each pre-copy round's figures.")
@click.argument("name")
@click.argument("host")
@run_dir_option
def migrate(
    name: str, host: str, ssh_command: str, stop_and_copy: bool, debug: bool, run_dir: Path | None
) -> None:
    """Move a running guest to another host, as `xl migrate`: its memory is copied
    while it runs, then it is suspended, the rest sent, and it resumes there
    under its own name; on any failure before the receiver is ready it resumes
    here ("Migration failed, resuming at sender.").

    HOST is the run directory of another host on this machine, ssh://[user@]host
    (`xenlike migrate-receive` through ssh), or tcp://TOKEN@HOST:PORT (a
    `xenlike migrate-receive --listen` there, which printed TOKEN). The hosts
    share their images directory (`[host] images`): disks are not copied.

    \b
    Example:
        xenlike migrate beta /tmp/host-b
        xenlike migrate beta tcp://TOKEN@10.0.0.9:8002
    """
    rd = running(run_dir)
    trio.run(toolstack_request, rd, {"op": "config", "name": name})  # xl's find_domain
    receiver: subprocess.Popen[bytes] | None = None
    if host.startswith("tcp://") and ssh_command:
        connection = _connect_tcp(host)
        fds = [os.dup(connection.fileno()), os.dup(connection.fileno())]
        connection.close()
    else:
        if ssh_command and not host.startswith("ssh://"):
            target = running(Path(host))
            if target.path.resolve() == rd.path.resolve():
                fail(f"cannot migrate {name} to {host}: it is this host")
        receiver = subprocess.Popen(
            migration_rune(host, ssh_command, debug), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert receiver.stdin is not None and receiver.stdout is not None
        fds = [os.dup(receiver.stdin.fileno()), os.dup(receiver.stdout.fileno())]
        receiver.stdin.close()
        receiver.stdout.close()
    request = {"op": "migrate", "name": name, "live": not stop_and_copy, "debug": debug}
    try:
        answer = _hand_to_dom0(rd, request, fds)
    finally:
        if receiver is not None:
            try:
                receiver.wait(RECEIVER_EXIT)
            except subprocess.TimeoutExpired:
                click.echo(
                    f"migration child [{receiver.pid}] not exiting, no longer waiting", err=True
                )
    click.echo(f"migrated {name} (d{answer['domid']}): {answer['bytes']} bytes sent", err=True)
    click.echo("Migration successful.", err=True)


@main.command("migrate-receive", context_settings=CONTEXT)
@click.option("-d", "--debug", is_flag=True, help="Print each pre-copy round's figures.")
@click.option(
    "--listen",
    metavar="ADDR:PORT",
    default=None,
    help="Take the stream from one TCP connection instead of stdin/stdout; prints the "
    "tcp://TOKEN@ADDR:PORT to give `migrate` (port 0: any free port).",
)
@run_dir_option
def migrate_receive(debug: bool, listen: str | None, run_dir: Path | None) -> None:
    """Receive a guest that `xenlike migrate` sends, as `xl migrate-receive`: on
    stdin and stdout (what `migrate` starts, itself or through ssh), or, with
    --listen, from one TCP connection that presents the one-time token this
    prints. Progress goes to stderr.

    \b
    Example:
        xenlike migrate-receive --listen 127.0.0.1:8002
    """
    rd = running(run_dir)
    if listen is None:
        fds = [os.dup(sys.stdout.fileno()), os.dup(sys.stdin.fileno())]
        devnull = os.open(os.devnull, os.O_RDWR)  # our copies must not keep the pipes open
        os.dup2(devnull, sys.stdin.fileno())
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    else:
        connection = _accept_with_token(listen)
        fds = [os.dup(connection.fileno()), os.dup(connection.fileno())]
        connection.close()
    answer = _hand_to_dom0(rd, {"op": "migrate-receive", "debug": debug}, fds)
    if answer["name"] is None:
        click.echo("migration target: the sender sent no domain (it says why)", err=True)
        sys.exit(1)
    click.echo(f"migration target: {answer['name']} is domain {answer['domid']}", err=True)


def _accept_with_token(listen: str) -> socket.socket:
    """One connection on ADDR:PORT that sends the token printed on stdout."""
    hostname, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or not hostname:
        fail(f"--listen {listen}: expected ADDR:PORT, e.g. 127.0.0.1:8002")
    token = secrets.token_urlsafe(16)
    try:
        listener = socket.create_server((hostname.strip("[]"), int(port)))
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror or exc}")
    with listener:
        address, bound = listener.getsockname()[:2]
        where = f"[{address}]" if ":" in address else address
        click.echo(f"tcp://{token}@{where}:{bound}")
        sys.stdout.flush()
        connection, peer = listener.accept()
    connection.settimeout(TOKEN_TIMEOUT)
    presented = b""
    try:
        while not presented.endswith(b"\n") and len(presented) < 256:
            chunk = connection.recv(256 - len(presented))
            if not chunk:
                break
            presented += chunk
    except OSError:
        pass
    if not hmac.compare_digest(presented.strip(), token.encode()):
        with contextlib.suppress(OSError):
            connection.sendall(b"xenlike: migrate-receive: wrong token\n")
        connection.close()
        fail(f"refused the connection from {peer[0]}: wrong token")
    connection.settimeout(None)
    return connection
