"""Ring throughput and latency between two processes, against a hand-written loop.

Both sides run in separate processes over one shared page and a pair of
eventfds, with a blkif-shaped ring (112-byte requests carrying one segment,
16-byte responses, 32 slots) and ring.h's event suppression:

- raw:     a minimal loop written by hand: struct on the mapped page, the
           index arithmetic and notify checks inline, eventfd doorbells.
           Like any blkif code it packs and reads the request header and
           then the segments the request says it has (here one).
- xenlike: `xenlike.ring.FrontRing` / `BackRing` with the blkif layouts and
           `xenlike._eventfd.EventFd`.

Rounds alternate raw, xenlike, raw, ... and the medians are reported:
batched throughput (32 in flight) and unbatched round-trip latency (1 in
flight, a notify each way), then for each side (front, back, raw_front,
raw_back) CPU time, notifies sent and voluntary context switches per pair
(see bench/_cost.py). Run: `python bench/ring.py [--quick]`.
"""

import argparse
import mmap
import multiprocessing
import os
import statistics
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cost import Costs, own_usage  # noqa: E402
from xenlike._eventfd import EventFd  # noqa: E402
from xenlike.abi import blkif  # noqa: E402
from xenlike.ring import BackRing, FrontRing, define_ring  # noqa: E402

BLKIF = define_ring("blkif", request=blkif.blkif_request, response=blkif.blkif_response)
SEGMENT = BLKIF.request.record().seg[0]._replace(gref=8, first_sect=0, last_sect=7)


# --- xenlike ---------------------------------------------------------------


async def xenlike_back(mem: memoryview, req_evt: EventFd, rsp_evt: EventFd, count: int) -> int:
    back = BackRing(BLKIF, mem)
    served = notifies = 0
    while served < count:
        reqs = back.get_requests()
        if not reqs:
            if not back.final_check_for_requests():
                await req_evt.wait()
            continue
        responses = []
        for r in reqs:
            status = 0
            for seg in r.seg[: r.nr_segments]:  # check each segment, as blkback does
                if seg.first_sect > seg.last_sect:
                    status = -1
            responses.append((r.id, r.operation, status))  # blkif_response's fields
        back.put_responses(responses)
        if back.push_responses():
            rsp_evt.notify()
            notifies += 1
        served += len(reqs)
    return notifies


async def xenlike_front(
    mem: memoryview, req_evt: EventFd, rsp_evt: EventFd, count: int, depth: int
) -> int:
    front = FrontRing(BLKIF, mem)
    seg = (SEGMENT,)
    sent = done = notifies = 0
    while done < count:
        room = min(depth - (sent - done), count - sent)
        if room > 0:
            # blkif_request fields in order: operation, nr_segments, handle, id, sector, seg
            front.put_requests([(0, 1, 51712, sent + i, sent + i, seg) for i in range(room)])
            sent += room
            if front.push_requests():
                req_evt.notify()
                notifies += 1
        rsps = front.get_responses()
        if rsps:
            done += len(rsps)
            continue
        if not front.final_check_for_responses():
            await rsp_evt.wait()
    return notifies


# --- raw, by hand ----------------------------------------------------------

HDR = struct.Struct("<BBH4xQQ")  # blkif_request up to seg[]
SEG = struct.Struct("<IBB2x")  # blkif_request_segment
RSP = struct.Struct("<QBxh4x")
SLOT, NR_ENTS, M = 112, 32, 0xFFFFFFFF
_lock = threading.Lock()


async def raw_back(mem: memoryview, req_evt: EventFd, rsp_evt: EventFd, count: int) -> int:
    hdr = mem[:64].cast("I")
    req_cons = rsp_prod_pvt = served = notifies = 0
    unpack_hdr, unpack_seg, pack = HDR.unpack_from, SEG.unpack_from, RSP.pack_into
    while served < count:
        avail = (hdr[0] - req_cons) & M
        if not avail:
            hdr[1] = (req_cons + 1) & M
            with _lock:
                pass
            if (hdr[0] - req_cons) & M:
                continue
            await req_evt.wait()
            continue
        for i in range(avail):
            base = 64 + ((req_cons + i) & 31) * SLOT
            op, nseg, _, rid, _ = unpack_hdr(mem, base)
            status = 0
            for s in range(nseg):  # check each segment, as blkback does
                _, first, last = unpack_seg(mem, base + 24 + 8 * s)
                if first > last:
                    status = -1
            pack(mem, 64 + ((rsp_prod_pvt + i) & 31) * SLOT, rid, op, status)
        req_cons = (req_cons + avail) & M
        old, rsp_prod_pvt = rsp_prod_pvt, (rsp_prod_pvt + avail) & M
        hdr[2] = rsp_prod_pvt
        with _lock:
            pass
        if ((rsp_prod_pvt - hdr[3]) & M) < ((rsp_prod_pvt - old) & M):
            rsp_evt.notify()
            notifies += 1
        served += avail
    return notifies


