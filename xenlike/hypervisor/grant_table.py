"""Grant tables (GNTTABOP_*): v1 entries in the granter's memory, checked on every map.

A domain's grant table is `nr_grant_frames` frames of its own memory
(BootLayout.grant_table_gfns) holding grant_entry_v1 records, which the
domain writes itself to grant access. The hypervisor reads an entry only
when a peer maps or copies through it, and then works as Xen's
common/grant_table.c does: the first pin checks the entry (type
GTF_permit_access, domid the mapper, GTF_readonly against a writable pin),
sets GTF_reading/GTF_writing with a compare-and-swap on the entry's
flags+domid word and records the frame in the active entry; further pins
only count. The last unpin clears the bits, so the granter can end access.
Each map gets a handle in the mapper's maptrack.

A mapping is the mapper's own mmap of the granted frame's own file
(`xenlike.frames`): each element of the reply carries that one file,
reopened read-only for a read-only map, so the mapper reaches the granted
page and no other, with the granted rights. A frame the granter never moved
into a file of its own cannot be mapped (GNTST_bad_page). Each element's
dev_bus_addr is the granted frame's machine address
(`xenlike.memory.machine_address`), which names the granter's memory as
well as the frame. Mappings outlive their granter until they are unmapped,
as Xen keeps a dying domain's pages while they are mapped.

Every element of a batch is checked on its own and gets its own GNTST_*
status; the hypercall returns 0 unless the call itself is malformed. An
element that fails leaves no trace: checks come before the pin, and a pin
that fails undoes its own bits. Failures are logged with the reason, as
Xen's gdprintk does.
"""

import ctypes
import itertools
import struct
from typing import Any

import attrs

from xenlike._atomic import cmpxchg32, fetch_and16
from xenlike.abi.grant_table import (
    SHGNT_PER_PAGE_V1,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GntStatus,
    GnttabOp,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_sub_page,
    GTF_type_mask,
    GTF_writing,
    gnttab_copy,
    gnttab_map_grant_ref,
    gnttab_query_size,
    gnttab_setup_table,
    gnttab_unmap_grant_ref,
    grant_entry_v1,
)
from xenlike.abi.xen import DOMID_SELF, Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import MAX_FDS
from xenlike.hypervisor.table import Call, hypercall
from xenlike.memory import XEN_PAGE_SIZE, DomainMemory, machine_address

__all__ = [
    "ActiveGrant",
    "HypervisorGrantTable",
    "Mapping",
    "Maptrack",
    "attach",
    "release_connection",
    "teardown",
]

GNTTAB_OP = Hypercall.grant_table_op
MAX_BATCH = 1024  # elements per call: 1024 gnttab_copy structs (40 KiB) fit one message
MAPTRACK_LIMIT = 1024 * 256  # Xen's default: gnttab_max_maptrack_frames x MAPTRACK_PER_PAGE
PIN_LIMIT = 0x80  # Xen keeps 8-bit pin counts and refuses a pin once one reaches bit 7
ENTRY_SIZE = grant_entry_v1.sizeof()
SETUP = compile_struct(gnttab_setup_table, "gnttab_setup_table")
_MAP_OUT = compile_struct(gnttab_map_grant_ref, "gnttab_map_grant_ref").format.pack
_UNMAP_OUT = compile_struct(gnttab_unmap_grant_ref, "gnttab_unmap_grant_ref").format.pack
_regions = itertools.count(1)  # machine address regions, one per built domain; 0 is none


@attrs.define(eq=False)
class ActiveGrant:
    """Xen's active_grant_entry: the frame a pinned grant gave, and its pins."""

    domid: int  # the domain it is pinned for
    frame: int  # the granted gfn, read once, by the first pin
    readers: int = 0  # read-only pins, maps and copies (Xen's GNTPIN_hstr)
    writers: int = 0  # writable pins (GNTPIN_hstw)


@attrs.define(eq=False)
class HypervisorGrantTable:
    """A granter's table as the hypervisor sees it (Xen's struct grant_table).

    `words` views the table frames as u32s: entry `ref` is word 2*ref (flags
    in the low half, domid in the high half, as Xen's union grant_combo) and
    word 2*ref+1 (frame). The views are held while the domain lives and
    released when it is torn down, so its memory can be unmapped; the active
    entries outlive it for the mappers that have yet to unmap.
    """

    domain: Any
    region: int
    gfns: range
    shared: memoryview | None
    words: memoryview | None
    address: int  # of the table's first byte, for the atomics
    active: dict[int, ActiveGrant] = attrs.field(factory=dict)

    @property
    def nr_entries(self) -> int:
        return len(self.gfns) * SHGNT_PER_PAGE_V1

    @property
    def live(self) -> bool:
        return self.shared is not None

    @property
    def memory(self) -> DomainMemory:
        return self.domain.memory


