"""Which driver serves which device type: built-ins, entry points, dotted names.

A driver package declares its pair once::

    DRIVER = Driver("echo", frontend=EchoFrontend, backend=EchoBackend)

and is found by name in a topology (`devices = [{ type = "echo",
driver = "mypkg.echo:DRIVER" }]`), or by the `xenlike.drivers` entry point
group of an installed package (`echo = "mypkg.echo:DRIVER"`).
"""

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from xenlike.xenbus.driver import Backend, Frontend

__all__ = ["Driver", "DriverRegistry", "UnknownDriver", "load_driver"]

ENTRY_POINT_GROUP = "xenlike.drivers"

# Named here: inside Driver, `type` is the field.
FrontendClass = type["Frontend"]
BackendClass = type["Backend"]


@attrs.frozen
class Driver:
    """A device type and the classes serving its two ends."""

    type: str
    frontend: FrontendClass | None = None
    backend: BackendClass | None = None


class UnknownDriver(LookupError):
    """No driver is registered for a device type."""


def load_driver(dotted: str) -> Driver:
    """ "package.module:NAME" (or "package.module", which must define DRIVER)."""
    module_name, _, attr = dotted.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in (attr or "DRIVER").split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise UnknownDriver(f"driver {dotted!r} cannot be loaded: {exc}") from None
    if not isinstance(target, Driver):
        raise UnknownDriver(f"{dotted!r} is a {type(target).__name__}, not a xenlike Driver")
    return target


class DriverRegistry:
    def __init__(self) -> None:
        self._drivers: dict[str, Driver] = {}
        self._unloadable: dict[str, str] = {}  # device type -> why its driver did not load

    def register(self, driver: Driver) -> Driver:
        self._drivers[driver.type] = driver
        return driver

    def register_dotted(self, dotted: str, device_type: str | None = None) -> Driver | None:
        """Load and register a driver by its dotted name.

        With `device_type` (what the topology says it serves), a driver that
        cannot be loaded is remembered instead of raised: that type's devices
        then fail with the reason (`unloadable`), and every other device runs.
        """
        try:
            return self.register(load_driver(dotted))
        except UnknownDriver as exc:
            if device_type is None:
                raise
            self._unloadable[device_type] = str(exc)
            return None

    def unloadable(self, device_type: str) -> str | None:
        """Why the driver named for `device_type` could not be loaded, if it could not."""
        return None if device_type in self._drivers else self._unloadable.get(device_type)

    def load_entry_points(self) -> None:
        """Every installed package's `xenlike.drivers` entry points."""
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            driver = entry.load()
            if not isinstance(driver, Driver):
                raise UnknownDriver(f"entry point {entry.name} = {entry.value} is not a Driver")
            self.register(driver)

    def get(self, device_type: str) -> Driver:
        try:
            return self._drivers[device_type]
        except KeyError:
            raise UnknownDriver(
                f"no driver for device type {device_type!r}; "
                f"known: {', '.join(sorted(self._drivers)) or 'none'}"
            ) from None

    def __contains__(self, device_type: str) -> bool:
        return device_type in self._drivers

    def types(self) -> list[str]:
        return sorted(self._drivers)
