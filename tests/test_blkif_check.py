"""blkback's one checker of untrusted requests (drivers.blkif.protocol.check_request),
without processes, rings or patches: request bytes in, a job or a refusal out."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.blkif.protocol import (
    BLKIF_REQUEST,
    DISCARD,
    INDIRECT,
    RW,
    SEGMENT_ARRAY,
    BadRequest,
    Limits,
    Unsupported,
    check_access,
    check_request,
    check_segments,
    segment_words,
)
from xenlike.abi.blkif import BlkifOp

DISK = Limits(sectors=1024, readonly=False, discard=True, max_indirect_segments=256)
READ_ONLY = Limits(sectors=1024, readonly=True, discard=False, max_indirect_segments=256)


def off_the_ring(record: object) -> object:
    """The request as blkback sees it: packed into a slot, copied out and decoded."""
    slot = bytearray(112)
    BLKIF_REQUEST.pack_into(slot, 0, record)
    return BLKIF_REQUEST.unpack_from(bytes(slot), 0)


def rw(op: int, sector: int, segments: list[tuple[int, int, int]], rid: int = 1) -> object:
    return off_the_ring(RW.record(op, len(segments), 0, rid, sector, segments))


def test_a_read_becomes_a_job_over_its_pages() -> None:
    job = check_request(rw(BlkifOp.READ, 8, [(10, 0, 7), (11, 0, 3)]), DISK, set())
    assert (job.id, job.kind, job.sector, job.nr_sectors) == (1, BlkifOp.READ, 8, 12)
    assert job.segments.grefs == [10, 11] and job.key[1] == 2


@pytest.mark.parametrize(
    ("request_", "limits", "in_flight", "refusal"),
    [
        (rw(BlkifOp.READ, 0, []), DISK, (), "0 segments"),
        (rw(BlkifOp.READ, 0, [(1, 0, 7)] * 11, rid=2), DISK, {2}, "id 2 is already in flight"),
        (rw(BlkifOp.READ, 0, [(1, 3, 2)]), DISK, (), "first_sect 3, last_sect 2"),
        (rw(BlkifOp.READ, 0, [(1, 0, 8)]), DISK, (), "last_sect 8"),
        (rw(BlkifOp.READ, 1020, [(1, 0, 7)]), DISK, (), "sectors 1020..1027 are past the end"),
        (rw(BlkifOp.WRITE, 0, [(1, 0, 7)]), READ_ONLY, (), "WRITE on a read-only disk"),
        (rw(BlkifOp.FLUSH_DISKCACHE, 0, []), READ_ONLY, (), "FLUSH_DISKCACHE on a read-only"),
        (
            off_the_ring(DISCARD.record(BlkifOp.DISCARD, 0, 0, 1, 1000, 100)),
            DISK,
            (),
            "past the end",
        ),
        (
            off_the_ring(INDIRECT.record(BlkifOp.INDIRECT, BlkifOp.DISCARD, 4, 1, 0, 0, (5,))),
            DISK,
            (),
            "indirect_op 5",
        ),
        (
            off_the_ring(INDIRECT.record(BlkifOp.INDIRECT, BlkifOp.READ, 257, 1, 0, 0, (5,))),
            DISK,
            (),
            "257 indirect segments",
        ),
        (off_the_ring(RW.record(9, 1, 0, 1, 0, [(1, 0, 7)])), DISK, (), "unknown operation 9"),
    ],
    ids=[
        "no-segments",
        "id-in-flight",
        "first-after-last",
        "past-the-page",
        "past-the-end",
        "write-read-only",
        "flush-read-only",
        "discard-past-the-end",
        "indirect-op",
        "indirect-count",
        "unknown-op",
    ],
)
def test_refusals_say_why(
    request_: object, limits: Limits, in_flight: object, refusal: str
) -> None:
    with pytest.raises(BadRequest, match=refusal):
        check_request(request_, limits, in_flight)


def test_a_discard_not_offered_is_unsupported_not_an_error() -> None:
    request = off_the_ring(DISCARD.record(BlkifOp.DISCARD, 0, 0, 1, 0, 8))
    with pytest.raises(Unsupported):
        check_request(request, READ_ONLY, ())
    assert check_request(request, DISK, ()).nr_sectors == 8


def test_an_indirect_job_is_finished_by_the_list_read_out_of_its_pages() -> None:
    request = off_the_ring(INDIRECT.record(BlkifOp.INDIRECT, BlkifOp.WRITE, 20, 3, 1000, 0, (5,)))
    job = check_request(request, DISK, ())
    assert job.segments is None and job.indirect_grefs == (5,)
    with pytest.raises(BadRequest, match="past the end"):
        check_segments(job, segment_words(list(range(100, 120)), 160), DISK)
    job.sector = 0
    check_segments(job, segment_words(list(range(100, 120)), 160), DISK)
    assert job.nr_sectors == 160 and job.segments.run


segment = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(0, 255))


@given(
    op=st.integers(0, 255),
    sector=st.integers(0, 2**64 - 1),
    segments=st.lists(segment, max_size=11),
    rid=st.integers(0, 2**64 - 1),
    readonly=st.booleans(),
    in_flight=st.sets(st.integers(0, 4), max_size=3),
)
def test_any_request_is_a_job_inside_the_disk_or_a_refusal(
    op: int, sector: int, segments: list, rid: int, readonly: bool, in_flight: set[int]
) -> None:
    limits = Limits(1024, readonly, not readonly, 256)
    request = off_the_ring(RW.record(op, len(segments), 0, rid, sector, segments))
    try:
        job = check_request(request, limits, in_flight)
    except BadRequest:
        return
    assert job.id not in in_flight
    assert job.sector + job.nr_sectors <= 1024 or not job.nr_sectors
    assert job.kind == BlkifOp.READ or not readonly


@given(
    sector=st.integers(0, 2048),
    sectors=st.integers(1, 88),
    rid=st.integers(0, 8),
    op=st.sampled_from([BlkifOp.READ, BlkifOp.WRITE]),
    readonly=st.booleans(),
    in_flight=st.sets(st.integers(0, 8), max_size=4),
)
def test_the_ready_path_s_check_agrees_with_the_full_check(
    sector: int, sectors: int, rid: int, op: int, readonly: bool, in_flight: set[int]
) -> None:
    """blkback's fast path for a list it has served runs check_access alone: it must
    accept and refuse exactly what the full check does for the same list."""
    limits = Limits(1024, readonly, False, 256)
    pages = -(-sectors // 8)
    raw = segment_words(list(range(pages)), sectors).ljust(88, b"\0")
    request = off_the_ring(RW.record(op, pages, 0, rid, sector, SEGMENT_ARRAY(raw)))

    def verdict(check: object) -> bool:
        try:
            check()
        except BadRequest:
            return False
        return True

    assert verdict(lambda: check_request(request, limits, in_flight)) == verdict(
        lambda: check_access(op, rid, sector, sectors, limits, in_flight)
    )
