"""The balloon driver: a guest's memory follows the toolstack's target.

As Linux's drivers/xen/xen-balloon.c and balloon.c: a watch on the
domain's `memory/target` (KiB, written by the toolstack: `xenlike
mem-set`) sets the target; `balloon_process` moves the difference between
target and current pages, a batch at a time. Going down, it takes free
frames from the page allocator and hands them to the hypervisor with
XENMEM_decrease_reservation (the host gets the memory back); going up, it
backs frames it holds again with XENMEM_populate_physmap and frees them to
the allocator. A domain booted below its `maxmem` starts with the frames
above its boot size in the balloon.

When the hypervisor refuses (the host's pool or the domain's max_pages is
exhausted), or the floor stops it, the work is retried after
`schedule_delay`, which doubles up to `MAX_SCHEDULE_DELAY` as Linux's
balloon_stats do, and goes back to 1 s once a target is met; a new target
wakes it at once. The floor: only frames the allocator has free are given
back, less `RESERVE_PAGES` kept for the drivers to allocate, so the pages in
use (rings, buffer pools, granted pages, the boot frames: XenStore and
console rings, start_info, shared_info, the grant table) are never given
back.

The driver reads `memory/target` and writes only `control/feature-balloon`
(the guest-owned key by which Windows PV drivers and xapi say a balloon
runs).
"""

import enum
from collections.abc import Callable
from typing import Any

import attrs
import trio

from xenlike.domain import memory_op
from xenlike.domain.runtime import Domain
from xenlike.memory import XEN_PAGE_SIZE, OutOfPages

__all__ = ["MAX_SCHEDULE_DELAY", "RESERVE_PAGES", "Balloon", "BalloonStats"]

RESERVE_PAGES = 256
"""Free frames (1 MiB) the balloon leaves the allocator, so drivers can still get pages."""
MAX_SCHEDULE_DELAY = 32.0  # seconds: balloon_stats.max_schedule_delay
BATCH = memory_op.FRAMES_PER_CALL  # frames per step: Linux's frame_list, a page of pfns
KIB_PER_PAGE = XEN_PAGE_SIZE // 1024


class _State(enum.Enum):
    """balloon.c's enum bp_state."""

    done = "done"  # the target is met, or nothing more can be done toward it
    wait = "wait"  # short of the target for now: retry after schedule_delay


@attrs.frozen
class BalloonStats:
    """Where the balloon stands (Linux's balloon_stats), in pages."""

    current_pages: int  # frames with memory (the domain's tot_pages)
    target_pages: int
    balloon_pages: int  # frames it holds without memory
    schedule_delay: float  # seconds before the next retry, while short of the target


class Balloon:
    """One domain's balloon; `run` it in the kernel's nursery."""

    def __init__(self, domain: Domain, *, log: Callable[[str], None] = print) -> None:
        self._domain = domain
        self._log = log
        nr_pages = domain.start_info.nr_pages  # what it holds at boot, as Linux counts it
        self._ballooned = list(range(domain.memory.nr_pages - 1, nr_pages - 1, -1))
        self._current = nr_pages
        self._target = nr_pages
        self._delay = 1.0
        self._kick = trio.Event()
        self._said = ""  # the last floor or limit line, so each is printed once

    def stats(self) -> BalloonStats:
        return BalloonStats(self._current, self._target, len(self._ballooned), self._delay)

    def set_target(self, pages: int) -> None:
        """balloon_set_new_target: aim for `pages` and start at once."""
        self._target = max(pages, 0)
        self._kick.set()

    async def run(self, xs: Any, *, task_status: trio.TaskStatus[None]) -> None:
        """Follow `memory/target` until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._process)
            await nursery.start(self._watch_target, xs)
            task_status.started()

    async def _watch_target(self, xs: Any, *, task_status: trio.TaskStatus[None]) -> None:
        """xen-balloon.c's watch_target: KiB in, pages out."""
        async with xs.watch("memory/target") as events:
            await xs.write("control/feature-balloon", "1")
            task_status.started()
            async for _ in events:
                text = await xs.read_optional("memory/target")
                if text is None:
                    continue
                try:
                    kib = int(text)
                except ValueError:
                    self._log(f"balloon: memory/target = {text!r} is not KiB; ignored")
                    continue
                self.set_target(kib // KIB_PER_PAGE)

    async def _process(self) -> None:
        """balloon_process: move credit a batch at a time; retry with backoff when short."""
        while True:
            credit = self._target - self._current
            if credit > 0:
                state = await self._increase(min(credit, BATCH))
            elif credit < 0:
                state = await self._decrease(min(-credit, BATCH))
            else:
                state = _State.done
            if state is _State.done and self._target != self._current:
                continue  # more batches to go
            if state is _State.done:
                self._delay = 1.0
                self._said = ""
                await self._kick.wait()
            else:
                with trio.move_on_after(self._delay):
                    await self._kick.wait()
                self._delay = min(self._delay * 2, MAX_SCHEDULE_DELAY)
            self._kick = trio.Event()

    async def _increase(self, count: int) -> _State:
        """increase_reservation: back frames the balloon holds, free them to the allocator."""
        if not self._ballooned:
            self._once(
                f"balloon: target {self._target * KIB_PER_PAGE} KiB is above the"
                f" {self._current * KIB_PER_PAGE} KiB this domain can hold (its maxmem)"
            )
            self._target = self._current
            return _State.done
        frames = self._ballooned[-count:]
        done = await memory_op.populate_physmap(self._domain.hypercalls, frames)
        for gfn in frames[:done]:
            self._domain.allocator.free(gfn)
        del self._ballooned[len(self._ballooned) - done :]
        self._current += done
        return _State.done if done == len(frames) else _State.wait

    async def _decrease(self, count: int) -> _State:
        """decrease_reservation: free frames from the allocator go back to the host."""
        allocator = self._domain.allocator
        spare = allocator.available - RESERVE_PAGES
        if spare <= 0:
            self._once(
                f"balloon: cannot go below {self._current * KIB_PER_PAGE} KiB now: the rest is"
                " in use (retrying)"
            )
            return _State.wait
        frames = []
        try:
            for _ in range(min(count, spare)):
                frames.append(allocator.allocate())
        except OutOfPages:
            pass
        done = await memory_op.decrease_reservation(self._domain.hypercalls, frames)
        for gfn in frames[done:]:  # the hypervisor kept these: they are still ours
            allocator.free(gfn)
        self._ballooned.extend(frames[:done])
        self._current -= done
        return _State.done if done == count else _State.wait

    def _once(self, line: str) -> None:
        if line != self._said:
            self._said = line
            self._log(line)
