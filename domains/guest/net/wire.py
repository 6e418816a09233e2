"""The guest stack's headers: construct layouts, and struct formats for the hot path.

The layouts are the schema (RFC 894 Ethernet II, RFC 826 ARP, RFC 791
IPv4, RFC 792 ICMP echo, RFC 768 UDP), in network byte order. Packets are
built and parsed with `struct` formats derived from them once, here; a
test checks that both give the same bytes.
"""

import struct

from construct import Bytes, Int8ub, Int16ub, Struct

__all__ = [
    "ARP",
    "ARP_REPLY",
    "ARP_REQUEST",
    "BROADCAST_MAC",
    "ETHERNET",
    "ETH_UDP",
    "ETH_UDP_FLOW",
    "ICMP_DEST_UNREACH",
    "ICMP_ECHO",
    "ICMP_ECHO_REPLY",
    "ICMP_ECHO_REQUEST",
    "ICMP_PORT_UNREACH",
    "IPPROTO_ICMP",
    "IPPROTO_UDP",
    "IPV4",
    "UDP",
    "arp_packet",
    "ethernet_header",
    "icmp_echo",
    "ipv4_header",
    "struct_of",
    "udp_header",
]

ethernet_header = Struct(
    "destination" / Bytes(6),
    "source" / Bytes(6),
    "ethertype" / Int16ub,  # 0x0800 IPv4, 0x0806 ARP
)

arp_packet = Struct(
    "htype" / Int16ub,  # 1: Ethernet
    "ptype" / Int16ub,  # 0x0800: IPv4
    "hlen" / Int8ub,  # 6
    "plen" / Int8ub,  # 4
    "oper" / Int16ub,  # 1 request, 2 reply
    "sha" / Bytes(6),  # sender hardware address
    "spa" / Bytes(4),  # sender protocol address
    "tha" / Bytes(6),  # target hardware address
    "tpa" / Bytes(4),  # target protocol address
)

ipv4_header = Struct(
    "version_ihl" / Int8ub,  # 0x45: version 4, 5 words, no options
    "tos" / Int8ub,
    "total_length" / Int16ub,
    "identification" / Int16ub,
    "flags_fragment" / Int16ub,  # 0x4000: don't fragment
    "ttl" / Int8ub,
    "protocol" / Int8ub,  # 1 ICMP, 17 UDP
    "checksum" / Int16ub,
    "source" / Bytes(4),
    "destination" / Bytes(4),
)

icmp_echo = Struct(
    "type" / Int8ub,  # 8 request, 0 reply
    "code" / Int8ub,
    "checksum" / Int16ub,
    "identifier" / Int16ub,
    "sequence" / Int16ub,
)

udp_header = Struct(
    "source_port" / Int16ub,
    "destination_port" / Int16ub,
    "length" / Int16ub,  # header and data
    "checksum" / Int16ub,  # 0: none (IPv4 only)
)


def struct_of(layout: Struct) -> str:
    """The big-endian struct format of a flat layout of bytes and unsigned integers."""
    codes = []
    for sub in layout.subcons:
        con = sub.subcon
        if isinstance(con, Bytes):
            codes.append(f"{con.length}s")
        elif con is Int8ub:
            codes.append("B")
        elif con is Int16ub:
            codes.append("H")
        else:
            raise TypeError(f"{sub.name}: {con!r} has no struct code here")
    return "".join(codes)


ETHERNET = struct.Struct("!" + struct_of(ethernet_header))
ARP = struct.Struct("!" + struct_of(arp_packet))
IPV4 = struct.Struct("!" + struct_of(ipv4_header))
ICMP_ECHO = struct.Struct("!" + struct_of(icmp_echo))
UDP = struct.Struct("!" + struct_of(udp_header))
# Ethernet, IPv4 and UDP headers in one pack: a datagram's 42 bytes in one call.
ETH_UDP = struct.Struct(
    "!" + struct_of(ethernet_header) + struct_of(ipv4_header) + struct_of(udp_header)
)

# The same 42 bytes in 8 fields, for a sender that keeps a flow's constant runs as bytes:
# Ethernet header + version/IHL + TOS (16), total length, identification, flags/fragment
# + TTL + protocol (4), header checksum, source + destination + ports (12), UDP length,
# UDP checksum. A test checks it gives ETH_UDP's bytes.
ETH_UDP_FLOW = struct.Struct("!16sHH4sH12sHH")

BROADCAST_MAC = b"\xff" * 6
ARP_REQUEST, ARP_REPLY = 1, 2
IPPROTO_ICMP, IPPROTO_UDP = 1, 17
ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST = 0, 3, 8
ICMP_PORT_UNREACH = 3  # code of ICMP_DEST_UNREACH
