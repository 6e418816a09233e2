"""xen/io/xs_wire.h: the XenStore wire protocol and a guest's XenStore page.

Every XenStore message, over xenstored's Unix socket or a guest's ring page,
is an `xsd_sockmsg` header (four little-endian uint32) followed by `len`
payload bytes, at most `XENSTORE_PAYLOAD_MAX`. Errors travel as the errno
*name* (`"ENOENT\\0"`), looked up in `XSD_ERRORS`, whose order is part of the
ABI: Xen only ever appends to it.
"""

import enum

from construct import Bytes, Int32ul, Struct

__all__ = [
    "MASK_XENSTORE_IDX",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_CONNECTED",
    "XENSTORE_ERROR_COMM",
    "XENSTORE_ERROR_NONE",
    "XENSTORE_ERROR_PROTO",
    "XENSTORE_ERROR_RINGIDX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_RECONNECT",
    "XENSTORE_REL_PATH_MAX",
    "XENSTORE_RING_SIZE",
    "XENSTORE_SERVER_FEATURE_ERROR",
    "XENSTORE_SERVER_FEATURE_RECONNECTION",
    "XSD_ERRORS",
    "XS_CONTROL",
    "XS_DEBUG",
    "XS_DIRECTORY",
    "XS_DIRECTORY_PART",
    "XS_ERROR",
    "XS_GET_DOMAIN_PATH",
    "XS_GET_PERMS",
    "XS_INTRODUCE",
    "XS_INVALID",
    "XS_IS_DOMAIN_INTRODUCED",
    "XS_MKDIR",
    "XS_READ",
    "XS_RELEASE",
    "XS_RESET_WATCHES",
    "XS_RESUME",
    "XS_RM",
    "XS_SET_PERMS",
    "XS_SET_TARGET",
    "XS_TRANSACTION_END",
    "XS_TRANSACTION_START",
    "XS_TYPE_COUNT",
    "XS_UNWATCH",
    "XS_WATCH",
    "XS_WATCH_EVENT",
    "XS_WATCH_PATH",
    "XS_WATCH_TOKEN",
    "XS_WRITE",
    "XS_WRITE_CREATE",
    "XS_WRITE_CREATE_EXCL",
    "XS_WRITE_NONE",
    "XsType",
    "xenstore_domain_interface",
    "xsd_sockmsg",
]


class XsType(enum.IntEnum):
    """`enum xsd_sockmsg_type`: the `type` field of `xsd_sockmsg`."""

    XS_CONTROL = 0
    XS_DEBUG = 0  # the old name of XS_CONTROL (an alias, as in the header)
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    # 20 was XS_RESTRICT, since removed; the number is never reused.
    XS_RESET_WATCHES = 21
    XS_DIRECTORY_PART = 22
    XS_TYPE_COUNT = 23  # number of valid types
    XS_INVALID = 0xFFFF  # guaranteed to remain an invalid type


XS_CONTROL = XsType.XS_CONTROL
XS_DEBUG = XsType.XS_DEBUG
XS_DIRECTORY = XsType.XS_DIRECTORY
XS_READ = XsType.XS_READ
XS_GET_PERMS = XsType.XS_GET_PERMS
XS_WATCH = XsType.XS_WATCH
XS_UNWATCH = XsType.XS_UNWATCH
XS_TRANSACTION_START = XsType.XS_TRANSACTION_START
XS_TRANSACTION_END = XsType.XS_TRANSACTION_END
XS_INTRODUCE = XsType.XS_INTRODUCE
XS_RELEASE = XsType.XS_RELEASE
XS_GET_DOMAIN_PATH = XsType.XS_GET_DOMAIN_PATH
XS_WRITE = XsType.XS_WRITE
XS_MKDIR = XsType.XS_MKDIR
XS_RM = XsType.XS_RM
XS_SET_PERMS = XsType.XS_SET_PERMS
XS_WATCH_EVENT = XsType.XS_WATCH_EVENT
XS_ERROR = XsType.XS_ERROR
XS_IS_DOMAIN_INTRODUCED = XsType.XS_IS_DOMAIN_INTRODUCED
XS_RESUME = XsType.XS_RESUME
XS_SET_TARGET = XsType.XS_SET_TARGET
XS_RESET_WATCHES = XsType.XS_RESET_WATCHES
XS_DIRECTORY_PART = XsType.XS_DIRECTORY_PART
XS_TYPE_COUNT = XsType.XS_TYPE_COUNT
XS_INVALID = XsType.XS_INVALID

# Legacy write flags; nothing sends them on the wire any more.
XS_WRITE_NONE = "NONE"
XS_WRITE_CREATE = "CREATE"
XS_WRITE_CREATE_EXCL = "CREATE|EXCL"

# `struct xsd_errors xsd_errors[]`: name -> errno (Xen's, equal to Linux's),
# in the header's order.
XSD_ERRORS: dict[str, int] = {
    "EINVAL": 22,
    "EACCES": 13,
    "EEXIST": 17,
    "EISDIR": 21,
    "ENOENT": 2,
    "ENOMEM": 12,
    "ENOSPC": 28,
    "EIO": 5,
    "ENOTEMPTY": 39,
    "ENOSYS": 38,
    "EROFS": 30,
    "EBUSY": 16,
    "EAGAIN": 11,
    "EISCONN": 106,
    "E2BIG": 7,
    "EPERM": 1,
}

# `enum xs_watch_type`: where the path and the token sit in a watch event.
XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1

xsd_sockmsg = Struct(
    "type" / Int32ul,  # XS_*
    "req_id" / Int32ul,  # request identifier, echoed in the daemon's response
    "tx_id" / Int32ul,  # transaction id (0 if not related to a transaction)
    "len" / Int32ul,  # length of the payload that follows
)

XENSTORE_RING_SIZE = 1024


def MASK_XENSTORE_IDX(idx: int) -> int:  # noqa: N802 - the header's macro name
    """Slot of a free-running ring index in `req` or `rsp`."""
    return idx & (XENSTORE_RING_SIZE - 1)


xenstore_domain_interface = Struct(
    "req" / Bytes(XENSTORE_RING_SIZE),  # requests to the xenstore daemon
    "rsp" / Bytes(XENSTORE_RING_SIZE),  # replies and async watch events
    "req_cons" / Int32ul,
    "req_prod" / Int32ul,
    "rsp_cons" / Int32ul,
    "rsp_prod" / Int32ul,
    "server_features" / Int32ul,  # XENSTORE_SERVER_FEATURE_* bits
    "connection" / Int32ul,  # XENSTORE_CONNECTED / XENSTORE_RECONNECT
    "error" / Int32ul,  # XENSTORE_ERROR_*
)

# Violating this is very bad (xenstored drops the connection).
XENSTORE_PAYLOAD_MAX = 4096

# Violating these just gets you an error back.
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

XENSTORE_SERVER_FEATURE_RECONNECTION = 1  # the ring can be reconnected
XENSTORE_SERVER_FEATURE_ERROR = 2  # the `error` field is meaningful

XENSTORE_CONNECTED = 0  # the steady state
XENSTORE_RECONNECT = 1  # reconnect in progress

XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1  # communication problem
XENSTORE_ERROR_RINGIDX = 2  # invalid ring index
XENSTORE_ERROR_PROTO = 3  # protocol violation (payload too long)
