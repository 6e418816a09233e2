"""The DomU sandbox: a hostile guest program tries every way out, and each one fails.

The topology is real (`xenlike up`): Dom0, a victim guest with a disk and a
vif, and the hostile guest (tests/escape_guest.py), which reports each
attempt on its console. Every attempt must end in EPERM or EACCES, while
Dom0 and the victim keep their devices Connected.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.test_hypervisor import wait_for_log, wait_for_shutdown
from xenlike.abi.sched import ShutdownReason
from xenlike.hypervisor import Hypervisor
from xenlike.sandbox import (
    DENIED,
    FS_READ_DIR,
    HOT,
    OWN_PID_ONLY,
    READ_TREE,
    SYSCALLS,
    Protections,
    SandboxPolicy,
    _beneath,
    domain_environment,
    logged_protections,
    seccomp_filter,
)
from xenlike.testing import RunningTopology
from xenlike.xc import XenControl

ESCAPES = """
[host]
name = "escape"

[dom0]
memory = 64
images = {{ "victim.img" = "4M", "hostile.img" = "4M" }}

[[domain]]
name = "victim"
memory = 16
disk = ["format=raw, vdev=xvda, access=rw, target=victim.img"]
vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0, ip=10.0.0.1/24"]

[[domain]]
name = "hostile"
memory = 16
init = "tests.escape_guest:escape"
disk = ["format=raw, vdev=xvda, access=rw, target=hostile.img"]
"""


@pytest.fixture
def listeners() -> Iterator[tuple[int, int, list[bytes]]]:
    """A TCP and a UDP socket on 127.0.0.1 the guest must not reach; what reaches them."""
    got: list[bytes] = []
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    tcp.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
                got.append(b"tcp connection")
                conn.close()
            except TimeoutError:
                pass
            try:
                got.append(udp.recv(64))
            except TimeoutError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield tcp.getsockname()[1], udp.getsockname()[1], got
    stop.set()
    thread.join()
    tcp.close()
    udp.close()


def escapes(console: str) -> dict[str, str]:
    return dict(re.findall(r"^escape (.+?): (.+)$", console, re.MULTILINE))


def test_every_escape_fails_and_the_topology_keeps_running(
    tmp_path: Path, listeners: tuple[int, int, list[bytes]]
) -> None:
    tcp_port, udp_port, reached = listeners
    host = tmp_path / "host"
    host.mkdir()
    secret = host / "secret"
    secret.write_text("the host's own file\n")
    importable = tmp_path / "lib"  # on the domains' import path: readable, never writable
    importable.mkdir()
    with RunningTopology(ESCAPES.format(), tmp_path, pythonpath=[importable]) as topo:
        log = (topo.run_dir / "hypervisor.log").read_text()
        dom0_pid = re.search(r"\(d0\) started pid (\d+)", log)
        assert dom0_pid is not None, log
        targets = {
            "dom0_pid": dom0_pid[1],
            "run_dir": str(topo.run_dir),
            "host_file": str(secret),
            "new_file": str(host / "planted"),
            "source_file": str(importable / "planted.py"),
            "image": str(topo.run_dir / "victim.img"),  # Dom0 keeps images there
            "tcp_port": tcp_port,
            "udp_port": udp_port,
        }
        hostile = topo.domid("hostile")
        topo.xenlike(
            "xenstore", "write", f"/local/domain/{hostile}/data/targets", json.dumps(targets)
        )
        console = topo.wait_for_console("hostile", "escape attempts done", timeout=60)
        outcomes = escapes(console)
        assert len(outcomes) >= 30, console
        escaped = {name: what for name, what in outcomes.items() if not what.startswith("denied ")}
        assert not escaped, escaped
        assert "environment names the run directory: no" in console

        # The topology runs on: the guest too, and every device stays Connected.
        assert {d["name"] for d in topo.domains()} == {"Domain-0", "victim", "hostile"}
        devices = topo.devices()
        assert {d["domain"] for d in devices} == {"victim", "hostile"}
        assert all(d["frontend_state"] == d["backend_state"] == "Connected" for d in devices), (
            devices
        )

        # dmesg says what confines each domain, and /proc agrees.
        dmesg = topo.xenlike("dmesg").stdout
        expected = SandboxPolicy.for_run_dir(topo.run_dir).expected()
        assert "(d0) sandbox: privileged (not sandboxed)" in dmesg, dmesg
        assert f"(d{hostile}) sandbox: {expected}" in dmesg, dmesg
        logged = logged_protections(dmesg)
        assert logged[0] == Protections(privileged=True)
        assert logged[hostile] == expected == logged[topo.domid("victim")]
        pid = re.findall(rf"\(d{hostile}\) started pid (\d+)", dmesg)[-1]
        status = (Path("/proc") / pid / "status").read_text()
        assert "NoNewPrivs:\t1" in status
        if expected.seccomp:
            assert "Seccomp:\t2" in status
        if expected.capabilities_dropped:
            assert "CapEff:\t0000000000000000" in status
            assert "CapBnd:\t0000000000000000" in status
    assert secret.read_text() == "the host's own file\n"
    assert not (host / "planted").exists() and not (importable / "planted.py").exists()
    assert reached == []


def test_a_root_that_holds_the_run_directory_is_granted_around_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "setup.cfg").write_text("")
    run = project / "state" / "run"
    (run / "xenstored").mkdir(parents=True)
    (project / "state" / "notes").write_text("")
    (project / "link-to-run").symlink_to(run)
    assert set(_beneath(str(project), (str(run),))) == {
        (str(project), FS_READ_DIR),
        (str(project / "state"), FS_READ_DIR),
        (str(project / "pkg"), READ_TREE),
        (str(project / "setup.cfg"), READ_TREE),
        (str(project / "state" / "notes"), READ_TREE),
    }
    assert _beneath(str(run / "xenstored"), (str(run),)) == []
    assert _beneath(str(tmp_path / "elsewhere"), (str(run),)) == []  # does not exist
    (tmp_path / "elsewhere").mkdir()
    assert _beneath(str(tmp_path / "elsewhere"), (str(run),)) == [
        (str(tmp_path / "elsewhere"), READ_TREE)
    ]


PROBE = """
import os, sys
import pkg, mod
print("imported", pkg.VALUE, mod.X)
for path in sys.argv[1:]:
    try:
        open(path, "rb").read(1)
        print("read", path)
    except PermissionError:
        print("denied", path)
