"""XenBus: the driver framework over XenStore.

- `state`: the handshake as a sans-I/O state machine and transition table.
- `channel`: a ring and its event channel as trio objects (the data path).
- `driver`: the `Frontend` and `Backend` base classes a PV driver subclasses.
- `registry`: which driver serves which device type.
- `bus`: probing `device/` (guests) and `backend/` (driver domains).
"""

from xenlike.xenbus.bus import BackendBus, BusEvent, FrontendBus
from xenlike.xenbus.channel import (
    BackChannel,
    ChannelBroken,
    Disconnected,
    Drain,
    FrontChannel,
    RingGroup,
)
from xenlike.xenbus.driver import (
    Backend,
    DeviceFailed,
    DeviceInfo,
    DeviceRemoved,
    Frontend,
    ProtocolError,
    SharedRing,
    XenbusContext,
    error_node,
)
from xenlike.xenbus.registry import Driver, DriverRegistry, UnknownDriver, load_driver
from xenlike.xenbus.state import Action, Handshake, IllegalTransition, Role

__all__ = [
    "Action",
    "BackChannel",
    "Backend",
    "BackendBus",
    "BusEvent",
    "ChannelBroken",
    "DeviceFailed",
    "DeviceInfo",
    "DeviceRemoved",
    "Disconnected",
    "Drain",
    "Driver",
    "DriverRegistry",
    "FrontChannel",
    "Frontend",
    "FrontendBus",
    "Handshake",
    "IllegalTransition",
    "ProtocolError",
    "RingGroup",
    "Role",
    "SharedRing",
    "UnknownDriver",
    "XenbusContext",
    "error_node",
    "load_driver",
]
