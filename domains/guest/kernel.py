"""The guest kernel's boot sequence (see the package docstring)."""

import functools
import json
import sys
import traceback
from typing import Any

import trio

from domains.guest.system import Guest
from drivers.console import ConsoleFront, ConsoleWriter
from xenlike.abi.sched import ShutdownReason
from xenlike.bytering import XENSTORE, ByteRing, ByteRingStream
from xenlike.domain import Domain, load_kernel
from xenlike.domain.balloon import Balloon
from xenlike.save_abi import MAX_CONTEXT
from xenlike.xenbus import (
    BusEvent,
    DeviceFailed,
    DriverRegistry,
    Frontend,
    FrontendBus,
    UnknownDriver,
    XenbusContext,
)
from xenlike.xenstore import XenStoreError, connect_stream

__all__ = ["main", "parse_cmdline", "preload"]

CONNECT_TIMEOUT = 30.0  # seconds the front ends get to reach Connected
SHUTDOWN_REQUESTS = {
    "poweroff": ShutdownReason.poweroff,
    "halt": ShutdownReason.poweroff,
    "reboot": ShutdownReason.reboot,
    "crash": ShutdownReason.crash,
}


def parse_cmdline(cmdline: str) -> tuple[dict[str, str], str]:
    """The kernel's own `key=value` words, and the rest for the program (xl's `extra`)."""
    ours: dict[str, str] = {}
    rest = []
    for word in cmdline.split():
        key, eq, value = word.partition("=")
        if eq and key in ("init", "drivers"):
            ours[key] = value
        else:
            rest.append(word)
    return ours, " ".join(rest)


def preload() -> None:
    """Called while the domain's process is held, before its first unpause: the
    built-in drivers load then, not in the boot (after a migration, in the downtime)."""
    _builtin_drivers()


@functools.cache  # one kernel per process: the registry its boot extends
def _builtin_drivers() -> DriverRegistry:
    registry = DriverRegistry()
    registry.load_entry_points()  # the built-in drivers are entry points too
    return registry


async def main(domain: Domain) -> None:
    params, extra = parse_cmdline(domain.cmdline)
    info = domain.start_info
    async with trio.open_nursery() as nursery:
        console_port = await domain.evtchn.port(info.console.domU.evtchn)
        console = ConsoleFront(domain.memory.frame(domain.layout.console_gfn), console_port)
        nursery.start_soon(console.run)
        sys.stdout = sys.stderr = ConsoleWriter(console)
        try:
            reason = await _run(domain, console, params, extra, nursery)
        finally:
            await console.drain()
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        await domain.shutdown(reason)
        nursery.cancel_scope.cancel()


async def _run(
    domain: Domain, console: ConsoleFront, params: dict[str, str], extra: str, nursery: trio.Nursery
) -> int:
    store_port = await domain.evtchn.port(domain.start_info.store_evtchn)
    page = domain.memory.frame(domain.layout.store_gfn)
    stream = ByteRingStream(
        ByteRing(page, XENSTORE.to_backend), ByteRing(page, XENSTORE.to_guest), store_port
    )
    nursery.start_soon(stream.pump)
    async with connect_stream(stream) as xs:
        name = (await xs.read("name")).decode()
        init = params.get("init")
        try:  # a program that cannot be loaded crashes the boot before it advertises itself
            program = load_kernel(init) if init else None
        except Exception as exc:
            print(f"[{name}] init={init} cannot be loaded: {exc}")
            return ShutdownReason.crash
        registry = _builtin_drivers()
        for word in filter(None, params.get("drivers", "").split(",")):
            device_type, _, dotted = word.rpartition("@")  # TYPE@module:NAME
            try:
                if registry.register_dotted(dotted, device_type or None) is None:
                    print(f"[{name}] {registry.unloadable(device_type)}")  # its devices fail
            except UnknownDriver as exc:  # no type to fail: its devices stay unconnected
                print(f"[{name}] {exc}")
        context = await _saved_context(domain)
        in_flight = _claim_frames(domain, context.get("devices", {}))
        ctx = XenbusContext(domain, xs, nursery)
        bus = FrontendBus(ctx, registry)
        await nursery.start(bus.run)
        balloon = Balloon(domain, log=lambda line: print(f"[{name}] {line}"))
        await nursery.start(balloon.run, xs)
        events = bus.listen()  # devices attached or removed from now on
        print(
            f"[{name}] xenlike guest kernel, domain {domain.domid}, "
            f"{domain.start_info.nr_pages * 4 // 1024} MiB"
        )
        resumed = _resumed_state(context, name)
        devices = await _wait_for_devices(bus, name)
        await _recover(bus, in_flight, domain, name)
        await _advertise_shutdown(xs)
        guest = Guest(name, domain.domid, domain, xs, console, devices, extra, resumed)
        nursery.start_soon(_follow_devices, guest, events)
        return await _run_program(guest, program, xs, init, bus)


