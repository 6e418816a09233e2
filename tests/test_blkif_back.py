"""blkback against a raw front end: the data path, and everything a hostile guest may try.

The back end is the real one serving a real image file; see
`tests.blkif_harness`. After the hostile requests, the image must hold
exactly what the legitimate writes put there.
"""

import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers.blkif.back import DRAINS_IN_FLIGHT, write_groups
from drivers.blkif.protocol import (
    DISCARD,
    INDIRECT,
    RW,
    SEGMENT_ARRAY,
    BadRequest,
    Job,
    Limits,
    check_access,
    segment_words,
)
from tests.blkif_harness import BACK, PAGE, Served, make_image, serving
from xenlike.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    VDISK_READONLY,
    BlkifOp,
)

SECTORS = 4096  # a 2 MiB disk
READ, WRITE = BlkifOp.READ, BlkifOp.WRITE


def rw(op: int, sector: int, segments: list[tuple[int, int, int]], rid: int = 1) -> object:
    raw = b"".join(struct.pack("<IBBxx", *seg) for seg in segments)
    return RW.record(op, len(segments), 51712, rid, sector, SEGMENT_ARRAY(raw.ljust(88, b"\0")))


def indirect(
    op: int, sector: int, nr_segments: int, grefs: tuple[int, ...], rid: int = 1
) -> object:
    return INDIRECT.record(BlkifOp.INDIRECT, op, nr_segments, rid, sector, 51712, grefs)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    return path, make_image(path, SECTORS)


@pytest.mark.parametrize(
    "persistent,direct",
    [(True, False), (False, False), (True, True)],
    ids=["persistent", "mapped-per-drain", "persistent-O_DIRECT"],
)
async def test_reads_writes_flush_discard_straight_through_the_granted_pages(
    image: tuple[Path, bytes], persistent: bool, direct: bool
) -> None:
    path, original = image
    expected = bytearray(original)
    async with serving(path, persistent=persistent, direct=direct) as s:
        assert s.back.disk is not None and s.back.disk.direct is direct
        disk = s.back.disk = Flushes(s.back.disk)  # type: ignore[assignment]
        front = s.front
        assert s.store.values[f"{BACK}/sectors"] == str(SECTORS)
        assert s.store.values[f"{BACK}/feature-persistent"] == "1"
        assert s.store.values[f"{BACK}/feature-max-indirect-segments"] == "256"
        # Write two pages, a partial one in the middle of a page: sectors 2..9 of the
        # request land at 100.., and only there.
        data = os.urandom(2 * PAGE)
        (ref_a, _), (ref_b, _) = front.page(data=data[:PAGE]), front.page(data=data[PAGE:])
        (rsp,) = await front.submit(rw(WRITE, 100, [(ref_a, 2, 7), (ref_b, 0, 1)]))
        assert (rsp.id, rsp.operation, rsp.status) == (1, WRITE, BLKIF_RSP_OKAY)
        expected[100 * 512 : 108 * 512] = data[2 * 512 : PAGE] + data[PAGE : PAGE + 2 * 512]
        # Read it back into fresh pages.
        (ref_c, page_c), (ref_d, page_d) = front.page(), front.page()
        (rsp,) = await front.submit(rw(READ, 96, [(ref_c, 0, 7), (ref_d, 0, 7)], rid=2))
        assert rsp.status == BLKIF_RSP_OKAY
        assert bytes(page_c) + bytes(page_d) == bytes(expected[96 * 512 : 112 * 512])
        # An indirect write of 300 pages (two indirect pages of segments).
        pages = [front.page(data=os.urandom(PAGE)) for _ in range(300)]
        words = segment_words([ref for ref, _ in pages], 300 * 8)
        ind = [front.page(data=words[:PAGE]), front.page(data=words[PAGE:])]
        (rsp,) = await front.submit(indirect(WRITE, 1000, 300, (ind[0][0], ind[1][0]), 3))
        assert rsp.status == BLKIF_RSP_ERROR  # over feature-max-indirect-segments
        words = segment_words([ref for ref, _ in pages[:256]], 256 * 8)
        ind_ref, _ = front.page(data=words)
        (rsp,) = await front.submit(indirect(WRITE, 1000, 256, (ind_ref,), 4))
        assert (rsp.operation, rsp.status) == (WRITE, BLKIF_RSP_OKAY)
        expected[1000 * 512 : (1000 + 2048) * 512] = b"".join(bytes(v) for _, v in pages[:256])
        (rsp,) = await front.submit(RW.record(BlkifOp.FLUSH_DISKCACHE, 0, 51712, 5, 0))
        assert rsp.status == BLKIF_RSP_OKAY and disk.flushes == 1  # done before the answer
        (rsp,) = await front.submit(DISCARD.record(BlkifOp.DISCARD, 0, 51712, 6, 2000, 16))
        assert rsp.status == BLKIF_RSP_OKAY
        expected[2000 * 512 : 2016 * 512] = bytes(16 * 512)
        (rsp,) = await front.submit(
            DISCARD.record(BlkifOp.DISCARD, BLKIF_DISCARD_SECURE, 51712, 7, 3000, 3)
        )
        assert rsp.status == BLKIF_RSP_OKAY
        expected[3000 * 512 : 3003 * 512] = bytes(3 * 512)
        (rsp,) = await front.submit(RW.record(BlkifOp.WRITE_BARRIER, 0, 51712, 8, 0))
        assert rsp.status == BLKIF_RSP_OKAY and disk.flushes == 2
        # A barrier with data: flushed, written, flushed again.
        (rsp,) = await front.submit(rw(BlkifOp.WRITE_BARRIER, 4000, [(ref_a, 0, 7)], rid=10))
        assert rsp.status == BLKIF_RSP_OKAY and disk.flushes == 4
        expected[4000 * 512 : 4008 * 512] = data[:PAGE]
        maps = s.grants.maps
        (rsp,) = await front.submit(rw(READ, 0, [(ref_c, 0, 7)], rid=9))
        assert rsp.status == BLKIF_RSP_OKAY
        # Persistent grants: a gref seen before costs no hypercall.
        assert (s.grants.maps == maps) is persistent
        # The flush, two discards, two barriers and both writes go to the device's
        # threads (a write may block: a frozen file system); reads only with O_DIRECT.
        assert s.back.offloaded == (9 if direct else 7)
    assert path.read_bytes() == bytes(expected)
    assert not s.grants.mapped, "every grant is unmapped once the device disconnects"


