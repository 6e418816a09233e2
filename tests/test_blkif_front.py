"""blkfront without processes: real memory and ring, a scripted back end.

The front end under test is the real `BlkFront` over a `channel_pair`, in a
`LocalDomain` (real memory and page allocator); the back end is a few
lines here that answers each request as a test tells it to, reading and
writing the granted pages as blkback would.
"""

import errno
from collections.abc import Callable
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from drivers.blkif import BLKIF_RING, BlkFront, BlockDeviceError
from drivers.blkif.front import BufferPool
from drivers.blkif.protocol import RESPONSE, parse_segments, raw_segments
from xenlike.abi.blkif import BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BlkifOp
from xenlike.testing import LocalDomain, channel_pair
from xenlike.xenbus.driver import DeviceInfo, XenbusContext

SECTORS = 4096  # a 2 MiB disk


Answer = Callable[[Any], int]  # request -> status


async def serve(back: Any, guest: LocalDomain, disk: bytearray, answer: Answer) -> None:
    """A back end over `disk` that moves the data of the requests `answer` says OKAY to."""
    async for batch in back.batches_of_requests():
        responses = []
        for request in batch:
            status = answer(request)
            if status == BLKIF_RSP_OKAY:  # the tests' requests fill whole pages
                segments = parse_segments(raw_segments(request), request.nr_segments)
                offset = request.sector_number * 512
                for ref in segments.grefs:
                    page = guest.granted[ref]
                    if request.operation == BlkifOp.READ:
                        page[:] = disk[offset : offset + 4096]
                    else:
                        disk[offset : offset + 4096] = page
                    offset += 4096
            responses.append((request.id, request.operation, status))
        back.respond_many(responses)


async def front_end(
    nursery: trio.Nursery, answer: Answer = lambda request: BLKIF_RSP_OKAY, *, pool_pages: int = 64
) -> tuple[BlkFront, bytearray, LocalDomain]:
    guest = LocalDomain(512)
    front = BlkFront(XenbusContext(guest, None, nursery), DeviceInfo("vbd", 51712, "b", "f", 0))
    channel, back, _ = channel_pair(BLKIF_RING)
    front.channel = channel
    front.sectors = SECTORS
    front.feature_persistent = True
    front.pool = BufferPool(guest, 0, 11, max_pages=pool_pages)
    front._ready.set()
    disk = bytearray(SECTORS * 512)
    nursery.start_soon(channel.run)
    nursery.start_soon(serve, back, guest, disk, answer)
    return front, disk, guest


def pages_free(front: BlkFront) -> bool:
    assert front.pool is not None
    return all(chunk.free == b"\x01" * len(chunk.free) for chunk in front.pool.chunks)


async def test_batches_larger_than_the_ring_and_the_pool_go_in_rounds(nursery) -> None:
    front, disk, _ = await front_end(nursery, pool_pages=24)
    pieces = [(8 * i, bytes([i]) * 4096) for i in range(40)]  # 40 requests, 32 slots, 24 pages
    await front.write_many(pieces)
    assert disk[: 40 * 4096] == b"".join(data for _, data in pieces)
    assert await front.read_many([(sector, 8) for sector, _ in pieces]) == [
        data for _, data in pieces
    ]
    buffers = [bytearray(4096) for _ in pieces]
    await front.readinto_many(zip((sector for sector, _ in pieces), buffers))
    assert buffers == [bytearray(data) for _, data in pieces]
    assert pages_free(front) and front.pool.pages <= 24  # type: ignore[union-attr]


async def test_a_failed_request_fails_its_batch_and_gives_every_page_back(nursery) -> None:
    def answer(request: Any) -> int:
        return BLKIF_RSP_ERROR if request.sector_number == 16 else BLKIF_RSP_OKAY

    front, _, _ = await front_end(nursery, answer)
    with pytest.raises(BlockDeviceError, match="READ of sectors 16..23 failed") as failed:
        await front.read_many([(0, 8), (16, 8), (32, 8)])
    assert failed.value.errno == errno.EIO
    assert pages_free(front)


async def test_an_unsupported_answer_is_eopnotsupp(nursery) -> None:
    front, _, _ = await front_end(nursery, lambda request: BLKIF_RSP_EOPNOTSUPP)
    with pytest.raises(BlockDeviceError) as failed:
        await front.write(0, bytes(512))
    assert failed.value.errno == errno.EOPNOTSUPP and pages_free(front)


async def test_buffers_are_checked_before_anything_is_sent(nursery) -> None:
    sent: list[Any] = []

    def answer(request: Any) -> int:
        sent.append(request)
        return BLKIF_RSP_OKAY

    front, _, _ = await front_end(nursery, answer)
    with pytest.raises(TypeError, match="read-only"):
        await front.readinto(0, bytes(512))
    with pytest.raises(ValueError, match="whole 512-byte sectors"):
        await front.write_many([(0, bytes(512)), (8, bytes(100))])
    with pytest.raises(ValueError, match="not on a disk"):
        await front.read_many([(0, 8), (SECTORS - 4, 8)])
    assert sent == [] and pages_free(front)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "granted-per-request"])
