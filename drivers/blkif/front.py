"""blkfront: the block front end, the guest program's disk.

`guest.device("vbd")` returns blkfront's `Disk`: an async block device of
512-byte sectors::

    disk = guest.device("vbd")
    await disk.write(0, b"x" * 4096)
    data = await disk.read(0, 8)       # 8 sectors -> 4096 bytes
    await disk.readinto(8, buffer)     # fills a writable buffer of whole sectors
    await disk.flush()                 # durable once this returns
    await disk.discard(0, 8)
    first, second = await disk.read_many([(0, 8), (64, 8)])  # pushed together

The data goes through pages of the guest's own memory granted to the back
end (a guest program's bytes are not in guest memory): a read is copied out
of them, a write into them. They come from a `BufferPool` of contiguous
page runs, so a request's data is one copy, whatever its size. A disk
buffer (`disk.buffer(nbytes)`) is such pages given to the program for
keeps: I/O with it copies nothing in the guest, as Linux's blkfront grants
a bio's own pages.

How requests are built follows Linux's blkfront:

- An I/O is split into requests of at most 11 segments (44 KiB), or, when
  the back end offers feature-max-indirect-segments, of that many segments
  (up to `max_indirect_segments`) listed in indirect pages
  (BLKIF_SEGS_PER_INDIRECT_FRAME segments per page). Each segment is a 4 KiB
  page, filled from its first sector.
- With feature-persistent on both ends, pages are granted once and stay
  granted: the back end maps each once and the data path makes no grant
  operation. Without it, each request's pages are granted (read-only for a
  write) and access is ended when the response arrives.
- A disk buffer's pages and grants never change, so a whole disk buffer of
  at most 11 pages is one direct request whose seg[] is built at its first
  use and kept with it: `readinto_many` / `write_many` over such buffers
  build nothing else per request (`_buffer_requests`).
- As many requests are in flight as the ring has slots (and the pool has
  pages); the channel hands out ids and matches responses. The `_many`
  calls push a whole batch at once and wake their caller once: a queue of
  32 reads costs one task switch, not 32.
- When the back end goes away and comes back, requests in flight are sent
  again on the new ring (XenBus `resubmit`): reads, writes, flushes and
  discards are idempotent, and their pages stay granted meanwhile, so a
  persistent grant is simply mapped again by the new connection.

Module parameters come from the guest's kernel command line, with Linux's
names: `xen_blkfront.feature_persistent=0`,
`xen_blkfront.max_indirect_segments=N` (0 turns indirect requests off) and
`xen_blkfront.max_ring_page_order=N` (xl's `extra = "..."` sets them).
"""

import errno
import functools
import struct
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import attrs
import trio

from drivers.blkif.protocol import (
    BLKIF_RING,
    DISCARD,
    INDIRECT,
    MAX_INDIRECT_SEGMENTS,
    RW,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    indirect_pages,
    raw_segments,
    segment_words,
)
from xenlike.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    VDISK_READONLY,
    BlkifOp,
)
from xenlike.abi.ring import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from xenlike.domain.grant_table import GrantInUse
from xenlike.memory import OutOfPages
from xenlike.ring import MAX_RING_PAGE_ORDER
from xenlike.xenbus import FrontChannel, Frontend, ProtocolError

__all__ = ["BlkFront", "BlockDeviceError", "BufferPool", "Disk", "FrontParams"]

READ, WRITE = BlkifOp.READ, BlkifOp.WRITE
# I/O buffers per disk (~4 MiB, a quarter of the grant table): as many pages as
# blkback keeps persistently (its max_persistent_grants), so four 1 MiB
# indirect requests (257 pages each) fit at once, all of them persistent.
MAX_POOL_PAGES = 1056
_SEGMENT_PAD = bytes(BLKIF_MAX_SEGMENTS_PER_REQUEST * 8)


class BlockDeviceError(OSError):
    """An I/O the back end failed (EIO), or could not do (EOPNOTSUPP), or a
    write to a read-only disk (EROFS)."""


@attrs.frozen
class FrontParams:
    """blkfront's module parameters (Linux's names and meaning)."""

    feature_persistent: bool = True
    # Linux defaults to 32; here each request costs a ring round trip in
    # Python, so fewer, larger requests (1 MiB) are worth their pages.
    max_indirect_segments: int = MAX_INDIRECT_SEGMENTS
    max_ring_page_order: int = 0

    @classmethod
    def from_cmdline(cls, cmdline: str) -> "FrontParams":
        """`xen_blkfront.NAME=VALUE` words of a kernel command line; others are ignored."""
        values: dict[str, Any] = {}
        for word in cmdline.split():
            name, eq, value = word.partition("=")
            if not eq or not name.startswith("xen_blkfront."):
                continue
            name = name.removeprefix("xen_blkfront.")
            try:
                if name == "feature_persistent":
                    values[name] = value.lower() not in ("0", "n", "no", "false", "off")
                elif name == "max_indirect_segments":
                    values[name] = max(0, min(int(value), MAX_INDIRECT_SEGMENTS))
                elif name == "max_ring_page_order":
                    values[name] = max(0, min(int(value), MAX_RING_PAGE_ORDER))
            except ValueError:
                raise ValueError(f"kernel parameter {word!r}: expected a number") from None
        return cls(**values)