async def _saved_context(domain: Domain) -> dict[str, Any]:
    """The execution state this domain was restored with (empty on a fresh boot)."""
    context = await domain.resume_context()
    return json.loads(context) if context else {}


def _resumed_state(context: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The program's state this domain was restored with (None on a fresh boot)."""
    if "state" not in context:
        return None
    state = context["state"]
    print(f"[{name}] resuming from a saved state")
    return state if isinstance(state, dict) else None


def _claim_frames(domain: Domain, devices: dict[str, Any]) -> dict[str, Any]:
    """Keep the frames of requests that were in flight at the save (their data) out
    of the allocator until their front ends have resubmitted them: claimed before
    any front end allocates its ring. Returns the shadows by device, as "vbd/51712"
    (a device's path names the old domain)."""
    for shadow in devices.values():
        for gfn, pages in shadow.get("frames", ()):
            domain.allocator.claim_run(gfn, pages)
    return devices


async def _recover(bus: FrontendBus, in_flight: dict[str, Any], domain: Domain, name: str) -> None:
    """blkif_recover for every front end that had requests in flight at the save:
    they land before the program resumes, so what it reads is what it wrote."""
    for driver in list(bus.devices.values()):
        shadow = in_flight.get(f"{driver.device.type}/{driver.device.devid}")
        recover = getattr(driver, "recover", None)
        if shadow is None or recover is None:
            continue
        what = f"[{name}] {driver.device.type} {driver.device.devid}"
        try:
            count = await recover(shadow)
        except Exception as exc:  # its frames stay claimed: the back end may still map them
            print(f"{what}: requests in flight at the save NOT resubmitted: {exc}")
            continue
        for gfn, pages in shadow.get("frames", ()):
            domain.allocator.free_run(gfn, pages)
        print(f"{what}: {count} request(s) in flight at the save resubmitted")


async def _wait_for_devices(bus: FrontendBus, name: str) -> dict[str, list[Any]]:
    """Every front end connected or failed (or the timeout, which the program then
    sees): a failed device is the program's to notice, not the boot's to wait for."""
    with trio.move_on_after(CONNECT_TIMEOUT):
        for driver in list(bus.devices.values()):
            try:
                await driver.wait_connected()
            except DeviceFailed:
                pass
    devices: dict[str, list[Any]] = {}
    for driver in sorted(bus.devices.values(), key=lambda d: (d.device.type, d.device.devid)):
        devices.setdefault(driver.device.type, []).append(driver.for_program())
        state = (
            "connected"
            if driver.connected_now
            else f"FAILED: {driver.failed}"
            if driver.failed
            else "NOT connected"
        )
        print(f"[{name}] {driver.device.type} {driver.device.devid}: {state}")
    return devices


async def _follow_devices(guest: Guest, events: trio.MemoryReceiveChannel[BusEvent]) -> None:
    """Devices that come and go after boot, into `guest.devices` (hotplug): one
    that comes is the program's once its front end is connected (or failed)."""

    async def arrive(driver: Any) -> None:
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                await driver.wait_connected()
            except DeviceFailed:
                pass
        if not driver.removed:
            state = "connected" if driver.connected_now else f"FAILED: {driver.failed}"
            print(f"[{guest.name}] {driver.device.type} {driver.device.devid} attached: {state}")
            guest.device_added(driver)

    async with trio.open_nursery() as nursery:
        async for event in events:
            if event.action == "add":
                nursery.start_soon(arrive, event.driver)
            else:
                guest.device_removed(event.driver)
                print(
                    f"[{guest.name}] {event.driver.device.type} {event.driver.device.devid} removed"
                )


async def _advertise_shutdown(xs: Any) -> None:
    """control/feature-*: tell the toolstack which requests this kernel honours."""
    for feature in ("poweroff", "reboot", "suspend"):
        try:
            await xs.write(f"control/feature-{feature}", "1")
        except XenStoreError:
            pass


async def _run_program(
    guest: Guest, init: Any, xs: Any, init_name: str | None, bus: FrontendBus
) -> int:
    """Run the program until it ends or the toolstack asks for a shutdown."""
    reason = ShutdownReason.poweroff
    async with trio.open_nursery() as nursery:

        async def program() -> None:
            nonlocal reason
            if init is None:
                print(f"[{guest.name}] no init= program; idling until shut down")
                await trio.sleep_forever()
            try:
                await init(guest)
            except Exception:
                traceback.print_exc()
                reason = ShutdownReason.crash
            nursery.cancel_scope.cancel()

        async def watch_shutdown() -> None:
            nonlocal reason
            async with xs.watch("control/shutdown") as events:
                async for _ in events:
                    try:
                        request = (await xs.read("control/shutdown")).decode()
                    except XenStoreError:
                        continue
                    if request == "suspend":
                        await _suspend(guest, xs, init_name, bus)
                    elif request in SHUTDOWN_REQUESTS:
                        print(f"[{guest.name}] shutdown requested: {request}")
                        await xs.write("control/shutdown", "")
                        reason = SHUTDOWN_REQUESTS[request]
                        nursery.cancel_scope.cancel()
                        return

        nursery.start_soon(program)
        nursery.start_soon(watch_shutdown)
    return reason


SUSPEND_ERROR = "error/suspend"  # why this kernel refused the last suspend, for the toolstack


async def _suspend(guest: Guest, xs: Any, init: str | None, bus: FrontendBus) -> None:
    """Linux's do_suspend, for a program: freeze the front ends (new requests wait;
    those in flight stay in flight, not waited for), leave the program's state
    and the front ends' shadows of their requests in flight as the vCPU's,
    acknowledge the request by clearing control/shutdown (libxl waits for
    that), and SCHEDOP_shutdown(SHUTDOWN_suspend). That returns only if Dom0
    resumes this domain in place (a checkpoint): the program never stopped,
    and each front end does its handshake again with its back end,
    resubmitting what was in flight. A program that is not resumable refuses:
    the reason goes to error/suspend before the acknowledgement, and the
    guest runs on."""
    refusal = None
    context = b""
    fronts = [driver for driver in bus.devices.values() if isinstance(driver, Frontend)]
    if guest.state is None:
        refusal = f"{init or 'the idle kernel'} is not resumable (see Guest.resumable)"
    else:
        try:
            state = json.dumps(guest.state)
        except (TypeError, ValueError) as exc:
            refusal = f"{init}'s state cannot be saved: {exc}"
        else:
            for front in fronts:
                await front.suspend()
            devices = {
                f"{front.device.type}/{front.device.devid}": shadow
                for front in fronts
                if (shadow := _shadow(front)) is not None
            }
            context = (
                f'{{"init": {json.dumps(init)}, "state": {state}, '
                f'"devices": {json.dumps(devices)}}}'
            ).encode()
            if len(context) > MAX_CONTEXT:
                refusal = f"{init}'s state is {len(context)} bytes, more than {MAX_CONTEXT}"
                for front in fronts:
                    await front.resume()
    try:
        if refusal is not None:
            await xs.write(SUSPEND_ERROR, refusal)
        else:
            await xs.rm(SUSPEND_ERROR)
    except XenStoreError:
        pass
    await xs.write("control/shutdown", "")
    if refusal is not None:
        print(f"[{guest.name}] suspend refused: {refusal}")
        return
    print(f"[{guest.name}] suspending")
    await guest.console.drain()
    try:
        cancelled = await guest.domain.suspend(context) == 1
    finally:  # cancelled, or refused by the hypervisor: the devices come back
        for front in fronts:
            await front.resume()
    if cancelled:
        print(f"[{guest.name}] resumed in place (the suspend was cancelled)")
    with trio.move_on_after(CONNECT_TIMEOUT):
        for front in fronts:
            try:
                await front.wait_connected()
            except DeviceFailed:
                pass
    for front in sorted(fronts, key=lambda d: (d.device.type, d.device.devid)):
        state = "reconnected" if front.connected_now else f"NOT reconnected: {front.failed}"
        print(f"[{guest.name}] {front.device.type} {front.device.devid}: {state}")


def _shadow(front: Frontend) -> dict[str, Any] | None:
    """A front end's record of its requests in flight (blkfront's `shadow`), if it
    keeps one and has any."""
    shadow = getattr(front, "shadow", None)
    if shadow is None:
        return None
    recorded = shadow()
    return recorded if recorded.get("requests") else None
