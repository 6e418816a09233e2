"""Trace records (trace.h), the format xentrace and xenalyze read.

A record starts with one 32-bit word of bit fields: the event id (bits 0-27),
the number of 32-bit data words (bits 28-30) and whether a TSC timestamp
follows (bit 31). An event id is a class bit (bits 16-27), a subclass
(bits 12-15) and an event number (bits 0-11); the class constants carry
subclass 0xf so that they double as filter masks.
"""

from construct import Array, Bytes, Int16ul, Int32sl, Int32ul, Int64ul, Struct

__all__ = [
    "TRACE_EXTRA_MAX",
    "TRACE_EXTRA_SHIFT",
    "TRC_64_FLAG",
    "TRC_ALL",
    "TRC_CLS_SHIFT",
    "TRC_DOM0OP",
    "TRC_DOM0_DOMOPS",
    "TRC_DOM0_DOM_ADD",
    "TRC_DOM0_DOM_REM",
    "TRC_GEN",
    "TRC_GUEST",
    "TRC_HD_CYCLE_FLAG",
    "TRC_HD_EXTRA",
    "TRC_HD_INCLUDES_CYCLE_COUNT",
    "TRC_HD_TO_EVENT",
    "TRC_HVM",
    "TRC_HW",
    "TRC_HW_IRQ",
    "TRC_HW_PM",
    "TRC_LOST_RECORDS",
    "TRC_MEM",
    "TRC_MEM_DECREASE_RESERVATION",
    "TRC_MEM_PAGE_GRANT_MAP",
    "TRC_MEM_PAGE_GRANT_TRANSFER",
    "TRC_MEM_PAGE_GRANT_UNMAP",
    "TRC_MEM_SET_P2M_ENTRY",
    "TRC_PV",
    "TRC_PV_EMULATE_4GB",
    "TRC_PV_EMULATE_PRIVOP",
    "TRC_PV_ENTRY",
    "TRC_PV_FORCED_INVALID_OP",
    "TRC_PV_GDT_LDT_MAPPING_FAULT",
    "TRC_PV_HYPERCALL",
    "TRC_PV_HYPERCALL_SUBCALL",
    "TRC_PV_HYPERCALL_V2",
    "TRC_PV_HYPERCALL_V2_ARG_32",
    "TRC_PV_HYPERCALL_V2_ARG_64",
    "TRC_PV_HYPERCALL_V2_ARG_MASK",
    "TRC_PV_MATH_STATE_RESTORE",
    "TRC_PV_PAGE_FAULT",
    "TRC_PV_PAGING_FIXUP",
    "TRC_PV_PTWR_EMULATION",
    "TRC_PV_PTWR_EMULATION_PAE",
    "TRC_PV_SUBCALL",
    "TRC_PV_TRAP",
    "TRC_SCHED",
    "TRC_SCHED_ADJDOM",
    "TRC_SCHED_BLOCK",
    "TRC_SCHED_CLASS",
    "TRC_SCHED_CONTINUE_RUNNING",
    "TRC_SCHED_CTL",
    "TRC_SCHED_DOM_ADD",
    "TRC_SCHED_DOM_REM",
    "TRC_SCHED_DOM_TIMER_FN",
    "TRC_SCHED_MIN",
    "TRC_SCHED_RUNSTATE_CHANGE",
    "TRC_SCHED_SHUTDOWN",
    "TRC_SCHED_SHUTDOWN_CODE",
    "TRC_SCHED_SLEEP",
    "TRC_SCHED_SWITCH",
    "TRC_SCHED_SWITCH_INFCONT",
    "TRC_SCHED_SWITCH_INFNEXT",
    "TRC_SCHED_SWITCH_INFPREV",
    "TRC_SCHED_S_TIMER_FN",
    "TRC_SCHED_T_TIMER_FN",
    "TRC_SCHED_VERBOSE",
    "TRC_SCHED_WAKE",
    "TRC_SCHED_YIELD",
    "TRC_SHADOW",
    "TRC_SUBCLS_SHIFT",
    "TRC_TRACE_CPU_CHANGE",
    "TRC_TRACE_WRAP_BUFFER",
    "t_buf",
    "t_rec",
    "t_rec_cycles",
    "t_rec_header",
    "t_rec_nocycles",
    "t_rec_size",
    "trc_cpu_change",
    "trc_lost_records",
    "trc_runstate_change",
]

# Header word bit fields.
TRACE_EXTRA_MAX = 7
TRACE_EXTRA_SHIFT = 28
TRC_HD_CYCLE_FLAG = 1 << 31

