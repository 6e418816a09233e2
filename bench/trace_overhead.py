"""What tracing costs: nothing measurable with no reader, and how much with one.

A hypervisor runs in this process; the guests are real domain processes.

- send hook: the cost, in this process, of what a fast-path event send
  adds for tracing (`EventChannels.trace_send`): no hook at all, the hook
  with no reader (one load of the buffer's `enabled` word), and the hook
  writing a record.
- ping-pong: two guests bounce an event over the fast path (no hypervisor
  round trip) and time their loop: with no trace hook in the guests
  ("none"), with the hook and no reader ("off"), and with a reader
  following the buffers from another process ("on").
- hypercalls: a guest times xen_version calls, off and on (with no reader
  the dispatcher lists no trace listener at all, so "none" is "off").

The hypervisor and the guests are pinned to one CPU (as `xl vcpu-pin`
would), the reader to another: left to the scheduler, a wake-up costs 5 or
50 us depending on where the two guests land, which swamps everything
else. Rounds alternate the modes, each round in a different order, and the
medians are reported. Run: `python bench/trace_overhead.py [--quick]`.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from xenlike.abi.version import XenVerOp  # noqa: E402
from xenlike.abi.xen import Hypercall  # noqa: E402
from xenlike.domain import Domain, EventChannels  # noqa: E402
from xenlike.hypervisor import Hypervisor  # noqa: E402
from xenlike.trace import TraceBuffer, TraceSource, fast_path_recorder  # noqa: E402
from xenlike.xc import XenControl  # noqa: E402

READER = """\
import os, sys, trio
from contextlib import aclosing
from xenlike.trace import follow
async def main():
    os.sched_setaffinity(0, {int(sys.argv[2])})
    print("reading", flush=True)
    async with aclosing(follow(sys.argv[1])) as events:
        async for _ in events:
            pass
trio.run(main)
"""


# --- guest kernels (the domains import this module by name) -----------------


def _params(domain: Domain) -> dict[str, str]:
    return dict(word.split("=", 1) for word in domain.cmdline.split())


def _hooks(domain: Domain, p: dict[str, str]) -> None:
    if p["hook"] == "0":
        domain.evtchn.on_send = None


async def ping(domain: Domain) -> None:
    p = _params(domain)
    _hooks(domain, p)
    port = await domain.evtchn.port(int(p["port"]))
    for _ in range(int(p["rounds"]) + 1):
        await port.wait()
        port.notify()


async def pong(domain: Domain) -> None:
    p = _params(domain)
    _hooks(domain, p)
    port = await domain.evtchn.bind_interdomain(int(p["peer"]), int(p["port"]))
    await port.wait()  # the pending event of a fresh binding
    port.notify()  # one warm-up round: the first send may go through the hypervisor
    await port.wait()
    start = time.perf_counter_ns()
    for _ in range(int(p["rounds"])):
        port.notify()
        await port.wait()
    await domain.console_write(f"elapsed_ns={time.perf_counter_ns() - start}")


async def caller(domain: Domain) -> None:
    calls = int(_params(domain)["calls"])
    hypercalls = domain.hypercalls
    start = time.perf_counter_ns()
    for _ in range(calls):
        await hypercalls.call(Hypercall.xen_version, XenVerOp.version)
    await domain.console_write(f"elapsed_ns={time.perf_counter_ns() - start}")


# --- the driver ----------------------------------------------------------------


def send_hook_ns(rounds: int, calls: int) -> dict[str, float]:
    """ns per `trace_send` in this process: no hook, hook with no reader, hook recording."""
    buffer = TraceBuffer.create(1 << 16, domid=1, source=TraceSource.domain)
    channels = EventChannels(hypercalls=None, nursery=None)  # type: ignore[arg-type]  # unused
    figures: dict[str, list[float]] = {"none": [], "off": [], "on": []}
    for _ in range(rounds):
        for mode, times in figures.items():
            channels.on_send = None if mode == "none" else fast_path_recorder(buffer, 1)
            buffer.enabled = mode == "on"
            trace_send = channels.trace_send
            start = time.perf_counter_ns()
            for _ in range(calls):
                trace_send(5)
            times.append((time.perf_counter_ns() - start) / calls)
    buffer.close()
    return {mode: statistics.median(times) for mode, times in figures.items()}


async def elapsed(xc: XenControl, domid: int) -> int:
    with trio.fail_after(120):
        while True:
            found = re.search(rf"\(d{domid}\) elapsed_ns=(\d+)", await xc.dmesg())
            if found:
                return int(found.group(1))
            await trio.sleep(0.02)


async def ping_pong_us(xc: XenControl, rounds: int, hook: bool) -> float:
    ping = await xc.createdomain()
    await xc.set_max_mem(ping, 4096)
    port = await xc.alloc_unbound(ping, remote_dom=ping + 1)
    args = f"port={port} rounds={rounds} hook={int(hook)}"
    await xc.build(ping, "bench.trace_overhead:ping", cmdline=args)
    pong = await xc.create_domain(
        "bench.trace_overhead:pong", memory_mb=4, cmdline=f"peer={ping} {args}"
    )
    await xc.unpause(ping)
    await xc.unpause(pong)
    ns = await elapsed(xc, pong)
    for domid in (ping, pong):
        await xc.destroy(domid)
    return ns / rounds / 1000


async def hypercall_us(xc: XenControl, calls: int) -> float:
    domid = await xc.create_domain(
        "bench.trace_overhead:caller", memory_mb=4, cmdline=f"calls={calls}"
    )
    await xc.unpause(domid)
    ns = await elapsed(xc, domid)
    await xc.destroy(domid)
    return ns / calls / 1000


async def with_reader(run_dir: Path, cpu: int, measure: Callable[[], Awaitable[float]]) -> float:
    """Run `measure()` while a reader in another process, on `cpu`, follows every buffer."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", READER, str(run_dir), str(cpu)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        said = b""
        while not said.endswith(b"\n"):
            said += await process.stdout.receive_some()
        await trio.sleep(0.2)  # its first rescan has happened: tracing is on
        return await measure()
    finally:
        process.kill()
        await process.wait()
        await process.stdout.aclose()


