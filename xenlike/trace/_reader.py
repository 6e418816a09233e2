"""Reading a running hypervisor's trace buffers from Dom0, as xentrace does."""

import bisect
import os
import time
from collections.abc import AsyncGenerator
from types import TracebackType

import attrs
import trio

from xenlike.abi.errno import Errno
from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import (
    ANCILLARY_SPACE,
    HYPERCALL_MAX_MESSAGE,
    HypercallError,
    MessageKind,
    Reply,
    Request,
    fds_received,
)
from xenlike.trace._buffer import TraceBuffer, TraceCursor
from xenlike.trace._layout import (
    TRACE_FLAG_FAST_PATH,
    XENLIKE_TRACE_BUFFERS_PER_CALL,
    TraceSource,
    XENLIKE_SYSCTL_trace_buffers,
    xenlike_trace_buffer,
)
from xenlike.trace._record import LostRecords, TraceEvent, decode_records

__all__ = ["TraceReader", "follow"]

BUFFER_INFO = compile_struct(xenlike_trace_buffer, "xenlike_trace_buffer")


@attrs.define(eq=False)
class _Followed:
    buffer: TraceBuffer
    cursor: TraceCursor
    domid: int
    source: TraceSource
    first_read: bool = True  # may still hold records from before the reader attached

    @property
    def flags(self) -> int:
        return TRACE_FLAG_FAST_PATH if self.source is TraceSource.domain else 0


def _time(event: TraceEvent) -> int:
    return event.time_ns