@attrs.define(eq=False)
class _Chunk:
    """A run of guest pages for I/O; `refs[i]` is page i's persistent grant, if any."""

    first_gfn: int
    view: memoryview
    free: bytearray  # 1 per free page
    refs: list[int | None]
    segments: dict[tuple[int, int], bytes]  # (first page, pages): seg[] of full pages


@attrs.define(eq=False, slots=True)
class Extent:
    """Consecutive pages of one chunk, lent to one request."""

    chunk: _Chunk
    start: int
    count: int

    def view(self, first: int = 0, count: int | None = None) -> memoryview:
        end = self.start + (self.count if count is None else first + count)
        return self.chunk.view[(self.start + first) << XEN_PAGE_SHIFT : end << XEN_PAGE_SHIFT]


class BufferPool:
    """Guest pages for I/O, lent out as contiguous extents.

    It grows by chunks of `chunk_pages` (allocated from the guest's page
    allocator) up to `max_pages`, and never shrinks: with persistent grants
    the back end keeps its pages mapped for the connection's life. A request
    that finds no room waits for one to be given back.

    With persistent grants a chunk is granted whole when it is first used
    for them, in page order: consecutive pages then have consecutive grefs,
    which blkback maps side by side, so a request's pages are one range
    there as they are here.
    """

    def __init__(
        self, domain: Any, backend_domid: int, chunk_pages: int, max_pages: int = MAX_POOL_PAGES
    ) -> None:
        self._domain = domain
        self._backend = backend_domid
        self.chunk_pages = chunk_pages
        self.max_pages = max_pages
        self.chunks: list[_Chunk] = []
        self.pages = 0
        self.kept = 0  # pages of disk buffers (`keep`)
        self._kept: set[Extent] = set()
        self._given_back = trio.Event()
        self._waiting = 0

    async def take(self, count: int) -> Extent:
        while True:
            extent = self.take_nowait(count)
            if extent is not None:
                return extent
            self._waiting += 1
            try:
                await self._given_back.wait()
            finally:
                self._waiting -= 1

    def take_nowait(self, count: int, *, past_max: bool = True) -> Extent | None:
        """An extent now, or None. Pages kept for disk buffers do not count
        against `max_pages`; past it the pool grows only with `past_max` and
        for an extent no chunk could ever hold."""
        want = b"\x01" * count
        for chunk in self.chunks:
            start = chunk.free.find(want)
            if start >= 0:
                chunk.free[start : start + count] = bytes(count)
                return Extent(chunk, start, count)
        size = max(count, self.chunk_pages)
        if self.pages - self.kept + size > self.max_pages and (
            not past_max or any(len(chunk.free) >= count for chunk in self.chunks)
        ):
            return None  # wait for room rather than grow past max_pages
        try:
            first = self._domain.allocator.allocate_run(size)
        except OutOfPages:
            if self.chunks:
                return None
            raise BlockDeviceError(errno.ENOMEM, f"no {size} free pages for I/O buffers") from None
        chunk = _Chunk(
            first,
            self._domain.memory.frames(first, size),
            bytearray(b"\x01") * size,
            [None] * size,
            {},
        )
        self.chunks.append(chunk)
        self.pages += size
        chunk.free[:count] = bytes(count)
        return Extent(chunk, 0, count)

    def keep(self, count: int) -> Extent:
        """An extent lent for keeps (a disk buffer's), until it is given back. Kept
        pages do not count against `max_pages`, so disk buffers never leave the
        requests that copy without room."""
        if self.kept + count > self.max_pages:
            raise BlockDeviceError(
                errno.ENOMEM, f"disk buffers of {self.kept + count} pages: at most {self.max_pages}"
            )
        self.kept += count  # first, so that the pool may grow for it
        try:
            extent = self.take_nowait(count)
        except BaseException:
            self.kept -= count
            raise
        if extent is None:
            self.kept -= count
            raise BlockDeviceError(errno.ENOMEM, f"no {count} free pages for a disk buffer")
        self._kept.add(extent)
        return extent

    def give(self, extent: Extent) -> None:
        if self._kept and extent in self._kept:
            self._kept.remove(extent)
            self.kept -= extent.count
        extent.chunk.free[extent.start : extent.start + extent.count] = b"\x01" * extent.count
        if self._waiting:
            self._given_back.set()
            self._given_back = trio.Event()

    def persistent_refs(self, extent: Extent, first: int, count: int) -> list[int]:
        """Grants of pages first..first+count-1 of `extent`, made writable once and kept."""
        chunk, start = extent.chunk, extent.start + first
        refs = chunk.refs[start : start + count]
        if None in refs:
            grant = self._domain.grants.grant_access
            for index, ref in enumerate(chunk.refs):
                if ref is None:
                    chunk.refs[index] = grant(self._backend, chunk.first_gfn + index)
            refs = chunk.refs[start : start + count]
        return refs  # type: ignore[return-value]

    def full_pages_segments(self, extent: Extent, first: int, pages: int) -> bytes:
        """The segments (as their bytes) of a request filling `pages` persistently
        granted pages of the extent from page `first`: a direct request's seg[11],
        padded, or an indirect request's list. Built once per run of pages: the
        same runs carry request after request."""
        key = (extent.start + first, pages)
        segments = extent.chunk.segments.get(key)
        if segments is None:
            words = segment_words(
                self.persistent_refs(extent, first, pages), pages * SECTORS_PER_PAGE
            )
            if pages <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
                words += _SEGMENT_PAD[len(words) :]
            segments = extent.chunk.segments[key] = words
        return segments

    def request_refs(
        self, extent: Extent, first: int, count: int, readonly: bool, granted: list[int]
    ) -> list[int]:
        """Grants for one request: a page's persistent grant if it has one, else a new
        grant, appended to `granted` for the caller to end once answered."""
        chunk, start = extent.chunk, extent.start + first
        grant = self._domain.grants.grant_access
        refs = []
        for index in range(start, start + count):
            ref = chunk.refs[index]
            if ref is None:
                ref = grant(self._backend, chunk.first_gfn + index, readonly)
                granted.append(ref)
            refs.append(ref)
        return refs


