"""Dom0's emulated NIC, the uplink of xenbr0, in the mode the topology names.

- `tap:NAME` — a Linux TAP device: frames the bridge sends out go to the
  host's network stack, and what the host sends into the device enters the
  bridge. The host sees the guests as an Ethernet segment.
- `pcap:FILE` — a wire that records: every frame crossing the bridge is
  written to FILE, as a mirror port would see it.
- `vxlan:VNI` — a TAP device joined to the other hosts' bridges by the
  kernel's VXLAN (`tunnel`): guests on several hosts share one segment.
- `none` — no NIC: the guests have only each other.

Frames a guest sent with a blank checksum (NETTXF_csum_blank) get it
filled in before they leave for real software, as Linux does for a device
without checksum offload.
"""

import errno
import fcntl
import logging
import os
import struct
from pathlib import Path
from typing import BinaryIO

import trio

from domains.dom0.hw.bridge import Bridge
from drivers.netif import BridgePort
from drivers.netif.protocol import fill_checksum
from xenlike.abi.netif import NETRXF_csum_blank
from xenlike.tools.pcap import file_header, record

__all__ = ["PcapNic", "TapNic", "TapUnavailable"]

log = logging.getLogger("xenlike.dom0.nic")

TUNSETIFF = 0x400454CA
IFNAMSIZ = 16
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
_MAX_FRAME = 65535
_BURST = 64  # frames read from the TAP before handing them to the bridge


def complete(frame: bytes, flags: int) -> bytes | None:
    """The frame as real software must see it: with its checksum filled in."""
    if flags & NETRXF_csum_blank:
        return fill_checksum(frame)
    return frame


class TapUnavailable(OSError):
    """The TAP device cannot be created here (no /dev/net/tun, or no permission)."""


class TapNic:
    """A bridge port backed by a Linux TAP device; any source address may enter."""

    mac = None

    def __init__(self, ifname: str) -> None:
        self.name = ifname
        if not 0 < len(ifname.encode()) < IFNAMSIZ or "/" in ifname or ifname.strip() != ifname:
            raise TapUnavailable(
                errno.EINVAL,
                f"tap:{ifname}: an interface name has 1 to "
                f"{IFNAMSIZ - 1} characters, no '/' or blanks",
            )
        try:
            self._fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapUnavailable(exc.errno, f"tap:{ifname}: /dev/net/tun: {exc.strerror}") from None
        try:
            fcntl.ioctl(
                self._fd,
                TUNSETIFF,
                struct.pack(f"{IFNAMSIZ}sH", ifname.encode(), IFF_TAP | IFF_NO_PI),
            )
        except OSError as exc:
            os.close(self._fd)
            raise TapUnavailable(exc.errno, f"tap:{ifname}: TUNSETIFF: {exc.strerror}") from None
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_dropped": 0}

    def deliver(self, frame: bytes, flags: int, source: BridgePort) -> None:
        """A frame out of the bridge, to the host; dropped if the device's queue is full."""
        data = complete(frame, flags)
        if data is None:
            self.stats["tx_dropped"] += 1
            return
        try:
            os.write(self._fd, data)
            self.stats["tx_frames"] += 1
        except OSError:  # EAGAIN when the host does not read, EIO while the link is down
            self.stats["tx_dropped"] += 1

    async def run(self, bridge: Bridge) -> None:
        """Frames from the host into the bridge, until cancelled."""
        bridge.attach(self)
        try:
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                frames = []
                for _ in range(_BURST):
                    try:
                        frames.append((os.read(self._fd, _MAX_FRAME), 0))
                    except BlockingIOError:
                        break
                self.stats["rx_frames"] += len(frames)
                if frames:
                    bridge.forward(self, frames)
        finally:
            bridge.detach(self)
            self.close()

    def close(self) -> None:
        """Close the device's file: a TAP device that is not persistent goes with it."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class PcapNic:
    """A bridge tap that writes every frame crossing it to a pcap file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed by run)
        self._file.write(file_header())

    def __call__(self, frame: bytes, flags: int) -> None:
        data = complete(frame, flags)
        if data is not None:
            self._file.write(record(data))

    async def run(self) -> None:
        """Flush now and then so readers see the frames, until cancelled; then close."""
        try:
            while True:
                await trio.sleep(0.2)
                self._file.flush()
        finally:
            self._file.close()
