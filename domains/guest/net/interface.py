"""An IPv4 interface over a vif: Ethernet, ARP, IPv4, ICMP echo and UDP.

The stack has no task of its own. The vif's front end calls `_receive`
with every frame; ARP requests and pings are answered there, at once, and
datagrams are queued on their socket. Sending builds the whole frame with
one `struct` pack and puts it on the tx ring.

One subnet, no gateway: the interface reaches the hosts of its own
network (the vif line's `ip=10.0.0.2/24`) and its broadcast address. IP
fragments are dropped. The IPv4 header checksum is always computed and
checked; the UDP checksum is left to Dom0 (NETTXF_csum_blank) when the
back end offers checksum offload, and checked on receipt unless the back
end says the data is validated.
"""

import errno
import ipaddress
import itertools
import random
import socket
import struct
import time

import trio

from domains.guest.net.arp import ArpCache
from domains.guest.net.udp import AddressInUse, UdpSocket
from domains.guest.net.wire import (
    ARP,
    ARP_REPLY,
    ARP_REQUEST,
    BROADCAST_MAC,
    ETH_UDP_FLOW,
    ETHERNET,
    ICMP_DEST_UNREACH,
    ICMP_ECHO,
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    ICMP_PORT_UNREACH,
    IPPROTO_ICMP,
    IPPROTO_UDP,
    IPV4,
    UDP,
)
from drivers.netif import Netfront
from drivers.netif.protocol import ETH_P_ARP, ETH_P_IP, checksum, pseudo_header_sum
from xenlike.abi.netif import NETRXF_data_validated, NETTXF_csum_blank, NETTXF_data_validated

__all__ = ["EPHEMERAL_PORTS", "Interface", "NetworkUnreachable"]

EPHEMERAL_PORTS = range(32768, 61000)  # Linux's ip_local_port_range
TTL = 64
DONT_FRAGMENT = 0x4000
_IPV4_TYPE = ETH_P_IP.to_bytes(2, "big")
_ARP_TYPE = ETH_P_ARP.to_bytes(2, "big")
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"
_ANY = b"\0\0\0\0"
_PATTERN = bytes(range(256))
_UDP_DF_TTL = struct.pack("!HBB", DONT_FRAGMENT, TTL, IPPROTO_UDP)
_HOSTS_KEPT = 1024  # dotted sender addresses cached for received datagrams
_FLOWS_KEPT = 1024  # (destination, ports) whose header runs a sender keeps


