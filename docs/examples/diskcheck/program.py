"""Write a pattern to the guest's disk, read it back three ways, flush."""

import trio


async def main(guest):
    disk = guest.device("vbd")  # blkfront, connected
    print(f"[{guest.name}] disk: {disk.sectors} sectors, features {disk.features}")

    pattern = bytes(range(256)) * 16  # 4 KiB: 8 sectors
    await disk.write(0, pattern)
    assert await disk.read(0, 8) == pattern

    # Many requests in one call: pushed together, one wake-up for all of them.
    await disk.write_many([(8 * i, pattern) for i in range(1, 33)])
    pages = await disk.read_many([(8 * i, 8) for i in range(1, 33)])
    assert all(page == pattern for page in pages)

    # Into buffers you keep: no new bytes object per read.
    buffers = [bytearray(4096) for _ in range(32)]
    await disk.readinto_many([(8 * i, buffer) for i, buffer in enumerate(buffers, 1)])
    assert all(buffer == pattern for buffer in buffers)

    # A disk buffer is guest memory: Dom0 reads straight into it.
    own = disk.buffer(4096)
    await disk.readinto(8, own)
    assert own == pattern

    await disk.flush()  # what was acknowledged survives a crash from here on
    print(f"[{guest.name}] disk check passed: 33 pages written, read back, flushed")
    await trio.sleep_forever()
