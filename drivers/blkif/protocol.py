"""blkif.h on the ring: the request union, the ring spec, segment lists.

A blkif slot holds one of three request layouts, told apart by its first
byte, `operation`: `blkif_request` (READ, WRITE, WRITE_BARRIER,
FLUSH_DISKCACHE), `blkif_request_discard` (DISCARD) and
`blkif_request_indirect` (INDIRECT). `BLKIF_REQUEST` is one codec for the
union: it packs whichever record it is given (zero-filling the rest of the
112-byte slot) and, on the back end, copies the slot out of shared memory
once and decodes the variant that copy's `operation` names, so a front end
rewriting the slot meanwhile cannot make the two disagree.

Segment lists are handled as arrays of 32-bit words, two per
`blkif_request_segment` (gref; first_sect | last_sect << 8), so a list of
256 segments packs and checks at C speed: `segment_words` builds one,
`parse_segments` validates one (the back end's checks on untrusted input).

`check_request` is the back end's one checker of an untrusted request:
request + the disk's `Limits` + the ids in flight -> a `Job`, or
BadRequest. `check_access` is the part of it that depends on more than the
request's segment list; blkback's fast path for a list it has served
before makes the same checks, inline (tests/test_blkif_back.py holds the
two to the same refusals). Everything here is sans-I/O.
"""

import struct
import sys
from array import array
from collections.abc import Callable, Container
from typing import Any, NamedTuple

import attrs

from xenlike.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    BlkifOp,
    blkif_request,
    blkif_request_discard,
    blkif_request_indirect,
    blkif_request_segment,
    blkif_response,
)
from xenlike.abi.ring import XEN_PAGE_SIZE
from xenlike.codec import Codec, compile_struct
from xenlike.ring import define_ring

__all__ = [
    "BLKIF_REQUEST",
    "BLKIF_RING",
    "DISCARD",
    "INDIRECT",
    "MAX_INDIRECT_SEGMENTS",
    "RESPONSE",
    "RW",
    "SECTORS_PER_PAGE",
    "SECTOR_SHIFT",
    "SECTOR_SIZE",
    "SEGMENT_ARRAY",
    "SEGMENT_SIZE",
    "BadRequest",
    "Job",
    "Limits",
    "Segments",
    "Unsupported",
    "check_access",
    "check_request",
    "check_segments",
    "indirect_pages",
    "parse_segments",
    "raw_segments",
    "segment_words",
]

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT  # blkif counts 512-byte sectors (no feature-large-sector-size)
SECTORS_PER_PAGE = XEN_PAGE_SIZE >> SECTOR_SHIFT
# Linux blkback's MAX_INDIRECT_SEGMENTS: what it offers as feature-max-indirect-segments.
MAX_INDIRECT_SEGMENTS = 256

RW = compile_struct(blkif_request, "blkif_request")
DISCARD = compile_struct(blkif_request_discard, "blkif_request_discard")
INDIRECT = compile_struct(blkif_request_indirect, "blkif_request_indirect")
RESPONSE = compile_struct(blkif_response, "blkif_response")
SEGMENT_SIZE = blkif_request_segment.sizeof()


def _union() -> Codec:
    """One codec for the slot: the variant follows `operation` (see the module docstring)."""
    size = RW.size
    zeros = bytes(size)

    def short(codec: Codec) -> Any:
        pack, tail = codec.pack_into, size - codec.size

        def pack_into(buf: Any, offset: int, value: Any) -> None:
            pack(buf, offset, value)
            buf[offset + codec.size : offset + size] = zeros[:tail]

        return pack_into

    packers = {
        RW.record: RW.pack_into,
        DISCARD.record: short(DISCARD),
        INDIRECT.record: short(INDIRECT),
    }
    decoders: dict[int, Callable[[Any, int], Any]] = {
        BlkifOp.DISCARD: DISCARD.unpack_from,
        BlkifOp.INDIRECT: INDIRECT.unpack_from,
    }
    rw_pack, rw_unpack = RW.pack_into, RW.unpack_from

    def pack_into(buf: Any, offset: int, value: Any) -> None:
        packers.get(type(value), rw_pack)(buf, offset, value)

    def unpack_from(buf: Any, offset: int) -> Any:
        slot = bytes(buf[offset : offset + size])  # the one read of shared memory
        return decoders.get(slot[0], rw_unpack)(slot, 0)

    def unpack_slots(stride: int) -> Callable[[bytes], list[Any]]:
        rw_many = RW.slots_unpacker(stride)
        others = bytes(decoders)

        def unpack_many(buf: bytes) -> list[Any]:
            records = rw_many(buf)  # as blkif_request; then the other variants, if any
            operations = buf[::stride]
            if operations.translate(None, others) != operations:
                for index, operation in enumerate(operations):
                    if operation in decoders:
                        records[index] = decoders[operation](buf, index * stride)
            return records

        return unpack_many

    # The layout is the slot's: blkif_request is the largest member of the union.
    return Codec(
        name="blkif_request",
        size=size,
        format=RW.format,
        record=RW.record,
        pack_into=pack_into,
        unpack_from=unpack_from,
        layout=blkif_request,
        unpack_slots=unpack_slots,
    )


