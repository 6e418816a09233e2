"""Hypercall round trip from a guest, against a raw request/response between two processes.

    python bench/hypercall.py [--quick]

- xenlike: a domain process, booted by a hypervisor in this process, times
  `xen_version(XENVER_version)` calls through its `HypercallClient` and logs
  the figure (request and reply are 16 bytes each on the wire).
- raw: the same 16-byte request and 16-byte reply over a SOCK_SEQPACKET
  socket pair, a bare trio loop on each side: a child process started as
  the hypervisor starts a domain sends and waits, this process answers.

Rounds alternate raw, xenlike, raw, ... and the figures are medians of the
rounds, in microseconds per round trip. The last line is
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

from xenlike.abi.version import XenVerOp  # noqa: E402
from xenlike.abi.xen import Hypercall  # noqa: E402
from xenlike.hypercall import HYPERCALL_MAX_MESSAGE, MessageKind, Reply, Request  # noqa: E402
from xenlike.hypervisor import Hypervisor  # noqa: E402
from xenlike.hypervisor.core import XEN_VERSION  # noqa: E402
from xenlike.xc import XenControl  # noqa: E402

TAG = "bench-hypercall"
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
    start = time.perf_counter()
    for _ in range(calls):
        await call(Hypercall.xen_version, XenVerOp.version)
    elapsed = time.perf_counter() - start
    await domain.console_write(f"{TAG} {elapsed / calls * 1e6:.3f}")


async def xenlike_round(calls: int, warmup: int) -> float:
    """Microseconds per round trip, as the guest measured them."""
    with tempfile.TemporaryDirectory() as run_dir:
        hv = Hypervisor(Path(run_dir))
        gone = trio.Event()
        hv.on_domain_exit.append(lambda domain: gone.set() if domain.domid else None)
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            async with XenControl.connect(hv.run_dir) as xc:
                domid = await xc.create_domain("bench.hypercall:guest", memory_mb=4,
                                               cmdline=f"calls={calls} warmup={warmup}")
                await xc.unpause(domid)
                with trio.fail_after(120):
                    await gone.wait()  # Dom0 stays quiet while the guest measures
            nursery.cancel_scope.cancel()
    figures = [line.rsplit(" ", 1)[1] for line in hv.log_lines if f"(d1) {TAG} " in line]
    if not figures:
        raise SystemExit("the guest did not report:\n" + "\n".join(hv.log_lines))
    return float(figures[0])


# --- raw -----------------------------------------------------------------------


async def raw_server(sock: trio.socket.SocketType) -> None:
    while await sock.recv(HYPERCALL_MAX_MESSAGE + 1):
        await sock.send(REPLY)


async def raw_client(sock: trio.socket.SocketType, calls: int, warmup: int) -> float:
    for _ in range(warmup):
        await sock.send(REQUEST)
        await sock.recv(HYPERCALL_MAX_MESSAGE + 1)
    start = time.perf_counter()
    for _ in range(calls):
        await sock.send(REQUEST)
        await sock.recv(HYPERCALL_MAX_MESSAGE + 1)
    return (time.perf_counter() - start) / calls * 1e6


def raw_round(calls: int, warmup: int) -> float:
    """Microseconds per round trip, as the client process measured them."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = subprocess.Popen(
        [sys.executable, __file__, "--raw-client", str(theirs.fileno()), "--calls", str(calls),
         "--warmup", str(warmup)],
        pass_fds=(theirs.fileno(),), stdout=subprocess.PIPE, start_new_session=True)
    theirs.close()

    async def serve() -> None:
        await raw_server(trio.socket.from_stdlib_socket(ours))

    trio.run(serve)
    out, _ = child.communicate(timeout=60)
    if child.returncode != 0:
        raise SystemExit(f"raw client failed with exit code {child.returncode}")
    return float(out)


def run_raw_client(fd: int, calls: int, warmup: int) -> None:
    async def run() -> float:
        return await raw_client(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)),
                                calls, warmup)

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
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the guest imports this file

    times: dict[str, list[float]] = {"raw": [], "xenlike": []}
    for _ in range(rounds):
        times["raw"].append(raw_round(calls, warmup))
        times["xenlike"].append(trio.run(xenlike_round, calls, warmup))
    med = {kind: statistics.median(values) for kind, values in times.items()}
    where = f"pinned to vCPU {args.cpu}" if args.cpu is not None else "unpinned"
    print(f"rounds: {rounds} (medians), {calls} calls each, 16-byte request and reply, {where}")
    print(f"raw round trip: {med['raw']:.1f} us")
    print(f"xenlike round trip: {med['xenlike']:.1f} us")
    print(f"xenlike hypercalls/s: {1e6 / med['xenlike']:,.0f}")
    print(f"ratio round_trip: {med['xenlike'] / med['raw']:.3f}")


if __name__ == "__main__":
    main()
