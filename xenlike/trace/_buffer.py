"""A trace buffer: one producer's ring of fixed-size records in a memfd.

The producer writes record i into slot i % nr_records, then publishes it by
storing prod = i + 1 (one aligned 8-byte store). It never waits: it
overwrites the oldest record, as xentrace's buffers are overwritten when
nobody consumes them. So a buffer holds the last nr_records - 1 records:
the slot after them is the one the producer writes next, and a reader
cannot tell whether it is halfway through it.

Readers never write to a buffer. Each keeps its own `TraceCursor`, so any
number of them can follow one buffer. A read loads prod, copies the records
it has not seen, and loads prod again: the producer may have moved on
meanwhile, and every record whose slot it could have reached — those below
the second prod - nr_records + 1 — is dropped and counted as lost. That
takes x86's store order (the producer's record stores become visible before
its prod store) and CPython's in-order execution, nothing more: a record
copied torn is always one of those dropped.
"""

import fcntl
import mmap
import os
from typing import Any

import attrs

from xenlike.codec import compile_struct
from xenlike.trace._layout import (
    BUFFER_CLOSED,
    BUFFER_ENABLED,
    BUFFER_PROD,
    BUFFER_RECORDS_OFFSET,
    RECORD,
    TRACE_BUFFER_MAGIC,
    TRACE_BUFFER_VERSION,
    TRACE_RECORD_SIZE,
    TraceSource,
    trace_buffer_header,
)

__all__ = ["BadTraceBuffer", "TraceBuffer", "TraceCursor"]

HEADER = compile_struct(trace_buffer_header, "trace_buffer_header")
_ENABLED = BUFFER_ENABLED // 4
_CLOSED = BUFFER_CLOSED // 4
_PROD = BUFFER_PROD // 8


class BadTraceBuffer(ValueError):
    """An fd that does not hold a trace buffer this code can follow."""


@attrs.define
class TraceCursor:
    """One reader's place in one buffer: the index of the next record it wants."""

    nr_records: int
    next: int

    @classmethod
    def oldest(cls, nr_records: int, prod: int) -> "TraceCursor":
        """A cursor at the oldest record the ring still holds (a flight recorder's dump)."""
        return cls(nr_records, max(0, prod - nr_records + 1))

    def window(self, prod: int) -> tuple[int, int]:
        """The records [first, end) to copy, given prod loaded before copying."""
        if prod < self.next:  # only a misbehaving producer goes back; start again from there
            self.next = prod
        return max(self.next, prod - self.nr_records + 1), prod

    def accept(self, first: int, end: int, prod_after: int) -> tuple[int, int]:
        """Records [first, end) were copied and prod then read as `prod_after`.

        Returns (lost, start): records [start, end) are intact, and `lost`
        records before them were overwritten before this reader saw them.
        """
        start = min(end, max(first, prod_after - self.nr_records + 1))
        lost = start - self.next
        self.next = end
        return lost, start


