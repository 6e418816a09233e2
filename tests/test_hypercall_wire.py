"""The hypercall wire's hot paths agree with its construct layouts.

The guest packs a request header and the hypervisor unpacks it with the
bare `struct` format (no `Request` made); construct's `hypercall_request`
is the checked layout, and these must give the same bytes and fields.
"""

from hypothesis import given
from hypothesis import strategies as st

from xenlike.hypercall import (
    REQUEST_HEADER_SIZE,
    Request,
    hypercall_request,
    pack_request_header,
    unpack_request_header,
)

u32 = st.integers(0, 2**32 - 1)


@given(seq=u32, op=u32, cmd=u32, count=u32, payload=st.binary(max_size=64))
def test_request_header_fast_paths_agree_with_construct(
    seq: int, op: int, cmd: int, count: int, payload: bytes
) -> None:
    message = pack_request_header(seq, op, cmd, count) + payload
    built = hypercall_request.build({"seq": seq, "op": op, "cmd": cmd, "count": count})
    assert message == built + payload == Request(seq, op, cmd, count, payload).encode()
    assert unpack_request_header(message) == (seq, op, cmd, count)
    parsed = hypercall_request.parse(message[:REQUEST_HEADER_SIZE])
    assert (parsed.seq, parsed.op, parsed.cmd, parsed.count) == (seq, op, cmd, count)
    assert message[REQUEST_HEADER_SIZE:] == Request.decode(message).payload == payload
