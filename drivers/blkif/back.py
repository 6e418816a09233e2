"""blkback: the block back end, in the driver domain (Dom0).

What it does is Linux's xen-blkback, in substance and in key names:

- Before InitWait it opens the image the toolstack named (`params`, `mode`,
  `type`, `discard-enable`) and offers feature-flush-cache, feature-barrier,
  feature-discard (with discard-granularity, -alignment, -secure),
  feature-persistent, feature-max-indirect-segments and max-ring-page-order;
  at Connected it publishes sectors, sector-size, physical-sector-size and
  info (VDISK_READONLY for `mode = r`, VDISK_CDROM, VDISK_REMOVABLE).
- Each drain of the ring is handled as a batch. Every request is copied out
  of the slot once and checked before anything is mapped or done, by the
  one pure checker in `drivers.blkif.protocol` (`check_request`): the
  operation, the segment count (1..11 direct, 1..256 indirect; 0 only for a
  flush or barrier), each segment's first_sect <= last_sect <= 7, the
  sectors against the disk's end, writes against a read-only disk, an id
  already in flight. A refused request gets BLKIF_RSP_ERROR (an optional
  operation that is not offered, BLKIF_RSP_EOPNOTSUPP) and nothing else
  happens; an impossible ring index closes the device.
- Data moves once: preadv/pwritev between the image and memoryviews of the
  granted pages themselves. With feature-persistent on both ends a page is
  mapped the first time its gref is seen and kept, so the data path makes
  no hypercall; without it, the grefs of a whole drain are mapped in one
  GNTTABOP_map_grant_ref and unmapped in one GNTTABOP_unmap_grant_ref
  before the drain is answered (the front end ends its grants on the
  response, and Xen refuses that while a page is still mapped); up to
  DRAINS_IN_FLIGHT such drains overlap, as each mostly waits for its
  hypercalls, and a barrier waits for all of them. Grants the
  hypervisor refuses (never granted, granted to someone else, read-only for
  a read) fail only the requests that name them.
- The steady state is cheap: with persistent grants a front end sends the
  same segment lists over the same pages again and again, so the back end
  remembers each list it has served with its iovec (the pages stay mapped
  for the connection's life). Such a request, direct or indirect, is
  checked for what its list does not settle (the id, the sectors, the
  disk's mode) and done at once.
- Up to a ring's worth of requests are in flight. A read is first tried
  against the page cache without blocking (RWF_NOWAIT) and answered at the
  end of the drain or, when all its pages are persistent, as each 256 KiB
  of them is done (the front end copies those while the rest of a large
  drain is done). Everything else — writes (even a buffered write blocks on
  a frozen file system or a vanished NFS server), a read miss, O_DIRECT
  I/O, a flush, a discard — is queued, in ring order, for the device's own
  thread (as blkback's xen_blkif_schedule thread per vbd), and so is a read
  behind anything queued (it sees what was written before it). The thread
  takes all that is queued, does it (writes that follow one another on
  the disk in one pwritev) and pushes the answers onto the ring itself,
  under a lock the main thread's pushes take too: Dom0's main thread is
  woken only for what needs trio (the front end's notify, a drain that
  waits because its pages are mapped for it alone, a failure). A stuck
  disk stalls its own device only, never Dom0's other services, and a
  barrier or flush is done after everything queued before it.
- Durability: FLUSH_DISKCACHE is fdatasync, acknowledged only once it has
  returned. WRITE_BARRIER, as blkback does it, first waits for everything
  in flight, then flushes, writes and flushes again.
- Counters with blkback's names (rd_req, wr_req, f_req, ds_req, rd_sect,
  wr_sect, ds_sect, oo_req) go to `statistics/` in the back-end directory
  once a second while they change, for `xenlike top`; oo_req counts the
  drains that had to wait for room (DRAINS_IN_FLIGHT were under way).

The disk itself is the driver domain's hardware, not this package's: the
kernel hands an opener in `domain.hardware.disks` (Dom0's is
`domains.dom0.hw.Disk.open`).
"""

import errno
import functools
import gc
import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Protocol

import attrs
import trio

from drivers.blkif.protocol import (
    BLKIF_RING,
    MAX_INDIRECT_SEGMENTS,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SEGMENT_SIZE,
    BadRequest,
    Job,
    Limits,
    Segments,
    Unsupported,
    check_request,
    check_segments,
    indirect_pages,
    parse_segments,
)
from xenlike.abi.blkif import (
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    VDISK_CDROM,
    VDISK_READONLY,
    VDISK_REMOVABLE,
    BlkifOp,
)
from xenlike.abi.grant_table import GntStatus
from xenlike.abi.ring import XEN_PAGE_SIZE
from xenlike.domain.grant_table import GrantError, GrantMapping, GrantStatusError
from xenlike.memory import MemoryInUse
from xenlike.ring import MAX_RING_PAGE_ORDER
from xenlike.xenbus import BackChannel, Backend, ChannelBroken, ProtocolError

__all__ = ["BlkBack", "BlockDevice", "PersistentGrants"]

READ, WRITE = BlkifOp.READ, BlkifOp.WRITE
BARRIER, FLUSH = BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE
DISCARD, INDIRECT = BlkifOp.DISCARD, BlkifOp.INDIRECT

