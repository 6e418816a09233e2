"""Several rings on one event channel: the framework's loop loses no wake-up.

A front end and a back end, each a `RingGroup` of three rings sharing one
port, in one process over real eventfds. Producers publish on any ring in
any order and split, with the loops interleaved at random points; every
request must be answered and every response collected. A loop that slept
without arming every ring's event index (or without looking again after
arming it) would miss a push and hang here.
"""

import random

import pytest
import trio
import trio.testing
from construct import Int64ul, Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlike.ring import BackRing, FrontRing, define_ring
from xenlike.testing import doorbell_pair
from xenlike.xenbus import ChannelBroken, Drain, RingGroup
from xenlike.xenbus.channel import Handler

WORD = define_ring(
    "word",
    request=Struct("id" / Int64ul, "value" / Int64ul),
    response=Struct("id" / Int64ul, "value" / Int64ul),
)
NAMES = ("a", "b", "c")


def make_groups() -> tuple[RingGroup, RingGroup]:
    memory = {name: memoryview(bytearray(4096)) for name in NAMES}
    front_bell, back_bell = doorbell_pair()
    front = RingGroup(
        {name: FrontRing(WORD, memory[name]) for name in NAMES},
        {name: front_bell for name in NAMES},
    )
    back = RingGroup(
        {name: BackRing(WORD, memory[name]) for name in NAMES}, {name: back_bell for name in NAMES}
    )
    return front, back


async def exchange(sends: list[tuple[int, int, int]], seed: int) -> dict[str, list[int]]:
    """Publish `sends` (ring, how many, yields before the push) from one task per
    ring; return what came back on each ring, in order."""
    front, back = make_groups()
    shuffle = random.Random(seed)
    answered: dict[str, list[int]] = {name: [] for name in NAMES}
    room = {name: trio.Event() for name in NAMES}

    def back_handler(name: str) -> Handler:
        channel = back.back_channel(name)

        async def on_requests(requests: list[tuple[int, int]]) -> None:
            for _ in range(shuffle.randrange(3)):
                await trio.lowlevel.checkpoint()  # the other side runs mid-batch
            channel.respond_many([(rid, value * 2) for rid, value in requests])

        return on_requests

    def front_handler(name: str) -> Handler:
        async def on_responses(responses: list[tuple[int, int]]) -> None:
            answered[name].extend(value for _, value in responses)
            room[name].set()

        return on_responses

    async def producer(name: str, batches: list[tuple[int, int]]) -> None:
        ring = front.rings[name]
        assert isinstance(ring, FrontRing)
        port = front.ports[name]
        value = 0
        for count, yields in batches:
            for _ in range(yields):
                await trio.lowlevel.checkpoint()
            while ring.free_requests() < count:
                room[name] = trio.Event()
                await room[name].wait()
            ring.put_requests((value + i, value + i) for i in range(count))
            value += count
            if ring.push_requests():
                port.notify()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(back.serve, {name: back_handler(name) for name in NAMES})
            nursery.start_soon(front.serve, {name: front_handler(name) for name in NAMES})
            async with trio.open_nursery() as producers:
                for index, name in enumerate(NAMES):
                    batches = [(count, yields) for ring, count, yields in sends if ring == index]
                    producers.start_soon(producer, name, batches)
            wanted = {
                name: sum(count for ring, count, _ in sends if ring == index)
                for index, name in enumerate(NAMES)
            }
            while any(len(answered[name]) < wanted[name] for name in NAMES):
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()
    return answered


@settings(max_examples=60, deadline=None)
@given(
    sends=st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 32), st.integers(0, 3)), min_size=1, max_size=40
    ),
    seed=st.integers(0, 2**16),
)
def test_rings_sharing_a_port_lose_no_wakeup(sends: list[tuple[int, int, int]], seed: int) -> None:
    answered = trio.run(exchange, sends, seed)
    for index, name in enumerate(NAMES):
        sent = sum(count for ring, count, _ in sends if ring == index)
        assert answered[name] == [2 * value for value in range(sent)]


async def test_a_ring_not_armed_is_still_drained_when_the_port_wakes() -> None:
    """netfront's tx ring: no final check (no notification asked for), but its
    responses are taken whenever another ring on the port wakes the loop."""
    front, back = make_groups()
    taken: dict[str, list[int]] = {"a": [], "b": []}

    async def on(name: str, batch: list[tuple[int, int]]) -> None:
        taken[name].extend(rid for rid, _ in batch)

    a, b = back.rings["a"], back.rings["b"]
    async with trio.open_nursery() as nursery:
        unarmed = Drain(lambda batch: on("b", batch), armed=False)
        handlers: dict[str, Handler | Drain] = {"a": lambda batch: on("a", batch), "b": unarmed}
        nursery.start_soon(back.serve, handlers)
        await trio.testing.wait_all_tasks_blocked()
        assert isinstance(a, BackRing) and isinstance(b, BackRing)
        assert b.header()["req_event"] == 1  # never armed past the initial value
        ring_b, ring_a = front.rings["b"], front.rings["a"]
        assert isinstance(ring_a, FrontRing) and isinstance(ring_b, FrontRing)
        ring_b.put_request((7, 0))
        ring_b.push_requests()  # req_event 1: this first push asks for a notification
        front.ports["b"].notify()
        await trio.testing.wait_all_tasks_blocked()
        ring_b.put_request((8, 0))
        assert ring_b.push_requests() is False  # b is not armed: no notification asked for
        await trio.testing.wait_all_tasks_blocked()
        assert taken["b"] == [7]
        ring_a.put_request((1, 0))
        assert ring_a.push_requests() is True  # a is armed
        front.ports["a"].notify()
        with trio.fail_after(5):
            while taken["b"] != [7, 8]:
                await trio.sleep(0.001)
        assert taken["a"] == [1]
        nursery.cancel_scope.cancel()


