"""blkif without I/O: the request union, segment lists, blkfront's buffers, Dom0's disks."""

import fcntl
import os
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from domains.dom0.hw import Disk, create_image, create_images
from drivers.blkif import BLKIF_RING, BufferPool, FrontParams
from drivers.blkif.protocol import (
    BLKIF_REQUEST,
    DISCARD,
    INDIRECT,
    RW,
    SEGMENT_ARRAY,
    BadRequest,
    indirect_pages,
    parse_segments,
    segment_words,
)
from xenlike.abi import blkif
from xenlike.memory import DomainMemory, PageAllocator
from xenlike.topology import parse_topology

# --- the ring -------------------------------------------------------------------------


def test_the_ring_has_xens_sizes() -> None:
    assert (BLKIF_RING.entry_size, BLKIF_RING.nr_ents(1), BLKIF_RING.nr_ents(16)) == (112, 32, 512)
    assert BLKIF_REQUEST.size == 112 and blkif.BLKIF_SEGS_PER_INDIRECT_FRAME == 512


def _segment(gref: int, first: int, last: int) -> dict[str, int]:
    return {"gref": gref, "first_sect": first, "last_sect": last}


RW_FIELDS = {
    "operation": 1,
    "nr_segments": 2,
    "handle": 51712,
    "id": 0xDEADBEEF,
    "sector_number": 12345,
    "seg": [_segment(10, 0, 7), _segment(11, 1, 3)] + [_segment(0, 0, 0)] * 9,
}
DISCARD_FIELDS = {
    "operation": 5,
    "flag": 1,
    "handle": 51712,
    "id": 7,
    "sector_number": 100,
    "nr_sectors": 2**40,
}
INDIRECT_FIELDS = {
    "operation": 6,
    "indirect_op": 0,
    "nr_segments": 300,
    "id": 9,
    "sector_number": 8,
    "handle": 51712,
    "indirect_grefs": [55, 56, 0, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize(
    "record,layout,fields",
    [
        (
            RW.record(blkif.BLKIF_OP_WRITE, 2, 51712, 0xDEADBEEF, 12345, [(10, 0, 7), (11, 1, 3)]),
            blkif.blkif_request,
            RW_FIELDS,
        ),
        (
            DISCARD.record(
                blkif.BLKIF_OP_DISCARD, blkif.BLKIF_DISCARD_SECURE, 51712, 7, 100, 2**40
            ),
            blkif.blkif_request_discard,
            DISCARD_FIELDS,
        ),
        (
            INDIRECT.record(
                blkif.BLKIF_OP_INDIRECT, blkif.BLKIF_OP_READ, 300, 9, 8, 51712, (55, 56)
            ),
            blkif.blkif_request_indirect,
            INDIRECT_FIELDS,
        ),
    ],
    ids=["rw", "discard", "indirect"],
)
def test_each_variant_packs_as_construct_builds_it_and_decodes_by_operation(
    record: object, layout: object, fields: dict
) -> None:
    slot = bytearray(b"\xaa" * 112)  # a stale slot: whatever it held must not survive
    BLKIF_REQUEST.pack_into(slot, 0, record)
    assert bytes(slot) == layout.build(fields).ljust(112, b"\0")  # type: ignore[attr-defined]
    decoded = BLKIF_REQUEST.unpack_from(slot, 0)
    assert type(decoded) is type(record)
    assert BLKIF_REQUEST.pack(decoded) == bytes(slot)


def test_the_slot_is_copied_once_before_the_variant_is_chosen() -> None:
    slot = bytearray(112)
    BLKIF_REQUEST.pack_into(slot, 0, DISCARD.record(blkif.BLKIF_OP_DISCARD, 0, 1, 2, 3, 4))
    view = memoryview(slot)
    request = BLKIF_REQUEST.unpack_from(view, 0)
    slot[0] = blkif.BLKIF_OP_INDIRECT  # the front end changes its mind: too late
    assert type(request) is DISCARD.record and request.nr_sectors == 4
    assert type(BLKIF_REQUEST.unpack_from(bytes([7]) + bytes(111), 0)) is RW.record  # unknown op


def test_a_run_of_slots_decodes_each_variant_by_its_operation() -> None:
    records = [
        RW.record(blkif.BLKIF_OP_READ, 1, 1, 1, 8, [(5, 0, 7)]),
        DISCARD.record(blkif.BLKIF_OP_DISCARD, 0, 1, 2, 3, 4),
        INDIRECT.record(blkif.BLKIF_OP_INDIRECT, blkif.BLKIF_OP_WRITE, 300, 3, 8, 1, (9,)),
        RW.record(9, 0, 1, 4),
    ]  # an unknown operation reads as blkif_request
    run = b"".join(BLKIF_REQUEST.pack(record) for record in records)
    decoded = BLKIF_REQUEST.slots_unpacker(112)(run)
    assert [type(d) for d in decoded] == [RW.record, DISCARD.record, INDIRECT.record, RW.record]
    assert decoded == [BLKIF_REQUEST.unpack_from(run, 112 * i) for i in range(4)]


# --- segment lists ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pages,sectors", [(1, 1), (1, 8), (3, 20), (11, 88), (256, 2048), (300, 2393)]
)
def test_packed_segment_lists_round_trip(pages: int, sectors: int) -> None:
    refs = list(range(1000, 1000 + pages))
    raw = segment_words(refs, sectors)
    assert len(raw) == 8 * pages
    assert struct.unpack_from("<IBB", raw, 0) == (1000, 0, 7 if pages > 1 else sectors - 1)
    parsed = parse_segments(raw, pages)
    assert parsed.grefs == refs and parsed.nr_sectors == sectors and parsed.bounds is None
    assert parsed.run


@pytest.mark.parametrize("refs", [[5, 5, 7], [5, 9, 7], [7, 6, 5], [5, 6, 8]])
def test_only_consecutive_grefs_are_a_run(refs: list[int]) -> None:
    """blkback reads a run as one range of its mapping: [5, 5, 7] spans the same
    distance as 5..7 but is not a run."""
    parsed = parse_segments(segment_words(refs, 24), 3)
    assert parsed.grefs == refs and not parsed.run


def test_a_sector_count_that_does_not_fit_the_pages_is_refused() -> None:
    with pytest.raises(ValueError):
        segment_words([1, 2], 8)  # the second page would be empty
    with pytest.raises(ValueError):
        segment_words([1], 9)


def test_unpacked_segments_keep_their_sectors_and_padding_is_ignored() -> None:
    raw = struct.pack("<IBBH", 5, 2, 3, 0xFFFF) + struct.pack("<IBBH", 6, 0, 7, 0)
    parsed = parse_segments(raw, 2)
    assert parsed.grefs == [5, 6] and parsed.nr_sectors == 10
    assert parsed.bounds == [(1024, 2048), (0, 4096)]


@pytest.mark.parametrize("first,last", [(3, 2), (0, 8), (8, 8), (255, 255)])
def test_segments_outside_their_page_are_refused(first: int, last: int) -> None:
    raw = struct.pack("<IBBxx", 5, 0, 7) + struct.pack("<IBBxx", 6, first, last)
    with pytest.raises(BadRequest, match="segment 1"):
        parse_segments(raw, 2)


def test_a_list_shorter_than_its_count_is_refused() -> None:
    with pytest.raises(BadRequest):
        parse_segments(bytes(16), 3)


def test_indirect_pages() -> None:
    assert [indirect_pages(n) for n in (1, 512, 513, 4096)] == [1, 1, 2, 8]


def test_seg_array_takes_raw_segment_bytes() -> None:
    raw = segment_words([42], 8).ljust(88, b"\0")
    slot = bytearray(112)
    BLKIF_REQUEST.pack_into(slot, 0, RW.record(0, 1, 0, 1, 0, SEGMENT_ARRAY(raw)))
    assert slot[24:112] == raw


# --- blkfront's parameters and buffers ---------------------------------------------------


def test_module_parameters_come_from_the_kernel_command_line() -> None:
    params = FrontParams.from_cmdline(
        "init=x:y xen_blkfront.feature_persistent=0 quiet "
        "xen_blkfront.max_indirect_segments=64 "
        "xen_blkfront.max_ring_page_order=9 other.thing=1"
    )
    assert params == FrontParams(
        feature_persistent=False, max_indirect_segments=64, max_ring_page_order=4
    )
    assert FrontParams.from_cmdline("") == FrontParams()
    with pytest.raises(ValueError, match="max_indirect_segments=lots"):
        FrontParams.from_cmdline("xen_blkfront.max_indirect_segments=lots")


class _Grants:
    def __init__(self) -> None:
        self.granted: list[tuple[int, int, bool]] = []

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        self.granted.append((domid, gfn, readonly))
        return 1000 + len(self.granted)


def _guest(pages: int) -> SimpleNamespace:
    return SimpleNamespace(
        memory=DomainMemory.create(pages), allocator=PageAllocator(10, pages), grants=_Grants()
    )


async def test_the_pool_lends_contiguous_runs_and_grows_by_chunks_up_to_its_limit() -> None:
    guest = _guest(200)
    pool = BufferPool(guest, 0, chunk_pages=12, max_pages=24)
    a = pool.take_nowait(11)
    b = pool.take_nowait(1)
    assert (a.chunk, a.start, b.chunk, b.start) == (b.chunk, 0, a.chunk, 11)
    c = pool.take_nowait(5)
    assert c is not None and c.chunk is not a.chunk and pool.pages == 24
    assert pool.take_nowait(8) is None  # no room, no growth past max_pages
    a.view()[:5] = b"hello"
    assert bytes(guest.memory.frame(a.chunk.first_gfn)[:5]) == b"hello"

    async def give_later() -> None:
        await trio.testing.wait_all_tasks_blocked()  # take() is waiting for room
        pool.give(a)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(give_later)
        with trio.fail_after(2):
            d = await pool.take(8)
    assert (d.chunk, d.start) == (a.chunk, 0)


async def test_persistent_grants_cover_a_whole_chunk_in_page_order() -> None:
    guest = _guest(100)
    pool = BufferPool(guest, 3, chunk_pages=4)
    extent = pool.take_nowait(2)
    assert pool.persistent_refs(extent, 0, 2) == [1001, 1002]
    first = extent.chunk.first_gfn
    assert guest.grants.granted == [(3, first + i, False) for i in range(4)]
    granted: list[int] = []
    other = pool.take_nowait(1)
    assert pool.request_refs(other, 0, 1, True, granted) == [1003]  # its persistent grant
    fresh = BufferPool(guest, 3, chunk_pages=2)
    ext = fresh.take_nowait(2)
    assert fresh.request_refs(ext, 0, 2, True, granted) == [1005, 1006] and granted == [1005, 1006]
    assert guest.grants.granted[-1] == (3, ext.chunk.first_gfn + 1, True)


# --- Dom0's disks -------------------------------------------------------------------------


def test_images_are_created_sparse_once(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.img"
    assert create_image(path, 64 << 20)
    assert path.stat().st_size == 64 << 20 and path.stat().st_blocks == 0
    path.write_bytes(b"x" * 4096)
    assert not create_image(path, 64 << 20)  # never touched again
    assert path.read_bytes() == b"x" * 4096
    with pytest.raises(ValueError):
        create_image(tmp_path / "b.img", 1000)


def test_dom0_creates_the_topologys_images_in_the_run_directory(tmp_path: Path) -> None:
    text = '[dom0]\nimages = { "a.img" = "1M", "b.img" = "2M", "sub/c.img" = "1M" }\n'
    topology = parse_topology(text, "t.toml", source=tmp_path / "t.toml")
    run = tmp_path / "run"
    run.mkdir()
    (run / "b.img").write_bytes(b"keep")
    assert create_images(topology, run) == [run / "a.img", run / "sub" / "c.img"]
    assert (run / "a.img").stat().st_size == 1 << 20
    assert (run / "b.img").read_bytes() == b"keep"
    assert not (tmp_path / "a.img").exists()


def test_images_cannot_leave_the_run_directory(tmp_path: Path) -> None:
    """A symlink planted in the run directory does not make Dom0 write outside it."""
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "link").symlink_to(outside)
    topology = parse_topology('[dom0]\nimages = { "link/x.img" = "1M" }\n', "t.toml")
    assert create_images(topology, run) == []
    assert list(outside.iterdir()) == []
    with pytest.raises(ValueError, match="leads out of the run directory"):
        topology.image_path("link/x.img", run)


def test_an_image_that_cannot_be_made_leaves_no_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.img"
    with pytest.raises(OSError):
        create_image(path, 1 << 62)  # more than any file system holds: EFBIG
    assert not path.exists()


def test_the_sector_interface(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    data = os.urandom(64 * 512)
    path.write_bytes(data)
    disk = Disk.open(path)
    try:
        assert (disk.sectors, disk.readonly, disk.physical_sector_size >= 512) == (64, False, True)
        buffers = [bytearray(512), bytearray(1024)]
        assert disk.readv(4, buffers) == 1536
        assert bytes(buffers[0] + buffers[1]) == data[4 * 512 : 7 * 512]
        disk.write(10, b"\1" * 1024)
        disk.flush()
        disk.discard(0, 8)
        disk.discard(20, 3, secure=True)
        assert disk.read(0, 8) == bytes(4096) and disk.read(20, 3) == bytes(1536)
        with pytest.raises(ValueError):
            disk.read(60, 5)
        with pytest.raises(ValueError):
            disk.write(-1, bytes(512))
    finally:
        disk.close()
    expected = bytearray(data)
    expected[0:4096] = bytes(4096)
    expected[10 * 512 : 12 * 512] = b"\1" * 1024
    expected[20 * 512 : 23 * 512] = bytes(1536)
    assert path.read_bytes() == bytes(expected) and path.stat().st_size == len(data)


def test_a_read_only_disk_refuses_writes_and_discards(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(8192))
    disk = Disk.open(path, readonly=True)
    try:
        with pytest.raises(OSError, match="read-only"):
            disk.write(0, bytes(512))
        with pytest.raises(OSError, match="read-only"):
            disk.discard(0, 1)
        assert disk.read(0, 1) == bytes(512)
    finally:
        disk.close()


def test_direct_io(tmp_path: Path) -> None:
    path = tmp_path / "direct.img"
    path.write_bytes(bytes(1 << 20))
    disk = Disk.open(path, direct=True)
    try:
        disk.write(8, b"\7" * 4096)  # through an aligned bounce buffer
        assert disk.read(8, 8) == b"\7" * 4096
        assert disk.direct and fcntl.fcntl(disk.fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        disk.close()
    assert path.read_bytes()[4096:8192] == b"\7" * 4096


def test_only_regular_files_are_disks(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a regular file"):
        Disk.open(tmp_path, readonly=True)
    with pytest.raises(OSError, match="not a regular file"):
        Disk.open("/dev/null")


def test_dom0_opens_its_declared_images_and_nothing_else(tmp_path: Path) -> None:
    """What blkback opens through (domain.hardware.disks): a back-end directory naming
    any other file, whoever wrote it, opens nothing."""
    from domains.dom0.kernel import _image_opener

    run = tmp_path / "run"
    run.mkdir()
    topology = parse_topology('[dom0]\nimages = { "a.img" = "1M" }\n', "t.toml")
    create_images(topology, run)
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    open_image = _image_opener(topology, run)
    open_image(run / "a.img", readonly=True).close()
    for path in (secret, run / "b.img", run / "sub" / ".." / ".." / "secret"):
        with pytest.raises(PermissionError):
            open_image(path, readonly=True)