@attrs.define(eq=False)
class Mapping:
    """A maptrack entry (Xen's struct grant_mapping)."""

    table: HypervisorGrantTable
    ref: int
    flags: int  # GNTMAP_*
    connection: Any  # the socket it was made over: a Dom0 tool's mappings end with it


@attrs.define(eq=False)
class Maptrack:
    """A mapper's handles."""

    entries: dict[int, Mapping] = attrs.field(factory=dict)
    free: list[int] = attrs.field(factory=list)
    next_handle: int = 0

    def has_room(self) -> bool:
        return bool(self.free) or self.next_handle < MAPTRACK_LIMIT

    def add(self, mapping: Mapping) -> int:
        if self.free:
            handle = self.free.pop()
        else:
            handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.entries[handle] = mapping
        return handle

    def release(self, handle: int) -> None:
        """Forget the mapping and unpin its grant."""
        mapping = self.entries.pop(handle)
        self.free.append(handle)
        _unpin(mapping.table, mapping.ref, readonly=bool(mapping.flags & GNTMAP_readonly))


class _Fail(Exception):
    """Xen's PIN_FAIL: this element fails with `status`, and the log says why."""

    def __init__(self, status: GntStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def attach(hv: Any, domain: Any) -> None:
    """Give a freshly built domain its table: the grant frames of its memory."""
    layout = domain.layout
    shared = domain.memory.frames(layout.grant_table_gfn, layout.nr_grant_frames)
    address = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    domain.grant_table = HypervisorGrantTable(
        domain, next(_regions), layout.grant_table_gfns, shared, shared.cast("I"), address
    )


def _maptrack(domain: Any) -> Maptrack:
    """Any domain may map, built or not (Dom0's tools have no memory of their own)."""
    maptrack: Maptrack = domain.maptrack
    return maptrack


def teardown(hv: Any, domain: Any) -> None:
    """Unmap everything the domain mapped; let go of its own table's memory.

    Mappers of its grants keep their mappings until they unmap.
    """
    maptrack = domain.maptrack
    for handle in list(maptrack.entries):
        maptrack.release(handle)
    table = domain.grant_table
    if table is None or not table.live:
        return
    table.words.release()
    table.shared.release()
    table.words = table.shared = None


def release_connection(hv: Any, conn: Any) -> None:
    """A Dom0 tool's socket closed: its mappings go, as gntdev's do when closed."""
    maptrack = conn.domain.maptrack
    for handle, mapping in list(maptrack.entries.items()):
        if mapping.connection is conn:
            maptrack.release(handle)


# --- pinning --------------------------------------------------------------


def _set_status(
    table: HypervisorGrantTable, ref: int, ldomid: int, readonly: bool, pinned: bool, mapflag: bool
) -> None:
    """Xen's _set_status_v1: check the entry and set the in-use bits, atomically.

    Flags and domid are swapped as one word, so the check and the bits hold
    for the same entry. A guest rewriting its entry under us gets five tries.
    """
    assert table.words is not None
    mask = GTF_type_mask | (GTF_sub_page if mapflag else 0)
    word = table.words[2 * ref]
    for _ in range(5):
        flags, domid = word & 0xFFFF, word >> 16
        if not pinned and ((flags & mask) != GTF_permit_access or domid != ldomid):
            raise _Fail(
                GntStatus.general_error,
                f"bad flags ({flags:#x}) or dom ({domid}); expected d{ldomid}",
            )
        new = flags | GTF_reading
        if not readonly:
            if flags & GTF_readonly:
                raise _Fail(GntStatus.general_error, "attempt to write-pin a r/o grant entry")
            new |= GTF_writing
        seen = cmpxchg32(table.address, ref * ENTRY_SIZE, word, (word & 0xFFFF0000) | new)
        if seen == word:
            return
        word = seen
    raise _Fail(GntStatus.general_error, "shared grant entry is unstable")


def _pin(
    table: HypervisorGrantTable, ref: int, ldomid: int, readonly: bool, mapflag: bool
) -> ActiveGrant:
    """Take a read-only or writable pin on `ref` for `ldomid`; a failure changes nothing."""
    if not 0 <= ref < table.nr_entries:
        raise _Fail(GntStatus.bad_gntref, f"bad ref {ref:#x} for d{table.domain.domid}")
    act = table.active.get(ref)
    if act is not None and (
        act.domid != ldomid or act.readers >= PIN_LIMIT or act.writers >= PIN_LIMIT
    ):
        raise _Fail(
            GntStatus.general_error,
            f"pinned for d{act.domid}, {act.readers} read and "
            f"{act.writers} write pins: none for d{ldomid}",
        )
    if act is None or (not readonly and not act.writers):
        _set_status(table, ref, ldomid, readonly, act is not None, mapflag)
        if act is None:
            assert table.words is not None
            frame = table.words[2 * ref + 1]
            if frame >= table.memory.nr_pages:
                _clear(table, ref, GTF_reading | (0 if readonly else GTF_writing))
                raise _Fail(
                    GntStatus.bad_page,
                    f"frame {frame:#x} is beyond the granter's {table.memory.nr_pages} frames",
                )
            act = table.active[ref] = ActiveGrant(ldomid, frame)
    if readonly:
        act.readers += 1
    else:
        act.writers += 1
    return act


def _unpin(table: HypervisorGrantTable, ref: int, readonly: bool) -> None:
    """Drop a pin; the last writer clears GTF_writing, the last pin GTF_reading."""
    act = table.active[ref]
    clear = 0
    if readonly:
        act.readers -= 1
    else:
        act.writers -= 1
        if not act.writers:
            clear |= GTF_writing
    if not act.readers and not act.writers:
        clear |= GTF_reading
        del table.active[ref]
    _clear(table, ref, clear)


def _clear(table: HypervisorGrantTable, ref: int, bits: int) -> None:
    """Xen's gnttab_clear_flags, on a table whose memory is still there."""
    if bits and table.live:
        fetch_and16(table.address, ref * ENTRY_SIZE, ~bits & 0xFFFF)


def _granter(call: Call, domid: int) -> HypervisorGrantTable:
    """A live table of domain `domid` (by id only: DOMID_SELF names no granter)."""
    domain = call.hv.domains.get(domid)
    if domain is None:
        raise _Fail(GntStatus.bad_domain, f"could not find domain {domid}")
    return _live_table(domain)


def _frame_file(table: HypervisorGrantTable, frame: int, readonly: bool, taken: set[int]) -> int:
    """The granted frame's own file, with the files the granter sent so far taken in."""
    _take_frames(table.domain, taken)
    frames = table.domain.frames
    fd = frames.file(frame, readonly) if frames is not None else None
    if fd is None:
        raise _Fail(
            GntStatus.bad_page,
            f"frame {frame:#x} of d{table.domain.domid} has no file "
            f"of its own: its granter never shared it",
        )
    return fd


def _take_frames(domain: Any, taken: set[int]) -> None:
    """Before the hypervisor uses a domain's frames: the files it sent so far, read
    once per hypercall (`taken` holds the domids already read)."""
    if domain.domid not in taken:
        taken.add(domain.domid)
        if domain.frames is not None:
            domain.frames.drain()


def _live_table(domain: Any) -> HypervisorGrantTable:
    table = domain.grant_table
    if table is None or not table.live:
        raise _Fail(
            GntStatus.bad_domain, f"d{domain.domid} has no grant table: not built, or torn down"
        )
    return table


def _any_domain(call: Call, domid: int) -> Any:
    """Xen's rcu_lock_domain_by_any_id plus XSM_TARGET: oneself, or anyone for Dom0."""
    domain = call.caller if domid == DOMID_SELF else call.hv.domains.get(domid)
    if domain is None:
        raise _Fail(GntStatus.bad_domain, f"could not find domain {domid}")
    if domain is not call.caller and not call.caller.privileged:
        raise _Fail(GntStatus.permission_denied, f"d{call.caller.domid} may not act for d{domid}")
    return domain


def _refused(call: Call, what: str, fail: _Fail) -> GntStatus:
    call.hv.log_refusal(call.caller, f"{what}: {fail}")
    return fail.status


# --- hypercalls -----------------------------------------------------------


@hypercall(GNTTAB_OP, GnttabOp.map_grant_ref, args=gnttab_map_grant_ref, batch=MAX_BATCH)
def map_grant_ref(call: Call, ops: list[Any]) -> tuple[int, bytes]:
    """Each element goes back packed as it is made (a 1 MiB block request without
    persistent grants maps 257 of them, twice as fast as through records)."""
    maptrack = _maptrack(call.caller)
    taken: set[int] = set()
    outs = []
    for op in ops:
        try:
            handle, address = _map_one(call, maptrack, op, taken)
            status = GntStatus.okay
        except _Fail as fail:
            status = _refused(call, f"map of d{op.dom} ref {op.ref}", fail)
            handle, address = op.handle, op.dev_bus_addr
        outs.append(_MAP_OUT(op.host_addr, op.flags, op.ref, op.dom, status, handle, address))
    return 0, b"".join(outs)


def _map_one(call: Call, maptrack: Maptrack, op: Any, taken: set[int]) -> tuple[int, int]:
    """One element: the pin, then the frame's own file goes with the reply; returns
    the handle and the frame's machine address."""
    if not op.flags & GNTMAP_host_map:
        raise _Fail(GntStatus.bad_gntref, f"bad flags {op.flags:#x}: GNTMAP_host_map is needed")
    table = _granter(call, op.dom)
    if not maptrack.has_room():
        raise _Fail(GntStatus.no_device_space, f"all {MAPTRACK_LIMIT} maptrack handles in use")
    if len(call.fds) >= MAX_FDS:
        raise _Fail(GntStatus.eagain, f"this reply carries {MAX_FDS} frame files already")
    readonly = bool(op.flags & GNTMAP_readonly)
    act = _pin(table, op.ref, call.caller.domid, readonly, mapflag=True)
    try:
        fd = _frame_file(table, act.frame, readonly, taken)
    except _Fail:
        _unpin(table, op.ref, readonly)
        raise
    handle = maptrack.add(Mapping(table, op.ref, op.flags, call.connection))
    call.send_fd(fd)
    return handle, machine_address(table.region, act.frame)


@hypercall(GNTTAB_OP, GnttabOp.unmap_grant_ref, args=gnttab_unmap_grant_ref, batch=MAX_BATCH)
def unmap_grant_ref(call: Call, ops: list[Any]) -> tuple[int, bytes]:
    """host_addr is not used: the mapper unmaps its pages itself, before this call.
    Each element goes back packed, as map_grant_ref's do."""
    maptrack = _maptrack(call.caller)
    outs = []
    for op in ops:
        try:
            mapping = maptrack.entries.get(op.handle)
            if mapping is None:
                raise _Fail(GntStatus.bad_handle, f"bad d{call.caller.domid} handle {op.handle:#x}")
            frame = mapping.table.active[mapping.ref].frame
            if op.dev_bus_addr and op.dev_bus_addr != machine_address(mapping.table.region, frame):
                raise _Fail(
                    GntStatus.general_error,
                    f"bus address {op.dev_bus_addr:#x} doesn't match handle {op.handle:#x}",
                )
            maptrack.release(op.handle)
            status = GntStatus.okay
        except _Fail as fail:
            status = _refused(call, f"unmap of handle {op.handle:#x}", fail)
        outs.append(_UNMAP_OUT(op.host_addr, op.dev_bus_addr, op.handle, status))
    return 0, b"".join(outs)


@hypercall(GNTTAB_OP, GnttabOp.copy, args=gnttab_copy, batch=MAX_BATCH)
def copy(call: Call, ops: list[Any]) -> tuple[int, list[Any]]:
    taken: set[int] = set()
    outs = []
    for op in ops:
        try:
            _copy_one(call, op, taken)
            status = GntStatus.okay
        except _Fail as fail:
            what = (
                f"copy {_side(op.source, op.flags & GNTCOPY_source_gref)} -> "
                f"{_side(op.dest, op.flags & GNTCOPY_dest_gref)}"
            )
            status = _refused(call, what, fail)
        outs.append(op._replace(status=status))
    return 0, outs


def _side(ptr: Any, is_gref: int) -> str:
    """One side of a copy, as the log names it."""
    dom = "self" if ptr.domid == DOMID_SELF else f"d{ptr.domid}"
    return f"{dom} ref {ptr.u & 0xFFFFFFFF}" if is_gref else f"{dom} frame {ptr.u:#x}"


def _copy_one(call: Call, op: Any, taken: set[int]) -> None:
    """Both domains first, then source and dest claimed, then the bounds: Xen's order."""
    source = _copy_domain(call, op.source.domid, op.flags & GNTCOPY_source_gref)
    dest = _copy_domain(call, op.dest.domid, op.flags & GNTCOPY_dest_gref)
    pins: list[tuple[HypervisorGrantTable, int, bool]] = []
    try:
        src_memory, src_frame = _claim(
            call, source, op.source, op.flags & GNTCOPY_source_gref, True, taken, pins
        )
        dst_memory, dst_frame = _claim(
            call, dest, op.dest, op.flags & GNTCOPY_dest_gref, False, taken, pins
        )
        if op.source.offset + op.len > XEN_PAGE_SIZE or op.dest.offset + op.len > XEN_PAGE_SIZE:
            raise _Fail(
                GntStatus.bad_copy_arg,
                f"{op.len} bytes from offsets {op.source.offset} and {op.dest.offset} "
                f"cross a page boundary",
            )
        with src_memory.frame(src_frame) as src, dst_memory.frame(dst_frame) as dst:
            start, end = op.source.offset, op.source.offset + op.len
            dst[op.dest.offset : op.dest.offset + op.len] = src[start:end]
    finally:
        for table, ref, readonly in pins:
            _unpin(table, ref, readonly)


def _copy_domain(call: Call, domid: int, is_gref: int) -> Any:
    """Only DOMID_SELF may name a frame; any domain may name a grant."""
    if domid != DOMID_SELF and not is_gref:
        raise _Fail(GntStatus.permission_denied, "only DOMID_SELF may be named by frame")
    domain = call.caller if domid == DOMID_SELF else call.hv.domains.get(domid)
    if domain is None:
        raise _Fail(GntStatus.bad_domain, f"could not find domain {domid}")
    return domain


def _claim(
    call: Call,
    domain: Any,
    ptr: Any,
    is_gref: int,
    readonly: bool,
    taken: set[int],
    pins: list[tuple[HypervisorGrantTable, int, bool]],
) -> tuple[DomainMemory, int]:
    """The memory and frame one side of a copy names, pinned if it is a grant."""
    _take_frames(domain, taken)
    if is_gref:
        table = _live_table(domain)
        ref = ptr.u & 0xFFFFFFFF  # union { grant_ref_t ref; xen_pfn_t gmfn; }
        act = _pin(table, ref, call.caller.domid, readonly, mapflag=False)
        pins.append((table, ref, readonly))
        return table.memory, act.frame
    memory = domain.memory
    if memory is None or memory.closed or not ptr.u < memory.nr_pages:
        raise _Fail(GntStatus.bad_page, f"{'source' if readonly else 'dest'} frame invalid")
    return memory, ptr.u


@hypercall(GNTTAB_OP, GnttabOp.query_size, args=gnttab_query_size)
def query_size(call: Call, op: Any) -> tuple[int, Any]:
    """The table is its boot frames and never grows: nr_frames == max_nr_frames."""
    try:
        table = _any_domain(call, op.dom).grant_table
    except _Fail as fail:
        return 0, op._replace(status=_refused(call, "query_size", fail))
    frames = len(table.gfns) if table is not None else 0
    return 0, op._replace(nr_frames=frames, max_nr_frames=frames, status=GntStatus.okay)


@hypercall(GNTTAB_OP, GnttabOp.setup_table, args=gnttab_setup_table)
def setup_table(call: Call, op: Any) -> tuple[int, bytes]:
    """The frame list (xen_pfn_t each) follows the struct, in place of Xen's guest handle."""
    try:
        domain = _any_domain(call, op.dom)
        table = domain.grant_table
        if table is None:
            raise _Fail(GntStatus.general_error, f"d{domain.domid} has no grant table: not built")
        if op.nr_frames > len(table.gfns):
            raise _Fail(
                GntStatus.general_error,
                f"d{domain.domid} is limited to {len(table.gfns)} grant-table frames",
            )
    except _Fail as fail:
        return 0, SETUP.pack(op._replace(status=_refused(call, "setup_table", fail)))
    frames = table.gfns[: op.nr_frames]
    return 0, SETUP.pack(op._replace(status=GntStatus.okay)) + struct.pack(
        f"<{len(frames)}Q", *frames
    )
