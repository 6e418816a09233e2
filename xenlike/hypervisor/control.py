"""domctl and sysctl: Dom0's control of domains and of the host.

Both take Xen's `xen_domctl` / `xen_sysctl` struct, whose 128-byte union
`u` holds the command's own struct, and both belong to Dom0 alone.
`XENLIKE_DOMCTL_build` is xenlike's own: it stands for the domain builder
(libxenguest), which in Xen loads a kernel image into the new domain's
memory; here the hypervisor writes the boot frames and names the kernel the
domain's process will run.
"""

import os
import time
from pathlib import Path
from typing import Any

from construct import Bytes, Int16ul, Int32ul, Int64ul, Padding, Struct

from xenlike.abi.domctl import (
    XEN_DOMCTL_INTERFACE_VERSION,
    DomctlOp,
    XEN_DOMINF_blocked,
    XEN_DOMINF_dying,
    XEN_DOMINF_paused,
    XEN_DOMINF_running,
    XEN_DOMINF_shutdown,
    XEN_DOMINF_shutdownshift,
    xen_domctl,
    xen_domctl_createdomain,
    xen_domctl_getdomaininfo,
    xen_domctl_max_mem,
)
from xenlike.abi.errno import Errno
from xenlike.abi.sysctl import (
    XEN_SYSCTL_INTERFACE_VERSION,
    SysctlOp,
    XEN_SYSCTL_PHYSCAP_gnttab_v1,
    XEN_SYSCTL_PHYSCAP_pv,
    xen_sysctl,
    xen_sysctl_getdomaininfolist,
    xen_sysctl_physinfo,
)
from xenlike.abi.xen import DOMID_FIRST_RESERVED, Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import HypercallError
from xenlike.hypervisor.core import DomainState, HypervisorDomain
from xenlike.hypervisor.memory_op import tot_pages
from xenlike.hypervisor.table import Call, hypercall
from xenlike.memory import XEN_PAGE_SIZE

__all__ = [
    "XENLIKE_DOMCTL_build",
    "XENLIKE_SYSCTL_usage",
    "domain_info",
    "xenlike_domctl_build",
    "xenlike_usage",
]

XENLIKE_DOMCTL_build = 0x1000  # xenlike's own command, far from Xen's numbers

xenlike_domctl_build = Struct(
    "domain" / Int16ul,
    Padding(2),
    "store_evtchn" / Int32ul,  # start_info.store_evtchn, allocated by the toolstack
    "console_evtchn" / Int32ul,  # start_info.console.domU.evtchn
    "nr_pages" / Int32ul,  # pages populated at boot (the target); 0: max_pages, all of it
    "kernel" / Bytes(256),  # "package.module:function", NUL-padded
    "cmd_line" / Bytes(1024),  # start_info.cmd_line (xl.cfg's `extra`)
)

# xenlike's own sysctl, as far from Xen's numbers: every domain's metering since its
# creation. It takes getdomaininfolist's arguments (first_domain, max_domains), and
# its records follow the xen_sysctl struct in the reply as getdomaininfolist's do.
XENLIKE_SYSCTL_usage = 0x1001
xenlike_usage = Struct(
    "domain" / Int16ul,
    Padding(6),
    "cpu_time" / Int64ul,  # ns of CPU its process used (user + system)
    "memory_kib_seconds" / Int64ul,  # tot_pages integrated over its life, KiB x s
    "uptime_ms" / Int64ul,  # since XEN_DOMCTL_createdomain
)

CREATE = compile_struct(xen_domctl_createdomain, "xen_domctl_createdomain")
INFO = compile_struct(xen_domctl_getdomaininfo, "xen_domctl_getdomaininfo")
MAX_MEM = compile_struct(xen_domctl_max_mem, "xen_domctl_max_mem")
PHYSINFO = compile_struct(xen_sysctl_physinfo, "xen_sysctl_physinfo")
INFOLIST = compile_struct(xen_sysctl_getdomaininfolist, "xen_sysctl_getdomaininfolist")
SYSCTL = compile_struct(xen_sysctl, "xen_sysctl")
USAGE = compile_struct(xenlike_usage, "xenlike_usage")
MAX_INFOLIST = 512  # getdomaininfo records one reply carries
MAX_GUEST_PAGES = 4 * 1024 * 1024 // 4  # 4 GiB: more than a process here should map


def _union(record: Any, codec: Any) -> Any:
    return codec.unpack(record.u[: codec.size])


