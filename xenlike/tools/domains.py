"""What `xl list`, `xl info`, `xl uptime` and `xenlike usage` show, gathered and formatted.

The CLI's domain commands are thin: they call these and print. Formats are
xl's own (tools/xl/xl_info.c): `list` prints list_domains' printf, `info`
pads each key as maybe_printf's callers do, `uptime` is uptime_to_string.
"""

import os
import platform
from typing import Any

from xenlike.abi.domctl import (
    XEN_DOMINF_blocked,
    XEN_DOMINF_dying,
    XEN_DOMINF_paused,
    XEN_DOMINF_running,
    XEN_DOMINF_shutdown,
    XEN_DOMINF_shutdownshift,
)
from xenlike.abi.sysctl import (
    XEN_SYSCTL_PHYSCAP_directio,
    XEN_SYSCTL_PHYSCAP_gnttab_v1,
    XEN_SYSCTL_PHYSCAP_gnttab_v2,
    XEN_SYSCTL_PHYSCAP_hap,
    XEN_SYSCTL_PHYSCAP_hvm,
    XEN_SYSCTL_PHYSCAP_pv,
    XEN_SYSCTL_PHYSCAP_shadow,
    xen_sysctl_getdomaininfolist,
)
from xenlike.abi.version import XenVerOp
from xenlike.abi.xen import Hypercall
from xenlike.domain.hypercall import codec_for
from xenlike.hypervisor.control import USAGE, XENLIKE_SYSCTL_usage
from xenlike.rundir import RunDir
from xenlike.tools.session import NoSuchDomain, ToolstackRefused

__all__ = [
    "LIST_HEADER",
    "USAGE_COLUMNS",
    "domain_rows",
    "find_domain",
    "format_usage",
    "libxl_config",
    "long_listing",
    "usage_rows",
    "UPTIME_HEADER",
    "format_info",
    "format_list_row",
    "format_uptime_row",
    "host_info",
    "list_letters",
    "uptime_to_string",
    "usage_records",
]

# xl list's header and row (tools/xl/xl_info.c, list_domains).
LIST_HEADER = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
SHUTDOWN_REASON_LETTERS = "-rscwS"  # by SHUTDOWN_* reason: poweroff reboot suspend crash ...
UPTIME_HEADER = f"{'Name':<33} {'ID':>4} Uptime"
INFO_KEY_WIDTH = 23  # "nr_cpus                : 2"


def list_letters(flags: int) -> str:
    """xl list's State column: r b p s, the shutdown reason's letter, d."""
    shutdown = bool(flags & XEN_DOMINF_shutdown)
    reason = flags >> XEN_DOMINF_shutdownshift & 0xFF if shutdown else 0
    return "".join(
        [
            "r" if flags & XEN_DOMINF_running else "-",
            "b" if flags & XEN_DOMINF_blocked else "-",
            "p" if flags & XEN_DOMINF_paused else "-",
            "s" if shutdown else "-",
            SHUTDOWN_REASON_LETTERS[reason] if reason < len(SHUTDOWN_REASON_LETTERS) else "?",
            "d" if flags & XEN_DOMINF_dying else "-",
        ]
    )


def format_list_row(row: dict[str, Any]) -> str:
    """printf("%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f", ...), as xl list."""
    return (
        f"{row['name']:<40} {row['id']:>5} {row['mem']:>5} {row['vcpus']:>5}     "
        f"{row['state']}  {row['time']:>8.1f}"
    )


def uptime_to_string(seconds: int, short: bool = False) -> str:
    """xl's uptime_to_string: "1 day,  2:03:04", "3 days,  0:00:09", " 0:05:01"."""
    day, rest = divmod(int(seconds), 86400)
    hour, rest = divmod(rest, 3600)
    minute, sec = divmod(rest, 60)
    clock = f"{hour:2d}:{minute:02d}" if short else f"{hour:2d}:{minute:02d}:{sec:02d}"
    if day > 1:
        return f"{day} days, {clock}"
    if day == 1:
        return f"{day} day, {clock}"
    return clock


