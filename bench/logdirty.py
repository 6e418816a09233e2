"""Log-dirty: what a CLEAN round costs, and what finding dirty frames by content costs
by each way of comparing.

    python bench/logdirty.py [--quick]

Ways, in this process, over a memfd of 32 and of 128 MiB whose every frame
holds data, with a light writer (50 frames changed between rounds):
- `memcmp`: `DirtyLog.scan`, what the hypervisor does: one memcmp per 64
  frames against a reference copy, then one per frame inside a run that differs;
- `slices`: each frame's bytes compared with the reference's, in Python;
- `crc32`, `blake2b`: a digest of every frame, to compare with the last round's
  (crc32 could miss a change, 1 in 2**32; blake2b is 16 bytes here).

Then a hypervisor in this process runs a guest of 32 and of 128 MiB that filled
its memory and writes 10 frames every 10 ms; `xc.logdirty_clean` is timed as
Dom0 sees it (the hypervisor answers no one else meanwhile), with the CPU time
of this process (hypervisor and caller) per CLEAN.
The last lines are `ratio clean_MiB_vs_crc32: VALUE`: how many times cheaper a
CLEAN round is than only hashing every frame with crc32.
"""

import argparse
import hashlib
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cost import Costs, own_usage  # noqa: E402
from xenlike.domain import Domain  # noqa: E402
from xenlike.hypervisor import Hypervisor  # noqa: E402
from xenlike.hypervisor.logdirty import DirtyLog, bitmap_frames  # noqa: E402
from xenlike.memory import XEN_PAGE_SIZE  # noqa: E402
from xenlike.xc import XenControl  # noqa: E402

SIZES = (32, 128)  # MiB
WRITES_PER_ROUND = 50
PAGE = XEN_PAGE_SIZE


def filled_memory(mib: int) -> mmap.mmap:
    """A memfd mapping with data in every frame, as a guest that used all its memory."""
    fd = os.memfd_create(f"bench-{mib}")
    os.ftruncate(fd, mib << 20)
    memory = mmap.mmap(fd, mib << 20)
    os.close(fd)
    seed = os.urandom(PAGE)
    for pfn in range(len(memory) // PAGE):
        memory[pfn * PAGE : pfn * PAGE + 8] = pfn.to_bytes(8, "little")
        memory[pfn * PAGE + 8 : (pfn + 1) * PAGE] = seed[8:]
    return memory


def scribble(memory: mmap.mmap, rng: random.Random) -> None:
    for pfn in rng.sample(range(len(memory) // PAGE), WRITES_PER_ROUND):
        memory[pfn * PAGE + 100] = (memory[pfn * PAGE + 100] + 1) & 0xFF


def way_memcmp(memory: mmap.mmap) -> Callable[[], None]:
    log = DirtyLog.start(memory)
    return lambda: (log.scan(memory), log.clean())  # type: ignore[func-returns-value]


def way_slices(memory: mmap.mmap) -> Callable[[], None]:
    reference = bytearray(memory)

    def scan() -> None:
        for pfn in range(len(memory) // PAGE):
            at = pfn * PAGE
            if memory[at : at + PAGE] != reference[at : at + PAGE]:
                reference[at : at + PAGE] = memory[at : at + PAGE]

    return scan


def way_digest(memory: mmap.mmap, digest: Callable[[memoryview], object]) -> Callable[[], None]:
    view = memoryview(memory)
    last = [digest(view[pfn * PAGE : (pfn + 1) * PAGE]) for pfn in range(len(memory) // PAGE)]

    def scan() -> None:
        for pfn in range(len(last)):
            value = digest(view[pfn * PAGE : (pfn + 1) * PAGE])
            if value != last[pfn]:
                last[pfn] = value

    return scan


WAYS: dict[str, Callable[[mmap.mmap], Callable[[], None]]] = {
    "memcmp": way_memcmp,
    "slices": way_slices,
    "crc32": lambda memory: way_digest(memory, zlib.crc32),
    "blake2b": lambda memory: way_digest(
        memory, lambda page: hashlib.blake2b(page, digest_size=16).digest()
    ),
}


def compare_ways(rounds: int) -> dict[tuple[str, int], float]:
    """Median seconds per round of each way, for each size."""
    rng = random.Random(20)
    out = {}
    for mib in SIZES:
        memory = filled_memory(mib)
        for name, way in WAYS.items():
            scan = way(memory)
            times = []
            for _ in range(rounds):
                scribble(memory, rng)
                start = time.perf_counter()
                scan()
                times.append(time.perf_counter() - start)
            out[(name, mib)] = statistics.median(times)
    return out


async def light_writer(domain: Domain) -> None:
    """Fills every free frame, says so, then writes 10 frames every 10 ms."""
    first = domain.layout.first_free_gfn
    frames = range(first, domain.start_info.nr_pages)
    for gfn in frames:
        with domain.memory.frame(gfn) as page:
            page[:8] = gfn.to_bytes(8, "little")
            page[8:16] = b"occupied"
    await domain.console_write("filled")
    rng = random.Random(domain.domid)
    tick = 0
    while True:
        tick += 1
        for gfn in rng.sample(frames, 10):
            with domain.memory.frame(gfn) as page:
                page[16:24] = tick.to_bytes(8, "little")
        await trio.sleep(0.01)


async def wait_for(hv: Hypervisor, text: str, timeout: float = 120) -> None:
    with trio.fail_after(timeout):
        while not any(text in line for line in hv.log_lines):
            await trio.sleep(0.05)


async def time_cleans(rounds: int, costs: Costs) -> dict[int, tuple[float, float]]:
    """Per size: median seconds per CLEAN as Dom0 sees it, median frames reported."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        hv = Hypervisor(Path(tmp) / "run")
        async with trio.open_nursery() as nursery:
            await nursery.start(hv.serve)
            async with XenControl.connect(hv.run_dir) as xc:
                for mib in SIZES:
                    domid = await xc.create_domain("bench.logdirty:light_writer", memory_mb=mib)
                    await xc.unpause(domid)
                    await wait_for(hv, f"(d{domid}) filled")
                    await xc.logdirty_enable(domid)
                    times, counts = [], []
                    for _ in range(rounds):
                        await trio.sleep(0.1)
                        before = own_usage()
                        start = time.perf_counter()
                        bitmap = await xc.logdirty_clean(domid)
                        times.append(time.perf_counter() - start)
                        costs.add("bench", f"clean_{mib}MiB", own_usage() - before, 1)
                        counts.append(len(bitmap_frames(bitmap)))
                    out[mib] = (statistics.median(times), statistics.median(counts))
                    await xc.destroy(domid)
            nursery.cancel_scope.cancel()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 15
    ways = compare_ways(rounds)
    costs = Costs()
    cleans = trio.run(time_cleans, rounds, costs)
    print(f"rounds: {rounds} (medians); {WRITES_PER_ROUND} frames written between scans")
    for mib in SIZES:
        figures = ", ".join(f"{name} {ways[(name, mib)] * 1e3:.1f} ms" for name in WAYS)
        print(f"scan of {mib} MiB, every frame holding data: {figures}")
    for mib in SIZES:
        seconds, count = cleans[mib]
        print(f"CLEAN of a {mib} MiB guest writing 1000 frames/s: {seconds * 1e3:.1f} ms,")
        print(f"  {count:.0f} frames dirty per 0.1 s round")
    print("\n".join(costs.lines()))
    for mib in SIZES:
        print(f"ratio clean_{mib}MiB_vs_crc32: {ways[('crc32', mib)] / cleans[mib][0]:.3f}")


if __name__ == "__main__":
    main()
