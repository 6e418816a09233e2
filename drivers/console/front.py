"""The guest's console: output that never blocks the writer, and keyboard input.

`write` is synchronous so that `print` can go to the console: text goes
into a buffer and a flusher task moves it into the ring as xenconsoled
makes room. The buffer is bounded; past it the oldest output is dropped
and the loss is said on the console, as a kernel's log buffer would.
"""

import io

import trio

from drivers.console.protocol import guest_stream
from xenlike.domain.evtchn import Doorbell

__all__ = ["ConsoleFront", "ConsoleWriter"]

BUFFER_LIMIT = 1 << 20  # bytes of output held while xenconsoled is not reading


class ConsoleFront:
    def __init__(self, page: memoryview, port: Doorbell) -> None:
        self.stream = guest_stream(page, port)
        self._pending = bytearray()
        self._dropped = 0
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()

    async def run(self) -> None:
        """Pump the port and flush output, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.stream.pump)
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pending:
                    if self._dropped:
                        note = f"\n[console: {self._dropped} bytes of output dropped]\n".encode()
                        self._pending[:0] = note
                        self._dropped = 0
                    chunk = bytes(self._pending[:4096])
                    del self._pending[: len(chunk)]
                    await self.stream.send_all(chunk)
                self._idle.set()

    def write(self, data: bytes) -> None:
        """Queue output for the console; never blocks."""
        if not data:
            return
        self._pending += data
        overflow = len(self._pending) - BUFFER_LIMIT
        if overflow > 0:
            del self._pending[:overflow]
            self._dropped += overflow
        if self._idle.is_set():
            self._idle = trio.Event()
        self._wake.set()

    async def drain(self) -> None:
        """Wait until everything written so far is in the ring."""
        if self._pending:
            await self._idle.wait()

    async def read(self) -> bytes:
        """Keyboard input that xenconsoled forwarded."""
        return await self.stream.receive_some()


class ConsoleWriter(io.TextIOBase):
    """A text stream onto the console, for `sys.stdout` / `print(file=...)`."""

    def __init__(self, console: ConsoleFront) -> None:
        self.console = console

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.console.write(text.encode("utf-8", "replace"))
        return len(text)
