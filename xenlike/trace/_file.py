"""Trace files: a `trace_file_header`, then `trace_record`s to the end of the file."""

import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import attrs
import construct

from xenlike.trace._layout import (
    RECORD,
    TRACE_FILE_VERSION,
    TRACE_RECORD_SIZE,
    trace_file_header,
)
from xenlike.trace._record import TraceEvent, decode_records

__all__ = ["BadTraceFile", "TraceFile", "TraceWriter", "load", "save"]

_HEADER_SIZE = trace_file_header.sizeof()
_BATCH = 4096  # records packed per write


class BadTraceFile(ValueError):
    """The file is not a trace file this version reads (or it was cut short)."""


@attrs.frozen
class TraceFile:
    """A loaded trace: its records, and the clocks that date them."""

    wallclock_ns: int  # CLOCK_REALTIME when it was saved ...
    monotonic_ns: int  # ... and CLOCK_MONOTONIC at that moment
    events: tuple[TraceEvent, ...]

    def wallclock(self, time_ns: int) -> int:
        """A record's CLOCK_MONOTONIC time as CLOCK_REALTIME nanoseconds."""
        return self.wallclock_ns + time_ns - self.monotonic_ns


class TraceWriter:
    """A new trace file written as records come: `write` them, `flush` at each pause.

    What was flushed is a whole trace file at every moment, so a recorder
    that is killed leaves a file `load` reads to its last flush.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.count = 0
        self._out: BinaryIO = self.path.open("wb")
        self._batch = bytearray()
        self._out.write(
            trace_file_header.build(
                dict(
                    version=TRACE_FILE_VERSION,
                    record_size=TRACE_RECORD_SIZE,
                    wallclock_ns=time.time_ns(),
                    monotonic_ns=time.monotonic_ns(),
                )
            )
        )
        self._out.flush()

    def write(self, event: TraceEvent) -> None:
        self._batch += RECORD.format.pack(*event.fields())
        self.count += 1
        if len(self._batch) >= _BATCH * TRACE_RECORD_SIZE:
            self.flush()

    def flush(self) -> None:
        self._out.write(self._batch)
        self._out.flush()
        self._batch.clear()

    def close(self) -> None:
        if not self._out.closed:
            self.flush()
            self._out.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def save(events: Iterable[TraceEvent], path: str | os.PathLike[str]) -> int:
    """Write `events` (in the order given) to a new trace file; return how many."""
    with TraceWriter(path) as writer:
        for event in events:
            writer.write(event)
    return writer.count


def load(path: str | os.PathLike[str]) -> TraceFile:
    """Read a trace file that `save` wrote."""
    data = Path(path).read_bytes()
    try:
        header = trace_file_header.parse(data)
    except construct.ConstructError as exc:
        raise BadTraceFile(f"{path}: not a xenlike trace file ({exc})") from None
    if (header.version, header.record_size) != (TRACE_FILE_VERSION, TRACE_RECORD_SIZE):
        raise BadTraceFile(
            f"{path}: version {header.version} with {header.record_size}-byte "
            f"records; this reads version {TRACE_FILE_VERSION}"
        )
    body = memoryview(data)[_HEADER_SIZE:]
    if len(body) % TRACE_RECORD_SIZE:
        raise BadTraceFile(f"{path}: {len(body) % TRACE_RECORD_SIZE} bytes of a cut-off record")
    return TraceFile(header.wallclock_ns, header.monotonic_ns, tuple(decode_records(body)))
