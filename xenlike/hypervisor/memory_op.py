"""memory_op (XENMEM_*): a domain's reservation, what a balloon driver moves.

A domain's memfd is sized at its maximum reservation when it is built and is
sealed at that size, so the reservation is kept here as the set of frames
that are populated (Xen's p2m, as far as the balloon cares). Every frame is
populated at build, so tot_pages starts at the memory's size;
decrease_reservation hands frames back and punches them out of the memfd
(fallocate PUNCH_HOLE|KEEP_SIZE), so the host really gets the memory back;
populate_physmap backs chosen frames again and increase_reservation lets the
hypervisor choose them. A repopulated frame reads as zeros, as Xen's
scrubbed pages do. The frames Xen owns in a real domain (shared_info, the
grant table) are never the guest's to give back. As Xen keeps a released
page alive while a peer still maps it through a grant, a frame given back
while another domain maps it keeps its own file (what the mapper maps)
untouched: the file leaves the domain's frames, the domain's tot_pages drops
at once, and the page stays out of the host's pool (`KeptPage`, held by the
hypervisor, so past the domain's destruction too) until the mapper's last
pin on it goes.

Every populated frame comes from the host's pool (`Hypervisor.free_pages`):
a domain gets no frame beyond its max_pages, nor one the pool does not
have, and the op stops there, as Xen's does when the heap runs dry.

Guest handles: xen_memory_reservation.extent_start points at an array of
xen_pfn_t in the guest. Here the array travels in the same message, right
after the struct, and extent_start says so: it is EXTENT_LIST (32, the
array's offset from the start of the struct) or 0, Xen's null handle
(increase_reservation then reports no frames). Any other handle, or an
array that is not exactly nr_extents long, is a bad handle. Frames are gfns:
xenlike has no machine frames, so increase_reservation reports gfns where
PV Xen reports mfns.

Results are Xen's: the reservation ops return how many extents they did and
stop at the first one that fails; a bad domain, a caller without rights, a
bad handle, order or flag does nothing and returns 0, never -errno (Xen's
`return start_extent`). current_reservation and maximum_reservation take a
bare domid_t and fail with -ESRCH or -EPERM.
"""

import os
import struct
from collections.abc import Iterable
from typing import Any

import attrs
from construct import Int16ul, Struct

from xenlike.abi.errno import Errno
from xenlike.abi.memory import (
    XENMEMF_exact_node_request,
    XENMEMF_populate_on_demand,
    XENMEMF_vnode,
    XenMemOp,
    xen_memory_reservation,
)
from xenlike.abi.xen import DOMID_SELF, Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import HypercallError
from xenlike.hypervisor.frames import SharedFrames
from xenlike.hypervisor.table import Call, hypercall
from xenlike.memory import XEN_PAGE_SHIFT, DomainMemory, punch

__all__ = [
    "EXTENT_LIST",
    "KeptPage",
    "Reservation",
    "held_pages",
    "initial_reservation",
    "reservation",
    "tot_pages",
    "xen_memory_domid",
]

MEMORY_OP = Hypercall.memory_op
RESERVATION = compile_struct(xen_memory_reservation, "xen_memory_reservation")
EXTENT_LIST = RESERVATION.size
"""The only non-null extent_start: the frame array starts right after the struct."""

xen_memory_domid = Struct("domid" / Int16ul)
"""current_reservation's and maximum_reservation's argument: a bare domid_t."""

MEMOP_EXTENT_SHIFT = 6  # memory.h: the cmd bits above it count extents done
# memop-max-order on x86: DomU PAGETABLE_ORDER, the control domain
# CONFIG_PAGEALLOC_MAX_ORDER (the hardware domain's 12 is below it).
DOMU_MAX_ORDER = 9
CTLDOM_MAX_ORDER = 18


@attrs.define(eq=False)
class KeptPage:
    """A frame its domain gave back while a peer still maps it (Xen's page with a
    reference left): its file, until the grant's last pin goes."""

    active: dict[int, Any]  # the granter's active grants (HypervisorGrantTable.active)
    ref: int
    pin: Any  # the ActiveGrant that maps the frame; once it is gone, so is the page
    fd: int

    def alive(self) -> bool:
        return self.active.get(self.ref) is self.pin


