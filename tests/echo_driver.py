"""A minimal PV driver pair, used by the XenBus end-to-end tests.

The back end multiplies each request's value by its `factor` key (written
by the toolstack from the topology's device line); the front end offers
`scale(value)`.
"""

import trio
from construct import Int64ul, Struct

from domains.guest import Guest
from xenlike.ring import define_ring
from xenlike.xenbus import Backend, Driver, Frontend

ECHO_RING = define_ring(
    "echo",
    request=Struct("id" / Int64ul, "value" / Int64ul),
    response=Struct("id" / Int64ul, "value" / Int64ul),
)


class EchoBackend(Backend):
    device_type = "echo"
    ring = ECHO_RING
    max_ring_page_order = 2

    async def connected(self) -> None:
        self.factor = int(await self.read("factor", "1") or 1)
        self.connections = getattr(self, "connections", 0) + 1
        # After the front end's own three reconnects (its fourth connection): a
        # reload that overlapped one of them would merge with it into one.
        if await self.read("restart-after", None) and self.connections == 4:
            self.ctx.nursery.start_soon(self._restart_later)

    async def _restart_later(self) -> None:
        """Reload mid-stream, once, as the tests ask with `restart-after`."""
        await trio.sleep(float(await self.read("restart-after", "0") or 0))
        await self.reconnect()

    def features(self) -> dict[str, str | int]:
        return {"feature-scale": 1}

    async def handle(self, request):  # type: ignore[no-untyped-def]
        return ECHO_RING.response.record(id=request.id, value=request.value * self.factor)


class EchoFrontend(Frontend):
    device_type = "echo"
    ring = ECHO_RING
    ring_page_order = 1

    connections = 0

    async def connected(self) -> None:
        self.connections += 1

    async def scale(self, value: int) -> int:
        response = await self.call(ECHO_RING.request.record(value=value))
        return response.value


DRIVER = Driver("echo", frontend=EchoFrontend, backend=EchoBackend)


async def program(guest: Guest) -> None:
    device = guest.device("echo")
    results: dict[int, int] = {}

    async def one(value: int) -> None:
        results[value] = await device.scale(value)

    async with trio.open_nursery() as nursery:
        for value in range(2000):
            nursery.start_soon(one, value)
    assert results == {v: v * 3 for v in range(2000)}, "wrong answers"
    order = await device.read("ring-page-order", "0")
    print(f"[{guest.name}] echo ok: 2000 answers, ring-page-order {order}")

    for _ in range(3):
        results.clear()
        connections = device.connections
        async with trio.open_nursery() as nursery:
            for value in range(300):
                nursery.start_soon(one, value)
            await trio.sleep(0)
            await device.reconnect()
        assert results == {v: v * 3 for v in range(300)}, "requests lost across the reconnect"
        while device.connections == connections:  # the answers may beat the reconnect:
            await trio.sleep(0.01)  # a reconnect asked for during one would join it
    print(f"[{guest.name}] echo reconnect ok: 300 answers across each of 3 reconnects")
    # The back end reloads itself once, `restart-after` seconds after its fourth
    # connection (this end's last reconnect above): keep calls flowing until this
    # end has connected a fifth time.
    results.clear()

    async def caller(start: int) -> None:
        value = start
        while device.connections < 5 or value < start + 300 * 8:
            await one(value)
            value += 8

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for start in range(8):
                nursery.start_soon(caller, start)
    assert all(answer == value * 3 for value, answer in results.items())
    print(f"[{guest.name}] echo across a back-end restart ok: {len(results)} answers")
    await trio.sleep_forever()
