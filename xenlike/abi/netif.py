"""Network device protocol (io/netif.h): tx, rx and control rings.

A packet on the tx ring is a chain of `netif_tx_request` fragments
(NETTXF_more_data), optionally followed by `netif_extra_info` slots
(NETTXF_extra_info); the first fragment's `size` is the whole packet length.
On the rx ring each `netif_rx_response.status` is the fragment's byte count
(or a NETIF_RSP_* error when negative).
"""

from construct import Array, Bytes, Int8ul, Int16sl, Int16ul, Int32ul, Struct

__all__ = [
    "NETIF_RSP_DROPPED",
    "NETIF_RSP_ERROR",
    "NETIF_RSP_NULL",
    "NETIF_RSP_OKAY",
    "NETRXF_csum_blank",
    "NETRXF_data_validated",
    "NETRXF_extra_info",
    "NETRXF_gso_prefix",
    "NETRXF_more_data",
    "NETTXF_csum_blank",
    "NETTXF_data_validated",
    "NETTXF_extra_info",
    "NETTXF_more_data",
    "XEN_NETIF_CTRLF_GREF_readonly",
    "XEN_NETIF_CTRL_HASH_ALGORITHM_NONE",
    "XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ",
    "XEN_NETIF_CTRL_HASH_TYPE_IPV4",
    "XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP",
    "XEN_NETIF_CTRL_HASH_TYPE_IPV6",
    "XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP",
    "XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW",
    "XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER",
    "XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED",
    "XEN_NETIF_CTRL_STATUS_SUCCESS",
    "XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING",
    "XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING",
    "XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE",
    "XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS",
    "XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE",
    "XEN_NETIF_CTRL_TYPE_INVALID",
    "XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM",
    "XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS",
    "XEN_NETIF_CTRL_TYPE_SET_HASH_KEY",
    "XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING",
    "XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE",
    "XEN_NETIF_EXTRA_FLAG_MORE",
    "XEN_NETIF_EXTRA_TYPE_GSO",
    "XEN_NETIF_EXTRA_TYPE_HASH",
    "XEN_NETIF_EXTRA_TYPE_MAX",
    "XEN_NETIF_EXTRA_TYPE_MCAST_ADD",
    "XEN_NETIF_EXTRA_TYPE_MCAST_DEL",
    "XEN_NETIF_EXTRA_TYPE_NONE",
    "XEN_NETIF_GSO_TYPE_NONE",
    "XEN_NETIF_GSO_TYPE_TCPV4",
    "XEN_NETIF_GSO_TYPE_TCPV6",
    "XEN_NETIF_MAX_TX_SIZE",
    "XEN_NETIF_NR_SLOTS_MIN",
    "netif_extra_info",
    "netif_extra_info_gso",
    "netif_extra_info_hash",
    "netif_extra_info_mcast",
    "netif_rx_request",
    "netif_rx_response",
    "netif_tx_request",
    "netif_tx_response",
    "xen_netif_ctrl_request",
    "xen_netif_ctrl_response",
    "xen_netif_gref",
]

# A backend must accept packets that use up to this many tx slots.
XEN_NETIF_NR_SLOTS_MIN = 18
# Largest packet the first tx fragment's 16-bit size can announce.
XEN_NETIF_MAX_TX_SIZE = 0xFFFF

# netif_tx_request.flags
NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3

# netif_rx_response.flags
NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
NETIF_RSP_NULL = 1  # answers a tx slot that carried extra info

# netif_extra_info.type
XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5

# netif_extra_info.flags
XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

# netif_extra_info.u.gso.type
XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# Control ring: request types, response status, hash parameters.
XEN_NETIF_CTRL_TYPE_INVALID = 0
XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS = 1
XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS = 2
XEN_NETIF_CTRL_TYPE_SET_HASH_KEY = 3
XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE = 4
XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE = 5
XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING = 6
XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM = 7
XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE = 8
XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING = 9
XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING = 10

XEN_NETIF_CTRL_STATUS_SUCCESS = 0
XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED = 1
XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER = 2
XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW = 3

XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 1 << 0
XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1 << 1
XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 1 << 2
XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 1 << 3

XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0
XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1

XEN_NETIF_CTRLF_GREF_readonly = 1 << 0

netif_tx_request = Struct(
    "gref" / Int32ul,
    "offset" / Int16ul,  # offset + size must stay inside the granted page
    "flags" / Int16ul,  # NETTXF_*
    "id" / Int16ul,  # echoed in the response
    "size" / Int16ul,  # first fragment: whole packet; later ones: their own length
)

netif_tx_response = Struct(
    "id" / Int16ul,
    "status" / Int16sl,  # NETIF_RSP_*
)

netif_rx_request = Struct(
    "id" / Int16ul,
    "pad" / Int16ul,
    "gref" / Int32ul,
)

netif_rx_response = Struct(
    "id" / Int16ul,
    "offset" / Int16ul,
    "flags" / Int16ul,  # NETRXF_*
    "status" / Int16sl,  # bytes received, or NETIF_RSP_* when negative
)

# An extra-info record takes a ring slot of its own (8 bytes, so it fits both
# rings). `u` is the 6-byte union; parse it with the variant that `type` names.
netif_extra_info = Struct(
    "type" / Int8ul,  # XEN_NETIF_EXTRA_TYPE_*
    "flags" / Int8ul,  # XEN_NETIF_EXTRA_FLAG_*
    "u" / Bytes(6),
)

# u.gso (XEN_NETIF_EXTRA_TYPE_GSO)
netif_extra_info_gso = Struct(
    "size" / Int16ul,  # MSS
    "type" / Int8ul,  # XEN_NETIF_GSO_TYPE_*
    "pad" / Int8ul,
    "features" / Int16ul,
)

# u.mcast (XEN_NETIF_EXTRA_TYPE_MCAST_ADD / _DEL)
netif_extra_info_mcast = Struct(
    "addr" / Bytes(6),
)

# u.hash (XEN_NETIF_EXTRA_TYPE_HASH)
netif_extra_info_hash = Struct(
    "type" / Int8ul,  # a _XEN_NETIF_CTRL_HASH_TYPE_* bit number
    "algorithm" / Int8ul,  # XEN_NETIF_CTRL_HASH_ALGORITHM_*
    "value" / Bytes(4),
)

xen_netif_ctrl_request = Struct(
    "id" / Int16ul,
    "type" / Int16ul,  # XEN_NETIF_CTRL_TYPE_*
    "data" / Array(3, Int32ul),
)

xen_netif_ctrl_response = Struct(
    "id" / Int16ul,
    "type" / Int16ul,
    "status" / Int32ul,  # XEN_NETIF_CTRL_STATUS_*
    "data" / Int32ul,
)

# Element of the page granted for XEN_NETIF_CTRL_TYPE_ADD/DEL_GREF_MAPPING.
xen_netif_gref = Struct(
    "ref" / Int32ul,
    "flags" / Int16ul,  # XEN_NETIF_CTRLF_GREF_*
    "status" / Int16ul,  # XEN_NETIF_CTRL_STATUS_*
)