async def test_disk_buffers_are_read_into_and_written_from_without_a_copy(
    nursery, persistent: bool
) -> None:
    frames: set[int] = set()  # the guest frames the requests named

    def answer(request: Any) -> int:
        segments = parse_segments(raw_segments(request), request.nr_segments)
        frames.update(guest.grants.entries[ref][0] for ref in segments.grefs)
        return BLKIF_RSP_OKAY

    front, disk, guest = await front_end(nursery, answer)
    front.feature_persistent = persistent
    buffer = front.buffer(30 * 4096)  # more than one request holds (11 pages each)
    own = front._buffers[id(buffer)].pages.extent
    own_frames = set(range(own.chunk.first_gfn, own.chunk.first_gfn + 30))
    buffer[:] = bytes(range(256)) * (30 * 16)
    await front.write(64, buffer)
    assert disk[64 * 512 : (64 + 240) * 512] == buffer
    disk[: 30 * 4096] = bytes(reversed(disk[64 * 512 : (64 + 240) * 512]))
    await front.readinto(0, buffer)
    assert buffer == disk[: 30 * 4096]
    assert frames == own_frames  # the buffer's own pages, not copies
    assert front.pool.pages == front.pool.kept == 30
    if not persistent:
        assert not guest.granted  # each request's grants were ended
    small = front.buffer(512)
    await front.readinto_many([(8, small), (16, buffer[:4096])])  # a slice is copied into
    assert small == disk[8 * 512 : 9 * 512] and buffer[:4096] == disk[16 * 512 : 24 * 512]
    assert front.pool.kept == 31 and front.pool.pages > 31
    with pytest.raises(ValueError, match="whole 512-byte sectors"):
        front.buffer(1000)
    for sector in (SECTORS, -1):  # checked as any buffer is
        with pytest.raises(ValueError, match="not on a disk"):
            await front.readinto(sector, small)
    with pytest.raises(BlockDeviceError, match="at most 64") as refused:
        front.buffer(64 * 4096)
    assert refused.value.errno == errno.ENOMEM
    # A released buffer's pages go back to the pool; the old view is dead.
    front.release(buffer)
    with pytest.raises(ValueError, match="released"):
        buffer[0]
    with pytest.raises(ValueError, match="not a disk buffer"):
        front.release(bytearray(512))
    again = front.buffer(20 * 4096)
    assert front.pool.kept == 21 and front._buffers[id(again)].pages.extent.chunk is own.chunk
    await front.readinto(0, again)
    assert again == disk[: 20 * 4096]


@given(
    st.sampled_from([BlkifOp.READ, BlkifOp.WRITE]),
    st.lists(
        st.tuples(st.integers(0, SECTORS - 1), st.integers(1, 13 * 8)), min_size=1, max_size=9
    ),
)
def test_disk_buffer_requests_are_those_of_the_plain_path(
    op: int, reads: list[tuple[int, int]]
) -> None:
    """readinto_many / write_many's fast path for whole disk buffers (one direct
    request each) sends exactly the requests the plain path (`_rw_many`) builds."""

    async def check() -> None:
        guest = LocalDomain(512)
        info = DeviceInfo("vbd", 51712, "b", "f", 0)
        front = BlkFront(XenbusContext(guest, None, None), info)  # type: ignore[arg-type]
        front.channel, _, _ = channel_pair(BLKIF_RING)
        front.sectors, front.feature_persistent, front.max_segments = SECTORS, True, 32
        front._ready.set()
        sent: list[list[Any]] = []

        async def call_many(requests: list[Any]) -> list[Any]:
            sent.append(list(requests))
            return [RESPONSE.record(0, op, BLKIF_RSP_OKAY) for _ in requests]

        front.call_many = call_many  # type: ignore[method-assign]
        pairs = [
            (min(sector, SECTORS - sectors), front.buffer(sectors * 512))
            for sector, sectors in reads
        ]
        fast = front._buffer_requests(op, pairs)
        if op == BlkifOp.READ:
            await front.readinto_many(pairs)
        else:
            await front.write_many(iter(pairs))
        items: list[Any] = []
        for sector, buffer in pairs:
            front._pieces(sector, buffer, items)
        await front._rw_many(op, items)
        plain = sent.pop()
        assert sent == [plain]
        whole = all(len(buffer) % 4096 == 0 and len(buffer) <= 11 * 4096 for _, buffer in pairs)
        assert (fast == plain) if whole else fast is None

    trio.run(check)


async def test_disk_buffer_requests_that_fail_raise_for_their_own_sectors(nursery) -> None:
    """The disk-buffer path checks each answer as the plain one does: a failed
    request, or one answered with another operation, fails the call with its
    own sectors, and the others' data still arrives."""

    def answer(request: Any) -> int:
        return BLKIF_RSP_ERROR if request.sector_number == 16 else BLKIF_RSP_OKAY

    front, disk, _ = await front_end(nursery, answer)
    disk[:] = bytes(range(256)) * (len(disk) // 256)
    buffers = [front.buffer(4096) for _ in range(3)]
    assert front._buffer_requests(BlkifOp.READ, list(zip((0, 16, 32), buffers))) is not None
    with pytest.raises(BlockDeviceError, match="READ of sectors 16..23 failed") as failed:
        await front.readinto_many(zip((0, 16, 32), buffers))
    assert failed.value.errno == errno.EIO
    assert buffers[0] == disk[:4096] and buffers[2] == disk[32 * 512 : 40 * 512]
    with pytest.raises(BlockDeviceError, match="WRITE of sectors 16..23 failed"):
        await front.write_many([(16, buffers[1])])
    confused, _, _ = await front_end(nursery, lambda request: BLKIF_RSP_OKAY)
    bad = confused.buffer(4096)

    async def call_many(requests: list[Any]) -> list[Any]:
        return [RESPONSE.record(0, BlkifOp.WRITE, BLKIF_RSP_OKAY) for _ in requests]

    confused.call_many = call_many  # type: ignore[method-assign]
    with pytest.raises(BlockDeviceError, match="answered operation 1") as wrong:
        await confused.readinto_many([(0, bad)])
    assert wrong.value.errno == errno.EIO
