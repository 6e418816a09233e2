"""Grant tables (grant_table.h): shared entries and GNTTABOP arguments.

A domain grants a peer access to one of its frames by filling an entry of its
own grant table (write `domid` and `frame`, barrier, then `flags`); the peer
maps or copies it through GNTTABOP hypercalls, each element of a batch
getting its own GNTST_* status. The first GNTTAB_NR_RESERVED_ENTRIES
references belong to the toolstack (console and xenstore pages).
"""

from enum import IntEnum

from construct import Bytes, Int16sl, Int16ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum
from xenlike.abi.ring import XEN_PAGE_SIZE

__all__ = [
    "GNTCOPY_dest_gref",
    "GNTCOPY_source_gref",
    "GNTMAP_application_map",
    "GNTMAP_contains_pte",
    "GNTMAP_device_map",
    "GNTMAP_guest_avail_mask",
    "GNTMAP_host_map",
    "GNTMAP_readonly",
    "GNTTABOP_error_msgs",
    "GNTTAB_CACHE_CLEAN",
    "GNTTAB_CACHE_INVAL",
    "GNTTAB_CACHE_SOURCE_GREF",
    "GNTTAB_NR_RESERVED_ENTRIES",
    "GNTTAB_RESERVED_CONSOLE",
    "GNTTAB_RESERVED_XENSTORE",
    "GTF_PAT",
    "GTF_PCD",
    "GTF_PWT",
    "GTF_accept_transfer",
    "GTF_invalid",
    "GTF_permit_access",
    "GTF_readonly",
    "GTF_reading",
    "GTF_sub_page",
    "GTF_transfer_committed",
    "GTF_transfer_completed",
    "GTF_transitive",
    "GTF_type_mask",
    "GTF_writing",
    "GntStatus",
    "GnttabOp",
    "SHGNT_PER_PAGE_V1",
    "SHGNT_PER_PAGE_V2",
    "STGNT_PER_PAGE",
    "gnttab_cache_flush",
    "gnttab_copy",
    "gnttab_copy_ptr",
    "gnttab_dump_table",
    "gnttab_get_status_frames",
    "gnttab_get_version",
    "gnttab_map_grant_ref",
    "gnttab_query_size",
    "gnttab_set_version",
    "gnttab_setup_table",
    "gnttab_swap_grant_ref",
    "gnttab_transfer",
    "gnttab_unmap_and_replace",
    "gnttab_unmap_grant_ref",
    "grant_entry_header",
    "grant_entry_v1",
    "grant_entry_v2",
    "grant_entry_v2_full_page",
    "grant_entry_v2_sub_page",
    "grant_entry_v2_transitive",
]


class GnttabOp(IntEnum):
    """Commands of the grant_table_op hypercall (GNTTABOP_*)."""

    map_grant_ref = 0
    unmap_grant_ref = 1
    setup_table = 2
    dump_table = 3
    transfer = 4
    copy = 5
    query_size = 6
    unmap_and_replace = 7
    set_version = 8
    get_status_frames = 9
    get_version = 10
    swap_grant_ref = 11
    cache_flush = 12


class GntStatus(IntEnum):
    """Per-element status of a grant operation (GNTST_*)."""

    okay = 0
    general_error = -1
    bad_domain = -2
    bad_gntref = -3
    bad_handle = -4
    bad_virt_addr = -5
    bad_dev_addr = -6
    no_device_space = -7
    permission_denied = -8
    bad_page = -9
    bad_copy_arg = -10
    address_too_big = -11
    eagain = -12
    no_space = -13


__all__ += export_enum(GnttabOp, "GNTTABOP_", globals())
__all__ += export_enum(GntStatus, "GNTST_", globals())

# Xen's messages for the GNTST_* codes, indexed by -status.
GNTTABOP_error_msgs = (
    "okay",
    "undefined error",
    "unrecognised domain id",
    "invalid grant reference",
    "invalid mapping handle",
    "invalid virtual address",
    "invalid device address",
    "no spare translation slot in the I/O MMU",
    "permission denied",
    "bad page",
    "copy arguments cross page boundary",
    "page address size too large",
    "operation not done; try again",
    "out of space",
)

GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# Entry type (the low two bits of flags) ...
GTF_invalid = 0 << 0
GTF_permit_access = 1 << 0
GTF_accept_transfer = 2 << 0
GTF_transitive = 3 << 0
GTF_type_mask = 3 << 0
# ... and flag bits. GTF_reading/GTF_writing are set by Xen while the grant is mapped.
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_sub_page = 1 << 8
# For GTF_accept_transfer entries.
GTF_transfer_committed = 1 << 2
GTF_transfer_completed = 1 << 3

# gnttab_map_grant_ref.flags
GNTMAP_device_map = 1 << 0
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2
GNTMAP_application_map = 1 << 3
GNTMAP_contains_pte = 1 << 4
GNTMAP_guest_avail_mask = 0xFFFF0000  # bits 16..31 are free for the guest's use

# gnttab_copy.flags: which side names a grant reference instead of a frame.
GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

