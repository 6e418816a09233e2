"""What the three layers share: the error, a reading cursor, and record framing.

libxl's and libxc's streams frame records identically (libxl_sr_stream_format.h
and xg_sr_stream_format.h): a header of two native-endian uint32_t, type and
body length, then the body, zero-padded to the next multiple of 8 octets.
"""

import os
import struct
from collections.abc import Mapping, Sequence

from construct import Int32ul, Struct

from xenlike.memory import XEN_PAGE_SIZE

__all__ = [
    "REC_ALIGN",
    "REC_TYPE_OPTIONAL",
    "Cursor",
    "FileCursor",
    "StreamError",
    "rec_hdr",
    "record",
    "record_header",
]

REC_ALIGN = 8
REC_TYPE_OPTIONAL = 0x80000000  # records a reader may skip (both specs)

rec_hdr = Struct(
    "type" / Int32ul,
    "length" / Int32ul,
)

_REC_HDR = struct.Struct("<II")


class StreamError(Exception):
    """A save file or stream is truncated, corrupt or foreign: the file's fault.

    The message is one line that names the layer, what is wrong and where
    (a byte offset from the start of the file), so `restore` can print it as is.
    """


def _padding(length: int) -> int:
    return -length % REC_ALIGN


def record(rec_type: int, *body: bytes) -> bytes:
    """One record: header, the body parts, and the zero padding to 8 octets."""
    length = sum(map(len, body))
    return b"".join((_REC_HDR.pack(rec_type, length), *body, bytes(_padding(length))))


def record_header(rec_type: int, length: int) -> bytes:
    """A record's header alone, for a writer that sends its body from where it lies
    (a PAGE_DATA body is a multiple of 8 octets: it needs no padding)."""
    return _REC_HDR.pack(rec_type, length)


class Cursor:
    """Reads a whole save file front to back; every error carries its offset.

    Over bytes in memory (`data`) its reads are views of them; `FileCursor`
    reads a file instead, and only what is asked of it.
    """

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self.data = memoryview(data).cast("B")
        self.size = len(self.data)
        self.offset = offset

    def error(self, message: str, at: int | None = None) -> StreamError:
        return StreamError(f"{message} at offset {self.offset if at is None else at}")

    def read(self, at: int, size: int, what: str, start: int) -> memoryview:
        """`size` bytes at `at`, which the caller knows lie within `size`; an error
        (at `start`) only if they are gone since (a file cut short under us)."""
        return self.data[at : at + size]

    def take(self, size: int, what: str, at: int | None = None) -> memoryview:
        """The next `size` bytes, or "truncated <what>" (at `at`, by default here) if the
        file ends first."""
        start = self.skip(size, what, at)
        return self.read(start, size, what, self.offset if at is None else at)

    def skip(self, size: int, what: str, at: int | None = None) -> int:
        """Pass over the next `size` bytes unread; their offset, or "truncated <what>"
        as `take`."""
        if size > self.size - self.offset:
            raise self.error(f"truncated {what}", at)
        start = self.offset
        self.offset += size
        return start

    def at_end(self) -> bool:
        return self.offset == self.size

    def record_at(
        self, names: Mapping[int, str], layer: str, max_length: int
    ) -> tuple[int, int, int, int]:
        """The next record as (type, offset of its header, offset of its body, body
        length), its body passed over unread (a PAGE_DATA record's pages are read
        where a restore needs them, not here).

        Checks what every record must satisfy: a known type (`names`) or an
        optional one (bit 31 set, which both specs let a reader skip), a length
        within `max_length`, a body that is all there, and zero padding.
        """
        start = self.offset
        rec_type, length = _REC_HDR.unpack(self.take(_REC_HDR.size, f"{layer} record header"))
        name = names.get(rec_type)
        if name is None and rec_type & REC_TYPE_OPTIONAL:
            name = f"optional {layer} record {rec_type:#x}"
        if name is None:
            raise self.error(f"unknown {layer} record type {rec_type:#x}", start)
        if length > max_length:
            raise self.error(f"{name} record of {length} bytes (at most {max_length})", start)
        body = self.skip(length, f"{name} record", start)
        pad = self.take(_padding(length), f"{name} record padding", start)
        if any(pad):
            raise self.error(f"non-zero padding after {name} record", self.offset - len(pad))
        return rec_type, start, body, length

    def record(
        self, names: Mapping[int, str], layer: str, max_length: int
    ) -> tuple[int, int, memoryview]:
        """The next record as (type, offset of its header, body), checked as `record_at`
        says."""
        rec_type, start, body, length = self.record_at(names, layer, max_length)
        return rec_type, start, self.read(body, length, "record", start)

    def pages(self, runs: Sequence[tuple[int, int, int]]) -> dict[int, memoryview]:
        """The pages `runs` name (first pfn, how many, offset of the first; see
        libxc_stream.PageRun), by pfn: views of what is read."""
        pages: dict[int, memoryview] = {}
        data = self.data
        size = XEN_PAGE_SIZE
        for first, count, at in runs:
            offsets = range(at, at + count * size, size)
            pages.update(
                (pfn, data[offset : offset + size])
                for pfn, offset in zip(range(first, first + count), offsets)
            )
        return pages


class FileCursor(Cursor):
    """A `Cursor` over an open file, of the size it had when this began; reads are
    preads, so what is passed over (`skip`, `record_at`) is never read. A file cut
    short under it is "truncated", as one that was short from the start."""

    def __init__(self, fd: int) -> None:
        super().__init__(b"")
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.runs: list[tuple[int, int, int]] = []  # where the pages lie (`pages`)

    def pages(self, runs: Sequence[tuple[int, int, int]]) -> dict[int, memoryview]:
        """None: the pages stay in the file, where `runs` (kept here) says they lie."""
        self.runs = list(runs)
        return {}

    def read(self, at: int, size: int, what: str, start: int) -> memoryview:
        data = os.pread(self.fd, size, at)
        if len(data) != size:
            raise self.error(f"truncated {what} (the file shrank as it was read)", start)
        return memoryview(data)
