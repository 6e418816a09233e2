"""The balloon's hypercalls (XENMEM_*), for a domain or a Dom0 tool.

Each takes the caller's `HypercallClient` (`domain.hypercalls`, or
`XenControl.hypercalls` for Dom0 acting on another domain through `domid`).
Frame lists go a page of xen_pfn_t (512) per hypercall, as Linux's balloon
driver sends them, which keeps every message far below the socket's limit;
the array follows xen_memory_reservation in the message, with extent_start
saying so (see `xenlike.hypervisor.memory_op`). Results are Xen's: extents
done, counted over the batches until one stops short.
"""

import struct
from collections.abc import Sequence

from xenlike.abi.memory import XenMemOp, xen_memory_reservation
from xenlike.abi.xen import DOMID_SELF, Hypercall
from xenlike.codec import compile_struct
from xenlike.domain.hypercall import HypercallClient
from xenlike.memory import XEN_PAGE_SIZE

__all__ = [
    "current_reservation",
    "decrease_reservation",
    "increase_reservation",
    "maximum_reservation",
    "populate_physmap",
]

RESERVATION = compile_struct(xen_memory_reservation, "xen_memory_reservation")
EXTENT_LIST = RESERVATION.size  # extent_start: the array follows the struct
FRAMES_PER_CALL = XEN_PAGE_SIZE // 8


async def _reservation_op(
    hypercalls: HypercallClient, cmd: XenMemOp, frames: Sequence[int], order: int, domid: int
) -> tuple[int, bytes]:
    """One XENMEM reservation op over at most FRAMES_PER_CALL extents."""
    head = RESERVATION.record(
        extent_start=EXTENT_LIST, nr_extents=len(frames), extent_order=order, domid=domid
    )
    payload = RESERVATION.pack(head) + struct.pack(f"<{len(frames)}Q", *frames)
    done = await hypercalls.call(Hypercall.memory_op, cmd, payload)
    return done.result, done.payload[EXTENT_LIST:]


async def _batched(
    hypercalls: HypercallClient, cmd: XenMemOp, gfns: Sequence[int], order: int, domid: int
) -> int:
    total = 0
    for start in range(0, len(gfns), FRAMES_PER_CALL):
        batch = gfns[start : start + FRAMES_PER_CALL]
        done, _ = await _reservation_op(hypercalls, cmd, batch, order, domid)
        total += done
        if done < len(batch):
            break
    return total


async def decrease_reservation(
    hypercalls: HypercallClient, gfns: Sequence[int], *, order: int = 0, domid: int = DOMID_SELF
) -> int:
    """Hand frames back (balloon out): extents of 2**order frames from each gfn."""
    return await _batched(hypercalls, XenMemOp.decrease_reservation, gfns, order, domid)


async def populate_physmap(
    hypercalls: HypercallClient, gfns: Sequence[int], *, order: int = 0, domid: int = DOMID_SELF
) -> int:
    """Back frames again (balloon in); they come back zeroed."""
    return await _batched(hypercalls, XenMemOp.populate_physmap, gfns, order, domid)


async def increase_reservation(
    hypercalls: HypercallClient, nr_extents: int, *, order: int = 0, domid: int = DOMID_SELF
) -> list[int]:
    """Up to `nr_extents` extents where the hypervisor chooses: their first gfns."""
    gfns: list[int] = []
    while len(gfns) < nr_extents:
        want = min(FRAMES_PER_CALL, nr_extents - len(gfns))
        done, array = await _reservation_op(
            hypercalls, XenMemOp.increase_reservation, [0] * want, order, domid
        )
        gfns.extend(struct.unpack_from(f"<{done}Q", array))
        if done < want:
            break
    return gfns


async def current_reservation(hypercalls: HypercallClient, domid: int = DOMID_SELF) -> int:
    """Frames the domain holds now (tot_pages)."""
    done = await hypercalls.call(
        Hypercall.memory_op, XenMemOp.current_reservation, struct.pack("<H", domid), 1
    )
    return done.result


async def maximum_reservation(hypercalls: HypercallClient, domid: int = DOMID_SELF) -> int:
    """The most frames the domain may hold (max_pages)."""
    done = await hypercalls.call(
        Hypercall.memory_op, XenMemOp.maximum_reservation, struct.pack("<H", domid), 1
    )
    return done.result