class _BufferPages(NamedTuple):
    """Where a disk buffer's request finds its data: pages of the buffer's own extent."""

    extent: Extent
    page: int  # the first, counted from the extent's start


@attrs.define(eq=False, slots=True)
class _DiskBuffer:
    """A disk buffer (`BlkFront.buffer`): the view the program holds, and its pages."""

    view: memoryview
    pages: _BufferPages  # all of its extent, from page 0
    sectors: int
    # Whole pages, at most a direct request's 11: one request carries it all.
    direct: bool
    # That request's seg[] over persistent grants, built at its first use: the
    # grants of a buffer's pages never change, so neither does its seg[].
    segments: bytes | None = None


# A request's part of an I/O: (sector, count, data), data a view of the caller's
# buffer, None (a read that returns new bytes), or a disk buffer's _BufferPages.
_Piece = tuple[int, int, "memoryview | None | _BufferPages"]


@attrs.define(eq=False, slots=True)
class _Round:
    """Requests sent in one push: their pages, their data's memory, their own grants."""

    extents: list[Extent] = attrs.Factory(list)
    data: list[memoryview | None] = attrs.Factory(list)  # each request's data, in its pages
    # (None for a disk buffer's: the data is in the buffer itself)
    granted: list[int] = attrs.Factory(list)  # grants to end once answered (not persistent)
    responses: list[Any] = attrs.Factory(list)


