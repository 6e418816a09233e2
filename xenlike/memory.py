"""A domain's memory: its frames, foreign mappings of granted frames, its page
allocator and the fixed frames it boots with.

A domain's pseudo-physical memory is one memfd of 4 KiB frames numbered by
gfn. The hypervisor creates it and maps all of it; the domain process attaches
to the fd it receives at spawn. A frame that is granted moves into a file of
its own (`xenlike.frames`), mapped over its place in the big mapping
(`DomainMemory.back_frame`); a domain that maps a foreign grant gets that
file alone and maps it beside the other granted pages (`map_pages`). A
privileged mapper (Dom0) keeps the files it was handed mapped between grant
maps (`FrameCache`), as Xen's privcmd lets it map any guest's memory.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

from attrs import define, field, frozen

from xenlike.abi.ring import XEN_PAGE_SHIFT, XEN_PAGE_SIZE

__all__ = [
    "XEN_PAGE_SHIFT",
    "XEN_PAGE_SIZE",
    "BadFrame",
    "MACHINE_REGION_SHIFT",
    "MAX_CACHED_FRAMES",
    "BootLayout",
    "CachedPages",
    "DomainMemory",
    "DoubleFree",
    "FrameCache",
    "FrameMapping",
    "MemoryInUse",
    "MemoryTooSmall",
    "OutOfPages",
    "PageAllocator",
    "REGION_FRAMES",
    "XenMemoryError",
    "machine_address",
    "map_frames",
    "map_pages",
    "punch",
    "split_machine_address",
]

# Not exported by Python's mmap module; the Linux values (asm-generic, x86_64).
_MAP_FIXED = 0x10
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc_mmap = _libc.mmap
# off_t is a long on LP64 Linux.
_libc_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc_mmap.restype = ctypes.c_void_p
_MAP_FAILED = ctypes.c_void_p(-1).value
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int


class XenMemoryError(Exception):
    """Base of every error about domain memory, so callers can catch one type."""


class BadFrame(XenMemoryError, ValueError):
    """A frame number outside the memory or range it was asked of."""


class MemoryInUse(XenMemoryError, BufferError):
    """Unmapping was refused: memoryviews into the mapping are still alive and
    would point at unmapped memory."""


class OutOfPages(XenMemoryError):
    """The page allocator has no free frame (or no free run long enough)."""


class DoubleFree(XenMemoryError, ValueError):
    """A frame was freed that the allocator already holds as free."""


class MemoryTooSmall(XenMemoryError, ValueError):
    """The domain's memory cannot hold its fixed boot frames plus one frame of
    its own."""


def _check_frames(gfn: int, count: int, start: int, end: int, what: str) -> None:
    """Refuse gfns gfn..gfn+count-1 unless all lie in start..end-1."""
    if count < 1:
        raise ValueError(f"a run of frames needs count >= 1, got {count}")
    if not (start <= gfn and gfn + count <= end):
        frames = f"gfn {gfn}" if count == 1 else f"gfns {gfn}..{gfn + count - 1}"
        raise BadFrame(f"{frames} outside {what} (gfns {start}..{end - 1})")


def _refuse_while_exported(mapping: mmap.mmap, what: str) -> None:
    try:
        mapping.close()
    except BufferError as exc:
        raise MemoryInUse(
            f"{what} still has memoryviews in use; release them before close()"
        ) from exc


@define(eq=False)
class DomainMemory:
    """One domain's pseudo-physical memory, mapped shared over all its frames.

    Build it with `create` (hypervisor) or `attach` (domain process), not
    directly. `close` refuses with `MemoryInUse` while memoryviews from
    `frame`/`frames` are alive: unmapping under them would crash the process,
    and the memory stays usable so the caller can release them and retry.
    """

    nr_pages: int
    _fd: int
    _mapping: mmap.mmap = field(repr=False)

    @classmethod
    def create(cls, nr_pages: int, *, name: str = "xenlike-dom") -> DomainMemory:
        """Make a new zeroed memory of `nr_pages` frames.

        The memfd is sealed against shrinking and growing so that no domain
        holding the fd can make another process's mapping fault with SIGBUS,
        and sealed against further seals (a write seal would stop new
        mappings).
        """
        if nr_pages < 1:
            raise ValueError(f"a domain needs at least one frame, got nr_pages={nr_pages}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, nr_pages * XEN_PAGE_SIZE)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            return cls._map(fd, nr_pages)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, nr_pages: int) -> DomainMemory:
        """Map the memory behind a received fd, which the result then owns.

        On error the fd stays the caller's. The size must match exactly: a
        mismatch means the sender and receiver disagree about the domain.
        """
        size = os.fstat(fd).st_size
        if size != nr_pages * XEN_PAGE_SIZE:
            raise ValueError(
                f"fd {fd} holds {size} bytes, but {nr_pages} frames are "
                f"{nr_pages * XEN_PAGE_SIZE} bytes"
            )
        return cls._map(fd, nr_pages)

    @classmethod
    def _map(cls, fd: int, nr_pages: int) -> DomainMemory:
        mapping = mmap.mmap(
            fd,
            nr_pages * XEN_PAGE_SIZE,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        return cls(nr_pages, fd, mapping)

    @property
    def fd(self) -> int:
        """The memfd, to send with SCM_RIGHTS; it stays owned by this object."""
        if self._fd < 0:
            raise ValueError("domain memory is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def frame(self, gfn: int) -> memoryview:
        """One frame, writable; release the view (or drop it) before `close`."""
        return self.frames(gfn, 1)

    def frames(self, gfn: int, count: int) -> memoryview:
        """`count` consecutive frames from `gfn` as one writable view."""
        if self._mapping.closed:
            raise ValueError("domain memory is closed")
        _check_frames(gfn, count, 0, self.nr_pages, "domain memory")
        with memoryview(self._mapping) as whole:
            return whole[gfn * XEN_PAGE_SIZE : (gfn + count) * XEN_PAGE_SIZE]

    def back_frame(self, gfn: int, fd: int) -> None:
        """Map the one-page file `fd` over frame `gfn`: from now on the frame is that
        file's page, for every view already taken too (they name addresses)."""
        if self._mapping.closed:
            raise ValueError("domain memory is closed")
        _check_frames(gfn, 1, 0, self.nr_pages, "domain memory")
        _mmap_fixed(
            _address_of(self._mapping) + gfn * XEN_PAGE_SIZE,
            XEN_PAGE_SIZE,
            mmap.PROT_READ | mmap.PROT_WRITE,
            fd,
            0,
        )

    def close(self) -> None:
        """Unmap and close the fd; a second call does nothing."""
        if self.closed:
            return
        _refuse_while_exported(self._mapping, "domain memory")
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> DomainMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@define(eq=False)
class FrameMapping:
    """Frames of another domain mapped side by side in the listed order.

    A read-only mapping is PROT_READ in the page tables and hands out
    read-only memoryviews, so a stray write raises TypeError rather than
    killing the process with SIGSEGV. Like `DomainMemory`, `close` refuses
    with `MemoryInUse` while views are alive.
    """

    gfns: tuple[int, ...]
    writable: bool
    _reservation: mmap.mmap = field(repr=False)
    side_by_side = True  # the frames are mapped side by side, whatever their gfns

    @property
    def view(self) -> memoryview:
        """All mapped frames as one view, len(gfns) * XEN_PAGE_SIZE bytes."""
        if self._reservation.closed:
            raise ValueError("frame mapping is closed")
        view = memoryview(self._reservation)
        return view if self.writable else view.toreadonly()

    def page(self, index: int) -> memoryview:
        """The frame at position `index` of `gfns` (not gfn `index`)."""
        if not 0 <= index < len(self.gfns):
            raise IndexError(f"page {index} outside a mapping of {len(self.gfns)} frames")
        return self.view[index * XEN_PAGE_SIZE : (index + 1) * XEN_PAGE_SIZE]

    def pages(self) -> list[memoryview]:
        """Every frame's view, in order: `page(i)` for each i, made in one go."""
        view = self.view
        return [view[i : i + XEN_PAGE_SIZE] for i in range(0, len(view), XEN_PAGE_SIZE)]

    def close(self) -> None:
        """Unmap the whole range; a second call does nothing."""
        _refuse_while_exported(self._reservation, "frame mapping")

    def __enter__(self) -> FrameMapping:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


