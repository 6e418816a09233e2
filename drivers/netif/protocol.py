"""netif (io/netif.h): the rings, the keys, and what both ends must agree on.

A vif has three rings: tx (guest → Dom0 packets; one netif_tx_request per
slot, chained by NETTXF_more_data), rx (the guest posts empty buffers, the
back end fills them in request order) and, when the back end offers
`feature-ctrl-ring`, the control ring, on its own `event-channel-ctrl`. tx
and rx share `event-channel`. The front end uses the control ring for
netif.h's static grants: its buffer pages, mapped once by the back end
(XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING), are then copied with a plain memory
copy; any other grant is copied with a batched GNTTABOP_copy.

Checksums follow Linux: a packet sent with NETTXF_csum_blank (offload) has
its TCP/UDP checksum left blank, and reaches a front end that accepts
offload with NETRXF_csum_blank | NETRXF_data_validated; anything else it
reaches gets the checksum filled in (`fill_checksum`).

What the back end accepts from the tx ring is decided here, without I/O or
counters: `parse_tx_packet` reads one packet's slots (xenvif_count_requests
and xenvif_tx_build_gops) into its pieces or a `Refusal`, and raises
ChannelBroken for what Linux calls a malicious front end.
"""

import struct
from typing import Any, NamedTuple

from xenlike.abi.netif import (
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_NONE,
    XEN_NETIF_NR_SLOTS_MIN,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
    netif_extra_info,
    netif_rx_request,
    netif_rx_response,
    netif_tx_request,
    netif_tx_response,
    xen_netif_ctrl_request,
    xen_netif_ctrl_response,
    xen_netif_gref,
)
from xenlike.abi.ring import XEN_PAGE_SIZE
from xenlike.codec import compile_struct
from xenlike.ring import define_ring
from xenlike.xenbus import ChannelBroken, SharedRing

__all__ = [
    "CTRL_RING",
    "DEFAULT_MTU",
    "ETH_HLEN",
    "ETH_P_ARP",
    "ETH_P_IP",
    "EXTRA",
    "FATAL_SKB_SLOTS",
    "GREF",
    "GREFS_PER_PAGE",
    "MAX_STATIC_GRANTS",
    "NETIF_RINGS",
    "RX_RING",
    "TX_RING",
    "VLAN_HLEN",
    "checksum",
    "fill_checksum",
    "l4_checksum_field",
    "max_frame",
    "parse_mac",
    "pseudo_header_sum",
    "rx_flags_of",
    "tx_extra",
]

TX_RING = define_ring("netif_tx", request=netif_tx_request, response=netif_tx_response)
RX_RING = define_ring("netif_rx", request=netif_rx_request, response=netif_rx_response)
CTRL_RING = define_ring(
    "xen_netif_ctrl", request=xen_netif_ctrl_request, response=xen_netif_ctrl_response
)
EXTRA = compile_struct(netif_extra_info, "netif_extra_info")
GREF = compile_struct(xen_netif_gref, "xen_netif_gref")

NETIF_RINGS = {
    "tx": SharedRing(TX_RING, "tx-ring-ref"),
    "rx": SharedRing(RX_RING, "rx-ring-ref"),
    "ctrl": SharedRing(
        CTRL_RING, "ctrl-ring-ref", "event-channel-ctrl", feature="feature-ctrl-ring"
    ),
}

ETH_HLEN = 14  # destination, source, ethertype
VLAN_HLEN = 4
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
DEFAULT_MTU = 1500  # netif.h: the frontend's `mtu` key, absent = 1500
# Linux netback: a packet over XEN_NETIF_NR_SLOTS_MIN slots is dropped; one
# of more than FATAL_SKB_SLOTS can only come from a malicious front end.
FATAL_SKB_SLOTS = 20
GREFS_PER_PAGE = XEN_PAGE_SIZE // GREF.size  # xen_netif_gref entries in one list page
MAX_STATIC_GRANTS = 2 * TX_RING.nr_ents()  # a full tx ring's buffers and a full rx ring's

