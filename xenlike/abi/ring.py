"""Shared rings (io/ring.h): the common header of every request/response ring,
and the byte-stream "flex" rings.

``DEFINE_RING_TYPES(name, req, rsp)`` makes one ``struct name_sring`` per
protocol, but all of them start with the same 64-byte header, so it is
described here once; slots (each the size of the req/rsp union) follow at
`SRING_HEADER_SIZE`. Ring pages are always 4 KiB, whatever the host's page
size.
"""

from construct import Bytes, Int32ul, Struct

from xenlike.abi._layout import offsetof

__all__ = [
    "PAD_OFFSET",
    "PVT_OFFSET",
    "REQ_EVENT_OFFSET",
    "REQ_PROD_OFFSET",
    "RSP_EVENT_OFFSET",
    "RSP_PROD_OFFSET",
    "SRING_HEADER_SIZE",
    "XEN_FLEX_RING_SIZE",
    "XEN_PAGE_SHIFT",
    "XEN_PAGE_SIZE",
    "data_intf",
    "ring_size",
    "sring_header",
]

XEN_PAGE_SHIFT = 12
XEN_PAGE_SIZE = 1 << XEN_PAGE_SHIFT

sring_header = Struct(
    "req_prod" / Int32ul,
    "req_event" / Int32ul,
    "rsp_prod" / Int32ul,
    "rsp_event" / Int32ul,
    # union pvt { struct { uint8_t smartpoll_active; } netif;
    #             struct { uint8_t msg; } tapif_user; uint8_t pvt_pad[4]; }
    "pvt" / Bytes(4),
    # C's __pad: a leading underscore is not a valid record field name.
    "pad" / Bytes(44),
)

SRING_HEADER_SIZE = sring_header.sizeof()
REQ_PROD_OFFSET = offsetof(sring_header, "req_prod")
REQ_EVENT_OFFSET = offsetof(sring_header, "req_event")
RSP_PROD_OFFSET = offsetof(sring_header, "rsp_prod")
RSP_EVENT_OFFSET = offsetof(sring_header, "rsp_event")
PVT_OFFSET = offsetof(sring_header, "pvt")
PAD_OFFSET = offsetof(sring_header, "pad")


def ring_size(entry_size: int, area_size: int = XEN_PAGE_SIZE) -> int:
    """ring.h's ``__CONST_RING_SIZE``: how many slots fit in `area_size` bytes.

    As many `entry_size`-byte slots as fit after the header, rounded down to a
    power of two so that indices can be masked with ``size - 1``.
    `entry_size` is the size of the request/response union (the larger of the two).
    """
    fit = (area_size - SRING_HEADER_SIZE) // entry_size
    return 1 << (fit.bit_length() - 1) if fit > 0 else 0


def XEN_FLEX_RING_SIZE(order: int) -> int:  # noqa: N802 - Xen's macro name
    """Bytes each way in a flex ring of ``2**order`` data pages (half of them per direction)."""
    return 1 << (order + XEN_PAGE_SHIFT - 1)


# The shared index page made by DEFINE_XEN_FLEX_RING_AND_INTF(name), i.e.
# struct name_data_intf; its grant_ref_t ref[] (one per data page, 1 << ring_order
# of them) follows at data_intf.sizeof(). Each side's indices sit in their own
# 64-byte cache line.
data_intf = Struct(
    "in_cons" / Int32ul,
    "in_prod" / Int32ul,
    "pad1" / Bytes(56),
    "out_cons" / Int32ul,
    "out_prod" / Int32ul,
    "pad2" / Bytes(56),
    "ring_order" / Int32ul,
)