MACHINE_REGION_SHIFT = 40


def machine_address(region: int, gfn: int) -> int:
    """Frame `gfn` of the memory the hypervisor numbered `region`, as a machine
    address (Xen's maddr; a grant map reports one in dev_bus_addr).

    Each domain's memory gets its own 1 TiB of machine address space, numbered
    as the hypervisor builds domains, so machine addresses are unique on the
    host as Xen's are: a reused domid never aliases its predecessor's frames.
    """
    return region << MACHINE_REGION_SHIFT | gfn << XEN_PAGE_SHIFT


def split_machine_address(maddr: int) -> tuple[int, int]:
    """(region, gfn) of a machine address made by `machine_address`."""
    offset = maddr & ((1 << MACHINE_REGION_SHIFT) - 1)
    return maddr >> MACHINE_REGION_SHIFT, offset >> XEN_PAGE_SHIFT


def map_frames(fd: int, gfns: Iterable[int], *, writable: bool) -> FrameMapping:
    """Map exactly `gfns` of the memory behind `fd` as one contiguous range.

    Multi-page rings need their frames contiguous in virtual memory even when
    the granter's frames are scattered. An anonymous reservation owned by a
    Python mmap object holds the range (so Python refuses to unmap it under
    live views); each run of consecutive gfns is then mapped over its slot
    with MAP_FIXED. The fd stays the caller's; the mapping outlives it.
    """
    gfns = tuple(gfns)
    if not gfns:
        raise ValueError("map_frames needs at least one gfn")
    nr_frames = os.fstat(fd).st_size // XEN_PAGE_SIZE
    for gfn in gfns:
        _check_frames(gfn, 1, 0, nr_frames, "the memory behind the fd")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return _reserve_and_fill(
        gfns,
        writable,
        [
            (index, count, fd, first_gfn * XEN_PAGE_SIZE)
            for index, first_gfn, count in _consecutive_runs(gfns)
        ],
        prot,
    )