"""


def test_an_import_path_yields_its_modules_not_the_images_or_run_directory_beside_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sandbox itself, in a child process: a directory on the import path that
    also holds disk images and the run directory (as when `xenlike up` runs where
    its topology file is) gives the domain its modules and nothing else."""
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "__init__.py").write_text("VALUE = 7\n")
    (lib / "mod.py").write_text("X = 1\n")
    (lib / "disk.img").write_bytes(b"the disk")
    run = lib / "run"
    run.mkdir()
    (run / "hypervisor.log").write_text("the log\n")
    monkeypatch.syspath_prepend(str(lib))
    policy = SandboxPolicy.for_run_dir(run)
    if not policy.landlock_abi:
        pytest.skip("this kernel has no Landlock")
    env = {**domain_environment(dict(os.environ)), "PYTHONPATH": str(lib)}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            PROBE,
            str(lib / "disk.img"),
            str(run / "hypervisor.log"),
            str(lib / "mod.py"),
        ],
        preexec_fn=policy.enter,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split("\n")[:4] == [
        "imported 7 1",
        f"denied {lib / 'disk.img'}",
        f"denied {run / 'hypervisor.log'}",
        f"read {lib / 'mod.py'}",
    ], result.stdout + result.stderr


@pytest.mark.parametrize(
    "protections",
    [
        Protections(privileged=True),
        Protections(),
        Protections(no_new_privs=True, landlock_abi=3),
        Protections(no_new_privs=True, capabilities_dropped=True, landlock_abi=7, seccomp=True),
    ],
)
def test_protections_read_back_from_their_log_line(protections: Protections) -> None:
    log = f"(XEN) (d3) sandbox: no-new-privs\n(XEN) [  0.2] (d3) sandbox: {protections}\n"
    assert logged_protections(log) == {3: protections}


