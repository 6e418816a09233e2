"""Domain control (domctl.h): the toolstack's privileged domain operations.

Only Dom0 may issue a domctl. Its argument is `xen_domctl`: the command, the
interface version the caller was built against (Xen refuses any other), the
target domain and a 128-byte union of per-command structs. These layouts
exist only for tools (the header needs ``__XEN_TOOLS__``) and may change with
XEN_DOMCTL_INTERFACE_VERSION.
"""

from enum import IntEnum

from construct import Array, Bytes, Int8ul, Int16ul, Int32sl, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "DomctlOp",
    "XEN_DOMCTL_INTERFACE_VERSION",
    "XEN_DOMINF_blocked",
    "XEN_DOMINF_debugged",
    "XEN_DOMINF_dying",
    "XEN_DOMINF_hap",
    "XEN_DOMINF_hvm_guest",
    "XEN_DOMINF_paused",
    "XEN_DOMINF_running",
    "XEN_DOMINF_shutdown",
    "XEN_DOMINF_shutdownmask",
    "XEN_DOMINF_shutdownshift",
    "XEN_DOMINF_xs_domain",
    "XEN_INVALID_MAX_VCPU_ID",
    "xen_arch_domainconfig",
    "xen_domctl",
    "xen_domctl_createdomain",
    "XEN_DOMCTL_CDF_hvm",
    "XEN_DOMCTL_CDF_hap",
    "XEN_DOMCTL_CDF_s3_integrity",
    "XEN_DOMCTL_CDF_oos_off",
    "XEN_DOMCTL_CDF_xs_domain",
    "XEN_DOMCTL_CDF_iommu",
    "XEN_DOMCTL_CDF_nested_virt",
    "XEN_DOMCTL_CDF_vpmu",
    "xen_domctl_getdomaininfo",
    "xen_domctl_max_mem",
    "XEN_DOMCTL_SHADOW_OP_OFF",
    "XEN_DOMCTL_SHADOW_OP_ENABLE",
    "XEN_DOMCTL_SHADOW_OP_CLEAN",
    "XEN_DOMCTL_SHADOW_OP_PEEK",
    "XEN_DOMCTL_SHADOW_OP_GET_ALLOCATION",
    "XEN_DOMCTL_SHADOW_OP_SET_ALLOCATION",
    "XEN_DOMCTL_SHADOW_OP_ENABLE_TEST",
    "XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY",
    "XEN_DOMCTL_SHADOW_ENABLE_REFCOUNT",
    "XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY",
    "XEN_DOMCTL_SHADOW_ENABLE_TRANSLATE",
    "XEN_DOMCTL_SHADOW_ENABLE_EXTERNAL",
    "XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL",
    "xen_domctl_shadow_op",
    "xen_domctl_shadow_op_stats",
    "xen_domctl_tsc_info",
]

XEN_DOMCTL_INTERFACE_VERSION = 0x00000015