TRC_CLS_SHIFT = 16
TRC_SUBCLS_SHIFT = 12
# Added to some event numbers when the addresses they carry are 64-bit.
TRC_64_FLAG = 0x100

# Classes
TRC_GEN = 0x0001F000
TRC_SCHED = 0x0002F000
TRC_DOM0OP = 0x0004F000
TRC_HVM = 0x0008F000
TRC_MEM = 0x0010F000
TRC_PV = 0x0020F000
TRC_SHADOW = 0x0040F000
TRC_HW = 0x0080F000
TRC_GUEST = 0x0800F000
TRC_ALL = 0x0FFFF000

# Subclasses
TRC_SCHED_MIN = 0x00021000  # runstate changes only
TRC_SCHED_CLASS = 0x00022000  # scheduler-specific
TRC_SCHED_VERBOSE = 0x00028000
TRC_DOM0_DOMOPS = 0x00041000
TRC_PV_ENTRY = 0x00201000  # hypervisor entry points of PV guests
TRC_PV_SUBCALL = 0x00202000  # calls inside a multicall
TRC_HW_PM = 0x00801000
TRC_HW_IRQ = 0x00802000

# Events
TRC_LOST_RECORDS = TRC_GEN + 1
TRC_TRACE_WRAP_BUFFER = TRC_GEN + 2
TRC_TRACE_CPU_CHANGE = TRC_GEN + 3

TRC_SCHED_RUNSTATE_CHANGE = TRC_SCHED_MIN + 1
TRC_SCHED_CONTINUE_RUNNING = TRC_SCHED_MIN + 2
TRC_SCHED_DOM_ADD = TRC_SCHED_VERBOSE + 1
TRC_SCHED_DOM_REM = TRC_SCHED_VERBOSE + 2
TRC_SCHED_SLEEP = TRC_SCHED_VERBOSE + 3
TRC_SCHED_WAKE = TRC_SCHED_VERBOSE + 4
TRC_SCHED_YIELD = TRC_SCHED_VERBOSE + 5
TRC_SCHED_BLOCK = TRC_SCHED_VERBOSE + 6
TRC_SCHED_SHUTDOWN = TRC_SCHED_VERBOSE + 7
TRC_SCHED_CTL = TRC_SCHED_VERBOSE + 8
TRC_SCHED_ADJDOM = TRC_SCHED_VERBOSE + 9
TRC_SCHED_SWITCH = TRC_SCHED_VERBOSE + 10
TRC_SCHED_S_TIMER_FN = TRC_SCHED_VERBOSE + 11
TRC_SCHED_T_TIMER_FN = TRC_SCHED_VERBOSE + 12
TRC_SCHED_DOM_TIMER_FN = TRC_SCHED_VERBOSE + 13
TRC_SCHED_SWITCH_INFPREV = TRC_SCHED_VERBOSE + 14
TRC_SCHED_SWITCH_INFNEXT = TRC_SCHED_VERBOSE + 15
TRC_SCHED_SHUTDOWN_CODE = TRC_SCHED_VERBOSE + 16
TRC_SCHED_SWITCH_INFCONT = TRC_SCHED_VERBOSE + 17

TRC_DOM0_DOM_ADD = TRC_DOM0_DOMOPS + 1
TRC_DOM0_DOM_REM = TRC_DOM0_DOMOPS + 2

TRC_MEM_PAGE_GRANT_MAP = TRC_MEM + 1
TRC_MEM_PAGE_GRANT_UNMAP = TRC_MEM + 2
TRC_MEM_PAGE_GRANT_TRANSFER = TRC_MEM + 3
TRC_MEM_SET_P2M_ENTRY = TRC_MEM + 4
TRC_MEM_DECREASE_RESERVATION = TRC_MEM + 5

TRC_PV_HYPERCALL = TRC_PV_ENTRY + 1
TRC_PV_TRAP = TRC_PV_ENTRY + 3
TRC_PV_PAGE_FAULT = TRC_PV_ENTRY + 4
TRC_PV_FORCED_INVALID_OP = TRC_PV_ENTRY + 5
TRC_PV_EMULATE_PRIVOP = TRC_PV_ENTRY + 6
TRC_PV_EMULATE_4GB = TRC_PV_ENTRY + 7
TRC_PV_MATH_STATE_RESTORE = TRC_PV_ENTRY + 8
TRC_PV_PAGING_FIXUP = TRC_PV_ENTRY + 9
TRC_PV_GDT_LDT_MAPPING_FAULT = TRC_PV_ENTRY + 10
TRC_PV_PTWR_EMULATION = TRC_PV_ENTRY + 11
TRC_PV_PTWR_EMULATION_PAE = TRC_PV_ENTRY + 12
# Data word 0: hypercall number in bits 0-19, then a 2-bit size code per
# argument (TRC_PV_HYPERCALL_V2_ARG_32/_64); the present arguments follow,
# 64-bit ones as low word then high word.
TRC_PV_HYPERCALL_V2 = TRC_PV_ENTRY + 13
TRC_PV_HYPERCALL_SUBCALL = TRC_PV_SUBCALL + 14
TRC_PV_HYPERCALL_V2_ARG_MASK = 0xFFF00000