async def test_a_task_waiting_on_an_unarmed_ring_is_woken_by_the_next_push() -> None:
    """netfront's sender waiting for room, netback's rx waiting for buffers: `wait`
    arms the ring, so the peer's push notifies, and returns once the batch is handled."""
    front, back = make_groups()
    taken: list[int] = []

    async def on_b(batch: list[tuple[int, int]]) -> None:
        taken.extend(rid for rid, _ in batch)

    b = Drain(on_b, armed=False)
    ring_b = front.rings["b"]
    assert isinstance(ring_b, FrontRing)
    async with trio.open_nursery() as nursery:
        handlers: dict[str, Handler | Drain] = {"a": on_b, "b": b}
        nursery.start_soon(back.serve, handlers)
        ring_b.put_request((1, 0))
        ring_b.push_requests()
        front.ports["b"].notify()
        with trio.fail_after(5):
            while taken != [1]:
                await trio.sleep(0.001)
        ring_b.put_request((2, 0))
        assert ring_b.push_requests() is False  # not armed: no notification asked for
        await b.wait()  # its final check finds request 2 at once: take it yourself
        assert taken == [1] and back.rings["b"].unconsumed_requests() == 1  # type: ignore[union-attr]
        back.rings["b"].get_requests()  # type: ignore[union-attr]
        with trio.fail_after(5):
            async with trio.open_nursery() as waiter:
                waiter.start_soon(b.wait)
                await trio.testing.wait_all_tasks_blocked()
                ring_b.put_request((3, 0))
                assert ring_b.push_requests() is True  # wait armed req_event
                front.ports["b"].notify()
        assert taken == [1, 3]  # handled before the waiter was woken
        nursery.cancel_scope.cancel()


async def test_an_impossible_index_on_any_ring_breaks_the_group() -> None:
    _, back = make_groups()
    ring = back.rings["c"]
    assert isinstance(ring, BackRing)
    ring._hdr[0] = 1000  # req_prod far past what the ring holds

    async def ignore(batch: list[object]) -> None:
        pass

    with trio.fail_after(5), pytest.raises(ChannelBroken, match="req_prod 1000"):
        await back.serve({name: ignore for name in NAMES})


async def test_a_watched_ring_is_left_to_its_task_which_the_next_push_wakes() -> None:
    """netback's rx ring: the loop never takes a watched ring's entries, even when
    the port wakes for another ring; `wait` arms the ring, so the peer's next push
    notifies, and the waiting task finds the entries still there to take."""
    front, back = make_groups()
    taken: list[int] = []

    async def on_a(batch: list[tuple[int, int]]) -> None:
        taken.extend(rid for rid, _ in batch)

    watched = Drain()
    ring_a, ring_b = front.rings["a"], front.rings["b"]
    back_b = back.rings["b"]
    assert isinstance(ring_a, FrontRing) and isinstance(ring_b, FrontRing)
    assert isinstance(back_b, BackRing)
    async with trio.open_nursery() as nursery:
        handlers: dict[str, Handler | Drain] = {"a": on_a, "b": watched}
        nursery.start_soon(back.serve, handlers)
        ring_b.put_request((5, 0))
        ring_b.push_requests()
        ring_a.put_request((1, 0))
        assert ring_a.push_requests() is True
        front.ports["a"].notify()
        with trio.fail_after(5):
            while taken != [1]:
                await trio.sleep(0.001)
        await trio.testing.wait_all_tasks_blocked()
        assert back_b.unconsumed_requests() == 1  # the loop woke, but left b's request
        await watched.wait()  # its final check finds request 5 at once
        assert [rid for rid, _ in back_b.get_requests()] == [5]
        with trio.fail_after(5):
            async with trio.open_nursery() as waiter:
                waiter.start_soon(watched.wait)
                await trio.testing.wait_all_tasks_blocked()
                ring_b.put_request((6, 0))
                assert ring_b.push_requests() is True  # wait armed req_event
                front.ports["b"].notify()
        assert [rid for rid, _ in back_b.get_requests()] == [6]  # left for the task to take
        nursery.cancel_scope.cancel()