class NetworkUnreachable(OSError):
    """The destination is not on the interface's network, or it has no address (ENETUNREACH)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENETUNREACH, message)


def _fold(total: int) -> int:
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Interface:
    """The IPv4 interface of one vif (`guest.net()`): ping, resolve, UDP sockets."""

    def __init__(self, vif: Netfront, name: str = "eth0") -> None:
        self.vif = vif
        self.name = name
        self.arp = ArpCache(self._arp_request)
        self._udp: dict[int, UdpSocket] = {}
        self._hosts: dict[bytes, str] = {}  # the dotted form of each sender's address, once
        # (destination, source port, port) -> (next hop's MAC, the header's constant runs
        # and the unfolded sum of its constant words): what send_udp does not redo.
        self._flows: dict[tuple[bytes, int, int], tuple[bytes, bytes, bytes, int]] = {}
        self._ephemeral = itertools.cycle(EPHEMERAL_PORTS)
        self._ident = random.randrange(0x10000)
        self._ping_id = random.randrange(0x10000)
        self._ping_seq = itertools.count(1)
        self._pings: dict[tuple[int, int], trio.Event] = {}
        self._configured: str | None = None
        self.address: ipaddress.IPv4Interface | None = None
        self._ip = _ANY
        self._broadcast = _LIMITED_BROADCAST
        self._header_sum = 0
        self.stats = {
            "ip_in": 0,
            "ip_out": 0,
            "bad_header": 0,
            "bad_checksum": 0,
            "fragments": 0,
            "no_port": 0,
            "icmp_unreachable": 0,
        }
        vif.receiver = self._receive
        self._configure()
        if self.address is not None:
            self.announce()

    def __repr__(self) -> str:
        return f"<Interface {self.name} {self.vif.mac.hex(':')} {self.address}>"

    @property
    def mac(self) -> bytes:
        return self.vif.mac

    @property
    def ip(self) -> ipaddress.IPv4Address | None:
        self._configure()
        return self.address.ip if self.address is not None else None

    def _configure(self) -> None:
        """Take the address the vif was given (`ip=` of its vif line), once it is known."""
        text = self.vif.ip
        if text == self._configured:
            return
        self._configured = text
        self._flows.clear()  # their headers carry the old address
        self.address = ipaddress.IPv4Interface(text) if text else None
        if self.address is None:
            self._ip, self._broadcast, self._header_sum = _ANY, _LIMITED_BROADCAST, 0
            return
        self._ip = self.address.ip.packed
        self._broadcast = self.address.network.broadcast_address.packed
        source = int.from_bytes(self._ip, "big")
        # The constant words of our IPv4 headers: version/IHL, flags, TTL, the source.
        self._header_sum = 0x4500 + DONT_FRAGMENT + (TTL << 8) + (source >> 16) + (source & 0xFFFF)

    # --- receiving (called by the vif for every frame) -----------------------------------

    def _receive(self, frame: bytes, flags: int) -> None:
        if len(frame) < 14 or (frame[0] & 1 == 0 and frame[:6] != self.vif.mac):
            return  # flooded unicast for someone else
        kind = frame[12:14]
        if kind == _IPV4_TYPE:
            self._receive_ipv4(frame, flags)
        elif kind == _ARP_TYPE:
            self._receive_arp(frame)

    def _receive_arp(self, frame: bytes) -> None:
        if len(frame) < 14 + ARP.size:
            return
        htype, ptype, hlen, plen, oper, sha, spa, _, tpa = ARP.unpack_from(frame, 14)
        if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4 or sha[0] & 1:
            return
        self._configure()
        for_us = self._ip != _ANY and tpa == self._ip
        self.arp.learn(spa, sha, create=for_us)
        if for_us and oper == ARP_REQUEST:
            reply = ETHERNET.pack(sha, self.vif.mac, ETH_P_ARP) + ARP.pack(
                1, ETH_P_IP, 6, 4, ARP_REPLY, self.vif.mac, self._ip, sha, spa
            )
            self.vif.transmit_nowait(reply)

    def _receive_ipv4(self, frame: bytes, flags: int) -> None:
        if len(frame) < 14 + IPV4.size:
            return
        version_ihl, _, total, _, fragment, _, protocol, _, source, destination = IPV4.unpack_from(
            frame, 14
        )
        ihl = (version_ihl & 0x0F) * 4
        stats = self.stats
        if version_ihl >> 4 != 4 or ihl < 20 or total < ihl or 14 + total > len(frame):
            stats["bad_header"] += 1
            return
        if checksum(frame[14 : 14 + ihl]):
            stats["bad_checksum"] += 1
            return
        if (
            destination != self._ip
            and destination != self._broadcast
            and destination != _LIMITED_BROADCAST
        ):
            self._configure()
            if destination != self._ip:
                return
        if fragment & 0x3FFF:
            stats["fragments"] += 1
            return
        stats["ip_in"] += 1
        if protocol == IPPROTO_UDP:
            self._receive_udp(frame, 14 + ihl, 14 + total, source, destination, flags)
        elif protocol == IPPROTO_ICMP:
            payload = frame[14 + ihl : 14 + total]
            self._receive_icmp(frame, payload, source, destination, flags)

    def _receive_udp(
        self, frame: bytes, start: int, end: int, source: bytes, destination: bytes, flags: int
    ) -> None:
        """The datagram in frame[start:end] (the IP payload), read in place: its data
        is the one copy made of it."""
        if end - start < UDP.size:
            self.stats["bad_header"] += 1
            return
        source_port, port, length, sum_ = UDP.unpack_from(frame, start)
        if length < UDP.size or length > end - start:
            self.stats["bad_header"] += 1
            return
        if (
            sum_
            and not flags & NETRXF_data_validated
            and checksum(
                frame[start : start + length],
                pseudo_header_sum(source, destination, IPPROTO_UDP, length),
            )
        ):
            self.stats["bad_checksum"] += 1
            return
        sock = self._udp.get(port)
        if sock is None:
            self.stats["no_port"] += 1
            if destination == self._ip:
                self._unreachable(frame, source)
            return
        host = self._hosts.get(source)
        if host is None:
            if len(self._hosts) >= _HOSTS_KEPT:  # sources a peer may forge: bounded
                self._hosts.clear()
            host = self._hosts[source] = socket.inet_ntoa(source)
        sock.deliver(frame[start + UDP.size : start + length], (host, source_port))

    def _receive_icmp(
        self, frame: bytes, payload: bytes, source: bytes, destination: bytes, flags: int
    ) -> None:
        if len(payload) < ICMP_ECHO.size:
            self.stats["bad_header"] += 1
            return
        if not flags & NETRXF_data_validated and checksum(payload):
            self.stats["bad_checksum"] += 1
            return
        kind, _, _, identifier, sequence = ICMP_ECHO.unpack_from(payload)
        if kind == ICMP_ECHO_REQUEST and destination == self._ip:  # broadcast pings ignored
            reply = self._icmp(ICMP_ECHO_REPLY, 0, identifier, sequence, payload[ICMP_ECHO.size :])
            self.vif.transmit_nowait(self._ip_frame(frame[6:12], source, IPPROTO_ICMP, reply))
        elif kind == ICMP_ECHO_REPLY:
            waiter = self._pings.pop((identifier, sequence), None)
            if waiter is not None:
                waiter.set()
        elif kind == ICMP_DEST_UNREACH:
            self.stats["icmp_unreachable"] += 1

    def _unreachable(self, frame: bytes, source: bytes) -> None:
        """ICMP port unreachable back to a datagram's sender (its IP header and 8 bytes)."""
        ihl = (frame[14] & 0x0F) * 4
        quoted = frame[14 : 14 + ihl + 8]
        message = self._icmp(ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, quoted)
        self.vif.transmit_nowait(self._ip_frame(frame[6:12], source, IPPROTO_ICMP, message))

    # --- sending --------------------------------------------------------------------------

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    def _ip_frame(self, mac: bytes, destination: bytes, protocol: int, payload: bytes) -> bytes:
        total = IPV4.size + len(payload)
        ident = self._next_ident()
        dest = int.from_bytes(destination, "big")
        sum_ = _fold(self._header_sum + protocol + total + ident + (dest >> 16) + (dest & 0xFFFF))
        self.stats["ip_out"] += 1
        return (
            ETHERNET.pack(mac, self.vif.mac, ETH_P_IP)
            + IPV4.pack(
                0x45, 0, total, ident, DONT_FRAGMENT, TTL, protocol, sum_, self._ip, destination
            )
            + payload
        )

    @staticmethod
    def _icmp(kind: int, code: int, identifier: int, sequence: int, data: bytes) -> bytes:
        message = ICMP_ECHO.pack(kind, code, 0, identifier, sequence) + data
        return message[:2] + checksum(message).to_bytes(2, "big") + message[4:]

    async def next_hop(self, destination: bytes) -> bytes:
        """The MAC a packet for `destination` goes to (ARP-resolved; broadcast for broadcasts)."""
        self._configure()
        if self.address is None:
            raise NetworkUnreachable(f"{self.name} has no IPv4 address: give its vif line an ip=")
        if destination == self._broadcast or destination == _LIMITED_BROADCAST:
            return BROADCAST_MAC
        if ipaddress.IPv4Address(destination) not in self.address.network:
            raise NetworkUnreachable(
                f"{socket.inet_ntoa(destination)} is not on "
                f"{self.address.network}, and there is no gateway"
            )
        return await self.arp.resolve(destination)

    async def send_ip(
        self, destination: bytes, protocol: int, payload: bytes, flags: int = 0
    ) -> None:
        """One IPv4 packet (payload and protocol number) to an address of the network."""
        mac = await self.next_hop(destination)
        await self.vif.transmit(self._ip_frame(mac, destination, protocol, payload), flags)

    async def send_udp(self, source_port: int, destination: bytes, port: int, data: bytes) -> None:
        """One datagram; the hot path of `UdpSocket.sendto`."""
        mac = self.arp.lookup(destination)
        if mac is None:
            mac = await self.next_hop(destination)
        flow = self._flows.get((destination, source_port, port))
        if flow is None or flow[0] != mac:
            flow = self._flow(mac, destination, source_port, port)
        _, head, addresses, constant_sum = flow
        length = UDP.size + len(data)
        total = IPV4.size + length
        ident = self._ident = (self._ident + 1) & 0xFFFF
        header_sum = constant_sum + total + ident
        header_sum = (header_sum & 0xFFFF) + (header_sum >> 16)  # _fold, inline: once a datagram
        header_sum = ~((header_sum & 0xFFFF) + (header_sum >> 16)) & 0xFFFF
        vif = self.vif
        if vif.csum_offload:
            sum_, flags = 0, NETTXF_csum_blank | NETTXF_data_validated
        else:
            sum_ = (
                checksum(
                    UDP.pack(source_port, port, length, 0) + data,
                    pseudo_header_sum(self._ip, destination, IPPROTO_UDP, length),
                )
                or 0xFFFF
            )
            flags = NETTXF_data_validated
        frame = (
            ETH_UDP_FLOW.pack(head, total, ident, _UDP_DF_TTL, header_sum, addresses, length, sum_)
            + data
        )
        self.stats["ip_out"] += 1
        if not vif.transmit_nowait(frame, flags):  # a full ring: wait for room
            await vif.transmit(frame, flags)

    def _flow(
        self, mac: bytes, destination: bytes, source_port: int, port: int
    ) -> tuple[bytes, bytes, bytes, int]:
        """What every datagram of a flow shares: the headers' constant runs (Ethernet,
        version/IHL/TOS; addresses and ports) and the sum of the IPv4 header's constant
        words; kept, so a send packs 8 fields instead of 17."""
        if len(self._flows) >= _FLOWS_KEPT:
            self._flows.clear()
        dest = int.from_bytes(destination, "big")
        flow = (
            mac,
            ETHERNET.pack(mac, self.vif.mac, ETH_P_IP) + bytes((0x45, 0)),
            self._ip + destination + struct.pack("!HH", source_port, port),
            self._header_sum + IPPROTO_UDP + (dest >> 16) + (dest & 0xFFFF),
        )
        self._flows[destination, source_port, port] = flow
        return flow

    def _arp_request(self, ip: bytes) -> None:
        frame = ETHERNET.pack(BROADCAST_MAC, self.vif.mac, ETH_P_ARP) + ARP.pack(
            1, ETH_P_IP, 6, 4, ARP_REQUEST, self.vif.mac, self._ip, bytes(6), ip
        )
        self.vif.transmit_nowait(frame)

    def announce(self) -> None:
        """A gratuitous ARP: tells the segment (and the bridge) where our address lives."""
        self._configure()
        if self.address is not None:
            frame = ETHERNET.pack(BROADCAST_MAC, self.vif.mac, ETH_P_ARP) + ARP.pack(
                1, ETH_P_IP, 6, 4, ARP_REQUEST, self.vif.mac, self._ip, bytes(6), self._ip
            )
            self.vif.transmit_nowait(frame)

    # --- the programs' API --------------------------------------------------------------------

    async def resolve(self, host: str) -> bytes:
        """The MAC address of a host of the network (ARP)."""
        return await self.next_hop(socket.inet_aton(host))

    async def ping(self, host: str, *, timeout: float = 1.0, size: int = 56) -> float:
        """One ICMP echo request; the round trip in seconds, or TimeoutError."""
        sequence = next(self._ping_seq) & 0xFFFF
        key = (self._ping_id, sequence)
        answered = self._pings[key] = trio.Event()
        message = self._icmp(
            ICMP_ECHO_REQUEST, 0, self._ping_id, sequence, (_PATTERN * (size // 256 + 1))[:size]
        )
        start = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                await self.send_ip(socket.inet_aton(host), IPPROTO_ICMP, message)
                await answered.wait()
        except trio.TooSlowError:
            raise TimeoutError(f"ping {host}: no echo reply within {timeout} s") from None
        finally:
            self._pings.pop(key, None)
        return time.perf_counter() - start

    def udp(self, port: int = 0) -> UdpSocket:
        """A UDP socket bound to `port` (0: a free ephemeral port)."""
        if port == 0:
            for candidate in itertools.islice(self._ephemeral, len(EPHEMERAL_PORTS)):
                if candidate not in self._udp:
                    port = candidate
                    break
            else:
                raise OSError(errno.EADDRINUSE, "every ephemeral UDP port is in use")
        elif port in self._udp:
            raise AddressInUse(port)
        sock = self._udp[port] = UdpSocket(self, port)
        return sock

    def down(self, error: OSError) -> None:
        """Its vif was removed: each socket's waiting receivers get `error`."""
        for sock in list(self._udp.values()):
            sock.fail(error)

    def unbind(self, sock: UdpSocket) -> None:
        if self._udp.get(sock.port) is sock:
            del self._udp[sock.port]
