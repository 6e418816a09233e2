"""A front end and a back end in two real processes over one shared ring.

Used by the two-process tests: the back end answers each blkif request with
a status derived from its sector, the front end checks every answer, and
both count how often they went to sleep. A watchdog turns a stall into a
report of the ring's indices instead of a hang.
"""

import mmap
import multiprocessing
import os

import attrs
import trio

from xenlike._eventfd import EventFd
from xenlike.abi import blkif
from xenlike.ring import BackRing, FrontRing, define_ring

BLKIF = define_ring("blkif", request=blkif.blkif_request, response=blkif.blkif_response)
SEGMENT = BLKIF.request.record().seg[0]._replace(gref=8, first_sect=0, last_sect=7)


class Stall(AssertionError):
    """No progress for the watchdog's whole period."""


def status_for(sector: int) -> int:
    return sector % 3 - 2  # BLKIF_RSP_EOPNOTSUPP, _ERROR or _OKAY


@attrs.define
class Outcome:
    completed: int
    front_sleeps: int
    back_sleeps: int


async def serve(mem: memoryview, req_evt: EventFd, rsp_evt: EventFd, count: int) -> int:
    """Answer `count` requests in order; return how many times this side slept."""
    back = BackRing(BLKIF, mem)
    served = sleeps = 0
    while served < count:
        reqs = back.get_requests()
        if not reqs:
            if not back.final_check_for_requests():
                sleeps += 1
                await req_evt.wait()
            continue
        for offset, req in enumerate(reqs):
            if req.id != served + offset or req.seg[0] != SEGMENT:
                raise AssertionError(f"request {served + offset} arrived as {req}")
        back.put_responses([(r.id, r.operation, status_for(r.sector_number)) for r in reqs])
        if back.push_responses():
            rsp_evt.notify()
        served += len(reqs)
    return sleeps


async def drive(
    mem: memoryview, req_evt: EventFd, rsp_evt: EventFd, count: int, depth: int, stall_after: float
) -> tuple[int, int]:
    """Submit `count` requests, `depth` in flight; check every response."""
    front = FrontRing(BLKIF, mem, attach=True)
    sent = done = sleeps = 0
    outstanding: dict[int, int] = {}
    while done < count:
        room = min(depth - (sent - done), count - sent)
        if room > 0:
            batch = [
                (blkif.BLKIF_OP_READ, 1, 51712, sent + i, (sent + i) * 8, (SEGMENT,))
                for i in range(room)
            ]
            front.put_requests(batch)
            outstanding.update((rid, sector) for _, _, _, rid, sector, _ in batch)
            sent += room
            if front.push_requests():
                req_evt.notify()
        rsps = front.get_responses()
        for rsp in rsps:
            sector = outstanding.pop(rsp.id)
            assert rsp.status == status_for(sector) and rsp.operation == blkif.BLKIF_OP_READ
        done += len(rsps)
        if rsps or front.final_check_for_responses():
            continue
        sleeps += 1
        with trio.move_on_after(stall_after) as scope:
            await rsp_evt.wait()
        if scope.cancelled_caught:
            raise Stall(
                f"no response for {stall_after}s after {done} of {count}: "
                f"ring indices {front.header()}, {sent - done} in flight"
            )
    return done, sleeps


def _back_process(shm: mmap.mmap, req_fd: int, rsp_fd: int, count: int, conn) -> None:
    conn.send(trio.run(serve, memoryview(shm), EventFd(req_fd), EventFd(rsp_fd), count))


def run_pair(count: int, depth: int, pages: int = 1, stall_after: float = 10.0) -> Outcome:
    """Run the back end in a child process and drive it from this one."""
    shm = mmap.mmap(-1, pages * 4096)
    mem = memoryview(shm)
    FrontRing(BLKIF, mem)  # initialise the shared ring before the back end attaches
    req_evt, rsp_evt = EventFd.create(), EventFd.create()
    ctx = multiprocessing.get_context("fork")
    parent_conn, child_conn = ctx.Pipe()
    child = ctx.Process(
        target=_back_process, args=(shm, req_evt.fd, rsp_evt.fd, count, child_conn), daemon=True
    )
    child.start()
    try:
        done, front_sleeps = trio.run(drive, mem, req_evt, rsp_evt, count, depth, stall_after)
        back_sleeps = parent_conn.recv()
        child.join(10)
        assert child.exitcode == 0, f"back end exited with {child.exitcode}"
    finally:
        if child.is_alive():
            os.kill(child.pid, 9)
            child.join()
        req_evt.close()
        rsp_evt.close()
    return Outcome(done, front_sleeps, back_sleeps)