@attrs.define(eq=False)
class Reservation:
    """Which of a domain's frames hold memory, and how many (tot_pages)."""

    domain: Any
    memory: DomainMemory
    frames: SharedFrames  # frames with files of their own lose or regain their page there
    populated: bytearray  # one byte per frame of the memfd: 1 if it holds memory
    xen_frames: frozenset[int]  # shared_info and grant table: Xen's, not the guest's
    tot_pages: int

    def releasable(self, gfn: int, count: int) -> int:
        """How many frames from `gfn` on (up to `count`) the guest may hand back."""
        end = min(gfn + count, len(self.populated))
        done = 0
        for frame in range(gfn, end):
            if not self.populated[frame] or frame in self.xen_frames:
                break
            done += 1
        return done

    def release(self, gfn: int, count: int) -> list[KeptPage]:
        """Give the frames back; the pages peers still map come back as `KeptPage`s."""
        kept = self._keep_mapped(gfn, count)
        punch(self.memory.fd, gfn, count)
        self.frames.punch(gfn, count)
        self.populated[gfn : gfn + count] = bytes(count)
        self.tot_pages -= count
        return kept

    def _keep_mapped(self, gfn: int, count: int) -> list[KeptPage]:
        """Frames a peer maps keep their page: their files leave the domain whole."""
        table = self.domain.grant_table
        files = self.frames.files
        if table is None or not table.active:
            return []
        if not any(frame in files for frame in range(gfn, gfn + count)):
            return []
        kept = []
        for ref, pin in list(table.active.items()):
            if gfn <= pin.frame < gfn + count and pin.frame in files:
                fd = self.frames.detach(pin.frame)
                if fd is not None:
                    kept.append(KeptPage(table.active, ref, pin, fd))
        return kept

    def can_populate(self, gfn: int, count: int) -> bool:
        return gfn + count <= len(self.populated) and self.populated.find(1, gfn, gfn + count) < 0

    def populate(self, gfn: int, count: int) -> None:
        """Back the frames again; punching first makes sure they read as zeros."""
        punch(self.memory.fd, gfn, count)
        self.frames.punch(gfn, count)
        self.populated[gfn : gfn + count] = b"\x01" * count
        self.tot_pages += count


def initial_reservation(domain: Any, nr_pages: int) -> Reservation:
    """At build: frames 0..nr_pages-1 populated, the rest of the memfd empty."""
    layout = domain.layout
    populated = bytearray(domain.memory.nr_pages)
    populated[:nr_pages] = b"\x01" * nr_pages
    return Reservation(
        domain,
        domain.memory,
        domain.frames,
        populated,
        frozenset((layout.shared_info_gfn, *layout.grant_table_gfns)),
        nr_pages,
    )


def reservation(domain: Any) -> Reservation | None:
    """The domain's reservation, from its build on; None without usable memory."""
    if domain.reservation is None or domain.memory is None or domain.memory.closed:
        return None
    state: Reservation = domain.reservation
    return state


def held_pages(domains: Iterable[Any], kept: list[KeptPage]) -> int:
    """Pages of the host's pool in use: what each domain has populated while it is
    built and not torn down, and what peers still map of what domains gave back.
    The kept pages whose last pin went are dropped from `kept` (their files closed:
    the pool has them again)."""
    held = sum(
        domain.reservation.tot_pages
        for domain in domains
        if domain.reservation is not None and not domain.torn_down
    )
    alive = []
    for page in kept:
        if page.alive():
            alive.append(page)
        else:
            os.close(page.fd)
    kept[:] = alive
    return held + len(alive)


def tot_pages(domain: Any) -> int:
    """Frames the domain holds now (getdomaininfo's tot_pages)."""
    state = domain.reservation
    return state.tot_pages if state is not None else 0


@attrs.frozen
class _Batch:
    """A reservation op that passed Xen's checks: on whom, and with which frames."""

    hv: Any
    domain: Any
    state: Reservation
    arg: Any
    frames: list[int] | None  # None for a null handle
    pages: int  # per extent: 2**extent_order


def _batch(call: Call, payload: bytes, *, needs_list: bool) -> _Batch | None:
    """Xen's checks before a reservation op; None where Xen returns 0 extents done."""
    if len(payload) < RESERVATION.size:
        return None
    arg = RESERVATION.unpack_from(payload, 0)
    if arg.nr_extents > 0xFFFFFFFF >> MEMOP_EXTENT_SHIFT:  # more than a continuation encodes
        return None
    array = payload[RESERVATION.size :]
    if arg.extent_start == 0 and not needs_list and not array:
        frames = None
    elif arg.extent_start == EXTENT_LIST and len(array) == arg.nr_extents * 8:
        frames = list(struct.unpack(f"<{arg.nr_extents}Q", array))
    else:
        return None
    if not _flags_supported(arg.mem_flags):
        return None
    max_order = CTLDOM_MAX_ORDER if call.caller.privileged else DOMU_MAX_ORDER
    if arg.extent_order > max_order:
        return None
    domain = call.caller if arg.domid == DOMID_SELF else call.hv.domains.get(arg.domid)
    if domain is None or (domain is not call.caller and not call.caller.privileged):
        return None
    state = reservation(domain)
    if state is None:
        return None
    return _Batch(call.hv, domain, state, arg, frames, 1 << arg.extent_order)


