"""`Guest`: what a guest program gets from its kernel."""

from typing import Any

import attrs

__all__ = ["Guest"]


@attrs.define(eq=False)
class Guest:
    """The running guest, as its program sees it.

    `devices` maps each device type to its front ends, connected, in devid
    order (`guest.devices["vbd"][0]` is the first disk).
    """

    name: str
    domid: int
    domain: Any  # xenlike.domain.Domain: ports, grants, memory, hypercalls
    xs: Any  # xenlike.xenstore.Client over the guest's XenStore ring
    console: Any  # drivers.console.ConsoleFront
    devices: dict[str, list[Any]]
    cmdline: str

    def device(self, device_type: str, index: int = 0) -> Any:
        try:
            return self.devices[device_type][index]
        except (KeyError, IndexError):
            raise LookupError(f"{self.name} has no {device_type} device #{index}") from None
