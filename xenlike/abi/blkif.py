"""Block device protocol (io/blkif.h).

A blkif ring slot holds a `blkif_request` (112 bytes) or a `blkif_response`
(16 bytes); discard and indirect requests overlay the same slot and are told
apart by `operation`. Sector fields count 512-byte sectors unless the
frontend negotiated feature-large-sector-size.
"""

from enum import IntEnum

from construct import Array, Int8ul, Int16sl, Int16ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum
from xenlike.abi.ring import XEN_PAGE_SIZE

__all__ = [
    "BLKIF_DISCARD_SECURE",
    "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
    "BLKIF_MAX_SEGMENTS_PER_REQUEST",
    "BLKIF_RSP_EOPNOTSUPP",
    "BLKIF_RSP_ERROR",
    "BLKIF_RSP_OKAY",
    "BLKIF_SEGS_PER_INDIRECT_FRAME",
    "BlkifOp",
    "VDISK_CDROM",
    "VDISK_READONLY",
    "VDISK_REMOVABLE",
    "blkif_request",
    "blkif_request_discard",
    "blkif_request_indirect",
    "blkif_request_segment",
    "blkif_response",
]


class BlkifOp(IntEnum):
    """blkif_request.operation (BLKIF_OP_*)."""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2  # needs feature-barrier
    FLUSH_DISKCACHE = 3  # needs feature-flush-cache
    RESERVED_1 = 4  # SLES device-specific packets
    DISCARD = 5  # needs feature-discard
    INDIRECT = 6  # needs feature-max-indirect-segments


__all__ += export_enum(BlkifOp, "BLKIF_OP_", globals())

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1 << 0

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

# Bits of the backend's "info" key.
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

blkif_request_segment = Struct(
    "gref" / Int32ul,
    # Inclusive sector numbers inside the granted 4 KiB page (0..7 for 512-byte sectors).
    "first_sect" / Int8ul,
    "last_sect" / Int8ul,
    Padding(2),
)

# Segments one indirect page holds; blkif.h states the rule, Linux names it
# XEN_PAGE_SIZE / sizeof(struct blkif_request_segment).
BLKIF_SEGS_PER_INDIRECT_FRAME: int = XEN_PAGE_SIZE // blkif_request_segment.sizeof()

blkif_request = Struct(
    "operation" / Int8ul,
    "nr_segments" / Int8ul,
    "handle" / Int16ul,  # blkif_vdev_t
    Padding(4),
    "id" / Int64ul,  # opaque cookie, echoed in the response
    "sector_number" / Int64ul,  # blkif_sector_t
    "seg" / Array(BLKIF_MAX_SEGMENTS_PER_REQUEST, blkif_request_segment),
)

blkif_request_discard = Struct(
    "operation" / Int8ul,
    "flag" / Int8ul,  # BLKIF_DISCARD_SECURE or 0
    "handle" / Int16ul,
    Padding(4),
    "id" / Int64ul,
    "sector_number" / Int64ul,
    "nr_sectors" / Int64ul,
)

blkif_request_indirect = Struct(
    "operation" / Int8ul,
    "indirect_op" / Int8ul,  # BLKIF_OP_READ or BLKIF_OP_WRITE
    "nr_segments" / Int16ul,
    Padding(4),
    "id" / Int64ul,
    "sector_number" / Int64ul,
    "handle" / Int16ul,
    Padding(2),
    "indirect_grefs" / Array(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, Int32ul),
    Padding(4),
)

blkif_response = Struct(
    "id" / Int64ul,
    "operation" / Int8ul,
    Padding(1),
    "status" / Int16sl,  # BLKIF_RSP_*
    Padding(4),
)
