"""Ring channels: many callers over one ring, suppression, broken peers, resubmission."""

import struct

import pytest
import trio
import trio.testing

from xenlike.abi import blkif
from xenlike.codec import LayoutError
from xenlike.ring import BackRing, FrontRing, define_ring
from xenlike.testing import doorbell_pair
from xenlike.xenbus.channel import (
    BackChannel,
    ChannelBroken,
    Disconnected,
    FrontChannel,
    fail_orphans,
)

BLKIF = define_ring("blkif", request=blkif.blkif_request, response=blkif.blkif_response)


def make_pair() -> tuple[FrontChannel, BackChannel, memoryview]:
    page = memoryview(bytearray(4096))
    front_bell, back_bell = doorbell_pair()
    front = FrontChannel(FrontRing(BLKIF, page), front_bell)
    back = BackChannel(BackRing(BLKIF, page), back_bell)
    return front, back, page


async def echo_server(
    back: BackChannel, reverse: bool = False, sizes: list[int] | None = None
) -> None:
    """Answer each batch (its size appended to `sizes`), optionally in reverse order,
    with status = sector % 2 - 1."""
    async for batch in back.batches_of_requests():
        if sizes is not None:
            sizes.append(len(batch))
        if reverse:
            batch = batch[::-1]
        back.respond_many(
            [
                BLKIF.response.record(
                    id=r.id, operation=r.operation, status=r.sector_number % 2 - 1
                )
                for r in batch
            ]
        )


@pytest.mark.parametrize("reverse", [False, True])
async def test_many_concurrent_callers_get_their_own_responses(nursery, reverse: bool) -> None:
    front, back, _ = make_pair()
    nursery.start_soon(front.run)
    nursery.start_soon(echo_server, back, reverse)
    results: dict[int, int] = {}

    async def caller(n: int) -> None:
        for sector in range(n * 1000, n * 1000 + 50):
            rsp = await front.call(BLKIF.request.record(operation=0, sector_number=sector))
            results[sector] = rsp.status

    async with trio.open_nursery() as callers:
        for n in range(64):  # more callers than the ring's 32 slots
            callers.start_soon(caller, n)
    assert len(results) == 64 * 50
    assert all(status == sector % 2 - 1 for sector, status in results.items())
    assert back.notifies < back.answered / 2  # suppression keeps notifies well under one per answer
    nursery.cancel_scope.cancel()


async def test_a_batch_is_one_push(nursery) -> None:
    front, back, _ = make_pair()
    nursery.start_soon(front.run)
    sizes: list[int] = []
    nursery.start_soon(echo_server, back, False, sizes)
    responses = await front.call_many([BLKIF.request.record(sector_number=s) for s in range(20)])
    assert [r.status for r in responses] == [s % 2 - 1 for s in range(20)]
    assert sizes == [20]
    nursery.cancel_scope.cancel()


async def test_a_response_for_an_unknown_id_breaks_the_channel() -> None:
    front, back, page = make_pair()
    outcome: list[BaseException] = []

    async def caller() -> None:
        try:
            await front.call(BLKIF.request.record())
        except Disconnected as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            await trio.sleep(0.01)
            (request,) = back.ring.get_requests()
            back.respond(BLKIF.response.record(id=request.id + 7))
            with pytest.raises(ChannelBroken, match="unknown id"):
                await front.run()
            orphans = front.fail(ChannelBroken("bad response id"))
            assert len(orphans) == 1
            fail_orphans(orphans, ChannelBroken("bad response id"))
    assert outcome and "bad response id" in str(outcome[0])


async def test_requests_in_flight_are_resubmitted_on_a_new_channel(nursery) -> None:
    front, back, _ = make_pair()
    nursery.start_soon(front.run)
    answers: list[int] = []

    async def caller(sector: int) -> None:
        answers.append((await front.call(BLKIF.request.record(sector_number=sector))).status)

    async with trio.open_nursery() as callers:
        for sector in range(5):
            callers.start_soon(caller, sector)
        await trio.testing.wait_all_tasks_blocked()  # every caller has submitted
        assert len(back.ring.get_requests()) == 5  # consumed, never answered: the back end died
        orphans = front.fail(Disconnected("back end went away"))
        new_front, new_back, _ = make_pair()
        nursery.start_soon(new_front.run)
        nursery.start_soon(echo_server, new_back)
        await new_front.adopt(orphans)
    assert sorted(answers) == sorted(s % 2 - 1 for s in range(5))
    nursery.cancel_scope.cancel()


async def test_hostile_req_prod_breaks_the_back_channel() -> None:
    _, back, page = make_pair()
    struct.pack_into("<I", page, 0, 1000)
    with pytest.raises(ChannelBroken):
        async for _ in back.requests():
            pass


def test_an_id_field_the_request_lacks_is_refused_up_front() -> None:
    front, _, _ = make_pair()
    with pytest.raises(LayoutError, match="no field 'tag'"):
        FrontChannel(front.ring, front.port, id_field="tag")
