"""console.h: the page layout, as the two byte rings of `xenlike.bytering`.

`out` carries guest output to xenconsoled (2048 bytes), `in` carries
keystrokes to the guest (1024 bytes); one event channel serves both.
"""

from xenlike.abi.console import xencons_interface
from xenlike.bytering import CONSOLE, ByteRing, ByteRingStream
from xenlike.domain.evtchn import Doorbell

__all__ = ["backend_stream", "guest_stream", "xencons_interface"]


def guest_stream(page: memoryview, port: Doorbell) -> ByteRingStream:
    """The guest's end: it writes `out` and reads `in`."""
    return ByteRingStream(
        ByteRing(page, CONSOLE.to_backend), ByteRing(page, CONSOLE.to_guest), port
    )


def backend_stream(page: memoryview, port: Doorbell) -> ByteRingStream:
    """xenconsoled's end: it reads `out` and writes `in`."""
    return ByteRingStream(
        ByteRing(page, CONSOLE.to_guest), ByteRing(page, CONSOLE.to_backend), port
    )