def map_pages(fds: Sequence[int], gfns: Iterable[int], *, writable: bool) -> FrameMapping:
    """Map the one-page files `fds` side by side, in order (the granted frames
    `gfns` name them for the record). The fds stay the caller's: close them
    once mapped, and the mapping alone reaches the pages."""
    gfns = tuple(gfns)
    if not fds or len(fds) != len(gfns):
        raise ValueError(f"map_pages needs one file per frame, got {len(fds)} for {len(gfns)}")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return _reserve_and_fill(
        gfns, writable, [(index, 1, fd, 0) for index, fd in enumerate(fds)], prot
    )


def _reserve_and_fill(
    gfns: tuple[int, ...], writable: bool, pieces: list[tuple[int, int, int, int]], prot: int
) -> FrameMapping:
    """Reserve len(gfns) pages, then map each (slot, pages, fd, offset) over its slot."""
    # Writable, or Python would give ctypes no buffer to take the address
    # from; every page is mapped over before anyone sees the range.
    reservation = mmap.mmap(-1, len(gfns) * XEN_PAGE_SIZE, flags=mmap.MAP_PRIVATE)
    try:
        base = _address_of(reservation)
        for index, count, fd, offset in pieces:
            _mmap_fixed(base + index * XEN_PAGE_SIZE, count * XEN_PAGE_SIZE, prot, fd, offset)
    except BaseException:
        reservation.close()
        raise
    return FrameMapping(gfns, writable, reservation)


def punch(fd: int, gfn: int, count: int) -> None:
    """Give frames gfn..gfn+count-1 of the file back to the host; they read as zeros after."""
    if (
        _libc.fallocate(
            fd,
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
            gfn << XEN_PAGE_SHIFT,
            count * XEN_PAGE_SIZE,
        )
        != 0
    ):
        errno = ctypes.get_errno()
        raise OSError(errno, f"{os.strerror(errno)}: punching {count} frames at gfn {gfn}")


