"""The ARP cache (RFC 826): IPv4 → MAC, learned from requests and replies, with timeouts.

An entry is trusted for `REACHABLE_TIME` seconds after it was last
confirmed by an ARP packet, then resolved again. Resolving broadcasts a
request once a second, `RETRIES` times, and gives up with
`HostUnreachable`, as Linux's neighbour code does with its defaults.
"""

import errno
import time
from collections.abc import Callable

import trio

__all__ = ["REACHABLE_TIME", "RETRIES", "RETRY_INTERVAL", "ArpCache", "HostUnreachable"]

REACHABLE_TIME = 60.0
RETRY_INTERVAL = 1.0
RETRIES = 3


class HostUnreachable(OSError):
    """No ARP reply from the address (EHOSTUNREACH)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EHOSTUNREACH, message)


class ArpCache:
    """Neighbours by IPv4 address (4 bytes); `request(ip)` sends an ARP request."""

    def __init__(self, request: Callable[[bytes], None]) -> None:
        self._request = request
        self._entries: dict[bytes, tuple[bytes, float]] = {}  # ip -> (mac, expiry)
        self._waiting: dict[bytes, trio.Event] = {}
        self._last_request: dict[bytes, float] = {}

    def lookup(self, ip: bytes) -> bytes | None:
        """The MAC of `ip` if known and not expired."""
        entry = self._entries.get(ip)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def learn(self, ip: bytes, mac: bytes, *, create: bool) -> None:
        """An ARP packet from `ip`: refresh its entry (and add one if `create`: it was
        addressed to us), and wake whoever resolves it."""
        if create or ip in self._entries:
            self._entries[ip] = (mac, time.monotonic() + REACHABLE_TIME)
        waiting = self._waiting.pop(ip, None)
        if waiting is not None:
            self._entries[ip] = (mac, time.monotonic() + REACHABLE_TIME)
            waiting.set()

    async def resolve(self, ip: bytes) -> bytes:
        """The MAC of `ip`, asking the segment when it is not known."""
        for _ in range(RETRIES):
            mac = self.lookup(ip)
            if mac is not None:
                return mac
            event = self._waiting.setdefault(ip, trio.Event())
            now = time.monotonic()
            if now - self._last_request.get(ip, -RETRY_INTERVAL) >= RETRY_INTERVAL:
                self._last_request[ip] = now
                self._request(ip)
            with trio.move_on_after(RETRY_INTERVAL):
                await event.wait()
        mac = self.lookup(ip)
        if mac is not None:
            return mac
        self._waiting.pop(ip, None)
        raise HostUnreachable(f"{'.'.join(map(str, ip))}: no ARP reply to {RETRIES} requests")
