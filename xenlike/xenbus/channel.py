"""A ring and its event channel, as trio objects: the data path of a PV device.

`FrontChannel.call(request)` sends one request and waits for its response;
calls from many tasks share the ring, batched into one push where they
coincide, with ring.h's event suppression deciding when to notify. The
channel owns the requests' `id` field: it hands out ids itself and matches
responses by them, so a driver never manages cookies.

`BackChannel.requests()` yields every request the front end publishes,
sleeping only after ring.h's final check; `respond` publishes a response
and notifies only when the front end asked to be woken.

A protocol violation (an impossible index) breaks the channel with
`ChannelBroken`; the device then goes to Closing.
"""

import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio

from xenlike.domain.evtchn import Doorbell
from xenlike.ring import BackRing, FrontRing, RingOverflow

__all__ = [
    "BackChannel",
    "ChannelBroken",
    "Disconnected",
    "FrontChannel",
    "RingGroup",
    "fail_orphans",
]


class ChannelBroken(Exception):
    """The peer broke the ring protocol; the device must be disconnected."""


class Disconnected(Exception):
    """The device disconnected before this request was answered."""


class _Batch:
    """The requests of one `call_many` and their responses, with one wake-up for
    the caller when the last is in. The channel keeps `(batch, index)` per id."""

    __slots__ = ("requests", "responses", "left", "event", "error")

    def __init__(self, requests: list[Any]) -> None:
        self.requests = list(requests)
        self.responses: list[Any] = [None] * len(requests)
        self.left = len(requests)
        self.event = trio.Event()
        self.error: BaseException | None = None

    def answer(self, index: int, response: Any) -> None:
        self.responses[index] = response
        self.left -= 1
        if not self.left:
            self.event.set()


class FrontChannel:
    """The front end's side: submit requests, get responses, by id."""

    def __init__(self, ring: FrontRing, port: Doorbell, *, id_field: str = "id") -> None:
        self.ring = ring
        self.port = port
        ring.id_packer(id_field)  # a bad id field fails here, not when used
        self._id_field = id_field
        self._rsp_id_index = ring.spec.response.record._fields.index(id_field)
        self._free_ids = list(range(ring.nr_ents))
        self._in_flight: dict[int, tuple[_Batch, int]] = {}
        self._room = trio.lowlevel.ParkingLot()  # callers waiting for free slots
        self._broken: BaseException | None = None
        self.submitted = 0
        self.notifies = 0
        self.trace: Any = None  # a RingTrace while the device's ring events are recorded

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def requests_in_flight(self) -> list[Any]:
        """The requests sent and not yet answered, in submission order: what a
        front end records (Linux blkfront's shadow) before its domain is saved."""
        return [batch.requests[index] for batch, index in self._in_flight.values()]

    async def call(self, request: Any) -> Any:
        """Send one request; return its response (the id field is set for you)."""
        (response,) = await self.call_many([request])
        return response

    async def call_many(self, requests: list[Any]) -> list[Any]:
        """Send requests in one push (as far as the ring has room); responses in order.

        The caller sleeps once, until the last response is in: a batch costs
        one task switch, not one per request. Only a full ring makes it push
        part of the batch and wait for room.
        """
        if not requests:
            await trio.lowlevel.checkpoint()
            return []
        batch = _Batch(requests)
        await self._submit([(batch, index) for index in range(len(requests))])
        await batch.event.wait()
        if batch.error is not None:
            raise batch.error
        return batch.responses

    async def _submit(self, entries: list[tuple[_Batch, int]]) -> None:
        """Give each request an id and a slot, pushing as the ring fills; wait for room."""
        start = 0
        while start < len(entries):
            if self._broken is not None:
                raise Disconnected(str(self._broken))
            room = len(self._free_ids)  # a free id is a free slot: both come back together
            if not room:
                await self._room.park()
                continue
            chunk = entries[start : start + room]
            start += len(chunk)
            ids = self._free_ids[-len(chunk) :]
            del self._free_ids[-len(chunk) :]
            self._in_flight.update(zip(ids, chunk))
            self.ring.put_requests_with_ids(
                [batch.requests[index] for batch, index in chunk], ids, self._id_field
            )
            self.submitted += len(chunk)
            self._push()

    def _push(self) -> None:
        notify = self.ring.push_requests()
        if self.trace is not None:
            self.trace.pushed(notify)
        if notify:
            self.notifies += 1
            self.port.notify()

    async def run(self) -> None:
        """Collect responses until cancelled; a protocol violation breaks the channel."""
        ring, index = self.ring, self._rsp_id_index
        try:
            while True:
                responses = ring.get_responses()
                if responses:
                    in_flight, free_ids = self._in_flight, self._free_ids
                    for response in responses:
                        rid = response[index]
                        entry = in_flight.pop(rid, None)
                        if entry is None:
                            raise RingOverflow(f"{ring.spec.name}: response for unknown id {rid}")
                        free_ids.append(rid)
                        batch, position = entry  # batch.answer(position, response), inline
                        batch.responses[position] = response
                        batch.left -= 1
                        if not batch.left:
                            batch.event.set()
                    if self._room:
                        self._room.unpark_all()
                    continue
                more = ring.final_check_for_responses()
                if self.trace is not None:
                    self.trace.final_check(more)
                if not more:
                    await self.port.wait()
        except RingOverflow as exc:
            raise ChannelBroken(str(exc)) from exc

    def fail(self, error: BaseException) -> list[Any]:
        """Stop the channel and hand back what was in flight, in submission order.

        The caller decides their fate: `adopt` them on a new channel (their
        callers keep waiting) or `fail_orphans` (their callers get
        `Disconnected`). Acknowledged requests are not among them.
        """
        self._broken = error
        orphans = list(self._in_flight.values())
        self._in_flight.clear()
        self._room.unpark_all()  # callers waiting for room see _broken
        return orphans

    def release(self) -> None:
        """Drop the ring's views of the shared pages, so they can be unmapped or freed."""
        self.ring.release()

    async def adopt(self, orphans: list[Any]) -> None:
        """Resubmit requests left in flight by an earlier channel; their callers keep waiting."""
        await self._submit(orphans)