async def raw_front(
    mem: memoryview, req_evt: EventFd, rsp_evt: EventFd, count: int, depth: int
) -> int:
    hdr = mem[:64].cast("I")
    hdr[0] = hdr[2] = 0
    hdr[1] = hdr[3] = 1
    req_prod = rsp_cons = sent = notifies = 0
    pack_hdr, pack_seg, unpack = HDR.pack_into, SEG.pack_into, RSP.unpack_from
    while rsp_cons < count:
        room = min(depth - (sent - rsp_cons), count - sent)
        if room > 0:
            for i in range(room):
                rid = sent + i
                base = 64 + ((req_prod + i) & 31) * SLOT
                pack_hdr(mem, base, 0, 1, 51712, rid, rid)
                pack_seg(mem, base + 24, 8, 0, 7)
            old, req_prod = req_prod, (req_prod + room) & M
            sent += room
            hdr[0] = req_prod
            with _lock:
                pass
            if ((req_prod - hdr[1]) & M) < ((req_prod - old) & M):
                req_evt.notify()
                notifies += 1
        avail = (hdr[2] - rsp_cons) & M
        if avail:
            for i in range(avail):
                unpack(mem, 64 + ((rsp_cons + i) & 31) * SLOT)
            rsp_cons += avail
            continue
        hdr[3] = (rsp_cons + 1) & M
        with _lock:
            pass
        if not (hdr[2] - rsp_cons) & M:
            await rsp_evt.wait()
    return notifies


LOOPS = {"raw": (raw_front, raw_back), "xenlike": (xenlike_front, xenlike_back)}


def _run_back(
    kind: str, shm: mmap.mmap, req_fd: int, rsp_fd: int, count: int, report: Connection
) -> None:
    before = own_usage()
    notifies = trio.run(LOOPS[kind][1], memoryview(shm), EventFd(req_fd), EventFd(rsp_fd), count)
    report.send((own_usage() - before, notifies))


def one_round(kind: str, count: int, depth: int, costs: Costs) -> float:
    """Seconds for `count` request/response pairs between two processes; each
    side's CPU time, notifies and voluntary switches go to `costs`."""
    shm = mmap.mmap(-1, 4096)
    req_evt, rsp_evt = EventFd.create(), EventFd.create()
    os.set_inheritable(req_evt.fd, True)
    os.set_inheritable(rsp_evt.fd, True)
    ctx = multiprocessing.get_context("fork")
    from_back, to_parent = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_run_back, args=(kind, shm, req_evt.fd, rsp_evt.fd, count, to_parent)
    )
    mem = memoryview(shm)
    if kind == "xenlike":
        FrontRing(BLKIF, mem)  # initialise the shared header before the back end looks
    else:
        mem[:64].cast("I")[1] = 1
        mem[:64].cast("I")[3] = 1
    child.start()
    before = own_usage()
    start = time.perf_counter()
    notifies = trio.run(LOOPS[kind][0], mem, req_evt, rsp_evt, count, depth)
    elapsed = time.perf_counter() - start
    usage = own_usage() - before
    back_report = from_back.recv() if from_back.poll(30) else None
    child.join(30)
    if child.exitcode != 0 or back_report is None:
        raise SystemExit(f"{kind} back end failed with exit code {child.exitcode}")
    workload = "batched" if depth > 1 else "unbatched"
    prefix = "raw_" if kind == "raw" else ""
    costs.add(f"{prefix}front", workload, usage, count, notifies)
    back_usage, back_notifies = back_report
    costs.add(f"{prefix}back", workload, back_usage, count, back_notifies)
    req_evt.close()
    rsp_evt.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    batched_n = 20_000 if args.quick else 200_000
    single_n = 2_000 if args.quick else 20_000

    costs = Costs()
    rates: dict[str, list[float]] = {"raw": [], "xenlike": []}
    latency: dict[str, list[float]] = {"raw": [], "xenlike": []}
    for _ in range(rounds):
        for kind in ("raw", "xenlike"):
            rates[kind].append(batched_n / one_round(kind, batched_n, 32, costs))
        for kind in ("raw", "xenlike"):
            latency[kind].append(one_round(kind, single_n, 1, costs) / single_n * 1e6)

    med = {k: statistics.median(v) for k, v in rates.items()}
    lat = {k: statistics.median(v) for k, v in latency.items()}
    print(f"rounds: {rounds} (medians), blkif ring of 32 slots, 2 processes")
    print(f"raw batched (32 in flight): {med['raw']:,.0f} pairs/s")
    print(f"xenlike batched (32 in flight): {med['xenlike']:,.0f} pairs/s")
    print(f"raw unbatched round trip: {lat['raw']:.1f} us")
    print(f"xenlike unbatched round trip: {lat['xenlike']:.1f} us")
    print("\n".join(costs.lines()))
    print(f"ratio batched_throughput: {med['xenlike'] / med['raw']:.3f}")
    print(f"ratio unbatched_latency: {lat['xenlike'] / lat['raw']:.3f}")


if __name__ == "__main__":
    main()
