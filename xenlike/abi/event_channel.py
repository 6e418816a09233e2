"""Event channels (event_channel.h): EVTCHNOP commands and their arguments.

The usual interdomain setup: one side (normally the frontend) allocates an
unbound port for the peer domain and publishes it in XenStore; the peer binds
it with bind_interdomain and gets its own local port. After that a `send` on
either end raises the event at the other; `close` returns the other end to
the unbound state.
"""

from enum import IntEnum

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "BIND_PIRQ__WILL_SHARE",
    "EVTCHN_2L_NR_CHANNELS",
    "EVTCHN_FIFO_BUSY",
    "EVTCHN_FIFO_LINKED",
    "EVTCHN_FIFO_LINK_BITS",
    "EVTCHN_FIFO_LINK_MASK",
    "EVTCHN_FIFO_MASKED",
    "EVTCHN_FIFO_MAX_QUEUES",
    "EVTCHN_FIFO_NR_CHANNELS",
    "EVTCHN_FIFO_PENDING",
    "EVTCHN_FIFO_PRIORITY_DEFAULT",
    "EVTCHN_FIFO_PRIORITY_MAX",
    "EVTCHN_FIFO_PRIORITY_MIN",
    "EvtchnOp",
    "EvtchnStat",
    "evtchn_alloc_unbound",
    "evtchn_bind_interdomain",
    "evtchn_bind_ipi",
    "evtchn_bind_pirq",
    "evtchn_bind_vcpu",
    "evtchn_bind_virq",
    "evtchn_close",
    "evtchn_expand_array",
    "evtchn_fifo_control_block",
    "evtchn_init_control",
    "evtchn_op",
    "evtchn_reset",
    "evtchn_send",
    "evtchn_set_priority",
    "evtchn_status",
    "evtchn_status_interdomain",
    "evtchn_status_unbound",
    "evtchn_unmask",
]


class EvtchnOp(IntEnum):
    """Commands of the event_channel_op hypercall (EVTCHNOP_*)."""

    bind_interdomain = 0
    bind_virq = 1
    bind_pirq = 2
    close = 3
    send = 4
    status = 5
    alloc_unbound = 6
    bind_ipi = 7
    bind_vcpu = 8
    unmask = 9
    reset = 10
    init_control = 11
    expand_array = 12
    set_priority = 13


class EvtchnStat(IntEnum):
    """evtchn_status.status: what a port is bound to (EVTCHNSTAT_*)."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


__all__ += export_enum(EvtchnOp, "EVTCHNOP_", globals())
__all__ += export_enum(EvtchnStat, "EVTCHNSTAT_", globals())

BIND_PIRQ__WILL_SHARE = 1

# Ports of the 2-level ABI: one pending bit per port in shared_info,
# 64 words of 64 bits.
EVTCHN_2L_NR_CHANNELS = 8 * 8 * 64

# FIFO ABI
EVTCHN_FIFO_PRIORITY_MAX = 0
EVTCHN_FIFO_PRIORITY_DEFAULT = 7
EVTCHN_FIFO_PRIORITY_MIN = 15
EVTCHN_FIFO_MAX_QUEUES = EVTCHN_FIFO_PRIORITY_MIN + 1
# Bit numbers in an event word.
EVTCHN_FIFO_PENDING = 31
EVTCHN_FIFO_MASKED = 30
EVTCHN_FIFO_LINKED = 29
EVTCHN_FIFO_BUSY = 28
EVTCHN_FIFO_LINK_BITS = 17
EVTCHN_FIFO_LINK_MASK = (1 << EVTCHN_FIFO_LINK_BITS) - 1
EVTCHN_FIFO_NR_CHANNELS = 1 << EVTCHN_FIFO_LINK_BITS

evtchn_alloc_unbound = Struct(
    # IN
    "dom" / Int16ul,  # normally DOMID_SELF
    "remote_dom" / Int16ul,  # the domain allowed to bind it
    # OUT
    "port" / Int32ul,
)

evtchn_bind_interdomain = Struct(
    # IN
    "remote_dom" / Int16ul,
    Padding(2),
    "remote_port" / Int32ul,
    # OUT
    "local_port" / Int32ul,
)

evtchn_bind_virq = Struct(
    "virq" / Int32ul,  # VIRQ_*
    "vcpu" / Int32ul,
    "port" / Int32ul,  # OUT
)

evtchn_bind_pirq = Struct(
    "pirq" / Int32ul,
    "flags" / Int32ul,  # BIND_PIRQ__*
    "port" / Int32ul,  # OUT
)

evtchn_bind_ipi = Struct(
    "vcpu" / Int32ul,
    "port" / Int32ul,  # OUT
)

evtchn_close = Struct(
    "port" / Int32ul,
)

evtchn_send = Struct(
    "port" / Int32ul,
)

evtchn_status = Struct(
    # IN
    "dom" / Int16ul,
    Padding(2),
    "port" / Int32ul,
    # OUT
    "status" / Int32ul,  # EVTCHNSTAT_*
    "vcpu" / Int32ul,
    # The 8-byte union u, laid out by `status`: evtchn_status_unbound,
    # evtchn_status_interdomain, or a uint32 pirq / virq in its first 4 bytes.
    "u" / Bytes(8),
)

# u.unbound (EVTCHNSTAT_unbound): the domain allowed to bind.
evtchn_status_unbound = Struct(
    "dom" / Int16ul,
)

# u.interdomain (EVTCHNSTAT_interdomain): the peer end.
evtchn_status_interdomain = Struct(
    "dom" / Int16ul,
    Padding(2),
    "port" / Int32ul,
)

evtchn_bind_vcpu = Struct(
    "port" / Int32ul,
    "vcpu" / Int32ul,
)

evtchn_unmask = Struct(
    "port" / Int32ul,
)

evtchn_reset = Struct(
    "dom" / Int16ul,
)

evtchn_init_control = Struct(
    # IN
    "control_gfn" / Int64ul,
    "offset" / Int32ul,
    "vcpu" / Int32ul,
    # OUT
    "link_bits" / Int8ul,
    "pad" / Bytes(7),  # C: _pad
)

evtchn_expand_array = Struct(
    "array_gfn" / Int64ul,
)

evtchn_set_priority = Struct(
    "port" / Int32ul,
    "priority" / Int32ul,
)

# Argument of the legacy event_channel_op_compat hypercall (16): the command,
# then the union of the per-command structs above (sized by evtchn_status).
evtchn_op = Struct(
    "cmd" / Int32ul,  # EVTCHNOP_*
    "u" / Bytes(evtchn_status.sizeof()),
)

evtchn_fifo_control_block = Struct(
    "ready" / Int32ul,
    "rsvd" / Int32ul,  # C: _rsvd
    "head" / Array(EVTCHN_FIFO_MAX_QUEUES, Int32ul),
)
