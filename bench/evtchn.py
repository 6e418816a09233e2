"""Event channel ping-pong between two guests, against a raw eventfd ping-pong.

    python bench/evtchn.py [--quick]

- xenlike: two domain processes, booted by a hypervisor in this process,
  bound by an interdomain event channel (Dom0 allocates the port, as libxl
  does for the store port); one answers every event with one back, the
  other times the round trips with `Port.notify()` / `await Port.wait()`,
  the fast path that needs no hypercall.
- raw: two processes started the same way, each with a trio loop that
  writes the other's eventfd and waits on its own.

Rounds alternate raw, xenlike, raw, ... and the figures are medians of the
rounds, in microseconds per round trip. The last line is
`ratio round_trip: VALUE`, xenlike's time over raw's (the target is 1.3 or
less). Two processes on a 2-vCPU machine land on one vCPU or two as the
scheduler likes, so single rounds vary; compare medians from one run.
`--cpu N` pins every process to vCPU N. Then, per round trip, each
process's CPU time and voluntary context switches over the measured trips
(ping and pong; raw_ping and raw_pong; see bench/_cost.py): each sends one
event per trip, so the switches say how many of them woke a sleeper. The
hypervisor takes no part in a send.
"""

import argparse
import os
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
from xenlike.hypervisor import Hypervisor  # noqa: E402
from xenlike.xc import XenControl  # noqa: E402

TAG = "bench-evtchn"


def _params(domain: Any) -> dict[str, int]:
    return {k: int(v) for k, v in (word.split("=", 1) for word in domain.cmdline.split())}


# --- xenlike -------------------------------------------------------------------


async def ping(domain: Any) -> None:
    """Owns the port Dom0 allocated for the peer; answers every event."""
    p = _params(domain)
    port = await domain.evtchn.port(p["port"])
    for _ in range(p["warmup"]):
        await port.wait()
        port.notify()
    before = own_usage()
    for _ in range(p["rounds"]):
        await port.wait()
        port.notify()
    used = own_usage() - before
    await domain.console_write(f"{TAG} {used.cpu:.6f} {used.vcsw}")


async def pong(domain: Any) -> None:
    """Binds to the ping domain's port and times the round trips."""
    p = _params(domain)
    port = await domain.evtchn.bind_interdomain(p["peer"], p["port"])
    await port.wait()  # Xen leaves a freshly bound port pending
    for _ in range(p["warmup"]):  # the peer learns our doorbell meanwhile
        port.notify()
        await port.wait()
    before = own_usage()
    start = time.perf_counter()
    for _ in range(p["rounds"]):
        port.notify()
        await port.wait()
    elapsed = time.perf_counter() - start
    used = own_usage() - before
    per_trip = elapsed / p["rounds"] * 1e6
    await domain.console_write(f"{TAG} {per_trip:.3f} {used.cpu:.6f} {used.vcsw}")


async def xenlike_round(rounds: int, warmup: int, costs: Costs) -> float:
    """Microseconds per round trip, as the pong domain measured them; both
    domains' usage over the measured trips goes to `costs`."""
    with tempfile.TemporaryDirectory() as run_dir:
        hv = Hypervisor(Path(run_dir))
        exited = 0
        both_gone = trio.Event()

        def on_exit(domain: Any) -> None:
            nonlocal exited
            exited += domain.domid != 0
            if exited == 2:
                both_gone.set()

        hv.on_domain_exit.append(on_exit)
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            async with XenControl.connect(hv.run_dir) as xc:
                pinger = await xc.createdomain()
                await xc.set_max_mem(pinger, 4096)
                port = await xc.alloc_unbound(pinger, remote_dom=pinger + 1)
                counts = f"rounds={rounds} warmup={warmup}"
                await xc.build(pinger, "bench.evtchn:ping", cmdline=f"port={port} {counts}")
                ponger = await xc.create_domain(
                    "bench.evtchn:pong", memory_mb=4, cmdline=f"peer={pinger} port={port} {counts}"
                )
                await xc.unpause(pinger)
                await xc.unpause(ponger)
                with trio.fail_after(120):
                    await both_gone.wait()  # Dom0 stays quiet while they measure
            nursery.cancel_scope.cancel()

    def reported(domid: int) -> list[str]:
        for line in hv.log_lines:
            if f"(d{domid}) {TAG} " in line:
                return line.split(f"(d{domid}) {TAG} ", 1)[1].split()
        raise SystemExit(f"d{domid} did not report:\n" + "\n".join(hv.log_lines))

    per_trip, *pong_used = reported(ponger)
    for name, (cpu, switches) in (("ping", reported(pinger)), ("pong", pong_used)):
        costs.add(name, "round_trip", Usage(float(cpu), int(switches)), rounds)
    return float(per_trip)


