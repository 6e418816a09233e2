"""Fast checks of xenlike.abi that need no compiler (tests/test_abi_headers.py
checks everything against the real headers).

The numbers below are the ones xen-abi.md lists.
"""

import enum
import importlib
import keyword
import pkgutil
import types

import construct
import pytest

import xenlike.abi
from xenlike.abi import (
    blkif,
    console,
    errno,
    event_channel,
    grant_table,
    netif,
    ring,
    sched,
    trace,
    xen,
    xenbus,
)
from xenlike.abi._layout import export_enum, fields, member, offsetof


def abi_modules() -> list[types.ModuleType]:
    return [
        importlib.import_module(f"xenlike.abi.{m.name}")
        for m in pkgutil.iter_modules(xenlike.abi.__path__)
        if not m.name.startswith("_")
    ]


def abi_structs() -> list[tuple[str, construct.Struct]]:
    return [
        (f"{module.__name__}.{name}", getattr(module, name))
        for module in abi_modules()
        for name in module.__all__
        if isinstance(getattr(module, name), construct.Struct)
    ]


@pytest.mark.parametrize(
    ("request_layout", "response_layout", "slots"),
    [
        (blkif.blkif_request, blkif.blkif_response, [32, 64, 128, 256]),
        (netif.netif_tx_request, netif.netif_tx_response, [256, 512, 1024, 2048]),
        (netif.netif_rx_request, netif.netif_rx_response, [256, 512, 1024, 2048]),
        (netif.xen_netif_ctrl_request, netif.xen_netif_ctrl_response, [128, 256, 512, 1024]),
    ],
)
def test_ring_sizes(
    request_layout: construct.Struct, response_layout: construct.Struct, slots: list[int]
) -> None:
    entry = max(request_layout.sizeof(), response_layout.sizeof())
    assert [ring.ring_size(entry, pages * ring.XEN_PAGE_SIZE) for pages in (1, 2, 4, 8)] == slots


def test_ring_header() -> None:
    assert ring.SRING_HEADER_SIZE == 64
    assert (
        ring.REQ_PROD_OFFSET,
        ring.REQ_EVENT_OFFSET,
        ring.RSP_PROD_OFFSET,
        ring.RSP_EVENT_OFFSET,
        ring.PVT_OFFSET,
        ring.PAD_OFFSET,
    ) == (0, 4, 8, 12, 16, 20)
    assert ring.XEN_PAGE_SIZE == 4096
    assert [ring.XEN_FLEX_RING_SIZE(order) for order in (0, 1, 2)] == [2048, 4096, 8192]
    assert ring.data_intf.sizeof() == 132


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (blkif.blkif_request, 112),
        (blkif.blkif_response, 16),
        (blkif.blkif_request_segment, 8),
        (blkif.blkif_request_discard, 32),
        (blkif.blkif_request_indirect, 64),
        (netif.netif_tx_request, 12),
        (netif.netif_tx_response, 4),
        (netif.netif_rx_request, 8),
        (netif.netif_rx_response, 8),
        (netif.netif_extra_info, 8),
        (console.xencons_interface, 3088),
        (grant_table.grant_entry_v1, 8),
        (grant_table.grant_entry_v2, 16),
        (grant_table.gnttab_map_grant_ref, 32),
        (grant_table.gnttab_unmap_grant_ref, 24),
        (grant_table.gnttab_copy, 40),
        (grant_table.gnttab_setup_table, 24),
        (grant_table.gnttab_query_size, 16),
        (event_channel.evtchn_alloc_unbound, 8),
        (event_channel.evtchn_bind_interdomain, 12),
        (event_channel.evtchn_send, 4),
        (event_channel.evtchn_close, 4),
        (event_channel.evtchn_status, 24),
        (event_channel.evtchn_op, 28),
        (xen.start_info, 1168),
        (xen.shared_info, 3136),
        (xen.vcpu_info, 64),
        (xen.vcpu_time_info, 32),
        (xen.multicall_entry, 64),
        (sched.sched_poll, 24),
        (sched.sched_remote_shutdown, 8),
        (trace.t_rec, 40),
    ],
)
def test_sizes(layout: construct.Struct, size: int) -> None:
    assert layout.sizeof() == size


def test_offsets() -> None:
    assert offsetof(blkif.blkif_request, "id") == 8
    assert offsetof(blkif.blkif_request, "seg[1]") == 32
    assert offsetof(blkif.blkif_request, "seg[10].last_sect") == 109
    assert offsetof(blkif.blkif_request_indirect, "indirect_grefs") == 28
    assert offsetof(blkif.blkif_response, "status") == 10
    assert offsetof(console.xencons_interface, "out_prod") == 3084
    assert offsetof(grant_table.gnttab_copy, "dest.domid") == 24
    assert offsetof(xen.start_info, "store_mfn") == 56
    assert offsetof(xen.start_info, "console.domU.mfn") == 72
    assert offsetof(xen.start_info, "console.domU.evtchn") == 80
    assert offsetof(xen.start_info, "cmd_line") == 128
    assert offsetof(xen.shared_info, "vcpu_info[31].time.flags") == 31 * 64 + 32 + 29
    assert offsetof(xen.shared_info, "evtchn_mask") == 2560
    assert offsetof(xen.shared_info, "wc_sec_hi") == 3084
    assert console.XENCONS_IN_SIZE == 1024 and console.XENCONS_OUT_SIZE == 2048


