"""A guest program that tries every way out of its domain (tests/test_sandbox.py).

It waits for `data/targets` in its XenStore home (JSON the test writes once
the topology is up: host paths, ports, Dom0's pid), tries each escape, and
prints one line per attempt on its console:
`escape NAME: denied EPERM` (or EACCES), `escape NAME: ESCAPED ...` when the
attempt worked, or `escape NAME: failed ...` for any other error; and
whether its environment names the run directory. Then `escape attempts
done`, and it idles, so the test can see it still runs.
"""

import ctypes
import errno
import json
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio

from xenlike.xenstore import XenStoreError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
CLONE_NEWUSER = 0x10000000
PTRACE_ATTACH = 16
IPC_PRIVATE = 0
SYS = {
    "x86_64": {"pidfd_open": 434, "io_uring_setup": 425, "process_vm_readv": 310},
    "aarch64": {"pidfd_open": 434, "io_uring_setup": 425, "process_vm_readv": 270},
}[os.uname().machine]


def _raw(result: int) -> object:
    """A libc call's result, or its errno raised as OSError."""
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def outcome(attempt: Callable[[], object]) -> str:
    try:
        got = attempt()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return f"denied {name}" if exc.errno in (errno.EPERM, errno.EACCES) else f"failed {name}"
    return f"ESCAPED {str(got)[:80]!r}"


def every_fd(pid: int) -> object:
    """Open /proc/PID/fd/N for the first fds: one that opens is another process's file.
    Numbers with no fd behind them answer ENOENT; what matters is how the others fail."""
    errors = set()
    for fd in range(64):
        try:
            with open(f"/proc/{pid}/fd/{fd}", "rb") as file:
                return f"fd {fd}: {file.read(16)!r}"
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.add(exc.errno)
    raise OSError(errors.pop() if len(errors) == 1 else errno.EIO, f"errors {sorted(errors)}")


def connect_unix(path: str) -> object:
    for kind in (socket.SOCK_SEQPACKET, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as sock:
            sock.connect(path)
            return f"connected to {path}"
    return None


def tcp(port: int) -> object:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        return sock.recv(64)


def udp(port: int) -> object:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return sock.sendto(b"escaped", ("127.0.0.1", port))


def write_file(path: str) -> object:
    with open(path, "r+b") as file:
        return file.write(b"escaped")


def create_file(path: str) -> object:
    with open(path, "xb") as file:
        return file.write(b"escaped")


def attempts(targets: dict[str, Any]) -> dict[str, Callable[[], object]]:
    hypervisor, dom0 = os.getppid(), int(targets["dom0_pid"])
    run_dir, host_file = targets["run_dir"], targets["host_file"]
    readv = SYS["process_vm_readv"]
    return {
        "list /proc": lambda: os.listdir("/proc"),
        "hypervisor cmdline": lambda: open(f"/proc/{hypervisor}/cmdline").read(),
        "hypervisor environ": lambda: open(f"/proc/{hypervisor}/environ").read(),
        "hypervisor cwd": lambda: os.readlink(f"/proc/{hypervisor}/cwd"),
        "hypervisor fd list": lambda: os.listdir(f"/proc/{hypervisor}/fd"),
        "hypervisor fds (other domains' memory)": lambda: every_fd(hypervisor),
        "hypervisor mem": lambda: open(f"/proc/{hypervisor}/mem", "rb").read(1),
        "dom0 cmdline": lambda: open(f"/proc/{dom0}/cmdline").read(),
        "dom0 fds": lambda: every_fd(dom0),
        "list run directory": lambda: os.listdir(run_dir),
        "hypervisor.sock": lambda: connect_unix(f"{run_dir}/hypervisor.sock"),
        "xenstored socket": lambda: connect_unix(f"{run_dir}/xenstored/socket"),
        "read hypervisor.log": lambda: open(f"{run_dir}/hypervisor.log").read(64),
        "read disk image": lambda: open(targets["image"], "rb").read(16),
        "write disk image": lambda: write_file(targets["image"]),
        "read host file": lambda: open(host_file).read(),
        "write host file": lambda: write_file(host_file),
        "create host file": lambda: create_file(targets["new_file"]),
        "write project source": lambda: create_file(targets["source_file"]),
        "chmod host file": lambda: os.chmod(host_file, 0o777),
        "tcp to host": lambda: tcp(int(targets["tcp_port"])),
        "udp to host": lambda: udp(int(targets["udp_port"])),
        "signal hypervisor": lambda: os.kill(hypervisor, 0),
        "signal dom0": lambda: os.kill(dom0, signal.SIGCONT),
        "ptrace hypervisor": lambda: _raw(_libc.ptrace(PTRACE_ATTACH, hypervisor, None, None)),
        "process_vm_readv dom0": lambda: _raw(_libc.syscall(readv, dom0, None, 0, None, 0, 0)),
        "pidfd_open hypervisor": lambda: _raw(_libc.syscall(SYS["pidfd_open"], hypervisor, 0)),
        "new user namespace": lambda: _raw(_libc.unshare(CLONE_NEWUSER)),
        "fork": lambda: os.fork(),
        "io_uring": lambda: _raw(
            _libc.syscall(SYS["io_uring_setup"], 8, ctypes.create_string_buffer(120))
        ),
        "System V shared memory": lambda: _raw(_libc.shmget(IPC_PRIVATE, 4096, 0o1600)),
    }


async def escape(guest: Any) -> None:
    xs = guest.xs
    with trio.fail_after(60):
        async with xs.watch("data/targets") as events:
            async for _ in events:
                try:
                    targets = json.loads((await xs.read("data/targets")).decode())
                    break
                except XenStoreError:
                    pass
    for name, attempt in attempts(targets).items():
        print(f"escape {name}: {outcome(attempt)}")
    told = [key for key, value in os.environ.items() if targets["run_dir"] in value]
    print(f"environment names the run directory: {told or 'no'}")
    print("escape attempts done")
    await trio.sleep_forever()
