"""Topology files: the host, Dom0 and its hardware, and the guests, in TOML.

Guest keys follow xl.cfg (`name`, `memory`, `vcpus`, `kernel`, `on_crash`,
`extra` ...) and device lines use xl's own spec strings, parsed as
xl-disk-configuration(5) and xl-network-configuration(5) define them::

    [host]
    name = "demo"
    memory = 1024                      # MiB the domains draw from (the default)
    local = "10.99.0.1"                # with nic = "vxlan:VNI": this host's tunnel end
    peers = ["10.99.0.2"]              # ... and the other hosts' (docs/multihost.md)
    images = "/srv/xenlike-images"     # Dom0's images, shared by hosts (default: run dir)

    [dom0]
    memory = 128
    nic = "none"                       # none | tap:NAME | pcap:FILE | vxlan:VNI
    images = { "web.img" = "64M" }     # disk images Dom0 owns, created sparse

    [[domain]]
    name = "web"
    memory = 32
    init = "myapp.guest:main"
    disk = ["format=raw, vdev=xvda, access=rw, target=web.img"]
    vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0, ip=10.0.0.2/24"]

Every mistake is reported with the file, the line and what would be right,
all of them at once, and nothing starts.
"""

import importlib.util
import ipaddress
import os
import re
import sys
import tomllib
import zlib
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "DEFAULT_GUEST_KERNEL",
    "DOMAIN_NAME",
    "DiskSpec",
    "DomainConfig",
    "Dom0Config",
    "Problem",
    "Topology",
    "TopologyError",
    "VifSpec",
    "default_topology",
    "load_topology",
    "module_problem",
    "parse_disk_spec",
    "parse_domain_file",
    "parse_size",
    "parse_topology",
    "parse_vif_spec",
    "vdev_number",
]

DEFAULT_GUEST_KERNEL = "domains.guest:main"
DOMAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"  # a guest's name (xl.cfg `name`)
ON_ACTIONS = (
    "destroy",
    "restart",
    "preserve",
    "rename-restart",
    "coredump-destroy",
    "coredump-restart",
    "soft-reset",
)
SUPPORTED_ON_ACTIONS = ("destroy", "restart", "preserve")
XEN_OUI = "00:16:3e"
HOST_MEMORY = 1024
MAX_DOMAIN_MEMORY = 4096  # MiB: a domain's memfd is mapped whole by the hypervisor
"""MiB in the host's memory pool without `[host] memory`: the default topology (Dom0's
128 and two 32 MiB guests) fits with room for several more guests."""


@attrs.frozen
class Problem:
    """One mistake in a topology file, with where it is and what would be right."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


class TopologyError(ValueError):
    """The topology file has mistakes; `problems` lists every one of them."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@attrs.frozen
class DiskSpec:
    """One `disk = [...]` entry (xl-disk-configuration)."""

    target: str
    vdev: str
    devid: int  # the virtual device number, e.g. 51712 for xvda
    format: str = "raw"
    access: str = "rw"  # "rw" or "ro"
    devtype: str = "disk"  # "disk" or "cdrom"
    backend: str = "0"
    discard: bool = True

    @property
    def readonly(self) -> bool:
        return self.access == "ro"


@attrs.frozen
class VifSpec:
    """One `vif = [...]` entry (xl-network-configuration)."""

    mac: str
    bridge: str = "xenbr0"
    ip: str | None = None  # "10.0.0.2/24"
    vifname: str | None = None
    backend: str = "0"
    mtu: int | None = None  # written as the vif's `mtu` key, front and back (netif.h)


@attrs.frozen
class DomainConfig:
    """A guest, with xl.cfg's keys."""

    name: str
    memory: int  # MiB at boot (xl.cfg's `memory`, the balloon's first target)
    vcpus: int = 1
    kernel: str = DEFAULT_GUEST_KERNEL
    init: str | None = None
    extra: str = ""
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    devices: tuple[dict[str, Any], ...] = ()  # custom PV devices: {type = "...", ...}
    maxmem: int | None = None  # MiB it may balloon up to (xl.cfg's `maxmem`); None: `memory`

    @property
    def max_memory(self) -> int:
        """MiB the domain's memory is sized for: maxmem, or memory without one."""
        return self.maxmem if self.maxmem is not None else self.memory


@attrs.frozen
class Dom0Config:
    memory: int = 128
    nic: str = "none"  # none | tap:NAME | pcap:FILE | vxlan:VNI
    images: dict[str, int] = attrs.field(factory=dict)  # file name -> size in bytes


