"""xenconsoled's end of one guest's console: output out, keystrokes in."""

from collections.abc import Callable

import trio

from drivers.console.protocol import backend_stream
from xenlike.bytering import Doorbell

__all__ = ["ConsoleBack"]

# tools/console/daemon/io.c: a domain gets 30 reads of its ring per 200 ms; past
# that xenconsoled leaves the ring alone until the period ends, so a guest that
# floods its console costs Dom0 a bounded amount of CPU (and its own output waits
# in the ring and the guest's buffer, which drops its oldest).
RATE_LIMIT_ALLOWANCE = 30
RATE_LIMIT_PERIOD = 0.2  # seconds


class ConsoleBack:
    """Serves one console page that Dom0 has mapped, over its bound port."""

    def __init__(self, page: memoryview, port: Doorbell) -> None:
        self.stream = backend_stream(page, port)

    async def run(self, on_output: Callable[[bytes], None]) -> None:
        """Hand every chunk of guest output to `on_output` until cancelled or broken,
        throttled as xenconsoled throttles a domain."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.stream.pump)
            period_end, reads = trio.current_time() + RATE_LIMIT_PERIOD, 0
            while True:
                on_output(await self.stream.receive_some())
                reads += 1
                now = trio.current_time()
                if now >= period_end:
                    period_end, reads = now + RATE_LIMIT_PERIOD, 0
                elif reads >= RATE_LIMIT_ALLOWANCE:
                    await trio.sleep_until(period_end)
                    period_end, reads = trio.current_time() + RATE_LIMIT_PERIOD, 0

    async def send_input(self, data: bytes) -> None:
        await self.stream.send_all(data)
