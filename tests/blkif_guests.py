"""Guest programs the blkif end-to-end tests boot (`init = "tests.blkif_guests:NAME"`).

Each prints what it checked on its console and ends with a line the test
waits for; a failed check is an exception, whose traceback lands on the
console too. The data written is `pattern(label, nbytes)`, so the test can
check the image file from outside.
"""

import errno
import hashlib
from typing import Any

import trio
import trio.lowlevel

from drivers.blkif import BlockDeviceError
from drivers.blkif.protocol import RW, SEGMENT_ARRAY, segment_words
from xenlike.abi.blkif import BLKIF_RSP_ERROR, BlkifOp

# (label, first sector, sectors): what `exercise` leaves on the disk.
WRITES = [
    ("small", 3, 3),
    ("44k", 100, 88),
    ("big", 1000, 4096 + 3),
    ("many", 20000, 64 * 8),
    ("reconnect", 30000, 128 * 8),
    ("batch", 40000, 150 * 8 + 2 * 4096),
]
# How "batch" is cut for write_many/read_many: more requests than the ring has
# slots, and more pages than blkfront's buffer pool holds at once.
BATCH_PIECES = [(40000 + 8 * i, 8) for i in range(150)] + [(41200, 4096), (45296, 4096)]
DISCARDED = (1000 + 8, 16)  # inside "big": reads back as zeros afterwards


def pattern(label: str, nbytes: int) -> bytes:
    return hashlib.shake_256(label.encode()).digest(nbytes)


async def exercise(guest: Any) -> None:
    """Reads, writes, flush, discard, many in flight, and a reconnect under load."""
    disk = guest.device("vbd")
    name = guest.name
    print(f"[{name}] {disk.sectors} sectors, features {disk.features}")
    for label, sector, count in WRITES[:3]:
        data = pattern(label, count * 512)
        await disk.write(sector, data)
        assert await disk.read(sector, count) == data, f"{label}: read back differs"
    await disk.flush()

    many = WRITES[3]
    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(
                disk.write,
                many[1] + 8 * i,
                pattern(many[0], many[2] * 512)[i * 4096 : (i + 1) * 4096],
            )
    results: dict[int, bytes] = {}

    async def read_page(i: int) -> None:
        results[i] = await disk.read(many[1] + 8 * i, 8)

    async with trio.open_nursery() as nursery:
        for i in range(64):
            nursery.start_soon(read_page, i)
    assert b"".join(results[i] for i in range(64)) == pattern(many[0], many[2] * 512)

    label, sector, count = WRITES[5]
    data = pattern(label, count * 512)
    await disk.write_many(
        [
            (start, data[(start - sector) * 512 : (start - sector + length) * 512])
            for start, length in BATCH_PIECES
        ]
    )
    pieces = await disk.read_many(reversed(BATCH_PIECES))
    assert b"".join(reversed(pieces)) == data, "batch: read_many differs from write_many"
    assert await disk.read(sector, count) == data, "batch: read back differs"
    buffers = [bytearray(length * 512) for _, length in BATCH_PIECES]
    await disk.readinto_many(zip((start for start, _ in BATCH_PIECES), buffers))
    assert b"".join(buffers) == data, "batch: readinto_many differs"
    own = disk.buffer(4096 * 512)  # the guest's own memory: indirect requests, no copy
    start = (41200 - sector) * 512
    await disk.readinto(41200, own)
    assert own == data[start : start + len(own)], "batch: readinto a disk buffer differs"
    own[:] = pattern("own", len(own))
    await disk.write(41200, own)
    assert await disk.read(41200, 4096) == own, "batch: a disk buffer's write differs"
    own[:] = data[start : start + len(own)]
    await disk.write(41200, own)
    try:
        await disk.readinto(sector, bytes(512))
    except TypeError:
        pass
    else:
        raise AssertionError("readinto filled a read-only buffer")

    await disk.discard(*DISCARDED)
    assert await disk.read(*DISCARDED) == bytes(DISCARDED[1] * 512)
    if disk.features["discard-secure"]:
        await disk.discard(DISCARDED[0], 1, secure=True)

    label, sector, count = WRITES[4]
    data = pattern(label, count * 512)
    async with trio.open_nursery() as nursery:
        for i in range(128):
            nursery.start_soon(disk.write, sector + 8 * i, data[i * 4096 : (i + 1) * 4096])
        await trio.lowlevel.checkpoint()
        await disk.front.reconnect()  # the driver under the program's Disk
    assert await disk.read(sector, count) == data, "writes lost across the reconnect"
    await disk.flush()
    print(
        f"[{name}] blk ok: reads, writes, flush, discard, 64 in flight, batches, 128 across "
        f"a reconnect"
    )
    await trio.sleep_forever()


async def read_only(guest: Any) -> None:
    """A read-only disk: reads work; writes are refused here and by the back end."""
    disk = guest.device("vbd")
    assert disk.readonly and not disk.features["flush-cache"] and not disk.features["discard"]
    assert await disk.read(0, 8) == pattern("ro", 4096)
    try:
        await disk.write(0, bytes(512))
    except BlockDeviceError as exc:
        assert exc.errno == errno.EROFS
    else:
        raise AssertionError("a write to a read-only disk went through")
    # Past blkfront's own check: the back end refuses the request itself.
    domain = guest.domain
    gfn = domain.allocator.allocate()
    ref = domain.grants.grant_access(disk.front.device.otherend_id, gfn)
    words = segment_words([ref], 8)
    response = await disk.front.call(
        RW.record(
            BlkifOp.WRITE, 1, disk.front.device.devid, 0, 0, SEGMENT_ARRAY(words.ljust(88, b"\0"))
        )
    )
    assert response.status == BLKIF_RSP_ERROR, response
    await disk.flush()  # nothing to flush: no feature, no request
    print(f"[{guest.name}] ro ok: reads work, writes refused (locally and by blkback)")
    await trio.sleep_forever()


async def durable(guest: Any) -> None:
    """Write, flush, say so, and wait to be killed."""
    disk = guest.device("vbd")
    await disk.write(4096, pattern("durable", 1 << 20))
    await disk.flush()
    print(f"[{guest.name}] flushed")
    await trio.sleep_forever()