def TRC_PV_HYPERCALL_V2_ARG_32(i: int) -> int:  # noqa: N802 - Xen's macro name
    """Size code of a 32-bit argument `i` (0..5) in TRC_PV_HYPERCALL_V2's first word."""
    return 0x1 << (20 + 2 * i)


def TRC_PV_HYPERCALL_V2_ARG_64(i: int) -> int:  # noqa: N802 - Xen's macro name
    """Size code of a 64-bit argument `i` (0..5) in TRC_PV_HYPERCALL_V2's first word."""
    return 0x2 << (20 + 2 * i)


def TRC_HD_TO_EVENT(header: int) -> int:  # noqa: N802 - Xen's macro name
    """The event id in a record's header word."""
    return header & 0x0FFFFFFF


def TRC_HD_EXTRA(header: int) -> int:  # noqa: N802 - Xen's macro name
    """The number of data words in a record."""
    return (header >> TRACE_EXTRA_SHIFT) & TRACE_EXTRA_MAX


def TRC_HD_INCLUDES_CYCLE_COUNT(header: int) -> bool:  # noqa: N802 - Xen's macro name
    """Whether a TSC timestamp (cycles_lo, cycles_hi) follows the header word."""
    return bool(header & TRC_HD_CYCLE_FLAG)


def t_rec_header(event: int, extra_u32: int, cycles_included: bool) -> int:
    """The header word of a record: struct t_rec's event:28, extra_u32:3, cycles_included:1."""
    if not 0 <= event <= 0x0FFFFFFF or not 0 <= extra_u32 <= TRACE_EXTRA_MAX:
        raise ValueError(f"event {event:#x} / extra_u32 {extra_u32} out of range")
    return event | extra_u32 << TRACE_EXTRA_SHIFT | (TRC_HD_CYCLE_FLAG if cycles_included else 0)


def t_rec_size(extra_u32: int, cycles_included: bool) -> int:
    """Bytes a record takes in a trace buffer (records are not padded to sizeof(t_rec))."""
    return 4 + (8 if cycles_included else 0) + 4 * extra_u32


# struct t_rec at its largest. `header` is the bit-field word (see t_rec_header);
# `u` is the union that t_rec_cycles or t_rec_nocycles lays out.
t_rec = Struct(
    "header" / Int32ul,
    "u" / Bytes(36),
)

# u.cycles (header bit 31 set)
t_rec_cycles = Struct(
    "cycles_lo" / Int32ul,
    "cycles_hi" / Int32ul,
    "extra_u32" / Array(TRACE_EXTRA_MAX, Int32ul),
)

# u.nocycles (header bit 31 clear)
t_rec_nocycles = Struct(
    "extra_u32" / Array(TRACE_EXTRA_MAX, Int32ul),
)

# Header of a per-CPU trace buffer; records follow it. cons and prod are byte
# offsets into the data area that run modulo twice its size.
t_buf = Struct(
    "cons" / Int32ul,
    "prod" / Int32ul,
)

# The data words of three records trace.h names but does not lay out.

# TRC_TRACE_CPU_CHANGE (no TSC): the pCPU whose records follow, and how many bytes of
# them; xentrace.c's struct cpu_change_record after its header word.
trc_cpu_change = Struct(
    "cpu" / Int32sl,
    "window_size" / Int32ul,
)

# TRC_LOST_RECORDS (with a TSC: when the loss was noted): how many, who was running,
# and the TSC of the first record lost; common/trace.c's insert_lost_records.
trc_lost_records = Struct(
    "lost_records" / Int32ul,
    "did" / Int16ul,
    "vid" / Int16ul,
    "first_tsc" / Int64ul,
)

# TRC_SCHED_RUNSTATE_CHANGE (with a TSC), whose event id carries the old runstate in
# bits 8-11 and the new one in bits 4-7: the vCPU, as sched/core.c traces it.
trc_runstate_change = Struct(
    "vcpu" / Int16ul,
    "domain" / Int16ul,
)