MAX_PERSISTENT_GRANTS = 1056  # Linux blkback's max_persistent_grants default
MAP_BATCH = 1024  # grant refs per GNTTABOP_map_grant_ref (the hypervisor's batch limit)
IOV_MAX = 1024  # iovec elements per pwritev (Linux's UIO_MAXIOV)
DRAINS_IN_FLIGHT = 4  # drains at once without persistent grants (each maps its own pages)
# A drain answers what it has done each time this much data has moved, so the
# front end works on those answers while the rest of a large drain is done.
EARLY_ANSWER_SECTORS = 512  # 256 KiB
PARSED_SEGMENT_LISTS = 4096  # checked segment lists remembered per device
REFUSALS_LOGGED = 10  # per connection; a hostile front end must not flood Dom0's log
STATISTICS = ("rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "ds_sect", "oo_req")
_COUNTERS: dict[int, tuple[str, str]] = {  # kind: the counters it adds to
    READ: ("rd_req", "rd_sect"),
    WRITE: ("wr_req", "wr_sect"),
    FLUSH: ("f_req", "wr_sect"),
    BARRIER: ("f_req", "wr_sect"),
    DISCARD: ("ds_req", "ds_sect"),
}


class BlockDevice(Protocol):
    """What blkback needs of a disk (Dom0's `domains.dom0.hw.Disk`)."""

    sectors: int
    readonly: bool
    direct: bool
    physical_sector_size: int

    def readv(self, sector: int, buffers: Any, *, nowait: bool = False) -> int: ...
    def writev(self, sector: int, buffers: Any) -> int: ...
    def flush(self) -> None: ...
    def discard(self, sector: int, count: int, *, secure: bool = False) -> None: ...
    def close(self) -> None: ...


class _Mappings:
    """Grant mappings made in batched hypercalls, with a page view per gref.

    Each batch is mapped in ascending gref order, side by side, so pages
    that blkfront granted one after the other (a run of its buffer) are one
    contiguous range here too: `where` finds it, and a request over such a
    run is one iovec element, not one per page.
    """

    def __init__(self, grants: Any, domid: int) -> None:
        self._grants = grants
        self._domid = domid
        self.pages: dict[int, memoryview] = {}
        self.where: dict[int, tuple[memoryview, int]] = {}  # gref -> (its batch's view, offset)
        self._held: list[tuple[GrantMapping, memoryview | None]] = []

    def __len__(self) -> int:
        return len(self.pages)

    async def add(self, refs: Iterable[int], *, readonly: bool) -> set[int]:
        """Map `refs` (not mapped yet); return those the hypervisor refused.

        A refused element fails the whole batch (the hypervisor undoes the
        others), so the batch is made again without the refused refs.
        """
        refused: set[int] = set()
        refs = sorted(refs)
        for start in range(0, len(refs), MAP_BATCH):
            batch = refs[start : start + MAP_BATCH]
            for _ in range(2):
                try:
                    mapping = await self._grants.map(
                        self._domid, batch, readonly, side_by_side=False
                    )
                except GrantStatusError as exc:
                    refused.update(
                        ref
                        for ref, status in zip(batch, exc.statuses, strict=True)
                        if status != GntStatus.okay
                    )
                    batch = [ref for ref in batch if ref not in refused]
                    if batch:
                        continue
                except GrantError:
                    refused.update(batch)
                else:
                    self._keep(mapping)
                break
            else:
                refused.update(batch)
        return refused

    def _keep(self, mapping: GrantMapping) -> None:
        if not mapping.side_by_side:  # scattered frames from Dom0's cache: page by page
            self._held.append((mapping, None))
            for ref, page in zip(mapping.refs, mapping.pages(), strict=True):
                self.pages[ref] = page
                self.where[ref] = (page, 0)
            return
        whole = mapping.view
        self._held.append((mapping, whole))
        for index, ref in enumerate(mapping.refs):
            offset = index * XEN_PAGE_SIZE
            self.pages[ref] = whole[offset : offset + XEN_PAGE_SIZE]
            self.where[ref] = (whole, offset)

    async def unmap_all(self, log: logging.Logger) -> None:
        """Release every view and unmap (one hypercall per batch mapped)."""
        for page in self.pages.values():
            page.release()
        self.pages.clear()
        self.where.clear()
        held, self._held = self._held, []
        for mapping, whole in held:
            if whole is not None:
                whole.release()
            try:
                await self._grants.unmap(mapping)
            except MemoryInUse:
                gc.collect()  # a view kept alive by a reference cycle (an exception's frame)
                try:
                    await self._grants.unmap(mapping)
                except MemoryInUse as exc:
                    log.error("d%d refs %s stay mapped: %s", self._domid, list(mapping.refs), exc)
            except GrantError as exc:
                log.error("unmapping d%d refs %s: %s", self._domid, list(mapping.refs), exc)


class PersistentGrants(_Mappings):
    """feature-persistent: pages mapped writable once and reused by gref.

    A front end may name at most `capacity` distinct grefs persistently (as
    Linux's max_persistent_grants); beyond that, pages are mapped per drain.
    """

    def __init__(self, grants: Any, domid: int, capacity: int = MAX_PERSISTENT_GRANTS) -> None:
        super().__init__(grants, domid)
        self.capacity = capacity

    def room(self) -> int:
        return self.capacity - len(self.pages)


Answer = Callable[[list[tuple[int, int, int]]], None]


@attrs.define(eq=False, slots=True)
class _Ticket:
    """Jobs queued together for the device's thread, and who takes their responses:
    with `answer`, a task waiting for `done` (trio answers it); without, the ring
    (the thread answers it)."""

    jobs: list[Job]
    answer: Answer | None = None
    done: trio.Event | None = None  # set once answered, for a caller that waits


Results = list[tuple[_Ticket, list[int] | None]]


class _DeviceThread:
    """The device's own I/O thread (blkback's xen_blkif_schedule, one per vbd).

    Jobs are queued in ring order and done in that order, so what is queued
    after a write sees it and a flush covers every write before it. The
    thread takes everything queued by the time it looks and does it; then
    `answer`, on this thread, pushes the responses no task waits for
    straight onto the ring, and only what needs trio (a waiting task, a
    failure, a notify of the front end) goes back in one `run_sync_soon`
    to `completed`. Measured: a `run_sync_soon` round trip costs Dom0's main
    thread about 17 us of CPU (its wake-up), several times a 44 KiB
    pwritev. A disk that blocks stalls this thread only.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[list[Job]], list[int]],
        answer: Callable[[Results], tuple[Results, Callable[[], None] | None]],
        completed: Callable[[Results, Exception | None, Callable[[], None] | None], None],
    ) -> None:
        self._queue: SimpleQueue[_Ticket | None] = SimpleQueue()
        self._work = work
        self._answer = answer
        self._completed = completed
        self._token = trio.lowlevel.current_trio_token()
        self.stopping = False  # set at disconnect: what has not started is dropped
        self.queued = 0  # jobs put here (by trio's thread)
        self.done = 0  # jobs done or dropped (by this thread): queued - done are outstanding
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, ticket: _Ticket) -> None:
        self.queued += len(ticket.jobs)
        self._queue.put(ticket)

    @property
    def outstanding(self) -> int:
        return self.queued - self.done

    def stop(self) -> None:
        """End the thread once it has done what it holds (dropping what it had not started)."""
        self.stopping = True
        self._queue.put(None)

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        queue, work = self._queue, self._work
        while True:
            tickets = [queue.get()]
            while not queue.empty():
                tickets.append(queue.get_nowait())
            last = tickets[-1] is None
            jobs = [job for ticket in tickets if ticket is not None for job in ticket.jobs]
            statuses = failure = None
            if jobs and not self.stopping:
                try:
                    statuses = work(jobs)
                except Exception as exc:  # a bug: the device breaks, Dom0 goes on
                    failure = exc
                    self.stopping = True  # what comes after is dropped
            self.done += len(jobs)
            results: Results = []
            at = 0
            for ticket in tickets:
                if ticket is not None:
                    count = len(ticket.jobs)
                    results.append(
                        (ticket, None if statuses is None else statuses[at : at + count])
                    )
                    at += count
            notify = None
            if results and failure is None:
                try:
                    results, notify = self._answer(results)
                except Exception as exc:  # a bug: as one in `work`; none is answered twice
                    results = [(ticket, None) for ticket, _ in results]
                    failure = exc
                    self.stopping = True
            if results or failure is not None or notify is not None:
                try:
                    self._token.run_sync_soon(self._completed, results, failure, notify)
                except trio.RunFinishedError:
                    return
                failure = None  # its traceback holds views of granted pages
            if last:
                return


class BlkBack(Backend):
    """The vbd back end (see the module docstring)."""

    device_type = "vbd"
    ring = BLKIF_RING
    max_ring_page_order = MAX_RING_PAGE_ORDER
    feature_persistent: bool = True
    max_indirect_segments = MAX_INDIRECT_SEGMENTS

    def __init__(self, ctx: Any, device: Any) -> None:
        super().__init__(ctx, device)
        self.disk: BlockDevice | None = None
        self._disk_error = "the disk is not open"
        self.discard_enabled = False
        self.info = 0
        self.persistent = False
        self._grants: PersistentGrants | None = None
        self._in_flight: set[int] = set()
        self.limits = Limits(0, True, False, self.max_indirect_segments)  # set at Connected
        self.served_ready = 0  # requests served by the ready path, for tests and tuning
        self._parsed: dict[tuple[bytes, int], Segments] = {}
        # (seg[] bytes, nr_segments) -> (sectors, iovec) of segment lists served before
        # over persistent pages: while persistent grants stay mapped, so does their memory.
        self._ready: dict[tuple[bytes, int], tuple[int, list[Any]]] | None = None
        self._background: trio.Nursery | None = None
        self._io: _DeviceThread | None = None
        # Both Dom0's main thread and the device's thread answer on the ring.
        self._ring_lock = threading.Lock()
        self._ring_served: BackChannel | None = None  # the ring `serve` drains
        self._thread_stats = dict.fromkeys(STATISTICS, 0)  # the device thread's counters
        self._io_failure: str | None = None
        self._drain_slots = trio.Semaphore(DRAINS_IN_FLIGHT)
        self.refused = 0
        self.offloaded = 0
        self.stats = dict.fromkeys(STATISTICS, 0)

    # --- the disk, and what is published about it --------------------------------

    async def run(self) -> None:
        try:
            await self.open_disk()
        except (ProtocolError, OSError) as exc:
            self._disk_error = str(exc)
            await self.fatal(f"cannot open the disk: {exc}")
        try:
            await super().run()
        finally:
            if self.disk is not None:
                self.disk.close()

    async def open_disk(self) -> None:
        """Open the image the toolstack named (`params`, `type`, `mode`, ...)."""
        params = await self.read("params")
        if not params or not Path(params).is_absolute():
            raise ProtocolError(
                f"params = {params!r}: the toolstack must name the image by its absolute path"
            )
        kind = await self.read("type", "file")
        if kind != "file":
            raise ProtocolError(f"type = {kind!r}: only raw image files (type = file) are backed")
        mode = await self.read("mode")
        if mode not in ("r", "w"):
            raise ProtocolError(f"mode = {mode!r}: expected r or w")
        opener: Callable[..., BlockDevice] | None = self.ctx.domain.hardware.disks
        if opener is None:
            raise ProtocolError(f"d{self.ctx.domain.domid} has no disks (domain.hardware.disks)")
        direct = await self.read("direct-io-safe", "0") == "1"
        self.disk = opener(Path(params), readonly=mode == "r", direct=direct)
        self.discard_enabled = (
            mode == "w" and await self.read_int("discard-enable", 1, otherend=False) == 1
        )
        self.info = (
            (VDISK_READONLY if mode == "r" else 0)
            | (VDISK_CDROM if await self.read("device-type", "disk") == "cdrom" else 0)
            | (VDISK_REMOVABLE if await self.read("removable", "0") == "1" else 0)
        )

    def features(self) -> dict[str, str | int]:
        if self.disk is None:
            raise ProtocolError(self._disk_error)
        writable = int(not self.disk.readonly)
        keys: dict[str, str | int] = {
            "feature-flush-cache": writable,
            "feature-barrier": writable,
            "feature-discard": int(self.discard_enabled),
            "feature-persistent": int(self.feature_persistent),
            "feature-max-indirect-segments": self.max_indirect_segments,
        }
        if self.discard_enabled:
            keys.update(
                {
                    "discard-granularity": self.disk.physical_sector_size,
                    "discard-alignment": 0,
                    "discard-secure": 1,
                }
            )
        return keys

    def properties(self) -> dict[str, str | int]:
        assert self.disk is not None
        return {
            "sectors": self.disk.sectors,
            "info": self.info,
            "sector-size": SECTOR_SIZE,
            "physical-sector-size": self.disk.physical_sector_size,
        }

    async def connected(self) -> None:
        front = await self.read_int("feature-persistent", 0)
        self.persistent = self.feature_persistent and front == 1
        domain = self.ctx.domain
        self._grants = (
            PersistentGrants(domain.grants, self.device.otherend_id) if self.persistent else None
        )
        self._in_flight.clear()
        assert self.disk is not None
        self.limits = Limits(
            self.disk.sectors, self.disk.readonly, self.discard_enabled, self.max_indirect_segments
        )
        self._ready = {} if self.persistent and not self.disk.direct else None
        self.refused = 0
        self.stats = dict.fromkeys(STATISTICS, 0)
        self._thread_stats = dict.fromkeys(STATISTICS, 0)

    async def disconnected(self) -> None:
        self._ready = None  # its views go before the pages are unmapped
        if self._grants is not None:
            grants, self._grants = self._grants, None
            await grants.unmap_all(self.log)

    # --- the data path --------------------------------------------------------------

    async def serve(self, channel: BackChannel) -> None:
        """Drain the ring batch by batch; background I/O ends before the device does."""
        if channel is not self.channel:
            return  # disconnected before this task started
        broken: str | None = None
        # Backend.disconnect cancels this task and waits for it to end: the
        # nursery below (worker-thread I/O included) is done before the ring,
        # the port and the granted pages are let go.
        self._io_failure = None
        self._io = io = _DeviceThread(
            f"blkback {self.device.nodename}",
            self._io_blocking_all,
            self._answer_here,
            self._completed,
        )
        self._ring_served = channel
        try:
            async with trio.open_nursery() as nursery:
                self._background = nursery
                publishing = trio.CancelScope()
                nursery.start_soon(self._publish_statistics, publishing)

                async def on_requests(batch: list[Any]) -> None:
                    if self._grants is None:
                        await self._start_drain(nursery, channel, batch)
                    else:
                        await self._drain(channel, batch)

                try:
                    await channel.serve(on_requests)
                except ChannelBroken as exc:
                    broken = f"ring protocol violation: {exc}"
                finally:
                    publishing.cancel()
        except Exception as exc:  # a bug here must not take Dom0 down
            self.log.exception("%s: the data path failed", self.device.nodename)
            broken = f"blkback failed: {exc!r}"
        finally:
            # The thread may still hold persistent pages and answer on the ring:
            # both go after this.
            io.stop()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(io.join)
            self._ring_served = None
        broken = broken or self._io_failure
        if broken is not None:
            with trio.CancelScope(shield=True):  # fatal cancels this task's scope
                await self.fatal(broken)

    async def _start_drain(
        self, nursery: trio.Nursery, channel: BackChannel, batch: list[Any]
    ) -> None:
        """Without persistent grants a drain mostly waits for its map and unmap
        hypercalls, so up to DRAINS_IN_FLIGHT of them overlap, each answering
        its own requests. A drain with a barrier waits for all the others and
        runs alone: it is ordered after everything before it."""
        slots = self._drain_slots
        if any(request[0] == BARRIER for request in batch):
            for _ in range(DRAINS_IN_FLIGHT):
                await slots.acquire()
            try:
                await self._drain(channel, batch)
            finally:
                for _ in range(DRAINS_IN_FLIGHT):
                    slots.release()
            return
        if not slots.value:
            self.stats["oo_req"] += 1  # as blkback's: requests wait for the back end's room
        await slots.acquire()

        async def drain() -> None:
            try:
                await self._drain(channel, batch)
            finally:
                slots.release()

        nursery.start_soon(drain)

    async def _drain(self, channel: BackChannel, batch: list[Any]) -> None:
        done: list[tuple[int, int, int]] = []
        jobs: list[Job] = []
        answered: list[int] = []  # ids of requests served as ready, in flight until the end
        if self._ready is not None:
            batch = batch[self._serve_ready(channel, batch, done, answered) :]
        for request in batch:
            try:
                job = check_request(request, self.limits, self._in_flight, self._segments)
            except BadRequest as exc:
                done.append(self._refuse(request, exc))
                continue
            self._in_flight.add(job.id)
            if job.kind == BARRIER:  # ordered after everything before it, and before the rest
                await self._run(channel, jobs, done)
                await self._run(channel, [job], done)
                jobs = []
            else:
                jobs.append(job)
        await self._run(channel, jobs, done)
        if done:
            self._respond(channel, done)
        self._in_flight.difference_update(answered)

    def _serve_ready(
        self, channel: BackChannel, batch: list[Any], done: list[Any], answered: list[int]
    ) -> int:
        """Serve the leading reads and writes (direct or indirect) whose segment lists
        were served before over persistent pages, the steady state of a busy disk:
        their checks come down to the id, the sectors and the mode, and their pages
        need no lookup.
        Returns how many it served (the reads done now have their ids in `answered`,
        still in flight for the rest of the drain); the writes, and the reads behind
        anything the device's thread has yet to do (ring order), are queued for the
        thread, which answers them. The rest of the drain takes the full path."""
        ready, in_flight, grants, limits = self._ready, self._in_flight, self._grants, self.limits
        io = self._io
        disk = self.disk
        assert ready is not None and grants is not None and io is not None and disk is not None
        readv, readonly, end = disk.readv, limits.readonly, limits.sectors
        behind = io.outstanding  # a read behind queued jobs is queued too (ring order)
        queued: list[Job] = []
        unanswered = served = reads = read_sectors = 0
        for request in batch:
            op = request[0]
            if op == INDIRECT:  # its list is in persistent pages, or it takes the full path
                _, op, nr_segments, rid, sector, _, indirect_grefs = request
                if not 0 < nr_segments <= self.max_indirect_segments:
                    break
                try:
                    raw = _segment_list(grants.pages, indirect_grefs, nr_segments)
                except KeyError:
                    break
            elif op == READ or op == WRITE:
                _, nr_segments, _, rid, sector, raw = request  # a blkif_request, seg[] as bytes
            else:
                break
            if op != WRITE and op != READ:
                break
            plan = ready.get((raw, nr_segments))
            if plan is None:
                break
            sectors, iov = plan
            # check_access, inline: what the list does not settle
            if rid in in_flight or sector + sectors > end or (op == WRITE and readonly):
                break  # the full path refuses it, and says why
            if op == WRITE or queued or behind:
                served += 1
                in_flight.add(rid)
                queued.append(Job(rid, op, sector, sectors, iov=iov))
                continue
            try:  # from the page cache, now (see `_io_now`)
                read = readv(sector, iov, nowait=True)
            except (OSError, ValueError):  # not cached (BlockingIOError), or failed
                break  # the full path reads it on the thread, or logs the failure
            if read != sectors << SECTOR_SHIFT:
                break
            served += 1
            in_flight.add(rid)
            answered.append(rid)
            done.append((rid, READ, BLKIF_RSP_OKAY))
            reads += 1
            read_sectors += sectors
            unanswered += sectors
            if unanswered >= EARLY_ANSWER_SECTORS:
                self._respond(channel, done)
                done.clear()
                unanswered = 0
        stats = self.stats
        stats["rd_req"] += reads
        stats["rd_sect"] += read_sectors
        self.served_ready += served
        if queued:
            self._offload(queued)
        return served

    def _refuse(self, request: Any, exc: BadRequest) -> tuple[int, int, int]:
        self.refused += 1
        if self.refused <= REFUSALS_LOGGED:
            self.log.warning(
                "%s: refused request id %d (operation %d): %s%s",
                self.device.nodename,
                request.id,
                request.operation,
                exc,
                "; further refusals are not logged" if self.refused == REFUSALS_LOGGED else "",
            )
        status = BLKIF_RSP_EOPNOTSUPP if isinstance(exc, Unsupported) else BLKIF_RSP_ERROR
        return (request.id, request.operation, status)

    def _finish(self, job: Job, status: int) -> tuple[int, int, int]:
        """The job's response; its id is free again once this is published."""
        job.iov = None
        self._in_flight.discard(job.id)
        requests, sectors = _COUNTERS[job.kind]
        self.stats[requests] += 1
        if status == BLKIF_RSP_OKAY:
            self.stats[sectors] += job.nr_sectors
        return (job.id, job.kind, status)

    async def _publish_statistics(self, scope: trio.CancelScope) -> None:
        with scope:  # the counters of whichever connection is current
            await self.publish_statistics(self.counters)

    def counters(self) -> dict[str, int]:
        """The counters of both threads (each adds to its own)."""
        return {key: value + self._thread_stats[key] for key, value in self.stats.items()}

    # --- checking a request ------------------------------------------------------------

    def _segments(self, raw: bytes, nr_segments: int) -> Segments:
        """parse_segments, remembered: with persistent grants the same segment
        lists come back request after request (a checked list stays valid)."""
        key = (raw, nr_segments)
        segments = self._parsed.get(key)
        if segments is None:
            segments = parse_segments(raw, nr_segments)
            if len(self._parsed) >= PARSED_SEGMENT_LISTS:
                self._parsed.clear()
            self._parsed[key] = segments
        return segments

    # --- grants ------------------------------------------------------------------------

    async def _run(self, channel: BackChannel, jobs: list[Job], done: list[Any]) -> None:
        """Map what `jobs` need, do their I/O, and answer or hand them to threads."""
        if not jobs:
            return
        transient = _Mappings(self.ctx.domain.grants, self.device.otherend_id)
        try:
            if any(job.indirect_grefs for job in jobs):
                jobs = await self._load_indirect(jobs, transient, done)
            views = await self._map_data(jobs, transient)
            # Only persistent pages may be answered for before the drain ends.
            early = not transient and self._grants is not None
            unanswered = 0
            queued: list[Job] = []  # for the device's thread, in ring order
            io = self._io
            assert io is not None
            for job in jobs:
                if job.segments is not None:
                    job.iov = _iovec(job.segments, views)
                    if job.iov is None:
                        done.append(self._fail(job, "a grant reference was refused"))
                        continue
                    if early and job.key is not None and self._ready is not None:
                        self._remember(job.key, job.nr_sectors, job.iov)
                if job.kind == BARRIER:  # `_drain` runs a barrier alone
                    # The thread does what was queued before it first, and what
                    # comes after it waits for this drain.
                    await self._wait_for(self._offload([job], done.extend, wait=True))
                    continue
                status = (
                    None
                    if job.kind != READ or queued or io.outstanding  # ring order
                    else self._io_now(job.kind, job.sector, job.nr_sectors, job.iov)
                )
                if status is None:
                    queued.append(job)
                    continue
                done.append(self._finish(job, status))
                unanswered += job.nr_sectors
                if early and unanswered >= EARLY_ANSWER_SECTORS:
                    self._respond(channel, done)
                    done.clear()
                    unanswered = 0
            if not queued:
                return
            if transient or self._grants is None:
                # The drain's pages are unmapped before it is answered: wait for all of it.
                await self._wait_for(self._offload(queued, done.extend, wait=True))
            else:
                self._offload(queued)  # the thread answers on the ring
        finally:
            if transient:
                with trio.CancelScope(shield=True):
                    await transient.unmap_all(self.log)

    def _remember(self, key: tuple[bytes, int], sectors: int, iov: list[Any]) -> None:
        """A segment list served from persistent pages, for `_serve_ready`."""
        ready = self._ready
        assert ready is not None
        if len(ready) >= PARSED_SEGMENT_LISTS:
            ready.clear()
        ready[key] = (sectors, iov)

    def _fail(self, job: Job, why: str) -> tuple[int, int, int]:
        self.refused += 1
        if self.refused <= REFUSALS_LOGGED:
            self.log.warning("%s: request id %d failed: %s", self.device.nodename, job.id, why)
        return self._finish(job, BLKIF_RSP_ERROR)

    async def _map(self, refs: set[int], transient: _Mappings, *, readonly: bool) -> None:
        """Make `refs` reachable: persistent ones (mapping the new ones while there is
        room), else mapped for this drain only."""
        cache = self._grants
        if cache is not None:
            new = list(refs.difference(cache.pages))  # O(len(refs)): a dict argument is probed
            if new:
                room = max(cache.room(), 0)
                if new[:room]:
                    await cache.add(new[:room], readonly=False)
                if new[room:]:
                    await transient.add(new[room:], readonly=False)
            return
        missing = [ref for ref in refs if ref not in transient.pages]
        if missing:
            await transient.add(missing, readonly=readonly)

    def _views(self, transient: _Mappings) -> _Mappings:
        """Where this drain finds its pages: the persistent ones, this drain's, or both."""
        cache = self._grants
        if cache is None:
            return transient
        if not transient:
            return cache
        both = _Mappings(None, self.device.otherend_id)
        both.pages = {**cache.pages, **transient.pages}
        both.where = {**cache.where, **transient.where}
        return both

    async def _load_indirect(
        self, jobs: list[Job], transient: _Mappings, done: list[Any]
    ) -> list[Job]:
        """Copy each INDIRECT request's segment list out of its pages (once), then check it."""
        await self._map(
            {ref for job in jobs for ref in job.indirect_grefs}, transient, readonly=True
        )
        pages = self._views(transient).pages
        ready = []
        for job in jobs:
            if not job.indirect_grefs:
                ready.append(job)
                continue
            try:
                raw = _segment_list(pages, job.indirect_grefs, job.nr_segments)
            except KeyError:
                done.append(self._fail(job, "an indirect page's grant was refused"))
                continue
            try:
                check_segments(job, raw, self.limits, self._segments)
            except BadRequest as exc:
                done.append(self._fail(job, str(exc)))
                continue
            ready.append(job)
        if transient and self._grants is None:
            await transient.unmap_all(self.log)  # copied: the data pages come next
        return ready

    async def _map_data(self, jobs: list[Job], transient: _Mappings) -> _Mappings:
        reads: set[int] = set()
        writes: set[int] = set()
        for job in jobs:
            if job.segments is not None:
                (reads if job.kind == READ else writes).update(job.segments.grefs)
        if self._grants is not None:
            await self._map(reads | writes, transient, readonly=False)
        else:
            if reads:
                await self._map(reads, transient, readonly=False)
            if writes - reads:
                await self._map(writes - reads, transient, readonly=True)
        return self._views(transient)

    # --- I/O -------------------------------------------------------------------------

    def _io_now(self, kind: int, sector: int, sectors: int, iov: Any) -> int | None:
        """A read from the page cache, now; None if it must wait for the device's thread.

        Writes always go to the thread: even a buffered write blocks while its file
        system is frozen (fsfreeze) or its server is gone, and Dom0's main thread
        serves every other device, xenstored and the toolstack."""
        disk = self.disk
        assert disk is not None and iov is not None
        if disk.direct or kind != READ:
            return None
        try:
            if disk.readv(sector, iov, nowait=True) != sectors << SECTOR_SHIFT:
                return None  # part of it is not cached: read it all on a thread
            return BLKIF_RSP_OKAY
        except BlockingIOError:
            return None
        except (OSError, ValueError) as exc:
            self.log.error(
                "%s: %s of sectors %d+%d: %s",
                self.device.nodename,
                BlkifOp(kind).name,
                sector,
                sectors,
                exc,
            )
            return BLKIF_RSP_ERROR

    def _offload(
        self, jobs: list[Job], answer: Answer | None = None, *, wait: bool = False
    ) -> trio.Event | None:
        """Queue `jobs` for the device's thread, which answers them on the ring;
        with `wait`, `answer` takes their responses instead, and the event to
        wait for comes back.

        They count as outstanding from here: a read behind them is queued too
        (ring order), and the device does not let its pages go before they are
        done."""
        self.offloaded += len(jobs)
        ticket = _Ticket(jobs, answer, trio.Event() if wait else None)
        assert self._io is not None
        self._io.put(ticket)
        return ticket.done

    def _respond(self, channel: BackChannel, responses: list[tuple[int, int, int]]) -> None:
        """Answer on the ring from trio's thread (the device's thread answers too)."""
        with self._ring_lock:
            channel.respond_many(responses)

    def _answer_here(self, results: Results) -> tuple[Results, Callable[[], None] | None]:
        """On the device's thread: push the responses of the tickets no task waits
        for onto the ring (under `_ring_lock`). Returns what trio must still do:
        the other tickets (a task waits, they were dropped, or the disk refused an
        operation, which is withdrawn there; all of them while the ring is
        traced) and the front end's notify, if it asked for one (a port's
        notify belongs to trio's thread)."""
        channel = self._ring_served
        if channel is None or channel.trace is not None:
            return results, None
        rest: Results = []
        answers: list[tuple[int, int, int]] = []
        in_flight, stats = self._in_flight, self._thread_stats
        for ticket, statuses in results:
            if statuses is None or ticket.done is not None or BLKIF_RSP_EOPNOTSUPP in statuses:
                rest.append((ticket, statuses))
                continue
            for job, status in zip(ticket.jobs, statuses, strict=True):
                job.iov = None
                in_flight.discard(job.id)
                requests, sectors = _COUNTERS[job.kind]
                stats[requests] += 1
                if status == BLKIF_RSP_OKAY:
                    stats[sectors] += job.nr_sectors
                answers.append((job.id, job.kind, status))
        if not answers:
            return rest, None
        ring = channel.ring
        with self._ring_lock:
            ring.put_responses(answers)
            channel.answered += len(answers)
            notify = ring.push_responses()
        return rest, (functools.partial(self._notify, channel) if notify else None)

    def _notify(self, channel: BackChannel) -> None:
        """The front end's notify for responses the device's thread pushed."""
        if channel is self._ring_served:  # else the port is gone
            channel.notifies += 1
            channel.port.notify()

    @staticmethod
    async def _wait_for(done: trio.Event | None) -> None:
        """Wait for queued jobs whose pages the caller lets go afterwards: even when
        cancelled, since the thread may be using them."""
        assert done is not None
        with trio.CancelScope(shield=True):
            await done.wait()

    def _completed(
        self, results: Results, failure: Exception | None, notify: Callable[[], None] | None
    ) -> None:
        """In trio's thread (`run_sync_soon`), what the device's thread left to it
        (`_answer_here`): answer each ticket (one push for a run of tickets with
        the same taker), and the front end's notify. Statuses of None: dropped
        (at disconnect, or after `failure`, an exception the thread raised),
        never answered.

        Not in a task: an exception here would end Dom0's trio run, so it breaks
        the device instead."""
        try:
            if notify is not None:
                notify()
            if failure is not None:
                self._io_broke(failure)
            answers: list[tuple[int, int, int]] = []
            taker: Answer | None = None
            for ticket, statuses in results:
                if statuses is None:
                    for job in ticket.jobs:
                        job.iov = None
                    continue
                answer = ticket.answer or self._respond_on_ring
                if taker is not None and answer != taker:
                    taker(answers)
                    answers = []
                taker = answer
                for job, status in zip(ticket.jobs, statuses, strict=True):
                    if status == BLKIF_RSP_EOPNOTSUPP:
                        self._withdraw(job.kind)
                    answers.append(self._finish(job, status))
            if taker is not None and answers:
                taker(answers)
        except Exception as exc:
            self._io_broke(exc)
        finally:
            for ticket, _ in results:
                if ticket.done is not None:
                    ticket.done.set()

    def _respond_on_ring(self, responses: list[tuple[int, int, int]]) -> None:
        if self._ring_served is not None:  # else the device is gone, and its ring
            self._respond(self._ring_served, responses)

    def _io_broke(self, exc: Exception) -> None:
        """A bug in the device's I/O: logged, and the device closes. The traceback
        is logged as text and dropped, as its frames hold views of granted pages
        that must be unmapped."""
        self.log.error(
            "%s: the device's I/O failed:\n%s",
            self.device.nodename,
            "".join(traceback.format_exception(exc)).rstrip(),
        )
        exc.__traceback__ = None
        self._io_failure = f"blkback failed: {exc!r}"
        if self._background is not None:
            self._background.cancel_scope.cancel()

    def _io_blocking_all(self, jobs: list[Job]) -> list[int]:
        """On the device's thread: `jobs` in order, waiting for the device; writes
        that follow one another on the disk in one pwritev (`write_groups`)."""
        statuses = [BLKIF_RSP_OKAY] * len(jobs)
        at = 0
        while at < len(jobs):
            end = at
            while end < len(jobs) and jobs[end].kind == WRITE and jobs[end].iov is not None:
                end += 1
            if end - at < 2:
                statuses[at] = self._io_blocking(jobs[at])
                at += 1
                continue
            for group in write_groups(jobs[at:end]):
                self._write_group([jobs[at + index] for index in group], at, group, statuses)
            at = end
        return statuses

    def _write_group(self, jobs: list[Job], at: int, group: list[int], statuses: list[int]) -> None:
        """Writes of consecutive sectors in one pwritev; each on its own when that
        fails, so that each gets its own status (and log line)."""
        disk = self.disk
        assert disk is not None
        if len(jobs) > 1:
            iov = [element for job in jobs for element in job.iov or ()]
            try:
                written = disk.writev(jobs[0].sector, iov)
            except (OSError, ValueError):
                written = -1
            if written == sum(job.nr_sectors for job in jobs) * SECTOR_SIZE:
                return  # statuses are OKAY already
        for job, index in zip(jobs, group, strict=True):
            statuses[at + index] = self._io_blocking(job)

    def _io_blocking(self, job: Job) -> int:
        """On the device's thread: the whole operation, waiting for the device."""
        disk = self.disk
        assert disk is not None
        expected = job.nr_sectors * SECTOR_SIZE
        try:
            if job.kind == READ:
                return (
                    BLKIF_RSP_OKAY
                    if disk.readv(job.sector, job.iov) == expected
                    else BLKIF_RSP_ERROR
                )
            if job.kind == DISCARD:
                disk.discard(job.sector, job.nr_sectors, secure=job.secure)
                return BLKIF_RSP_OKAY
            if job.kind in (FLUSH, BARRIER):
                disk.flush()
            if job.iov is not None and disk.writev(job.sector, job.iov) != expected:
                return BLKIF_RSP_ERROR
            if job.kind == BARRIER and job.iov is not None:
                disk.flush()
            return BLKIF_RSP_OKAY
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP and job.kind in (FLUSH, BARRIER, DISCARD):
                return BLKIF_RSP_EOPNOTSUPP
            self.log.error(
                "%s: %s of sectors %d+%d: %s",
                self.device.nodename,
                BlkifOp(job.kind).name,
                job.sector,
                job.nr_sectors,
                exc,
            )
            return BLKIF_RSP_ERROR
        except ValueError as exc:
            self.log.error("%s: %s", self.device.nodename, exc)
            return BLKIF_RSP_ERROR

    def _withdraw(self, kind: int) -> None:
        """The disk cannot do `kind` after all: stop offering it (as blkback does)."""
        features: dict[int, str] = {
            FLUSH: "feature-flush-cache",
            BARRIER: "feature-barrier",
            DISCARD: "feature-discard",
        }
        key = features[kind]
        if kind == DISCARD:
            self.discard_enabled = False
            self.limits = attrs.evolve(self.limits, discard=False)
        self.log.warning(
            "%s: the disk does not support %s; withdrawing %s",
            self.device.nodename,
            BlkifOp(kind).name,
            key,
        )
        withdrawn: dict[str, str | int] = {key: 0}
        self.ctx.nursery.start_soon(self.publish, withdrawn)


def write_groups(writes: list[Job]) -> list[list[int]]:
    """Indices of `writes` (a run of WRITE jobs queued together, ring order) in
    groups to be done in order, each group one pwritev of sectors that follow
    one another (at most IOV_MAX iovec elements).

    blkif.h orders nothing among requests in flight, so the run is sorted by
    sector, as Linux's block layer merges bios, unless two of them overlap:
    then ring order is kept (the later write wins). Measured on bench/blk.py:
    seqwrite44k's 32 requests in flight come from four tasks with interleaved
    offsets, so only sorting makes them adjacent.
    """
    order = sorted(range(len(writes)), key=lambda index: writes[index].sector)
    for before, after in zip(order, order[1:]):
        if writes[before].sector + writes[before].nr_sectors > writes[after].sector:
            order = list(range(len(writes)))
            break
    groups: list[list[int]] = []
    end = elements = -1
    for index in order:
        job = writes[index]
        count = len(job.iov or ())
        if job.sector == end and elements + count <= IOV_MAX:
            groups[-1].append(index)
            elements += count
        else:
            groups.append([index])
            elements = count
        end = job.sector + job.nr_sectors
    return groups


def _segment_list(pages: dict[int, memoryview], grefs: Any, nr_segments: int) -> bytes:
    """An indirect request's segment list, copied once out of the pages it names
    (KeyError if one of them is not in `pages`)."""
    size = nr_segments * SEGMENT_SIZE
    return b"".join([pages[ref] for ref in grefs[: indirect_pages(nr_segments)]])[:size]


def _iovec(segments: Segments, views: _Mappings) -> list[Any] | None:
    """The granted memory the segments name, in order; None if a gref is not mapped.

    Packed segments over a run of grefs mapped side by side are one element.
    """
    grefs, bounds = segments.grefs, segments.bounds
    try:
        if bounds is not None:
            pages = views.pages
            return [pages[ref][start:end] for ref, (start, end) in zip(grefs, bounds)]
        nbytes = segments.nr_sectors << SECTOR_SHIFT
        first, count = grefs[0], len(grefs)
        whole, offset = views.where[first]
        if count > 1:
            last_whole, last_offset = views.where[grefs[-1]]
            if (
                not segments.run
                or last_whole is not whole
                or last_offset - offset != (count - 1) * XEN_PAGE_SIZE
            ):
                iov = list(map(views.pages.__getitem__, grefs))
                tail = nbytes - (count - 1) * XEN_PAGE_SIZE
                if tail < XEN_PAGE_SIZE:
                    iov[-1] = iov[-1][:tail]
                return iov
        return [whole[offset : offset + nbytes]]
    except KeyError:
        return None
