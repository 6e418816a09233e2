"""The PV block device from a guest (blkfront → ring → blkback → image) against raw I/O.

    python bench/blk.py [--quick] [--rounds N] [--workloads NAME,...] [--guests pon|poff]

`xenlike up --detach` runs a topology in a temporary run directory: Dom0
and two guests, each with a 64 MiB disk image that this script fills with
random data first, one with persistent grants (`pon`) and one without
(`poff`, `xen_blkfront.feature_persistent=0`). Each guest runs the
workloads below as its init program when told to through XenStore
(`data/bench/go`) and answers in `data/bench/result`. The raw baseline runs
the same pattern with os.preadv/os.pwritev on the same image file from this
one Python process (a reused buffer, data from the page cache).

Workloads (the guest keeps `depth` requests in flight, from depth/batch tasks
that each read into or write from reused disk buffers — `disk.buffer()`, its
own memory, so the data is not copied in the guest — with `readinto_many` /
`write_many`; raw I/O is one at a time, into or from one reused buffer):
- rand4k: 4 KiB reads at random 4 KiB-aligned offsets, depth 32 (IOPS);
- seqread44k / seqwrite44k: sequential 44 KiB requests (11 direct segments),
  depth 32, the one-page ring's slots (MB/s);
- seqread1m / seqwrite1m: sequential 1 MiB requests (256 indirect segments),
  depth 4 (MB/s).

Rounds interleave (each workload through each guest, then raw, round after
round) and the figures are medians of rounds. Then, per request, CPU time
and voluntary context switches of the guest (measured by itself, with its
event channel sends as `wakeups_per_op`), of Dom0 and of the hypervisor
(from /proc, over the round), and of raw's process; see bench/_cost.py.
The last lines are
`ratio NAME: VALUE`: guest figure / raw figure, per workload, for
persistent grants on and off.
"""

import argparse
import functools
import os
import random
import shutil
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

from bench._cost import Costs, Usage, own_usage, process_usage, topology_processes  # noqa: E402
from xenlike.xenstore import XenStoreError, open_client  # noqa: E402

DISK_BYTES = 64 << 20
WORKLOADS = {  # name: (kind, request bytes, depth, unit)
    "rand4k": ("rand", 4096, 32, "IOPS"),
    "seqread44k": ("read", 44 << 10, 32, "MB/s"),
    "seqwrite44k": ("write", 44 << 10, 32, "MB/s"),
    "seqread1m": ("read", 1 << 20, 4, "MB/s"),
    "seqwrite1m": ("write", 1 << 20, 4, "MB/s"),
}
# Requests per readinto_many/write_many call: depth/batch tasks keep `depth` in
# flight (measured best: bigger batches stall the pipeline, smaller ones wake more).
BATCH = {"rand4k": 8, "seqread44k": 8, "seqwrite44k": 8, "seqread1m": 1, "seqwrite1m": 1}
GUESTS = {"pon": "persistent grants on", "poff": "persistent grants off"}
OFFSETS = 1 << 16  # random offsets drawn once, shared by the guest and raw patterns

TOPOLOGY = """\
[host]
name = "bench-blk"

[dom0]
memory = 128
images = { "pon.img" = "64M", "poff.img" = "64M" }

[[domain]]
name = "pon"
memory = 64
init = "bench.blk:guest"
disk = ["format=raw, vdev=xvda, access=rw, target=pon.img"]

[[domain]]
name = "poff"
memory = 64
init = "bench.blk:guest"
extra = "xen_blkfront.feature_persistent=0"
disk = ["format=raw, vdev=xvda, access=rw, target=poff.img"]
"""


