"""PV console page (io/console.h).

Two byte rings on one shared page: `out` carries guest -> console daemon
bytes, `in` carries daemon -> guest bytes. Indices are free-running uint32;
a byte lives at ``idx & (size - 1)`` (MASK_XENCONS_IDX). Only the first
3088 bytes of the page are used.
"""

from construct import Bytes, Int32ul, Struct

from xenlike.abi._layout import member

__all__ = [
    "XENCONS_IN_SIZE",
    "XENCONS_OUT_SIZE",
    "xencons_interface",
]

xencons_interface = Struct(
    # C's `in`: a Python keyword cannot be a record field, hence the underscore.
    "in_" / Bytes(1024),
    "out" / Bytes(2048),
    "in_cons" / Int32ul,
    "in_prod" / Int32ul,
    "out_cons" / Int32ul,
    "out_prod" / Int32ul,
)

# sizeof(intf->in) and sizeof(intf->out), the ring sizes MASK_XENCONS_IDX uses.
XENCONS_IN_SIZE = member(xencons_interface, "in_").size
XENCONS_OUT_SIZE = member(xencons_interface, "out").size