# --- raw -----------------------------------------------------------------------


async def raw_wait(fd: int) -> int:
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def raw_ping(wait_fd: int, peer_fd: int, rounds: int, warmup: int) -> str:
    """CPU seconds and voluntary switches over the measured trips."""
    for _ in range(warmup):
        await raw_wait(wait_fd)
        os.eventfd_write(peer_fd, 1)
    before = own_usage()
    for _ in range(rounds):
        await raw_wait(wait_fd)
        os.eventfd_write(peer_fd, 1)
    used = own_usage() - before
    return f"{used.cpu:.6f} {used.vcsw}"


async def raw_pong(wait_fd: int, peer_fd: int, rounds: int, warmup: int) -> str:
    """Microseconds per round trip, then CPU seconds and voluntary switches."""
    for _ in range(warmup):
        os.eventfd_write(peer_fd, 1)
        await raw_wait(wait_fd)
    before = own_usage()
    start = time.perf_counter()
    for _ in range(rounds):
        os.eventfd_write(peer_fd, 1)
        await raw_wait(wait_fd)
    elapsed = time.perf_counter() - start
    used = own_usage() - before
    return f"{elapsed / rounds * 1e6} {used.cpu:.6f} {used.vcsw}"


def raw_round(rounds: int, warmup: int, costs: Costs) -> float:
    """Microseconds per round trip, as the raw pong process measured them; both
    processes' usage over the measured trips goes to `costs`."""
    to_ping = os.eventfd(0, os.EFD_NONBLOCK)
    to_pong = os.eventfd(0, os.EFD_NONBLOCK)
    common = [sys.executable, __file__, "--trips", str(rounds), "--warmup", str(warmup)]
    fds = (to_ping, to_pong)
    pinger = subprocess.Popen(
        common + ["--raw", "ping", "--fds", str(to_ping), str(to_pong)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    ponger = subprocess.Popen(
        common + ["--raw", "pong", "--fds", str(to_pong), str(to_ping)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    os.close(to_ping)
    os.close(to_pong)
    out, _ = ponger.communicate(timeout=120)
    ping_out, _ = pinger.communicate(timeout=60)
    if ponger.returncode != 0 or pinger.returncode != 0:
        raise SystemExit("a raw ping-pong process failed")
    per_trip, *pong_used = out.split()
    for name, (cpu, switches) in (("raw_ping", ping_out.split()), ("raw_pong", pong_used)):
        costs.add(name, "round_trip", Usage(float(cpu), int(switches)), rounds)
    return float(per_trip)


def run_raw(role: str, wait_fd: int, peer_fd: int, rounds: int, warmup: int) -> None:
    print(trio.run(raw_ping if role == "ping" else raw_pong, wait_fd, peer_fd, rounds, warmup))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cpu", type=int, default=None, help="pin everything to this vCPU")
    parser.add_argument("--trips", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=500, help=argparse.SUPPRESS)
    parser.add_argument("--raw", choices=["ping", "pong"], help=argparse.SUPPRESS)
    parser.add_argument("--fds", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw is not None:
        run_raw(args.raw, *args.fds, args.trips, args.warmup)
        return
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # the processes started from here inherit it
    repeat = args.rounds or (3 if args.quick else 9)
    trips = args.trips or (2_000 if args.quick else 20_000)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )  # the guests import this file

    costs = Costs()
    times: dict[str, list[float]] = {"raw": [], "xenlike": []}
    for _ in range(repeat):
        times["raw"].append(raw_round(trips, args.warmup, costs))
        times["xenlike"].append(trio.run(xenlike_round, trips, args.warmup, costs))
    med = {kind: statistics.median(values) for kind, values in times.items()}
    where = f"pinned to vCPU {args.cpu}" if args.cpu is not None else "unpinned"
    print(f"rounds: {repeat} (medians), {trips} round trips each, {where}")
    print(f"raw round trip: {med['raw']:.1f} us")
    print(f"xenlike round trip: {med['xenlike']:.1f} us")
    print(f"xenlike round trips/s: {1e6 / med['xenlike']:,.0f}")
    print("\n".join(costs.lines()))
    print(f"ratio round_trip: {med['xenlike'] / med['raw']:.3f}")


if __name__ == "__main__":
    main()