def _flags_supported(mem_flags: int) -> bool:
    """One host node and no address limit: what a request may ask of xenlike.

    Populate-on-demand needs a paging guest, a vnode needs vNUMA, and an
    exact request can only name node 0; address bits at or below the page
    shift are invalid, as in Xen.
    """
    address_bits = mem_flags & 0xFF
    if 0 < address_bits <= XEN_PAGE_SHIFT:
        return False
    if mem_flags & (XENMEMF_populate_on_demand | XENMEMF_vnode):
        return False
    node = (mem_flags >> 8 & 0xFF) - 1  # XENMEMF_node(n) stores n + 1; 0 is "any"
    return not (mem_flags & XENMEMF_exact_node_request and node not in (-1, 0))


def _room(batch: _Batch) -> bool:
    """Whether one more extent stays within max_pages (Xen's over-allocation check)
    and the host's pool has its pages (Xen's heap)."""
    return (
        batch.state.tot_pages + batch.pages <= batch.domain.max_pages
        and batch.pages <= batch.hv.free_pages()
    )


@hypercall(MEMORY_OP, XenMemOp.increase_reservation, raw=True)
def increase_reservation(call: Call, payload: bytes) -> tuple[int, bytes] | int:
    """More frames for the domain, chosen by the hypervisor: the lowest free runs."""
    batch = _batch(call, payload, needs_list=False)
    if batch is None:
        return 0
    state, pages = batch.state, batch.pages
    done = 0
    while done < batch.arg.nr_extents and _room(batch):
        gfn = state.populated.find(bytes(pages))
        if gfn < 0:
            break
        state.populate(gfn, pages)
        if batch.frames is not None:
            batch.frames[done] = gfn
        done += 1
    if batch.frames is None:
        return done
    return done, payload[: RESERVATION.size] + struct.pack(f"<{len(batch.frames)}Q", *batch.frames)


@hypercall(MEMORY_OP, XenMemOp.populate_physmap, raw=True)
def populate_physmap(call: Call, payload: bytes) -> int:
    """Back the listed frames (balloon in); each must be in range and not populated."""
    batch = _batch(call, payload, needs_list=True)
    if batch is None:
        return 0
    assert batch.frames is not None
    for done, gfn in enumerate(batch.frames):
        if not batch.state.can_populate(gfn, batch.pages) or not _room(batch):
            return done
        batch.state.populate(gfn, batch.pages)
    return len(batch.frames)


@hypercall(MEMORY_OP, XenMemOp.decrease_reservation, raw=True)
def decrease_reservation(call: Call, payload: bytes) -> int:
    """Hand the listed frames back (balloon out).

    As in Xen, pages go one at a time: an extent that meets a frame the
    domain does not hold keeps the pages before it released, but is not
    counted as done.
    """
    batch = _batch(call, payload, needs_list=True)
    if batch is None:
        return 0
    assert batch.frames is not None
    for done, gfn in enumerate(batch.frames):
        count = batch.state.releasable(gfn, batch.pages)
        if count:
            batch.hv.kept_pages.extend(batch.state.release(gfn, count))
        if count < batch.pages:
            return done
    return len(batch.frames)


def _stat_target(call: Call, domid: int) -> Any:
    """Xen's order: an unknown domain is -ESRCH before a foreign one is -EPERM."""
    domain = call.hv.lookup(call.caller.domid if domid == DOMID_SELF else domid)
    if domain is not call.caller and not call.caller.privileged:
        raise HypercallError(
            Errno.EPERM, f"d{call.caller.domid} may not read d{domid}'s reservation"
        )
    return domain


@hypercall(MEMORY_OP, XenMemOp.current_reservation, args=xen_memory_domid)
def current_reservation(call: Call, arg: Any) -> int:
    return tot_pages(_stat_target(call, arg.domid))


@hypercall(MEMORY_OP, XenMemOp.maximum_reservation, args=xen_memory_domid)
def maximum_reservation(call: Call, arg: Any) -> int:
    return _stat_target(call, arg.domid).max_pages