async def test_many_requests_in_one_push_are_answered_together(image: tuple[Path, bytes]) -> None:
    path, original = image
    async with serving(path) as s:
        refs = [s.front.page()[0] for _ in range(32)]
        requests = [rw(READ, 8 * i, [(ref, 0, 7)], rid=i) for i, ref in enumerate(refs)]
        responses = await s.front.submit(*requests)
        assert sorted(r.id for r in responses) == list(range(32))
        assert all(r.status == BLKIF_RSP_OKAY for r in responses)
        for i in range(32):
            gfn = s.grants.entries[refs[i]].gfn
            assert bytes(s.grants.page(gfn)) == original[i * PAGE : (i + 1) * PAGE]


class Flushes:
    """A disk that counts its flushes (FLUSH_DISKCACHE and barriers must flush)."""

    def __init__(self, disk: Any) -> None:
        self.disk, self.flushes = disk, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.disk, name)

    def flush(self) -> None:
        self.flushes += 1
        self.disk.flush()


def hostile_requests(front: object) -> list[tuple[str, object, int]]:
    """(what, request, expected status): each must be refused and change nothing."""
    good, _ = front.page(data=os.urandom(PAGE))  # type: ignore[attr-defined]
    elsewhere, _ = front.page(domid=7, data=os.urandom(PAGE))  # type: ignore[attr-defined]
    readonly, _ = front.page(readonly=True, data=os.urandom(PAGE))  # type: ignore[attr-defined]
    bad_segments = struct.pack("<IBBxx", good, 0, 7) + struct.pack("<IBBxx", good, 5, 2)
    bad_list, _ = front.page(data=bad_segments)  # type: ignore[attr-defined]
    never = 4000
    return [
        ("nr_segments 0", rw(WRITE, 0, []), BLKIF_RSP_ERROR),
        (
            "nr_segments 12",
            RW.record(WRITE, 12, 0, 1, 0, SEGMENT_ARRAY(struct.pack("<IBBxx", good, 0, 7) * 11)),
            BLKIF_RSP_ERROR,
        ),
        ("first_sect > last_sect", rw(WRITE, 0, [(good, 4, 3)]), BLKIF_RSP_ERROR),
        ("last_sect 8", rw(WRITE, 0, [(good, 0, 8)]), BLKIF_RSP_ERROR),
        ("one bad segment of two", rw(WRITE, 0, [(good, 0, 7), (good, 3, 9)]), BLKIF_RSP_ERROR),
        ("past the end", rw(WRITE, SECTORS - 7, [(good, 0, 7)]), BLKIF_RSP_ERROR),
        ("far past the end", rw(READ, 2**63, [(good, 0, 7)]), BLKIF_RSP_ERROR),
        ("operation 4 (reserved)", RW.record(4, 1, 0, 1, 0), BLKIF_RSP_ERROR),
        ("operation 7", RW.record(7, 1, 0, 1, 0), BLKIF_RSP_ERROR),
        ("operation 255", RW.record(255, 255, 0xFFFF, 1, 2**64 - 1), BLKIF_RSP_ERROR),
        ("never granted", rw(WRITE, 0, [(never, 0, 7)]), BLKIF_RSP_ERROR),
        ("granted to another domain", rw(WRITE, 0, [(elsewhere, 0, 7)]), BLKIF_RSP_ERROR),
        ("read-only grant for a read", rw(READ, 0, [(readonly, 0, 7)]), BLKIF_RSP_ERROR),
        (
            "good page then never granted",
            rw(WRITE, 8, [(good, 0, 7), (never, 0, 7)]),
            BLKIF_RSP_ERROR,
        ),
        ("indirect with 0 segments", indirect(WRITE, 0, 0, (bad_list,)), BLKIF_RSP_ERROR),
        ("indirect with 257 segments", indirect(WRITE, 0, 257, (bad_list,)), BLKIF_RSP_ERROR),
        ("indirect flush", indirect(BlkifOp.FLUSH_DISKCACHE, 0, 1, (bad_list,)), BLKIF_RSP_ERROR),
        ("indirect page never granted", indirect(WRITE, 0, 2, (never,)), BLKIF_RSP_ERROR),
        ("indirect bad segment", indirect(WRITE, 16, 2, (bad_list,)), BLKIF_RSP_ERROR),
        (
            "discard past the end",
            DISCARD.record(BlkifOp.DISCARD, 0, 0, 1, SECTORS - 1, 2),
            BLKIF_RSP_ERROR,
        ),
    ]


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "mapped-per-drain"])
async def test_hostile_requests_are_refused_and_change_nothing(
    image: tuple[Path, bytes], persistent: bool
) -> None:
    path, original = image
    async with serving(path, persistent=persistent) as s:
        for what, request, status in hostile_requests(s.front):
            (rsp,) = await s.front.submit(request._replace(id=77))
            assert (rsp.id, rsp.status) == (77, status), what
        # All at once in one drain too, each on its own id, around a good read: a
        # refused grant fails only the requests that name it.
        batch = [
            request._replace(id=i) for i, (_, request, _) in enumerate(hostile_requests(s.front))
        ]
        good_ref, good_page = s.front.page()
        batch.insert(3, rw(READ, 24, [(good_ref, 0, 7)], rid=len(batch)))
        responses = await s.front.submit(*batch)
        assert {r.id: r.status for r in responses} == {
            i: BLKIF_RSP_OKAY if i == len(batch) - 1 else BLKIF_RSP_ERROR for i in range(len(batch))
        }
        assert bytes(good_page) == original[24 * 512 : 32 * 512]
        # The device still works.
        ref, page = s.front.page()
        (rsp,) = await s.front.submit(rw(READ, 8, [(ref, 0, 7)]))
        assert rsp.status == BLKIF_RSP_OKAY and bytes(page) == original[8 * 512 : 16 * 512]
        assert s.store.values.get(f"{BACK}/state") == "1"  # not closed: errors sufficed
    assert path.read_bytes() == original