def format_uptime_row(name: str, domid: int, seconds: int) -> str:
    """printf("%-33s %4d %s\\n", domname, domid, uptime_str), as xl uptime."""
    return f"{name:<33} {domid:>4} {uptime_to_string(seconds)}"


async def usage_records(xc: Any) -> dict[int, Any]:
    """Every domain's metering record (XENLIKE_SYSCTL_usage), by domid."""
    query = codec_for(xen_sysctl_getdomaininfolist).record(first_domain=0, max_domains=512)
    count, _, records = await xc.hypercalls.sysctl(
        XENLIKE_SYSCTL_usage, xen_sysctl_getdomaininfolist, query
    )
    found = (USAGE.unpack_from(records, i * USAGE.size) for i in range(count))
    return {record.domain: record for record in found}


_VIRT_CAPS = (
    (XEN_SYSCTL_PHYSCAP_pv, "pv"),
    (XEN_SYSCTL_PHYSCAP_hvm, "hvm"),
    (XEN_SYSCTL_PHYSCAP_directio, "pv_directio"),
    (XEN_SYSCTL_PHYSCAP_hap, "hap"),
    (XEN_SYSCTL_PHYSCAP_shadow, "shadow"),
    (XEN_SYSCTL_PHYSCAP_gnttab_v1, "gnttab-v1"),
    (XEN_SYSCTL_PHYSCAP_gnttab_v2, "gnttab-v2"),
)


async def host_info(rd: RunDir) -> dict[str, Any]:
    """xl info's fields that apply here, in its order, with xl's units (memory in
    MiB, from XEN_SYSCTL_physinfo), and what confines each DomU's process."""
    from xenlike.sandbox import logged_protections
    from xenlike.xc import XenControl

    async with XenControl.connect(rd.path) as xc:
        phys = await xc.physinfo()
        calls = xc.hypercalls
        version = (await calls.call(Hypercall.xen_version, XenVerOp.version)).result
        extra = (await calls.call(Hypercall.xen_version, XenVerOp.extraversion)).payload
        caps = (await calls.call(Hypercall.xen_version, XenVerOp.capabilities)).payload
        pagesize = (await calls.call(Hypercall.xen_version, XenVerOp.pagesize)).result
        log = await xc.dmesg()
        domids = {info.domain for info in await xc.list_domains()}
    uname = os.uname()
    pages_per_mib = (1 << 20) // pagesize
    major, minor = version >> 16, version & 0xFFFF
    extra_text = extra.split(b"\0", 1)[0].decode()
    protections = {
        domid: str(found)
        for domid, found in sorted(logged_protections(log).items())
        if domid and domid in domids
    }
    return {
        "host": uname.nodename,
        "release": uname.release,
        "version": uname.version,
        "machine": uname.machine,
        "nr_cpus": phys.nr_cpus,
        "max_cpu_id": phys.max_cpu_id,
        "nr_nodes": phys.nr_nodes,
        "cores_per_socket": phys.cores_per_socket,
        "threads_per_core": phys.threads_per_core,
        "cpu_mhz": f"{phys.cpu_khz // 1000}.{phys.cpu_khz % 1000:03d}",
        "virt_caps": "".join(f" {name}" for bit, name in _VIRT_CAPS if phys.capabilities & bit),
        "total_memory": phys.total_pages // pages_per_mib,
        "free_memory": phys.free_pages // pages_per_mib,
        "xen_major": major,
        "xen_minor": minor,
        "xen_extra": extra_text,
        "xen_version": f"{major}.{minor}{extra_text}",
        "xen_caps": caps.split(b"\0", 1)[0].decode(),
        "xen_pagesize": pagesize,
        "cc_compiler": f"{platform.python_implementation()} {platform.python_version()}",
        "xend_config_format": 4,
        "domu_protections": protections,
    }


