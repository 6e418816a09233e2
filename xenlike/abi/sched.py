"""Scheduler operations (sched.h): yield, block, poll and shut down."""

from enum import IntEnum

from construct import Int16ul, Int32sl, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "SHUTDOWN_MAX",
    "SchedOp",
    "ShutdownReason",
    "sched_pin_override",
    "sched_poll",
    "sched_remote_shutdown",
    "sched_shutdown",
    "sched_watchdog",
]


class SchedOp(IntEnum):
    """Commands of the sched_op hypercall (SCHEDOP_*)."""

    yield_ = 0  # Xen's SCHEDOP_yield; `yield` is a Python keyword
    block = 1  # sleep until an event, re-enabling upcalls atomically
    shutdown = 2  # sched_shutdown
    poll = 3  # sched_poll
    remote_shutdown = 4  # sched_remote_shutdown
    shutdown_code = 5  # sched_shutdown: record the reason for later
    watchdog = 6  # sched_watchdog
    pin_override = 7  # sched_pin_override


class ShutdownReason(IntEnum):
    """sched_shutdown.reason (SHUTDOWN_*)."""

    poweroff = 0
    reboot = 1
    suspend = 2
    crash = 3
    watchdog = 4
    soft_reset = 5


__all__ += export_enum(SchedOp, "SCHEDOP_", globals())
__all__ += export_enum(ShutdownReason, "SHUTDOWN_", globals())

SHUTDOWN_MAX = 5

sched_shutdown = Struct(
    "reason" / Int32ul,  # SHUTDOWN_*
)

sched_poll = Struct(
    "ports" / Int64ul,  # guest handle: evtchn_port_t array
    "nr_ports" / Int32ul,
    Padding(4),
    "timeout" / Int64ul,
)

sched_remote_shutdown = Struct(
    "domain_id" / Int16ul,
    Padding(2),
    "reason" / Int32ul,
)

sched_watchdog = Struct(
    "id" / Int32ul,
    "timeout" / Int32ul,
)

sched_pin_override = Struct(
    "pcpu" / Int32sl,
)
