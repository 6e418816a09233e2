"""The default topology's guest program: shows the system working, on its console.

It is resumable (`Guest.resumable`): after its demo it counts, a tick a second,
in XenStore's `data/counter`; a save and restore carries the count on, and a
restored demo reads back what it wrote to its disk before the save. It also
pings the peer its network demo found, a ping a tick, counting the answers in
`data/ping-replies` and saying on its console when the peer stops answering
and when it answers again (a peer saved and restored does).
"""

from typing import Any

import trio

from domains.guest.system import Guest

TICK = 1.0  # seconds between counts


async def main(guest: Guest) -> None:
    state = guest.resumable(guest.resumed_state or {"counter": 0, "disk": None, "peer": None})
    if guest.resumed_state is not None:
        print(f"[{guest.name}] resumed in domain {guest.domid} at count {state['counter']}")
        if state["disk"] is not None and "vbd" in guest.devices:
            await check_disk(guest, state["disk"])
        if guest.interfaces and guest.net().address is not None:  # peers ping us again
            guest.domain.nursery.start_soon(_echo_service, guest, guest.net().udp(ECHO_PORT))
            if state.get("peer"):
                guest.domain.nursery.start_soon(keep_pinging, guest, state["peer"])
        await count(guest, state)
    print(f"[{guest.name}] hello from domain {guest.domid}")
    home = f"/local/domain/{guest.domid}"
    for key in ("name", "domid", "memory/target"):
        value = (await guest.xs.read(f"{home}/{key}")).decode()
        print(f"[{guest.name}] xenstore {key} = {value}")
    await guest.xs.write("data/greeting", f"hello from {guest.name}")
    print(f"[{guest.name}] devices: {', '.join(sorted(guest.devices)) or 'console only'}")
    if "vbd" in guest.devices:
        state["disk"] = await disk_demo(guest)
    if guest.interfaces:
        state["peer"] = await network_demo(guest)
        if state["peer"] is not None:
            guest.domain.nursery.start_soon(keep_pinging, guest, state["peer"])
    print(f"[{guest.name}] demo done; idle until `xenlike shutdown {guest.name}`")
    await count(guest, state)


async def count(guest: Guest, state: dict[str, Any]) -> None:
    """Count in data/counter for ever; the state holds the count a save keeps."""
    while True:
        await guest.xs.write("data/counter", str(state["counter"]))
        await trio.sleep(TICK)
        state["counter"] += 1


ECHO_PORT = 7  # RFC 862's UDP echo service


async def keep_pinging(guest: Guest, peer: str) -> None:
    """Ping `peer` once a tick for ever: `data/ping-replies` counts the answers; the
    console says when it stops answering and when it answers again."""
    iface = guest.net()
    replies, answering = 0, True
    while True:
        try:
            await iface.ping(peer, timeout=TICK)
        except Exception:  # no answer, or our own interface reconnecting after a suspend
            if answering:
                print(f"[{guest.name}] ping {peer}: no reply")
            answering = False
        else:
            replies += 1
            await guest.xs.write("data/ping-replies", str(replies))
            if not answering:
                print(f"[{guest.name}] ping {peer}: answered again")
            answering = True
        await trio.sleep(TICK)


async def network_demo(guest: Guest) -> str | None:
    """Find a peer on the network (a broadcast to the echo port), ping it, and
    exchange a UDP message with it; the echo service prints what it receives.
    Returns the peer's address (None if none answered)."""
    iface = guest.net()
    print(f"[{guest.name}] eth0 {iface.mac.hex(':')} {iface.address}")
    if iface.address is None:
        print(f"[{guest.name}] eth0 has no address: its vif line names no ip=")
        return None
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
            return None
        rtt = await iface.ping(peer, timeout=2)
        print(f"[{guest.name}] ping {peer}: reply in {rtt * 1000:.2f} ms")
        await probe.sendto(f"hello from {guest.name}".encode(), (peer, ECHO_PORT))
        with trio.move_on_after(2):
            data, _ = await probe.recvfrom()
            print(f"[{guest.name}] udp echo from {peer}: {data.decode(errors='replace')}")
    return str(peer)


async def _echo_service(guest: Guest, sock: Any) -> None:
    while True:
        data, (host, port) = await sock.recvfrom()
        if data.startswith(b"hello"):
            print(f"[{guest.name}] udp from {host}:{port}: {data.decode(errors='replace')}")
        await sock.sendto(data, (host, port))


DISK_SECTOR = 2048  # 1 MiB in, clear of anything a partition table would use


def _pattern(guest: Guest) -> bytes:
    return (f"{guest.name} was here; ".encode() * 8192)[: 64 * 1024]


async def check_disk(guest: Guest, sector: int) -> None:
    """After a restore: what the demo wrote before the save reads back the same."""
    disk = guest.device("vbd")
    pattern = _pattern(guest)
    ok = await disk.read(sector, len(pattern) // disk.sector_size) == pattern
    print(f"[{guest.name}] xvda after the restore: {'ok' if ok else 'MISMATCH'}")


async def disk_demo(guest: Guest) -> int:
    """Write a pattern to the first disk, flush it, read it back, and say how it went;
    returns where it wrote."""
    disk = guest.device("vbd")
    pattern = _pattern(guest)
    sector = DISK_SECTOR
    await disk.write(sector, pattern)
    await disk.flush()
    ok = await disk.read(sector, len(pattern) // disk.sector_size) == pattern
    features = ", ".join(name for name, on in disk.features.items() if on is True)
    print(
        f"[{guest.name}] xvda: {disk.sectors * disk.sector_size >> 20} MiB; wrote, flushed "
        f"and read back {len(pattern) >> 10} KiB: {'ok' if ok else 'MISMATCH'} ({features})"
    )
    return sector
