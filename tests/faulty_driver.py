"""A PV driver pair with bugs on purpose: each device's `fail-in` key names where
its driver raises (the back end's handle, features, connected, statistics or
background work, or the front end's connected), so a test sees that a
failing driver fails its device and nothing else.
"""

import trio
from construct import Int64ul, Struct

from domains.guest import Guest
from xenlike.ring import define_ring
from xenlike.xenbus import Backend, DeviceFailed, Driver, Frontend

FAULTY_RING = define_ring(
    "faulty",
    request=Struct("id" / Int64ul, "value" / Int64ul),
    response=Struct("id" / Int64ul, "value" / Int64ul),
)


class DriverBug(Exception):
    """What the driver raises where its `fail-in` key says."""


class FaultyBackend(Backend):
    device_type = "faulty"
    ring = FAULTY_RING

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.fail_in = "never"
        self.served = 0

    def features(self) -> dict[str, str | int]:
        return {"feature-faulty": 1}

    async def connected(self) -> None:
        self.fail_in = await self.read("fail-in", "never") or "never"
        if self.fail_in == "connected":
            raise DriverBug("connected on purpose")
        if self.fail_in == "statistics":
            self.start_background(self.publish_statistics, self._counters)
        if self.fail_in == "background":
            self.start_background(self._background)

    def _counters(self) -> dict[str, int]:
        if self.served:
            raise DriverBug("statistics on purpose")
        return {"served": self.served}

    async def _background(self) -> None:
        while not self.served:
            await trio.sleep(0.01)
        raise DriverBug("background work on purpose")

    async def handle(self, request):  # type: ignore[no-untyped-def]
        self.served += 1
        if self.fail_in == "handle" and request.value == 0:
            raise ZeroDivisionError("handle on purpose")
        return FAULTY_RING.response.record(id=request.id, value=request.value * 2)


class FaultyFrontend(Frontend):
    device_type = "faulty"
    ring = FAULTY_RING

    async def connected(self) -> None:
        if await self.read_otherend("fail-in", None) == "front-connected":
            raise DriverBug("the front end's connected on purpose")

    async def double(self, value: int) -> int:
        return (await self.call(FAULTY_RING.request.record(value=value))).value


class FeatureFailingBackend(FaultyBackend):
    """`features` runs before the back end reads its keys: a device type of its own."""

    device_type = "faulty-features"

    def features(self) -> dict[str, str | int]:
        raise DriverBug("features on purpose")


class FeatureFailingFrontend(FaultyFrontend):
    device_type = "faulty-features"


DRIVER = Driver("faulty", frontend=FaultyFrontend, backend=FaultyBackend)
FEATURES_DRIVER = Driver(
    "faulty-features", frontend=FeatureFailingFrontend, backend=FeatureFailingBackend
)


async def program(guest: Guest) -> None:
    """Call every faulty device: each answers, or says that it failed; then idle."""
    for device_type in ("faulty", "faulty-features"):
        for device in guest.devices.get(device_type, []):
            name = f"{device_type} {device.device.devid}"
            try:
                # Absence for a sound device, so a fixed wait: 3 s is three of the back
                # end's STATISTICS_INTERVALs, time for a raising statistics() or background
                # task to fail the device while the calls go on.
                with trio.move_on_after(3):
                    for value in (1, 0, *range(2, 1000)):
                        assert await device.double(value) == value * 2
                        await trio.sleep(0.05)
            except DeviceFailed as exc:
                print(f"[{guest.name}] {name}: failed: {exc}")
            else:
                print(f"[{guest.name}] {name}: ok")
    print(f"[{guest.name}] faulty done")
    await trio.sleep_forever()