async def test_the_same_id_twice_in_flight_is_refused(image: tuple[Path, bytes]) -> None:
    path, _original = image
    async with serving(path) as s:
        a, _ = s.front.page()
        b, _ = s.front.page()
        responses = await s.front.submit(
            rw(READ, 0, [(a, 0, 7)], rid=5), rw(READ, 8, [(b, 0, 7)], rid=5)
        )
        assert sorted(r.status for r in responses) == [BLKIF_RSP_ERROR, BLKIF_RSP_OKAY]
        (rsp,) = await s.front.submit(rw(READ, 0, [(a, 0, 7)], rid=5))
        assert rsp.status == BLKIF_RSP_OKAY  # answered: the id is free again


async def test_a_runaway_req_prod_closes_the_device(image: tuple[Path, bytes]) -> None:
    path, original = image
    async with serving(path) as s:
        ref, _ = s.front.page()
        await s.front.submit(rw(READ, 0, [(ref, 0, 7)]))
        header = s.grants.page(0).cast("I")
        header[0] += 1000  # req_prod far past anything the ring can hold
        s.front.port.notify()
        with trio.fail_after(5):
            while s.store.values.get(f"{BACK}/state") != "5":
                await trio.sleep(0.01)
        error = s.store.values["/local/domain/0/error/backend/vbd/1/51712/error"]
        assert error.split(" ", 1)[1].startswith("ring protocol violation"), error
        header.release()
    assert not s.grants.mapped
    assert path.read_bytes() == original


