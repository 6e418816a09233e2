"""Log-dirty mode (XEN_DOMCTL_shadow_op): which frames of a live domain changed
since Dom0 last asked, so pre-copy migration resends only those.

Xen write-protects the guest's page tables and marks a frame in its bitmap at
the first write fault, and marks frames written through grant maps when they
are unmapped. A xenlike domain's memory is a memfd that its own process, Dom0's
back ends (through grant maps, persistent ones included) and the hypervisor
(grant copies) all write through their own mappings, and none of those writes
faults anywhere the hypervisor could see: soft-dirty bits are never set for a
memfd mapping on this kernel, and userfaultfd write-protection lives in the
page tables of the one process that registered it (the guest's, which is
hostile and could switch it off). So a frame is dirty here when its content
differs from a reference copy the hypervisor keeps: every writer counts by
construction. The comparison is one memcmp per 64 frames, then halves of a
run that differs down to its frames (docs/migration.md, "How dirty pages are found",
has the figures).

The reference is what Dom0 was last told about a frame: its content when
log-dirty was enabled, when a CLEAN or PEEK found it changed, or when
`XENLIKE_DOMCTL_read_frames` returned it. A frame written and written back to
the same bytes between two looks is not dirty, which is all a migration
needs: what the destination holds is what the frame holds.
"""

import ctypes
import mmap
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary, WeakSet

import attrs

from xenlike.abi.domctl import (
    XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY,
    XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_OFF,
    XEN_DOMCTL_SHADOW_OP_PEEK,
    DomctlOp,
    xen_domctl,
    xen_domctl_shadow_op,
)
from xenlike.abi.errno import Errno
from xenlike.codec import compile_struct
from xenlike.hypercall import HYPERCALL_MAX_MESSAGE, HypercallError
from xenlike.hypervisor.control import _domctl, domctl
from xenlike.hypervisor.core import DomainState, HypervisorDomain
from xenlike.hypervisor.table import Call
from xenlike.memory import XEN_PAGE_SIZE

__all__ = [
    "CHUNK_FRAMES",
    "DirtyLog",
    "MAX_LOGDIRTY_PAGES",
    "bitmap_frames",
    "dirty_log",
    "note_read",
    "shadow_op",
]

SHADOW_OP = compile_struct(xen_domctl_shadow_op, "xen_domctl_shadow_op")
DOMCTL = compile_struct(xen_domctl, "xen_domctl")

CHUNK_FRAMES = 64
"""Frames compared with one memcmp before each is compared alone: a light writer
leaves most runs equal, and a run costs one call instead of 64."""

MAX_LOGDIRTY_PAGES = (HYPERCALL_MAX_MESSAGE - DOMCTL.size - 16) * 8
"""Frames whose bitmap fits in one reply after the xen_domctl (about 2 GiB)."""

_libc = ctypes.CDLL(None, use_errno=True)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int


@contextmanager
def _address(buffer: Any) -> Iterator[int]:
    """The address of a writable buffer, exported (so it stays mapped) while in use."""
    handle = ctypes.c_char.from_buffer(buffer)
    try:
        yield ctypes.addressof(handle)
    finally:
        del handle


def bitmap_frames(bitmap: bytes) -> list[int]:
    """The frames set in a Xen dirty bitmap (bit pfn % 8 of byte pfn // 8)."""
    return [
        index * 8 + bit
        for index, byte in enumerate(bitmap)
        if byte
        for bit in range(8)
        if byte >> bit & 1
    ]