@attrs.frozen
class Topology:
    name: str
    dom0: Dom0Config
    domains: tuple[DomainConfig, ...]
    source: Path | None = None  # the file it came from
    memory: int = HOST_MEMORY  # MiB of the host's memory pool ([host] memory)
    local: str | None = None  # this host's VXLAN endpoint address ([host] local)
    peers: tuple[str, ...] = ()  # the other hosts' endpoint addresses ([host] peers)

    @property
    def vni(self) -> int | None:
        """The VXLAN segment xenbr0's uplink joins (`nic = "vxlan:VNI"`), if any."""
        mode, _, argument = self.dom0.nic.partition(":")
        return int(argument) if mode == "vxlan" else None

    images: Path | None = None  # the images directory hosts share ([host] images)

    def image_path(self, name: str, run_dir: Path) -> Path:
        """Where Dom0 keeps image (or pcap file) `name`: in the images directory
        (`[host] images`, which hosts that migrate guests share), by default the run
        directory, and only there. A name that reaches out of it (absolute, `..`,
        or a symlink in the way) is ValueError: only Dom0 owns the hardware, and no
        topology or guest can make it open a host file."""
        problem = file_name_problem(name)
        if problem:
            raise ValueError(f"{name!r}: {problem}")
        base = Path(self.images if self.images is not None else run_dir).resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base):
            where = "images" if self.images is not None else "run"
            raise ValueError(f"{name!r} leads out of the {where} directory {base} (a symlink)")
        return path


# --- sizes, disks, vifs -------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
SECTOR_SIZE = 512
MAX_IMAGE_SIZE = 1 << 42  # 4 TiB: sparse, but a host file system still has to hold it
_TAP_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")  # IFNAMSIZ - 1
MAX_VNI = (1 << 24) - 1  # a VXLAN Network Identifier has 24 bits (RFC 7348)


def file_name_problem(name: Any) -> str | None:
    """Why `name` cannot name a file of Dom0's in the run directory (None if it can):
    a relative path of plain names, no `..`, nothing absolute."""
    if not isinstance(name, str) or not name or "\0" in name:
        return "expected a file name"
    if name.startswith("/") or name.startswith("~"):
        return "an absolute path; images and captures live in the run directory"
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return (
            "'..', '.' and empty parts are not allowed; images and captures live in "
            "the run directory"
        )
    return None


def image_size_problem(size: int) -> str | None:
    """Why `size` bytes cannot be a disk image (None if it can)."""
    if size <= 0 or size % SECTOR_SIZE:
        return f"{size} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"
    if size > MAX_IMAGE_SIZE:
        return f"{size} bytes is more than the {MAX_IMAGE_SIZE >> 40} TiB an image may have"
    return None