class DomctlOp(IntEnum):
    """xen_domctl.cmd (XEN_DOMCTL_*); gaps are removed or obsolete commands."""

    createdomain = 1
    destroydomain = 2
    pausedomain = 3
    unpausedomain = 4
    getdomaininfo = 5
    setvcpuaffinity = 9
    shadow_op = 10
    max_mem = 11
    setvcpucontext = 12
    getvcpucontext = 13
    getvcpuinfo = 14
    max_vcpus = 15
    scheduler_op = 16
    setdomainhandle = 17
    setdebugging = 18
    irq_permission = 19
    iomem_permission = 20
    ioport_permission = 21
    hypercall_init = 22
    settimeoffset = 24
    getvcpuaffinity = 25
    real_mode_area = 26  # obsolete, PPC only
    resumedomain = 27
    sendtrigger = 28
    subscribe = 29
    gethvmcontext = 33
    sethvmcontext = 34
    set_address_size = 35
    get_address_size = 36
    assign_device = 37
    bind_pt_irq = 38
    memory_mapping = 39
    ioport_mapping = 40
    set_ext_vcpucontext = 42
    get_ext_vcpucontext = 43
    set_opt_feature = 44  # obsolete, IA64 only
    test_assign_device = 45
    set_target = 46
    deassign_device = 47
    unbind_pt_irq = 48
    get_device_group = 50
    debug_op = 54
    gethvmcontext_partial = 55
    vm_event_op = 56
    mem_sharing_op = 57
    gettscinfo = 59
    settscinfo = 60
    getpageframeinfo3 = 61
    setvcpuextstate = 62
    getvcpuextstate = 63
    set_access_required = 64
    audit_p2m = 65
    set_virq_handler = 66
    set_broken_page_p2m = 67
    setnodeaffinity = 68
    getnodeaffinity = 69
    cacheflush = 71
    get_vcpu_msrs = 72
    set_vcpu_msrs = 73
    setvnumainfo = 74
    psr_cmt_op = 75
    monitor_op = 77
    psr_alloc = 78
    soft_reset = 79
    vuart_op = 81
    get_cpu_policy = 82
    set_cpu_policy = 83
    vmtrace_op = 84
    get_paging_mempool_size = 85
    set_paging_mempool_size = 86
    gdbsx_guestmemio = 1000
    gdbsx_pausevcpu = 1001
    gdbsx_unpausevcpu = 1002
    gdbsx_domstatus = 1003


__all__ += export_enum(DomctlOp, "XEN_DOMCTL_", globals())

# xen_domctl_getdomaininfo.flags
XEN_DOMINF_dying = 1 << 0  # scheduled to die
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2  # the guest has shut down
XEN_DOMINF_paused = 1 << 3  # paused by the toolstack
XEN_DOMINF_blocked = 1 << 4  # waiting for an event
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_debugged = 1 << 6
XEN_DOMINF_xs_domain = 1 << 7  # runs xenstored
XEN_DOMINF_hap = 1 << 8
# With XEN_DOMINF_shutdown: the guest's SHUTDOWN_* reason sits in these bits.
XEN_DOMINF_shutdownmask = 255
XEN_DOMINF_shutdownshift = 16

XEN_INVALID_MAX_VCPU_ID = 0xFFFFFFFF  # max_vcpu_id of a domain with no vcpus

# x86's struct xen_arch_domainconfig.
xen_arch_domainconfig = Struct(
    "emulation_flags" / Int32ul,  # XEN_X86_EMU_*
    "misc_flags" / Int32ul,
)

# XEN_DOMCTL_CDF_* (xen_domctl_createdomain.flags)
XEN_DOMCTL_CDF_hvm = 1 << 0
XEN_DOMCTL_CDF_hap = 1 << 1
XEN_DOMCTL_CDF_s3_integrity = 1 << 2
XEN_DOMCTL_CDF_oos_off = 1 << 3
XEN_DOMCTL_CDF_xs_domain = 1 << 4
XEN_DOMCTL_CDF_iommu = 1 << 5
XEN_DOMCTL_CDF_nested_virt = 1 << 6
XEN_DOMCTL_CDF_vpmu = 1 << 7

xen_domctl_createdomain = Struct(
    "ssidref" / Int32ul,
    "handle" / Bytes(16),  # xen_domain_handle_t (the domain's UUID)
    "flags" / Int32ul,  # XEN_DOMCTL_CDF_*
    "iommu_opts" / Int32ul,
    "max_vcpus" / Int32ul,
    "max_evtchn_port" / Int32ul,
    "max_grant_frames" / Int32sl,  # < 0: the hypervisor's default
    "max_maptrack_frames" / Int32sl,
    "grant_opts" / Int32ul,  # XEN_DOMCTL_GRANT_version(v) in the low 4 bits
    "vmtrace_size" / Int32ul,
    "cpupool_id" / Int32ul,
    "arch" / xen_arch_domainconfig,
)

