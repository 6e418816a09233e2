"""The guest program of tests/test_hotplug.py: it uses each device that comes, keeps
I/O going on it, and says how that I/O ended when the device goes."""

import errno
from typing import Any

import trio

from domains.guest import Guest

PATTERN = bytes(range(256)) * 16  # 4 KiB: 8 sectors


async def follow(guest: Guest) -> None:
    """Say what happens to each device attached after boot, on the console."""
    events = guest.device_events()
    print(f"[{guest.name}] waiting for devices")
    async with trio.open_nursery() as nursery:
        async for event in events:
            if event.action == "add" and event.type == "vbd":
                nursery.start_soon(_use_disk, guest, event.device)
            elif event.action == "add" and event.type == "vif":
                nursery.start_soon(_use_vif, guest, event.device)
            else:
                print(f"[{guest.name}] event: {event.action} {event.type} {event.devid}")


async def _use_disk(guest: Guest, disk: Any) -> None:
    assert await guest.wait_for_device("vbd", disk.device.devid) is disk
    await disk.write(8, PATTERN)
    assert await disk.read(8, 8) == PATTERN
    print(f"[{guest.name}] vbd {disk.device.devid}: wrote and read back {len(PATTERN)} bytes")
    await _until_gone(guest, f"vbd {disk.device.devid}", lambda: disk.read_many([(0, 8)] * 8))


async def _use_vif(guest: Guest, vif: Any) -> None:
    interface = next(i for i in guest.interfaces if i.vif is vif)
    await interface.ping("10.0.0.2", timeout=5)
    print(f"[{guest.name}] {interface.name}: ping 10.0.0.2 answered")
    sock = interface.udp(9)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_gone, guest, f"{interface.name} recvfrom", sock.recvfrom)
        await _until_gone(guest, f"{interface.name} ping", lambda: _ping(interface))


async def _ping(interface: Any) -> None:
    try:
        await interface.ping("10.0.0.2")
    except TimeoutError:  # a lost echo is not the end of the interface
        pass


async def _until_gone(guest: Guest, what: str, io: Any) -> None:
    """Keep `io()` going until the device goes; say how it ended."""
    try:
        while True:
            await io()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        print(f"[{guest.name}] {what} ended: {name} ({type(exc).__name__})")
