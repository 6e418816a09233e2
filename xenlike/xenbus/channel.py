"""A ring and its event channel, as trio objects: the data path of a PV device.

`FrontChannel.call(request)` sends one request and waits for its response;
calls from many tasks share the ring, batched into one push where they
coincide, with ring.h's event suppression deciding when to notify. The
channel owns the requests' `id` field: it hands out ids itself and matches
responses by them, so a driver never manages cookies.

`BackChannel.serve(handler)` hands each batch the front end publishes to
`handler`, sleeping only after ring.h's final check; `respond` publishes a
response and notifies only when the front end asked to be woken.

Both run ring.h's consumer loop, `serve_port`: drain every ring bound to
a port, run ring.h's final checks, and only then sleep on the port. A
device with several rings (`RingGroup`) runs the same loop, once per port,
with a handler per ring. (`BackChannel.batches_of_requests` is the same
loop for one ring as an iterator, for tests and benchmarks that answer in
a loop of their own.)

A protocol violation (an impossible index) breaks the channel with
`ChannelBroken`; the device then goes to Closing.
"""

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import trio

from xenlike.domain.evtchn import Doorbell
from xenlike.ring import BackRing, FrontRing, RingOverflow

__all__ = [
    "BackChannel",
    "ChannelBroken",
    "Disconnected",
    "Drain",
    "FrontChannel",
    "RingGroup",
    "fail_orphans",
    "serve_port",
]

Handler = Callable[[list[Any]], Awaitable[None]]  # what to do with one batch of a ring


class ChannelBroken(Exception):
    """The peer broke the ring protocol; the device must be disconnected."""


class Disconnected(Exception):
    """The device disconnected before this request was answered."""


class Drain:
    """A ring bound to a port: what the port's loop does with it, and when to
    ask to be woken for it.

    With a `handler`, `serve_port` takes each batch the ring has (requests
    of a `BackRing`, responses of a `FrontRing`) and awaits `handler(batch)`.
    `armed` says whether the loop runs ring.h's final check for this ring
    before sleeping (which sets req_event / rsp_event, so the peer notifies
    on its next push): always by default; with `armed=False` only while a
    task is in `wait`. A ring not armed is still drained whenever the port
    wakes: netfront's tx ring is armed only while a sender waits for room,
    so a guest that keeps sending is not woken per completion.

    Without a handler the ring is only watched: the loop never takes from
    it, a task of the driver takes what it needs when it needs it and sleeps
    in `wait` when the ring has too little (netback's rx task waiting for
    buffers). Taking a watched ring's entries early would move its consumer
    index, and with it when the peer has to notify, for no gain.
    """

    __slots__ = (
        "handler",
        "armed",
        "ring",
        "trace",
        "take",
        "final_check",
        "unconsumed",
        "_waiting",
        "_handled",
    )

    def __init__(self, handler: Handler | None = None, *, armed: bool = True) -> None:
        self.handler = handler
        self.armed = armed  # of a ring with a handler; a watched ring's, only while waited on
        self.ring: FrontRing | BackRing | None = None
        self.trace: Any = None  # a RingTrace while the device's ring events are recorded
        self._waiting = 0
        self._handled = trio.Event()

    def bind(self, ring: FrontRing | BackRing) -> "Drain":
        """Attach the ring this drains (once, before the loop runs)."""
        self.ring = ring
        if isinstance(ring, BackRing):
            self.take: Callable[[], list[Any]] = ring.get_requests
            self.final_check: Callable[[], bool] = ring.final_check_for_requests
            self.unconsumed: Callable[[], int] = ring.unconsumed_requests
        else:
            self.take, self.final_check = ring.get_responses, ring.final_check_for_responses
            self.unconsumed = ring.unconsumed_responses
        return self

    async def wait(self) -> None:
        """Sleep until this ring has news, for a task waiting on it outside the loop
        (a sender waiting for room, a back end waiting for buffers).

        The ring is armed meanwhile, and ring.h's final check runs here first:
        when it finds entries waiting, this returns at once (take them
        yourself); otherwise the peer's next push wakes the port's loop, and
        this returns once the loop has handled that batch (or, for a watched
        ring, seen it), or at `wake`.
        """
        self._waiting += 1
        try:
            handled = self._handled
            if not _final_check(self):
                await handled.wait()
        finally:
            self._waiting -= 1

    def wake(self) -> None:
        """End every `wait` now: after a handled batch, when a task took the ring's
        entries itself (the loop will not see them), or when the device goes away."""
        if self._waiting:
            self._handled.set()
            self._handled = trio.Event()


def _final_check(drain: Drain) -> bool:
    """RING_FINAL_CHECK_FOR_REQUESTS (or _RESPONSES), recorded when traced."""
    more = drain.final_check()
    if drain.trace is not None:
        drain.trace.final_check(more)
    return more