def format_info(info: dict[str, Any]) -> str:
    """xl info's lines: each key padded to 23 columns, then ": value" (virt_caps
    carries its own leading spaces, as xl prints it); the protections one line a
    domain."""
    lines = []
    for key, value in info.items():
        if key == "domu_protections":
            for domid, text in value.items():
                lines.append(f"{f'd{domid}_protections':<{INFO_KEY_WIDTH}}: {text}")
        elif key == "virt_caps":
            lines.append(f"{key:<{INFO_KEY_WIDTH}}:{value}")
        else:
            lines.append(f"{key:<{INFO_KEY_WIDTH}}: {value}")
    return "\n".join(lines)


async def domain_names(xs: Any, domids: list[int]) -> dict[int, str]:
    """Each domain's name as XenStore has it (Domain-0 for 0, dN when it has none)."""
    names = {0: "Domain-0"}
    for domid in domids:
        if domid:
            names[domid] = await xs.read_optional(f"/local/domain/{domid}/name") or f"d{domid}"
    return names


async def find_domain(rd: RunDir, name: str) -> int:
    """xl's find_domain: a domid as it is, or the domain that has the name; NoSuchDomain
    when none does."""
    from xenlike.xc import XenControl
    from xenlike.xenstore import open_client

    async with XenControl.connect(rd.path) as xc:
        domids = [info.domain for info in await xc.list_domains()]
    if name.isdigit():
        if int(name) in domids:
            return int(name)
        raise NoSuchDomain(f"domain {name} does not exist")
    async with open_client(rd.xenstored_socket) as xs:
        names = await domain_names(xs, domids)
    found = [domid for domid, known in names.items() if known == name]
    if not found:
        raise NoSuchDomain(f"domain {name!r} does not exist")
    return found[0]


async def domain_rows(rd: RunDir, only: int | None = None) -> list[dict[str, Any]]:
    """xl list's rows (name, id, mem in MiB, vcpus, state letters, CPU seconds), by domid;
    of domain `only`, if given."""
    from xenlike.xc import XenControl
    from xenlike.xenstore import open_client

    async with XenControl.connect(rd.path) as xc:
        infos = await xc.list_domains()
    infos = [i for i in infos if only is None or i.domain == only]
    async with open_client(rd.xenstored_socket) as xs:
        names = await domain_names(xs, [i.domain for i in infos])
    return [
        {
            "name": names[i.domain],
            "id": i.domain,
            "mem": i.tot_pages * 4 // 1024,
            "maxmem": i.max_pages * 4 // 1024,
            "vcpus": i.nr_online_vcpus,
            "state": list_letters(i.flags),
            "time": round(i.cpu_time / 1e9, 1),
        }
        for i in infos
    ]


async def long_listing(rd: RunDir, only: int | None = None) -> list[dict[str, Any]]:
    """`xl list -l`: each guest's configuration as libxl_domain_config's JSON under
    "domid" and "config" (Dom0 has no stored configuration, as in xl)."""
    from xenlike.tools.session import toolstack_request

    rows = await domain_rows(rd, only)
    found = []
    for row in rows:
        if row["id"] == 0:
            continue
        try:
            answer = await toolstack_request(rd, {"op": "config", "name": str(row["id"])})
        except ToolstackRefused:
            continue  # gone meanwhile
        found.append({"domid": row["id"], "config": libxl_config(answer, row)})
    return found