async def test_a_read_only_disk_refuses_writes_flushes_and_discards(
    image: tuple[Path, bytes],
) -> None:
    path, original = image
    async with serving(path, mode="r") as s:
        values = s.store.values
        assert int(values[f"{BACK}/info"]) & VDISK_READONLY
        assert values[f"{BACK}/feature-flush-cache"] == "0"
        assert values[f"{BACK}/feature-discard"] == "0"
        ref, page = s.front.page(data=os.urandom(PAGE))
        responses = await s.front.submit(
            rw(WRITE, 0, [(ref, 0, 7)], rid=1),
            RW.record(BlkifOp.FLUSH_DISKCACHE, 0, 51712, 2, 0),
            RW.record(BlkifOp.WRITE_BARRIER, 0, 51712, 3, 0),
            DISCARD.record(BlkifOp.DISCARD, 0, 51712, 4, 0, 8),
        )
        assert {r.id: r.status for r in responses} == {
            1: BLKIF_RSP_ERROR,
            2: BLKIF_RSP_ERROR,
            3: BLKIF_RSP_ERROR,
            4: BLKIF_RSP_EOPNOTSUPP,
        }
        (rsp,) = await s.front.submit(rw(READ, 16, [(ref, 0, 7)], rid=5))
        assert rsp.status == BLKIF_RSP_OKAY and bytes(page) == original[16 * 512 : 24 * 512]
    assert path.read_bytes() == original


async def test_discard_not_offered_is_eopnotsupp(image: tuple[Path, bytes]) -> None:
    path, original = image
    async with serving(path, discard=False) as s:
        assert s.store.values[f"{BACK}/feature-discard"] == "0"
        (rsp,) = await s.front.submit(DISCARD.record(BlkifOp.DISCARD, 0, 51712, 1, 0, 8))
        assert rsp.status == BLKIF_RSP_EOPNOTSUPP
    assert path.read_bytes() == original


async def test_a_disconnect_in_the_middle_of_a_drain_waits_for_it(
    image: tuple[Path, bytes],
) -> None:
    """The ring and pages are let go only once the drain using them has stopped."""
    path, _original = image
    async with serving(path, persistent=False) as s:
        ref, _ = s.front.page(data=os.urandom(PAGE))
        s.grants.map_delay = 0.2  # the drain sits in a (shielded) map hypercall
        s.front.ring.put_request(rw(WRITE, 0, [(ref, 0, 7)]))
        s.front.ring.push_requests()
        s.front.port.notify()
        with trio.fail_after(5):
            while not s.grants.maps:  # the drain is in its map hypercall
                await trio.sleep(0.001)
        await s.back.disconnect()
        # By the time disconnect returns, the drain has mapped, written and unmapped.
        assert (s.grants.maps, s.grants.unmaps, s.grants.mapped) == (1, 1, set())


