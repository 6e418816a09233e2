"""xenlike's own hypercalls for suspend, save and restore: numbers and layouts that
both the hypervisor (`xenlike.hypervisor.save`) and its callers use.

They sit far from Xen's numbers, as `XENLIKE_DOMCTL_build` does: Xen does these
with registers and foreign mappings that a process cannot lend another.
"""

from construct import Int16ul, Int32ul, Padding, Struct

from xenlike.hypercall import HYPERCALL_MAX_MESSAGE
from xenlike.memory import XEN_PAGE_SIZE

__all__ = [
    "FRAMES_PER_CALL",
    "MAX_CONTEXT",
    "XENLIKE_DOMCTL_getcontext",
    "XENLIKE_DOMCTL_map_memory",
    "XENLIKE_DOMCTL_read_frames",
    "XENLIKE_DOMCTL_setcontext",
    "XENLIKE_DOMCTL_write_frames",
    "XENLIKE_VCPUOP_get_context",
    "XENLIKE_VCPUOP_save_context",
    "xenlike_context",
    "xenlike_frames",
    "xenlike_memory",
]

XENLIKE_DOMCTL_read_frames = 0x1002
XENLIKE_DOMCTL_write_frames = 0x1003
XENLIKE_DOMCTL_getcontext = 0x1004
XENLIKE_DOMCTL_setcontext = 0x1005
XENLIKE_DOMCTL_map_memory = 0x1006
XENLIKE_VCPUOP_save_context = 0x1000
XENLIKE_VCPUOP_get_context = 0x1001

MAX_CONTEXT = HYPERCALL_MAX_MESSAGE - 1024  # bytes of execution state, in one message
# Frames one read_frames reply (or write_frames request) carries, with a byte each.
FRAMES_PER_CALL = (HYPERCALL_MAX_MESSAGE - 1024) // (XEN_PAGE_SIZE + 1)

xenlike_frames = Struct(
    "domain" / Int16ul,
    Padding(2),
    "first_pfn" / Int32ul,
    "count" / Int32ul,  # at most FRAMES_PER_CALL
)
xenlike_context = Struct("domain" / Int16ul, Padding(6))  # then the context's bytes
# map_memory's reply: this, a bit a frame (1: populated, LSB first), then the gfns
# (Int32ul each) whose data is in a file of their own, not in the memory file.
xenlike_memory = Struct("nr_pages" / Int32ul, "nr_moved" / Int32ul)
