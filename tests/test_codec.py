"""The struct codecs derived from construct layouts give construct's own bytes."""

import construct
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlike.abi import blkif, event_channel, grant_table, netif
from xenlike.codec import LayoutError, RecordArray, compile_struct

LAYOUTS = {
    "blkif_request": blkif.blkif_request,
    "blkif_request_indirect": blkif.blkif_request_indirect,
    "blkif_request_discard": blkif.blkif_request_discard,
    "blkif_response": blkif.blkif_response,
    "netif_tx_request": netif.netif_tx_request,
    "netif_rx_response": netif.netif_rx_response,
    "grant_entry_v1": grant_table.grant_entry_v1,
    "gnttab_map_grant_ref": grant_table.gnttab_map_grant_ref,
    "gnttab_copy": grant_table.gnttab_copy,
    "evtchn_status": event_channel.evtchn_status,
}


@pytest.mark.parametrize("name", LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_codec_bytes_equal_construct_bytes(name: str, data: st.DataObject) -> None:
    layout = LAYOUTS[name]
    codec = compile_struct(layout, name)
    raw = data.draw(st.binary(min_size=codec.size, max_size=codec.size))
    canonical = layout.build(layout.parse(raw))  # construct zeroes padding
    value = codec.unpack(canonical)
    assert codec.pack(value) == canonical
    assert codec.size == layout.sizeof()


@pytest.mark.parametrize("name", LAYOUTS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_run_of_slots_decodes_as_each_slot_does(name: str, data: st.DataObject) -> None:
    codec = compile_struct(LAYOUTS[name], name)
    stride = codec.size + data.draw(st.integers(0, 24))
    count = data.draw(st.integers(0, 5))
    raw = data.draw(st.binary(min_size=stride * count, max_size=stride * count))
    assert codec.slots_unpacker(stride)(raw) == [
        codec.unpack_from(raw, index * stride) for index in range(count)
    ]
    with pytest.raises(ValueError, match="cannot hold"):
        codec.slots_unpacker(codec.size - 1)


def test_short_record_arrays_are_zero_filled_and_long_ones_refused() -> None:
    codec = compile_struct(blkif.blkif_request, "blkif_request")
    seg = codec.record().seg[0]._replace(gref=0xDEAD, first_sect=2, last_sect=5)
    buf = bytearray(b"\xff" * codec.size)
    codec.pack_into(buf, 0, codec.record(nr_segments=1, seg=[seg]))
    assert bytes(buf[32:]) == bytes(80)  # segments 1..10 zeroed
    decoded = codec.unpack(bytes(buf))
    assert isinstance(decoded.seg, RecordArray) and len(decoded.seg) == 11
    assert decoded.seg[0] == seg and decoded.seg[-1] == codec.record().seg[0]
    assert decoded.seg[:1] == (seg,)
    with pytest.raises(ValueError, match="at most 11"):
        codec.pack(codec.record(seg=[seg] * 12))
    array_type = type(decoded.seg)
    assert codec.pack(codec.record(seg=array_type(bytes(buf[24:32])))) == codec.pack(
        codec.record(seg=[seg])
    )  # raw bytes of fewer elements: the rest zeroed
    with pytest.raises(ValueError, match="more than 11 elements"):
        codec.pack(codec.record(seg=array_type(bytes(8 * 12))))


@settings(max_examples=60, deadline=None)
@given(
    raw=st.binary(min_size=88, max_size=88),
    count=st.integers(0, 11),
    index=st.integers(-11, 10),
    window=st.tuples(st.integers(-12, 12), st.integers(-12, 12)),
)
def test_every_form_of_seg_packs_alike_and_reads_as_construct_does(
    raw: bytes, count: int, index: int, window: tuple[int, int]
) -> None:
    """The packer's fast cases (the array's bytes, bare or as a RecordArray, one
    record) and the plain one (a list of records) write the same slot."""
    codec = compile_struct(blkif.blkif_request, "blkif_request")
    segments = blkif.blkif_request_segment[11]
    canonical = segments.build(segments.parse(raw))  # construct zeroes the padding
    array = type(codec.record().seg)(canonical)
    records = [
        codec.record().seg[0]._replace(**{k: v for k, v in item.items() if k != "_io"})
        for item in segments.parse(canonical)
    ]
    assert list(array) == records and array[index] == records[index]
    assert array[window[0] : window[1]] == tuple(records[window[0] : window[1]])
    whole = {codec.pack(codec.record(seg=form)) for form in (canonical, array, records)}
    assert len(whole) == 1 and whole.pop()[24:] == canonical
    short = canonical[: 8 * count].ljust(88, b"\0")  # fewer elements: the rest zeroed
    assert codec.pack(codec.record(seg=type(array)(canonical[: 8 * count])))[24:] == short
    assert codec.pack(codec.record(seg=records[:count]))[24:] == short


def test_decoded_arrays_are_private_copies() -> None:
    codec = compile_struct(blkif.blkif_request, "blkif_request")
    shared = bytearray(codec.size)
    codec.pack_into(shared, 0, codec.record(seg=[(7, 0, 7)]))
    decoded = codec.unpack_from(shared, 0)
    shared[24:28] = b"\x99\x99\x99\x99"  # the peer rewrites the page afterwards
    assert decoded.seg[0].gref == 7


def test_layouts_without_a_fixed_struct_form_are_refused() -> None:
    with pytest.raises(LayoutError):
        compile_struct(construct.Struct("x" / construct.Int32ub))  # big-endian
    with pytest.raises(LayoutError):
        compile_struct(construct.Struct("s" / construct.CString("ascii")))
