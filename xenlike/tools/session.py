"""Starting, watching and stopping a topology from the Dom0 tools' side.

`xenlike up` runs the hypervisor as its own process (which boots Dom0,
which creates the guests), then follows the toolstack's status until every
guest runs and every device is Connected. The CLI's other commands reach
the running topology the way `xl` would: hypercalls through the control
socket, XenStore through xenstored's socket, and the toolstack service for
creating and destroying guests.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from xenlike._process import die_with_parent
from xenlike.rundir import RunDir, RunDirBusy, default_run_dir

if TYPE_CHECKING:  # only the CLI's `up` makes one, and imports xenlike.topology for it
    from xenlike.topology import Topology

__all__ = [
    "NoSuchDomain",
    "NotRunning",
    "RECORDER_PID",
    "Session",
    "ToolstackRefused",
    "find_run_dir",
    "start_topology",
    "toolstack_request",
]

DOM0_KERNEL = "domains.dom0:main"
READY_TIMEOUT = 60.0


class NotRunning(RuntimeError):
    """No topology runs where the command looked, or the part asked for is gone."""


class NoSuchDomain(LookupError):
    """No domain has that name or domid."""


class ToolstackRefused(RuntimeError):
    """Dom0's toolstack answered {"ok": false}: its error is the message."""


def find_run_dir(explicit: Path | None, *, running: bool = True) -> RunDir:
    """--run-dir, else $XENLIKE_RUN_DIR, else the one running topology.

    With `running`, a named run directory whose topology is stopped is
    NotRunning too (its sockets may still be there, answering nobody).
    """
    named = (
        explicit
        if explicit is not None
        else (Path(os.environ["XENLIKE_RUN_DIR"]) if os.environ.get("XENLIKE_RUN_DIR") else None)
    )
    if named is not None:
        rd = RunDir(named)
        if running and not rd.busy():
            raise NotRunning(f"no topology is running in {rd.path} (start one with `xenlike up`)")
        return rd
    base = default_run_dir("x").parent
    busy = sorted(p for p in base.glob("*") if RunDir(p).busy()) if base.exists() else []
    if len(busy) == 1:
        return RunDir(busy[0])
    if not busy:
        raise NotRunning(f"no topology is running under {base} (start one with `xenlike up`)")
    names = ", ".join(str(p) for p in busy)
    raise NotRunning(f"several topologies are running ({names}); choose one with --run-dir")


async def toolstack_request(
    run_dir: RunDir, request: dict[str, Any], timeout: float = 120.0
) -> dict[str, Any]:
    """One request to Dom0's toolstack service; ToolstackRefused on {"ok": false}."""
    if not run_dir.toolstack.exists():
        raise NotRunning(
            f"Dom0's toolstack is not running in {run_dir.path}: "
            "`xenlike dmesg` says what became of Dom0"
        )
    with trio.fail_after(timeout):
        try:
            stream = await trio.open_unix_socket(str(run_dir.toolstack))
        except OSError as exc:
            raise NotRunning(
                f"Dom0's toolstack does not answer ({exc.strerror}): "
                "`xenlike dmesg` says what became of Dom0"
            ) from None
        async with stream:
            await stream.send_all(json.dumps(request).encode() + b"\n")
            buffer = b""
            while b"\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    raise NotRunning("the toolstack closed the connection")
                buffer += data
    answer = json.loads(buffer.split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise ToolstackRefused(answer.get("error", "the toolstack refused"))
    return answer


@attrs.define(eq=False)
class Session:
    """A topology started by this process."""

    run_dir: RunDir
    topology: "Topology"
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None


def start_topology(
    topology: "Topology", run_dir: RunDir, *, detach: bool, topology_path: Path | None
) -> Session:
    """Spawn the hypervisor (which boots Dom0, which creates the guests).

    In the foreground the hypervisor dies with this process; detached it
    runs on in its own session.
    """
    if run_dir.busy():
        raise RunDirBusy(
            f"{run_dir.path} is in use by a running topology "
            f"(`xenlike down --run-dir {run_dir.path}` stops it)"
        )
    run_dir.create()
    run_dir.remove_leftovers()  # a killed topology's sockets
    for stale in [*run_dir.consoles.glob("*"), *(run_dir.path / "domains").glob("*.log")]:
        stale.unlink(missing_ok=True)
    run_dir.hypervisor_log.unlink(missing_ok=True)
    if topology_path is None:
        from importlib import resources

        run_dir.topology.write_text(resources.files("xenlike").joinpath("default.toml").read_text())
        topology_path = run_dir.topology
    else:
        run_dir.topology.write_text(topology_path.read_text())
    argv = [
        sys.executable,
        "-m",
        "xenlike.hypervisor",
        "--run-dir",
        str(run_dir.path),
        "--dom0-kernel",
        DOM0_KERNEL,
        "--dom0-memory",
        str(topology.dom0.memory),
        "--host-memory",
        str(topology.memory),
        "--dom0-cmdline",
        f"rundir={run_dir.path} topology={topology_path.resolve()}",
    ]
    with (run_dir.path / "hypervisor.stderr").open("wb") as err:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
            preexec_fn=None if detach else die_with_parent(signal.SIGTERM),
        )
    return Session(run_dir, topology, process)


