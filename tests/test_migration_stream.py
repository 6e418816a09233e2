"""The save format: byte-exact headers, round trips, and refusing bad files.

Xen's own verifier judges the writer in tests/test_migration_verify.py; here the
layouts are checked against Xen's numbers and the reader against every way a
file can be truncated, corrupt or foreign: one StreamError, never another
exception, never a half-read image.
"""

import json
import os
import struct
import tempfile

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenlike.memory import XEN_PAGE_SIZE
from xenlike.migration import (
    DomainImage,
    StreamError,
    libxc_stream,
    libxl_stream,
    read_save_file,
    scan_save_file,
    write_save_file,
    xl_format,
)
from xenlike.migration._record import Cursor, FileCursor

PAGE = XEN_PAGE_SIZE


def page(fill: int) -> bytes:
    """A page whose contents say which it is."""
    return struct.pack("<Q", fill) * (PAGE // 8)


def sample(**changes: object) -> DomainImage:
    """A small domain with a ballooned-out hole, three vCPUs, XenStore and a config."""
    image = DomainImage(
        max_pfn=2047,
        pages={pfn: page(pfn) for pfn in [*range(0, 40), *range(1500, 1530), 2047]},
        shared_info=page(0xFEED),
        vcpus={0: b"kernel and program state", 1: b"", 2: bytes(range(256)) * 9},
        xenstore={"data/counter": "17", "device/vif/0/mac": "00:16:3e:00:00:02"},
        config={"name": "beta", "memory": 8, "vcpus": 3},
        elapsed_ns=5_000_000_123,
    )
    return attrs.evolve(image, **changes)


def save(image: DomainImage) -> bytes:
    return b"".join(write_save_file(image))


def records(data: bytes, at: int) -> list[tuple[int, int, int]]:
    """(offset, type, length) of the framed records from `at` to the first END."""
    found = []
    while True:
        rec_type, length = struct.unpack_from("<II", data, at)
        found.append((at, rec_type, length))
        if rec_type == 0:
            return found
        at += 8 + length + (-length % 8)


def layers(data: bytes) -> tuple[int, int, int]:
    """Offsets of the libxl stream, of libxc's image header, and of the libxl records
    after libxc's END."""
    (optional_len,) = struct.unpack_from("<I", data, 44)
    libxl = 48 + optional_len
    libxc = libxl + 16 + 8  # libxl header, LIBXC_CONTEXT record
    libxc_end = records(data, libxc + 24)[-1][0] + 8
    return libxl, libxc, libxc_end


# --- byte-exact layouts ---------------------------------------------------------------


def test_xl_header_is_xls_struct_save_file_header() -> None:
    data = save(sample())
    config = (json.dumps(sample().config, indent=4, sort_keys=True) + "\0").encode()
    assert data[:32] == b"Xen saved domain, xl format\n \0 \r"
    # byteorder, mandatory flags JSON|STREAMv2, optional flags, optional data length
    assert data[32:48] == struct.pack("<IIII", 0x01020304, 3, 0, 4 + len(config))
    assert data[48:52] == struct.pack("<I", len(config))
    assert data[52 : 52 + len(config)] == config


def test_without_config_xl_still_writes_a_zero_config_length() -> None:
    """As xl_saverestore.c: the 4-byte length always, flags STREAMv2 alone."""
    data = save(sample(config=None))
    assert data[32:52] == struct.pack("<IIIII", 0x01020304, 2, 0, 4, 0)
    assert data[52:60] == b"LibxlFmt"
    assert read_save_file(data).config is None


def test_libxl_and_libxc_headers_are_big_endian_with_xens_numbers() -> None:
    data = save(sample())
    libxl, libxc, _ = layers(data)
    assert data[libxl : libxl + 16] == b"LibxlFmt" + bytes([0, 0, 0, 2]) + bytes(4)
    assert data[libxl + 16 : libxl + 24] == struct.pack("<II", 1, 0)  # LIBXC_CONTEXT
    assert data[libxc : libxc + 24] == (
        b"\xff" * 8 + b"XENF" + bytes([0, 0, 0, 3]) + bytes(8)  # marker, id, v3, options
    )
    # domain header: x86 PV, page shift 12, Xen 4.17
    assert data[libxc + 24 : libxc + 40] == struct.pack("<IHHII", 1, 12, 0, 4, 17)


def test_records_come_in_xens_order_aligned_to_8_octets() -> None:
    data = save(sample())
    libxl, libxc, libxc_end = layers(data)
    found = records(data, libxc + 40)
    types = [libxc_stream.RecType(t).name for _, t, _ in found]
    assert types == [
        "X86_PV_INFO",
        "STATIC_DATA_END",
        "X86_PV_P2M_FRAMES",
        "PAGE_DATA",
        "X86_TSC_INFO",
        "SHARED_INFO",
        "X86_PV_VCPU_BASIC",
        "X86_PV_VCPU_XSAVE",
        "X86_PV_VCPU_BASIC",  # vCPU 1 has no state: no XSAVE record, as Xen skips it
        "X86_PV_VCPU_BASIC",
        "X86_PV_VCPU_XSAVE",
        "END",
    ]
    # Aligned within the stream: xl's optional data before it has any length.
    assert all((offset - libxl) % 8 == 0 for offset, _, _ in found)
    tail = records(data, libxc_end)
    assert [libxl_stream.RecType(t).name for _, t, _ in tail] == ["EMULATOR_CONTEXT", "END"]
    assert libxc_end + sum(8 + n + (-n % 8) for _, _, n in tail) == len(data)


def test_page_data_sends_populated_frames_only_in_batches_of_1024() -> None:
    populated = [p for p in range(0, 3000) if p % 3]  # every third frame ballooned out
    image = sample(max_pfn=2999, pages={p: page(p) for p in populated})
    data = save(image)
    _, libxc, _ = layers(data)
    sent = []
    for offset, rec_type, length in records(data, libxc + 40):
        if rec_type == libxc_stream.RecType.PAGE_DATA:
            (count,) = struct.unpack_from("<I", data, offset + 8)
            assert count <= libxc_stream.MAX_BATCH_SIZE
            assert length == 8 + 8 * count + PAGE * count
            pfns = struct.unpack_from(f"<{count}Q", data, offset + 16)
            for index, pfn in enumerate(pfns):
                assert pfn >> 60 == libxc_stream.PfInfo.NOTAB
                at = offset + 16 + 8 * count + PAGE * index
                assert data[at : at + PAGE] == page(pfn)
            sent += pfns
    assert sent == populated
    assert len(data) < len(populated) * PAGE * 1.01  # no page goes twice, no hole goes at all


def test_pages_go_out_and_come_back_uncopied() -> None:
    """The writer yields each page as the image holds it, and the reader hands each
    back as a view of the buffer it read: `save` writes from the domain's mapping,
    `restore` copies once, into the new domain's."""
    memory = bytearray(b"".join(page(pfn) for pfn in range(64)))
    whole = memoryview(memory)
    views = {pfn: whole[pfn * PAGE : (pfn + 1) * PAGE] for pfn in range(64)}
    pieces = list(write_save_file(sample(max_pfn=63, pages=views)))
    assert all(any(piece is view for piece in pieces) for view in views.values())
    data = bytearray(b"".join(pieces))
    back = read_save_file(data)
    assert back.pages == {pfn: page(pfn) for pfn in range(64)}
    assert all(isinstance(view, memoryview) and view.obj is data for view in back.pages.values())
    with pytest.raises(BufferError):  # the pages are where they were read, not copies
        data.clear()


def test_p2m_frames_records_the_pfn_range() -> None:
    data = save(sample(max_pfn=0x1234))
    _, libxc, _ = layers(data)
    (offset, _, length) = next(
        r for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.X86_PV_P2M_FRAMES
    )
    assert length == 8
    assert struct.unpack_from("<II", data, offset + 8) == (0, 0x1234)


def test_vcpu_basic_carries_an_online_vcpu_guest_context() -> None:
    data = save(sample())
    _, libxc, _ = layers(data)
    basics = [
        r for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.X86_PV_VCPU_BASIC
    ]
    assert [struct.unpack_from("<I", data, offset + 8)[0] for offset, _, _ in basics] == [0, 1, 2]
    size = libxc_stream.vcpu_guest_context_x86_64.sizeof()
    assert size == 5168
    for offset, _, length in basics:
        assert length == 8 + size
        context = libxc_stream.vcpu_guest_context_x86_64.parse(
            data[offset + 16 : offset + 16 + size]
        )
        assert context.flags == libxc_stream.VGCF_online


# --- round trips ------------------------------------------------------------------------

xenstore_keys = st.from_regex(r"[A-Za-z0-9\-/_@]{1,30}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def images(draw: st.DrawFn) -> DomainImage:
    max_pfn = draw(st.integers(0, 3000))
    pfns = draw(st.sets(st.integers(0, max_pfn), max_size=1100))
    # Pages differ by a few drawn bytes; drawing 4 KiB each would make examples slow.
    pages = {}
    for pfn in pfns:
        head = draw(st.binary(max_size=16))
        pages[pfn] = head + page(pfn)[len(head) :]
    return DomainImage(
        max_pfn=max_pfn,
        pages=pages,
        shared_info=draw(st.binary(min_size=16, max_size=16)) * (PAGE // 16),
        vcpus=draw(
            st.dictionaries(
                st.integers(0, 2**32 - 1), st.binary(max_size=300), min_size=1, max_size=5
            )
        ),
        xenstore=draw(
            st.dictionaries(
                xenstore_keys, st.text(max_size=30).filter(lambda v: "\0" not in v), max_size=6
            )
        ),
        config=draw(st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=5)),
        elapsed_ns=draw(st.integers(0, 2**64 - 1)),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images())
def test_write_then_read_gives_the_same_domain(image: DomainImage) -> None:
    assert read_save_file(save(image)) == image


def test_the_round_trip_can_fail() -> None:
    """A changed byte of page contents comes back changed: the reader reads, not guesses."""
    data = bytearray(save(sample()))
    _, libxc, _ = layers(data)
    offset = next(r[0] for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.PAGE_DATA)
    (count,) = struct.unpack_from("<I", data, offset + 8)
    data[offset + 16 + 8 * count] ^= 0xFF
    assert read_save_file(bytes(data)) != sample()


def test_a_later_page_data_wins_and_xtab_takes_a_page_away() -> None:
    """Live migration resends dirtied pages and marks vanished ones XTAB (the spec)."""
    image = sample()
    data = save(image)
    _, libxc, _ = layers(data)
    first_page_data = next(
        r[0] for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.PAGE_DATA
    )
    resend = (
        struct.pack("<IIII", libxc_stream.RecType.PAGE_DATA, 8 + 16 + PAGE, 2, 0)
        + struct.pack("<QQ", 3, 0xF << 60 | 4)  # pfn 3 again, pfn 4 now invalid (XTAB)
        + page(999)
    )
    at = next(r[0] for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.X86_TSC_INFO)
    assert at > first_page_data
    back = read_save_file(data[:at] + resend + data[at:])
    assert back.pages[3] == page(999)
    assert 4 not in back.pages
    assert {p: c for p, c in back.pages.items() if p not in (3,)} == {
        p: c for p, c in image.pages.items() if p not in (3, 4)
    }


def test_a_xen_emulator_xenstore_data_record_reads_too() -> None:
    data = bytearray(save(sample()))
    _, _, libxc_end = layers(data)
    assert struct.unpack_from("<I", data, libxc_end)[0] == libxl_stream.RecType.EMULATOR_CONTEXT
    struct.pack_into("<I", data, libxc_end, libxl_stream.RecType.EMULATOR_XENSTORE_DATA)
    assert read_save_file(bytes(data)) == sample()


def test_the_writer_refuses_an_impossible_domain() -> None:
    with pytest.raises(ValueError, match="outside"):
        sample(pages={4096: page(1)})
    with pytest.raises(ValueError, match="bytes, not 4096"):
        sample(pages={1: b"short"})
    with pytest.raises(ValueError, match="characters"):
        sample(xenstore={"bad key": "v"})
    with pytest.raises(ValueError, match="vCPU"):
        sample(vcpus={})


# --- truncated, corrupt and foreign files -------------------------------------------------


def boundaries(data: bytes) -> list[int]:
    """Every offset where a header, record or page starts or ends, and one inside each."""
    libxl, libxc, libxc_end = layers(data)
    points = {0, 1, 31, 32, 47, 48, 51, 52, libxl - 1, libxl, libxl + 8, libxl + 16, libxl + 20}
    points |= {libxc, libxc + 24, libxc + 30}
    for offset, _, length in [*records(data, libxc + 40), *records(data, libxc_end)]:
        points |= {offset, offset + 4, offset + 8, offset + 8 + length // 2, offset + 8 + length}
    return sorted(p for p in points if p < len(data))


def test_every_truncation_is_one_stream_error() -> None:
    data = save(sample())
    for cut in boundaries(data):
        with pytest.raises(StreamError, match=r"^truncated .* at offset \d+$"):
            read_save_file(data[:cut])


def test_a_truncated_page_data_names_the_record_and_where_it_starts() -> None:
    data = save(sample())
    _, libxc, _ = layers(data)
    offset, _, _ = next(
        r for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.PAGE_DATA
    )
    with pytest.raises(StreamError, match=f"^truncated PAGE_DATA record at offset {offset}$"):
        read_save_file(data[: offset + 5000])


@pytest.mark.parametrize(
    "foreign",
    [b"", b"\x7fELF\x02\x01\x01" + bytes(100), b"#!/bin/sh\necho hello\n" * 10, bytes(4096)],
    ids=["empty", "elf", "script", "zeros"],
)
def test_a_foreign_file_is_refused(foreign: bytes) -> None:
    with pytest.raises(StreamError, match="not an xl save file|truncated xl header"):
        read_save_file(foreign)


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_each_corruption_gets_its_own_message() -> None:
    image = sample()
    data = save(image)
    libxl, libxc, libxc_end = layers(data)
    libxc_records = {libxc_stream.RecType(t): (o, n) for o, t, n in records(data, libxc + 40)}
    page_data = libxc_records[libxc_stream.RecType.PAGE_DATA][0]
    basic = libxc_records[libxc_stream.RecType.X86_PV_VCPU_BASIC][0]  # vCPU 2's
    cases = {
        "bad byte-order marker": corrupt(data, 32, b"\x01\x00\x00\x00"),
        "other byte order": corrupt(data, 32, bytes([1, 2, 3, 4])),
        "unsupported mandatory flag": corrupt(data, 36, struct.pack("<I", 7)),
        "legacy format": corrupt(data, 36, struct.pack("<I", 1)),
        "unsupported optional flag": corrupt(data, 40, struct.pack("<I", 1)),
        "overruns the optional data": corrupt(data, 48, struct.pack("<I", 1 << 20)),
        "not JSON": corrupt(data, 52, b"{{"),
        "not NUL-terminated": corrupt(data, libxl - 1, b"}"),
        "no libxl stream header": corrupt(data, libxl, b"LibxlFmX"),
        "libxl stream version 3": corrupt(data, libxl + 8, bytes([0, 0, 0, 3])),
        "big-endian libxl stream": corrupt(data, libxl + 12, bytes([0, 0, 0, 1])),
        "converted from the legacy format": corrupt(data, libxl + 12, bytes([0, 0, 0, 2])),
        "no libxc image header": corrupt(data, libxc, b"\x00"),
        "libxc stream version 2": corrupt(data, libxc + 12, bytes([0, 0, 0, 2])),
        "is not x86 PV": corrupt(data, libxc + 24, struct.pack("<I", 2)),
        "page shift 16": corrupt(data, libxc + 28, struct.pack("<H", 16)),
        "unknown libxc record type 0x13": corrupt(data, libxc + 40, struct.pack("<I", 0x13)),
        "guest width 4": corrupt(data, libxc + 48, b"\x04"),
        "non-zero padding": corrupt(data, len(data) - 8 - 2, b"\x01"),  # EMULATOR_CONTEXT's pad
        "beyond max_pfn": corrupt(data, page_data + 16, struct.pack("<Q", 2048)),
        "of type L1TAB": corrupt(data, page_data + 16, struct.pack("<Q", 1 << 60)),
        "reserved bits set in PAGE_DATA": corrupt(data, page_data + 16, struct.pack("<Q", 1 << 55)),
        "with count 0": corrupt(data, page_data + 8, struct.pack("<I", 0)),
        "not online": corrupt(data, basic + 16 + 512, bytes(8)),
        "HVM_CONTEXT record in an x86 PV save file": corrupt(data, page_data, struct.pack("<I", 9)),
        "bytes after the libxl END record": data + bytes(8),
        "unknown libxl record type 0x9": corrupt(data, libxc_end, struct.pack("<I", 9)),
        "characters xenstored refuses": data.replace(b"data/counter\0", b"data counter\0"),
    }
    for expected, bad in cases.items():
        assert bad != data, expected
        with pytest.raises(StreamError, match=expected):
            read_save_file(bad)


def test_missing_records_are_named() -> None:
    data = save(sample(xenstore={}))
    _, libxc, _ = layers(data)
    found = {libxc_stream.RecType(t): (o, n) for o, t, n in records(data, libxc + 40)}
    shared, length = found[libxc_stream.RecType.SHARED_INFO]
    without_shared_info = data[:shared] + data[shared + 8 + length :]
    with pytest.raises(StreamError, match="ends without SHARED_INFO"):
        read_save_file(without_shared_info)
    p2m, length = found[libxc_stream.RecType.X86_PV_P2M_FRAMES]
    with pytest.raises(StreamError, match="PAGE_DATA record before X86_PV_P2M_FRAMES"):
        read_save_file(data[:p2m] + data[p2m + 8 + length :])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused_or_read_never_a_crash(data: st.DataObject) -> None:
    saved = save(sample(pages={p: page(p) for p in range(6)}, vcpus={0: b"s"}))
    offset = data.draw(st.integers(0, len(saved) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(saved)
    bad[offset] ^= flip
    try:
        read_save_file(bytes(bad))
    except StreamError as error:
        assert "\n" not in str(error) and " at offset " in str(error)


def test_each_layer_reads_on_its_own() -> None:
    """libxl's stream alone (migration sends it after xl's header) and libxc's."""
    image = sample()
    libxl_bytes = b"".join(libxl_stream.write(image))
    assert libxl_stream.read(Cursor(libxl_bytes)) == attrs.evolve(image, config=None)
    libxc_bytes = b"".join(libxc_stream.write(image))
    cursor = Cursor(libxc_bytes)
    assert libxc_stream.read(cursor) == attrs.evolve(image, config=None, xenstore={})
    assert cursor.at_end()
    assert b"".join(xl_format.write(image)) == save(image)


def test_a_config_nested_past_pythons_recursion_limit_is_refused() -> None:
    data = save(sample(config=None))
    deep = b"[" * 100_000 + b"\0"
    hostile = (
        data[:36]
        + struct.pack("<III", 3, 0, 4 + len(deep))  # JSON|STREAMv2, optional data length
        + struct.pack("<I", len(deep))
        + deep
        + data[52:]
    )
    with pytest.raises(StreamError, match="xl config is not JSON"):
        read_save_file(hostile)


def test_optional_records_are_skipped_as_both_specs_allow() -> None:
    """Bit 31 of a record type marks a record a reader may ignore; a mandatory one it
    does not know is refused."""
    data = save(sample())
    libxl, libxc, libxc_end = layers(data)
    optional = struct.pack("<II", 0x80000042, 3) + b"abc" + bytes(5)
    libxc_first = libxc + 40
    with_optional = (
        data[:libxc_first] + optional + data[libxc_first:libxc_end] + optional + data[libxc_end:]
    )
    assert read_save_file(with_optional) == sample()
    mandatory = optional.replace(b"\x42\x00\x00\x80", b"\x42\x00\x00\x00")
    with pytest.raises(StreamError, match="unknown libxc record type 0x42"):
        read_save_file(data[:libxc_first] + mandatory + data[libxc_first:])


# --- checking a file where it lies (restore's scan) ---------------------------------------


def scanned(data: bytes) -> DomainImage | str:
    """What `scan_save_file` finds in `data` written to a file, with its pages read back
    from where its runs say they lie; or its error."""
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.flush()
        try:
            image, runs = scan_save_file(file.fileno())
        except StreamError as error:
            return str(error)
        assert image.pages == {}
        assert all(a[0] + a[1] <= b[0] for a, b in zip(runs, runs[1:])), "ascending, once each"
        pages = {
            first + index: os.pread(file.fileno(), PAGE, at + index * PAGE)
            for first, count, at in runs
            for index in range(count)
        }
        return attrs.evolve(image, pages=pages)


def read(data: bytes) -> DomainImage | str:
    try:
        return read_save_file(data)
    except StreamError as error:
        return str(error)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(images())
def test_scanning_a_file_finds_what_reading_it_does(image: DomainImage) -> None:
    assert scanned(save(image)) == image


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_scan_and_read_refuse_the_same_flipped_byte_with_the_same_line(
    data: st.DataObject,
) -> None:
    saved = save(sample(pages={p: page(p) for p in [*range(6), 9, 8]}, vcpus={0: b"s"}))
    bad = bytearray(saved)
    bad[data.draw(st.integers(0, len(saved) - 1))] ^= data.draw(st.integers(1, 255))
    assert scanned(bytes(bad)) == read(bytes(bad))


def test_scan_and_read_agree_on_every_truncation_and_corruption() -> None:
    data = save(sample())
    for cut in boundaries(data):
        assert scanned(data[:cut]) == read(data[:cut])
    assert scanned(data[: len(data) // 2]).startswith("truncated PAGE_DATA record at offset")


def test_scan_settles_a_later_page_data_and_an_xtab() -> None:
    data = save(sample())
    _, libxc, _ = layers(data)
    resend = (
        struct.pack("<IIII", libxc_stream.RecType.PAGE_DATA, 8 + 24 + 2 * PAGE, 3, 0)
        + struct.pack("<QQQ", 3, 0xF << 60 | 4, 1501)  # 3 and 1501 again, 4 gone (XTAB)
        + page(999)
        + page(998)
    )
    at = next(r[0] for r in records(data, libxc + 40) if r[1] == libxc_stream.RecType.X86_TSC_INFO)
    changed = data[:at] + resend + data[at:]
    back = scanned(changed)
    assert back == read(changed)
    assert isinstance(back, DomainImage)
    assert back.pages[3] == page(999) and back.pages[1501] == page(998) and 4 not in back.pages


def test_a_file_cut_short_after_its_size_was_taken_is_truncated_not_a_crash() -> None:
    data = save(sample())
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.flush()
        cursor = FileCursor(file.fileno())
        os.ftruncate(file.fileno(), 100)
        with pytest.raises(StreamError, match="^truncated .* shrank"):
            xl_format._read(cursor)
