"""The default topology's guest program: shows the system working, on its console."""

import trio

from domains.guest.system import Guest


async def main(guest: Guest) -> None:
    print(f"[{guest.name}] hello from domain {guest.domid}")
    home = f"/local/domain/{guest.domid}"
    for key in ("name", "domid", "memory/target"):
        value = (await guest.xs.read(f"{home}/{key}")).decode()
        print(f"[{guest.name}] xenstore {key} = {value}")
    await guest.xs.write("data/greeting", f"hello from {guest.name}")
    print(f"[{guest.name}] devices: {', '.join(sorted(guest.devices)) or 'console only'}")
    print(f"[{guest.name}] demo done; idle until `xenlike shutdown {guest.name}`")
    await trio.sleep_forever()
