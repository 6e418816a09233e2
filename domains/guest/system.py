"""`Guest`: what a guest program gets from its kernel."""

import math
from typing import Any, Literal

import attrs
import trio

from domains.guest.net import Interface
from xenlike.xenbus import DeviceFailed, DeviceRemoved

__all__ = ["DeviceEvent", "Guest"]


@attrs.frozen
class DeviceEvent:
    """A device that came ("add": its front end is connected, or failed) or went
    ("remove": the toolstack removed it and its front end has let go)."""

    action: Literal["add", "remove"]
    type: str
    devid: int
    device: Any  # what the program gets of the front end (`for_program`)


@attrs.define(eq=False)
class Guest:
    """The running guest, as its program sees it.

    `devices` maps each device type to its front ends, connected, in devid
    order, as each hands itself to programs (`for_program`: `guest.devices["vbd"][0]`
    is the first disk, blkfront's `Disk`). Each vif has an IP
    interface (`guest.net()`), up as soon as the guest is: it answers ARP
    and pings whatever the program does.

    Devices come and go while the guest runs (`xenlike block-attach`, ...):
    `devices` and `interfaces` follow, `wait_for_device` waits for one to
    come, and `device_events()` tells of each that comes or goes.

    A program that can be saved says so with `resumable(state)`: a dict of
    JSON values that it keeps current, which the kernel serializes when the
    domain suspends (a coroutine cannot be). After a restore, the program is
    called again, from its start, with that dict as `resumed_state` (None on
    a fresh boot). A program that never called `resumable` refuses suspends.
    """

    name: str
    domid: int
    domain: Any  # xenlike.domain.Domain: ports, grants, memory, hypercalls
    xs: Any  # xenlike.xenstore.Client over the guest's XenStore ring
    console: Any  # drivers.console.ConsoleFront
    devices: dict[str, list[Any]]
    cmdline: str
    interfaces: list[Interface] = attrs.field(init=False, factory=list)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _listeners: list[trio.MemorySendChannel[DeviceEvent]] = attrs.field(init=False, factory=list)
    resumed_state: dict[str, Any] | None = None
    state: dict[str, Any] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.interfaces = [
            Interface(vif, f"eth{i}") for i, vif in enumerate(self.devices.get("vif", []))
        ]

    async def wait_for_device(self, device_type: str, devid: int | None = None) -> Any:
        """The front end of device `devid` of that type (any, if None) once it is
        connected: at once if it is there, else when it is attached. DeviceFailed
        if it came but failed."""
        while True:
            for device in self.devices.get(device_type, []):
                if devid is None or device.device.devid == devid:
                    if device.failed is not None:
                        raise DeviceFailed(f"{device.device.nodename}: {device.failed}")
                    return device
            changed = self._changed
            await changed.wait()

    def device_events(self) -> trio.MemoryReceiveChannel[DeviceEvent]:
        """Each device that comes or goes from now on, as a DeviceEvent, until the
        channel is closed: `async for event in guest.device_events(): ...`."""
        send, receive = trio.open_memory_channel[DeviceEvent](math.inf)
        self._listeners.append(send)
        return receive

    def device_added(self, driver: Any) -> None:
        """The kernel's part: a front end came (connected or failed)."""
        device = driver.for_program()
        found = self.devices.setdefault(driver.device.type, [])
        if device in found:
            return
        found.append(device)
        found.sort(key=lambda d: d.device.devid)
        if driver.device.type == "vif":
            self.interfaces.append(Interface(device, f"eth{driver.device.devid}"))
        self._tell(DeviceEvent("add", driver.device.type, driver.device.devid, device))

    def device_removed(self, driver: Any) -> None:
        """The kernel's part: a front end went; its interface's sockets get ENODEV."""
        device = driver.for_program()
        found = self.devices.get(driver.device.type, [])
        if device not in found:
            return
        found.remove(device)
        for interface in [i for i in self.interfaces if i.vif is device]:
            interface.down(DeviceRemoved(f"{interface.name}: the device was removed"))
            self.interfaces.remove(interface)
        self._tell(DeviceEvent("remove", driver.device.type, driver.device.devid, device))

    def _tell(self, event: DeviceEvent) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for listener in list(self._listeners):
            try:
                listener.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.remove(listener)

    def resumable(self, state: dict[str, Any]) -> dict[str, Any]:
        """Make this program resumable: `state` (kept current by the program, JSON
        values only) is what a suspend saves; returns it."""
        if not isinstance(state, dict):
            raise TypeError(f"a resumable state is a dict, not {type(state).__name__}")
        self.state = state
        return state

    def net(self, index: int = 0) -> Interface:
        """The IPv4 interface of vif `index` (ping, UDP sockets)."""
        try:
            return self.interfaces[index]
        except IndexError:
            raise LookupError(f"{self.name} has no network interface #{index}") from None

    def device(self, device_type: str, index: int = 0) -> Any:
        try:
            return self.devices[device_type][index]
        except (KeyError, IndexError):
            raise LookupError(f"{self.name} has no {device_type} device #{index}") from None
