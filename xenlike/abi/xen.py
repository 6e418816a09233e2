"""Core interface (xen.h, with arch-x86 and io/protocols.h): hypercall numbers,
virtual IRQs, special domain ids, and the boot-time pages a PV guest finds
(start_info, shared_info).
"""

from enum import IntEnum

from construct import Array, Bytes, Int8sl, Int8ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "CONSOLEIO_read",
    "CONSOLEIO_write",
    "DOMID_COW",
    "DOMID_FIRST_RESERVED",
    "DOMID_IDLE",
    "DOMID_INVALID",
    "DOMID_IO",
    "DOMID_MASK",
    "DOMID_SELF",
    "DOMID_XEN",
    "Hypercall",
    "MAX_GUEST_CMDLINE",
    "NR_VIRQS",
    "SIF_INITDOMAIN",
    "SIF_MOD_START_PFN",
    "SIF_MULTIBOOT_MOD",
    "SIF_PM_MASK",
    "SIF_PRIVILEGED",
    "SIF_VIRT_P2M_4TOOLS",
    "Virq",
    "XEN_IO_PROTO_ABI_ARM",
    "XEN_IO_PROTO_ABI_NATIVE",
    "XEN_IO_PROTO_ABI_X86_32",
    "XEN_IO_PROTO_ABI_X86_64",
    "XEN_LEGACY_MAX_VCPUS",
    "XEN_PVCLOCK_GUEST_STOPPED",
    "XEN_PVCLOCK_TSC_STABLE_BIT",
    "arch_shared_info",
    "arch_vcpu_info",
    "multicall_entry",
    "shared_info",
    "start_info",
    "start_info_console_dom0",
    "vcpu_info",
    "vcpu_time_info",
]


class Hypercall(IntEnum):
    """Hypercall numbers; Xen's ``__HYPERVISOR_<name>``.

    The module-level names drop the leading double underscore
    (``HYPERVISOR_<name>``): Python would mangle such a name wherever it is
    used inside a class body.
    """

    set_trap_table = 0
    mmu_update = 1
    set_gdt = 2
    stack_switch = 3
    set_callbacks = 4
    fpu_taskswitch = 5
    sched_op_compat = 6  # compat since 0x00030101
    platform_op = 7
    set_debugreg = 8
    get_debugreg = 9
    update_descriptor = 10
    memory_op = 12
    multicall = 13
    update_va_mapping = 14
    set_timer_op = 15
    event_channel_op_compat = 16  # compat since 0x00030202
    xen_version = 17
    console_io = 18
    physdev_op_compat = 19  # compat since 0x00030202
    grant_table_op = 20
    vm_assist = 21
    update_va_mapping_otherdomain = 22
    iret = 23
    vcpu_op = 24
    set_segment_base = 25
    mmuext_op = 26
    xsm_op = 27
    nmi_op = 28
    sched_op = 29
    callback_op = 30
    xenoprof_op = 31
    event_channel_op = 32
    physdev_op = 33
    hvm_op = 34
    sysctl = 35
    domctl = 36
    kexec_op = 37
    tmem_op = 38
    argo_op = 39
    xenpmu_op = 40
    dm_op = 41
    hypfs_op = 42
    arch_0 = 48
    arch_1 = 49
    arch_2 = 50
    arch_3 = 51
    arch_4 = 52
    arch_5 = 53
    arch_6 = 54
    arch_7 = 55


class Virq(IntEnum):
    """Virtual IRQs a domain binds with EVTCHNOP_bind_virq (VIRQ_*)."""

    TIMER = 0  # per vcpu: timebase update or requested timeout
    DEBUG = 1  # per vcpu: dump debug info
    CONSOLE = 2  # dom0: bytes on the emergency console
    DOM_EXC = 3  # dom0: exceptional event for some domain
    TBUF = 4  # dom0: trace buffer has records
    DEBUGGER = 6  # dom0: a domain paused for debugging
    XENOPROF = 7
    CON_RING = 8  # dom0: bytes on the console ring
    PCPU_STATE = 9
    MEM_EVENT = 10
    ARGO = 11
    ENOMEM = 12  # dom0: Xen is low on heap memory
    XENPMU = 13
    ARCH_0 = 16
    ARCH_1 = 17
    ARCH_2 = 18
    ARCH_3 = 19
    ARCH_4 = 20
    ARCH_5 = 21
    ARCH_6 = 22
    ARCH_7 = 23


__all__ += export_enum(Hypercall, "HYPERVISOR_", globals())
__all__ += export_enum(Virq, "VIRQ_", globals())

NR_VIRQS = 24

