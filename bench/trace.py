"""What tracing costs in throughput: off, records kept in buffers, and a live reader.

Three workloads, each in three modes measured in the same run:

- ring: a FrontChannel and a BackChannel (the XenBus data path) in two
  processes over one shared page, an echo ring of 32 slots with 32 callers
  in flight and ring.h's event suppression; each notify goes through the
  domain's send hook, as `Port.notify` does. "off": the hooks are there
  and the buffers disabled, as in a domain nobody traces; "buffers": both
  processes record every fast-path send and every ring event (`--rings`)
  into their trace buffers, which nobody reads; "live": the same with a
  reader process following both buffers as `follow` does.
- ping-pong: two guests (domain processes under a hypervisor) bounce an
  event over the fast path, as bench/trace_overhead.py does.
- hypercalls: a guest calls xen_version in a loop.
  For these two, "buffers" is a reader that attaches and never reads, and
  "live" is `xenlike trace --record FILE --quiet`, the real recorder.

Workers run on one CPU and readers on another (as `xl vcpu-pin` would
place them): left to the scheduler, a wake-up costs 5 or 50 us depending on
where the two ends land, which swamps everything else. Rounds alternate the
modes, each round in a different order; medians are reported, and the
ratios (throughput with tracing over throughput without) come last.
Run: `python bench/trace.py [--quick]`.
"""

import argparse
import mmap
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from bench.trace_overhead import hypercall_us, ping_pong_us
from tests.echo_driver import ECHO_RING
from xenlike._eventfd import EventFd
from xenlike.hypervisor import Hypervisor
from xenlike.ring import BackRing, FrontRing
from xenlike.trace import (
    TraceBuffer,
    TraceCursor,
    TraceReader,
    TraceSource,
    decode_records,
    fast_path_recorder,
)
from xenlike.trace.events import EventRecorder, RingTrace
from xenlike.xc import XenControl
from xenlike.xenbus.channel import BackChannel, FrontChannel

MODES = ("off", "buffers", "live")
DEPTH = 32
FRONT_PORT, BACK_PORT = 5, 7


# --- ring between two processes ------------------------------------------------------


class TracedDoorbell:
    """A port's doorbell as `Port.notify` rings it: the send hook first, then the eventfd."""

    def __init__(
        self, mine: EventFd, theirs: EventFd, port: int, on_send: Callable[[int], None]
    ) -> None:
        self.mine, self.theirs, self.number, self.on_send = mine, theirs, port, on_send

    def notify(self) -> None:
        self.on_send(self.number)
        self.theirs.notify()

    async def wait(self) -> int:
        return await self.mine.wait()


def _traced(
    channel: Any,
    buffer_fd: int,
    domid: int,
    port: int,
    mode: str,
    backend: bool,
    mine: EventFd,
    theirs: EventFd,
) -> None:
    buffer = TraceBuffer.attach(os.dup(buffer_fd), writable=True)
    channel.port = TracedDoorbell(mine, theirs, port, fast_path_recorder(buffer, domid))
    if mode != "off":
        channel.trace = RingTrace(EventRecorder(buffer, domid), channel.ring, port, backend=backend)


async def _back(
    mem: memoryview, evts: tuple[int, int], buffer_fd: int, mode: str, count: int
) -> None:
    back = BackChannel(BackRing(ECHO_RING, mem), None)  # type: ignore[arg-type]  # set below
    _traced(back, buffer_fd, 0, BACK_PORT, mode, True, EventFd(evts[0]), EventFd(evts[1]))
    answered = 0
    async for batch in back.batches_of_requests():
        back.respond_many([ECHO_RING.response.record(id=r.id, value=r.value) for r in batch])
        answered += len(batch)
        if answered >= count:
            return


def _run_back(
    mem: mmap.mmap, evts: tuple[int, int], buffer_fd: int, mode: str, cpu: int, count: int
) -> None:
    os.sched_setaffinity(0, {cpu})
    trio.run(_back, memoryview(mem), evts, buffer_fd, mode, count)


def _run_reader(fds: tuple[int, int], cpu: int) -> None:
    """Follow both buffers as `follow` does: read, decode, sleep 50 ms; until killed."""
    os.sched_setaffinity(0, {cpu})
    buffers = [TraceBuffer.attach(os.dup(fd), writable=False) for fd in fds]
    cursors = [TraceCursor.oldest(b.nr_records, b.prod) for b in buffers]
    while True:
        for buffer, cursor in zip(buffers, cursors):
            _, data = buffer.read(cursor)
            decode_records(data)
        time.sleep(0.05)


async def _front(front: FrontChannel, count: int) -> float:
    request = ECHO_RING.request.record()
    per_caller = count // DEPTH

    async def caller() -> None:
        for value in range(per_caller):
            await front.call(request._replace(value=value))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(front.run)
        async with trio.open_nursery() as callers:
            for _ in range(DEPTH):
                callers.start_soon(caller)
        nursery.cancel_scope.cancel()
    return per_caller * DEPTH / (time.perf_counter() - start)


