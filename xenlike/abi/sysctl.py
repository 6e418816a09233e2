"""System control (sysctl.h): the toolstack's privileged host-wide operations.

Like domctl, Dom0 only, tools only (``__XEN_TOOLS__``), and versioned by
XEN_SYSCTL_INTERFACE_VERSION, which the caller passes in every `xen_sysctl`.
"""

from enum import IntEnum

from construct import Array, Bytes, Int16ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "SysctlOp",
    "XEN_SYSCTL_INTERFACE_VERSION",
    "XEN_SYSCTL_PHYSCAP_MAX",
    "XEN_SYSCTL_PHYSCAP_directio",
    "XEN_SYSCTL_PHYSCAP_gnttab_v1",
    "XEN_SYSCTL_PHYSCAP_gnttab_v2",
    "XEN_SYSCTL_PHYSCAP_hap",
    "XEN_SYSCTL_PHYSCAP_hvm",
    "XEN_SYSCTL_PHYSCAP_iommu_hap_pt_share",
    "XEN_SYSCTL_PHYSCAP_pv",
    "XEN_SYSCTL_PHYSCAP_shadow",
    "XEN_SYSCTL_PHYSCAP_vmtrace",
    "XEN_SYSCTL_PHYSCAP_vpmu",
    "xen_sysctl",
    "xen_sysctl_getdomaininfolist",
    "xen_sysctl_physinfo",
]

XEN_SYSCTL_INTERFACE_VERSION = 0x00000015


class SysctlOp(IntEnum):
    """xen_sysctl.cmd (XEN_SYSCTL_*); gaps are removed commands."""

    readconsole = 1
    tbuf_op = 2
    physinfo = 3
    sched_id = 4
    perfc_op = 5
    getdomaininfolist = 6
    debug_keys = 7
    getcpuinfo = 8
    availheap = 9
    get_pmstat = 10
    cpu_hotplug = 11
    pm_op = 12
    page_offline_op = 14
    lockprof_op = 15
    cputopoinfo = 16
    numainfo = 17
    cpupool_op = 18
    scheduler_op = 19
    coverage_op = 20
    psr_cmt_op = 21
    pcitopoinfo = 22
    psr_alloc = 23
    get_cpu_levelling_caps = 25
    get_cpu_featureset = 26
    livepatch_op = 27
    get_cpu_policy = 29


__all__ += export_enum(SysctlOp, "XEN_SYSCTL_", globals())

# xen_sysctl_physinfo.capabilities
XEN_SYSCTL_PHYSCAP_hvm = 1 << 0
XEN_SYSCTL_PHYSCAP_pv = 1 << 1
XEN_SYSCTL_PHYSCAP_directio = 1 << 2
XEN_SYSCTL_PHYSCAP_hap = 1 << 3
XEN_SYSCTL_PHYSCAP_shadow = 1 << 4
XEN_SYSCTL_PHYSCAP_iommu_hap_pt_share = 1 << 5
XEN_SYSCTL_PHYSCAP_vmtrace = 1 << 6
XEN_SYSCTL_PHYSCAP_vpmu = 1 << 7
XEN_SYSCTL_PHYSCAP_gnttab_v1 = 1 << 8
XEN_SYSCTL_PHYSCAP_gnttab_v2 = 1 << 9
XEN_SYSCTL_PHYSCAP_MAX = XEN_SYSCTL_PHYSCAP_gnttab_v2

xen_sysctl_physinfo = Struct(
    "threads_per_core" / Int32ul,
    "cores_per_socket" / Int32ul,
    "nr_cpus" / Int32ul,  # online
    "max_cpu_id" / Int32ul,
    "nr_nodes" / Int32ul,  # online
    "max_node_id" / Int32ul,
    "cpu_khz" / Int32ul,
    "capabilities" / Int32ul,  # XEN_SYSCTL_PHYSCAP_*
    "arch_capabilities" / Int32ul,
    "pad" / Int32ul,
    "total_pages" / Int64ul,
    "free_pages" / Int64ul,
    "scrub_pages" / Int64ul,
    "outstanding_pages" / Int64ul,
    "max_mfn" / Int64ul,
    "hw_cap" / Array(8, Int32ul),
)

xen_sysctl_getdomaininfolist = Struct(
    # IN
    "first_domain" / Int16ul,
    Padding(2),
    "max_domains" / Int32ul,
    "buffer" / Int64ul,  # guest handle: xen_domctl_getdomaininfo array
    # OUT
    "num_domains" / Int32ul,
    Padding(4),
)

xen_sysctl = Struct(
    "cmd" / Int32ul,  # XEN_SYSCTL_*
    "interface_version" / Int32ul,  # XEN_SYSCTL_INTERFACE_VERSION
    "u" / Bytes(128),  # the command's struct (its `pad[128]` member sizes the union)
)
