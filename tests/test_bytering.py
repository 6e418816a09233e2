"""Byte rings of the console and XenStore pages: offsets, wrap, hostile indices."""

import struct

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlike.bytering import CONSOLE, XENSTORE, ByteRing, ByteRingStream
from xenlike.ring import RingOverflow
from xenlike.testing import doorbell_pair


def test_offsets_are_xens() -> None:
    out, in_ = CONSOLE.to_backend, CONSOLE.to_guest
    assert (out.data, out.size, out.cons, out.prod) == (1024, 2048, 3080, 3084)
    assert (in_.data, in_.size, in_.cons, in_.prod) == (0, 1024, 3072, 3076)
    req, rsp = XENSTORE.to_backend, XENSTORE.to_guest
    assert (req.data, req.cons, req.prod) == (0, 2048, 2052)
    assert (rsp.data, rsp.cons, rsp.prod) == (1024, 2056, 2060)


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=0, max_size=3000), max_size=20),
    reads=st.lists(st.integers(1, 3000), min_size=1, max_size=20),
    start=st.integers(0, 2**32 - 1),
)
def test_bytes_arrive_in_order_across_wraps(
    chunks: list[bytes], reads: list[int], start: int
) -> None:
    page = memoryview(bytearray(4096))
    layout = CONSOLE.to_backend
    struct.pack_into("<I", page, layout.cons, start)
    struct.pack_into("<I", page, layout.prod, start)
    producer, consumer = ByteRing(page, layout), ByteRing(page, layout)
    sent = bytearray()
    received = bytearray()
    for i, chunk in enumerate(chunks):
        pending = memoryview(chunk)
        while pending:
            n = producer.write(pending)
            sent += pending[:n]
            pending = pending[n:]
            received += consumer.read(reads[i % len(reads)])
        assert producer.space() + producer.used() == layout.size
    received += consumer.read()
    assert bytes(received) == bytes(sent)


def test_a_full_ring_takes_nothing_more() -> None:
    page = memoryview(bytearray(4096))
    ring = ByteRing(page, XENSTORE.to_backend)
    assert ring.write(b"x" * 2000) == 1024
    assert ring.write(b"y") == 0
    assert ring.read(10) == b"x" * 10
    assert ring.write(b"yz") == 2


@pytest.mark.parametrize("ahead", [1025, 2**31, 2**32 - 1])
def test_hostile_producer_index_is_refused(ahead: int) -> None:
    page = memoryview(bytearray(4096))
    layout = XENSTORE.to_backend
    struct.pack_into("<I", page, layout.prod, ahead)
    with pytest.raises(RingOverflow):
        ByteRing(page, layout).read()


async def test_stream_over_a_page_carries_a_megabyte_both_ways(nursery) -> None:
    page = memoryview(bytearray(4096))
    guest_bell, daemon_bell = doorbell_pair()
    guest = ByteRingStream(
        ByteRing(page, XENSTORE.to_backend), ByteRing(page, XENSTORE.to_guest), guest_bell
    )
    daemon = ByteRingStream(
        ByteRing(page, XENSTORE.to_guest), ByteRing(page, XENSTORE.to_backend), daemon_bell
    )
    nursery.start_soon(guest.pump)
    nursery.start_soon(daemon.pump)
    payload = bytes(range(256)) * 4096

    async def echo() -> None:
        received = 0
        while received < len(payload):
            chunk = await daemon.receive_some()
            received += len(chunk)
            await daemon.send_all(chunk)

    nursery.start_soon(echo)
    back = bytearray()

    async def collect() -> None:
        while len(back) < len(payload):
            back.extend(await guest.receive_some())

    async with trio.open_nursery() as inner:
        inner.start_soon(collect)
        await guest.send_all(payload)
    assert bytes(back) == payload
    for stream in (guest, daemon):
        await stream.aclose()
    nursery.cancel_scope.cancel()
