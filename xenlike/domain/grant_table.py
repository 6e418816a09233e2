"""The domain's grant table: grant access to our frames, map and copy others' grants.

Granting is a local write into this domain's own table frames
(BootLayout.grant_table_gfns), in Xen's order: domid and frame, a write
barrier, then the flags that make the entry live. Ending access is Linux's
gnttab_end_foreign_access_ref: a compare-and-swap of the flags to 0, which
fails while the hypervisor has GTF_reading/GTF_writing set because a peer
still has the page mapped. It raises `GrantInUse` where Linux returns 0:
a caller cannot then forget that the peer can still reach the page.

A frame is moved into a file of its own the first time it is granted
(`xenlike.frames`): copied into a sealed one-page memfd that is mapped over
its place in our memory, and sent to the hypervisor up the frame channel
before the grant entry goes live, so a peer that maps the grant gets that
page and nothing else of ours. When the last grant of a frame to a domain
other than Dom0 ends, the frame moves to a fresh file, so a hostile mapper
that kept its file holds only the past.

Mapping a peer's grants is one batched GNTTABOP_map_grant_ref (in chunks of
what one reply's descriptors carry). Each element of the reply brings the
granted frame's own file, read-only for a read-only map; the files are
mapped side by side (`xenlike.memory.map_pages`) and closed at once, so
after unmap we hold nothing that reaches the peer's pages. A privileged
domain (Dom0) is the exception, as Xen's privcmd is: it keeps the files it
was handed mapped (`xenlike.memory.FrameCache`), so a block request mapped
and unmapped per request costs no mmap, munmap or page fault per page; its
drivers still see exactly the granted pages with the granted rights, and
their views still die at unmap.

Every batched operation raises `GrantStatusError` naming each element that
failed with its GNTST_* status; a failed map undoes the elements that did
succeed first. Hypercalls that change grant state are shielded from
cancellation, so the hypervisor's view and ours never part.
"""

import ctypes
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import trio

from xenlike._atomic import cmpxchg16
from xenlike.abi.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
    SHGNT_PER_PAGE_V1,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GntStatus,
    GnttabOp,
    GNTTABOP_error_msgs,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    gnttab_copy,
    gnttab_map_grant_ref,
    gnttab_query_size,
    gnttab_setup_table,
    gnttab_unmap_grant_ref,
    grant_entry_v1,
)
from xenlike.abi.xen import DOMID_FIRST_RESERVED, DOMID_SELF, SIF_PRIVILEGED, Hypercall, start_info
from xenlike.codec import compile_struct
from xenlike.domain.hypercall import HypercallClient
from xenlike.frames import frame_file, send_frames
from xenlike.hypercall import MAX_FDS
from xenlike.memory import (
    BadFrame,
    BootLayout,
    CachedPages,
    DomainMemory,
    FrameCache,
    FrameMapping,
    map_pages,
    punch,
    split_machine_address,
)
from xenlike.ring import wmb

__all__ = [
    "GrantCopy",
    "GrantError",
    "GrantInUse",
    "GrantMapping",
    "GrantRef",
    "GrantStatusError",
    "GrantTable",
    "LocalFrame",
    "NoFreeGrantRefs",
]

GNTTAB_OP = Hypercall.grant_table_op
ENTRY_SIZE = grant_entry_v1.sizeof()
COPY = compile_struct(gnttab_copy, "gnttab_copy")
QUERY_SIZE = compile_struct(gnttab_query_size, "gnttab_query_size")
SETUP = compile_struct(gnttab_setup_table, "gnttab_setup_table")
START_INFO = compile_struct(start_info, "start_info")
_MAP = compile_struct(gnttab_map_grant_ref, "gnttab_map_grant_ref").format
_UNMAP = compile_struct(gnttab_unmap_grant_ref, "gnttab_unmap_grant_ref").format
_COPY_PTR = COPY.record().source


class GrantError(Exception):
    """Base of the grant table's errors."""


