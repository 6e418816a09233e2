"""`xenlike up` end to end: real processes, the CLI, and the stock XenStore tools."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

XENLIKE = [sys.executable, "-m", "xenlike"]


def xenlike(
    *args: str, run_dir: Path, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    result = subprocess.run(
        [*XENLIKE, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"xenlike {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


def started_pids(run_dir: Path) -> list[int]:
    """The hypervisor and every domain process it started, from its log."""
    pids = [
        int(p) for p in re.findall(r"started pid (\d+)", (run_dir / "hypervisor.log").read_text())
    ]
    pid_file = run_dir / "hypervisor.pid"
    if pid_file.exists():
        pids.append(int(pid_file.read_text()))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def wait_for(predicate, timeout: float = 30, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def run_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "run"
    yield path
    subprocess.run([*XENLIKE, "down", "--run-dir", str(path)], capture_output=True, timeout=60)


def test_up_detach_list_devices_console_xenstore_down(run_dir: Path) -> None:
    up = xenlike("up", "--detach", run_dir=run_dir)
    assert "every device Connected" in up.stdout
    rows = json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)
    assert [(r["name"], r["id"]) for r in rows] == [("Domain-0", 0), ("alpha", 1), ("beta", 2)]
    assert all(r["state"][:2] in ("r-", "-b") for r in rows)  # on a CPU, or waiting
    assert "-b----" in {r["state"] for r in rows}  # an idle guest waits for events, as in xl
    table = xenlike("list", run_dir=run_dir).stdout.splitlines()
    assert table[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    devices = xenlike("devices", run_dir=run_dir).stdout
    for name in ("alpha", "beta"):
        assert f"{name} vbd 51712: frontend Connected, backend Connected" in devices, devices
        assert f"{name} vif 0: frontend Connected, backend Connected" in devices, devices
    assert "backend/feature-persistent = 1" in devices and "backend/sectors = 131072" in devices
    console = wait_for(
        lambda: (
            "demo done"
            in (out := xenlike("console", "alpha", "--no-follow", run_dir=run_dir).stdout)
            and out
        ),
        what="alpha's demo",
    )
    assert "[alpha] hello from domain 1" in console
    assert "[alpha] xvda: 64 MiB; wrote, flushed and read back 64 KiB: ok" in console, console
    assert "[alpha] ping 10.0.0.2: reply in" in console, console
    assert "[alpha] udp echo from 10.0.0.2: hello from alpha" in console, console
    assert (
        'greeting = "hello from alpha"'
        in xenlike("xenstore", "ls", "/local/domain/1", run_dir=run_dir).stdout
    )
    assert xenlike("xenstore", "read", "/local/domain/2/name", run_dir=run_dir).stdout == "beta\n"
    if shutil.which("xenstore-ls"):
        real = subprocess.run(
            ["xenstore-ls", "/local/domain/1"],
            capture_output=True,
            text=True,
            env={**os.environ, "XENSTORED_RUNDIR": str(run_dir / "xenstored")},
            timeout=30,
        )
        assert real.returncode == 0, real.stderr
        assert 'name = "alpha"' in real.stdout and 'greeting = "hello from alpha"' in real.stdout
    busy = xenlike("up", "--detach", run_dir=run_dir, check=False)
    assert busy.returncode == 1 and "is in use" in busy.stderr
    assert "(d0) dom0: services up" in xenlike("dmesg", run_dir=run_dir).stdout
    pids = started_pids(run_dir)
    assert len(pids) == 4
    assert "down" in xenlike("down", run_dir=run_dir).stdout
    assert wait_gone(pids) == []
    assert "nothing" in xenlike("down", run_dir=run_dir).stdout


def test_foreground_up_streams_consoles_and_ctrl_c_stops_everything(run_dir: Path) -> None:
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*XENLIKE, "up"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "beta | [beta] demo done" in line or "alpha | [alpha] demo done" in line:
                if any("beta | [beta] demo done" in x for x in lines) and any(
                    "alpha | [alpha] demo done" in x for x in lines
                ):
                    break
        pids = started_pids(run_dir)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "down" in out
    assert wait_gone(pids) == []


def test_killing_up_leaves_no_process_and_the_run_dir_reusable(run_dir: Path) -> None:
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    proc = subprocess.Popen(
        [*XENLIKE, "up"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    wait_for(
        lambda: (
            (run_dir / "console" / "beta.log").exists()
            and "demo done" in (run_dir / "console" / "beta.log").read_text()
        ),
        what="beta's demo",
    )
    pids = started_pids(run_dir)
    proc.kill()
    proc.wait()
    assert wait_gone(pids) == []
    xenlike("up", "--detach", run_dir=run_dir)
    xenlike("down", run_dir=run_dir)


PRESERVE = """\
[host]
name = "crashes"