_TX_AS_EXTRA = struct.Struct("<IHH")  # the first 8 bytes of a tx slot, as netif_extra_info's
_ETH_TYPE = struct.Struct("!H")
_IPV4_L4_CSUM = {6: 16, 17: 6}  # protocol -> checksum offset in its header (TCP, UDP)

assert XEN_NETIF_NR_SLOTS_MIN < FATAL_SKB_SLOTS


def parse_mac(text: str | None) -> bytes:
    """The `mac` key's "00:16:3e:00:00:01" as six bytes; ValueError for anything else."""
    try:
        mac = bytes.fromhex((text or "").replace(":", ""))
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise ValueError(f"{text!r} is no MAC address")
    return mac


def max_frame(mtu: int) -> int:
    """The longest frame a vif with this MTU carries: Ethernet header, one VLAN tag, MTU."""
    return ETH_HLEN + VLAN_HLEN + mtu


def tx_extra(request: tuple[int, ...]) -> Any:
    """A tx slot that holds a netif_extra_info, decoded from its private copy (no refetch)."""
    raw = _TX_AS_EXTRA.pack(request[0], request[1], request[2])
    return EXTRA.unpack_from(raw, 0)


def rx_flags_of(tx_flags: int) -> int:
    """What a packet's tx checksum flags become on the rx side (Linux netback's mapping)."""
    if tx_flags & NETTXF_csum_blank:
        return NETRXF_csum_blank | NETRXF_data_validated
    if tx_flags & NETTXF_data_validated:
        return NETRXF_data_validated
    return 0