def parse_size(text: str | int) -> int:
    """ "64M", "1G", "512K", "4096" -> bytes (binary units, as xl's `maxmem` etc.)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"size {text!r}: expected a number with an optional K, M, G or T")
    number, unit = int(match.group(1)), (match.group(2) or "B")[0].upper()
    return number * {"B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]


def vdev_number(vdev: str) -> int:
    """The virtual device number of a vdev name (docs/misc/vbd-interface.txt).

    xvda is 51712 (202 << 8), xvdb 51728; disks past 15, and every name the
    short forms cannot hold, use the extended form 1 << 28 | disk << 8 | part.
    """
    match = re.fullmatch(r"(xvd|hd|sd)([a-z]+)(\d*)", vdev)
    if not match:
        raise ValueError(f"vdev {vdev!r}: expected a name like xvda, xvdb1, hda or sda")
    kind, letters, part_text = match.groups()
    disk = 0
    for letter in letters:
        disk = disk * 26 + (ord(letter) - ord("a") + 1)
    disk -= 1
    part = int(part_text) if part_text else 0
    if kind == "hd":
        if disk > 3 or part > 63:
            raise ValueError(f"vdev {vdev!r}: IDE names stop at hdd63")
        major = 3 if disk < 2 else 22
        return major << 8 | (disk % 2) << 6 | part
    if disk < 16 and part < 16:
        return (202 if kind == "xvd" else 8) << 8 | disk << 4 | part
    if kind == "sd" or disk >= 1 << 20 or part > 255:
        raise ValueError(f"vdev {vdev!r}: beyond the numbering scheme")
    return 1 << 28 | disk << 8 | part


def _spec_items(spec: str) -> list[str]:
    return [item.strip() for item in spec.split(",")]


_DISK_KEYS = (
    "target",
    "format",
    "vdev",
    "access",
    "devtype",
    "backend",
    "backendtype",
    "script",
    "direct-io-safe",
    "discard",
    "no-discard",
    "trusted",
    "untrusted",
    "cdrom",
    "colo",
    "specification",
)
_DISK_POSITIONAL = ("target", "format", "vdev", "access")


# xl's disk keys and flags that have no meaning here, each with why: refused by name,
# never silently dropped.
_DISK_REFUSED = {
    "script": "no hotplug scripts run here: Dom0's block back end opens the image itself",
    "backendtype": "there is one block back end here (blkback over an image file)",
    "direct-io-safe": "the back end's I/O mode is not configurable here",
    "trusted": "front ends here do not take a trust hint from the toolstack",
    "untrusted": "front ends here do not take a trust hint from the toolstack",
    "colo": "COLO replication is not implemented",
    "specification": "only xl's own disk specification (xen) exists here",
}


def parse_disk_spec(spec: str) -> DiskSpec:
    """An xl disk spec: `key=value` words, or the positional `target,format,vdev,access`."""
    values: dict[str, str] = {}
    flags: set[str] = set()
    positional = 0
    items = _spec_items(spec)
    for index, item in enumerate(items):
        if "=" in item:
            key, _, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if key not in _DISK_KEYS:
                raise ValueError(
                    f"unknown disk key {key!r}; known: {', '.join(_DISK_KEYS[:6])} ..."
                )
            if key == "target" and index != len(items) - 1:
                raise ValueError("target= must come last (it may contain commas, as xl says)")
            if key in _DISK_REFUSED:
                raise ValueError(f"{key}={value}: not supported: {_DISK_REFUSED[key]}")
            values[key] = value
        elif item in _DISK_REFUSED:
            raise ValueError(f"{item}: not supported: {_DISK_REFUSED[item]}")
        elif item in ("discard", "no-discard", "cdrom"):
            flags.add(item)
        else:
            if positional >= len(_DISK_POSITIONAL):
                raise ValueError(f"disk spec {spec!r}: too many positional parameters")
            if item:
                values.setdefault(_DISK_POSITIONAL[positional], item)
            positional += 1
    target = values.get("target", "")
    if ":" in target.split("/", 1)[0] and not target.startswith("/"):  # legacy "phy:" / "file:"
        prefix, _, target = target.partition(":")
        if prefix not in ("file", "phy", "aio", "raw"):
            raise ValueError(f"target prefix {prefix!r}: only raw files are supported")
    if not target:
        raise ValueError("a disk needs target=IMAGE (a file in Dom0's images)")
    if "vdev" not in values:
        raise ValueError("a disk needs vdev= (e.g. vdev=xvda)")
    fmt = values.get("format", "raw")
    if fmt != "raw":
        raise ValueError(f"format={fmt}: only format=raw is supported")
    access = values.get("access", "rw")
    access = {"r": "ro", "ro": "ro", "w": "rw", "rw": "rw"}.get(access, access)
    if access not in ("ro", "rw"):
        raise ValueError(f"access={access}: expected ro or rw")
    devtype = "cdrom" if "cdrom" in flags else values.get("devtype", "disk")
    if devtype not in ("disk", "cdrom"):
        raise ValueError(f"devtype={devtype}: expected disk or cdrom")
    if devtype == "cdrom":
        access = "ro"
    return DiskSpec(
        target=target,
        vdev=values["vdev"],
        devid=vdev_number(values["vdev"]),
        format=fmt,
        access=access,
        devtype=devtype,
        backend=values.get("backend", "0"),
        discard="no-discard" not in flags,
    )


_VIF_KEYS = (
    "mac",
    "bridge",
    "ip",
    "vifname",
    "backend",
    "type",
    "model",
    "script",
    "rate",
    "gatewaydev",
    "mtu",
    "trusted",
    "untrusted",
)
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# xl's vif keys that have no meaning here, each with why: refused by name.
_VIF_REFUSED = {
    "rate": "no bandwidth limit is enforced here (netback's credit scheduler is not implemented)",
    "model": "emulated NIC models belong to HVM guests; a PV vif has none",
    "script": "no hotplug scripts run here: Dom0 joins the vif to its bridge itself",
    "gatewaydev": "it serves the vif-route and vif-nat scripts, which do not run here",
    "trusted": "front ends here do not take a trust hint from the toolstack",
    "untrusted": "front ends here do not take a trust hint from the toolstack",
}
MIN_MTU, MAX_MTU = 68, 9000  # Linux's ETH_MIN_MTU; jumbo frames at most


def parse_vif_spec(spec: str, *, default_mac: str) -> VifSpec:
    """An xl vif spec: comma-separated `key=value` words."""
    values: dict[str, str] = {}
    for item in _spec_items(spec):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _VIF_KEYS:
            raise ValueError(
                f"unknown vif setting {item!r}; known keys: {', '.join(_VIF_KEYS[:5])} ..."
            )
        if key in _VIF_REFUSED:
            raise ValueError(f"{key}={value.strip()}: not supported: {_VIF_REFUSED[key]}")
        values[key] = value.strip()
    mac = values.get("mac", default_mac).lower()
    if not _MAC.match(mac):
        raise ValueError(f"mac={mac}: expected six hex bytes like 00:16:3e:00:00:01")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"mac={mac}: a multicast address cannot name an interface")
    ip = values.get("ip")
    if ip is not None:
        try:
            ip = str(ipaddress.IPv4Interface(ip if "/" in ip else ip + "/24"))
        except ValueError:
            raise ValueError(f"ip={ip}: expected an IPv4 address like 10.0.0.2/24") from None
    if values.get("type", "vif") != "vif":
        raise ValueError(f"type={values['type']}: only PV vifs (type=vif) exist here")
    mtu = values.get("mtu")
    if mtu is not None and not (mtu.isdigit() and MIN_MTU <= int(mtu) <= MAX_MTU):
        raise ValueError(f"mtu={mtu}: a number of bytes from {MIN_MTU} to {MAX_MTU}")
    return VifSpec(
        mac=mac,
        bridge=values.get("bridge", "xenbr0"),
        ip=ip,
        vifname=values.get("vifname"),
        backend=values.get("backend", "0"),
        mtu=int(mtu) if mtu is not None else None,
    )


def default_mac(domain_name: str, index: int) -> str:
    """A stable MAC in Xen's OUI (00:16:3e), derived from the domain and vif index."""
    digest = zlib.crc32(f"{domain_name}/{index}".encode())
    return f"{XEN_OUI}:{digest >> 16 & 0x7F:02x}:{digest >> 8 & 0xFF:02x}:{digest & 0xFF:02x}"