async def serve_port(port: Doorbell, drains: Sequence[Drain]) -> None:
    """Hand each batch published on the rings bound to `port` to its ring's
    handler, sleeping only when safe, until cancelled (or a handler raises).

    ring.h's consumer loop, for every ring of every driver: take what each ring
    has; when none had anything, RING_FINAL_CHECK_FOR_REQUESTS (or
    _RESPONSES) on each armed ring, whose mb() orders the event index store
    before the last look at the producer index; sleep on the port only when
    every one of them said nothing more is coming. A peer that publishes
    after the final check sees the event index and notifies the port, which
    latches the notification until `wait`, so no wake-up is lost. An
    impossible index raises ChannelBroken.

    It is a plain loop on purpose: a batch costs one call of its handler (no
    generator between the ring and the handler), and each ring's take and
    handler are looked up once, not per pass: netif's small batches pay for
    every pass.
    """
    served = [(drain, drain.take, drain.handler) for drain in drains if drain.handler is not None]
    watched = [drain for drain in drains if drain.handler is None]
    try:
        while True:
            busy = False
            for drain, take, handler in served:
                batch = take()
                if batch:
                    busy = True
                    await handler(batch)
                    if drain._waiting:
                        drain.wake()
            for drain in watched:  # the task waiting on it takes its entries
                if drain._waiting and drain.unconsumed():
                    drain.wake()
            if busy:
                continue
            for drain, _, _ in served:
                if (drain.armed or drain._waiting) and _final_check(drain):
                    busy = True
                    break
            if not busy:
                await port.wait()
    except RingOverflow as exc:
        raise ChannelBroken(str(exc)) from exc


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
        self._drain = Drain(self.collect).bind(ring)

    @property
    def trace(self) -> Any:
        """A RingTrace while the device's ring events are recorded."""
        return self._drain.trace

    @trace.setter
    def trace(self, trace: Any) -> None:
        self._drain.trace = trace

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
        await serve_port(self.port, [self._drain])

    async def collect(self, responses: list[Any]) -> None:
        """Take a batch of responses: wake the callers whose last response is in, free
        the ids. `run` calls it; a `RingGroup` whose rings share a port takes it
        as the handler of this channel's ring."""
        in_flight, free_ids, index = self._in_flight, self._free_ids, self._rsp_id_index
        for response in responses:
            rid = response[index]
            entry = in_flight.pop(rid, None)
            if entry is None:
                raise ChannelBroken(f"{self.ring.spec.name}: response for unknown id {rid}")
            free_ids.append(rid)
            batch, position = entry  # batch.answer(position, response), inline
            batch.responses[position] = response
            batch.left -= 1
            if not batch.left:
                batch.event.set()
        if self._room:
            self._room.unpark_all()

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
        self._drain = Drain().bind(ring)

    @property
    def trace(self) -> Any:
        """A RingTrace while the device's ring events are recorded."""
        return self._drain.trace

    @trace.setter
    def trace(self, trace: Any) -> None:
        self._drain.trace = trace

    async def serve(self, handler: Handler) -> None:
        """Hand each batch the front end publishes to `handler` until cancelled
        (`serve_port` over this one ring); ChannelBroken on an impossible index."""
        self._drain.handler = handler
        await serve_port(self.port, [self._drain])

    async def batches_of_requests(self) -> AsyncIterator[list[Any]]:
        """Each batch the front end published, for a back end that runs its own
        loop (a test's, a benchmark's echo end): `serve_port` for this one ring,
        as an iterator. A driver's data path uses `serve`, which has no generator
        between the ring and its handler."""
        drain, take, port = self._drain, self.ring.get_requests, self.port
        try:
            while True:
                batch = take()
                if batch:
                    yield batch
                elif not _final_check(drain):
                    await port.wait()
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
    tx and rx rings on one event channel, its ctrl ring on another). The
    driver says what to do with each ring's batches, as a one-ring driver
    says what to do with each request: `serve({"tx": on_tx, "rx": on_rx})`
    runs one `serve_port` loop per port, each draining every ring bound to
    it. `rings` are `FrontRing`s in a front end and `BackRing`s in a back end.
    """

    def __init__(
        self, rings: Mapping[str, FrontRing | BackRing], ports: Mapping[str, Doorbell]
    ) -> None:
        self.rings = dict(rings)
        self.ports = dict(ports)  # ring name -> its event channel (shared ones appear twice)

    async def serve(self, handlers: Mapping[str, Handler | Drain]) -> None:
        """Hand each ring's batches to its handler until cancelled (or a handler raises).

        A handler is an async callable taking a batch, or a `Drain` of one
        with an `armed` condition. Rings without a handler are left alone
        (a driver serving one through a channel of its own); a handler for
        an optional ring the peer did not set up is skipped. Handlers of
        rings sharing a port run in one task, in the order given.
        """
        by_port: dict[int, tuple[Doorbell, list[Drain]]] = {}
        for name, handler in handlers.items():
            ring = self.rings.get(name)
            if ring is None:
                continue
            drain = handler if isinstance(handler, Drain) else Drain(handler)
            port = self.ports[name]
            by_port.setdefault(id(port), (port, []))[1].append(drain.bind(ring))
        loops = list(by_port.values())
        if len(loops) == 1:  # the common case needs no nursery
            await serve_port(*loops[0])
            return
        async with trio.open_nursery() as nursery:
            for port, drains in loops:
                nursery.start_soon(serve_port, port, drains)

    def front_channel(self, name: str, **options: Any) -> FrontChannel:
        """A `FrontChannel` over one of the rings (netfront's ctrl ring: calls by id)."""
        ring = self.rings[name]
        if not isinstance(ring, FrontRing):
            raise TypeError(f"ring {name!r} is a {type(ring).__name__}, not a FrontRing")
        return FrontChannel(ring, self.ports[name], **options)

    def back_channel(self, name: str) -> BackChannel:
        """A `BackChannel` over one of the rings (to answer with `respond_many`)."""
        ring = self.rings[name]
        if not isinstance(ring, BackRing):
            raise TypeError(f"ring {name!r} is a {type(ring).__name__}, not a BackRing")
        return BackChannel(ring, self.ports[name])

    def release(self) -> None:
        """Drop the rings' views of the shared pages, so they can be unmapped or freed."""
        for ring in self.rings.values():
            ring.release()