def _address_of(mapping: mmap.mmap) -> int:
    # The ctypes object exports the mmap's buffer; it dies with this
    # expression, releasing the export so the mmap can still be closed.
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def _consecutive_runs(gfns: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    """(index in gfns, first gfn, count) for each run of consecutive gfns."""
    start = 0
    for index in range(1, len(gfns) + 1):
        if index == len(gfns) or gfns[index] != gfns[index - 1] + 1:
            yield start, gfns[start], index - start
            start = index


def _mmap_fixed(address: int, length: int, prot: int, fd: int, offset: int) -> None:
    result = _libc_mmap(address, length, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, offset)
    if result == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(
            errno, f"{os.strerror(errno)}: mmap of {length} bytes at offset {offset} of fd {fd}"
        )


MAX_CACHED_FRAMES = 16384
"""Foreign frames a privileged mapper keeps mapped at most. Each is a mapping of
its own (and splits the reservation around it), so 16 granters' MAX_FRAME_FILES
(4096) frames each would pass vm.max_map_count (65530 here); beyond the limit,
the least recently mapped frames that no live mapping uses are let go."""
REGION_FRAMES = 1 << 22
"""Frames of one granter the cache can hold: the address space it reserves per
granter (16 GiB, inaccessible and never backed); a frame beyond is mapped the
plain way (`map_pages`)."""
_RegionBytes = ctypes.c_ubyte * (REGION_FRAMES * XEN_PAGE_SIZE)


@define(eq=False)
class _Slot:
    """A cached frame: the file mapped in its place, with which rights, and how
    many live mappings show it."""

    inode: int
    writable: bool
    pins: int = 0


@define(eq=False)
class _Region:
    """One granter's frames in the cache: REGION_FRAMES reserved pages, frame gfn
    at page gfn, inaccessible where nothing is cached."""

    base: int
    slots: int = 0
    forgotten: bool = False  # its granter is gone: let each frame go once unused


@define(eq=False)
class FrameCache:
    """Foreign frames a privileged mapper keeps mapped between grant maps.

    Mapping a frame's own file costs an mmap, an munmap and a page fault per
    page, about 7 µs: 1.9 ms for a 1 MiB block request, which without
    persistent grants is mapped and unmapped each time. Dom0 may map any
    guest's memory (Xen's privcmd), so its runtime keeps each file it is
    handed mapped in the place of its frame, in an address range reserved per
    granter (its machine region), and a later map of the same frame finds it
    there: it only checks that the file it was handed is still the one mapped
    (the inode; a granter that moves a frame to a fresh file hands out the new
    one) with at least the rights asked for, and closes it.

    What a driver gets is still what the grant allows: `CachedPages` gives
    exactly the granted pages, read-only views for a read-only grant, and its
    views must be released before unmap as a `FrameMapping`'s must. The
    cache holds at most `limit` frames (letting the least recently mapped
    unused ones go) and lets a granter's frames go when it is forgotten
    (`forget`, once the granter is gone), each as soon as no mapping shows it.
    """

    limit: int = MAX_CACHED_FRAMES
    _regions: dict[int, _Region] = field(factory=dict)
    _slots: dict[tuple[int, int], _Slot] = field(factory=dict)  # least recently mapped first

    def __len__(self) -> int:
        return len(self._slots)

    def map(
        self, region: int, gfns: Sequence[int], fds: Sequence[int], *, writable: bool
    ) -> CachedPages | None:
        """Frames `gfns` of the granter numbered `region`, from their files `fds`
        (which stay the caller's); None when the cache cannot hold them (full of
        frames in use, a forgotten granter, a frame beyond REGION_FRAMES)."""
        gfns = tuple(gfns)
        if not gfns or len(fds) != len(gfns) or max(gfns) >= REGION_FRAMES:
            return None
        home = self._regions.get(region)
        if home is None:
            home = self._regions[region] = _Region(_reserve(REGION_FRAMES * XEN_PAGE_SIZE))
        elif home.forgotten:
            return None
        taken = 0
        try:
            for gfn, fd in zip(gfns, fds, strict=True):
                if not self._take(region, home, gfn, fd, writable):
                    break
                taken += 1
        finally:
            if taken < len(gfns):
                self._unpin(region, gfns[:taken])
        if taken < len(gfns):
            return None
        return CachedPages(gfns, writable, self, region, _RegionBytes.from_address(home.base))

    def _take(self, region: int, home: _Region, gfn: int, fd: int, writable: bool) -> bool:
        """Pin frame `gfn`, mapping `fd` in its place unless it is there with the rights."""
        key = (region, gfn)
        inode = os.fstat(fd).st_ino
        slot = self._slots.pop(key, None)
        if slot is None:
            if len(self._slots) >= self.limit and not self._let_go_one():
                return False
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            _mmap_fixed(home.base + gfn * XEN_PAGE_SIZE, XEN_PAGE_SIZE, prot, fd, 0)
            slot = _Slot(inode, writable)
            home.slots += 1
        elif slot.inode != inode or (writable and not slot.writable):
            # MAP_FIXED replaces the page at once: a live view never sees a hole.
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            try:
                _mmap_fixed(home.base + gfn * XEN_PAGE_SIZE, XEN_PAGE_SIZE, prot, fd, 0)
            except BaseException:
                self._slots[key] = slot
                raise
            slot.inode, slot.writable = inode, writable
        slot.pins += 1
        self._slots[key] = slot  # the most recently mapped, last
        return True

    def _let_go_one(self) -> bool:
        """Let the least recently mapped frame that no mapping shows go."""
        for key, slot in self._slots.items():
            if not slot.pins:
                self._drop(key)
                return True
        return False

    def _drop(self, key: tuple[int, int]) -> None:
        region, gfn = key
        del self._slots[key]
        home = self._regions[region]
        _reserve(XEN_PAGE_SIZE, home.base + gfn * XEN_PAGE_SIZE)  # the file's page goes
        home.slots -= 1
        if home.forgotten and not home.slots:
            self._release(region)

    def _release(self, region: int) -> None:
        home = self._regions.pop(region)
        if _libc.munmap(home.base, REGION_FRAMES * XEN_PAGE_SIZE) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{os.strerror(errno)}: releasing the frames of region {region}")

    def _unpin(self, region: int, gfns: Sequence[int]) -> None:
        home = self._regions[region]
        for gfn in gfns:
            slot = self._slots[(region, gfn)]
            slot.pins -= 1
            if home.forgotten and not slot.pins:
                self._drop((region, gfn))

    def forget(self, region: int) -> None:
        """The granter numbered `region` is gone: let its frames go, each at once or
        when the last mapping that shows it is unmapped."""
        home = self._regions.get(region)
        if home is None:
            return
        home.forgotten = True
        for key in [key for key, slot in self._slots.items() if key[0] == region]:
            if not self._slots[key].pins:
                self._drop(key)
        if region in self._regions and not home.slots:
            self._release(region)

    def regions(self) -> list[int]:
        """The granters (machine regions) whose frames the cache holds."""
        return list(self._regions)


@define(eq=False)
class CachedPages:
    """Granted frames shown from a `FrameCache`, in the listed order.

    The face of a `FrameMapping`: `page(index)` always, `view` when the frames
    lie side by side (consecutive gfns, in order); read-only views for a
    read-only mapping; `close` refuses with `MemoryInUse` while any view is
    alive (each view holds a reference to this mapping's own buffer object,
    which is how they are counted).
    """

    gfns: tuple[int, ...]
    writable: bool
    _cache: FrameCache = field(repr=False)
    _region: int
    _buffer: Any = field(repr=False)  # the region's pages, this mapping's own object
    side_by_side: bool = field(init=False)

    def __attrs_post_init__(self) -> None:
        first = self.gfns[0]
        self.side_by_side = self.gfns == tuple(range(first, first + len(self.gfns)))

    def _whole(self) -> memoryview:
        if self._buffer is None:
            raise ValueError("frame mapping is closed")
        whole = memoryview(self._buffer).cast("B")
        return whole if self.writable else whole.toreadonly()

    @property
    def view(self) -> memoryview:
        """All mapped frames as one view; only when they lie side by side."""
        if not self.side_by_side:
            raise ValueError(
                f"frames {list(self.gfns)} do not lie side by side: take them with page()"
            )
        start = self.gfns[0] * XEN_PAGE_SIZE
        return self._whole()[start : start + len(self.gfns) * XEN_PAGE_SIZE]

    def page(self, index: int) -> memoryview:
        """The frame at position `index` of `gfns` (not gfn `index`)."""
        if not 0 <= index < len(self.gfns):
            raise IndexError(f"page {index} outside a mapping of {len(self.gfns)} frames")
        start = self.gfns[index] * XEN_PAGE_SIZE
        return self._whole()[start : start + XEN_PAGE_SIZE]

    def pages(self) -> list[memoryview]:
        """Every frame's view, in order: `page(i)` for each i, made in one go."""
        whole = self._whole()
        return [whole[gfn * XEN_PAGE_SIZE : (gfn + 1) * XEN_PAGE_SIZE] for gfn in self.gfns]

    def close(self) -> None:
        """Let the cache's frames go; a second call does nothing."""
        if self._buffer is None:
            return
        if sys.getrefcount(self._buffer) > 2:  # ours, and the call's argument
            raise MemoryInUse("frame mapping still has memoryviews in use; release them first")
        self._buffer = None
        self._cache._unpin(self._region, self.gfns)

    def __enter__(self) -> CachedPages:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _reserve(length: int, address: int | None = None) -> int:
    """Inaccessible, unbacked address space: `length` bytes anywhere, or in place of
    what is mapped at `address`."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    if address is not None:
        flags |= _MAP_FIXED
    result = _libc_mmap(address, length, _PROT_NONE, flags, -1, 0)
    if result == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{os.strerror(errno)}: reserving {length} bytes of address space")
    return int(result)


@define(eq=False)
class PageAllocator:
    """The guest's allocator for the frames it owns, gfns first..end-1.

    Single frames come from a set (O(1) allocate and free); a bytearray of
    free flags checks frees and finds contiguous runs for multi-page rings.
    """

    first: int
    end: int
    _free: set[int] = field(init=False, repr=False)
    _is_free: bytearray = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.first <= self.end:
            raise ValueError(f"bad frame range first={self.first} end={self.end}")
        self._free = set(range(self.first, self.end))
        self._is_free = bytearray(b"\x01") * (self.end - self.first)

    @property
    def available(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfPages(f"all {self.end - self.first} frames are allocated")
        gfn = self._free.pop()
        self._is_free[gfn - self.first] = 0
        return gfn

    def allocate_run(self, count: int) -> int:
        """The first gfn of `count` consecutive free frames, lowest first."""
        if count < 1:
            raise ValueError(f"a run needs count >= 1, got {count}")
        offset = self._is_free.find(b"\x01" * count)
        if offset < 0:
            raise OutOfPages(
                f"no run of {count} consecutive free frames ({self.available} free in all)"
            )
        self._is_free[offset : offset + count] = bytes(count)
        first_gfn = self.first + offset
        self._free.difference_update(range(first_gfn, first_gfn + count))
        return first_gfn

    def claim_run(self, gfn: int, count: int) -> None:
        """Take frames gfn..gfn+count-1 (all free) out of the pool, as a balloon holds
        the frames that have no memory behind them; all or none."""
        _check_frames(gfn, count, self.first, self.end, "the allocator's range")
        offset = gfn - self.first
        if self._is_free.find(b"\x00", offset, offset + count) >= 0:
            raise OutOfPages(f"gfns {gfn}..{gfn + count - 1} are not all free")
        self._is_free[offset : offset + count] = bytes(count)
        self._free.difference_update(range(gfn, gfn + count))

    def free(self, gfn: int) -> None:
        self.free_run(gfn, 1)

    def free_run(self, gfn: int, count: int) -> None:
        """Free `count` frames from `gfn`; all or none, so a bad call changes nothing."""
        _check_frames(gfn, count, self.first, self.end, "the allocator's range")
        offset = gfn - self.first
        already_free = self._is_free.find(b"\x01", offset, offset + count)
        if already_free >= 0:
            raise DoubleFree(f"gfn {self.first + already_free} is already free")
        self._is_free[offset : offset + count] = b"\x01" * count
        self._free.update(range(gfn, gfn + count))


@frozen
class BootLayout:
    """Where the fixed frames sit that the hypervisor writes before a domain
    starts; the guest's allocator gets first_free_gfn..nr_pages-1."""

    nr_pages: int
    start_info_gfn: int
    shared_info_gfn: int
    grant_table_gfn: int
    nr_grant_frames: int
    store_gfn: int
    console_gfn: int
    first_free_gfn: int

    @classmethod
    def for_domain(cls, nr_pages: int, nr_grant_frames: int = 4) -> BootLayout:
        """start_info, shared_info, the grant table, the XenStore ring and the
        console ring, in that order from gfn 0."""
        if nr_grant_frames < 1:
            raise ValueError(f"a grant table needs at least one frame, got {nr_grant_frames}")
        grant_table_gfn = 2
        store_gfn = grant_table_gfn + nr_grant_frames
        console_gfn = store_gfn + 1
        first_free_gfn = console_gfn + 1
        if nr_pages <= first_free_gfn:
            raise MemoryTooSmall(
                f"{nr_pages} frames cannot hold {first_free_gfn} boot frames "
                f"({nr_grant_frames} for the grant table) and one frame for the guest"
            )
        return cls(
            nr_pages=nr_pages,
            start_info_gfn=0,
            shared_info_gfn=1,
            grant_table_gfn=grant_table_gfn,
            nr_grant_frames=nr_grant_frames,
            store_gfn=store_gfn,
            console_gfn=console_gfn,
            first_free_gfn=first_free_gfn,
        )

    @property
    def grant_table_gfns(self) -> range:
        return range(self.grant_table_gfn, self.grant_table_gfn + self.nr_grant_frames)