@functools.cache
def random_offsets(size: int) -> list[int]:
    rng = random.Random(42)
    return [rng.randrange(DISK_BYTES // size) * size for _ in range(OFFSETS)]


# --- the guest's side -----------------------------------------------------------------


async def run_in_guest(disk: Any, name: str, seconds: float) -> tuple[float, int, Usage]:
    """One workload for `seconds`; returns IOPS or MB/s, the requests done, and
    this process's usage while they ran."""
    kind, size, depth, _ = WORKLOADS[name]
    batch = BATCH[name]
    workers = depth // batch
    done = 0
    if kind == "rand":
        offsets = [offset // 512 for offset in random_offsets(size)]
        stride = 1
    else:
        offsets = list(range(0, (DISK_BYTES - size) // 512 + 1, size // 512))
        stride = workers
    payload = os.urandom(size)

    async def worker(start: int) -> None:
        nonlocal done
        index = start
        buffers = [disk.buffer(size) for _ in range(batch)]  # reused, as the raw side's
        if kind == "write":
            for buffer in buffers:
                buffer[:] = payload
        while time.perf_counter() < deadline:
            starts = [offsets[(index + k * stride) % len(offsets)] for k in range(batch)]
            if kind == "write":
                await disk.write_many(zip(starts, buffers))
            else:
                await disk.readinto_many(zip(starts, buffers))
            done += batch
            index += batch * stride
        for buffer in buffers:
            disk.release(buffer)  # for the next workload's buffers

    before = own_usage()
    start = time.perf_counter()
    deadline = start + seconds  # after the offsets are drawn: the whole time is I/O
    async with trio.open_nursery() as nursery:
        for k in range(workers):
            nursery.start_soon(worker, k * len(offsets) // workers if kind == "rand" else k)
    elapsed = time.perf_counter() - start
    used = own_usage() - before
    return (done / elapsed if kind == "rand" else done * size / elapsed / 1e6), done, used


def event_sends(g: Any) -> int:
    """Notifications this guest has sent on all its event channel ports."""
    return sum(port.sends for port in g.domain.evtchn.ports.values())


async def guest(g: Any) -> None:
    """The init program: run what `data/bench/go` says, answer in `data/bench/result`
    (the figure, the requests done, and over the workload this process's CPU
    seconds, voluntary switches and event channel sends)."""
    disk = g.device("vbd")
    seen = ""
    async with g.xs.watch("data/bench/go") as events:
        async for _ in events:
            try:
                order = (await g.xs.read("data/bench/go")).decode()
            except XenStoreError:
                continue
            if not order or order == seen:
                continue
            seen = order
            number, name, seconds = order.split()
            sends = event_sends(g)
            value, done, used = await run_in_guest(disk, name, float(seconds))
            sends = event_sends(g) - sends
            await g.xs.write(
                "data/bench/result", f"{number} {value} {done} {used.cpu:.6f} {used.vcsw} {sends}"
            )


# --- raw I/O on the image, from this process -------------------------------------------


def run_raw(path: Path, name: str, seconds: float) -> tuple[float, int, Usage]:
    """One workload for `seconds`; returns IOPS or MB/s, the requests done, and
    this process's usage while they ran."""
    kind, size, _, _ = WORKLOADS[name]
    import mmap

    buffer = mmap.mmap(-1, size)
    view = memoryview(buffer)
    if kind == "write":
        view[:] = os.urandom(size)
    fd = os.open(path, os.O_RDWR)
    try:
        offsets = (
            random_offsets(size) if kind == "rand" else list(range(0, DISK_BYTES - size + 1, size))
        )
        io = os.pwritev if kind == "write" else os.preadv
        iov = [view]
        count = len(offsets)
        done = 0
        before = own_usage()
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for index in range(done, done + 64):
                io(fd, iov, offsets[index % count])
            done += 64
        elapsed = time.perf_counter() - start
        used = own_usage() - before
    finally:
        os.close(fd)
        view.release()
        buffer.close()
    return (done / elapsed if kind == "rand" else done * size / elapsed / 1e6), done, used


# --- driving it ----------------------------------------------------------------------


def xenlike(*args: str, run_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "xenlike", *args, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"xenlike {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout


async def measure(
    run_dir: Path,
    images: Path,
    rounds: int,
    seconds: float,
    costs: Costs,
    workloads: list[str],
    guests: list[str],
) -> dict[tuple[str, str], list[float]]:
    """The figures of every round; per-request costs of every process go to `costs`:
    the guest's from itself, Dom0's and the hypervisor's from /proc, raw's (this
    process) from getrusage."""
    figures: dict[tuple[str, str], list[float]] = {}
    pids = topology_processes(run_dir)
    others = {"dom0": pids[0], "hypervisor": pids["hypervisor"]}
    async with open_client(run_dir / "xenstored" / "socket") as xs:
        domids = {}
        for domid in await xs.ls("/local/domain"):
            name = (await xs.read(f"/local/domain/{domid}/name")).decode()
            domids[name] = domid
        number = 0
        for _ in range(rounds):
            for name in workloads:
                for who in (*guests, "raw"):
                    if who == "raw":
                        value, done, used = run_raw(images / "pon.img", name, seconds)
                        costs.add("raw", name, used, done)
                    else:
                        number += 1
                        home = f"/local/domain/{domids[who]}/data/bench"
                        before_others = {k: process_usage(pid) for k, pid in others.items()}
                        await xs.write(f"{home}/go", f"{number} {name} {seconds}")
                        value, done, used, sends = await result(xs, f"{home}/result", number)
                        costs.add("guest", f"{name}_{who}", used, done, sends)
                        for process, pid in others.items():
                            costs.add(
                                process,
                                f"{name}_{who}",
                                process_usage(pid) - before_others[process],
                                done,
                            )
                    figures.setdefault((who, name), []).append(value)
    return figures


async def result(xs: Any, path: str, number: int) -> tuple[float, int, Usage, int]:
    """The guest's answer to order `number`: figure, requests, usage, event sends."""
    with trio.fail_after(120):
        while True:
            try:
                got, value, done, cpu, switches, sends = (await xs.read(path)).decode().split()
                if int(got) == number:
                    return float(value), int(done), Usage(float(cpu), int(switches)), int(sends)
            except XenStoreError:
                pass
            await trio.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated, for quick iteration"
    )
    parser.add_argument("--guests", default=",".join(GUESTS), help="pon, poff or both")
    args = parser.parse_args()
    workloads = [name for name in args.workloads.split(",") if name]
    guests = [who for who in args.guests.split(",") if who]
    unknown = set(workloads) - set(WORKLOADS) | set(guests) - set(GUESTS)
    if unknown:
        parser.error(f"unknown workloads or guests: {', '.join(sorted(unknown))}")
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = 0.2 if args.quick else 1.0
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    with tempfile.TemporaryDirectory(prefix="xenlike-bench-blk-") as tmp:
        base = Path(tmp)
        (base / "bench.toml").write_text(TOPOLOGY)
        run_dir = base / "run"
        run_dir.mkdir()
        # Dom0 keeps its images in the run directory, and takes an image it finds
        # there as it is: the disks are filled here first, and raw I/O reads them too.
        for image in ("pon.img", "poff.img"):
            with (run_dir / image).open("wb") as f:
                for _ in range(DISK_BYTES >> 20):
                    f.write(os.urandom(1 << 20))
        xenlike("up", str(base / "bench.toml"), "--detach", run_dir=run_dir)
        try:
            costs = Costs()
            figures = trio.run(measure, run_dir, run_dir, rounds, seconds, costs, workloads, guests)
        finally:
            xenlike("down", run_dir=run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
    medians = {key: statistics.median(values) for key, values in figures.items()}
    print(f"rounds: {rounds} (medians), {seconds:g} s per workload per round")
    for name in workloads:
        unit = WORKLOADS[name][3]
        print(f"raw {name}: {medians[('raw', name)]:.0f} {unit}")
        for who in guests:
            print(f"{GUESTS[who]} {name}: {medians[(who, name)]:.0f} {unit}")
    print("\n".join(costs.lines()))
    for who in guests:
        for name in workloads:
            ratio = medians[(who, name)] / medians[("raw", name)]
            print(f"ratio {name}_{who}: {ratio:.3f}")


if __name__ == "__main__":
    main()