def _with_union(record: Any, codec: Any, value: Any) -> Any:
    return record._replace(u=codec.pack(value).ljust(128, b"\0"))


def _domctl(call: Call, arg: Any) -> HypervisorDomain:
    if arg.interface_version != XEN_DOMCTL_INTERFACE_VERSION:
        raise HypercallError(
            Errno.EACCES,
            f"domctl interface version {arg.interface_version:#x},"
            f" expected {XEN_DOMCTL_INTERFACE_VERSION:#x}",
        )
    return call.hv.lookup(arg.domain)


def domctl(cmd: int) -> Any:
    return hypercall(Hypercall.domctl, cmd, args=xen_domctl, privileged=True)


@domctl(DomctlOp.createdomain)
def createdomain(call: Call, arg: Any) -> tuple[int, Any]:
    if arg.interface_version != XEN_DOMCTL_INTERFACE_VERSION:
        raise HypercallError(Errno.EACCES, "domctl interface version mismatch")
    config = _union(arg, CREATE)
    if config.max_vcpus != 1:
        raise HypercallError(Errno.EINVAL, f"max_vcpus {config.max_vcpus}: each domain has one")
    wanted = arg.domain if 0 < arg.domain < DOMID_FIRST_RESERVED else None
    domain = call.hv.create_domain(domid=wanted, handle=config.handle)
    return 0, arg._replace(domain=domain.domid)


@domctl(DomctlOp.destroydomain)
def destroydomain(call: Call, arg: Any) -> int:
    call.hv.destroy(_domctl(call, arg))
    return 0


@domctl(DomctlOp.pausedomain)
def pausedomain(call: Call, arg: Any) -> int:
    """As Xen's domain_pause_by_systemcontroller, Dom0 does not pause itself: its
    tools would stop with it, and nothing would be left to unpause it."""
    domain = _domctl(call, arg)
    if domain.privileged:
        raise HypercallError(Errno.EINVAL, f"{domain} cannot pause itself")
    call.hv.pause(domain)
    return 0


@domctl(DomctlOp.unpausedomain)
def unpausedomain(call: Call, arg: Any) -> int:
    call.hv.unpause(_domctl(call, arg))
    return 0


@domctl(DomctlOp.max_mem)
def max_mem(call: Call, arg: Any) -> int:
    domain = _domctl(call, arg)
    pages = _union(arg, MAX_MEM).max_memkb * 1024 // XEN_PAGE_SIZE
    if not 0 < pages <= MAX_GUEST_PAGES:
        raise HypercallError(Errno.EINVAL, f"max_mem of {pages} pages")
    # As Xen: no check against tot_pages, so a ballooning domain may be
    # ratcheted down; while it holds more, it gets no new frames. The memfd
    # keeps the size it was built with.
    domain.max_pages = pages
    return 0


