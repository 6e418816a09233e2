"""Guest programs for the save/restore tests (init=)."""

from domains.guest import Guest

SECTOR_A = 2048  # written, then discarded while the save happens
SECTOR_B = 4096  # written behind a barrier that waits for that discard


def _pattern(name: str, what: str) -> bytes:
    return (f"{name} {what}; ".encode() * 512)[:4096]


async def in_flight(guest: Guest) -> None:
    """Leave a write in flight for a save to catch: a DISCARD of sector A (its
    back end's thread blocks while the test keeps the image's file system
    frozen), a WRITE_BARRIER that waits for it, and a WRITE of sector B behind
    the barrier, pushed together once `data/go` is written. After a restore it
    says what sector A and sector B hold: the resubmitted requests landed
    before the program runs again."""
    import trio

    from drivers.blkif.protocol import DISCARD, RW
    from xenlike.abi.blkif import BlkifOp

    disk = guest.device("vbd")
    state = guest.resumable(guest.resumed_state or {"pushed": False})
    if guest.resumed_state is not None:
        a = await disk.read(SECTOR_A, 8)
        b = await disk.read(SECTOR_B, 8)
        print(f"[{guest.name}] after the restore: sector A discarded: {a == bytes(4096)}")
        print(
            f"[{guest.name}] after the restore: sector B written: {b == _pattern(guest.name, 'B')}"
        )
        await trio.sleep_forever()
    await disk.write(SECTOR_A, _pattern(guest.name, "A"))
    await disk.flush()
    print(f"[{guest.name}] ready")
    while True:
        try:
            await guest.xs.read("data/go")
            break
        except Exception:
            await trio.sleep(0.05)
    front, domain = disk.front, guest.domain
    devid, backend = front.device.devid, front.device.otherend_id
    gfn = domain.allocator.allocate()
    domain.memory.frame(gfn)[:] = _pattern(guest.name, "B")
    ref = domain.grants.grant_access(backend, gfn)  # writable: blkback maps persistently
    segment = (ref | (7 << 40)).to_bytes(8, "little") + bytes(80)  # gref, sectors 0..7
    # Two pushes: blkback's barrier waits for the I/O its threads have under way,
    # so the discard must be under way (a push earlier) when the barrier comes.
    pushes = [
        [DISCARD.record(BlkifOp.DISCARD, 0, devid, 0, SECTOR_A, 8)],
        [
            RW.record(BlkifOp.WRITE_BARRIER, 0, devid, 0, 0, bytes(88)),
            RW.record(BlkifOp.WRITE, 1, devid, 0, SECTOR_B, segment),
        ],
    ]
    pushed = 0
    for requests in pushes:
        guest.domain.nursery.start_soon(front.call_many, requests)
        pushed += len(requests)
        while front.channel is None or front.channel.in_flight < pushed:
            await trio.sleep(0.01)
    state["pushed"] = True
    print(f"[{guest.name}] {pushed} requests in flight")
    await trio.sleep_forever()