async def bench(rounds: int, pairs: int, calls: int) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})  # the guests inherit it
    figures: dict[str, list[float]] = {}
    with TemporaryDirectory() as tmp:
        hv = Hypervisor(Path(tmp) / "run")
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            async with XenControl.connect(hv.run_dir) as xc:
                modes: dict[str, Callable[[], Awaitable[float]]] = {
                    "pp none": lambda: ping_pong_us(xc, pairs, hook=False),
                    "pp off": lambda: ping_pong_us(xc, pairs, hook=True),
                    "pp on": lambda: with_reader(
                        hv.run_dir, cpus[-1], lambda: ping_pong_us(xc, pairs, hook=True)
                    ),
                    "hc off": lambda: hypercall_us(xc, calls),
                    "hc on": lambda: with_reader(
                        hv.run_dir, cpus[-1], lambda: hypercall_us(xc, calls)
                    ),
                }
                names = list(modes)
                for r in range(rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        figures.setdefault(name, []).append(await modes[name]())
            nursery.cancel_scope.cancel()
    hook = send_hook_ns(rounds, 100_000)
    med_pp = {k[3:]: statistics.median(v) for k, v in figures.items() if k.startswith("pp")}
    med_hc = {k[3:]: statistics.median(v) for k, v in figures.items() if k.startswith("hc")}
    print(f"rounds: {rounds} (medians), {pairs} ping-pong round trips, {calls} hypercalls")
    print(f"send hook, none: {hook['none']:.0f} ns")
    print(f"send hook, no reader: {hook['off']:.0f} ns")
    print(f"send hook, recording: {hook['on']:.0f} ns")
    print(f"ping-pong round trip, no hook: {med_pp['none']:.1f} us")
    print(f"ping-pong round trip, no reader: {med_pp['off']:.1f} us")
    print(f"ping-pong round trip, reader: {med_pp['on']:.1f} us")
    print(f"hypercall round trip, no reader: {med_hc['off']:.1f} us")
    print(f"hypercall round trip, reader: {med_hc['on']:.1f} us")
    print(f"ratio ping_pong_no_reader_vs_no_hook: {med_pp['off'] / med_pp['none']:.3f}")
    print(f"ratio ping_pong_reader_vs_no_reader: {med_pp['on'] / med_pp['off']:.3f}")
    print(f"ratio hypercall_reader_vs_no_reader: {med_hc['on'] / med_hc['off']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    pairs = 500 if args.quick else 5000
    calls = 300 if args.quick else 3000
    trio.run(bench, rounds, pairs, calls)


if __name__ == "__main__":
    main()
