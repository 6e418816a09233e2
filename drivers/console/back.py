"""xenconsoled's end of one guest's console: output out, keystrokes in."""

from collections.abc import Callable

import trio

from drivers.console.protocol import backend_stream
from xenlike.domain.evtchn import Doorbell
from xenlike.logfile import ReadThrottle

__all__ = ["ConsoleBack"]


class ConsoleBack:
    """Serves one console page that Dom0 has mapped, over its bound port."""

    def __init__(self, page: memoryview, port: Doorbell) -> None:
        self.stream = backend_stream(page, port)

    async def run(self, on_output: Callable[[bytes], None]) -> None:
        """Hand every chunk of guest output to `on_output` until cancelled or broken,
        throttled as xenconsoled throttles a domain: a guest that floods its
        console costs Dom0 bounded CPU, and its output waits in the ring and in
        the guest's own buffer (which drops its oldest)."""
        throttle = ReadThrottle()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.stream.pump)
            while True:
                on_output(await self.stream.receive_some())
                await throttle.read()

    async def send_input(self, data: bytes) -> None:
        await self.stream.send_all(data)