async def test_counters_are_published_for_xenlike_top(image: tuple[Path, bytes]) -> None:
    path, _ = image
    async with serving(path) as s:
        ref, _ = s.front.page()
        await s.front.submit(
            rw(READ, 0, [(ref, 0, 7)], rid=1),
            rw(WRITE, 8, [(ref, 0, 3)], rid=2),
            RW.record(BlkifOp.FLUSH_DISKCACHE, 0, 51712, 3, 0),
            DISCARD.record(BlkifOp.DISCARD, 0, 51712, 4, 100, 16),
        )
        with trio.fail_after(5):
            while s.store.values.get(f"{BACK}/statistics/ds_sect") != "16":
                await trio.sleep(0.05)
        values = {
            key: s.store.values[f"{BACK}/statistics/{key}"]
            for key in ("rd_req", "rd_sect", "wr_req", "wr_sect", "f_req", "ds_req")
        }
        assert values == {
            "rd_req": "1",
            "rd_sect": "8",
            "wr_req": "1",
            "wr_sect": "4",
            "f_req": "1",
            "ds_req": "1",
        }


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "mapped-per-drain"])
async def test_a_large_drain_is_answered_as_it_goes_when_its_pages_are_persistent(
    image: tuple[Path, bytes], persistent: bool
) -> None:
    """Eight 44 KiB reads in one drain: with persistent grants the first six
    (256 KiB and more) are answered before the last two are read; pages mapped
    for the drain alone must stay mapped until it is all answered at once."""
    path, original = image
    async with serving(path, persistent=persistent) as s:
        assert s.back.channel is not None
        pushes: list[int] = []
        respond_many = s.back.channel.respond_many
        s.back.channel.respond_many = lambda done: (  # type: ignore[method-assign]
            pushes.append(len(done)),
            respond_many(done),
        )
        granted = [[s.front.page() for _ in range(11)] for _ in range(8)]
        requests = [
            rw(READ, 88 * index, [(ref, 0, 7) for ref, _ in pages], index)
            for index, pages in enumerate(granted)
        ]
        responses = await s.front.submit(*requests)
        assert sorted(r.id for r in responses) == list(range(8))
        assert all(r.status == BLKIF_RSP_OKAY for r in responses)
        assert pushes == ([6, 2] if persistent else [8])
        read = b"".join(bytes(view) for pages in granted for _, view in pages)
        assert read == original[: 88 * 8 * 512]


