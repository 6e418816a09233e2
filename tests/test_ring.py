"""The sans-I/O ring against ring.h's rules: sizes, suppression, overflow, wrap."""

import struct

import pytest

from xenlike.abi import blkif, netif
from xenlike.codec import LayoutError
from xenlike.ring import BackRing, FrontRing, RingFull, RingOverflow, define_ring

BLKIF = define_ring("blkif", request=blkif.blkif_request, response=blkif.blkif_response)
PAGE = 4096


def shared(pages: int = 1) -> memoryview:
    return memoryview(bytearray(pages * PAGE))


def pair(pages: int = 1) -> tuple[FrontRing, BackRing, memoryview]:
    mem = shared(pages)
    return FrontRing(BLKIF, mem), BackRing(BLKIF, mem), mem


def header(mem: memoryview) -> tuple[int, ...]:
    return struct.unpack_from("<4I", mem, 0)


def read_request(rid: int, sector: int = 0):
    return BLKIF.request.record(
        operation=blkif.BLKIF_OP_READ, nr_segments=1, id=rid, sector_number=sector
    )


@pytest.mark.parametrize(("order", "slots"), [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_blkif_ring_sizes_follow_ring_size_rule(order: int, slots: int) -> None:
    assert BLKIF.entry_size == 112
    assert BLKIF.nr_ents(1 << order) == slots
    front = FrontRing(BLKIF, shared(1 << order))
    assert front.nr_ents == slots == front.free_requests()


def test_netif_ring_sizes() -> None:
    tx = define_ring("netif_tx", request=netif.netif_tx_request, response=netif.netif_tx_response)
    rx = define_ring("netif_rx", request=netif.netif_rx_request, response=netif.netif_rx_response)
    assert (tx.entry_size, tx.nr_ents(1), tx.nr_ents(8)) == (12, 256, 2048)
    assert (rx.entry_size, rx.nr_ents(1), rx.nr_ents(2)) == (8, 256, 512)


def test_front_init_is_shared_ring_init() -> None:
    mem = shared()
    mem[:PAGE] = b"\xff" * PAGE
    FrontRing(BLKIF, mem)
    assert header(mem) == (0, 1, 0, 1)
    assert bytes(mem[16:64]) == bytes(48)  # pvt and __pad zeroed


def test_back_init_never_touches_the_page() -> None:
    mem = shared()
    mem[:64] = bytes(range(64))
    BackRing(BLKIF, mem)
    assert bytes(mem[:64]) == bytes(range(64))


def test_ring_must_be_whole_pages() -> None:
    with pytest.raises(ValueError, match="whole"):
        FrontRing(BLKIF, memoryview(bytearray(100)))
    with pytest.raises(ValueError, match="1 to 16 pages"):
        FrontRing(BLKIF, shared(32))


def test_notification_hold_off_worked_example() -> None:
    """xen-abi.md's example: 3 pushes notify, 2 more do not, drain re-arms, next notifies."""
    front, back, mem = pair()
    front.put_requests(read_request(i) for i in range(3))
    assert front.push_requests() is True
    front.put_requests(read_request(i) for i in range(3, 5))
    assert front.push_requests() is False
    assert [r.id for r in back.get_requests()] == [0, 1, 2, 3, 4]
    assert back.final_check_for_requests() is False
    assert header(mem)[1] == 6  # req_event = req_cons + 1
    front.put_request(read_request(5))
    assert front.push_requests() is True


def test_responses_suppressed_until_front_rearms() -> None:
    front, back, mem = pair()
    front.put_requests(read_request(i) for i in range(4))
    front.push_requests()
    reqs = back.get_requests()
    rsp = BLKIF.response.record
    back.put_response(rsp(id=reqs[0].id, operation=0, status=0))
    assert back.push_responses() is True  # rsp_event starts at 1
    back.put_response(rsp(id=reqs[1].id))
    assert back.push_responses() is False  # front has not re-armed
    assert [r.id for r in front.get_responses()] == [0, 1]
    assert front.final_check_for_responses() is False
    back.put_responses(rsp(id=r.id) for r in reqs[2:])
    assert back.push_responses() is True


def test_final_check_sees_work_that_raced_in() -> None:
    front, back, _ = pair()
    assert back.final_check_for_requests() is False
    front.put_request(read_request(1))
    front.push_requests()
    assert back.final_check_for_requests() is True


def test_request_fields_round_trip_and_status_is_signed() -> None:
    front, back, _ = pair()
    seg = BLKIF.request.record().seg[0]._replace(gref=77, first_sect=1, last_sect=7)
    req = BLKIF.request.record(
        operation=blkif.BLKIF_OP_WRITE,
        nr_segments=1,
        handle=51712,
        id=2**64 - 1,
        sector_number=123456789,
        seg=[seg],
    )
    front.put_request(req)
    front.push_requests()
    (got,) = back.get_requests()
    assert got.id == 2**64 - 1 and got.handle == 51712 and got.seg[0] == seg
    back.put_response(
        BLKIF.response.record(id=got.id, operation=got.operation, status=blkif.BLKIF_RSP_EOPNOTSUPP)
    )
    back.push_responses()
    (rsp,) = front.get_responses()
    assert rsp.status == -2 and rsp.id == 2**64 - 1


def test_response_padding_is_zeroed() -> None:
    front, back, mem = pair()
    front.put_request(read_request(9))
    front.push_requests()
    back.get_requests()
    mem[64 : 64 + 16] = b"\xee" * 16
    back.put_response(BLKIF.response.record(id=9, operation=0, status=-1))
    back.push_responses()
    raw = bytes(mem[64:80])
    assert raw[9] == 0 and raw[12:16] == bytes(4)


def test_ring_full_is_refused_locally() -> None:
    front, _, _ = pair()
    assert front.put_requests(read_request(i) for i in range(32)) == 32
    assert front.full
    with pytest.raises(RingFull):
        front.put_request(read_request(99))


def test_back_cannot_answer_more_than_it_consumed() -> None:
    _, back, _ = pair()
    with pytest.raises(RingFull):
        back.put_response(BLKIF.response.record(id=1))


def test_hostile_req_prod_is_an_overflow() -> None:
    _, back, mem = pair()
    struct.pack_into("<I", mem, 0, 33)  # req_prod runs 33 slots past rsp_prod_pvt 0
    with pytest.raises(RingOverflow):
        back.get_requests()


def test_back_never_consumes_more_than_the_ring_holds() -> None:
    """A full ring of unanswered requests: RING_REQUEST_CONS_OVERFLOW stops consumption."""
    front, back, mem = pair()
    front.put_requests(read_request(i) for i in range(32))
    front.push_requests()
    assert len(back.get_requests()) == 32
    struct.pack_into("<I", mem, 0, 32)  # the front end cannot publish more yet
    assert back.get_requests() == []


def test_hostile_rsp_prod_is_an_overflow() -> None:
    front, _, mem = pair()
    front.put_requests(read_request(i) for i in range(2))
    front.push_requests()
    struct.pack_into("<I", mem, 8, 3)  # three responses for two requests
    with pytest.raises(RingOverflow):
        front.get_responses()


def test_indices_wrap_at_32_bits() -> None:
    mem = shared()
    start = 2**32 - 5
    struct.pack_into("<4I", mem, 0, start, start + 1, start, start + 1)
    front = FrontRing(BLKIF, mem, attach=True)
    back = BackRing(BLKIF, mem, attach=True)
    for round_ in range(3):
        front.put_requests(read_request(round_ * 10 + i) for i in range(7))
        front.push_requests()
        reqs = back.get_requests()
        assert [r.id for r in reqs] == [round_ * 10 + i for i in range(7)]
        back.put_responses(BLKIF.response.record(id=r.id) for r in reqs)
        back.push_responses()
        assert [r.id for r in front.get_responses()] == [r.id for r in reqs]
    assert header(mem)[0] == (start + 21) % 2**32


def test_multi_page_ring_entries_straddle_pages() -> None:
    front, back, _ = pair(pages=4)
    assert front.nr_ents == 128
    for batch in range(5):
        front.put_requests(read_request(batch * 100 + i, sector=i) for i in range(100))
        front.push_requests()
        reqs = back.get_requests()
        assert [(r.id, r.sector_number) for r in reqs] == [(batch * 100 + i, i) for i in range(100)]
        back.put_responses(BLKIF.response.record(id=r.id) for r in reqs)
        back.push_responses()
        assert len(front.get_responses()) == 100


def test_ids_are_written_into_the_slots_the_requests_go_to() -> None:
    """put_requests_with_ids: the ids given, not the records' own, across the wrap."""
    front, back, _ = pair()
    for _ in range(30):  # move the indices near the end of the 32 slots
        front.put_request(read_request(0))
    front.push_requests()
    back.put_responses(BLKIF.response.record(id=r.id) for r in back.get_requests())
    back.push_responses()
    front.get_responses()
    requests = [read_request(7, sector=i) for i in range(5)]
    assert front.put_requests_with_ids(requests, [100, 2**64 - 1, 3, 4, 5]) == 5
    front.push_requests()
    got = back.get_requests()
    assert [(r.id, r.sector_number) for r in got] == [
        (100, 0),
        (2**64 - 1, 1),
        (3, 2),
        (4, 3),
        (5, 4),
    ]
    with pytest.raises(RingFull):
        front.put_requests_with_ids([read_request(0)] * 28, range(28))
    with pytest.raises(LayoutError, match="no field 'tag'"):
        front.put_requests_with_ids([read_request(0)], [1], "tag")