def test_layout_helpers() -> None:
    assert [f.name for f in fields(blkif.blkif_response)] == ["id", "operation", "status"]
    seg = member(blkif.blkif_request, "seg[2]")
    assert (seg.offset, seg.size, seg.type) == (40, 8, blkif.blkif_request_segment)
    with pytest.raises(KeyError):
        offsetof(blkif.blkif_request, "nope")
    with pytest.raises(KeyError):
        offsetof(blkif.blkif_request, "id.x")
    with pytest.raises(IndexError):
        offsetof(blkif.blkif_request, "seg[11]")
    with pytest.raises(IndexError):
        offsetof(blkif.blkif_request, "id[0]")
    with pytest.raises(ValueError):
        offsetof(blkif.blkif_request, "seg[")


def test_export_enum() -> None:
    class Colour(enum.IntEnum):
        red = 1
        crimson = 1
        import_ = 2

    namespace: dict[str, object] = {}
    assert export_enum(Colour, "COLOUR_", namespace) == [
        "COLOUR_red",
        "COLOUR_crimson",
        "COLOUR_import",
    ]
    assert namespace["COLOUR_crimson"] is Colour.red
    with pytest.raises(ValueError):
        export_enum(Colour, "COLOUR_", {"COLOUR_red": 1})


def test_xen_names_are_the_enum_members() -> None:
    assert grant_table.GNTTABOP_map_grant_ref is grant_table.GnttabOp.map_grant_ref
    assert grant_table.GNTST_permission_denied == -8
    assert xenbus.XenbusStateConnected is xenbus.XenbusState.Connected == 4
    assert errno.XEN_EINVAL is errno.Errno.EINVAL == 22
    assert errno.XEN_EWOULDBLOCK is errno.Errno.EAGAIN
    assert blkif.BLKIF_OP_READ is blkif.BlkifOp.READ == 0
    assert xen.VIRQ_DOM_EXC is xen.Virq.DOM_EXC == 3
    assert xen.HYPERVISOR_sched_op is xen.Hypercall.sched_op == 29
    assert xen.HYPERVISOR_event_channel_op == 32
    assert sched.SCHEDOP_yield is sched.SchedOp.yield_ == 0
    assert event_channel.EVTCHNOP_alloc_unbound == 6


@pytest.mark.parametrize("module", abi_modules(), ids=lambda m: m.__name__)
def test_every_enum_member_is_exported(module: types.ModuleType) -> None:
    exported = [getattr(module, name) for name in module.__all__]
    for value in exported:
        if isinstance(value, type) and issubclass(value, enum.Enum):
            for name, enum_member in value.__members__.items():
                assert any(v is enum_member for v in exported), f"{value.__name__}.{name}"


def test_grant_status_messages() -> None:
    assert len(grant_table.GNTTABOP_error_msgs) == 1 - min(grant_table.GntStatus)
    assert grant_table.GNTTABOP_error_msgs[-grant_table.GNTST_bad_copy_arg] == (
        "copy arguments cross page boundary"
    )


def test_trace_header_word() -> None:
    word = trace.t_rec_header(trace.TRC_PV_HYPERCALL_V2, 3, True)
    assert word == 0xB020100D
    assert trace.TRC_HD_TO_EVENT(word) == trace.TRC_PV_HYPERCALL_V2
    assert trace.TRC_HD_EXTRA(word) == 3
    assert trace.TRC_HD_INCLUDES_CYCLE_COUNT(word)
    assert trace.t_rec_size(3, True) == 24 and trace.t_rec_size(0, False) == 4
    with pytest.raises(ValueError):
        trace.t_rec_header(1 << 28, 0, False)


def _check_kinds(con: construct.Construct, where: str) -> None:
    """Only what a struct-format compiler understands, with names a record can use."""
    if isinstance(con, construct.Struct):
        for sub in con.subcons:
            if sub.name is None:
                assert isinstance(sub, construct.Padded) and sub.subcon is construct.Pass, where
                continue
            assert sub.name.isidentifier() and not sub.name.startswith("_"), f"{where}.{sub.name}"
            assert not keyword.iskeyword(sub.name), f"{where}.{sub.name}"
            _check_kinds(sub.subcon, f"{where}.{sub.name}")
    elif isinstance(con, construct.Array):
        assert isinstance(con.count, int), where
        _check_kinds(con.subcon, f"{where}[]")
    elif isinstance(con, construct.FormatField):
        assert con.fmtstr[0] == "<", where
    else:
        assert isinstance(con, construct.Bytes) and isinstance(con.length, int), where


@pytest.mark.parametrize(("name", "layout"), abi_structs(), ids=[n for n, _ in abi_structs()])
def test_layouts_use_only_fixed_size_kinds(name: str, layout: construct.Struct) -> None:
    _check_kinds(layout, name)
    data = (bytes(range(256)) * (layout.sizeof() // 256 + 1))[: layout.sizeof()]
    assert len(layout.build(layout.parse(data))) == layout.sizeof()