def _blocked(domain: HypervisorDomain) -> bool:
    """Whether the domain's vCPU (its process) waits for an event rather than runs, as
    Xen's `blocked` flag says: the process sleeps (/proc/PID/stat state S or D)."""
    if domain.process is None or domain.process.returncode is not None:
        return False
    try:
        stat = Path(f"/proc/{domain.process.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("S", "D")


def domain_info(domain: HypervisorDomain) -> Any:
    """A domain as xen_domctl_getdomaininfo describes it (what `xl list` shows)."""
    flags = 0
    if domain.state is DomainState.running:
        flags |= XEN_DOMINF_blocked if _blocked(domain) else XEN_DOMINF_running
    elif domain.state in (DomainState.paused, DomainState.created):
        flags |= XEN_DOMINF_paused
    elif domain.state is DomainState.dying:
        flags |= XEN_DOMINF_dying
    if domain.shutdown_reason is not None and domain.state is DomainState.shutdown:
        flags |= XEN_DOMINF_shutdown | domain.shutdown_reason << XEN_DOMINF_shutdownshift
    layout = domain.layout
    return INFO.record(
        domain=domain.domid,
        flags=flags,
        tot_pages=tot_pages(domain),
        max_pages=domain.max_pages,
        shared_info_frame=layout.shared_info_gfn if layout else 0,
        cpu_time=domain.cpu_time_ns(),
        nr_online_vcpus=1,
        max_vcpu_id=0,
        handle=domain.handle,
    )


@domctl(DomctlOp.getdomaininfo)
def getdomaininfo(call: Call, arg: Any) -> tuple[int, Any]:
    """As in Xen: the first domain whose id is at least the one asked for."""
    if arg.interface_version != XEN_DOMCTL_INTERFACE_VERSION:
        raise HypercallError(Errno.EACCES, "domctl interface version mismatch")
    candidates = sorted(d for d in call.hv.domains if d >= arg.domain)
    if not candidates:
        raise HypercallError(Errno.ESRCH, f"no domain at or above {arg.domain}")
    info = domain_info(call.hv.domains[candidates[0]])
    return 0, _with_union(arg._replace(domain=info.domain), INFO, info)


@hypercall(
    Hypercall.domctl,
    XENLIKE_DOMCTL_build,
    args=xenlike_domctl_build,
    privileged=True,
    name="xenlike_build",
)
def build(call: Call, arg: Any) -> int:
    domain = call.hv.lookup(arg.domain)
    call.hv.build_domain(
        domain,
        _cstring(arg.kernel),
        cmdline=_cstring(arg.cmd_line),
        store_evtchn=arg.store_evtchn,
        console_evtchn=arg.console_evtchn,
        nr_pages=arg.nr_pages,
    )
    call.hv.start_held(domain)
    return 0


def _cstring(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def sysctl(cmd: int) -> Any:
    return hypercall(Hypercall.sysctl, cmd, args=xen_sysctl, privileged=True)


def _sysctl(arg: Any) -> None:
    if arg.interface_version != XEN_SYSCTL_INTERFACE_VERSION:
        raise HypercallError(Errno.EACCES, f"sysctl interface version {arg.interface_version:#x}")


@sysctl(SysctlOp.getdomaininfolist)
def getdomaininfolist(call: Call, arg: Any) -> tuple[int, bytes]:
    """The records follow the xen_sysctl struct in the reply (Xen's guest buffer)."""
    _sysctl(arg)
    query = _union(arg, INFOLIST)
    wanted = min(query.max_domains, MAX_INFOLIST)
    ids = sorted(d for d in call.hv.domains if d >= query.first_domain)[:wanted]
    records = b"".join(INFO.pack(domain_info(call.hv.domains[d])) for d in ids)
    head = _with_union(arg, INFOLIST, query._replace(num_domains=len(ids)))
    return len(ids), SYSCTL.pack(head) + records


@hypercall(
    Hypercall.sysctl, XENLIKE_SYSCTL_usage, args=xen_sysctl, privileged=True, name="xenlike_usage"
)
def usage(call: Call, arg: Any) -> tuple[int, bytes]:
    """Every domain's metering since its creation (`xenlike usage`), in
    getdomaininfolist's shape: CPU time, memory integrated over time, uptime."""
    _sysctl(arg)
    query = _union(arg, INFOLIST)
    wanted = min(query.max_domains, MAX_INFOLIST)
    ids = sorted(d for d in call.hv.domains if d >= query.first_domain)[:wanted]
    now = time.monotonic()
    records = b"".join(
        USAGE.pack(
            USAGE.record(
                domain=domain.domid,
                cpu_time=domain.cpu_time_ns(),
                memory_kib_seconds=int(domain.meter_memory()),
                uptime_ms=int((now - domain.created_at) * 1000),
            )
        )
        for domain in (call.hv.domains[d] for d in ids)
    )
    head = _with_union(arg, INFOLIST, query._replace(num_domains=len(ids)))
    return len(ids), SYSCTL.pack(head) + records


@sysctl(SysctlOp.physinfo)
def physinfo(call: Call, arg: Any) -> tuple[int, Any]:
    """The host's CPUs as Linux counts them, and its memory pool (`[host] memory`)."""
    _sysctl(arg)
    cpus = os.cpu_count() or 1
    info = PHYSINFO.record(
        threads_per_core=1,
        cores_per_socket=cpus,
        nr_cpus=cpus,
        max_cpu_id=cpus - 1,
        nr_nodes=1,
        max_node_id=0,
        cpu_khz=_cpu_khz(),
        capabilities=XEN_SYSCTL_PHYSCAP_pv | XEN_SYSCTL_PHYSCAP_gnttab_v1,
        total_pages=call.hv.total_pages,
        free_pages=call.hv.free_pages(),
        max_mfn=call.hv.total_pages - 1,
    )
    return 0, _with_union(arg, PHYSINFO, info)


def _cpu_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 0