def libxl_config(answer: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The toolstack's record of a guest in libxl_domain_config's shape and key names
    (libxl_types.idl), with the domain's state beside it."""
    config = answer["config"]
    return {
        "c_info": {"type": "pv", "name": row["name"], "uuid": answer["uuid"]},
        "b_info": {
            "max_vcpus": config["vcpus"],
            "avail_vcpus": list(range(config["vcpus"])),
            "max_memkb": row["maxmem"] * 1024,
            "target_memkb": config["memory"] * 1024,
            "kernel": config["kernel"],
            "cmdline": config["extra"],
            "type.pv": {"init": config["init"]},
        },
        "disks": [
            {
                "backend_domid": int(disk["backend"]),
                "pdev_path": disk["target"],
                "vdev": disk["vdev"],
                "format": disk["format"],
                "readwrite": int(disk["access"] == "rw"),
                "is_cdrom": int(disk["devtype"] == "cdrom"),
                "discard_enable": "True" if disk["discard"] else "False",
            }
            for disk in config["disks"]
        ],
        "nics": [
            {
                "backend_domid": int(vif["backend"]),
                "devid": index,
                "mac": vif["mac"],
                "ip": vif["ip"],
                "bridge": vif["bridge"],
                "ifname": vif["vifname"],
                "nictype": "vif",
            }
            for index, vif in enumerate(config["vifs"])
        ],
        "on_poweroff": config["on_poweroff"],
        "on_reboot": config["on_reboot"],
        "on_crash": config["on_crash"],
        "state": {"letters": row["state"], "mem": row["mem"], "cpu_time": row["time"]},
    }


async def usage_rows(rd: RunDir) -> list[dict[str, Any]]:
    """Each domain's metering since its creation: CPU seconds, memory MiB-seconds,
    uptime, and its devices' block and network counters (what the back ends publish
    under statistics/, as `top` reads them; sectors are 512 bytes)."""
    from xenlike.tools.top import device_counters
    from xenlike.xc import XenControl
    from xenlike.xenstore import open_client

    async with XenControl.connect(rd.path) as xc:
        records = await usage_records(xc)
    async with open_client(rd.xenstored_socket) as xs:
        names = await domain_names(xs, list(records))
        counters = {domid: await device_counters(xs, domid) for domid in records}
    return [
        {
            "name": names[domid],
            "domid": domid,
            "uptime_s": round(record.uptime_ms / 1000, 1),
            "cpu_s": round(record.cpu_time / 1e9, 2),
            "mem_mib_s": round(record.memory_kib_seconds / 1024, 1),
            **counters[domid],
            "rd_kib": counters[domid]["rd_sect"] // 2,
            "wr_kib": counters[domid]["wr_sect"] // 2,
            "tx_kib": counters[domid]["tx_bytes"] // 1024,
            "rx_kib": counters[domid]["rx_bytes"] // 1024,
        }
        for domid, record in sorted(records.items())
    ]


USAGE_COLUMNS = (  # header, key, width, format
    ("Name", "name", 12, "{}"),
    ("ID", "domid", 4, "{}"),
    ("Uptime(s)", "uptime_s", 9, "{:.0f}"),
    ("CPU(s)", "cpu_s", 7, "{:.2f}"),
    ("Mem(MiB*s)", "mem_mib_s", 10, "{:.0f}"),
    ("RD_REQ", "rd_req", 6, "{}"),
    ("RD(KiB)", "rd_kib", 7, "{}"),
    ("WR_REQ", "wr_req", 6, "{}"),
    ("WR(KiB)", "wr_kib", 7, "{}"),
    ("TX(pk)", "tx_packets", 6, "{}"),
    ("TX(KiB)", "tx_kib", 7, "{}"),
    ("RX(pk)", "rx_packets", 6, "{}"),
    ("RX(KiB)", "rx_kib", 7, "{}"),
)


def format_usage(rows: list[dict[str, Any]]) -> str:
    """A header, then one line a domain."""
    lines = [
        " ".join(
            f"{header:<{width}}" if i == 0 else f"{header:>{width}}"
            for i, (header, _, width, _) in enumerate(USAGE_COLUMNS)
        )
    ]
    for row in rows:
        lines.append(
            " ".join(
                f"{fmt.format(row[key]):<{width}}" if i == 0 else f"{fmt.format(row[key]):>{width}}"
                for i, (_, key, width, fmt) in enumerate(USAGE_COLUMNS)
            )
        )
    return "\n".join(lines)
