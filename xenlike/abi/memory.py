"""Memory reservation and physmap operations (memory.h): the balloon's
hypercalls and the mapping of Xen-owned pages into a domain's physmap.
"""

from enum import IntEnum

from construct import Int16ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "XENMAPIDX_grant_table_status",
    "XENMAPSPACE_dev_mmio",
    "XENMAPSPACE_gmfn",
    "XENMAPSPACE_gmfn_foreign",
    "XENMAPSPACE_gmfn_range",
    "XENMAPSPACE_grant_table",
    "XENMAPSPACE_shared_info",
    "XENMEMF_exact_node_request",
    "XENMEMF_node",
    "XENMEMF_populate_on_demand",
    "XENMEMF_vnode",
    "XenMemOp",
    "xen_add_to_physmap",
    "xen_memory_exchange",
    "xen_memory_reservation",
    "xen_remove_from_physmap",
]


class XenMemOp(IntEnum):
    """Commands of the memory_op hypercall (XENMEM_*)."""

    increase_reservation = 0
    decrease_reservation = 1  # balloon out: hand listed frames back
    maximum_ram_page = 2
    current_reservation = 3  # pages held (argument: a domid)
    maximum_reservation = 4  # page limit (argument: a domid)
    machphys_mfn_list = 5
    populate_physmap = 6  # back listed frames with memory (balloon in)
    add_to_physmap = 7
    memory_map = 9
    machine_memory_map = 10
    exchange = 11
    machphys_mapping = 12
    set_memory_map = 13
    maximum_gpfn = 14
    remove_from_physmap = 15
    set_pod_target = 16
    get_pod_target = 17
    get_sharing_freed_pages = 18
    get_sharing_shared_pages = 19
    paging_op = 20
    access_op = 21
    sharing_op = 22
    add_to_physmap_batch = 23
    claim_pages = 24  # tools only
    machphys_compat_mfn_list = 25
    get_vnumainfo = 26
    reserved_device_memory_map = 27
    acquire_resource = 28


__all__ += export_enum(XenMemOp, "XENMEM_", globals())

# xen_memory_reservation.mem_flags: address bits in the low byte, then these.
XENMEMF_populate_on_demand = 1 << 16
XENMEMF_exact_node_request = 1 << 17
XENMEMF_vnode = 1 << 18


def XENMEMF_node(node: int) -> int:  # noqa: N802 - Xen's macro name
    """mem_flags bits asking for memory on NUMA node `node`."""
    return (node + 1) << 8


# xen_add_to_physmap.space
XENMAPSPACE_shared_info = 0
XENMAPSPACE_grant_table = 1
XENMAPSPACE_gmfn = 2
XENMAPSPACE_gmfn_range = 3
XENMAPSPACE_gmfn_foreign = 4
XENMAPSPACE_dev_mmio = 5
# Or'ed into xen_add_to_physmap.idx to map grant status frames.
XENMAPIDX_grant_table_status = 0x80000000

xen_memory_reservation = Struct(
    "extent_start" / Int64ul,  # guest handle: xen_pfn_t array
    "nr_extents" / Int64ul,
    "extent_order" / Int32ul,  # each extent is 2**extent_order pages
    "mem_flags" / Int32ul,  # XENMEMF_*
    "domid" / Int16ul,  # DOMID_SELF unless privileged
    Padding(6),
)

xen_memory_exchange = Struct(
    "in_" / xen_memory_reservation,  # C's `in`, a Python keyword
    "out" / xen_memory_reservation,
    "nr_exchanged" / Int64ul,
)

xen_add_to_physmap = Struct(
    "domid" / Int16ul,
    "size" / Int16ul,  # pages, for XENMAPSPACE_gmfn_range
    "space" / Int32ul,  # XENMAPSPACE_*
    "idx" / Int64ul,
    "gpfn" / Int64ul,
)

xen_remove_from_physmap = Struct(
    "domid" / Int16ul,
    Padding(6),
    "gpfn" / Int64ul,
)