# --- the file -------------------------------------------------------------------


class _Locator:
    """Finds the line of a key in the TOML text (tomllib keeps no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def top_level(self, key: str) -> int | None:
        """The line of `key = ...` before any table header."""
        for number, text in enumerate(self.lines, 1):
            if text.lstrip().startswith("["):
                return None
            if re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", text):
                return number
        return None

    def line(self, table: str, index: int | None, key: str | None) -> int | None:
        current, seen = "", -1
        header = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?")
        assignment = re.compile(r"^\s*\"?([A-Za-z0-9_\-]+)\"?\s*=")
        start = None
        for number, text in enumerate(self.lines, 1):
            match = header.match(text)
            if match:
                current = match.group(2).replace('"', "").strip()
                if current == table:
                    seen += 1
                    if index is None or seen == index:
                        start = number
                        if key is None:
                            return number
                continue
            if start is not None and current == table and (index is None or seen == index):
                key_match = assignment.match(text)
                if key_match and key_match.group(1) == key:
                    return number
        return start


def _check_kernel_name(value: Any) -> str | None:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        return "expected 'package.module:function'"
    return None


def module_problem(dotted: str) -> str | None:
    """Why the module of "package.module:NAME" cannot be imported here (None if it
    can be found): the domains import it with the same Python and PYTHONPATH."""
    module = dotted.partition(":")[0]
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", module):
        return f"{module!r} is not a module name"
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:  # domains run with `python -m`, which puts the working directory first
        sys.path.insert(0, cwd)
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:  # a parent package is missing
        return f"no module named {exc.name!r} (is it on PYTHONPATH?)"
    except (ImportError, ValueError) as exc:
        return f"module {module!r} cannot be imported: {exc}"
    finally:
        if added:
            sys.path.remove(cwd)
    if spec is None:
        return f"no module named {module!r} (is it on PYTHONPATH?)"
    return None


_DOMAIN_KEYS = {
    "name",
    "memory",
    "vcpus",
    "kernel",
    "init",
    "extra",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "disk",
    "vif",
    "devices",
    "maxmem",
    "type",
    "cmdline",
}
_DOM0_KEYS = {"memory", "nic", "images"}
_HOST_KEYS = {"name", "memory", "images", "local", "peers"}


def parse_topology(
    text: str, path: str = "<topology>", source: Path | None = None, *, check_imports: bool = False
) -> Topology:
    """Parse and check a topology; raise TopologyError listing every problem.

    With `check_imports`, every kernel, init and driver module must be
    importable too, so a typo is found before anything boots.
    """
    problems: list[Problem] = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise TopologyError(
            [Problem(path, int(line.group(1)) if line else None, f"not valid TOML: {exc}")]
        ) from None
    where = _Locator(text)

    def problem(table: str, index: int | None, key: str | None, message: str) -> None:
        problems.append(Problem(path, where.line(table, index, key), message))

    for key in data:
        if key not in ("host", "dom0", "domain"):
            problem(
                key, None, None, f"unknown section [{key}]; expected [host], [dom0], [[domain]]"
            )

    for section, kind in (("host", dict), ("dom0", dict)):
        if section in data and not isinstance(data[section], kind):
            problems.append(
                Problem(
                    path,
                    where.top_level(section),
                    f"{section} = {data[section]!r}: [{section}] is a table of keys",
                )
            )
            data[section] = {}
    host = data.get("host", {})
    for key in host:
        if key not in _HOST_KEYS:
            expected = ", ".join(sorted(_HOST_KEYS))
            problem("host", None, key, f"unknown key {key!r} in [host]; expected: {expected}")
    name = host.get("name", source.stem if source else "default")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        problem("host", None, "name", f"name = {name!r}: letters, digits, '.', '_' and '-' only")

    host_memory = host.get("memory", HOST_MEMORY)
    if not isinstance(host_memory, int) or not 64 <= host_memory <= 1 << 20:
        problem(
            "host",
            None,
            "memory",
            f"memory = {host_memory!r}: MiB as a whole number, 64 to 1048576",
        )

    shared_images = _images_directory(host.get("images"), problem)

    dom0_data = data.get("dom0", {})
    for key in dom0_data:
        if key not in _DOM0_KEYS:
            problem(
                "dom0",
                None,
                key,
                f"unknown key {key!r} in [dom0]; expected one of {', '.join(sorted(_DOM0_KEYS))}",
            )
    dom0_memory = dom0_data.get("memory", 128)
    if not isinstance(dom0_memory, int) or not 16 <= dom0_memory <= 4096:
        problem(
            "dom0", None, "memory", f"memory = {dom0_memory!r}: MiB as a whole number, 16 to 4096"
        )
    nic = dom0_data.get("nic", "none")
    if not isinstance(nic, str) or not (nic == "none" or re.fullmatch(r"(tap|pcap|vxlan):.+", nic)):
        problem(
            "dom0",
            None,
            "nic",
            f'nic = {nic!r}: expected "none", "tap:NAME", "pcap:FILE" or "vxlan:VNI"',
        )
    elif nic.startswith("vxlan:") and not (nic[6:].isdigit() and int(nic[6:]) <= MAX_VNI):
        problem(
            "dom0",
            None,
            "nic",
            f"nic = {nic!r}: a VXLAN segment is a number (VNI) from 0 to {MAX_VNI}",
        )
    elif nic.startswith("pcap:") and (message := file_name_problem(nic[5:])):
        problem("dom0", None, "nic", f"nic = {nic!r}: {message}")
    elif nic.startswith("tap:") and not _TAP_NAME.fullmatch(nic[4:]):
        problem(
            "dom0",
            None,
            "nic",
            f"nic = {nic!r}: an interface name of 1 to 15 letters, digits, '.', '_' or '-'",
        )
    local, peers = _tunnel_ends(host, isinstance(nic, str) and nic.startswith("vxlan:"), problem)
    images: dict[str, int] = {}
    raw_images = dom0_data.get("images", {})
    if not isinstance(raw_images, dict):
        problem(
            "dom0",
            None,
            "images",
            f"images = {raw_images!r}: a table of file name = size, "
            'e.g. images = { "web.img" = "64M" }',
        )
        raw_images = {}
    for image, size in raw_images.items():
        if message := file_name_problem(image):
            problem("dom0", None, "images", f"image {image!r}: {message}")
            continue
        try:
            images[image] = parse_size(size)
        except (ValueError, TypeError) as exc:
            problem("dom0", None, "images", f"image {image!r}: {exc}")
            continue
        if message := image_size_problem(images[image]):
            problem("dom0", None, "images", f"image {image!r} = {size!r}: {message}")

    domains: list[DomainConfig] = []
    raw_domains = data.get("domain", [])
    if not isinstance(raw_domains, list):
        problem("domain", None, None, "guests are [[domain]] tables (an array of tables)")
        raw_domains = []
    names: set[str] = set()
    for index, entry in enumerate(raw_domains):
        name_value = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name_value, str):
            if name_value in names:
                problem(
                    "domain",
                    index,
                    "name",
                    f"name = {name_value!r} is used twice; names are unique",
                )
            names.add(name_value)
        if not isinstance(entry, dict):
            problem("domain", index, None, "each [[domain]] is a table of xl.cfg keys")
            continue
        domain = _parse_domain(entry, index, images, problem, check_imports)
        if domain is not None:
            domains.append(domain)
    _check_across_domains(domains, problem)
    if isinstance(dom0_memory, int) and isinstance(host_memory, int):
        pool = dom0_memory + sum(d.memory for d in domains)
        if pool > host_memory:
            problem(
                "host",
                None,
                "memory",
                f"Dom0 and the guests boot with {pool} MiB; the host's pool has {host_memory} MiB"
                " ([host] memory)",
            )
    if isinstance(dom0_memory, int):
        total = dom0_memory + sum(d.memory for d in domains)
        host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
        if total > host:
            problem(
                "dom0",
                None,
                "memory",
                f"Dom0 and the guests ask for {total} MiB; this host has {host} MiB",
            )
    if problems:
        raise TopologyError(problems)
    dom0 = Dom0Config(memory=dom0_memory, nic=nic, images=images)
    memory = host_memory if isinstance(host_memory, int) else HOST_MEMORY
    return Topology(
        name=name,
        dom0=dom0,
        domains=tuple(domains),
        source=source,
        memory=memory,
        local=local,
        peers=peers,
        images=shared_images,
    )


def _tunnel_ends(
    host: dict[str, Any], vxlan: bool, problem: Any
) -> tuple[str | None, tuple[str, ...]]:
    """`[host] local` and `peers`: the VXLAN tunnel's ends, unicast addresses of one
    family, which only a `vxlan:VNI` NIC uses (and which it needs)."""
    if not vxlan:
        for key in ("local", "peers"):
            if key in host:
                problem("host", None, key, f'{key} = ...: only for [dom0] nic = "vxlan:VNI"')
        return None, ()
    raw_local, raw_peers = host.get("local"), host.get("peers")
    if raw_local is None or raw_peers is None:
        problem(
            "dom0",
            None,
            "nic",
            'a "vxlan:VNI" NIC joins hosts: [host] needs local = "ADDRESS" (this host\'s '
            'tunnel end) and peers = ["ADDRESS", ...] (the other hosts\')',
        )
        return None, ()
    local = _unicast(raw_local, "local", problem)
    if not isinstance(raw_peers, list) or not raw_peers:
        problem(
            "host", None, "peers", f"peers = {raw_peers!r}: a list of the other hosts' addresses"
        )
        return local, ()
    peers: list[str] = []
    for raw in raw_peers:
        peer = _unicast(raw, "peers", problem)
        if peer is None:
            continue
        if (
            local is not None
            and ipaddress.ip_address(peer).version != ipaddress.ip_address(local).version
        ):
            problem("host", None, "peers", f"peer {peer}: not of the family of local = {local!r}")
        elif peer == local:
            problem("host", None, "peers", f"peer {peer} is this host (local); list the others")
        elif peer in peers:
            problem("host", None, "peers", f"peer {peer} is listed twice")
        else:
            peers.append(peer)
    return local, tuple(peers)


def _unicast(value: Any, key: str, problem: Any) -> str | None:
    """A unicast IPv4 or IPv6 address as text, or None after saying what is wrong."""
    try:
        address = ipaddress.ip_address(value) if isinstance(value, str) else None
    except ValueError:
        address = None
    if address is None or address.is_multicast or address.is_unspecified:
        problem(
            "host",
            None,
            key,
            f"{key}: {value!r} is not a unicast IP address (like 10.99.0.1): VXLAN here "
            "replicates to each peer, without multicast",
        )
        return None
    return str(address)


def _images_directory(value: Any, problem: Any) -> Path | None:
    """`[host] images`: the directory of Dom0's images, an absolute path that exists.
    Hosts that migrate guests to each other name the same one (shared storage, as
    Xen's migration assumes); without it, images live in the run directory."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        problem("host", None, "images", f"images = {value!r}: an absolute directory path")
        return None
    if not Path(value).is_dir():
        problem("host", None, "images", f"images = {value!r}: no such directory")
        return None
    return Path(value)


def _check_across_domains(domains: list[DomainConfig], problem: Any) -> None:
    """What no one guest shows: a MAC used twice, an image written by one guest and
    attached to another, two drivers for one device type."""
    macs: dict[str, str] = {}
    users: dict[str, list[tuple[str, bool]]] = {}
    drivers: dict[str, str] = {}
    for index, domain in enumerate(domains):
        for vif in domain.vifs:
            if vif.mac in macs:
                problem(
                    "domain",
                    index,
                    "vif",
                    f"mac={vif.mac} is used twice ({macs[vif.mac]} "
                    f"and {domain.name}); MACs are unique",
                )
            macs.setdefault(vif.mac, domain.name)
        for disk in domain.disks:
            users.setdefault(disk.target, []).append((domain.name, not disk.readonly))
            attached = users[disk.target]
            if len(attached) > 1 and any(writable for _, writable in attached):
                names = ", ".join(name for name, _ in attached)
                problem(
                    "domain",
                    index,
                    "disk",
                    f"image {disk.target!r} is attached to "
                    f"{names}, and read-write: only read-only "
                    "images may be shared",
                )
        for device in domain.devices:
            driver = device.get("driver")
            if driver is None:
                continue
            known = drivers.setdefault(device["type"], driver)
            if known != driver:
                problem(
                    "domain",
                    index,
                    "devices",
                    f"type {device['type']!r} has two drivers, {known!r} and {driver!r}",
                )


# Keys of a back end's directory the toolstack writes itself, and the device types
# whose keys come from xl's disk and vif lines, not from a `devices` table.
_RESERVED_DEVICE_KEYS = {
    "frontend",
    "frontend-id",
    "backend-id",
    "online",
    "state",
    "hotplug-status",
    "error",
}
_BUILTIN_DEVICE_TYPES = {
    "vbd": "disk = [...]",
    "vif": "vif = [...]",
    "console": "(built in)",
    "qdisk": "disk = [...]",
    "vbd3": "disk = [...]",
}


def _device_problems(devices: list[dict[str, Any]], images: dict[str, int]) -> list[str]:
    """Mistakes in `devices = [...]` tables, which the toolstack writes as they are
    (but for `params`, which names one of Dom0's images and becomes its path)."""
    problems = []
    seen: set[tuple[str, int]] = set()
    for index, device in enumerate(devices):
        device_type = device["type"]
        if not isinstance(device_type, str) or not re.fullmatch(
            r"[a-z][a-z0-9_\-]{0,31}", device_type
        ):
            problems.append(f"type = {device_type!r}: lower-case letters, digits, '_', '-'")
            continue
        if device_type in _BUILTIN_DEVICE_TYPES:
            problems.append(
                f"type = {device_type!r} is built in: use {_BUILTIN_DEVICE_TYPES[device_type]}"
            )
        devid = device.get("devid", index)
        if isinstance(devid, str) and devid.isdigit():
            devid = int(devid)
        if not isinstance(devid, int) or isinstance(devid, bool) or not 0 <= devid < 1 << 31:
            problems.append(f"devid = {devid!r}: a number from 0 to {(1 << 31) - 1}")
        elif (device_type, devid) in seen:
            problems.append(f"{device_type} devid {devid} is used twice")
        else:
            seen.add((device_type, devid))
        backend = device.get("backend", 0)
        if str(backend) != "0":
            problems.append(f"backend = {backend!r}: only Dom0 (0) runs back ends here")
        for key, value in device.items():
            if key in _RESERVED_DEVICE_KEYS or not re.fullmatch(r"[A-Za-z0-9_\-]+", key):
                problems.append(
                    f"{key!r}: the toolstack writes that key itself, or it is "
                    "not a XenStore key name"
                )
            elif not isinstance(value, (str, int, bool)):
                problems.append(f"{key} = {value!r}: a string or a number")
            elif key == "params" and value not in images:
                problems.append(
                    f"params = {value!r} is not one of Dom0's images ([dom0] images "
                    f"= {{...}}; declared: {', '.join(images) or 'none'})"
                )
    return problems


def _parse_domain(
    entry: dict[str, Any],
    index: int,
    images: dict[str, int],
    problem: Any,
    check_imports: bool = False,
) -> DomainConfig | None:
    ok = True

    def bad(key: str | None, message: str) -> None:
        nonlocal ok
        ok = False
        problem("domain", index, key, message)

    for key in entry:
        if key not in _DOMAIN_KEYS:
            bad(key, f"unknown key {key!r}; xl.cfg keys here: {', '.join(sorted(_DOMAIN_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not re.fullmatch(DOMAIN_NAME, name):
        bad(
            "name" if "name" in entry else None,
            f"name = {name!r}: every [[domain]] needs a name of letters, digits, '.', '_', '-'",
        )
        name = f"domain{index}"
    memory = entry.get("memory")
    if not isinstance(memory, int) or not 4 <= memory <= MAX_DOMAIN_MEMORY:
        bad(
            "memory" if "memory" in entry else None,
            f"memory = {memory!r}: MiB as a whole number, 4 to {MAX_DOMAIN_MEMORY}",
        )
    maxmem = entry.get("maxmem")
    if maxmem is not None and (
        not isinstance(maxmem, int)
        or not isinstance(memory, int)
        or not memory <= maxmem <= MAX_DOMAIN_MEMORY
    ):
        bad(
            "maxmem",
            f"maxmem = {maxmem!r}: MiB as a whole number, from memory ({memory!r}) to"
            f" {MAX_DOMAIN_MEMORY}",
        )
    if entry.get("type", "pv") != "pv":
        bad(
            "type",
            f'domain {name!r}: type = {entry["type"]!r}: every domain here is PV (type = "pv")',
        )
    vcpus = entry.get("vcpus", 1)
    if vcpus != 1:
        bad("vcpus", f"vcpus = {vcpus!r}: each domain has exactly one vCPU here")
    for key in ("kernel", "init"):
        if key in entry and (message := _check_kernel_name(entry[key])):
            bad(key, f"{key} = {entry[key]!r}: {message}")
        elif key in entry and check_imports and (message := module_problem(entry[key])):
            bad(key, f"{key} = {entry[key]!r}: {message}")
    for key in ("on_poweroff", "on_reboot", "on_crash"):
        value = entry.get(key)
        if value is not None and value not in SUPPORTED_ON_ACTIONS:
            known = "supported" if value in ON_ACTIONS else "expected"
            bad(key, f"{key} = {value!r}: {known} values are {', '.join(SUPPORTED_ON_ACTIONS)}")
    extra = entry.get("extra", entry.get("cmdline", ""))
    if not isinstance(extra, str):
        bad("extra", "extra = ...: the kernel command line, a string")
    disks: list[DiskSpec] = []
    for spec in _as_list(entry.get("disk", []), bad, "disk"):
        try:
            disk = parse_disk_spec(spec)
        except ValueError as exc:
            bad("disk", f"domain {name!r}: disk {spec!r}: {exc}")
            continue
        if disk.target not in images:
            known = ", ".join(images) or "none declared"
            bad(
                "disk",
                f"disk {spec!r}: target {disk.target!r} is not one of Dom0's images "
                f"([dom0] images = {{...}}; declared: {known})",
            )
        if any(d.devid == disk.devid for d in disks):
            bad("disk", f"disk {spec!r}: vdev {disk.vdev} is used twice")
        if disk.backend != "0":
            bad("disk", f"disk {spec!r}: backend={disk.backend}: only Dom0 (0) runs back ends")
        disks.append(disk)
    vifs: list[VifSpec] = []
    for spec in _as_list(entry.get("vif", []), bad, "vif"):
        try:
            vif = parse_vif_spec(spec, default_mac=default_mac(str(name), len(vifs)))
        except ValueError as exc:
            bad("vif", f"domain {name!r}: vif {spec!r}: {exc}")
            continue
        if vif.backend != "0":
            bad("vif", f"vif {spec!r}: backend={vif.backend}: only Dom0 (0) runs back ends")
        if any(v.mac == vif.mac for v in vifs):
            bad("vif", f"vif {spec!r}: mac={vif.mac} is used twice")
        vifs.append(vif)
    devices = entry.get("devices", [])
    if not isinstance(devices, list) or not all(
        isinstance(d, dict) and "type" in d for d in devices
    ):
        bad("devices", 'devices = [{ type = "...", ... }, ...]: each needs a type')
        devices = []
    for message in _device_problems(devices, images):
        bad("devices", f"devices: {message}")
    for device in devices:
        driver = device.get("driver")
        if driver is None:
            continue
        if not isinstance(driver, str):
            bad("devices", f"driver = {driver!r}: expected 'package.module:NAME'")
        elif check_imports and (message := module_problem(driver)):
            bad("devices", f"driver = {driver!r}: {message}")
    if not ok:
        return None
    assert isinstance(memory, int)  # `ok` says it was checked above
    return DomainConfig(
        name=name,
        memory=memory,
        vcpus=1,
        kernel=entry.get("kernel", DEFAULT_GUEST_KERNEL),
        init=entry.get("init"),
        extra=extra,
        on_poweroff=entry.get("on_poweroff", "destroy"),
        on_reboot=entry.get("on_reboot", "restart"),
        on_crash=entry.get("on_crash", "destroy"),
        disks=tuple(disks),
        vifs=tuple(vifs),
        devices=tuple(devices),
        maxmem=maxmem,
    )


def _as_list(value: Any, bad: Any, key: str) -> Iterable[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        bad(key, f"{key} = [...]: a list of xl spec strings")
        return []
    return value


def parse_domain_file(
    text: str,
    path: str = "<domain>",
    images: dict[str, int] | None = None,
    *,
    check_imports: bool = False,
) -> DomainConfig:
    """An xl.cfg-style file: one guest's keys at the top level (`xenlike create`).

    Its disks may name only images Dom0 already has (`images`).
    """
    problems: list[Problem] = []
    try:
        entry = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise TopologyError(
            [Problem(path, int(line.group(1)) if line else None, f"not valid xl.cfg/TOML: {exc}")]
        ) from None
    where = _Locator("[[domain]]\n" + text)

    def problem(table: str, index: int | None, key: str | None, message: str) -> None:
        line = where.line("domain", 0, key)
        problems.append(Problem(path, line - 1 if line and line > 1 else None, message))

    domain = _parse_domain(entry, 0, dict(images or {}), problem, check_imports)
    if problems or domain is None:
        raise TopologyError(problems)
    return domain


def load_topology(path: Path, *, check_imports: bool = False) -> Topology:
    """Read a topology file; a missing or unreadable file is a TopologyError too."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError([Problem(str(path), None, f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise TopologyError([Problem(str(path), None, "not a text file")]) from None
    return parse_topology(text, str(path), source=path.resolve(), check_imports=check_imports)


def default_topology(*, check_imports: bool = False) -> Topology:
    """The topology `xenlike up` runs with no file: Dom0 and two guests."""
    text = resources.files("xenlike").joinpath("default.toml").read_text()
    return parse_topology(text, "<embedded default topology>", check_imports=check_imports)