[dom0]
memory = 64

[[domain]]
name = "victim"
memory = 16
on_crash = "preserve"

[[domain]]
name = "faulty"
memory = 16
init = "tests.programs:raise_error"
on_crash = "preserve"
"""


def test_crashes_are_preserved_and_down_still_cleans_up(run_dir: Path, tmp_path: Path) -> None:
    topology = tmp_path / "crashes.toml"
    topology.write_text(PRESERVE)
    xenlike("up", str(topology), "--detach", run_dir=run_dir, check=False)
    victim = [
        int(p)
        for p in re.findall(r"\(d1\) started pid (\d+)", (run_dir / "hypervisor.log").read_text())
    ][0]
    os.kill(victim, signal.SIGKILL)

    def states() -> dict[str, str]:
        return {
            r["name"]: r["state"]
            for r in json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)
        }

    wait_for(
        lambda: states().get("victim", "")[4:5] == "c" and states().get("faulty", "")[4:5] == "c",
        what="both guests crashed",
    )
    console = (run_dir / "console" / "faulty.log").read_text()
    assert "RuntimeError: the guest program failed on purpose" in console
    pids = started_pids(run_dir)
    xenlike("down", run_dir=run_dir)
    assert wait_gone(pids) == []


def test_detach_names_a_device_that_never_connects(run_dir: Path, tmp_path: Path) -> None:
    topology = tmp_path / "stuck.toml"
    topology.write_text(
        '[[domain]]\nname = "lonely"\nmemory = 16\ndevices = [{ type = "nodriver" }]\n'
    )
    up = xenlike("up", str(topology), "--detach", "--timeout", "3", run_dir=run_dir, check=False)
    assert up.returncode == 1, up.stdout + up.stderr
    assert "lonely: nodriver 0 is frontend Initialising, backend Initialising" in up.stderr
    assert "still running" in up.stderr  # detached: it says how to stop it


def test_a_broken_topology_starts_nothing(run_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[domain]]\nname = "x"\nmemory = 8\nvcpus = 3\n')
    result = xenlike("up", str(bad), "--detach", run_dir=run_dir, check=False)
    assert result.returncode == 2
    assert f"{bad}:4: vcpus = 3" in result.stderr
    assert not (run_dir / "hypervisor.log").exists()


def test_create_shutdown_destroy(run_dir: Path, tmp_path: Path) -> None:
    xenlike("up", "--detach", run_dir=run_dir)
    cfg = tmp_path / "gamma.cfg"
    cfg.write_text('name = "gamma"\nmemory = 16\ninit = "domains.guest.demo:main"\n')
    assert "created gamma as domain 3" in xenlike("create", str(cfg), run_dir=run_dir).stdout
    wait_for(
        lambda: "demo done" in (run_dir / "console" / "gamma.log").read_text(), what="gamma's demo"
    )
    xenlike("shutdown", "alpha", run_dir=run_dir)

    def names() -> list[str]:
        return [r["name"] for r in json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)]

    wait_for(lambda: "alpha" not in names(), what="alpha powered off and destroyed")
    xenlike("destroy", "beta", run_dir=run_dir)
    assert names() == ["Domain-0", "gamma"]
    missing = xenlike("destroy", "nobody", run_dir=run_dir, check=False)
    assert missing.returncode == 1 and "no domain named 'nobody'" in missing.stderr
    xenlike("down", run_dir=run_dir)


def test_a_guest_that_is_killed_is_reaped_with_its_devices(tmp_path: Path) -> None:
    """Topology.kill: SIGKILL, as a crash ends a guest. The hypervisor reaps it, the
    toolstack removes its devices and XenStore home, and the other guest stays."""
    from xenlike.testing import RunningTopology, wait_for

    with RunningTopology(None, tmp_path) as topo:
        beta = topo.domid("beta")
        assert {d["domain"] for d in topo.devices()} == {"alpha", "beta"}
        topo.kill("beta")
        wait_for(lambda: "beta" not in {d["name"] for d in topo.domains()}, 20, "beta reaped")
        wait_for(
            lambda: {d["domain"] for d in topo.devices()} == {"alpha"}, 20, "beta's devices removed"
        )
        assert (
            topo.xenlike("xenstore", "read", f"/local/domain/{beta}/name", check=False).returncode
            != 0
        )  # its home is gone
        assert all(d["frontend_state"] == "Connected" for d in topo.devices("alpha"))
