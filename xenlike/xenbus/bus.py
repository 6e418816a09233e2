"""Finding devices in XenStore and starting their drivers (xenbus probing).

`FrontendBus` runs in a guest: it watches the guest's own `device/` tree
and starts a front end for each `device/<type>/<devid>` whose type has a
driver. `BackendBus` runs in a driver domain: it watches `backend/` and
starts a back end for each `backend/<type>/<domid>/<devid>`, and stops it
when the toolstack removes the directory.

A driver that fails (its class cannot be made, or an exception escapes it
past `XenbusDriver`'s own handling) fails its device only: the bus logs it,
writes the device's error node, and keeps the device out of probing until the
toolstack removes it, so a broken driver is not restarted in a loop.

Devices come and go while the domain runs: a bus tells whoever listens
(`listen()`) of each driver it starts ("add") and of each it stops because
the toolstack removed its device ("remove"), once that driver has let go of
everything. A removed driver's waiters are woken first (`XenbusDriver.remove`).
"""

import errno
import logging
import math
from typing import Any, Generic, Literal, TypeVar

import attrs
import trio

from xenlike.abi.xenbus import XenbusState
from xenlike.xenbus.driver import (
    Backend,
    DeviceInfo,
    Frontend,
    XenbusContext,
    XenbusDriver,
    error_node,
)
from xenlike.xenbus.registry import DriverRegistry, UnknownDriver
from xenlike.xenstore import XenStoreError

__all__ = ["BackendBus", "BusEvent", "FrontendBus"]

log = logging.getLogger("xenlike.xenbus")

DriverT = TypeVar("DriverT", bound=XenbusDriver)


@attrs.frozen
class BusEvent:
    """A driver the bus started for a new device ("add"), or stopped after its
    device was removed ("remove")."""

    action: Literal["add", "remove"]
    driver: XenbusDriver


