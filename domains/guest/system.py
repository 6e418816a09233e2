"""`Guest`: what a guest program gets from its kernel."""

from typing import Any

import attrs

from domains.guest.net import Interface

__all__ = ["Guest"]


@attrs.define(eq=False)
class Guest:
    """The running guest, as its program sees it.

    `devices` maps each device type to its front ends, connected, in devid
    order, as each hands itself to programs (`for_program`: `guest.devices["vbd"][0]`
    is the first disk, blkfront's `Disk`). Each vif has an IP
    interface (`guest.net()`), up as soon as the guest is: it answers ARP
    and pings whatever the program does.

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
    resumed_state: dict[str, Any] | None = None
    state: dict[str, Any] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.interfaces = [
            Interface(vif, f"eth{i}") for i, vif in enumerate(self.devices.get("vif", []))
        ]

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