# gnttab_cache_flush.op
GNTTAB_CACHE_CLEAN = 1 << 0
GNTTAB_CACHE_INVAL = 1 << 1
GNTTAB_CACHE_SOURCE_GREF = 1 << 31

grant_entry_v1 = Struct(
    "flags" / Int16ul,  # GTF_*
    "domid" / Int16ul,  # the domain being granted access
    "frame" / Int32ul,  # the granted frame (or the transfer target)
)

grant_entry_header = Struct(
    "flags" / Int16ul,
    "domid" / Int16ul,
)

# union grant_entry_v2 is 16 bytes: the common `hdr`, then 12 bytes that the
# variants below lay out (full_page, sub_page, transitive); the union itself
# has no member for them. In v2 the reading/writing bits live in a separate
# grant_status_t (uint16) array.
grant_entry_v2 = Struct(
    "hdr" / grant_entry_header,
    "body" / Bytes(12),
)

grant_entry_v2_full_page = Struct(
    "hdr" / grant_entry_header,
    "pad0" / Int32ul,
    "frame" / Int64ul,
)

grant_entry_v2_sub_page = Struct(
    "hdr" / grant_entry_header,
    "page_off" / Int16ul,
    "length" / Int16ul,
    "frame" / Int64ul,
)

grant_entry_v2_transitive = Struct(
    "hdr" / grant_entry_header,
    "trans_domid" / Int16ul,
    "pad0" / Int16ul,
    "gref" / Int32ul,
)

# Entries per 4 KiB frame, as Xen names them in common/grant_table.c
# (shared entries v1 and v2, and grant_status_t entries).
SHGNT_PER_PAGE_V1 = XEN_PAGE_SIZE // grant_entry_v1.sizeof()
SHGNT_PER_PAGE_V2 = XEN_PAGE_SIZE // grant_entry_v2.sizeof()
STGNT_PER_PAGE = XEN_PAGE_SIZE // Int16ul.sizeof()

gnttab_map_grant_ref = Struct(
    # IN
    "host_addr" / Int64ul,
    "flags" / Int32ul,  # GNTMAP_*
    "ref" / Int32ul,
    "dom" / Int16ul,
    # OUT
    "status" / Int16sl,  # GNTST_*
    "handle" / Int32ul,
    "dev_bus_addr" / Int64ul,
)

gnttab_unmap_grant_ref = Struct(
    # IN
    "host_addr" / Int64ul,
    "dev_bus_addr" / Int64ul,
    "handle" / Int32ul,
    # OUT
    "status" / Int16sl,
    Padding(2),
)

gnttab_setup_table = Struct(
    # IN
    "dom" / Int16ul,
    Padding(2),
    "nr_frames" / Int32ul,
    # OUT
    "status" / Int16sl,
    Padding(6),
    "frame_list" / Int64ul,  # guest handle: xen_pfn_t array
)

gnttab_dump_table = Struct(
    "dom" / Int16ul,
    "status" / Int16sl,
)

gnttab_transfer = Struct(
    "mfn" / Int64ul,
    "domid" / Int16ul,
    Padding(2),
    "ref" / Int32ul,
    "status" / Int16sl,
    Padding(6),
)

gnttab_copy_ptr = Struct(
    # union u { grant_ref_t ref; xen_pfn_t gmfn; }: a grant reference (its low
    # 32 bits) when the GNTCOPY_*_gref flag is set, else a frame number.
    "u" / Int64ul,
    "domid" / Int16ul,
    "offset" / Int16ul,
    Padding(4),
)

gnttab_copy = Struct(
    # IN
    "source" / gnttab_copy_ptr,
    "dest" / gnttab_copy_ptr,
    "len" / Int16ul,  # may not cross a 4 KiB boundary on either side
    "flags" / Int16ul,  # GNTCOPY_*
    # OUT
    "status" / Int16sl,
    Padding(2),
)

gnttab_query_size = Struct(
    # IN
    "dom" / Int16ul,
    Padding(2),
    # OUT
    "nr_frames" / Int32ul,
    "max_nr_frames" / Int32ul,
    "status" / Int16sl,
    Padding(2),
)

gnttab_unmap_and_replace = Struct(
    "host_addr" / Int64ul,
    "new_addr" / Int64ul,
    "handle" / Int32ul,
    "status" / Int16sl,
    Padding(2),
)

gnttab_set_version = Struct(
    "version" / Int32ul,
)

gnttab_get_status_frames = Struct(
    "nr_frames" / Int32ul,
    "dom" / Int16ul,
    "status" / Int16sl,
    "frame_list" / Int64ul,  # guest handle: uint64_t array
)

gnttab_get_version = Struct(
    "dom" / Int16ul,
    "pad" / Int16ul,
    "version" / Int32ul,
)

gnttab_swap_grant_ref = Struct(
    "ref_a" / Int32ul,
    "ref_b" / Int32ul,
    "status" / Int16sl,
    Padding(2),
)

gnttab_cache_flush = Struct(
    # union a { uint64_t dev_bus_addr; grant_ref_t ref; }: ref is the low 32 bits.
    "a" / Int64ul,
    "offset" / Int16ul,
    "length" / Int16ul,
    "op" / Int32ul,  # GNTTAB_CACHE_*
)
