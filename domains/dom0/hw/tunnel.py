"""xenbr0's uplink across hosts: a TAP device in a Linux bridge with a VXLAN device.

With `[dom0] nic = "vxlan:VNI"`, Dom0 builds, through iproute2's `ip` and
`bridge` commands, what a Xen host's network scripts build around a real
NIC::

    xenbr0 ── tap-<host> ══ br-<host> ══ vx-<host> ── UDP 4789 ──> each of [host] peers
    (Dom0's    (its TAP      (a Linux     (the kernel's VXLAN device, RFC 7348:
     bridge)    uplink)       bridge)      VNI, `local`, and one all-zeros fdb
                                           entry per peer)

The all-zeros fdb entries are unicast head-end replication: broadcast and
unknown unicast go to every peer, each in its own UDP datagram, and the
VXLAN device learns which peer a guest's MAC lives behind from what
arrives, as a Linux bridge learns ports. A migrated guest's gratuitous ARP
reaches every peer and moves that entry.

The bridge and the VXLAN device outlive the process that made them (the
TAP goes with its file), so a small reaper, started before them in a
session of its own, deletes them as soon as Dom0 lets go of its pipe:
when Dom0 stops, and when it is killed, since the kernel closes a dead
process's pipes; the hypervisor's SIGKILL at `down` does not wait for a
clean-up in Dom0. Should the reaper die too, the devices are named after
the host (`[host] name`, shortened to fit IFNAMSIZ) and carry an alias
naming the host and its run directory: the next `up` of that host finds
and removes them, and never touches a device that is not xenlike's, or
that a running host owns. Every refusal of the kernel (no permission, a
name taken) is one line: `UplinkError`.
"""

import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from domains.dom0.hw.nic import TapNic, TapUnavailable
from xenlike.rundir import RunDir

__all__ = ["VXLAN_PORT", "UplinkError", "UplinkNames", "VxlanUplink", "overhead"]

log = logging.getLogger("xenlike.dom0.tunnel")

VXLAN_PORT = 4789  # IANA's VXLAN port (RFC 7348 section 5)
_HOST_PART = 10  # characters of the host's name in a device name: "tap-" + 10 < IFNAMSIZ
_ALIAS = re.compile(r"^xenlike host (\S+) run-dir (.*)$")
_ALIAS_MAX = 255  # IFALIASZ - 1
_COMMAND_TIMEOUT = 10.0
_REAPER_TIMEOUT = 5.0  # seconds `close` waits for the devices to be deleted


def overhead(local: str) -> int:
    """Bytes VXLAN adds to each frame: outer IP, UDP (8), VXLAN (8), inner Ethernet (14)."""
    return (20 if ipaddress.ip_address(local).version == 4 else 40) + 8 + 8 + 14


class UplinkError(RuntimeError):
    """The kernel refused part of the uplink; the message is one line saying what."""


@attrs.frozen
class UplinkNames:
    """The three devices of one host's uplink."""

    tap: str
    bridge: str
    vxlan: str

    @classmethod
    def for_host(cls, host: str) -> "UplinkNames":
        """Names after the host: the name itself when short, else its start and a hash."""
        part = host
        if len(part) > _HOST_PART:
            part = f"{host[:5]}{zlib.crc32(host.encode()) & 0xFFFFF:05x}"
        return cls(tap=f"tap-{part}", bridge=f"br-{part}", vxlan=f"vx-{part}")

    @property
    def devices(self) -> tuple[str, str, str]:
        return (self.vxlan, self.bridge, self.tap)