@attrs.define(eq=False)
class DirtyLog:
    """One domain's log-dirty state: the reference copy and the frames found changed.

    Sans-I/O: it compares buffers it is handed (the domain's whole memory, or
    one frame's bytes), so tests drive it with bytearrays.
    """

    nr_pages: int
    reference: mmap.mmap = attrs.field(repr=False)
    dirty: bytearray = attrs.field(repr=False)  # Xen's bitmap: bit pfn % 8 of byte pfn // 8
    fault_count: int = 0  # times a look found a frame changed, since the last CLEAN

    @classmethod
    def start(cls, memory: Any) -> "DirtyLog":
        """Log-dirty from now on: the reference is `memory` as it is.

        The reference is private anonymous memory, so frames that hold only
        zeroes (ballooned out, never touched) cost nothing.
        """
        nr_pages = len(memory) // XEN_PAGE_SIZE
        log = cls(
            nr_pages,
            mmap.mmap(-1, nr_pages * XEN_PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
            bytearray((nr_pages + 7) // 8),
        )
        log.scan(memory, mark=False)
        return log

    @property
    def dirty_count(self) -> int:
        return int.from_bytes(self.dirty, "little").bit_count()

    @property
    def reference_bytes(self) -> int:
        """What the reference costs, at most: a page for each frame that held data."""
        return len(self.reference)

    def scan(self, memory: Any, *, mark: bool = True) -> None:
        """Compare every frame of `memory` with the reference; mark each that differs
        and take its content as the new reference (without marking, runs that
        differ are copied whole: the first look, which only fills the reference)."""
        if len(memory) != self.nr_pages * XEN_PAGE_SIZE:
            raise ValueError(f"{len(memory)} bytes of memory for {self.nr_pages} frames")
        with _address(memory) as current, _address(self.reference) as reference:
            for first in range(0, self.nr_pages, CHUNK_FRAMES):
                count = min(CHUNK_FRAMES, self.nr_pages - first)
                offset, size = first * XEN_PAGE_SIZE, count * XEN_PAGE_SIZE
                if not _memcmp(current + offset, reference + offset, size):
                    continue
                if mark:
                    self._bisect(current, reference, first, count)
                else:
                    ctypes.memmove(reference + offset, current + offset, size)

    def _bisect(self, current: int, reference: int, first: int, count: int) -> None:
        """Frames first.. first+count-1 differ somewhere: halve until each is found
        (a run with one written frame costs 12 memcmps, not 64)."""
        if count == 1:
            offset = first * XEN_PAGE_SIZE
            ctypes.memmove(reference + offset, current + offset, XEN_PAGE_SIZE)
            self._mark(first)
            return
        half = count // 2
        for start, length in ((first, half), (first + half, count - half)):
            offset = start * XEN_PAGE_SIZE
            if _memcmp(current + offset, reference + offset, length * XEN_PAGE_SIZE):
                self._bisect(current, reference, start, length)

    def note_read(self, pfn: int, page: bytes) -> None:
        """Dom0 read `page` as frame `pfn`'s content: it becomes the reference (so a
        later look compares with what Dom0 has), marked if it changed meanwhile."""
        offset = pfn * XEN_PAGE_SIZE
        if self.reference[offset : offset + XEN_PAGE_SIZE] != page:
            self.reference[offset : offset + XEN_PAGE_SIZE] = page
            self._mark(pfn)

    def _mark(self, pfn: int) -> None:
        self.dirty[pfn >> 3] |= 1 << (pfn & 7)
        self.fault_count += 1

    def bitmap(self, pages: int) -> bytes:
        """The first `pages` frames' bits (the rest of the last byte clear)."""
        pages = min(pages, self.nr_pages)
        out = bytearray(self.dirty[: (pages + 7) // 8])
        if pages % 8:
            out[-1] &= (1 << (pages % 8)) - 1
        return bytes(out)

    def clean(self) -> None:
        self.dirty[:] = bytes(len(self.dirty))
        self.fault_count = 0

    def close(self) -> None:
        self.reference.close()


_logs: "WeakKeyDictionary[HypervisorDomain, DirtyLog]" = WeakKeyDictionary()
_hooked: "WeakSet[Any]" = WeakSet()  # hypervisors that free a log when its domain goes


def dirty_log(domain: HypervisorDomain) -> DirtyLog | None:
    """The domain's log-dirty state; None while log-dirty is off."""
    return _logs.get(domain)


def note_read(domain: HypervisorDomain, pfn: int, page: bytes) -> None:
    """`XENLIKE_DOMCTL_read_frames` handed Dom0 `page` as frame `pfn`."""
    log = _logs.get(domain)
    if log is not None:
        log.note_read(pfn, page)


def _whole(domain: HypervisorDomain) -> memoryview:
    """Every frame of the domain, with the files its grants moved frames into taken in
    first (a frame written since it moved must be read from its file)."""
    if domain.frames is not None:
        domain.frames.drain()
    memory = domain.require_memory()
    return memory.frames(0, memory.nr_pages)


def _target(call: Call, arg: Any) -> HypervisorDomain:
    domain = _domctl(call, arg)
    if domain.privileged or domain is call.caller:
        raise HypercallError(Errno.EINVAL, f"log-dirty of {domain}: not for the control domain")
    if domain.torn_down or domain.state is DomainState.dying:
        raise HypercallError(Errno.EINVAL, f"{domain} is dying")
    return domain


def _enable(call: Call, domain: HypervisorDomain) -> None:
    if domain in _logs:
        raise HypercallError(Errno.EINVAL, f"log-dirty of {domain} is on already")
    if domain.memory is None:
        raise HypercallError(Errno.EINVAL, f"{domain} has no memory: it is not built")
    if domain.nr_pages > MAX_LOGDIRTY_PAGES:
        raise HypercallError(
            Errno.E2BIG,
            f"{domain} has {domain.nr_pages} frames; a log-dirty bitmap covers"
            f" {MAX_LOGDIRTY_PAGES}",
        )
    if call.hv not in _hooked:
        call.hv.on_domain_exit.append(lambda gone: _off(call.hv, gone))
        _hooked.add(call.hv)
    with _whole(domain) as memory:
        _logs[domain] = DirtyLog.start(memory)
    call.hv.log(domain, f"log-dirty on: {domain.nr_pages} frames")


def _off(hv: Any, domain: HypervisorDomain) -> None:
    log = _logs.pop(domain, None)
    if log is not None:
        size = log.reference_bytes
        log.close()
        hv.log(domain, f"log-dirty off: {size >> 10} KiB of reference released")


@domctl(DomctlOp.shadow_op)
def shadow_op(call: Call, arg: Any) -> tuple[int, bytes] | int:
    """OFF, ENABLE_LOGDIRTY (or ENABLE with ENABLE_LOG_DIRTY), CLEAN and PEEK.

    CLEAN and PEEK answer the xen_domctl with `pages` set to the frames the
    bitmap covers (at most the domain's) and the stats, then the bitmap
    itself unless `dirty_bitmap` is a null handle. CLEAN then clears the
    bitmap and the stats, as Xen's paging_log_dirty_op does.
    """
    domain = _target(call, arg)
    request = SHADOW_OP.unpack(arg.u[: SHADOW_OP.size])
    op = request.op
    if op == XEN_DOMCTL_SHADOW_OP_OFF:
        _off(call.hv, domain)
        return 0
    if op == XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY or (
        op == XEN_DOMCTL_SHADOW_OP_ENABLE and request.mode == XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY
    ):
        _enable(call, domain)
        return 0
    if op not in (XEN_DOMCTL_SHADOW_OP_CLEAN, XEN_DOMCTL_SHADOW_OP_PEEK):
        raise HypercallError(
            Errno.EINVAL, f"shadow_op {op} mode {request.mode:#x}: not supported here"
        )
    if request.mode & ~XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL:
        raise HypercallError(Errno.EINVAL, f"shadow_op mode {request.mode:#x}")
    log = _logs.get(domain)
    if log is None:
        raise HypercallError(Errno.EINVAL, f"log-dirty of {domain} is off")
    with _whole(domain) as memory:
        log.scan(memory)
    pages = min(request.pages, log.nr_pages)
    stats = request.stats._replace(fault_count=log.fault_count, dirty_count=log.dirty_count)
    bitmap = log.bitmap(pages) if request.dirty_bitmap else b""
    if op == XEN_DOMCTL_SHADOW_OP_CLEAN:
        log.clean()
    answer = request._replace(pages=pages, stats=stats)
    head = arg._replace(u=SHADOW_OP.pack(answer).ljust(len(arg.u), b"\0"))
    return 0, DOMCTL.pack(head) + bitmap
