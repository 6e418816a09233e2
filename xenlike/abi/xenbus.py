"""XenBus device states (io/xenbus.h), kept as decimal strings in each end's
``state`` key during the frontend/backend handshake.
"""

from enum import IntEnum

from xenlike.abi._layout import export_enum

__all__ = ["XenbusState"]


class XenbusState(IntEnum):
    """Xen's ``enum xenbus_state``; the module also binds ``XenbusStateConnected`` etc."""

    Unknown = 0  # no state, or the node is missing
    Initialising = 1  # toolstack created the device; driver starting
    InitWait = 2  # early init done, waiting for the peer's details
    Initialised = 3  # frontend: ring and event channel published
    Connected = 4
    Closing = 5  # shutting down (error or unplug)
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8


__all__ += export_enum(XenbusState, "XenbusState", globals())