BLKIF_REQUEST = _union()
BLKIF_RING = define_ring("blkif", request=BLKIF_REQUEST, response=RESPONSE)
SEGMENT_ARRAY = type(RW.record().seg)  # seg[11] as raw bytes (xenlike.codec.RecordArray)

_FULL_PAGE = (SECTORS_PER_PAGE - 1) << 8  # first_sect 0, last_sect 7, as the second word
_LITTLE = sys.byteorder == "little"
_SMALL = [struct.Struct(f"<{2 * n}I") for n in range(BLKIF_MAX_SEGMENTS_PER_REQUEST + 1)]
_ONE = struct.Struct("<IBB2x")
_SEVENS = bytes([SECTORS_PER_PAGE - 1]) * BLKIF_SEGS_PER_INDIRECT_FRAME * 8
_ZEROS = bytes(BLKIF_SEGS_PER_INDIRECT_FRAME * 8)


_SEG_INDEX = RW.record._fields.index("seg")


def raw_segments(request: Any) -> bytes:
    """seg[] of a blkif_request decoded off the ring, as its bytes: the codec keeps
    a record array undecoded until read, so this costs no element records."""
    raw: bytes = request[_SEG_INDEX]
    return raw


def indirect_pages(nr_segments: int) -> int:
    """Indirect descriptor pages an INDIRECT request of `nr_segments` needs."""
    return -(-nr_segments // BLKIF_SEGS_PER_INDIRECT_FRAME)


def segment_words(grefs: list[int], nr_sectors: int) -> bytes:
    """The segment list for `nr_sectors` packed from the start of the pages `grefs`.

    Every page but the last is full (sectors 0..7); the last holds the rest.
    The bytes are `blkif_request_segment`s back to back, padding zeroed.
    """
    count = len(grefs)
    if not (count - 1) * SECTORS_PER_PAGE < nr_sectors <= count * SECTORS_PER_PAGE:
        raise ValueError(f"{nr_sectors} sectors do not fill {count} page(s) from the start")
    last = ((nr_sectors - 1) % SECTORS_PER_PAGE) << 8
    if count <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        words = [_FULL_PAGE] * (2 * count)
        words[0::2] = grefs
        words[-1] = last
        return _SMALL[count].pack(*words)
    array_words = array("I", bytes(8 * count))
    array_words[0::2] = array("I", grefs)
    array_words[1::2] = array("I", [_FULL_PAGE]) * count
    array_words[-1] = last
    if not _LITTLE:
        array_words.byteswap()
    return array_words.tobytes()


class BadRequest(ValueError):
    """A request the back end must refuse (BLKIF_RSP_ERROR): the front end's fault."""


class Segments(NamedTuple):
    """A validated segment list: the pages, and which sectors of each.

    `bounds` is None when the segments are packed, as blkfront builds them:
    from sector 0 of the first page on, every page full but maybe the last
    (one check of the whole list finds this). Otherwise it holds each
    page's (start, end) byte range.
    """

    grefs: list[int]
    nr_sectors: int
    bounds: list[tuple[int, int]] | None
    run: bool = True  # the grefs are consecutive numbers, as blkfront grants a buffer


def parse_segments(raw: bytes, nr_segments: int) -> Segments:
    """Check an untrusted segment list, as blkback does before any I/O.

    Each segment must name sectors inside its 4 KiB page with
    first_sect <= last_sect <= 7; padding is ignored, as Linux ignores it.
    """
    size = nr_segments * SEGMENT_SIZE
    if len(raw) < size:
        raise BadRequest(f"{nr_segments} segments need {size} bytes, got {len(raw)}")
    if nr_segments == 1:  # a 4 KiB request: the most frequent by far
        gref, first, last = _ONE.unpack_from(raw)
        if first == 0 and last < SECTORS_PER_PAGE:
            return Segments([gref], last + 1, None)
    words = array("I")
    words.frombytes(raw[:size])
    if not _LITTLE:
        words.byteswap()
    grefs = words[0::2].tolist()
    # Packed: every first_sect 0, every last_sect 7 but the last one's.
    if (
        raw[4:size:SEGMENT_SIZE] == _ZEROS[:nr_segments]
        and raw[5 : size - SEGMENT_SIZE : SEGMENT_SIZE] == _SEVENS[: nr_segments - 1]
    ):
        last = raw[size - SEGMENT_SIZE + 5]
        if last < SECTORS_PER_PAGE:
            return Segments(
                grefs,
                (nr_segments - 1) * SECTORS_PER_PAGE + last + 1,
                None,
                grefs == list(range(grefs[0], grefs[0] + nr_segments)),
            )
    bounds = []
    total = 0
    for index, word in enumerate(words[1::2]):
        first, last = word & 0xFF, word >> 8 & 0xFF
        if last >= SECTORS_PER_PAGE or first > last:
            raise BadRequest(
                f"segment {index}: first_sect {first}, last_sect {last} (a 4 KiB "
                f"page holds sectors 0..{SECTORS_PER_PAGE - 1}, first <= last)"
            )
        bounds.append((first << SECTOR_SHIFT, (last + 1) << SECTOR_SHIFT))
        total += last - first + 1
    return Segments(grefs, total, bounds, False)


class Unsupported(BadRequest):
    """An optional operation the back end did not offer: BLKIF_RSP_EOPNOTSUPP."""


@attrs.frozen
class Limits:
    """What a request is checked against: the disk, and what the back end offers."""

    sectors: int
    readonly: bool
    discard: bool  # feature-discard offered
    max_indirect_segments: int  # feature-max-indirect-segments


@attrs.define(eq=False, slots=True)
class Job:
    """One accepted request on its way through the back end."""

    id: int
    # READ, WRITE, FLUSH_DISKCACHE, WRITE_BARRIER or DISCARD, echoed in the response
    # (an indirect request's indirect_op)
    kind: int
    sector: int
    nr_sectors: int = 0
    segments: Segments | None = None
    nr_segments: int = 0
    indirect_grefs: tuple[int, ...] = ()
    secure: bool = False
    iov: list[Any] | None = None
    key: tuple[bytes, int] | None = None  # (seg[] bytes, nr_segments), once known


_READ, _WRITE = BlkifOp.READ, BlkifOp.WRITE
_FLUSHES = (BlkifOp.FLUSH_DISKCACHE, BlkifOp.WRITE_BARRIER)


def check_request(
    request: Any,
    limits: Limits,
    in_flight: Container[int],
    parse: Callable[[bytes, int], Segments] = parse_segments,
) -> Job:
    """An untrusted request, as Linux blkback's dispatch_rw_block_io and
    dispatch_discard_io check it before any mapping or I/O: a Job, or
    BadRequest (Unsupported for an operation not offered).

    An INDIRECT request's segment list lies in pages it names, so its job
    comes back without segments: `check_segments` finishes it once the list
    is read. `parse` may remember lists (a checked list stays valid).
    """
    op = request.operation
    if op in (_READ, _WRITE) or op in _FLUSHES:
        nseg = request.nr_segments
        if (nseg == 0 and op in (_READ, _WRITE)) or nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise BadRequest(
                f"{nseg} segments (a request carries 1..{BLKIF_MAX_SEGMENTS_PER_REQUEST})"
            )
        job = Job(request.id, op, request.sector_number, nr_segments=nseg)
        if nseg:
            job.key = (raw_segments(request), nseg)
            job.segments = parse(*job.key)
            job.nr_sectors = job.segments.nr_sectors
        check_access(op, job.id, job.sector, job.nr_sectors, limits, in_flight)
        return job
    if op == BlkifOp.INDIRECT:
        indirect_op, nseg = request.indirect_op, request.nr_segments
        if indirect_op not in (_READ, _WRITE):
            raise BadRequest(f"indirect_op {indirect_op}: an indirect request reads or writes")
        if not 0 < nseg <= limits.max_indirect_segments:
            raise BadRequest(
                f"{nseg} indirect segments (feature-max-indirect-segments is "
                f"{limits.max_indirect_segments})"
            )
        check_access(indirect_op, request.id, request.sector_number, 0, limits, in_flight)
        return Job(
            request.id,
            indirect_op,
            request.sector_number,
            nr_segments=nseg,
            indirect_grefs=tuple(request.indirect_grefs[: indirect_pages(nseg)]),
        )
    if op == BlkifOp.DISCARD:
        if not limits.discard:
            raise Unsupported("feature-discard is not offered")
        check_access(op, request.id, request.sector_number, request.nr_sectors, limits, in_flight)
        _check_end(request.sector_number, request.nr_sectors, limits)  # 0 sectors included
        return Job(
            request.id,
            op,
            request.sector_number,
            request.nr_sectors,
            secure=bool(request.flag & BLKIF_DISCARD_SECURE),
        )
    raise BadRequest(f"unknown operation {op}")


def check_segments(
    job: Job, raw: bytes, limits: Limits, parse: Callable[[bytes, int], Segments] = parse_segments
) -> None:
    """Finish an INDIRECT job with the segment list read out of its pages."""
    job.key = (raw, job.nr_segments)
    job.segments = parse(raw, job.nr_segments)
    job.nr_sectors = job.segments.nr_sectors
    check_access(job.kind, job.id, job.sector, job.nr_sectors, limits, ())


def check_access(
    kind: int, rid: int, sector: int, nr_sectors: int, limits: Limits, in_flight: Container[int]
) -> None:
    """What depends on more than the segment list: a free id, the disk's mode, its end
    (for a request that moves sectors, as xen_vbd_translate checks it)."""
    if rid in in_flight:
        raise BadRequest(f"id {rid} is already in flight")
    if kind != _READ and limits.readonly:
        raise BadRequest(f"{BlkifOp(kind).name} on a read-only disk")
    if nr_sectors:
        _check_end(sector, nr_sectors, limits)


def _check_end(sector: int, nr_sectors: int, limits: Limits) -> None:
    if sector + nr_sectors > limits.sectors:
        raise BadRequest(
            f"sectors {sector}..{sector + nr_sectors - 1} are past "
            f"the end of the disk ({limits.sectors} sectors)"
        )