class NoFreeGrantRefs(GrantError):
    """Every grant reference is in use: end access to some first."""


class GrantInUse(GrantError):
    """end_access refused: the peer still has the grant mapped (GTF_reading/GTF_writing)."""

    def __init__(self, ref: int, domid: int, flags: int) -> None:
        bits = "|".join(
            name
            for bit, name in ((GTF_reading, "GTF_reading"), (GTF_writing, "GTF_writing"))
            if flags & bit
        )
        super().__init__(
            f"grant ref {ref} is still in use by d{domid} ({bits} set): it must "
            f"unmap it before access can end"
        )
        self.ref, self.domid, self.flags = ref, domid, flags


class GrantStatusError(GrantError):
    """Elements of a batched grant operation failed.

    `statuses` holds every element's GNTST_* status, in order: the elements
    that report GNTST_okay did happen (except in a map, which undoes them).
    """

    def __init__(self, op: str, labels: Sequence[str], statuses: Sequence[int]) -> None:
        failed = [
            f"{label}: {_status_text(status)}"
            for label, status in zip(labels, statuses, strict=True)
            if status != GntStatus.okay
        ]
        super().__init__(f"{op}: {len(failed)} of {len(statuses)} failed: " + "; ".join(failed))
        self.op, self.statuses = op, list(statuses)


def _status_text(status: int) -> str:
    """ "GNTST_bad_gntref (invalid grant reference)", as Xen's GNTTABOP_error_msgs say it."""
    try:
        return f"GNTST_{GntStatus(status).name} ({GNTTABOP_error_msgs[-status]})"
    except (ValueError, IndexError):
        return f"GNTST {status} (unknown status)"


@attrs.define(eq=False)
class GrantMapping:
    """Pages of a peer's grants, mapped side by side in the order of `refs`.

    `frames` are the granted gfns in the granter's memory. A read-only
    mapping gives read-only views. Release every view before `unmap`.
    """

    domid: int
    refs: tuple[int, ...]
    handles: tuple[int, ...]
    frames: tuple[int, ...]
    readonly: bool
    _pages: FrameMapping | CachedPages | None

    @property
    def unmapped(self) -> bool:
        return self._pages is None

    @property
    def side_by_side(self) -> bool:
        """Whether `view` can show all pages at once (always, unless mapped with
        side_by_side=False from Dom0's frame cache over scattered frames)."""
        return self._mapped().side_by_side

    @property
    def view(self) -> memoryview:
        """All pages as one view, len(refs) * 4096 bytes (ValueError if not side by side)."""
        return self._mapped().view

    def page(self, index: int) -> memoryview:
        """The page of refs[index]."""
        return self._mapped().page(index)

    def pages(self) -> list[memoryview]:
        """The page of each ref, in order (cheaper than page() for each)."""
        return self._mapped().pages()

    def _mapped(self) -> FrameMapping | CachedPages:
        if self._pages is None:
            raise ValueError(f"the mapping of d{self.domid} refs {list(self.refs)} is unmapped")
        return self._pages


@attrs.frozen
class GrantRef:
    """One side of a grant copy: `offset` bytes into the page `domid` granted as `ref`."""

    domid: int
    ref: int
    offset: int = 0


@attrs.frozen
class LocalFrame:
    """One side of a grant copy: `offset` bytes into our own frame `gfn`."""

    gfn: int
    offset: int = 0


@attrs.frozen
class GrantCopy:
    """One GNTTABOP_copy element: `length` bytes, within one page on each side."""

    source: GrantRef | LocalFrame
    dest: GrantRef | LocalFrame
    length: int

    def record(self) -> Any:
        """This element as Xen's struct gnttab_copy."""
        flags = (GNTCOPY_source_gref if isinstance(self.source, GrantRef) else 0) | (
            GNTCOPY_dest_gref if isinstance(self.dest, GrantRef) else 0
        )
        return COPY.record(
            source=_copy_ptr(self.source), dest=_copy_ptr(self.dest), len=self.length, flags=flags
        )