async def _run(*argv: str) -> str:
    """One iproute2 command; its stdout, or UplinkError with the kernel's answer."""
    try:
        with trio.fail_after(_COMMAND_TIMEOUT):
            done = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError:
        command = " ".join(argv)
        raise UplinkError(f"`{command}` did not finish in {_COMMAND_TIMEOUT:.0f} s") from None
    except OSError as exc:
        raise UplinkError(f"`{argv[0]}`: {exc.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
        answer = lines[-1].removeprefix("RTNETLINK answers: ").removeprefix("Error: ")
        raise UplinkError(f"`{' '.join(argv)}`: {answer}")
    return done.stdout.decode(errors="replace")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found is None:
        raise UplinkError(f"iproute2's `{name}` command is not installed; a vxlan NIC needs it")
    return found


@attrs.define(eq=False)
class VxlanUplink:
    """One host's uplink: `open` builds it and gives the TAP to attach to xenbr0,
    `close` takes it down again."""

    host: str
    vni: int
    local: str
    peers: Sequence[str]
    mtu: int  # the largest frame payload the guests send (their vif MTU)
    run_dir: Path
    names: UplinkNames = attrs.field(init=False)
    _ip: str = attrs.field(init=False, default="ip")
    _bridge_tool: str = attrs.field(init=False, default="bridge")
    _reaper: trio.Process | None = attrs.field(init=False, default=None)
    _built: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self.names = UplinkNames.for_host(self.host)

    @property
    def alias(self) -> str:
        """What marks a device as this host's (IFLA_IFALIAS)."""
        return f"xenlike host {self.host} run-dir {self.run_dir}"[:_ALIAS_MAX]

    async def open(self) -> TapNic:
        """Build the uplink; the TAP device, in the Linux bridge, for xenbr0.

        On a refusal, what was built is taken down again and UplinkError says why.
        """
        self._ip, self._bridge_tool = _tool("ip"), _tool("bridge")
        for name in self.names.devices:
            await self._clear(name)
        await self._start_reaper()
        try:
            tap = TapNic(self.names.tap)
        except TapUnavailable as exc:
            with trio.CancelScope(shield=True):
                await self.close()
            reason = os.strerror(exc.errno) if exc.errno else exc.strerror
            raise UplinkError(f"cannot create the TAP device {self.names.tap}: {reason}") from None
        try:
            await self._build()
        except BaseException:
            tap.close()
            with trio.CancelScope(shield=True):
                await self.close()
            raise
        await self._check_underlay()
        log.info(
            "uplink: %s in %s with %s (VXLAN %d, local %s, peers %s, MTU %d)",
            self.names.tap,
            self.names.bridge,
            self.names.vxlan,
            self.vni,
            self.local,
            ", ".join(self.peers),
            self.mtu,
        )
        return tap

    async def _build(self) -> None:
        ip, names, mtu = self._ip, self.names, str(self.mtu)
        # The host's kernel has nothing to say on the guests' segment: no IPv6 link-local
        # addresses (router solicitations, MLD), no multicast snooping (IGMP reports for
        # RFC 4286's router discovery group).
        marks = ["alias", self.alias, "addrgenmode", "none"]
        bridge = ["type", "bridge", "mcast_snooping", "0"]
        await _run(ip, "link", "add", "name", names.bridge, "mtu", mtu, *bridge)
        await _run(ip, "link", "set", "dev", names.bridge, *marks)
        await _run(
            ip,
            "link",
            "add",
            "name",
            names.vxlan,
            "mtu",
            mtu,
            "type",
            "vxlan",
            "id",
            str(self.vni),
            "dstport",
            str(VXLAN_PORT),
            "local",
            self.local,
        )
        await _run(ip, "link", "set", "dev", names.vxlan, *marks)
        for peer in self.peers:
            flood = ["fdb", "append", "00:00:00:00:00:00", "dev", names.vxlan, "dst", peer]
            await _run(self._bridge_tool, *flood)
        await _run(ip, "link", "set", "dev", names.tap, *marks, "mtu", mtu)
        for port in (names.tap, names.vxlan):
            await _run(ip, "link", "set", "dev", port, "master", names.bridge, "up")
        await _run(ip, "link", "set", "dev", names.bridge, "up")
        self._built = True

    async def _start_reaper(self) -> None:
        """The process that deletes the VXLAN device and the bridge once this one lets
        go of its stdin, however it goes (see the module's docstring)."""
        ip = shlex.quote(self._ip)
        deletions = "; ".join(
            f"{ip} link del dev {shlex.quote(name)} 2>/dev/null"
            for name in (self.names.vxlan, self.names.bridge)
        )
        try:
            self._reaper = await trio.lowlevel.open_process(
                ["/bin/sh", "-c", f"cat >/dev/null; {deletions}; exit 0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,  # not in Dom0's process group: it outlives Dom0
            )
        except OSError as exc:
            raise UplinkError(f"cannot start the uplink's reaper: {exc.strerror}") from None

    async def close(self) -> None:
        """Delete the bridge and the VXLAN device (the TAP goes with its file)."""
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        assert reaper.stdin is not None
        await reaper.stdin.aclose()
        with trio.move_on_after(_REAPER_TIMEOUT):
            await reaper.wait()
            if self._built:
                log.info("uplink: deleted %s and %s", self.names.vxlan, self.names.bridge)

    async def _clear(self, name: str) -> None:
        """Make room for device `name`: remove one a stopped run of xenlike left; refuse
        to touch anything else."""
        found = await self._show(name)
        if found is None:
            return
        match = _ALIAS.match(found.get("ifalias", ""))
        if match is None:
            raise UplinkError(
                f"device {name} exists and is not xenlike's; the uplink of host "
                f"{self.host!r} needs that name (`ip link del {name}`, or another [host] name)"
            )
        owner_host, owner_dir = match.groups()
        if owner_dir != str(self.run_dir) and RunDir(Path(owner_dir)).busy():
            raise UplinkError(
                f"device {name} belongs to the running host {owner_host!r} (run directory "
                f"{owner_dir}); hosts of one network namespace need different [host] names"
            )
        await _run(self._ip, "link", "del", "dev", name)
        log.warning("uplink: deleted %s, left by a stopped run of host %r", name, owner_host)

    async def _show(self, name: str) -> dict[str, Any] | None:
        try:
            text = await _run(self._ip, "-j", "link", "show", "dev", name)
        except UplinkError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        found = json.loads(text or "[]")
        return found[0] if found else None

    async def _check_underlay(self) -> None:
        """Say so when a peer cannot be reached, or its route cannot carry a whole guest
        frame in a VXLAN datagram (the kernel then fragments, or drops)."""
        needed = self.mtu + overhead(self.local)
        for peer in self.peers:
            try:
                route = json.loads(await _run(self._ip, "-j", "route", "get", peer))[0]
                device = route.get("dev", "")
                link = json.loads(await _run(self._ip, "-j", "link", "show", "dev", device))[0]
            except (UplinkError, ValueError, LookupError) as exc:
                log.warning("uplink: peer %s: no route here (%s)", peer, exc)
                continue
            if link.get("mtu", 0) < needed:
                log.warning(
                    "uplink: peer %s is reached through %s, MTU %d: %d-byte guest frames "
                    "need %d in VXLAN; raise its MTU, or give the vifs mtu=%d",
                    peer,
                    device,
                    link.get("mtu", 0),
                    self.mtu,
                    needed,
                    link.get("mtu", 0) - overhead(self.local),
                )