def checksum(data: bytes, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of `data`, as it goes in a header.

    The ones'-complement sum of 16-bit words is the big-endian integer of
    the data modulo 0xFFFF (as 2^16 ≡ 1), which CPython computes in C: a
    1400-byte payload costs about a microsecond instead of hundreds.
    """
    if len(data) & 1:
        data += b"\0"
    total = int.from_bytes(data, "big") + initial
    folded = total % 0xFFFF
    if folded == 0 and total:
        folded = 0xFFFF
    return ~folded & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The IPv4 pseudo-header's contribution to a TCP/UDP checksum, unfolded."""
    return int.from_bytes(src + dst, "big") + protocol + length


def l4_checksum_field(frame: bytes) -> tuple[int, int, int] | None:
    """Where an IPv4 TCP/UDP frame's checksum lives: (L4 start, field offset, L4 end).

    None for anything else: a checksum left blank (NETTXF_csum_blank) can
    be completed only for these, and Linux netback drops the rest
    (`skb_checksum_setup` fails).
    """
    if len(frame) < ETH_HLEN + 20 or _ETH_TYPE.unpack_from(frame, 12)[0] != ETH_P_IP:
        return None
    ihl = (frame[ETH_HLEN] & 0x0F) * 4
    field = _IPV4_L4_CSUM.get(frame[ETH_HLEN + 9])
    start = ETH_HLEN + ihl
    end = ETH_HLEN + int.from_bytes(frame[ETH_HLEN + 2 : ETH_HLEN + 4], "big")
    fragment = int.from_bytes(frame[ETH_HLEN + 6 : ETH_HLEN + 8], "big") & 0x3FFF
    if field is None or ihl < 20 or fragment or end > len(frame) or start + field + 2 > end:
        return None
    return start, start + field, end


def fill_checksum(frame: bytes) -> bytes | None:
    """The frame with its IPv4 TCP/UDP checksum computed (None: see `l4_checksum_field`)."""
    where = l4_checksum_field(frame)
    if where is None:
        return None
    start, field, end = where
    protocol = frame[ETH_HLEN + 9]
    segment = frame[start:field] + b"\0\0" + frame[field + 2 : end]
    value = checksum(
        segment,
        pseudo_header_sum(
            frame[ETH_HLEN + 12 : ETH_HLEN + 16],
            frame[ETH_HLEN + 16 : ETH_HLEN + 20],
            protocol,
            end - start,
        ),
    )
    if value == 0 and protocol == 17:
        value = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    return frame[:field] + value.to_bytes(2, "big") + frame[field + 2 :]


# --- checking the tx ring (the back end's side) ------------------------------------------


class Refusal(NamedTuple):
    """A packet the back end answers with an error and drops; the vif counts it."""

    counter: str  # "tx_errors" (NETIF_RSP_ERROR) or "tx_dropped" (NETIF_RSP_DROPPED)
    what: str
    size: int


class TxPacket(NamedTuple):
    """One packet's slots, read: where it ends and what it carries, or its refusal."""

    after: int  # the index after its last slot
    pieces: list[tuple[int, int, int]]  # (gref, offset, size) of its data, in order
    extras: int  # extra-info slots after the first (each answered NETIF_RSP_NULL)
    fragment_ids: list[int]  # the ids of its slots after the first and the extras
    refusal: Refusal | None


def check_size(size: int, max_tx: int, mtu: int) -> Refusal | None:
    """Runts are errors and giants are dropped, as netback treats them."""
    if size < ETH_HLEN:
        return Refusal("tx_errors", "a packet shorter than an Ethernet header", size)
    if size > max_tx:
        return Refusal("tx_dropped", f"a packet over the MTU of {mtu}", size)
    return None


def check_slot(rid: int, offset: int, size: int) -> None:
    """A slot's data must lie in its page (Linux: 'Cross page boundary')."""
    if offset + size > XEN_PAGE_SIZE:
        raise ChannelBroken(f"tx request {rid}: offset {offset} + size {size} crosses its page")


def parse_tx_packet(requests: list[Any], index: int, max_tx: int, mtu: int) -> TxPacket:
    """The packet whose first slot is requests[index] (xenvif_count_requests).

    The first slot's size is the whole packet's; the NETTXF_more_data slots
    after it carry the rest. Extra info (GSO, multicast, hashing) was never
    negotiated, so a packet with it is refused once its slots are read.
    """
    count = len(requests)
    gref, offset, flags, rid, size = requests[index]
    after = index + 1
    refusal = None
    extras = 0
    if flags & NETTXF_extra_info:
        while True:
            if after >= count:
                raise ChannelBroken(
                    f"tx request {rid}: its extra info runs past the published requests"
                )
            extra = tx_extra(requests[after])
            after += 1
            extras += 1
            if not XEN_NETIF_EXTRA_TYPE_NONE < extra.type < XEN_NETIF_EXTRA_TYPE_MAX:
                raise ChannelBroken(
                    f"tx request {rid}: extra info type {extra.type} is none of netif.h's"
                )
            if not extra.flags & XEN_NETIF_EXTRA_FLAG_MORE:
                break
        refusal = Refusal("tx_errors", f"extra info type {extra.type} was not negotiated", size)
    pieces: list[tuple[int, int, int]] = []
    fragment_ids = []
    more = flags & NETTXF_more_data
    while more:
        if after >= count:
            raise ChannelBroken(
                f"tx request {rid}: its NETTXF_more_data chain runs past the published requests"
            )
        if len(pieces) + 1 >= FATAL_SKB_SLOTS:
            raise ChannelBroken(
                f"tx request {rid}: a packet of more than {FATAL_SKB_SLOTS} "
                f"slots (Linux: 'Malicious frontend')"
            )
        f_gref, f_offset, f_flags, f_id, f_size = requests[after]
        after += 1
        check_slot(f_id, f_offset, f_size)
        pieces.append((f_gref, f_offset, f_size))
        fragment_ids.append(f_id)
        more = f_flags & NETTXF_more_data
    rest = sum(piece[2] for piece in pieces)
    if refusal is None and len(pieces) + 1 > XEN_NETIF_NR_SLOTS_MIN:
        refusal = Refusal("tx_errors", f"a packet over {XEN_NETIF_NR_SLOTS_MIN} slots", size)
    if refusal is None and rest > size:
        refusal = Refusal("tx_errors", "fragments larger than their packet", rest)
    if refusal is None:
        refusal = check_size(size, max_tx, mtu)
    check_slot(rid, offset, max(size - rest, 0))
    pieces.insert(0, (gref, offset, size - rest))
    return TxPacket(after, pieces, extras, fragment_ids, refusal)
