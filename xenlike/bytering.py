"""Byte-stream rings in a shared page: the PV console and the XenStore ring.

console.h's `xencons_interface` and xs_wire.h's `xenstore_domain_interface`
are the same idea twice: two byte arrays (one each way), each with a
free-running 32-bit producer and consumer index, masked by the array size,
a power of two. The producer copies bytes in, issues a write barrier, then
moves its index; the consumer reads the index, a read barrier, copies the
bytes out, a full barrier, then moves its index (console.h's comment).

`ByteRing` is one direction of such a page, sans I/O. Indices written by
the other side are checked: a producer more than a ring ahead of the
consumer is a protocol error (`RingOverflow`), never a read past the array.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import trio

from xenlike.abi._layout import offsetof
from xenlike.abi.console import xencons_interface
from xenlike.abi.xs_wire import xenstore_domain_interface
from xenlike.ring import RingOverflow, mb, rmb, wmb

if TYPE_CHECKING:
    from xenlike.domain.evtchn import Doorbell

__all__ = ["ByteRing", "ByteRingLayout", "ByteRingStream", "CONSOLE", "XENSTORE"]

_MASK32 = 0xFFFFFFFF


@attrs.frozen
class ByteRingLayout:
    """Where one direction's array and indices sit in the shared page."""

    name: str
    data: int
    size: int
    cons: int
    prod: int


def _layout(
    name: str, struct_: object, data: str, size: int, cons: str, prod: str
) -> ByteRingLayout:
    return ByteRingLayout(
        name, offsetof(struct_, data), size, offsetof(struct_, cons), offsetof(struct_, prod)
    )


class _Pair:
    """The two directions of one kind of page, named from the guest's side."""

    def __init__(self, to_backend: ByteRingLayout, to_guest: ByteRingLayout) -> None:
        self.to_backend = to_backend
        self.to_guest = to_guest


CONSOLE = _Pair(
    _layout("console out", xencons_interface, "out", 2048, "out_cons", "out_prod"),
    _layout("console in", xencons_interface, "in_", 1024, "in_cons", "in_prod"),
)
XENSTORE = _Pair(
    _layout("xenstore req", xenstore_domain_interface, "req", 1024, "req_cons", "req_prod"),
    _layout("xenstore rsp", xenstore_domain_interface, "rsp", 1024, "rsp_cons", "rsp_prod"),
)


class ByteRing:
    """One direction of a byte ring; this end either produces or consumes."""

    def __init__(self, page: memoryview, layout: ByteRingLayout) -> None:
        self.page = page.cast("B") if page.format != "B" else page
        self.layout = layout
        self._mask = layout.size - 1
        # The indices as native 32-bit words: one load or store each. (struct's
        # "<I" moves a byte at a time, and the peer would see a torn index.)
        self._words = self.page[: len(self.page) // 4 * 4].cast("I")

    def _index(self, offset: int) -> int:
        return self._words[offset >> 2]

    def _set_index(self, offset: int, value: int) -> None:
        self._words[offset >> 2] = value & _MASK32

    def release(self) -> None:
        """Drop this ring's views of the page, so it can be unmapped."""
        self._words.release()
        self.page.release()

    def used(self) -> int:
        """Bytes written and not yet consumed; refuses impossible indices."""
        used = (self._index(self.layout.prod) - self._index(self.layout.cons)) & _MASK32
        if used > self.layout.size:
            raise RingOverflow(
                f"{self.layout.name}: producer {used} bytes ahead of a {self.layout.size}-byte ring"
            )
        return used

    def space(self) -> int:
        return self.layout.size - self.used()

    def write(self, data: bytes | memoryview) -> int:
        """Copy in as much of `data` as fits; return how many bytes went in."""
        layout = self.layout
        prod = self._index(layout.prod)
        count = min(len(data), self.space())
        first = min(count, layout.size - (prod & self._mask))
        start = layout.data + (prod & self._mask)
        self.page[start : start + first] = data[:first]
        if count > first:
            self.page[layout.data : layout.data + count - first] = data[first:count]
        wmb()
        self._set_index(layout.prod, prod + count)
        return count

    def read(self, limit: int | None = None) -> bytes:
        """Consume up to `limit` bytes (all that are there by default)."""
        layout = self.layout
        count = self.used()
        if limit is not None:
            count = min(count, limit)
        if not count:
            return b""
        cons = self._index(layout.cons)
        rmb()
        first = min(count, layout.size - (cons & self._mask))
        start = layout.data + (cons & self._mask)
        out = bytes(self.page[start : start + first])
        if count > first:
            out += bytes(self.page[layout.data : layout.data + count - first])
        mb()
        self._set_index(layout.cons, cons + count)
        return out


class ByteRingStream(trio.abc.Stream):
    """A trio byte stream over the two directions of a shared page and one port.

    Both directions share the port, as the console and XenStore rings do, so
    one task (`pump`, run it in a nursery) waits on the port and wakes
    whoever waits for data or for room. A peer that corrupts the indices
    breaks the stream (`trio.BrokenResourceError`).
    """

    def __init__(self, tx: ByteRing, rx: ByteRing, port: Doorbell) -> None:
        self.tx = tx
        self.rx = rx
        self.port = port
        self._changed = trio.Event()
        self._closed = False
        self.broken: str | None = None  # why the peer's indices were refused, once they were

    async def pump(self) -> None:
        """Turn each raise of the port into a wake-up of this stream's waiters."""
        while not self._closed:
            await self.port.wait()
            self._changed, changed = trio.Event(), self._changed
            changed.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            self._check_open()
            changed = self._changed
            try:
                sent = self.tx.write(view)
            except RingOverflow as exc:
                self.broken = str(exc)
                raise trio.BrokenResourceError(str(exc)) from exc
            if sent:
                self.port.notify()
                view = view[sent:]
            else:
                await changed.wait()
        await trio.lowlevel.checkpoint_if_cancelled()

    async def wait_send_all_might_not_block(self) -> None:
        changed = self._changed
        if not self.tx.space():
            await changed.wait()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            self._check_open()
            changed = self._changed
            try:
                data = self.rx.read(max_bytes)
            except RingOverflow as exc:
                self.broken = str(exc)
                raise trio.BrokenResourceError(str(exc)) from exc
            if data:
                self.port.notify()  # the producer may be waiting for room
                await trio.lowlevel.checkpoint_if_cancelled()
                return data
            await changed.wait()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the ring stream is closed")

    async def aclose(self) -> None:
        self._closed = True
        self._changed.set()
        await trio.lowlevel.checkpoint()
