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
from typing import Any

import attrs
import trio

from xenlike._process import die_with_parent
from xenlike.rundir import RunDir, RunDirBusy, default_run_dir
from xenlike.topology import Topology

__all__ = ["NotRunning", "Session", "find_run_dir", "start_topology", "toolstack_request"]

DOM0_KERNEL = "domains.dom0:main"
READY_TIMEOUT = 60.0


class NotRunning(RuntimeError):
    """No topology runs where the command looked."""


def find_run_dir(explicit: Path | None) -> RunDir:
    """--run-dir, else $XENLIKE_RUN_DIR, else the one running topology."""
    if explicit is not None:
        return RunDir(explicit)
    if os.environ.get("XENLIKE_RUN_DIR"):
        return RunDir(Path(os.environ["XENLIKE_RUN_DIR"]))
    base = default_run_dir("x").parent
    running = sorted(p for p in base.glob("*") if RunDir(p).busy()) if base.exists() else []
    if len(running) == 1:
        return RunDir(running[0])
    if not running:
        raise NotRunning(f"no topology is running under {base} (start one with `xenlike up`)")
    names = ", ".join(str(p) for p in running)
    raise NotRunning(f"several topologies are running ({names}); choose one with --run-dir")


async def toolstack_request(run_dir: RunDir, request: dict[str, Any],
                            timeout: float = 120.0) -> dict[str, Any]:
    """One request to Dom0's toolstack service; raises RuntimeError on {"ok": false}."""
    if not run_dir.toolstack.exists():
        raise NotRunning(f"no toolstack at {run_dir.toolstack}: is the topology up?")
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(str(run_dir.toolstack))
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
        raise RuntimeError(answer.get("error", "the toolstack refused"))
    return answer


@attrs.define(eq=False)
class Session:
    """A topology started by this process."""

    run_dir: RunDir
    topology: Topology
    process: subprocess.Popen[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None


def start_topology(topology: Topology, run_dir: RunDir, *, detach: bool,
                   topology_path: Path | None) -> Session:
    """Spawn the hypervisor (which boots Dom0, which creates the guests).

    In the foreground the hypervisor dies with this process; detached it
    runs on in its own session.
    """
    if run_dir.busy():
        raise RunDirBusy(f"{run_dir.path} is in use by a running topology "
                         f"(`xenlike down --run-dir {run_dir.path}` stops it)")
    run_dir.create()
    for stale in [*run_dir.consoles.glob("*"), *(run_dir.path / "domains").glob("*.log")]:
        stale.unlink(missing_ok=True)
    run_dir.hypervisor_log.unlink(missing_ok=True)
    if topology_path is None:
        from importlib import resources

        run_dir.topology.write_text(resources.files("xenlike").joinpath("default.toml").read_text())
        topology_path = run_dir.topology
    else:
        run_dir.topology.write_text(topology_path.read_text())
    argv = [sys.executable, "-m", "xenlike.hypervisor", "--run-dir", str(run_dir.path),
            "--dom0-kernel", DOM0_KERNEL, "--dom0-memory", str(topology.dom0.memory),
            "--dom0-cmdline", f"rundir={run_dir.path} topology={topology_path.resolve()}"]
    with (run_dir.path / "hypervisor.stderr").open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                   start_new_session=True,
                                   preexec_fn=None if detach else die_with_parent(signal.SIGTERM))
    return Session(run_dir, topology, process)


async def wait_ready(session: Session, on_status: Callable[[dict[str, Any]], None],
                     timeout: float = READY_TIMEOUT) -> list[str]:
    """Follow the toolstack's status until everything is up; return what is not."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {"guests": []}
    while time.monotonic() < deadline:
        if not session.alive():
            return [f"the hypervisor exited with status {session.process.returncode}; see "
                    f"{session.run_dir.path / 'hypervisor.stderr'} and "
                    f"{session.run_dir.hypervisor_log}"]
        try:
            status = await toolstack_request(session.run_dir, {"op": "status"}, timeout=10)
        except (NotRunning, OSError, RuntimeError):
            await trio.sleep(0.05)
            continue
        on_status(status)
        problems = not_ready(session.topology, status)
        if not problems:
            return []
        if any(g["state"] != "running" for g in status.get("guests", [])):
            return problems  # a guest shut down while booting: waiting will not help
        await trio.sleep(0.05)
    return not_ready(session.topology, status) or ["timed out"]


def not_ready(topology: Topology, status: dict[str, Any]) -> list[str]:
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
        for device in guest["devices"]:
            if device["frontend"] != "Connected" or device["backend"] != "Connected":
                problems.append(f"{config.name}: {device['type']} {device['devid']} is "
                                f"frontend {device['frontend']}, backend {device['backend']}")
    return problems


def stop(run_dir: RunDir, grace: float = 15.0, timeout: float = 20.0) -> bool:
    """Shut the guests down cleanly, then the hypervisor; True if something ran.

    Guests get `grace` seconds to power off before they are destroyed.
    """
    if not run_dir.busy():
        return False
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
    return True


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