class _Bus(Generic[DriverT]):
    side: str

    def __init__(self, ctx: XenbusContext, registry: DriverRegistry) -> None:
        self.ctx = ctx
        self.registry = registry
        self.home = f"/local/domain/{ctx.domain.domid}"
        self.devices: dict[str, DriverT] = {}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._broken: set[str] = set()  # failed devices, left alone until removed
        self._listeners: list[trio.MemorySendChannel[BusEvent]] = []
        self.changed = trio.Event()

    def listen(self) -> trio.MemoryReceiveChannel[BusEvent]:
        """Every BusEvent from now on, until the channel is closed."""
        send, receive = trio.open_memory_channel[BusEvent](math.inf)
        self._listeners.append(send)
        return receive

    def _announce(self, event: BusEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener.send_nowait(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._listeners.remove(listener)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Probe now and whenever the tree changes, until cancelled."""
        root = f"{self.home}/{self.side}"
        async with trio.open_nursery() as nursery:
            async with self.ctx.xs.watch(root) as events:
                started = False
                async for _ in events:
                    await self._probe(nursery)
                    if not started:
                        started = True
                        task_status.started()

    async def _probe(self, nursery: trio.Nursery) -> None:
        seen = set()
        for info in await self._scan():
            seen.add(info.nodename)
            if info.nodename in self.devices or info.nodename in self._broken:
                continue
            try:
                driver = self._make(info)
            except UnknownDriver as exc:
                log.error("%s: %s", info.nodename, exc)
                await self._report(info, str(exc))
                self._broken.add(info.nodename)
                continue
            except Exception as exc:
                log.exception("%s: the %s driver cannot be started", info.nodename, info.type)
                await self._report(info, f"starting the driver raised {type(exc).__name__}: {exc}")
                self._broken.add(info.nodename)
                continue
            if driver is None:
                continue
            self.devices[info.nodename] = driver
            nursery.start_soon(self._run_driver, driver)
            self._announce(BusEvent("add", driver))
        self._broken &= seen
        for nodename in list(self.devices):
            if nodename not in seen:
                scope = self._scopes.pop(nodename, None)  # None: already stopping
                if scope is not None:
                    self.devices[nodename].remove()
                    scope.cancel()
        self.changed.set()
        self.changed = trio.Event()

    async def _run_driver(self, driver: XenbusDriver) -> None:
        nodename = driver.device.nodename
        with trio.CancelScope() as scope:
            self._scopes[nodename] = scope
            try:
                await driver.run()
            except XenStoreError as exc:
                log.warning("%s stopped: %s", nodename, exc)
            except Exception as exc:  # escaped the driver's own handling: this device only
                with trio.CancelScope(shield=True):
                    await driver.failed_with("the driver", exc)
                self._broken.add(nodename)
        with trio.CancelScope(shield=True):
            try:
                await driver.disconnect()
            except Exception as exc:
                log.warning("%s: disconnect failed: %s", nodename, exc)
            if driver.removed:
                try:
                    await driver.released()
                except Exception as exc:
                    log.warning("%s: releasing the removed device failed: %s", nodename, exc)
        self.devices.pop(nodename, None)
        self._scopes.pop(nodename, None)
        if driver.removed:
            self._announce(BusEvent("remove", driver))

    async def _report(self, info: DeviceInfo, message: str) -> None:
        """xenbus_dev_fatal for a device that has no driver object to say it."""
        try:
            await self.ctx.xs.write(error_node(info.nodename), f"{errno.EIO} {message}")
            await self.ctx.xs.write(f"{info.nodename}/state", str(int(XenbusState.Closing)))
        except XenStoreError as exc:
            log.warning("%s: %s", info.nodename, exc)

    async def _scan(self) -> list[DeviceInfo]:
        raise NotImplementedError

    def _make(self, info: DeviceInfo) -> DriverT | None:
        raise NotImplementedError


class FrontendBus(_Bus[Frontend]):
    side = "device"

    async def _scan(self) -> list[DeviceInfo]:
        found = []
        for device_type in await self.ctx.xs.ls_optional(f"{self.home}/device"):
            for devid in await self.ctx.xs.ls_optional(f"{self.home}/device/{device_type}"):
                nodename = f"{self.home}/device/{device_type}/{devid}"
                backend = await self.ctx.xs.read_optional(f"{nodename}/backend")
                backend_id = await self.ctx.xs.read_optional(f"{nodename}/backend-id")
                if backend is None or backend_id is None or not devid.isdigit():
                    continue  # the toolstack has not finished writing it
                found.append(
                    DeviceInfo(device_type, int(devid), nodename, backend, int(backend_id))
                )
        return found

    def _make(self, info: DeviceInfo) -> Frontend | None:
        if (reason := self.registry.unloadable(info.type)) is not None:
            raise UnknownDriver(reason)
        driver = self.registry.get(info.type).frontend if info.type in self.registry else None
        if driver is None:
            log.info("no front-end driver for %s", info.nodename)
            return None
        return driver(self.ctx, info)


class BackendBus(_Bus[Backend]):
    side = "backend"

    async def _scan(self) -> list[DeviceInfo]:
        found = []
        ls = self.ctx.xs.ls_optional
        for device_type in await ls(f"{self.home}/backend"):
            for domid in await ls(f"{self.home}/backend/{device_type}"):
                for devid in await ls(f"{self.home}/backend/{device_type}/{domid}"):
                    nodename = f"{self.home}/backend/{device_type}/{domid}/{devid}"
                    frontend = await self.ctx.xs.read_optional(f"{nodename}/frontend")
                    if frontend is None or not domid.isdigit() or not devid.isdigit():
                        continue
                    found.append(
                        DeviceInfo(device_type, int(devid), nodename, frontend, int(domid))
                    )
        return found

    def _make(self, info: DeviceInfo) -> Backend | None:
        if (reason := self.registry.unloadable(info.type)) is not None:
            raise UnknownDriver(reason)
        driver = self.registry.get(info.type).backend if info.type in self.registry else None
        if driver is None:
            log.info("no back-end driver for %s", info.nodename)
            return None
        return driver(self.ctx, info)
