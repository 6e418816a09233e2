"""Hypercall round trip from a guest, against a raw request/response between two processes.

    python bench/hypercall.py [--quick]

- xenlike: a domain process, booted by a hypervisor in this process, times
  `xen_version(XENVER_version)` calls through its `HypercallClient` and logs
  the figure (request and reply are 16 bytes each on the wire).
- raw: the same 16-byte request and 16-byte reply over a SOCK_SEQPACKET
  socket pair, a bare trio loop on each side: a child process started as
  the hypervisor starts a domain sends and waits, this process answers.

Rounds alternate raw, xenlike, raw, ... and the figures are medians of the
rounds, in microseconds per round trip. Then, per call, each side's CPU
time and voluntary context switches over the measured calls (guest and
hypervisor; raw_client and raw_server; see bench/_cost.py): every call is
one message each way on both paths, so the switches are the wake-ups that
messages cost. The last line is
`ratio round_trip: VALUE`, xenlike's time over raw's (the target is 1.5 or
less). Two processes on a 2-vCPU machine land on one vCPU or two as the
scheduler likes, so single rounds vary; compare medians from one run.
`--cpu N` pins both sides of both loops to vCPU N: then the figures are the
software's cost alone, without cross-vCPU wake-ups.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cost import Costs, Usage, own_usage  # noqa: E402
from xenlike.abi.version import XenVerOp  # noqa: E402
from xenlike.abi.xen import Hypercall  # noqa: E402
from xenlike.hypercall import HYPERCALL_MAX_MESSAGE, MessageKind, Reply, Request  # noqa: E402
from xenlike.hypervisor import Hypervisor  # noqa: E402
from xenlike.hypervisor.core import XEN_VERSION, HypervisorDomain  # noqa: E402
from xenlike.xc import XenControl  # noqa: E402

TAG = "bench-hypercall"
BEGIN = f"{TAG}-begin"
VERSION = XEN_VERSION[0] << 16 | XEN_VERSION[1]
REQUEST = Request(1, Hypercall.xen_version, XenVerOp.version, 0, b"").encode()
REPLY = Reply(1, MessageKind.reply, VERSION).encode()


# --- xenlike -------------------------------------------------------------------


async def guest(domain: Any) -> None:
    """The kernel of the measuring domain (`bench.hypercall:guest`)."""
    params = dict(word.split("=", 1) for word in domain.cmdline.split())
    call = domain.hypercalls.call
    for _ in range(int(params["warmup"])):
        await call(Hypercall.xen_version, XenVerOp.version)
    calls = int(params["calls"])
    await domain.console_write(BEGIN)  # the hypervisor samples its own usage here ...
    before = own_usage()
    start = time.perf_counter()
    for _ in range(calls):
        await call(Hypercall.xen_version, XenVerOp.version)
    elapsed = time.perf_counter() - start
    used = own_usage() - before
    # ... and here, when this line arrives
    await domain.console_write(f"{TAG} {elapsed / calls * 1e6:.3f} {used.cpu:.6f} {used.vcsw}")


class MeteredHypervisor(Hypervisor):
    """A hypervisor that samples its own CPU time and voluntary switches when the
    guest says its measured calls begin and end: the console line is a
    hypercall, handled in this process between two of the guest's calls."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.begun: Usage | None = None
        self.used: Usage | None = None

    def log_console(self, domain: HypervisorDomain, text: str) -> None:
        if text == BEGIN:
            self.begun = own_usage()
        elif text.startswith(f"{TAG} ") and self.begun is not None:
            self.used = own_usage() - self.begun
        super().log_console(domain, text)


async def xenlike_round(calls: int, warmup: int, costs: Costs) -> float:
    """Microseconds per round trip, as the guest measured them; both sides' usage
    over the measured calls goes to `costs`."""
    with tempfile.TemporaryDirectory() as run_dir:
        hv = MeteredHypervisor(Path(run_dir))
        gone = trio.Event()
        hv.on_domain_exit.append(lambda domain: gone.set() if domain.domid else None)
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            async with XenControl.connect(hv.run_dir) as xc:
                domid = await xc.create_domain(
                    "bench.hypercall:guest", memory_mb=4, cmdline=f"calls={calls} warmup={warmup}"
                )
                await xc.unpause(domid)
                with trio.fail_after(120):
                    await gone.wait()  # Dom0 stays quiet while the guest measures
            nursery.cancel_scope.cancel()
    figures = [
        line.split(f"(d1) {TAG} ", 1)[1].split() for line in hv.log_lines if f"(d1) {TAG} " in line
    ]
    if not figures or hv.used is None:
        raise SystemExit("the guest did not report:\n" + "\n".join(hv.log_lines))
    per_call, cpu, switches = figures[0]
    costs.add("guest", "round_trip", Usage(float(cpu), int(switches)), calls)
    costs.add("hypervisor", "round_trip", hv.used, calls)
    return float(per_call)