def _pages(sectors: int, data: Any) -> int:
    """Pages a request of `sectors` takes from the pool: data (unless it is in a disk
    buffer), then indirect pages."""
    pages = -(-sectors // SECTORS_PER_PAGE)
    indirect = _indirect(pages)
    return indirect if type(data) is _BufferPages else pages + indirect


_SEGMENT = struct.Struct("<IBB2x")  # blkif_request_segment: gref, first_sect, last_sect


def _runs(segments: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """Segments (gfn, first_sect, last_sect) as runs (gfn, pages, first_sect, last_sect)
    of consecutive frames, full pages between the first and the last."""
    runs: list[tuple[int, int, int, int]] = []
    for gfn, first, last in segments:
        if runs:
            start, pages, head, tail = runs[-1]
            if gfn == start + pages and tail == SECTORS_PER_PAGE - 1 and first == 0:
                runs[-1] = (start, pages + 1, head, last)
                continue
        runs.append((gfn, 1, first, last))
    return runs


def _segments(words: Sequence[int]) -> list[tuple[int, int, int]]:
    """The runs of `_runs` (flattened, four numbers each) as segments again."""
    segments = []
    for at in range(0, len(words) - 3, 4):
        gfn, pages, head, tail = words[at : at + 4]
        for page in range(pages):
            first = head if page == 0 else 0
            last = tail if page == pages - 1 else SECTORS_PER_PAGE - 1
            segments.append((gfn + page, first, last))
    return segments


def _indirect(pages: int) -> int:
    """Indirect pages a request over `pages` data pages needs: none if it is direct."""
    return indirect_pages(pages) if pages > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0


_rw_request = functools.partial(tuple.__new__, RW.record)  # a blkif_request from a tuple
# The pool's part of a round of disk buffers without indirect pages: nothing.
_NO_PAGES = Extent(_Chunk(0, memoryview(b""), bytearray(), [], {}), 0, 0)


class BlkFront(Frontend):
    """The vbd front end (see the module docstring)."""

    device_type = "vbd"
    ring = BLKIF_RING

    def __init__(self, ctx: Any, device: Any) -> None:
        super().__init__(ctx, device)
        self.params = FrontParams.from_cmdline(ctx.domain.cmdline)
        self._disk: Disk | None = None
        self.ring_page_order = self.params.max_ring_page_order
        self.sectors = 0
        self.sector_size = SECTOR_SIZE
        self.physical_sector_size = SECTOR_SIZE
        self.readonly = False
        self.feature_flush_cache = False
        self.feature_barrier = False
        self.feature_discard = False
        self.feature_secure_discard = False
        self.discard_granularity = SECTOR_SIZE
        self.feature_persistent = False
        self.max_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST
        self.pool = BufferPool(ctx.domain, device.otherend_id, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        # id -> a disk buffer and its place: (its extent, 0), a piece of `items`
        self._buffers: dict[int, _DiskBuffer] = {}  # by id() of the view
        self._lingering: list[int] = []  # request grants the back end still had mapped

    # --- the handshake ---------------------------------------------------------------

    def front_keys(self) -> dict[str, str | int]:
        return {"feature-persistent": int(self.params.feature_persistent)}

    async def connected(self) -> None:
        """blkfront_connect: the disk's size and the features both ends have."""
        sectors = await self.read_int("sectors", -1)
        if sectors < 0:
            raise ProtocolError("the back end published no sectors")
        sector_size = await self.read_int("sector-size", SECTOR_SIZE)
        if sector_size != SECTOR_SIZE:
            raise ProtocolError(
                f"sector-size {sector_size}: without feature-large-sector-size "
                f"it must be {SECTOR_SIZE}"
            )
        self.sectors = sectors
        self.physical_sector_size = await self.read_int("physical-sector-size", SECTOR_SIZE)
        self.readonly = bool(await self.read_int("info", 0) & VDISK_READONLY)
        self.feature_flush_cache = await self.read_int("feature-flush-cache", 0) == 1
        self.feature_barrier = await self.read_int("feature-barrier", 0) == 1
        self.feature_discard = await self.read_int("feature-discard", 0) == 1
        self.feature_secure_discard = (
            self.feature_discard and await self.read_int("discard-secure", 0) == 1
        )
        self.discard_granularity = await self.read_int("discard-granularity", SECTOR_SIZE)
        self.feature_persistent = (
            self.params.feature_persistent and await self.read_int("feature-persistent", 0) == 1
        )
        offered = await self.read_int("feature-max-indirect-segments", 0)
        segments = min(offered, self.params.max_indirect_segments)
        self.max_segments = max(segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)
        self.pool.chunk_pages = max(self.pool.chunk_pages, _pages(self.max_sectors, None))

    @property
    def features(self) -> dict[str, Any]:
        """What was negotiated, by blkif.h's feature names."""
        return {
            "flush-cache": self.feature_flush_cache,
            "barrier": self.feature_barrier,
            "discard": self.feature_discard,
            "discard-secure": self.feature_secure_discard,
            "persistent": self.feature_persistent,
            "max-indirect-segments": self.max_segments
            if self.max_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST
            else 0,
            "ring-page-order": self._ring_order,
        }

    @property
    def _ring_order(self) -> int:
        if not isinstance(self.channel, FrontChannel):
            return 0
        return (self.channel.ring.nr_ents // BLKIF_RING.nr_ents(1)).bit_length() - 1

    @property
    def max_sectors(self) -> int:
        """The largest I/O one request carries."""
        return self.max_segments * SECTORS_PER_PAGE

    async def released(self) -> None:
        """The disk was removed: end every grant of the buffer pool (persistent ones
        last the connection's life) and give its pages back to the guest."""
        self._end([])
        pool, self.pool = self.pool, BufferPool(self.ctx.domain, self.device.otherend_id, 1, 0)
        for chunk in pool.chunks:
            refs = [ref for ref in chunk.refs if ref is not None]
            await self.release_grants(refs, chunk.first_gfn, len(chunk.free))

    # --- suspend and restore (blkfront_freeze, blkif_recover) ---------------------------

    async def suspend(self, drain: float = 0.0) -> None:
        """Before the domain suspends: new requests wait, and no more responses are
        collected, so what is in flight stays in flight, pages and all. The
        suspend does not wait for the back end: `shadow` records those requests
        for a save, and a cancelled suspend resubmits them on the new ring."""
        await super().suspend(drain)
        if self._collector is not None:
            self._collector.cancel()
            self._collector = None

    def shadow(self) -> dict[str, Any]:
        """The requests in flight, for the save (Linux blkfront's shadow): each as
        [operation, sector, then its data as runs of frames [gfn, pages,
        first_sect, last_sect]] (a discard: [DISCARD, sector, sectors, flag]).
        Frames, not grant references: those do not survive a restore, and the
        frames are guest memory, which the save carries. Reads are left out:
        the program that waits for one does not survive a restore either."""
        channel = self.channel
        requests = channel.requests_in_flight() if isinstance(channel, FrontChannel) else []
        entries: list[list[int]] = []
        frames: list[list[int]] = []
        for request in requests:
            op = request.operation
            if op == BlkifOp.DISCARD:
                entries.append([op, request.sector_number, request.nr_sectors, request.flag])
                continue
            if op == BlkifOp.INDIRECT:
                if request.indirect_op != WRITE:
                    continue
                segments = self._indirect_segments(request)
            elif op == WRITE:
                segments = list(
                    _SEGMENT.iter_unpack(raw_segments(request)[: 8 * request.nr_segments])
                )
            elif op in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER):
                entries.append([op])
                continue
            else:
                continue
            runs = _runs((self._frame_of(gref), first, last) for gref, first, last in segments)
            entries.append([WRITE, request.sector_number, *(n for run in runs for n in run)])
            frames += [[gfn, pages] for gfn, pages, _, _ in runs]
        return {"requests": entries, "frames": frames}

    def _frame_of(self, gref: int) -> int:
        return self.ctx.domain.grants.granted_frame(gref)

    def _indirect_segments(self, request: Any) -> list[tuple[int, int, int]]:
        """An indirect request's segments, read from its indirect pages."""
        count = request.nr_segments
        words = b"".join(
            bytes(self.ctx.domain.memory.frame(self._frame_of(gref)))
            for gref in request.indirect_grefs[: indirect_pages(count)]
        )
        return list(_SEGMENT.iter_unpack(words[: 8 * count]))

    async def recover(self, shadow: dict[str, Any]) -> int:
        """blkif_recover, after a restore: the writes, discards and flushes that were
        in flight at the save, sent again on the new ring, their frames granted
        anew; returns how many requests were resubmitted. Writes go as direct
        requests (the new back end may offer other limits), and any flush after
        them. The caller keeps the frames out of the allocator until this returns."""
        requests: list[Any] = []
        granted: list[int] = []
        flush = False
        grant = self.ctx.domain.grants.grant_access
        devid, peer = self.device.devid, self.device.otherend_id
        readonly = not self.feature_persistent  # a persistent grant is mapped writable
        try:
            for entry in shadow.get("requests", ()):
                op = entry[0]
                if op == BlkifOp.DISCARD:
                    if self.feature_discard:
                        requests.append(DISCARD.record(op, entry[3], devid, 0, *entry[1:3]))
                elif op in (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER):
                    flush = True
                elif op == WRITE:
                    sector = entry[1]
                    segments = _segments(entry[2:])
                    for start in range(0, len(segments), BLKIF_MAX_SEGMENTS_PER_REQUEST):
                        group = segments[start : start + BLKIF_MAX_SEGMENTS_PER_REQUEST]
                        refs = [grant(peer, gfn, readonly) for gfn, _, _ in group]
                        granted += refs
                        words = b"".join(
                            _SEGMENT.pack(ref, first, last)
                            for ref, (_, first, last) in zip(refs, group)
                        )
                        words += _SEGMENT_PAD[len(words) :]
                        requests.append(_rw_request((WRITE, len(group), devid, 0, sector, words)))
                        sector += sum(last - first + 1 for _, first, last in group)
            responses = await self.call_many(requests)
        finally:
            self._end(granted)
        for request, response in zip(requests, responses):
            self._check_response(response, request.operation, request.sector_number, 0)
        if flush:
            await self.flush()
        return len(requests) + flush

    # --- the block device ---------------------------------------------------------------

    def for_program(self) -> "Disk":
        if self._disk is None:  # one Disk a device: the guest finds it again at removal
            self._disk = Disk(self)
        return self._disk

    async def read_sectors(self, sector: int, count: int) -> bytes:
        """`count` sectors from `sector` (the program's `Disk.read`)."""
        (data,) = await self.read_many([(sector, count)])
        return data

    async def read_many(self, extents: Iterable[tuple[int, int]]) -> list[bytes]:
        """Several reads at once, `(sector, count)` each; their data, in order.

        The requests are pushed together and the caller wakes once, when the
        last is answered: this is how to keep a deep queue of I/O in flight
        cheaply (a task per request costs a task switch per request).
        """
        items: list[_Piece] = []
        spans = []
        for sector, count in extents:
            self._check(sector, count)
            first = len(items)
            items += [(start, length, None) for start, length in self._split(sector, count)]
            spans.append((first, len(items)))
        data = await self._rw_many(READ, items)
        return [data[a] if b - a == 1 else b"".join(data[a:b]) for a, b in spans]

    async def readinto(self, sector: int, buffer: Any) -> None:
        """Fill `buffer` (writable, whole sectors) from `sector`: no new bytes object."""
        await self.readinto_many([(sector, buffer)])

    async def readinto_many(self, reads: Iterable[tuple[int, Any]]) -> None:
        """Several `readinto`s at once, `(sector, buffer)` each (see `read_many`)."""
        reads = reads if type(reads) is list else list(reads)
        requests = self._buffer_requests(READ, reads)
        if requests is not None:
            await self._call_direct(READ, requests)
            return
        items: list[_Piece] = []
        for sector, buffer in reads:
            self._pieces(sector, buffer, items, writable=True)
        await self._rw_many(READ, items)

    async def write(self, sector: int, data: Any) -> None:
        """Write `data` (whole sectors) from `sector`; done once the back end has it."""
        await self.write_many([(sector, data)])

    async def write_many(self, writes: Iterable[tuple[int, Any]]) -> None:
        """Several writes at once, `(sector, data)` each (see `read_many`)."""
        if self.readonly:
            raise BlockDeviceError(errno.EROFS, f"{self._name} is read-only")
        writes = writes if type(writes) is list else list(writes)
        requests = self._buffer_requests(WRITE, writes)
        if requests is not None:
            await self._call_direct(WRITE, requests)
            return
        items: list[_Piece] = []
        for sector, data in writes:
            self._pieces(sector, data, items)
        await self._rw_many(WRITE, items)

    def _buffer_requests(self, op: int, pairs: list[tuple[int, Any]]) -> list[Any] | None:
        """The fast path of `readinto_many` and `write_many`: with persistent grants,
        when every buffer is a whole disk buffer of at most 11 pages, each is one
        direct request with its buffer's own seg[], built here and nowhere else
        (no pieces, rounds or pool pages). None sends them the plain way
        (`_rw_many`), which also tells what is wrong with a bad one.
        Measured (bench/blk.py pon, main vs this, alternated, medians of 4 runs
        of 3 rounds, load 2.5-4.5): the guest's CPU per 4 KiB read (rand4k)
        5.7 -> 4.4 µs (-24%), per 44 KiB read 6.9 -> 5.8 µs (-16%), per 44 KiB
        write 7.8 -> 6.3 µs (-20%)."""
        if not self.feature_persistent:
            return None
        buffers, disk_sectors, devid = self._buffers, self.sectors, self.device.devid
        requests = []
        for sector, buffer in pairs:
            own = buffers.get(id(buffer))
            if (
                own is None
                or own.view is not buffer
                or not own.direct
                or sector < 0
                or sector + own.sectors > disk_sectors
            ):
                return None
            segments = own.segments
            if segments is None:
                pages = own.sectors // SECTORS_PER_PAGE
                segments = own.segments = self.pool.full_pages_segments(own.pages.extent, 0, pages)
            requests.append(
                _rw_request((op, own.sectors // SECTORS_PER_PAGE, devid, 0, sector, segments))
            )
        return requests

    async def _call_direct(self, op: int, requests: list[Any]) -> None:
        """Send `_buffer_requests`' requests in one push; the first failure raises."""
        responses = await self.call_many(requests)
        for request, response in zip(requests, responses):
            if response.status != BLKIF_RSP_OKAY or response.operation != op:
                sector, count = request.sector_number, request.nr_segments * SECTORS_PER_PAGE
                raise self._failure(response, op, sector, count)

    def buffer(self, nbytes: int) -> memoryview:
        """`nbytes` (whole sectors) of the guest's own memory, for I/O without a copy.

        `readinto` and `write` (and their `_many` forms) given this very object
        (not a slice of it) hand its pages to the back end, which reads into
        them or writes from them: the data is not copied in the guest. Its
        pages come from the buffer pool, lent for keeps, and it lasts until it
        is given to `release` (or for the device's life).
        """
        if nbytes < SECTOR_SIZE or nbytes % SECTOR_SIZE:
            raise ValueError(
                f"a disk buffer holds whole {SECTOR_SIZE}-byte sectors, not {nbytes} bytes"
            )
        pages = -(-nbytes // XEN_PAGE_SIZE)
        extent = self.pool.keep(pages)
        view = extent.view()[:nbytes]
        direct = nbytes == pages * XEN_PAGE_SIZE and pages <= BLKIF_MAX_SEGMENTS_PER_REQUEST
        sectors = nbytes >> SECTOR_SHIFT
        self._buffers[id(view)] = _DiskBuffer(view, _BufferPages(extent, 0), sectors, direct)
        return view

    def release(self, buffer: memoryview) -> None:
        """Give a disk buffer back once its I/O is done: its pages go back to the
        buffer pool, and the view can no longer be used."""
        own = self._buffers.get(id(buffer))
        if own is None or own.view is not buffer:
            raise ValueError(f"not a disk buffer of {self._name}")
        buffer.release()
        del self._buffers[id(buffer)]
        self.pool.give(own.pages.extent)

    def _pieces(
        self, sector: int, buffer: Any, items: list[Any], *, writable: bool = False
    ) -> None:
        """Check a buffer of whole sectors at `sector`; add its requests' pieces to
        `items` (see `_Piece`)."""
        own = self._buffers.get(id(buffer))
        if own is not None and own.view is buffer:
            count = own.sectors
            if count <= self.max_sectors and 0 <= sector and sector + count <= self.sectors:
                items.append((sector, count, own.pages))
                return
            self._check(sector, count)
            extent = own.pages.extent
            for start, length in self._split(sector, count):
                items.append(
                    (start, length, _BufferPages(extent, (start - sector) // SECTORS_PER_PAGE))
                )
            return
        view = memoryview(buffer).cast("B")
        if len(view) % SECTOR_SIZE:
            raise ValueError(f"{len(view)} bytes are not whole {SECTOR_SIZE}-byte sectors")
        if writable and view.readonly:
            raise TypeError(
                f"{type(buffer).__name__} is read-only: readinto needs a writable buffer"
            )
        count = len(view) >> SECTOR_SHIFT
        self._check(sector, count)
        if count <= self.max_sectors:
            items.append((sector, count, view))
            return
        for start, length in self._split(sector, count):
            offset = (start - sector) << SECTOR_SHIFT
            items.append((start, length, view[offset : offset + (length << SECTOR_SHIFT)]))

    async def flush(self) -> None:
        """Make every acknowledged write durable (FLUSH_DISKCACHE, else WRITE_BARRIER).

        A back end that offers neither has no volatile cache to flush.
        """
        if self.feature_flush_cache:
            op = BlkifOp.FLUSH_DISKCACHE
        elif self.feature_barrier:
            op = BlkifOp.WRITE_BARRIER
        else:
            return
        response = await self.call(RW.record(op, 0, self.device.devid, 0, 0))
        if response.status == BLKIF_RSP_EOPNOTSUPP:
            if op == BlkifOp.FLUSH_DISKCACHE:
                self.feature_flush_cache = False
            else:
                self.feature_barrier = False
        self._check_response(response, op, 0, 0)

    async def discard(self, sector: int, count: int, *, secure: bool = False) -> None:
        """Tell the disk the sectors are unused (they read back as zeros here).

        `secure` asks for an irrecoverable erase (needs discard-secure).
        """
        self._check(sector, count)
        if not self.feature_discard or (secure and not self.feature_secure_discard):
            raise BlockDeviceError(
                errno.EOPNOTSUPP,
                f"{self._name}: the back end offers no {'secure ' if secure else ''}discard",
            )
        request = DISCARD.record(
            BlkifOp.DISCARD,
            BLKIF_DISCARD_SECURE if secure else 0,
            self.device.devid,
            0,
            sector,
            count,
        )
        response = await self.call(request)
        if response.status == BLKIF_RSP_EOPNOTSUPP:
            self.feature_discard = False
        self._check_response(response, BlkifOp.DISCARD, sector, count)

    # --- requests --------------------------------------------------------------------

    @property
    def _name(self) -> str:
        return f"vbd {self.device.devid}"

    def _check(self, sector: int, count: int) -> None:
        if sector < 0 or count < 1 or sector + count > self.sectors:
            raise ValueError(
                f"{self._name}: sectors {sector}..{sector + count - 1} are not on a "
                f"disk of {self.sectors} sectors"
            )

    def _split(self, sector: int, count: int) -> list[tuple[int, int]]:
        step = self.max_sectors
        if count <= step:
            return [(sector, count)]
        return [
            (start, min(step, sector + count - start))
            for start in range(sector, sector + count, step)
        ]

    async def _rw_many(self, op: int, items: list[_Piece]) -> list[bytes]:
        """Requests of at most `max_sectors` each, one per piece: pages, grants,
        one push, the copies. A write's buffer holds its data; a read fills its
        buffer, or returns new bytes without one; a disk buffer is its own page.
        They go out in rounds as large as the buffer pool allows (a round holds
        its pages until it is answered)."""
        if not self.connected_now:
            await self.wait_connected()
        results: list[bytes] = []  # what reads without a buffer return
        error: BlockDeviceError | None = None
        done = 0
        while done < len(items):
            rest = items[done:] if done else items
            round_ = await self._round(op, rest)
            try:
                for (sector, count, buffer), data, response in zip(
                    rest, round_.data, round_.responses
                ):
                    if response.status != BLKIF_RSP_OKAY or response.operation != op:
                        error = error or self._failure(response, op, sector, count)
                    elif op == READ and data is not None:  # None: read into a disk buffer
                        if buffer is None:
                            results.append(bytes(data))
                        elif isinstance(buffer, memoryview):
                            buffer[:] = data
            finally:
                self._give_back(round_)
            done += len(round_.data)
        if error is not None:
            raise error
        return results

    async def _round(self, op: int, items: list[_Piece]) -> _Round:
        """Lend pages to the first `items` the pool has room for now (at least one),
        send their requests in one push, and return the round with the responses.
        Its pages are one extent when the pool has a run that long, as it mostly
        has. The caller gives the pages back (`_give_back`)."""
        pool = self.pool
        round_ = _Round()
        sizes = [_pages(count, data) for _, count, data in items]
        total = sum(sizes)
        whole = pool.take_nowait(total, past_max=False) if total else _NO_PAGES
        try:
            if whole is not None:
                if whole is not _NO_PAGES:
                    round_.extents.append(whole)
                requests = self._fill(op, items, sizes, whole, round_)
            else:
                requests = []
                for item, size in zip(items, sizes):
                    extent = pool.take_nowait(size)
                    if extent is None:
                        if round_.extents:
                            break  # send this round; its pages come back with the answers
                        extent = await pool.take(size)
                    round_.extents.append(extent)
                    requests += self._fill(op, [item], [size], extent, round_)
            round_.responses = await self.call_many(requests)
            return round_
        except trio.Cancelled:
            # The back end may yet write into these pages: they are never lent again.
            raise
        except BaseException:
            self._give_back(round_)
            raise

    def _fill(
        self, op: int, items: list[_Piece], sizes: list[int], extent: Extent, round_: _Round
    ) -> list[Any]:
        """The requests for `items` in consecutive pages of `extent` (`sizes` pages
        each), a write's data copied in. A request over whole persistent pages
        reuses the seg[] its pages had before."""
        memory, base, known = extent.chunk.view, extent.start, extent.chunk.segments
        persistent, devid = self.feature_persistent, self.device.devid
        requests = []
        first = 0
        for (sector, count, data), size in zip(items, sizes):
            if isinstance(data, _BufferPages):  # its data is there; any indirect pages are here
                round_.data.append(None)
                own, at = data
                pages, partial = divmod(count, SECTORS_PER_PAGE)
                segments = (
                    own.chunk.segments.get((own.start + at, pages))
                    if persistent and not size and not partial
                    else None
                )  # size: indirect
                if segments is None:
                    requests.append(
                        self._request(op, sector, count, own, at, (extent, first), round_.granted)
                    )
                else:
                    requests.append(_rw_request((op, pages, devid, 0, sector, segments)))
                first += size
                continue
            start = (base + first) << XEN_PAGE_SHIFT
            view = memory[start : start + (count << SECTOR_SHIFT)]
            if data is not None and op == WRITE:
                view[:] = data
            round_.data.append(view)
            segments = (
                known.get((base + first, size))
                if persistent and count == size * SECTORS_PER_PAGE
                else None
            )
            if segments is None:
                pages = -(-count // SECTORS_PER_PAGE)
                requests.append(
                    self._request(
                        op, sector, count, extent, first, (extent, first + pages), round_.granted
                    )
                )
            else:
                requests.append(_rw_request((op, size, devid, 0, sector, segments)))
            first += size
        return requests

    def _give_back(self, round_: _Round) -> None:
        if round_.granted or self._lingering:
            self._end(round_.granted)
        pool = self.pool
        for extent in round_.extents:
            pool.give(extent)

    def _request(
        self,
        op: int,
        sector: int,
        count: int,
        extent: Extent,
        first: int,
        indirect: tuple[Extent, int],
        granted: list[int],
    ) -> Any:
        """The request for `count` sectors in the extent's pages from `first` on; an
        indirect one lists its segments in the pages at `indirect`."""
        pool = self.pool
        pages = -(-count // SECTORS_PER_PAGE)
        nr_indirect = _indirect(pages)
        if self.feature_persistent:
            if count == pages * SECTORS_PER_PAGE:
                words = pool.full_pages_segments(extent, first, pages)
                if not nr_indirect:
                    return _rw_request((op, pages, self.device.devid, 0, sector, words))
            else:
                words = segment_words(pool.persistent_refs(extent, first, pages), count)
            refs = pool.persistent_refs(*indirect, nr_indirect) if nr_indirect else []
        else:
            words = segment_words(
                pool.request_refs(extent, first, pages, op == WRITE, granted), count
            )
            refs = pool.request_refs(*indirect, nr_indirect, True, granted)
        if not nr_indirect:
            return _rw_request(
                (op, pages, self.device.devid, 0, sector, words + _SEGMENT_PAD[len(words) :])
            )
        descriptors = indirect[0].view(indirect[1], nr_indirect)
        descriptors[: len(words)] = words
        return INDIRECT.record(BlkifOp.INDIRECT, op, pages, 0, sector, self.device.devid, refs)

    def _end(self, granted: Sequence[int]) -> None:
        """End a request's own grants (and any the back end held on to before)."""
        if not granted and not self._lingering:
            return
        end = self.ctx.domain.grants.end_access
        refs, self._lingering = [*self._lingering, *granted], []
        for ref in refs:
            try:
                end(ref)
            except GrantInUse:
                self._lingering.append(ref)

    def _check_response(self, response: Any, op: int, sector: int, count: int) -> None:
        if response.status != BLKIF_RSP_OKAY or response.operation != op:
            raise self._failure(response, op, sector, count)

    def _failure(self, response: Any, op: int, sector: int, count: int) -> BlockDeviceError:
        """What a response other than OKAY for `op` means, as an exception."""
        what = f"{self._name}: {BlkifOp(op).name}" + (
            f" of sectors {sector}..{sector + count - 1}" if count else ""
        )
        if response.operation != op:
            return BlockDeviceError(
                errno.EIO, f"{what}: the back end answered operation {response.operation}"
            )
        if response.status == BLKIF_RSP_EOPNOTSUPP:
            return BlockDeviceError(errno.EOPNOTSUPP, f"{what}: not supported by the back end")
        return BlockDeviceError(errno.EIO, f"{what} failed (status {response.status})")


class Disk:
    """The guest program's disk: blkfront's block calls, without its XenBus ones.

    A block `read(sector, count)` on the driver itself would shadow the XenBus
    `read(key)` that the driver's own handshake calls (`read_int`); here it
    reads the disk and nothing else. Hostile-guest tests reach the driver as
    `front`.
    """

    def __init__(self, front: BlkFront) -> None:
        self.front = front

    def __repr__(self) -> str:
        return f"<Disk {self.front.device.nodename}>"

    @property
    def device(self) -> Any:
        """The XenBus device (type, devid, nodename), as on every front end."""
        return self.front.device

    @property
    def failed(self) -> str | None:
        """Why the device failed, or None."""
        return self.front.failed

    @property
    def sectors(self) -> int:
        return self.front.sectors

    @property
    def sector_size(self) -> int:
        return self.front.sector_size

    @property
    def readonly(self) -> bool:
        return self.front.readonly

    @property
    def features(self) -> dict[str, Any]:
        """What both ends negotiated, by blkif.h's feature names."""
        return self.front.features

    @property
    def max_sectors(self) -> int:
        """The largest I/O one request carries."""
        return self.front.max_sectors

    async def read(self, sector: int, count: int) -> bytes:
        """`count` sectors from `sector`."""
        return await self.front.read_sectors(sector, count)

    async def read_many(self, extents: Iterable[tuple[int, int]]) -> list[bytes]:
        """Several reads pushed together, `(sector, count)` each; their data, in order."""
        return await self.front.read_many(extents)

    async def readinto(self, sector: int, buffer: Any) -> None:
        """Fill `buffer` (writable, whole sectors) from `sector`."""
        await self.front.readinto(sector, buffer)

    async def readinto_many(self, reads: Iterable[tuple[int, Any]]) -> None:
        """Several `readinto`s at once, `(sector, buffer)` each."""
        await self.front.readinto_many(reads)

    async def write(self, sector: int, data: Any) -> None:
        """Write `data` (whole sectors) from `sector`; done once the back end has it."""
        await self.front.write(sector, data)

    async def write_many(self, writes: Iterable[tuple[int, Any]]) -> None:
        """Several writes at once, `(sector, data)` each."""
        await self.front.write_many(writes)

    def buffer(self, nbytes: int) -> memoryview:
        """`nbytes` of the guest's own memory, for I/O without a copy (see BlkFront.buffer)."""
        return self.front.buffer(nbytes)

    def release(self, buffer: memoryview) -> None:
        """Give a disk buffer back once its I/O is done."""
        self.front.release(buffer)

    async def flush(self) -> None:
        """Make every acknowledged write durable."""
        await self.front.flush()

    async def discard(self, sector: int, count: int, *, secure: bool = False) -> None:
        """Give sectors back; they read as zeros."""
        await self.front.discard(sector, count, secure=secure)
