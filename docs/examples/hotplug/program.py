"""Wait for a disk to be attached, use it, and notice when it is detached."""

import errno

import trio


async def main(guest):
    events = guest.device_events()  # from now on: devices that come and go
    print(f"[{guest.name}] waiting for xvdb")
    disk = await guest.wait_for_device("vbd", 51728)  # xvdb, once connected
    await disk.write(0, b"hotplug!" * 64)
    assert await disk.read(0, 1) == b"hotplug!" * 64
    print(f"[{guest.name}] xvdb: {disk.sectors} sectors, written and read back")

    async for event in events:
        if event.action == "remove" and event.device is disk:
            break
    try:
        await disk.read(0, 1)
    except OSError as exc:  # DeviceRemoved: the disk has gone
        print(f"[{guest.name}] xvdb removed: {errno.errorcode[exc.errno]}")
    await trio.sleep_forever()
