"""xenbr0: Dom0's software bridge, a learning Ethernet switch.

Ports are the vifs (netback, one per guest interface) and the NIC. The
bridge learns which port each source address lives behind, forwards a
frame to the port of its destination, and floods it to every other port
when the destination is unknown, aged out (300 s, Linux's default) or a
broadcast/multicast address. A vif port may send only from its own MAC, as
Xen's antispoofing rules make it: other frames are dropped and counted.

`taps` see every frame that crosses (captures, a pcap NIC); they cost
nothing while there are none.
"""

import logging
import time
from collections.abc import Callable
from typing import Any

from drivers.netif import BridgePort
from drivers.netif.protocol import ETH_HLEN

__all__ = ["AGEING_TIME", "Bridge"]

log = logging.getLogger("xenlike.dom0.bridge")

AGEING_TIME = 300.0
_RELEARN = 1.0  # seconds before a known address's entry is refreshed


class Bridge:
    """One software bridge and its forwarding database."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ports: list[BridgePort] = []
        self.taps: list[Callable[[bytes, int], None]] = []
        self._fdb: dict[bytes, tuple[BridgePort, float]] = {}  # MAC -> (port, last seen)
        self.stats = {"forwarded": 0, "flooded": 0, "spoofed": 0, "runts": 0}
        self._spoof_logged: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<Bridge {self.name}: {', '.join(port.name for port in self.ports)}>"

    def attach(self, port: BridgePort) -> None:
        self.ports.append(port)
        log.info("%s: port %s added", self.name, port.name)

    def detach(self, port: BridgePort) -> None:
        if port in self.ports:
            self.ports.remove(port)
            log.info("%s: port %s removed", self.name, port.name)
        for mac, (owner, _) in list(self._fdb.items()):
            if owner is port:
                del self._fdb[mac]

    def lookup(self, mac: bytes) -> BridgePort | None:
        """The port `mac` was last seen behind, if not aged out."""
        entry = self._fdb.get(mac)
        if entry is None or time.monotonic() - entry[1] > AGEING_TIME:
            return None
        return entry[0]

    def forward(self, port: BridgePort, frames: list[tuple[bytes, int]]) -> None:
        """Switch frames that entered through `port` (each with its NETRXF_* flags).

        Consecutive frames for the same port go to it in one `deliver_many` where
        it has one (a vif): a drain of a guest's tx ring is mostly a run of frames
        to one destination. A vif port sends from its own MAC only, so its source
        is learned once per call; an uplink's, frame by frame.
        """
        now = time.monotonic()
        fdb, taps, own = self._fdb, self.taps, port.mac
        stats = self.stats
        run: list[tuple[bytes, int]] = []  # frames for `target`, not handed over yet
        target: BridgePort | None = None
        learned = False
        for item in frames:
            frame, flags = item
            if len(frame) < ETH_HLEN:
                stats["runts"] += 1
                continue
            source = frame[6:12]
            if own is not None and source != own:
                stats["spoofed"] += 1
                self._log_spoof(port, source)
                continue
            if not learned:
                if not source[0] & 1:  # a multicast source address is never learned
                    known = fdb.get(source)
                    if known is None or known[0] is not port or now - known[1] > _RELEARN:
                        fdb[source] = (port, now)
                learned = own is not None
            for tap in taps:
                tap(frame, flags)
            destination = frame[:6]
            entry = None if destination[0] & 1 else fdb.get(destination)
            if entry is not None and now - entry[1] <= AGEING_TIME:
                if entry[0] is not port:
                    stats["forwarded"] += 1
                    if entry[0] is not target:
                        if run:
                            _hand_over(target, run, port)
                        run, target = [], entry[0]
                    run.append(item)
                continue
            if run:  # what came before this frame leaves first
                _hand_over(target, run, port)
                run, target = [], None
            stats["flooded"] += 1
            for other in self.ports:
                if other is not port:
                    other.deliver(frame, flags, port)
        if run:
            _hand_over(target, run, port)

    def _log_spoof(self, port: BridgePort, source: bytes) -> None:
        now = time.monotonic()
        if now - self._spoof_logged.get(port.name, -AGEING_TIME) >= 1.0:
            self._spoof_logged[port.name] = now
            log.warning(
                "%s: dropped frames from %s with source %s (the port's MAC is %s)",
                self.name,
                port.name,
                source.hex(":"),
                port.mac.hex(":") if port.mac else "-",
            )


def _hand_over(target: Any, frames: list[tuple[bytes, int]], source: BridgePort) -> None:
    """A run of frames for one port: in one call where it takes runs, else one by one."""
    deliver_many = getattr(target, "deliver_many", None)
    if deliver_many is not None:
        deliver_many(frames, source)
        return
    for frame, flags in frames:
        target.deliver(frame, flags, source)
