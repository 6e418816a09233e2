"""The default topology's guest program: shows the system working, on its console."""

from typing import Any

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
    if "vbd" in guest.devices:
        await disk_demo(guest)
    if guest.interfaces:
        await network_demo(guest)
    print(f"[{guest.name}] demo done; idle until `xenlike shutdown {guest.name}`")
    await trio.sleep_forever()


ECHO_PORT = 7  # RFC 862's UDP echo service


async def network_demo(guest: Guest) -> None:
    """Find a peer on the network (a broadcast to the echo port), ping it, and
    exchange a UDP message with it; the echo service prints what it receives."""
    iface = guest.net()
    print(f"[{guest.name}] eth0 {iface.mac.hex(':')} {iface.address}")
    if iface.address is None:
        print(f"[{guest.name}] eth0 has no address: its vif line names no ip=")
        return
    guest.domain.nursery.start_soon(_echo_service, guest, iface.udp(ECHO_PORT))
    broadcast = str(iface.address.network.broadcast_address)
    with iface.udp() as probe:
        peer = None
        with trio.move_on_after(30):
            while peer is None:
                await probe.sendto(b"who is there?", (broadcast, ECHO_PORT))
                with trio.move_on_after(0.5):
                    _, (peer, _) = await probe.recvfrom()
        if peer is None:
            print(f"[{guest.name}] no peer answered on {iface.address.network}")
            return
        rtt = await iface.ping(peer, timeout=2)
        print(f"[{guest.name}] ping {peer}: reply in {rtt * 1000:.2f} ms")
        await probe.sendto(f"hello from {guest.name}".encode(), (peer, ECHO_PORT))
        with trio.move_on_after(2):
            data, _ = await probe.recvfrom()
            print(f"[{guest.name}] udp echo from {peer}: {data.decode(errors='replace')}")


async def _echo_service(guest: Guest, sock: Any) -> None:
    while True:
        data, (host, port) = await sock.recvfrom()
        if data.startswith(b"hello"):
            print(f"[{guest.name}] udp from {host}:{port}: {data.decode(errors='replace')}")
        await sock.sendto(data, (host, port))


async def disk_demo(guest: Guest) -> None:
    """Write a pattern to the first disk, flush it, read it back, and say how it went."""
    disk = guest.device("vbd")
    pattern = (f"{guest.name} was here; ".encode() * 8192)[: 64 * 1024]
    sector = 2048  # 1 MiB in, clear of anything a partition table would use
    await disk.write(sector, pattern)
    await disk.flush()
    ok = await disk.read(sector, len(pattern) // disk.sector_size) == pattern
    features = ", ".join(name for name, on in disk.features.items() if on is True)
    print(
        f"[{guest.name}] xvda: {disk.sectors * disk.sector_size >> 20} MiB; wrote, flushed "
        f"and read back {len(pattern) >> 10} KiB: {'ok' if ok else 'MISMATCH'} ({features})"
    )
