"""UDP sockets (RFC 768) over an `Interface`: async sendto and recvfrom, as BSD's."""

import errno
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from domains.guest.net.interface import Interface

__all__ = ["RECEIVE_QUEUE", "AddressInUse", "UdpSocket"]

RECEIVE_QUEUE = 1024  # datagrams waiting for recvfrom before new ones are dropped (SO_RCVBUF)

Address = tuple[str, int]


class AddressInUse(OSError):
    """Another socket of the interface is bound to the port (EADDRINUSE)."""

    def __init__(self, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"UDP port {port} is already in use")


class UdpSocket:
    """A UDP socket bound to one port of an interface (`Interface.udp(port)`).

    `sendto` returns at once while the vif's tx ring has room, and
    `recvfrom` while a datagram waits, as non-blocking socket calls would;
    each waits (a trio checkpoint) only when it must.
    """

    def __init__(self, interface: "Interface", port: int) -> None:
        self.interface = interface
        self.port = port
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._arrived = trio.Event()
        self._closed = False
        self._error: OSError | None = None  # why it was closed under its user, if it was
        self._destinations: dict[str, bytes] = {}
        self.dropped = 0  # datagrams lost to a full receive queue

    def __repr__(self) -> str:
        return f"<UdpSocket {self.interface.ip}:{self.port}>"

    def getsockname(self) -> Address:
        return str(self.interface.ip), self.port

    async def sendto(self, data: bytes, address: Address) -> None:
        """Send one datagram to (ip, port)."""
        if self._closed:
            raise self._error or trio.ClosedResourceError("the socket is closed")
        host, port = address
        destination = self._destinations.get(host)
        if destination is None:
            destination = self._destinations[host] = socket.inet_aton(host)
        await self.interface.send_udp(self.port, destination, port, data)

    async def recvfrom(self) -> tuple[bytes, Address]:
        """The next datagram and its sender's (ip, port)."""
        while not self._queue:
            if self._closed:
                raise self._error or trio.ClosedResourceError("the socket is closed")
            await self._arrived.wait()
            self._arrived = trio.Event()
        return self._queue.popleft()

    def deliver(self, data: bytes, sender: Address) -> None:
        """A datagram for this port (the interface calls this)."""
        if len(self._queue) >= RECEIVE_QUEUE:
            self.dropped += 1
            return
        self._queue.append((data, sender))
        self._arrived.set()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.interface.unbind(self)
            self._arrived.set()

    def fail(self, error: OSError) -> None:
        """Close it under its user: its receivers get `error` (its interface went away)."""
        self._error = error
        self.close()

    def __enter__(self) -> "UdpSocket":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
