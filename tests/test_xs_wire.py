"""xs_wire: the layouts of xs_wire.h and the sans-I/O framing."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenlike.abi import xs_wire
from xenlike.xenstore.wire import (
    HEADER_SIZE,
    NEED_DATA,
    MessageReader,
    XenStoreError,
    XsMessage,
    XsProtocolError,
    error_reply,
    join_strings,
    ok_reply,
    reply,
    split_strings,
    watch_event,
)


def test_layout_sizes_and_offsets_match_the_header():
    assert xs_wire.xsd_sockmsg.sizeof() == HEADER_SIZE == 16
    assert xs_wire.xenstore_domain_interface.sizeof() == 2076
    page = xs_wire.xenstore_domain_interface.build(
        dict(
            req=bytes(1024),
            rsp=bytes(1024),
            req_cons=1,
            req_prod=2,
            rsp_cons=3,
            rsp_prod=4,
            server_features=5,
            connection=6,
            error=7,
        )
    )
    # req_cons@2048 ... error@2072, little-endian uint32 each.
    words = [int.from_bytes(page[off : off + 4], "little") for off in range(2048, 2076, 4)]
    assert words == [1, 2, 3, 4, 5, 6, 7]


def test_type_numbers_and_error_order():
    assert xs_wire.XS_CONTROL == xs_wire.XS_DEBUG == 0
    assert xs_wire.XS_WATCH_EVENT == 15 and xs_wire.XS_ERROR == 16
    assert xs_wire.XS_RESET_WATCHES == 21 and xs_wire.XS_DIRECTORY_PART == 22
    assert xs_wire.XS_TYPE_COUNT == 23 and xs_wire.XS_INVALID == 0xFFFF
    assert xs_wire.XsType(13) is xs_wire.XS_RM
    assert list(xs_wire.XSD_ERRORS)[:3] == ["EINVAL", "EACCES", "EEXIST"]
    assert list(xs_wire.XSD_ERRORS)[-2:] == ["E2BIG", "EPERM"]
    assert xs_wire.XSD_ERRORS["EAGAIN"] == 11
    assert xs_wire.MASK_XENSTORE_IDX(1024 + 5) == 5


def test_encode_matches_construct_and_the_transcript():
    message = XsMessage(xs_wire.XS_READ, 0, 0, b"/foo\0")
    header = xs_wire.xsd_sockmsg.build(dict(type=2, req_id=0, tx_id=0, len=5))
    assert message.encode() == header + b"/foo\0"
    assert message.encode().hex() == "02000000000000000000000005000000" + "2f666f6f00"


def test_repr_names_known_types_and_keeps_unknown_numbers():
    assert "XS_WRITE" in repr(XsMessage(11, 1, 2, b"x"))
    assert "999" in repr(XsMessage(999, 1, 2, b""))


def test_reader_waits_for_a_whole_message():
    reader = MessageReader()
    data = XsMessage(xs_wire.XS_WRITE, 7, 3, b"/a\0value").encode()
    reader.feed(data[:8])
    assert reader.next_message() is NEED_DATA
    reader.feed(data[8:20])
    assert reader.next_message() is NEED_DATA
    reader.feed(data[20:])
    assert reader.next_message() == XsMessage(xs_wire.XS_WRITE, 7, 3, b"/a\0value")
    assert reader.next_message() is NEED_DATA
    assert reader.buffered == 0


def test_reader_accepts_the_largest_payload_and_refuses_one_more_byte():
    reader = MessageReader()
    reader.feed(XsMessage(xs_wire.XS_WRITE, 0, 0, bytes(4096)).encode())
    assert len(reader.next_message().payload) == 4096
    reader.feed(xs_wire.xsd_sockmsg.build(dict(type=2, req_id=0, tx_id=0, len=4097)))
    with pytest.raises(XsProtocolError, match="4097"):
        reader.next_message()
    # Nothing after a framing error can be trusted, even well-formed bytes.
    reader.feed(XsMessage(xs_wire.XS_READ, 0, 0, b"/\0").encode())
    with pytest.raises(XsProtocolError):
        reader.next_message()


def test_oversized_len_is_refused_before_its_payload_arrives():
    reader = MessageReader()
    reader.feed(xs_wire.xsd_sockmsg.build(dict(type=2, req_id=0, tx_id=0, len=5000)))
    with pytest.raises(XsProtocolError):
        reader.next_message()


messages = st.builds(
    XsMessage,
    type=st.integers(0, 0xFFFFFFFF),
    req_id=st.integers(0, 0xFFFFFFFF),
    tx_id=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=300),
)


@given(st.lists(messages, max_size=8), st.data())
def test_any_chunking_yields_the_same_messages(sent, data):
    stream = b"".join(message.encode() for message in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    reader = MessageReader()
    received = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        reader.feed(stream[start:end])
        received.extend(reader)
    assert received == sent
    assert reader.buffered == 0


@given(st.integers(4097, 0xFFFFFFFF), st.integers(0, 15))
def test_any_overlong_len_raises_however_the_header_is_split(length, cut):
    header = xs_wire.xsd_sockmsg.build(dict(type=1, req_id=2, tx_id=3, len=length))
    reader = MessageReader()
    reader.feed(header[:cut])
    assert reader.next_message() is NEED_DATA
    reader.feed(header[cut:])
    with pytest.raises(XsProtocolError):
        reader.next_message()


def test_payload_helpers():
    assert split_strings(b"foo\0local\0") == [b"foo", b"local"]
    assert split_strings(b"/a\0value-without-nul") == [b"/a"]
    assert split_strings(b"") == []
    assert join_strings(b"/foo", b"tok") == b"/foo\0tok\0"
    assert join_strings() == b""


def test_replies_keep_the_request_ids():
    request = XsMessage(xs_wire.XS_READ, 41, 9, b"/nope\0")
    assert reply(request, b"bar") == XsMessage(xs_wire.XS_READ, 41, 9, b"bar")
    assert ok_reply(request) == XsMessage(xs_wire.XS_READ, 41, 9, b"OK\0")
    assert error_reply(request, "ENOENT") == XsMessage(xs_wire.XS_ERROR, 41, 9, b"ENOENT\0")
    assert watch_event(b"/foo", b"tok") == XsMessage(xs_wire.XS_WATCH_EVENT, 0, 0, b"/foo\0tok\0")


def test_xenstore_error_carries_name_and_number():
    error = XenStoreError("EAGAIN", "conflict")
    assert (error.name, error.errno) == ("EAGAIN", 11)
    assert str(error) == "EAGAIN: conflict"
    assert XenStoreError("EBADF").errno == 9
    assert XenStoreError("ENOTANERRNO").errno == 22  # unknown names mean EINVAL