@attrs.define(eq=False)
class TraceBuffer:
    """A mapped trace buffer: the producer's side (`write`) or a reader's (`read`).

    Build it with `create` (the hypervisor) or `attach` (the domain that
    produces into it, or a reader), not directly.
    """

    nr_records: int
    _fd: int
    _mapping: mmap.mmap = attrs.field(repr=False)
    _words: memoryview = attrs.field(repr=False)  # the header as u32 words
    _prods: memoryview = attrs.field(repr=False)  # the header as u64 words
    _next: int = 0  # the producer's count of records written; prod only publishes it

    @classmethod
    def create(cls, nr_records: int, *, domid: int, source: TraceSource) -> "TraceBuffer":
        """A new, empty, disabled buffer in a memfd sealed against resizing.

        The seals keep a producer that holds the fd from truncating it under a
        reader's mapping (which would kill the reader with SIGBUS).
        """
        if nr_records < 2:
            raise ValueError(f"a trace buffer needs at least two slots, got {nr_records}")
        fd = os.memfd_create(
            f"xenlike-trace-d{domid}-{source.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        try:
            os.ftruncate(fd, BUFFER_RECORDS_OFFSET + nr_records * TRACE_RECORD_SIZE)
            fcntl.fcntl(
                fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
            )
            buffer = cls._map(fd, nr_records, writable=True)
        except BaseException:
            os.close(fd)
            raise
        HEADER.pack_into(
            buffer._mapping,
            0,
            HEADER.record(
                magic=TRACE_BUFFER_MAGIC,
                version=TRACE_BUFFER_VERSION,
                record_size=TRACE_RECORD_SIZE,
                nr_records=nr_records,
                domid=domid,
                source=source,
            ),
        )
        return buffer

    @classmethod
    def attach(cls, fd: int, *, writable: bool) -> "TraceBuffer":
        """Map a received buffer and close `fd` (on error too).

        The size comes from the fd, never from the header: the domain that
        produces into a buffer can write its header too, so a reader trusts
        nothing in it but prod and the closed word. A producer checks the
        header, which the hypervisor wrote for it.
        """
        try:
            size = os.fstat(fd).st_size
            nr_records, rest = divmod(size - BUFFER_RECORDS_OFFSET, TRACE_RECORD_SIZE)
            if nr_records < 2 or rest:
                raise BadTraceBuffer(f"fd {fd} holds {size} bytes: not a trace buffer")
            buffer = cls._map(fd, nr_records, writable=writable)
        finally:
            os.close(fd)
        buffer._fd = -1
        if writable:
            header = HEADER.unpack_from(buffer._mapping, 0)
            if (header.magic, header.version, header.record_size, header.nr_records) != (
                TRACE_BUFFER_MAGIC,
                TRACE_BUFFER_VERSION,
                TRACE_RECORD_SIZE,
                nr_records,
            ):
                buffer.close()
                raise BadTraceBuffer(
                    f"trace buffer header {header} is not version "
                    f"{TRACE_BUFFER_VERSION} with {nr_records} records"
                )
            buffer._next = header.prod
        return buffer

    @classmethod
    def _map(cls, fd: int, nr_records: int, *, writable: bool) -> "TraceBuffer":
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(
            fd,
            BUFFER_RECORDS_OFFSET + nr_records * TRACE_RECORD_SIZE,
            flags=mmap.MAP_SHARED,
            prot=prot,
        )
        with memoryview(mapping) as whole:
            header = whole[: trace_buffer_header.sizeof()]
            words, prods = header.cast("I"), header.cast("Q")
            header.release()
        return cls(nr_records, fd, mapping, words, prods)

    @property
    def fd(self) -> int:
        """The memfd, to hand to the domain and to readers; it stays this object's."""
        if self._fd < 0:
            raise ValueError("this trace buffer was attached; its fd is closed")
        return self._fd

    @property
    def enabled(self) -> bool:
        return bool(self._words[_ENABLED])

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._words[_ENABLED] = int(value)

    @property
    def closed(self) -> bool:
        """The hypervisor let this buffer go: no record will follow."""
        return bool(self._words[_CLOSED])

    def mark_closed(self) -> None:
        self._words[_ENABLED] = 0
        self._words[_CLOSED] = 1

    @property
    def prod(self) -> int:
        """Records ever written, as published in shared memory."""
        return self._prods[_PROD]

    def write(self, *fields: Any) -> None:
        """Write one record, fields in `trace_record` order (args flattened), and publish it."""
        index = self._next
        RECORD.format.pack_into(
            self._mapping,
            BUFFER_RECORDS_OFFSET + index % self.nr_records * TRACE_RECORD_SIZE,
            *fields,
        )
        self._next = index + 1
        self._prods[_PROD] = index + 1

    def copy(self, first: int, end: int) -> bytes:
        """The raw records [first, end), which must lie within the last nr_records."""
        if first >= end:
            return b""
        start = BUFFER_RECORDS_OFFSET + first % self.nr_records * TRACE_RECORD_SIZE
        stop = start + (end - first) * TRACE_RECORD_SIZE
        limit = BUFFER_RECORDS_OFFSET + self.nr_records * TRACE_RECORD_SIZE
        if stop <= limit:
            return self._mapping[start:stop]
        wrapped = BUFFER_RECORDS_OFFSET + stop - limit
        return self._mapping[start:limit] + self._mapping[BUFFER_RECORDS_OFFSET:wrapped]

    def read(self, cursor: TraceCursor) -> tuple[int, bytes]:
        """What `cursor` has not seen: (records lost before it, the intact raw records)."""
        first, end = cursor.window(self._prods[_PROD])
        data = self.copy(first, end)
        lost, start = cursor.accept(first, end, self._prods[_PROD])
        return lost, data[(start - first) * TRACE_RECORD_SIZE :]

    def close(self) -> None:
        """Unmap (and close the fd if this object owns one); a second call does nothing."""
        if self._mapping.closed:
            return
        self._words.release()
        self._prods.release()
        self._mapping.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
