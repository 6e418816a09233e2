"""The guest's IP stack: Ethernet, ARP, IPv4, ICMP echo and UDP over a vif.

    iface = guest.net()                      # the interface of vif 0
    rtt = await iface.ping("10.0.0.2")       # seconds
    with iface.udp(5000) as sock:
        await sock.sendto(b"hello", ("10.0.0.2", 5000))
        data, (host, port) = await sock.recvfrom()

- `wire`: the headers, as construct layouts and the struct formats derived from them.
- `arp`: the neighbour cache.
- `interface`: receiving and sending frames, pings.
- `udp`: sockets.
"""

from domains.guest.net.arp import ArpCache, HostUnreachable
from domains.guest.net.interface import Interface, NetworkUnreachable
from domains.guest.net.udp import AddressInUse, UdpSocket

__all__ = [
    "AddressInUse",
    "ArpCache",
    "HostUnreachable",
    "Interface",
    "NetworkUnreachable",
    "UdpSocket",
]