def fail_orphans(orphans: list[Any], error: BaseException) -> None:
    """Tell callers of requests that will never be resubmitted."""
    for batch, index in orphans:
        batch.error = Disconnected(str(error))
        batch.answer(index, None)


class BackChannel:
    """The back end's side: take requests, answer them (in any order)."""

    def __init__(self, ring: BackRing, port: Doorbell) -> None:
        self.ring = ring
        self.port = port
        self.answered = 0
        self.notifies = 0
        self.batches = 0
        self.trace: Any = None  # a RingTrace while the device's ring events are recorded

    async def batches_of_requests(self) -> AsyncIterator[list[Any]]:
        """Each batch the front end published, sleeping only when ring.h says it is safe."""
        ring = self.ring
        try:
            while True:
                requests = ring.get_requests()
                if requests:
                    self.batches += 1
                    yield requests
                    continue
                more = ring.final_check_for_requests()
                if self.trace is not None:
                    self.trace.final_check(more)
                if not more:
                    await self.port.wait()
        except RingOverflow as exc:
            raise ChannelBroken(str(exc)) from exc

    async def requests(self) -> AsyncIterator[Any]:
        async for batch in self.batches_of_requests():
            for request in batch:
                yield request

    def respond(self, response: Any) -> None:
        """Publish one response; notify only if the front end asked to be woken."""
        self.ring.put_response(response)
        self.answered += 1
        self.push()

    def respond_many(self, responses: list[Any]) -> None:
        self.ring.put_responses(responses)
        self.answered += len(responses)
        self.push()

    def push(self) -> None:
        notify = self.ring.push_responses()
        if self.trace is not None:
            self.trace.pushed(notify)
        if notify:
            self.notifies += 1
            self.port.notify()

    def release(self) -> None:
        """Drop the ring's views of the shared pages, so they can be unmapped or freed."""
        self.ring.release()

    @property
    def notify_ratio(self) -> float:
        return self.notifies / self.answered if self.answered else math.nan


class RingGroup:
    """A device's rings by name, each with the port it is notified on.

    What a driver with several rings gets instead of one channel (netif's
    tx, rx and ctrl rings): it runs its own data path over them, because
    rings that share one event channel cannot each sleep on it alone.
    `rings` are `FrontRing`s in a front end and `BackRing`s in a back end.
    """

    def __init__(
        self, rings: Mapping[str, FrontRing | BackRing], ports: dict[str, Doorbell]
    ) -> None:
        self.rings = rings
        self.ports = ports  # ring name -> its event channel (shared ports appear more than once)

    def release(self) -> None:
        """Drop the rings' views of the shared pages, so they can be unmapped or freed."""
        for ring in self.rings.values():
            ring.release()