def _copy_ptr(side: GrantRef | LocalFrame) -> Any:
    if isinstance(side, GrantRef):
        return _COPY_PTR._replace(u=side.ref, domid=side.domid, offset=side.offset)
    return _COPY_PTR._replace(u=side.gfn, domid=DOMID_SELF, offset=side.offset)


class GrantTable:
    """This domain's grant table, and its mappings of other domains' grants."""

    def __init__(
        self,
        memory: DomainMemory,
        layout: BootLayout,
        hypercalls: HypercallClient,
        frames: socket.socket,
        name: str = "xenlike-dom",
    ) -> None:
        self._hypercalls = hypercalls
        self._memory = memory
        self._frames = frames  # our end of the frame channel
        self._name = name
        self._nr_pages = memory.nr_pages
        self.nr_frames = layout.nr_grant_frames
        self.nr_entries = layout.nr_grant_frames * SHGNT_PER_PAGE_V1
        # Held for the domain's life: the atomics use the table's address.
        self._shared = memory.frames(layout.grant_table_gfn, layout.nr_grant_frames)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._shared))
        self._u16 = self._shared.cast("H")  # entry i: flags at 4i, domid at 4i+1
        self._u32 = self._shared.cast("I")  # entry i: frame at 2i+1
        # Lowest ref first; the reserved refs belong to the toolstack.
        self._free = list(range(self.nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self._granted: dict[int, int] = {}  # ref -> the frame it grants
        self._grants_of: dict[int, int] = {}  # a frame with a file of its own -> its live grants
        self._exposed: set[int] = set()  # frames granted to a domain other than Dom0 since moved
        with memory.frame(layout.start_info_gfn) as page:
            flags = START_INFO.unpack(bytes(page[: START_INFO.size])).flags
        # A privileged domain may map any guest's memory (privcmd): it keeps what it maps.
        self._cache = FrameCache() if flags & SIF_PRIVILEGED else None
        self._regions: dict[int, int] = {}  # granter -> its machine region, for the cache

    # --- granting (local) ---------------------------------------------------

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        """Let `domid` map or copy our frame `gfn`; returns the grant reference."""
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise ValueError(f"domid {domid} names no domain that could be granted access")
        if not 0 <= gfn < self._nr_pages:
            raise BadFrame(
                f"gfn {gfn} is outside this domain's memory (gfns 0..{self._nr_pages - 1})"
            )
        if not self._free:
            raise NoFreeGrantRefs(
                f"all {self.nr_entries - GNTTAB_NR_RESERVED_ENTRIES} grant "
                f"references are in use; end access to some first"
            )
        if gfn not in self._grants_of:
            self._move(gfn)
            self._grants_of[gfn] = 0
        ref = self._free.pop()
        self._grants_of[gfn] += 1
        if domid != 0:
            self._exposed.add(gfn)
        self._u16[4 * ref + 1] = domid
        self._u32[2 * ref + 1] = gfn
        wmb()  # the peer must never see the flags before domid and frame
        self._u16[4 * ref] = GTF_permit_access | (GTF_readonly if readonly else 0)
        self._granted[ref] = gfn
        return ref

    def granted_frame(self, ref: int) -> int:
        """The frame a live grant of ours names: what a front end records across a
        save, as grant references do not survive a restore."""
        try:
            return self._granted[ref]
        except KeyError:
            raise ValueError(f"grant ref {ref} is not one this table granted") from None

    def end_access(self, ref: int) -> None:
        """Revoke a grant and free its reference; `GrantInUse` while the peer has it mapped.

        After GrantInUse nothing changed: the grant stands, and a later call
        (once the peer unmapped) ends it.
        """
        if ref not in self._granted:
            raise ValueError(f"grant ref {ref} is not one this table granted")
        flags = self._u16[4 * ref]
        while True:
            if flags & (GTF_reading | GTF_writing):
                raise GrantInUse(ref, self._u16[4 * ref + 1], flags)
            seen = cmpxchg16(self._address, ref * ENTRY_SIZE, flags, 0)
            if seen == flags:
                break
            flags = seen  # the hypervisor changed the bits under us: look again
        gfn = self._granted.pop(ref)
        self._free.append(ref)
        self._grants_of[gfn] -= 1
        if not self._grants_of[gfn] and gfn in self._exposed:
            self._exposed.discard(gfn)
            self._move(gfn)  # what the last mapper may have kept is a copy of the past

    def _move(self, gfn: int) -> None:
        """Give frame `gfn` a file of its own, ours and the hypervisor's, before anyone
        can map it; its old page goes back to the host."""
        with self._memory.frame(gfn) as page:
            fd = frame_file(f"{self._name}-gfn-{gfn:#x}", page)
        try:
            first = gfn not in self._grants_of
            self._memory.back_frame(gfn, fd)
            if first:
                punch(self._memory.fd, gfn, 1)
            send_frames(self._frames, [(gfn, fd)])
        finally:
            os.close(fd)

    # --- mapping others' grants ----------------------------------------------

    async def map(
        self, domid: int, refs: Iterable[int], readonly: bool = False, *, side_by_side: bool = True
    ) -> GrantMapping:
        """Map the pages `domid` granted us as `refs`, with batched hypercalls.

        With side_by_side=False the caller takes the pages one by one
        (`GrantMapping.page`), and Dom0 serves scattered frames from its frame
        cache as well; `view` then only works if they happen to lie side by side.
        """
        refs = tuple(refs)
        if not refs:
            raise ValueError("map needs at least one grant reference")
        flags = GNTMAP_host_map | (GNTMAP_readonly if readonly else 0)
        handles: list[int] = []
        frames: list[int] = []
        regions: set[int] = set()
        files: list[int] = []
        with trio.CancelScope(shield=True):
            try:
                for start in range(0, len(refs), MAX_FDS):
                    chunk = refs[start : start + MAX_FDS]
                    outs, fds = await self._batch(
                        GnttabOp.map_grant_ref,
                        _MAP,
                        [_MAP.pack(0, flags, ref, domid, 0, 0, 0) for ref in chunk],
                    )
                    files.extend(fds)
                    # (host_addr, flags, ref, dom, status, handle, dev_bus_addr)
                    handles.extend(out[5] for out in outs if out[4] == GntStatus.okay)
                    if len(handles) < start + len(chunk):
                        raise GrantStatusError(
                            "GNTTABOP_map_grant_ref",
                            [f"d{domid} ref {ref}" for ref in chunk],
                            [out[4] for out in outs],
                        )
                    for out in outs:
                        region, frame = split_machine_address(out[6])
                        regions.add(region)
                        frames.append(frame)
                if len(files) != len(refs):
                    raise GrantError(
                        f"the hypervisor sent {len(files)} frame files for {len(refs)} grants"
                    )
                pages = self._from_cache(
                    domid, regions, frames, files, readonly, side_by_side
                ) or map_pages(files, frames, writable=not readonly)
            except BaseException:
                if handles:
                    await self._unmap_handles(handles)
                raise
            finally:
                for fd in files:
                    os.close(fd)
        return GrantMapping(domid, refs, tuple(handles), tuple(frames), readonly, pages)

    def _from_cache(
        self,
        domid: int,
        regions: set[int],
        frames: list[int],
        files: list[int],
        readonly: bool,
        side_by_side: bool,
    ) -> CachedPages | None:
        """The pages from Dom0's frame cache; None where it does not serve them."""
        if self._cache is None or len(regions) != 1:
            return None
        if side_by_side and frames != list(range(frames[0], frames[0] + len(frames))):
            return None
        (region,) = regions
        known = self._regions.get(domid)
        if known != region:
            if known is not None:
                self._cache.forget(known)  # the domid names a new domain now
            self._regions[domid] = region
        return self._cache.map(region, frames, files, writable=not readonly)

    def forget(self, domid: int) -> None:
        """Domain `domid` is gone: Dom0's frame cache lets its frames go (each at once,
        or when the last mapping that shows it is unmapped)."""
        region = self._regions.pop(domid, None)
        if region is not None and self._cache is not None:
            self._cache.forget(region)

    async def unmap(self, mapping: GrantMapping) -> None:
        """Unmap our pages, then tell the hypervisor (one batched hypercall).

        Raises MemoryInUse, and changes nothing, while views of the mapping
        are alive.
        """
        mapping._mapped().close()
        mapping._pages = None
        with trio.CancelScope(shield=True):
            await self._unmap_handles(mapping.handles)

    async def _unmap_handles(self, handles: Sequence[int]) -> None:
        outs, _ = await self._batch(
            GnttabOp.unmap_grant_ref, _UNMAP, [_UNMAP.pack(0, 0, handle, 0) for handle in handles]
        )
        statuses = [status for _, _, _, status in outs]  # (host_addr, dev_bus_addr, handle, -)
        if any(statuses):
            raise GrantStatusError(
                "GNTTABOP_unmap_grant_ref", [f"handle {h}" for h in handles], statuses
            )

    async def _batch(
        self, cmd: int, layout: struct.Struct, elements: list[bytes]
    ) -> tuple[list[tuple[Any, ...]], tuple[int, ...]]:
        """A batched map or unmap as plain tuples in the layout's field order: each
        of a 1 MiB block request's 257 elements is packed and decoded in one go,
        no record made (`HypercallClient.call_batch` is the general way)."""
        done = await self._hypercalls.call(GNTTAB_OP, cmd, b"".join(elements), len(elements))
        count = min(len(elements), len(done.payload) // layout.size)
        return list(layout.iter_unpack(done.payload[: count * layout.size])), done.fds

    # --- copying ---------------------------------------------------------------

    async def copy(self, ops: Sequence[GrantCopy]) -> None:
        """GNTTABOP_copy: the hypervisor copies each element, checking the grants."""
        if not ops:
            return
        _, outs, _ = await self._hypercalls.call_batch(
            GNTTAB_OP, GnttabOp.copy, gnttab_copy, [op.record() for op in ops]
        )
        statuses = [out.status for out in outs]
        if any(statuses):
            raise GrantStatusError(
                "GNTTABOP_copy",
                [f"copy {i} ({op.length} bytes)" for i, op in enumerate(ops)],
                statuses,
            )

    # --- the table's frames -------------------------------------------------------

    async def query_size(self, domid: int = DOMID_SELF) -> tuple[int, int]:
        """(nr_frames, max_nr_frames) of a grant table: ours, or any for Dom0."""
        _, out, _ = await self._hypercalls.call_struct(
            GNTTAB_OP, GnttabOp.query_size, gnttab_query_size, QUERY_SIZE.record(dom=domid)
        )
        if out.status:
            raise GrantStatusError("GNTTABOP_query_size", [f"d{domid}"], [out.status])
        return out.nr_frames, out.max_nr_frames

    async def setup_table(self, nr_frames: int | None = None, domid: int = DOMID_SELF) -> list[int]:
        """The gfns of the first `nr_frames` frames of a grant table (all of ours by default)."""
        count = self.nr_frames if nr_frames is None else nr_frames
        arg = SETUP.record(dom=domid, nr_frames=count)
        done = await self._hypercalls.call(GNTTAB_OP, GnttabOp.setup_table, SETUP.pack(arg), 1)
        out = SETUP.unpack_from(done.payload, 0)
        if out.status:
            raise GrantStatusError("GNTTABOP_setup_table", [f"d{domid}"], [out.status])
        return list(struct.unpack_from(f"<{count}Q", done.payload, SETUP.size))