xen_domctl_getdomaininfo = Struct(
    "domain" / Int16ul,
    "pad1" / Int16ul,
    "flags" / Int32ul,  # XEN_DOMINF_*
    "tot_pages" / Int64ul,
    "max_pages" / Int64ul,
    "outstanding_pages" / Int64ul,
    "shr_pages" / Int64ul,
    "paged_pages" / Int64ul,
    "shared_info_frame" / Int64ul,
    "cpu_time" / Int64ul,  # ns
    "nr_online_vcpus" / Int32ul,
    "max_vcpu_id" / Int32ul,
    "ssidref" / Int32ul,
    "handle" / Bytes(16),  # xen_domain_handle_t (the domain's UUID)
    "cpupool" / Int32ul,
    "gpaddr_bits" / Int8ul,
    "pad2" / Bytes(7),
    "arch_config" / xen_arch_domainconfig,
)

# XEN_DOMCTL_gettscinfo / settscinfo (libxc's xc_domain_get_tsc_info): what the
# save stream's X86_TSC_INFO record carries.
xen_domctl_tsc_info = Struct(
    "tsc_mode" / Int32ul,  # TSC_MODE_*
    "gtsc_khz" / Int32ul,
    "incarnation" / Int32ul,
    "pad" / Int32ul,
    "elapsed_nsec" / Int64ul,
)

xen_domctl_max_mem = Struct(
    "max_memkb" / Int64ul,
)

# XEN_DOMCTL_shadow_op: xen_domctl_shadow_op.op
XEN_DOMCTL_SHADOW_OP_OFF = 0  # log-dirty (shadow mode) off
XEN_DOMCTL_SHADOW_OP_ENABLE = 32  # with `mode` of XEN_DOMCTL_SHADOW_ENABLE_* flags
XEN_DOMCTL_SHADOW_OP_CLEAN = 11  # the dirty bitmap, then cleared
XEN_DOMCTL_SHADOW_OP_PEEK = 12  # the dirty bitmap, left as it is
XEN_DOMCTL_SHADOW_OP_GET_ALLOCATION = 30
XEN_DOMCTL_SHADOW_OP_SET_ALLOCATION = 31
XEN_DOMCTL_SHADOW_OP_ENABLE_TEST = 1  # legacy
XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY = 2  # legacy: ENABLE with ENABLE_LOG_DIRTY
# xen_domctl_shadow_op.mode for OP_ENABLE
XEN_DOMCTL_SHADOW_ENABLE_REFCOUNT = 1 << 1
XEN_DOMCTL_SHADOW_ENABLE_LOG_DIRTY = 1 << 2
XEN_DOMCTL_SHADOW_ENABLE_TRANSLATE = 1 << 3
XEN_DOMCTL_SHADOW_ENABLE_EXTERNAL = 1 << 4
# xen_domctl_shadow_op.mode for OP_CLEAN and OP_PEEK: the save's last round
XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL = 1 << 0

xen_domctl_shadow_op_stats = Struct(
    "fault_count" / Int32ul,
    "dirty_count" / Int32ul,
)

xen_domctl_shadow_op = Struct(
    "op" / Int32ul,  # XEN_DOMCTL_SHADOW_OP_*
    "mode" / Int32ul,  # OP_ENABLE: XEN_DOMCTL_SHADOW_ENABLE_*; CLEAN/PEEK: _LOGDIRTY_*
    "mb" / Int32ul,  # OP_GET_ALLOCATION / OP_SET_ALLOCATION
    Padding(4),
    "dirty_bitmap" / Int64ul,  # guest handle (uint8): the bitmap follows the reply's xen_domctl
    "pages" / Int64ul,  # IN: the buffer's size in pages (bits); OUT: the pages it covers
    "stats" / xen_domctl_shadow_op_stats,
)

xen_domctl = Struct(
    "cmd" / Int32ul,  # XEN_DOMCTL_*
    "interface_version" / Int32ul,  # XEN_DOMCTL_INTERFACE_VERSION
    "domain" / Int16ul,
    "pad" / Array(3, Int16ul),  # C: _pad
    "u" / Bytes(128),  # the command's struct (its `pad[128]` member sizes the union)
)