def _header_numbers(path: Path) -> dict[str, int]:
    text = path.read_text()
    return {
        name: int(number)
        for name, number in re.findall(r"#define __NR(?:3264)?_(\w+)\s+(\d+)\b", text)
    }


@pytest.mark.parametrize(
    ("machine", "header"),
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/include/asm-generic/unistd.h"),
    ],
)
def test_the_syscall_numbers_are_the_kernel_headers(machine: str, header: str) -> None:
    path = Path(header)
    if not path.exists():
        pytest.skip(f"{header} is not installed (Debian's linux-libc-dev)")
    known = _header_numbers(path)
    ours = SYSCALLS[machine]
    checked = [name for name in ours if name in known]
    assert len(checked) > len(ours) * 3 // 4, "the header names too few of them"
    assert {name: ours[name] for name in checked} == {name: known[name] for name in checked}


def test_every_denied_call_is_named_for_some_architecture() -> None:
    for name in (*DENIED, *OWN_PID_ONLY, *HOT, "clone", "clone3", "prlimit64"):
        assert any(name in table for table in SYSCALLS.values()), name
    for table in SYSCALLS.values():  # the fast path allows nothing the filter denies
        hot = {table[name] for name in HOT if name in table}
        assert hot.isdisjoint(
            table[name]
            for name in (*DENIED, *OWN_PID_ONLY, "clone", "clone3", "prlimit64")
            if name in table
        )
    for name in (*OWN_PID_ONLY, "clone", "clone3", "prlimit64", "socket", "connect"):
        assert all(name in table for table in SYSCALLS.values()), name


@pytest.mark.parametrize("machine", sorted(SYSCALLS))
def test_the_filter_is_whole_instructions_within_bpf_limits(machine: str) -> None:
    program = seccomp_filter(machine, 1234)
    assert len(program) % 8 == 0 and len(program) // 8 < 4096  # BPF_MAXINSNS


async def test_a_domain_the_kernel_will_not_confine_is_never_started(
    hv: Hypervisor, xc: XenControl
) -> None:
    """A policy the child cannot enter (here a filter for another machine) never
    yields a less confined domain: the domain's code never runs, and it crashes
    as it is built (its process starts then, held until its first unpause)."""
    hv._sandbox = attrs.evolve(hv.sandbox, seccomp_machine="s390x")
    domid = await xc.create_domain("tests.kernels:hello", memory_mb=4)
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.crash
    log = await xc.dmesg()
    assert f"(d{domid}) could not start its process" in log, log
    assert "hello from" not in log
    assert await healthy_dom0(xc)


async def test_what_the_kernel_lacks_is_skipped_and_said(hv: Hypervisor, xc: XenControl) -> None:
    """As on a kernel without Landlock or seccomp: the domain boots, confined by
    what remains, and dmesg says which; and it is not dumpable."""
    hv._sandbox = attrs.evolve(hv.sandbox, landlock_abi=0, seccomp_machine=None)
    domid = await xc.create_domain("tests.kernels:dumpable", memory_mb=4)
    await xc.unpause(domid)
    log = await wait_for_log(xc, f"(d{domid}) dumpable=")
    assert f"(d{domid}) dumpable=0" in log
    said = logged_protections(log)[domid]
    assert said == attrs.evolve(hv.sandbox.expected(), landlock_abi=0, seccomp=False)
    assert said.no_new_privs and "landlock" not in str(said) and "seccomp" not in str(said)
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.poweroff


async def healthy_dom0(xc: XenControl) -> bool:
    return 0 in [info.domain for info in await xc.list_domains()]