def ring_round(mode: str, count: int, cpus: list[int]) -> float:
    """Request/response pairs per second through the two channels, in `mode`."""
    shm = mmap.mmap(-1, 4096)
    req, rsp = EventFd.create(), EventFd.create()
    buffers = [TraceBuffer.create(4096, domid=d, source=TraceSource.domain) for d in (1, 0)]
    for buffer in buffers:
        buffer.enabled = mode != "off"
    inheritable = [req.fd, rsp.fd, *(b.fd for b in buffers)]
    for fd in inheritable:
        os.set_inheritable(fd, True)
    mem = memoryview(shm)
    front = FrontChannel(FrontRing(ECHO_RING, mem), None)  # type: ignore[arg-type]  # set below
    _traced(front, buffers[0].fd, 1, FRONT_PORT, mode, False, rsp, req)
    ctx = multiprocessing.get_context("fork")
    back = ctx.Process(
        target=_run_back,
        args=(shm, (req.fd, rsp.fd), buffers[1].fd, mode, cpus[0], count // DEPTH * DEPTH),
    )
    reader = ctx.Process(target=_run_reader, args=((buffers[0].fd, buffers[1].fd), cpus[-1]))
    back.start()
    if mode == "live":
        reader.start()
    try:
        return trio.run(_front, front, count)
    finally:
        back.join(30)
        if mode == "live":
            reader.kill()
            reader.join()
        for buffer in buffers:
            buffer.close()
        req.close()
        rsp.close()


# --- guests under a hypervisor ----------------------------------------------------------


async def _readers(hv: Hypervisor, count: int) -> None:
    with trio.fail_after(20):
        while hv.trace.statistics().readers != count:
            await trio.sleep(0.01)


async def traced(
    hv: Hypervisor, mode: str, cpu: int, out: Path, measure: Callable[[], Awaitable[float]]
) -> float:
    """`measure()` with tracing off, buffers on and unread, or the real recorder following."""
    if mode == "off":
        return await measure()
    if mode == "buffers":
        with await TraceReader.open(hv.run_dir):
            return await measure()
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "xenlike",
            "trace",
            "--run-dir",
            str(hv.run_dir),
            "--record",
            str(out),
            "--quiet",
        ],
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    try:
        await _readers(hv, 1)
        await trio.sleep(0.3)  # past its first records
        return await measure()
    finally:
        process.kill()
        await process.wait()
        await _readers(hv, 0)


async def guests(
    rounds: int, pairs: int, calls: int, cpus: list[int]
) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {"ping-pong": {}, "hypercall": {}}
    with TemporaryDirectory() as tmp:
        hv = Hypervisor(Path(tmp) / "run")
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            async with XenControl.connect(hv.run_dir) as xc:
                for r in range(rounds):
                    for mode in MODES[r % 3 :] + MODES[: r % 3]:
                        out = Path(tmp) / f"{mode}.xltrace"
                        us = await traced(
                            hv, mode, cpus[-1], out, lambda: ping_pong_us(xc, pairs, hook=True)
                        )
                        figures["ping-pong"].setdefault(mode, []).append(1e6 / us)
                        us = await traced(hv, mode, cpus[-1], out, lambda: hypercall_us(xc, calls))
                        figures["hypercall"].setdefault(mode, []).append(1e6 / us)
            nursery.cancel_scope.cancel()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    ring_n = 20_000 if args.quick else 100_000
    pairs = 1000 if args.quick else 5000
    calls = 500 if args.quick else 3000
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})  # the workers (and the guests) inherit it

    ring: dict[str, list[float]] = {}
    for r in range(rounds):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            ring.setdefault(mode, []).append(ring_round(mode, ring_n, cpus))
    figures = {"ring": ring, **trio.run(guests, rounds, pairs, calls, cpus)}

    med = {
        name: {mode: statistics.median(v) for mode, v in by_mode.items()}
        for name, by_mode in figures.items()
    }
    units = {"ring": "pairs/s", "ping-pong": "round trips/s", "hypercall": "calls/s"}
    print(
        f"rounds: {rounds} (medians); ring {ring_n} pairs, {DEPTH} in flight; "
        f"ping-pong {pairs} round trips; {calls} hypercalls; {len(cpus)} CPUs"
    )
    for name, by_mode in med.items():
        for mode in MODES:
            print(f"{name}, {mode}: {by_mode[mode]:,.0f} {units[name]}")
    for name, by_mode in med.items():
        key = name.replace("-", "_")
        print(f"ratio {key}_buffers_vs_off: {by_mode['buffers'] / by_mode['off']:.3f}")
        print(f"ratio {key}_live_vs_off: {by_mode['live'] / by_mode['off']:.3f}")


if __name__ == "__main__":
    main()