async def wait_ready(
    session: Session, on_status: Callable[[dict[str, Any]], None], timeout: float = READY_TIMEOUT
) -> list[str]:
    """Follow the toolstack's status until everything is up; return what is not."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {"guests": []}
    names = {config.name for config in session.topology.domains}
    while time.monotonic() < deadline:
        if not session.alive():
            return [
                f"the hypervisor exited with status {session.process.returncode}",
                *dom0_failure(session.run_dir),
            ]
        try:
            status = await toolstack_request(session.run_dir, {"op": "status"}, timeout=10)
        except (NotRunning, OSError, RuntimeError):
            await trio.sleep(0.05)
            continue
        on_status(status)
        problems = not_ready(session.topology, status)
        if not problems:
            return []
        # What waiting will not mend, reported at once: a guest that died while
        # booting, a device that failed.
        failed = failures(status, names) + failed_devices(status, names)
        if failed:
            return failed
        if any(g["state"] != "running" for g in status.get("guests", [])):
            return problems
        await trio.sleep(0.05)
    return not_ready(session.topology, status) or ["timed out"]


def failures(status: dict[str, Any], names: set[str], domid: int | None = None) -> list[str]:
    """The toolstack's failed guests among `names` (or the one `domid`), each with the
    last lines of its log."""
    found = []
    for failure in status.get("failures", []):
        if failure["name"] not in names or (domid is not None and failure["domid"] != domid):
            continue
        who = failure["name"] + (f" (d{failure['domid']})" if failure["domid"] is not None else "")
        found.append("\n    ".join([f"{who} {failure['reason']}", *failure["log"]]))
    return found


def failed_devices(status: dict[str, Any], names: set[str]) -> list[str]:
    """Devices of `names` that an end has failed (an error node), with the error."""
    found = []
    for guest in status.get("guests", []):
        if guest["name"] not in names:
            continue
        for device in guest["devices"]:
            if device.get("error"):
                found.append(
                    f"{guest['name']}: {device['type']} {device['devid']} failed "
                    f"(frontend {device['frontend']}, backend {device['backend']}): "
                    f"{device['error']}"
                )
    return found


def dom0_failure(run_dir: RunDir, lines: int = 6) -> list[str]:
    """The last lines of Dom0's own log, where a Dom0 that died says why."""
    log = run_dir.path / "domains" / "0.log"
    try:
        text = log.read_bytes()[-8192:].decode("utf-8", "replace")
    except OSError:
        return [f"see {run_dir.hypervisor_log} and {run_dir.path / 'hypervisor.stderr'}"]
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return ["\n    ".join([f"last lines of {log}:", *tail])]


def not_ready(topology: "Topology", status: dict[str, Any]) -> list[str]:
    """What still keeps the topology from being up, in words."""
    problems = []
    guests = {g["name"]: g for g in status.get("guests", [])}
    for config in topology.domains:
        guest = guests.get(config.name)
        if guest is None:
            problems.append(f"{config.name}: not created")
            continue
        if guest["state"] != "running":
            problems.append(f"{config.name}: {guest['state']}")
        if not guest["console"]:
            problems.append(f"{config.name}: console not connected")
        elif not guest.get("booted", True):
            problems.append(f"{config.name}: still booting")
        for device in guest["devices"]:
            if device["frontend"] != "Connected" or device["backend"] != "Connected":
                problems.append(
                    f"{config.name}: {device['type']} {device['devid']} is "
                    f"frontend {device['frontend']}, backend {device['backend']}"
                )
    return problems


def stop(run_dir: RunDir, grace: float = 15.0, timeout: float = 20.0) -> bool:
    """Shut the guests down cleanly, then the hypervisor; True if something ran.

    Guests get `grace` seconds to power off before they are destroyed. Every
    socket and pid file left behind (by this run, or by one killed with
    SIGKILL) is removed once nothing runs, and so is every domain process
    the hypervisor started that still runs without it.
    """
    if not run_dir.busy():
        strays = _kill_strays(run_dir)
        return bool(run_dir.remove_leftovers()) or strays
    try:
        trio.run(toolstack_request, run_dir, {"op": "down", "timeout": grace}, grace + 45.0)
    except (NotRunning, OSError, RuntimeError, trio.TooSlowError):
        pass  # Dom0 is gone or stuck: the hypervisor still takes everything down
    pid = _pid(run_dir)
    if pid is not None:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while run_dir.busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    if run_dir.busy() and pid is not None:
        _signal(pid, signal.SIGKILL)  # its domains die with it (PR_SET_PDEATHSIG)
        while run_dir.busy():
            time.sleep(0.05)
    _kill_strays(run_dir)
    _wait_for_recorder(run_dir, time.monotonic() + timeout)
    run_dir.remove_leftovers()
    return True


RECORDER_PID = "trace-recorder.pid"
"""`up --trace`'s recorder, which `stop` waits for: it ends on its own once the
topology is gone, after its last flush, and the trace is whole only then."""


def _wait_for_recorder(run_dir: RunDir, deadline: float) -> None:
    path = run_dir.path / RECORDER_PID
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return
    cmdline = Path(f"/proc/{pid}/cmdline")
    while time.monotonic() < deadline:
        try:
            if b"--record" not in cmdline.read_bytes().split(b"\0"):
                break  # gone, or the pid is another process's now
        except OSError:
            break
        time.sleep(0.05)
    path.unlink(missing_ok=True)


def _kill_strays(run_dir: RunDir) -> bool:
    """SIGKILL every domain process of this run directory that outlived its hypervisor
    (found by its --hypercall-fd command line and its log in the run directory);
    True if there was one."""
    domains = run_dir.path / "domains"
    found = False
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"xenlike.domain" not in argv:
                continue
            logs = {os.readlink(fd) for fd in (proc / "fd").iterdir() if fd.name in ("1", "2")}
        except OSError:
            continue
        if any(Path(log).parent == domains for log in logs):
            _signal(int(proc.name), signal.SIGKILL)
            found = True
    return found


def _pid(run_dir: RunDir) -> int | None:
    try:
        return int(run_dir.pid_file.read_text())
    except (OSError, ValueError):
        return None


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
