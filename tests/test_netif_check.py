"""netback's checks of the tx ring (drivers.netif.protocol), without processes or patches:
slots in, a packet's pieces or its refusal out, ChannelBroken for a malicious front end."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.netif.protocol import (
    FATAL_SKB_SLOTS,
    Refusal,
    check_size,
    check_slot,
    max_frame,
    parse_tx_packet,
)
from xenlike.abi.netif import (
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_NR_SLOTS_MIN,
    NETTXF_extra_info,
    NETTXF_more_data,
)
from xenlike.xenbus import ChannelBroken

MAX_TX = max_frame(1500)


def slot(gref: int, size: int, flags: int = 0, rid: int = 0, offset: int = 0) -> tuple:
    """A netif_tx_request as the ring decodes it: (gref, offset, flags, id, size)."""
    return (gref, offset, flags, rid, size)


def extra(kind: int, more: bool = False) -> tuple:
    """A slot holding a netif_extra_info: type and flags are its first two bytes."""
    return (kind | (XEN_NETIF_EXTRA_FLAG_MORE if more else 0) << 8, 0, 0, 0, 0)


def test_a_fragmented_packet_is_its_pieces_in_order() -> None:
    slots = [
        slot(10, 3000, NETTXF_more_data, rid=1, offset=100),
        slot(11, 1000, NETTXF_more_data, rid=2),
        slot(12, 500, rid=3),
        slot(13, 60),
    ]
    packet = parse_tx_packet(slots, 0, 9000, 8982)
    assert packet.after == 3 and packet.refusal is None and packet.extras == 0
    assert packet.pieces == [(10, 100, 1500), (11, 0, 1000), (12, 0, 500)]
    assert packet.fragment_ids == [2, 3]


@pytest.mark.parametrize(
    ("slots", "refusal"),
    [
        (
            [slot(1, 60, NETTXF_extra_info), extra(XEN_NETIF_EXTRA_TYPE_GSO)],
            Refusal("tx_errors", "extra info type 1 was not negotiated", 60),
        ),
        (
            [slot(1, 100, NETTXF_more_data), slot(2, 200)],
            Refusal("tx_errors", "fragments larger than their packet", 200),
        ),
        ([slot(1, 10)], Refusal("tx_errors", "a packet shorter than an Ethernet header", 10)),
        (
            [slot(1, 2000, NETTXF_more_data), slot(2, 1000)],
            Refusal("tx_dropped", "a packet over the MTU of 1500", 2000),
        ),
        (
            [slot(1, 1000, NETTXF_more_data)]
            + [slot(2, 10, NETTXF_more_data)] * XEN_NETIF_NR_SLOTS_MIN
            + [slot(3, 10)],
            Refusal("tx_errors", f"a packet over {XEN_NETIF_NR_SLOTS_MIN} slots", 1000),
        ),
    ],
    ids=["extra-info", "fragments-too-large", "runt", "giant", "too-many-slots"],
)
def test_refused_packets_say_why_and_still_consume_their_slots(
    slots: list, refusal: Refusal
) -> None:
    packet = parse_tx_packet(slots, 0, MAX_TX, 1500)
    assert packet.refusal == refusal
    assert packet.after == len(slots)
    assert 1 + packet.extras + len(packet.fragment_ids) == len(slots)


@pytest.mark.parametrize(
    ("slots", "why"),
    [
        ([slot(1, 100, NETTXF_more_data)], "more_data chain runs past"),
        (
            [slot(1, 60, NETTXF_extra_info), extra(XEN_NETIF_EXTRA_TYPE_GSO, more=True)],
            "extra info runs past",
        ),
        ([slot(1, 60, NETTXF_extra_info), extra(9)], "extra info type 9"),
        ([slot(1, 100, offset=4050)], "crosses its page"),
        (
            [slot(1, 9000, NETTXF_more_data)] + [slot(2, 10, NETTXF_more_data)] * FATAL_SKB_SLOTS,
            "Malicious frontend",
        ),
    ],
    ids=["chain-past-prod", "extras-past-prod", "extra-type", "cross-page", "fatal-slots"],
)
def test_a_malicious_front_end_breaks_the_channel(slots: list, why: str) -> None:
    with pytest.raises(ChannelBroken, match=why):
        parse_tx_packet(slots, 0, MAX_TX, 1500)


def test_the_one_slot_path_uses_the_same_checks() -> None:
    assert check_size(60, MAX_TX, 1500) is None
    assert check_size(MAX_TX + 1, MAX_TX, 1500).counter == "tx_dropped"
    check_slot(1, 4000, 96)
    with pytest.raises(ChannelBroken, match="offset 4000 \\+ size 97"):
        check_slot(1, 4000, 97)


any_slot = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
    st.sampled_from([0, NETTXF_more_data, NETTXF_extra_info, NETTXF_more_data | NETTXF_extra_info]),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
)


@given(st.lists(any_slot, min_size=1, max_size=30))
def test_any_slots_are_a_packet_that_accounts_for_its_slots_or_a_broken_channel(
    slots: list,
) -> None:
    try:
        packet = parse_tx_packet(slots, 0, MAX_TX, 1500)
    except ChannelBroken:
        return
    assert 0 < packet.after <= len(slots)
    assert 1 + packet.extras + len(packet.fragment_ids) == packet.after
    if packet.refusal is None:
        assert carries_a_frame(packet) and all(o + s <= 4096 for _, o, s in packet.pieces)


def carries_a_frame(packet) -> bool:
    """An accepted packet is at least an Ethernet header and at most the MTU's frame."""
    return 14 <= sum(size for _, _, size in packet.pieces) <= MAX_TX