async def test_segment_lists_served_before_skip_the_parse_but_not_the_checks(
    image: tuple[Path, bytes],
) -> None:
    """The steady state: the same persistent pages, request after request. Such a
    request is served without a parse or a lookup of its pages, and still gets
    every check that depends on more than its segment list: the sectors, the id,
    the disk's mode."""
    path, original = image
    expected = bytearray(original)
    async with serving(path) as s:
        (ref, page), (ref2, page2) = s.front.page(), s.front.page()
        one, two = [(ref, 0, 7)], [(ref, 0, 7), (ref2, 0, 3)]
        await s.front.submit(rw(READ, 0, one, rid=1), rw(READ, 0, two, rid=2))
        assert s.back.served_ready == 0  # lists never seen: the full path
        data = os.urandom(PAGE + PAGE // 2)
        page[:], page2[: PAGE // 2] = data[:PAGE], data[PAGE:]
        responses = await s.front.submit(
            rw(WRITE, 64, two, rid=3),
            rw(READ, SECTORS - 4, one, rid=5),
            rw(READ, 8, one, rid=4),
            rw(READ, 16, one, rid=4),
            rw(READ, 24, one, rid=6),
        )
        expected[64 * 512 : 76 * 512] = data
        assert {r.id: r.status for r in responses if r.id != 4} == {
            3: BLKIF_RSP_OKAY,
            5: BLKIF_RSP_ERROR,
            6: BLKIF_RSP_OKAY,
        }
        assert sorted(r.status for r in responses if r.id == 4) == [
            BLKIF_RSP_ERROR,
            BLKIF_RSP_OKAY,
        ]  # the same id twice: the second refused
        assert s.back.served_ready == 1  # the write was served as ready, then 5 failed
        assert bytes(page) == expected[24 * 512 : 32 * 512]
        (rsp,) = await s.front.submit(rw(READ, 64, two, rid=3))  # 3 is free again
        assert rsp.status == BLKIF_RSP_OKAY and s.back.served_ready == 2
        assert bytes(page) + bytes(page2[: PAGE // 2]) == data
        counters = s.back.counters()
        assert {key: counters[key] for key in ("rd_req", "rd_sect", "wr_req", "wr_sect")} == {
            "rd_req": 5,
            "rd_sect": 48,
            "wr_req": 1,
            "wr_sect": 12,
        }
        # Indirect requests too: their list is read out of its persistent page each time.
        pages = [s.front.page() for _ in range(20)]
        list_ref, _ = s.front.page(data=segment_words([ref for ref, _ in pages], 20 * 8))
        served = []
        for rid, sector in ((8, 512), (9, 1024), (10, SECTORS - 8)):
            (rsp,) = await s.front.submit(indirect(READ, sector, 20, (list_ref,), rid))
            expected_status = BLKIF_RSP_ERROR if sector == SECTORS - 8 else BLKIF_RSP_OKAY
            assert rsp.status == expected_status
            served.append(s.back.served_ready)
        assert served == [2, 3, 3]  # the second was served as ready; the third is past the end
        assert b"".join(bytes(view) for _, view in pages) == expected[1024 * 512 : 1184 * 512]
    assert path.read_bytes() == expected
    async with serving(path, mode="r") as s:
        ref, page = s.front.page(data=os.urandom(PAGE))
        await s.front.submit(rw(READ, 0, [(ref, 0, 7)], rid=1))
        await s.front.submit(rw(READ, 0, [(ref, 0, 7)], rid=2))
        page[:] = os.urandom(PAGE)
        (rsp,) = await s.front.submit(rw(WRITE, 0, [(ref, 0, 7)], rid=3))
        assert rsp.status == BLKIF_RSP_ERROR  # the mode is checked, not remembered
        assert s.back.served_ready == 1
    assert path.read_bytes() == expected


async def test_drains_without_persistent_grants_overlap_but_not_past_a_barrier(
    image: tuple[Path, bytes],
) -> None:
    """A drain waiting for its map hypercall does not hold up the next drain; a
    barrier still waits for every drain before it."""
    path, original = image
    async with serving(path, persistent=False) as s:
        front = s.front

        async def push(*requests: object) -> None:
            await push_drain(s, *requests)

        (ref_a, _), (ref_b, page_b), (ref_c, _) = front.page(), front.page(), front.page()
        s.grants.map_delay = 1.0
        await push(rw(READ, 0, [(ref_a, 0, 7)], rid=1))  # sits in its map hypercall
        with trio.fail_after(5):
            while not s.grants.maps:  # (its task may start after the push is taken)
                await trio.sleep(0.001)
        s.grants.map_delay = 0
        await push(rw(READ, 8, [(ref_b, 0, 7)], rid=2))
        await push(
            RW.record(
                BlkifOp.WRITE_BARRIER,
                1,
                51712,
                3,
                16,
                SEGMENT_ARRAY(struct.pack("<IBBxx", ref_c, 0, 7).ljust(88, b"\0")),
            )
        )
        responses = await front.responses(3)
        assert [(r.id, r.status) for r in responses] == [
            (2, BLKIF_RSP_OKAY),
            (1, BLKIF_RSP_OKAY),
            (3, BLKIF_RSP_OKAY),
        ]
        assert bytes(page_b) == original[8 * 512 : 16 * 512]
    assert not s.grants.mapped


async def test_a_drain_that_waits_for_room_is_counted_as_oo_req(image: tuple[Path, bytes]) -> None:
    path, _ = image
    async with serving(path, persistent=False) as s:
        s.grants.map_delay = 1.0  # every drain sits in its map hypercall meanwhile
        for rid in range(DRAINS_IN_FLIGHT + 1):
            ref, _ = s.front.page()
            await push_drain(s, rw(READ, 8 * rid, [(ref, 0, 7)], rid=rid))
        assert s.back.counters()["oo_req"] == 1  # the last one waited
        responses = await s.front.responses(DRAINS_IN_FLIGHT + 1)
        assert all(r.status == BLKIF_RSP_OKAY for r in responses)


async def push_drain(s: Served, *requests: object) -> None:
    """Push `requests` and wait until blkback has taken them: a drain of their own."""
    front = s.front
    for request in requests:
        front.ring.put_request(request)
    front.ring.push_requests()
    front.port.notify()
    assert s.back.channel is not None
    with trio.fail_after(5):
        while s.back.channel.ring.req_cons != front.ring.req_prod_pvt:
            await trio.sleep(0.001)


class Logged:
    """A disk that logs the order its operations run in (from any thread)."""

    def __init__(self, disk: Any) -> None:
        self.disk, self.log = disk, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.disk, name)

    def discard(self, sector: int, count: int, *, secure: bool = False) -> None:
        time.sleep(0.2)  # a slow device: what runs beside it, wrongly, goes first
        self.log.append(("discard", sector))
        self.disk.discard(sector, count, secure=secure)

    def flush(self) -> None:
        self.log.append(("flush", None))
        self.disk.flush()

    def writev(self, sector: int, buffers: Any) -> int:
        self.log.append(("write", sector))
        return int(self.disk.writev(sector, buffers))


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "mapped-per-drain"])
async def test_a_barrier_waits_for_a_discard_pushed_with_it(
    image: tuple[Path, bytes], persistent: bool
) -> None:
    """blkif.h: a barrier completes after every request before it and before any
    after it. A DISCARD, a WRITE_BARRIER and a WRITE in one push: the discard's
    worker is queued, not yet started, when the barrier looks for outstanding work."""
    path, _ = image
    async with serving(path, persistent=persistent) as s:
        disk = s.back.disk = Logged(s.back.disk)  # type: ignore[assignment]
        (ref_a, _), (ref_b, _) = s.front.page(), s.front.page()
        responses = await s.front.submit(
            DISCARD.record(BlkifOp.DISCARD, 0, 51712, 1, 0, 8),
            rw(BlkifOp.WRITE_BARRIER, 8, [(ref_a, 0, 7)], rid=2),
            rw(WRITE, 16, [(ref_b, 0, 7)], rid=3),
        )
        assert all(r.status == BLKIF_RSP_OKAY for r in responses)
    assert disk.log == [
        ("discard", 0),
        ("flush", None),
        ("write", 8),
        ("flush", None),
        ("write", 16),
    ]


@st.composite
def queued_writes(draw: st.DrawFn) -> list[Job]:
    """A run of writes as the device's thread takes it: any sectors, some adjacent,
    some overlapping, each with its data in one to three iovec elements."""
    jobs = []
    for rid in range(draw(st.integers(1, 12))):
        sector = draw(st.integers(0, 48))
        sectors = draw(st.integers(1, 16))
        data = bytes([rid + 1]) * (sectors * 512)
        cuts = (
            sorted(draw(st.lists(st.integers(1, sectors - 1), max_size=2, unique=True)))
            if sectors > 1
            else []
        )
        bounds = [0, *cuts, sectors]
        iov = [memoryview(data)[a * 512 : b * 512] for a, b in zip(bounds, bounds[1:])]
        jobs.append(Job(rid, WRITE, sector, sectors, iov=iov))
    return jobs


@given(queued_writes())
def test_writes_grouped_into_one_pwritev_land_as_in_ring_order(jobs: list[Job]) -> None:
    """The grouped writes (sorted when nothing overlaps) leave the disk as writing
    each in ring order does; each group is one run of sectors."""
    plain = bytearray(64 * 512)
    for job in jobs:
        plain[job.sector * 512 : (job.sector + job.nr_sectors) * 512] = b"".join(job.iov or ())
    grouped = bytearray(64 * 512)
    groups = write_groups(jobs)
    assert sorted(index for group in groups for index in group) == list(range(len(jobs)))
    for group in groups:
        first = jobs[group[0]].sector
        data = b"".join(element for index in group for element in jobs[index].iov or ())
        assert sum(jobs[index].nr_sectors for index in group) * 512 == len(data)
        for before, after in zip(group, group[1:]):
            assert jobs[after].sector == jobs[before].sector + jobs[before].nr_sectors
        grouped[first * 512 : first * 512 + len(data)] = data
    assert grouped == plain


def test_a_group_of_writes_is_cut_at_iov_max() -> None:
    page = memoryview(bytes(512))
    jobs = [Job(rid, WRITE, rid * 600, 600, iov=[page] * 600) for rid in range(4)]
    assert write_groups(jobs) == [[0], [1], [2], [3]]  # 1200 elements would pass IOV_MAX
    small = [Job(rid, WRITE, rid * 8, 8, iov=[page] * 8) for rid in range(4)]
    assert write_groups(small[::-1]) == [[3, 2, 1, 0]]


async def test_writes_queued_together_go_in_one_pwritev(image: tuple[Path, bytes]) -> None:
    """Eight writes pushed together, in no order on the disk: the thread writes
    them with one pwritev, and the image holds each where it belongs."""
    path, original = image
    expected = bytearray(original)
    async with serving(path) as s:
        disk = s.back.disk = Logged(s.back.disk)  # type: ignore[assignment]
        pages = [s.front.page(data=os.urandom(PAGE)) for _ in range(8)]
        sectors = [8 * k for k in (3, 1, 0, 2, 5, 4, 7, 6)]
        responses = await s.front.submit(
            *(
                rw(WRITE, sector, [(ref, 0, 7)], rid)
                for rid, ((ref, _), sector) in enumerate(zip(pages, sectors))
            )
        )
        assert all(r.status == BLKIF_RSP_OKAY for r in responses)
        for (_, page), sector in zip(pages, sectors):
            expected[sector * 512 : (sector + 8) * 512] = page
        assert disk.log == [("write", 0)]
    assert path.read_bytes() == expected


class Broken:
    """A disk whose writes hit a bug (not an I/O error): the device thread raises."""

    def __init__(self, disk: Any) -> None:
        self.disk = disk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.disk, name)

    def writev(self, sector: int, buffers: Any) -> int:
        raise TypeError("a bug in the disk")