class TraceReader:
    """Every trace buffer of one hypervisor, mapped read-only.

    Tracing is on from `open` until `close` (or until this process dies):
    the hypervisor keeps it on while this reader's control connection is
    open. `rescan` picks up the buffers of domains made since; a domain's
    buffers are dropped once it is gone and they are read to the end.

    A reader starts at the present: what the buffers still hold from an
    earlier reader's time is left out, unless `history` asks for it (a
    flight recorder's dump, as `xenlike devices` wants).
    """

    def __init__(self, sock: trio.socket.SocketType, *, since_ns: int | None = None) -> None:
        self._sock = sock
        self._seq = 0
        self._followed: list[_Followed] = []
        self._since_ns = since_ns  # None: replay whatever the buffers hold

    @classmethod
    async def open(cls, run_dir: str | os.PathLike[str], *, history: bool = False) -> "TraceReader":
        """Connect to the hypervisor serving `run_dir` and attach every buffer it has."""
        from xenlike.xc import connect_control_socket  # not at the top: xc imports the hypervisor

        since = None if history else time.monotonic_ns()
        reader = cls(await connect_control_socket(run_dir), since_ns=since)
        try:
            await reader.rescan()
        except BaseException:
            reader.close()
            raise
        return reader

    def __enter__(self) -> "TraceReader":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def rescan(self) -> int:
        """Attach the buffers this reader does not hold yet; return how many.

        Raises ConnectionError once the hypervisor is gone.
        """
        attached = 0
        while True:
            reply = await self._trace_buffers()
            infos = [
                BUFFER_INFO.unpack_from(reply.payload, i * BUFFER_INFO.size)
                for i in range(len(reply.payload) // BUFFER_INFO.size)
            ]
            fds = reply.fds
            if not len(infos) == len(fds) == reply.result:
                _close_all(fds)
                raise HypercallError(
                    Errno.EBADMSG,
                    f"{reply.result} trace buffers, {len(infos)} descriptions and {len(fds)} fds",
                )
            for index, (fd, info) in enumerate(zip(fds, infos)):
                try:
                    buffer = TraceBuffer.attach(fd, writable=False)
                except BaseException:
                    _close_all(fds[index + 1 :])
                    raise
                cursor = TraceCursor.oldest(buffer.nr_records, buffer.prod)
                self._followed.append(
                    _Followed(buffer, cursor, info.domid, TraceSource(info.source))
                )
                attached += 1
            if reply.result < XENLIKE_TRACE_BUFFERS_PER_CALL:
                return attached

    async def _trace_buffers(self) -> Reply:
        """XENLIKE_SYSCTL_trace_buffers, skipping the notifications Dom0's tools all get."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        await self._sock.send(
            Request(seq, Hypercall.sysctl, XENLIKE_SYSCTL_trace_buffers, 0, b"").encode()
        )
        while True:
            data, ancdata, _, _ = await self._sock.recvmsg(
                HYPERCALL_MAX_MESSAGE + 1, ANCILLARY_SPACE
            )
            if not data:
                raise ConnectionError("the hypervisor closed the control socket")
            reply = Reply.decode(data, fds_received(ancdata))
            if reply.kind == MessageKind.reply and reply.seq == seq:
                if reply.result < 0:
                    _close_all(reply.fds)
                    raise HypercallError(-reply.result, "sysctl xenlike_trace_buffers")
                return reply
            _close_all(reply.fds)

    def read_available(self) -> list[TraceEvent]:
        """Everything written since the last call, in time order, lost records marked."""
        events: list[TraceEvent] = []
        for followed in list(self._followed):
            closed = followed.buffer.closed  # before reading, so the read gets the last record
            lost, data = followed.buffer.read(followed.cursor)
            records = decode_records(data, domid=followed.domid, flags=followed.flags)
            if followed.first_read and self._since_ns is not None:
                # Records stamped before this reader attached are an earlier one's.
                followed.first_read = False
                since = self._since_ns
                old = len(records)
                records = [record for record in records if record.time_ns >= since]
                if old != len(records) or not records:
                    lost = 0  # what was overwritten is from before this reader, too
            if lost:
                when = records[0].time_ns if records else time.monotonic_ns()
                events.append(
                    LostRecords(when, followed.domid, lost, followed.source is TraceSource.domain)
                )
            events += records
            if closed:
                followed.buffer.close()
                self._followed.remove(followed)
        events.sort(key=_time)
        return events

    def close(self) -> None:
        """Unmap every buffer and hang up: if no other reader remains, tracing stops."""
        for followed in self._followed:
            followed.buffer.close()
        self._followed.clear()
        self._sock.close()


async def follow(
    run_dir: str | os.PathLike[str],
    *,
    poll_interval: float = 0.05,
    rescan_interval: float = 0.25,
    reorder: float = 0.05,
    until: trio.Event | None = None,
    history: bool = False,
) -> AsyncGenerator[TraceEvent, None]:
    """Every record of a running hypervisor from now on, in time order, until it stops.

    The buffers are read every `poll_interval` seconds; new domains are
    found every `rescan_interval`. A record is yielded once no buffer can
    still bring an earlier one: its time is before the last rescan, less
    `reorder` seconds for a record stamped before it was written (a
    hypercall is stamped when it enters and written when it returns). So
    records come about `rescan_interval` behind. Close the generator
    (`contextlib.aclosing`) to stop reading and turn tracing off; or set
    `until`, and it ends once it has yielded everything written so far.
    With `history`, the records the buffers hold from before come first.
    """
    scanned = time.monotonic_ns()
    with await TraceReader.open(run_dir, history=history) as reader:
        next_scan = trio.current_time() + rescan_interval
        held: list[TraceEvent] = []
        while True:
            held += reader.read_available()
            held.sort(key=_time)
            ready = bisect.bisect_right(held, scanned - int(reorder * 1e9), key=_time)
            for event in held[:ready]:
                yield event
            del held[:ready]
            await trio.sleep(poll_interval)
            if until is not None and until.is_set():
                try:
                    await reader.rescan()  # domains made since the last look
                except ConnectionError:
                    pass
                held += reader.read_available()
                held.sort(key=_time)
                for event in held:
                    yield event
                return
            if trio.current_time() >= next_scan:
                next_scan = trio.current_time() + rescan_interval
                started = time.monotonic_ns()
                try:
                    await reader.rescan()
                except ConnectionError:  # the hypervisor stopped; what it wrote is still mapped
                    held += reader.read_available()
                    held.sort(key=_time)
                    for event in held:
                        yield event
                    return
                scanned = started


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
