"""Guest programs for tests/test_blkif_frozen.py (init=)."""

from domains.guest import Guest


async def writer(guest: Guest) -> None:
    """Write sector 0 over and over, counting the writes done in data/writes: a
    disk whose I/O is stuck stops its own count, and no other."""
    import trio

    disk = guest.device("vbd")
    done = 0
    while True:
        await disk.write(0, done.to_bytes(8, "little") * 512)
        done += 1
        await guest.xs.write("data/writes", str(done))
        await trio.sleep(0.02)