async def test_a_bug_on_the_device_thread_closes_the_device_not_dom0(
    image: tuple[Path, bytes],
) -> None:
    path, original = image
    async with serving(path) as s:
        s.back.disk = Broken(s.back.disk)  # type: ignore[assignment]
        ref, _ = s.front.page(data=os.urandom(PAGE))
        s.front.ring.put_request(rw(WRITE, 0, [(ref, 0, 7)]))
        s.front.ring.push_requests()
        s.front.port.notify()
        with trio.fail_after(5):
            while s.store.values.get(f"{BACK}/state") != "5":
                await trio.sleep(0.01)
        error = s.store.values["/local/domain/0/error/backend/vbd/1/51712/error"]
        assert "a bug in the disk" in error, error
    assert not s.grants.mapped
    assert path.read_bytes() == original


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    op=st.sampled_from([READ, WRITE]),
    sector=st.sampled_from([0, 8, SECTORS - 16, SECTORS - 8, SECTORS - 4, SECTORS]),
    same_id=st.booleans(),
    readonly=st.booleans(),
)
def test_the_ready_path_refuses_what_check_access_refuses(
    image: tuple[Path, bytes], op: int, sector: int, same_id: bool, readonly: bool
) -> None:
    """The ready path makes check_access's checks inline: a request over a list
    served before is served as ready exactly when check_access accepts it, and
    otherwise takes the full path, which refuses it."""
    path, _ = image

    async def main() -> None:
        async with serving(path, mode="r" if readonly else "w") as s:
            refs = [s.front.page()[0] for _ in range(2)]
            segments = [(ref, 0, 7) for ref in refs]
            await s.front.submit(rw(READ, 0, segments, rid=1))
            await s.front.submit(rw(READ, 0, segments, rid=1))  # the list is ready now
            ready = s.back.served_ready
            limits = Limits(SECTORS, readonly, False, 256)
            in_flight = {2} if same_id else set()
            try:
                check_access(op, 3 if not same_id else 2, sector, 16, limits, in_flight)
                accepted = True
            except BadRequest:
                accepted = False
            requests = [rw(op, sector, segments, rid=3 if not same_id else 2)]
            if same_id:  # the same id twice in one push: the second is in flight
                requests.insert(0, rw(READ, 0, segments, rid=2))
            responses = await s.front.submit(*requests)
            status = responses[-1].status if not same_id else min(r.status for r in responses)
            assert (status == BLKIF_RSP_OKAY) == accepted
            assert s.back.served_ready - ready == len(requests) - (not accepted)

    trio.run(main)