# --- raw -----------------------------------------------------------------------


async def raw_server(sock: trio.socket.SocketType, warmup: int) -> Usage:
    """Answers until the client hangs up; returns its usage after the warm-up."""
    for _ in range(warmup):
        await sock.recv(HYPERCALL_MAX_MESSAGE + 1)
        await sock.send(REPLY)
    before = own_usage()
    while await sock.recv(HYPERCALL_MAX_MESSAGE + 1):
        await sock.send(REPLY)
    return own_usage() - before


async def raw_client(sock: trio.socket.SocketType, calls: int, warmup: int) -> str:
    """Microseconds per round trip, then CPU seconds and voluntary switches."""
    for _ in range(warmup):
        await sock.send(REQUEST)
        await sock.recv(HYPERCALL_MAX_MESSAGE + 1)
    before = own_usage()
    start = time.perf_counter()
    for _ in range(calls):
        await sock.send(REQUEST)
        await sock.recv(HYPERCALL_MAX_MESSAGE + 1)
    elapsed = time.perf_counter() - start
    used = own_usage() - before
    return f"{elapsed / calls * 1e6} {used.cpu:.6f} {used.vcsw}"


def raw_round(calls: int, warmup: int, costs: Costs) -> float:
    """Microseconds per round trip, as the client process measured them; both
    sides' usage over the measured exchanges goes to `costs`."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--raw-client",
            str(theirs.fileno()),
            "--calls",
            str(calls),
            "--warmup",
            str(warmup),
        ],
        pass_fds=(theirs.fileno(),),
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    theirs.close()

    async def serve() -> Usage:
        return await raw_server(trio.socket.from_stdlib_socket(ours), warmup)

    server_used = trio.run(serve)
    out, _ = child.communicate(timeout=60)
    if child.returncode != 0:
        raise SystemExit(f"raw client failed with exit code {child.returncode}")
    per_call, cpu, switches = out.split()
    costs.add("raw_client", "round_trip", Usage(float(cpu), int(switches)), calls)
    costs.add("raw_server", "round_trip", server_used, calls)
    return float(per_call)


def run_raw_client(fd: int, calls: int, warmup: int) -> None:
    async def run() -> str:
        return await raw_client(
            trio.socket.from_stdlib_socket(socket.socket(fileno=fd)), calls, warmup
        )

    print(trio.run(run))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cpu", type=int, default=None, help="pin everything to this vCPU")
    parser.add_argument("--calls", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--raw-client", type=int, metavar="FD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_client is not None:
        run_raw_client(args.raw_client, args.calls, args.warmup)
        return
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # the processes started from here inherit it
    rounds = args.rounds or (3 if args.quick else 9)
    calls = args.calls or (1_000 if args.quick else 10_000)
    warmup = args.warmup
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )  # the guest imports this file

    costs = Costs()
    times: dict[str, list[float]] = {"raw": [], "xenlike": []}
    for _ in range(rounds):
        times["raw"].append(raw_round(calls, warmup, costs))
        times["xenlike"].append(trio.run(xenlike_round, calls, warmup, costs))
    med = {kind: statistics.median(values) for kind, values in times.items()}
    where = f"pinned to vCPU {args.cpu}" if args.cpu is not None else "unpinned"
    print(f"rounds: {rounds} (medians), {calls} calls each, 16-byte request and reply, {where}")
    print(f"raw round trip: {med['raw']:.1f} us")
    print(f"xenlike round trip: {med['xenlike']:.1f} us")
    print(f"xenlike hypercalls/s: {1e6 / med['xenlike']:,.0f}")
    print("\n".join(costs.lines()))
    print(f"ratio round_trip: {med['xenlike'] / med['raw']:.3f}")


if __name__ == "__main__":
    main()