# Domain ids at or above DOMID_FIRST_RESERVED never name an ordinary domain.
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
DOMID_MASK = 0x7FFF

# Commands of the console_io hypercall.
CONSOLEIO_write = 0
CONSOLEIO_read = 1

# start_info.flags
SIF_PRIVILEGED = 1 << 0
SIF_INITDOMAIN = 1 << 1
SIF_MULTIBOOT_MOD = 1 << 2
SIF_MOD_START_PFN = 1 << 3
SIF_VIRT_P2M_4TOOLS = 1 << 4
SIF_PM_MASK = 0xFF << 8

MAX_GUEST_CMDLINE = 1024

# vcpu_info entries in shared_info.
XEN_LEGACY_MAX_VCPUS = 32

# vcpu_time_info.flags
XEN_PVCLOCK_TSC_STABLE_BIT = 1 << 0
XEN_PVCLOCK_GUEST_STOPPED = 1 << 1

# Values of a frontend's "protocol" key: the ring ABI it speaks.
XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"
XEN_IO_PROTO_ABI_NATIVE = XEN_IO_PROTO_ABI_X86_64

multicall_entry = Struct(
    "op" / Int64ul,  # hypercall number
    "result" / Int64ul,
    "args" / Array(6, Int64ul),
)

vcpu_time_info = Struct(
    # Odd while Xen updates the fields below (a seqlock).
    "version" / Int32ul,
    "pad0" / Int32ul,
    "tsc_timestamp" / Int64ul,
    "system_time" / Int64ul,  # ns since boot at tsc_timestamp
    # system_time + ((((tsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul) >> 32)
    "tsc_to_system_mul" / Int32ul,
    "tsc_shift" / Int8sl,
    "flags" / Int8ul,  # XEN_PVCLOCK_*
    "pad1" / Bytes(2),
)

arch_vcpu_info = Struct(
    "cr2" / Int64ul,
    "pad" / Int64ul,
)

vcpu_info = Struct(
    # Set by Xen; the guest clears it before scanning for pending ports.
    "evtchn_upcall_pending" / Int8ul,
    "evtchn_upcall_mask" / Int8ul,  # non-zero blocks upcalls
    Padding(6),
    "evtchn_pending_sel" / Int64ul,  # one bit per word of shared_info.evtchn_pending
    "arch" / arch_vcpu_info,
    "time" / vcpu_time_info,
)

arch_shared_info = Struct(
    "max_pfn" / Int64ul,
    "pfn_to_mfn_frame_list_list" / Int64ul,
    "nmi_reason" / Int64ul,
    "p2m_cr3" / Int64ul,
    "p2m_vaddr" / Int64ul,
    "p2m_generation" / Int64ul,
)

shared_info = Struct(
    "vcpu_info" / Array(XEN_LEGACY_MAX_VCPUS, vcpu_info),
    # 2-level event channels: one bit per port, 64 words of 64 bits.
    "evtchn_pending" / Array(64, Int64ul),
    "evtchn_mask" / Array(64, Int64ul),
    # Wallclock at system time 0, with a seqlock version like vcpu_time_info's.
    "wc_version" / Int32ul,
    "wc_sec" / Int32ul,
    "wc_nsec" / Int32ul,
    "wc_sec_hi" / Int32ul,
    "arch" / arch_shared_info,
)

start_info = Struct(
    # Filled in on boot and on resume.
    "magic" / Bytes(32),  # "xen-<version>-<platform>"
    "nr_pages" / Int64ul,
    "shared_info" / Int64ul,  # machine address of shared_info
    "flags" / Int32ul,  # SIF_*
    Padding(4),
    "store_mfn" / Int64ul,  # frame of the xenstore ring page
    "store_evtchn" / Int32ul,
    Padding(4),
    # union console: domU is shown; dom0 uses start_info_console_dom0 instead.
    "console"
    / Struct(
        "domU"
        / Struct(
            "mfn" / Int64ul,  # frame of the console ring page
            "evtchn" / Int32ul,
            Padding(4),
        ),
    ),
    # Filled in on boot only.
    "pt_base" / Int64ul,
    "nr_pt_frames" / Int64ul,
    "mfn_list" / Int64ul,
    "mod_start" / Int64ul,
    "mod_len" / Int64ul,
    "cmd_line" / Bytes(MAX_GUEST_CMDLINE),  # int8_t[]
    "first_p2m_pfn" / Int64ul,
    "nr_p2m_frames" / Int64ul,
)

# start_info.console.dom0: where the dom0 console_info struct sits.
start_info_console_dom0 = Struct(
    "info_off" / Int32ul,
    "info_size" / Int32ul,
)
