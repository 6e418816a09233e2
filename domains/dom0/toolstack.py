"""The toolstack service: creates and destroys guests as libxl does.

Creating a guest: XEN_DOMCTL_createdomain and max_mem; the store and
console event channels allocated in the new domain for Dom0; the domain
builder; the /local/domain/<id> tree and /vm/<uuid> with libxl's keys and
permissions; each device's front-end and back-end directories (state 1,
cross links, the driver's keys); XS_INTRODUCE; the console handed to
xenconsoled; unpause.

Then it follows the guests: on VIRQ_DOM_EXC it looks at which have shut
down and applies their on_poweroff / on_reboot / on_crash (destroy, restart,
preserve), as `xl`'s per-domain daemon does; one that suspended is kept, as
xl keeps it for its save.

Dom0 tools reach it on `<run-dir>/toolstack.sock` with one JSON object per
line: {"op": "create", "config": TEXT} | {"op": "shutdown", "name": N,
"reason": "poweroff"} | {"op": "destroy", "name": N} | {"op": "status"} |
{"op": "mem-set", "name": N, "kib": K} | {"op": "mem-max", "name": N, "kib": K} |
{"op": "down"} | {"op": "rename", "name": N, "new_name": M} | {"op": "config",
"name": N} | {"op": "attach", "name": N, "type": "vbd"|"vif", "spec": SPEC} |
{"op": "detach", "name": N, "type": T, "device": VDEV|MAC|DEVID} |
{"op": "device-list", "name": N, "type": T} | {"op": "save", "name": N, "path":
ABSOLUTE, "checkpoint": BOOL} | {"op": "restore", "path": ABSOLUTE, "profile":
BOOL} (a profile answers with the restore's steps timed, "spans_ns") |
{"op": "migrate", "name": N, "live": BOOL} and {"op": "migrate-receive"}, each
sent with its stream's two descriptors (domains.dom0.migrate); each
answer is {"ok": true, ...} or {"ok": false, "error": ...}.

Memory as libxl keeps it: max_mem is the domain's `maxmem` (its memory is
sized for it), the builder populates `memory`, and `memory/target` and
`memory/static-max` (KiB) say both to the guest's balloon driver. mem-set
writes a new target (and, as libxl_set_memory_target with enforce, makes it
the domain's max_mem, so the balloon cannot overshoot it); mem-max moves
max_mem and static-max, within what the domain's memory was sized for.

Devices come and go while a guest runs (`xl block-attach`, `network-attach`
and their -detach): attaching writes the device's directories as `create`
does and waits, as libxl does, for the back end to offer itself (InitWait);
detaching is `remove_device`, libxl's removal.
"""

import functools
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from domains.dom0.devices import DEVICE_WRITERS, DeviceWriter, remove_device
from domains.dom0.migrate import MIGRATION_OPS, Peer, migration_op, receive_with_fds
from domains.dom0.save import Progress, profiled, restore_domain, save_domain, span
from domains.dom0.xenconsoled import XenConsoled, unix_listener
from xenlike.abi.domctl import XEN_DOMINF_shutdown, XEN_DOMINF_shutdownshift
from xenlike.abi.errno import Errno
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import Virq
from xenlike.abi.xenbus import XenbusState
from xenlike.hypercall import HypercallError
from xenlike.memory import BootLayout
from xenlike.topology import (
    DEFAULT_GUEST_KERNEL,
    DOMAIN_NAME,
    DomainConfig,
    Topology,
    TopologyError,
    default_mac,
    parse_disk_spec,
    parse_domain_file,
    parse_vif_spec,
    vdev_number,
)
from xenlike.xc import XenControl
from xenlike.xenbus.driver import error_node
from xenlike.xenstore import XenStoreError

__all__ = ["GuestRecord", "Toolstack"]

log = logging.getLogger("xenlike.dom0.toolstack")
ON_EVENT = {
    ShutdownReason.poweroff: "on_poweroff",
    ShutdownReason.reboot: "on_reboot",
    ShutdownReason.crash: "on_crash",
    ShutdownReason.watchdog: "on_crash",
}
BACKEND_DOMID = 0
ATTACH_TIMEOUT = 10.0  # seconds for an attached device's back end to reach InitWait
FAILURE_LINES = 6  # log lines kept with a failed guest
MIN_TARGET_KIB = 4096  # the smallest `memory` a guest may have (xenlike.topology)
MAX_FAILURES = 32


@attrs.define(eq=False)
class GuestRecord:
    config: DomainConfig
    domid: int
    uuid: str
    state: str = "running"  # running | shut down (reason) | preserved
    restarts: int = 0


async def _together(*steps: Callable[[], Awaitable[None]]) -> None:
    """Run `steps` at once; the first to fail cancels the others and is raised as it
    was (not in a group: a restore's one line stays one line)."""
    try:
        async with trio.open_nursery() as nursery:
            for step in steps:
                nursery.start_soon(step)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _progress(request: dict[str, Any], peer: Peer | None, what: str) -> Progress:
    """Where a save's or restore's progress lines go: to its command, before the
    answer, when it asked ("progress": true, as `xenlike save` and `restore` do, and
    as `migrate`'s always come); to Dom0's log otherwise."""
    if request.get("progress") and peer is not None:
        return peer.say

    async def logged(line: str) -> None:
        log.info("%s: %s", what, line)

    return logged


class Toolstack:
    def __init__(
        self,
        dom0: Any,
        xc: XenControl,
        xs: Any,
        consoled: XenConsoled,
        run_dir: Path,
        topology: Topology,
        registry: Any = None,
    ) -> None:
        self.dom0 = dom0
        self.registry = registry  # Dom0's back-end drivers: a created guest's are added
        self.xc = xc
        self.xs = xs
        self.consoled = consoled
        self.run_dir = Path(run_dir)
        self.topology = topology
        self.guests: dict[str, GuestRecord] = {}
        self.failures: list[dict[str, Any]] = []  # guests that died or were never created
        self._lock = trio.Lock()

    # --- creating ---------------------------------------------------------------

    async def create(
        self,
        config: DomainConfig,
        before_unpause: Callable[[int], Awaitable[None]] | None = None,
        fill: Callable[[int], Awaitable[None]] | None = None,
    ) -> GuestRecord:
        """Build, describe and start one guest; on any failure nothing is left behind.
        `fill(domid)` fills a restored guest's memory while its XenStore tree, devices
        and console are set up (they touch no frame it writes: a restore's copy goes
        on in a worker thread meanwhile); `before_unpause(domid)` gives it the rest
        before it runs."""
        if config.name in self.guests:
            raise ValueError(f"a domain named {config.name!r} already exists")
        writers = [self._writer(spec) for spec in self._device_specs(config)]
        if self.registry is not None:  # a driver that cannot load fails its devices only
            for device in config.devices:
                if "driver" in device and device["type"] not in self.registry:
                    self.registry.register_dotted(device["driver"], device["type"])
        handle = uuid.uuid4()
        with span("createdomain"):
            domid = await self.xc.createdomain(handle=handle.bytes)
        record = GuestRecord(config, domid, str(handle))
        self.guests[config.name] = record
        try:
            with span("max_mem"):
                await self.xc.set_max_mem(domid, config.max_memory * 1024)
            with span("alloc_unbound"):
                store_port = await self.xc.alloc_unbound(domid, BACKEND_DOMID)
                console_port = await self.xc.alloc_unbound(domid, BACKEND_DOMID)
            with span("build"):
                await self._build(config, domid, store_port, console_port)

            async def describe() -> None:
                # The builder populated what _build asked: no domain_info to learn it.
                layout = BootLayout.for_domain(config.memory * 1024 // 4)
                with span("xenstore_tree"):
                    await self._write_domain_tree(record, layout, store_port, console_port)
                counts: dict[str, int] = {}
                with span("devices"):
                    for writer in writers:  # each type counts its own: vif 0, vif 1, ...
                        index = counts[writer.type] = counts.get(writer.type, -1) + 1
                        await writer.add(self.xs, domid, index)
                with span("introduce"):
                    await self.xs.introduce(domid, layout.store_gfn, store_port)
                with span("console"):
                    await self.consoled.add(domid, config.name, console_port)

            if fill is None:
                await describe()
            else:
                await _together(describe, functools.partial(fill, domid))
            if before_unpause is not None:
                await before_unpause(domid)
            with span("unpause"):
                await self.xc.unpause(domid)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._destroy(record)
            raise
        with span("created_line"):
            await self.dom0.console_write(f"toolstack: created {config.name} as d{domid}")
        return record

    async def _build(
        self, config: DomainConfig, domid: int, store_port: int, console_port: int
    ) -> None:
        """The domain builder, with `memory` populated from the host's pool."""
        try:
            await self.xc.build(
                domid,
                config.kernel,
                cmdline=self._cmdline(config),
                store_evtchn=store_port,
                console_evtchn=console_port,
                nr_pages=config.memory * 1024 // 4,
            )
        except HypercallError as exc:
            if exc.errno != Errno.ENOMEM:
                raise
            free = (await self.xc.physinfo()).free_pages * 4 // 1024
            raise ValueError(
                f"cannot create {config.name}: the host has {free} MiB free,"
                f" {config.name} needs {config.memory} MiB"
            ) from None

    def _device_specs(self, config: DomainConfig) -> list[tuple[str, Any]]:
        specs: list[tuple[str, Any]] = [("vbd", disk) for disk in config.disks]
        specs += [("vif", vif) for vif in config.vifs]
        specs += [(device["type"], device) for device in config.devices]
        return specs

    def _writer(self, spec: tuple[str, Any]) -> DeviceWriter:
        """xl's disk and vif lines get their type's keys; a `devices` entry (a dict)
        is written as it is, whatever type it names."""
        device_type, value = spec
        if isinstance(value, dict):
            return DEVICE_WRITERS["*"](device_type, value, self)
        return DEVICE_WRITERS[device_type](device_type, value, self)

    def _cmdline(self, config: DomainConfig) -> str:
        words = []
        if config.init:
            words.append(f"init={config.init}")
        # TYPE@module:NAME, so that a guest that cannot load a driver fails its devices
        drivers = dict.fromkeys(
            f"{d['type']}@{d['driver']}" for d in config.devices if "driver" in d
        )
        if drivers:
            words.append("drivers=" + ",".join(drivers))
        if config.extra:
            words.append(config.extra)
        return " ".join(words)

    async def _write_domain_tree(
        self, record: GuestRecord, layout: Any, store_port: int, console_port: int
    ) -> None:
        """libxl__domain_make and libxl__build_post: the keys every guest has."""
        domid, config = record.domid, record.config
        home = f"/local/domain/{domid}"
        vm = f"/vm/{record.uuid}"
        guest_owned = ("device", "control", "data", "error", "drivers", "feature", "attr")

        async def write(tx: Any) -> None:
            await tx.write(home, "")
            await tx.set_perms(home, [f"n{BACKEND_DOMID}", f"r{domid}"])
            for sub in guest_owned:
                await tx.write(f"{home}/{sub}", "")
                await tx.set_perms(f"{home}/{sub}", [f"n{domid}", f"r{BACKEND_DOMID}"])
            values = {
                "name": config.name,
                "domid": str(domid),
                "vm": vm,
                "memory/target": str(config.memory * 1024),
                "memory/static-max": str(config.max_memory * 1024),
                "console/ring-ref": str(layout.console_gfn),
                "console/port": str(console_port),
                "console/type": "xenconsoled",
                "console/limit": "1048576",
                "store/ring-ref": str(layout.store_gfn),
                "store/port": str(store_port),
                "control/shutdown": "",
            }
            for key, value in values.items():
                await tx.write(f"{home}/{key}", value)
            await tx.write(f"{vm}/name", config.name)
            await tx.write(f"{vm}/uuid", record.uuid)

        await self.xs.transact(write)

    # --- memory -----------------------------------------------------------------

    async def set_memory_target(self, name: str, target_kib: int) -> int:
        """libxl_set_memory_target (enforced): the balloon's new target, in KiB."""
        record = self._record(name)
        home = f"/local/domain/{record.domid}/memory"
        static_max = int((await self.xs.read(f"{home}/static-max")).decode())
        if target_kib > static_max:
            raise ValueError(
                f"cannot set {record.config.name}'s memory to {target_kib} KiB:"
                f" memory_dynamic_max must be less than or equal to memory_static_max"
                f" ({static_max} KiB; raise it with mem-max)"
            )
        if target_kib < MIN_TARGET_KIB:
            raise ValueError(
                f"cannot set {record.config.name}'s memory to {target_kib} KiB:"
                f" a guest needs at least {MIN_TARGET_KIB} KiB"
            )
        await self.xc.set_max_mem(record.domid, target_kib)
        await self.xs.write(f"{home}/target", str(target_kib))
        await self.xs.write(f"/vm/{record.uuid}/memory", str(target_kib // 1024))
        return target_kib

    async def set_max_memory(self, name: str, max_kib: int) -> int:
        """libxl_domain_setmaxmem: max_mem and static-max, never below the target."""
        record = self._record(name)
        home = f"/local/domain/{record.domid}/memory"
        target = int((await self.xs.read(f"{home}/target")).decode())
        sized = record.config.max_memory * 1024
        if max_kib < target:
            raise ValueError(
                f"cannot set {record.config.name}'s maximum to {max_kib} KiB:"
                f" memory_static_max must be greater than or equal to memory_dynamic_max"
                f" ({target} KiB; lower it with mem-set first)"
            )
        if max_kib > sized:
            raise ValueError(
                f"cannot set {record.config.name}'s maximum to {max_kib} KiB: its memory was"
                f" sized for {sized} KiB at create (maxmem = {sized // 1024})"
            )
        await self.xc.set_max_mem(record.domid, max_kib)
        await self.xs.write(f"{home}/static-max", str(max_kib))
        return max_kib

    # --- stopping ---------------------------------------------------------------

    async def request_shutdown(self, name: str, reason: str = "poweroff") -> None:
        """Ask the guest, through control/shutdown, as `xl shutdown` does."""
        record = self._record(name)
        await self.xs.write(f"/local/domain/{record.domid}/control/shutdown", reason)

    async def destroy(self, name: str) -> None:
        await self._destroy(self._record(name))

    async def _destroy(self, record: GuestRecord) -> None:
        """libxl_domain_destroy: devices, the domain, its XenStore tree, its console."""
        domid = record.domid
        self.consoled.remove(domid)
        for root in ("backend", "error/backend"):  # its back ends, and their error nodes
            home = f"/local/domain/{BACKEND_DOMID}/{root}"
            for path in await self._ls(home):
                await self._rm(f"{home}/{path}/{domid}")
        try:
            await self.xc.destroy(domid)
        except HypercallError as exc:
            log.info("d%d: destroy: %s", domid, exc)
        self.dom0.grants.forget(domid)  # the guest's frames Dom0 keeps mapped go
        try:
            await self.xs.release(domid)
        except XenStoreError:
            pass
        await self._rm(f"/local/domain/{domid}")
        await self._rm(f"/vm/{record.uuid}")
        if self.guests.get(record.config.name) is record:
            del self.guests[record.config.name]

    async def _ls(self, path: str) -> list[str]:
        try:
            return await self.xs.ls(path)
        except XenStoreError:
            return []

    async def _rm(self, path: str) -> None:
        try:
            await self.xs.rm(path)
        except XenStoreError:
            pass

    async def rename(self, name: str, new_name: str) -> None:
        """libxl_domain_rename: the name in the domain's tree and in /vm, in one
        transaction, refused when another domain has it."""
        record = self._record(name)
        if not re.fullmatch(DOMAIN_NAME, new_name):
            raise ValueError(f"new name {new_name!r}: letters, digits, '.', '_' and '-' only")
        if new_name in self.guests or new_name == "Domain-0":
            raise ValueError(f"a domain named {new_name!r} already exists")

        async def write(tx: Any) -> None:
            await tx.write(f"/local/domain/{record.domid}/name", new_name)
            await tx.write(f"/vm/{record.uuid}/name", new_name)

        await self.xs.transact(write)
        self.consoled.rename(record.domid, new_name)
        del self.guests[record.config.name]
        record.config = attrs.evolve(record.config, name=new_name)
        self.guests[new_name] = record

    def _record(self, name: str) -> GuestRecord:
        """A guest by name or by domid, as xl takes either."""
        record = self.guests.get(name)
        if record is None and name.isdigit():
            record = next((r for r in self.guests.values() if r.domid == int(name)), None)
        if record is None:
            raise LookupError(
                f"no domain named {name!r}; running: {', '.join(self.guests) or 'none'}"
            )
        return record

    # --- saving ---------------------------------------------------------------

    async def _save_op(self, request: dict[str, Any], peer: Peer | None) -> dict[str, Any]:
        """xl save [-c]: the guest suspended, written to `path`, then destroyed or resumed."""
        path = Path(request["path"])
        if not path.is_absolute():
            raise ValueError(f"save: {path} is not an absolute path")
        async with self._lock:
            record = self._record(request["name"])
            try:
                size = await save_domain(
                    self,
                    record,
                    path,
                    checkpoint=bool(request.get("checkpoint")),
                    progress=_progress(request, peer, f"save {record.config.name}"),
                )
            except OSError as exc:
                raise ValueError(f"cannot save {record.config.name} to {path}: {exc}") from None
        return {"ok": True, "domid": record.domid, "bytes": size}

    async def _restore_op(self, request: dict[str, Any], peer: Peer | None) -> dict[str, Any]:
        """xl restore: a new guest from a save file, resumed from its saved state."""
        path = Path(request["path"])
        if not path.is_absolute():
            raise ValueError(f"restore: {path} is not an absolute path")
        with profiled() as spans, span("restore_op"):
            with span("lock"):
                await self._lock.acquire()
            try:
                progress = _progress(request, peer, f"restore {path}")
                record = await restore_domain(self, path, progress)
            finally:
                self._lock.release()
        answer = {"ok": True, "domid": record.domid, "name": record.config.name}
        if request.get("profile"):
            answer["spans_ns"] = spans
        return answer

    # --- following the guests -----------------------------------------------------

    async def follow_domains(self) -> None:
        """On each VIRQ_DOM_EXC, apply the shut-down guests' on_* actions."""
        port = await self.dom0.evtchn.bind_virq(Virq.DOM_EXC)
        while True:
            await port.wait()
            async with self._lock:
                await self._reap()

    async def _reap(self) -> None:
        infos = {info.domain: info for info in await self.xc.list_domains()}
        for record in list(self.guests.values()):
            info = infos.get(record.domid)
            if info is None:
                if record.state == "running":
                    log.info("%s (d%d) vanished", record.config.name, record.domid)
                    self.note_failure(record.config.name, record.domid, "vanished")
                    await self._destroy(record)
                continue
            if not info.flags & XEN_DOMINF_shutdown or record.state != "running":
                continue
            reason = info.flags >> XEN_DOMINF_shutdownshift & 0xFF
            if reason == ShutdownReason.suspend:  # as xl: kept for a save, not a crash
                record.state = "suspended"
                await self.dom0.console_write(
                    f"toolstack: {record.config.name} (d{record.domid}) suspended: kept"
                )
                continue
            reason_name = (
                ShutdownReason(reason).name
                if reason in ShutdownReason._value2member_map_
                else str(reason)
            )
            action = getattr(record.config, ON_EVENT.get(reason, "on_crash"))
            record.state = f"shut down ({reason_name})"
            if reason in (ShutdownReason.crash, ShutdownReason.watchdog):
                self.note_failure(record.config.name, record.domid, "crashed")
            await self.dom0.console_write(
                f"toolstack: {record.config.name} (d{record.domid}) {reason_name}: {action}"
            )
            if action == "preserve":
                record.state = f"preserved ({reason_name})"
            elif action == "restart":
                await self._destroy(record)
                restarted = await self.create(record.config)
                restarted.restarts = record.restarts + 1
            else:
                await self._destroy(record)

    async def shutdown_all(self, timeout: float = 15.0) -> None:
        """Ask every guest to power off, wait for them, destroy whatever is left."""
        for record in list(self.guests.values()):
            if record.state == "running":
                try:
                    await self.request_shutdown(record.config.name)
                except (XenStoreError, LookupError):
                    pass
        with trio.move_on_after(timeout):
            while any(r.state == "running" for r in self.guests.values()):
                await trio.sleep(0.05)
        async with self._lock:
            for record in list(self.guests.values()):
                await self._destroy(record)

    # --- devices that come and go -------------------------------------------------

    async def attach(self, name: str, device_type: str, spec: str) -> int:
        """Give a running guest a disk (xl's DISKSPEC) or a vif (VIFSPEC); its devid."""
        record = self._record(name)
        if record.state != "running":
            raise ValueError(
                f"{record.config.name} is {record.state}: devices attach to a running guest"
            )
        domid = record.domid
        in_use = await self._devids(domid, device_type)
        if device_type == "vbd":
            try:
                disk = parse_disk_spec(spec)
            except ValueError as exc:
                raise ValueError(f"disk {spec!r}: {exc}") from None
            images = self.topology.dom0.images
            if disk.target not in images:
                raise ValueError(
                    f"disk {spec!r}: target {disk.target!r} is not one of Dom0's images "
                    f"([dom0] images = {{...}}; declared: {', '.join(images) or 'none'})"
                )
            self.topology.image_path(disk.target, self.run_dir)  # ValueError if it leads out
            if disk.backend != str(BACKEND_DOMID):
                raise ValueError(f"disk {spec!r}: backend={disk.backend}: only Dom0 runs back ends")
            if str(disk.devid) in in_use:
                raise ValueError(f"{record.config.name} already has a disk {disk.vdev}")
            await self._check_sharing(disk.target, not disk.readonly)
            writer, devid = self._writer(("vbd", disk)), disk.devid
        elif device_type == "vif":
            devid = next(n for n in range(len(in_use) + 1) if str(n) not in in_use)
            try:
                vif = parse_vif_spec(spec, default_mac=default_mac(record.config.name, devid))
            except ValueError as exc:
                raise ValueError(f"vif {spec!r}: {exc}") from None
            if vif.backend != str(BACKEND_DOMID):
                raise ValueError(f"vif {spec!r}: backend={vif.backend}: only Dom0 runs back ends")
            for other in self.guests.values():
                for index in await self._devids(other.domid, "vif"):
                    if await self._read(f"{self._back(other.domid, 'vif', index)}/mac") == vif.mac:
                        raise ValueError(f"mac={vif.mac} is {other.config.name}'s vif {index}")
            writer = self._writer(("vif", vif))
        else:
            raise ValueError(f"device type {device_type!r}: vbd or vif")
        await writer.add(self.xs, domid, devid)
        back = self._back(domid, device_type, devid)
        if not await self._wait_state(f"{back}/state", XenbusState.InitWait, ATTACH_TIMEOUT):
            await remove_device(self.xs, self._front(domid, device_type, devid), back, timeout=0)
            raise ValueError(
                f"no back end picked {device_type} {devid} up in {ATTACH_TIMEOUT:g}s: removed"
            )
        await self.dom0.console_write(
            f"toolstack: {device_type} {devid} attached to {record.config.name} (d{domid})"
        )
        return devid

    async def detach(self, name: str, device_type: str, device: str) -> dict[str, Any]:
        """Remove a guest's disk (by vdev, e.g. xvdb, or number) or vif (by devid or mac)."""
        record = self._record(name)
        domid = record.domid
        devid = await self._find_device(domid, device_type, device)
        front = self._front(domid, device_type, devid)
        # Where the toolstack put it, not where the guest's `backend` node says it is.
        closed = await remove_device(self.xs, front, self._back(domid, device_type, devid))
        await self.dom0.console_write(
            f"toolstack: {device_type} {devid} detached from {record.config.name} (d{domid})"
            + ("" if closed else ": forced, the back end did not close in time")
        )
        return {"devid": devid, "forced": not closed}

    async def device_list(self, name: str, device_type: str) -> list[dict[str, Any]]:
        """What libxl_device_disk_getinfo / libxl_device_nic_getinfo report, per device.
        The guest owns its front end's nodes: they are read as numbers or not at
        all; the mac and the back end's path are the toolstack's own."""
        record = self._record(name)
        domid = record.domid
        devices = []
        devids = await self._devids(domid, device_type)
        for devid in sorted(devids, key=lambda d: int(d) if d.isdigit() else -1):
            front = self._front(domid, device_type, devid)
            back = self._back(domid, device_type, devid)
            values = {
                key: await self._read(f"{front}/{key}")
                for key in ("backend-id", "state", "event-channel")
            }
            refs = ("tx-ring-ref", "rx-ring-ref") if device_type == "vif" else ("ring-ref",)
            devices.append(
                {
                    "devid": int(devid) if devid.isdigit() else devid,
                    "backend_id": _number(values["backend-id"]),
                    "frontend_id": domid,
                    "state": _number(values["state"]),
                    "evtch": _number(values["event-channel"]),
                    **{ref: _number(await self._read(f"{front}/{ref}")) for ref in refs},
                    "mac": await self._read(f"{back}/mac") if device_type == "vif" else None,
                    "backend": back,
                }
            )
        return devices

    async def _find_device(self, domid: int, device_type: str, device: str) -> int:
        """xl's names for a device: a disk's vdev (xvdb) or number, a vif's devid or mac."""
        in_use = await self._devids(domid, device_type)
        if device_type == "vif" and ":" in device:
            for devid in in_use:
                mac = await self._read(f"{self._back(domid, 'vif', devid)}/mac")
                if mac == device.lower() and devid.isdigit():
                    return int(devid)
            raise LookupError(f"Unknown device {device}.")
        if device_type == "vbd" and not device.isdigit():
            try:
                number = vdev_number(device)
            except ValueError:
                raise LookupError(f"Error: Device {device} not connected.") from None
        elif device.isdigit():
            number = int(device)
        else:
            raise LookupError(f"Unknown device {device}.")
        if str(number) not in in_use:
            raise LookupError(
                f"Error: Device {device} not connected."
                if device_type == "vbd"
                else f"Unknown device {device}."
            )
        return number

    @staticmethod
    def _front(domid: int, device_type: str, devid: int | str) -> str:
        return f"/local/domain/{domid}/device/{device_type}/{devid}"

    async def _check_sharing(self, target: str, writable: bool) -> None:
        """As the topology's rule (and xl's block script's check_sharing): an image
        in use by a guest is shared read-only or not at all."""
        path = str(self.topology.image_path(target, self.run_dir))
        for other in self.guests.values():
            for devid in await self._devids(other.domid, "vbd"):
                back = self._back(other.domid, "vbd", devid)
                if await self._read(f"{back}/params") != path:
                    continue
                if writable or await self._read(f"{back}/mode") != "r":
                    raise ValueError(
                        f"image {target!r} is attached to {other.config.name}, and read-write "
                        "on one side: only read-only images may be shared"
                    )

    async def _devids(self, domid: int, device_type: str) -> list[str]:
        """The guest's devices of that type, by their back ends: Dom0's nodes, which
        the toolstack made, not the guest's own (libxl lists its own records too)."""
        return await self._ls(f"/local/domain/{BACKEND_DOMID}/backend/{device_type}/{domid}")

    @staticmethod
    def _back(domid: int, device_type: str, devid: int | str) -> str:
        return f"/local/domain/{BACKEND_DOMID}/backend/{device_type}/{domid}/{devid}"

    async def _wait_state(self, path: str, least: XenbusState, timeout: float) -> bool:
        """Whether the state node at `path` reaches `least` (or beyond) within `timeout`."""
        with trio.move_on_after(timeout):
            async with self.xs.watch(path) as events:
                async for _ in events:
                    state = _number(await self._read(path))
                    if state is not None and state >= least:
                        return True
        return False

    # --- failures ---------------------------------------------------------------

    def note_failure(self, name: str, domid: int | None, reason: str) -> None:
        """Remember a guest that crashed or could not be created, with the last lines
        of its console (or of its process's own log), for `up` and `create` to show."""
        lines: list[str] = []
        sources = [self.run_dir / "console" / f"{name}.log"]
        if domid is not None:
            sources.append(self.run_dir / "domains" / f"{domid}.log")
        for source in sources:
            try:
                text = source.read_bytes()[-8192:].decode("utf-8", "replace")
            except OSError:
                continue
            lines = [line for line in text.splitlines() if line.strip()][-FAILURE_LINES:]
            if lines:
                lines.insert(0, f"(last lines of {source.relative_to(self.run_dir)})")
                break
        self.failures.append({"name": name, "domid": domid, "reason": reason, "log": lines})
        del self.failures[:-MAX_FAILURES]

    # --- status -----------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Every guest with its devices' states: what `up --detach` waits on."""
        guests = []
        for record in list(self.guests.values()):  # create() may add one while we await
            devices = []
            home = f"/local/domain/{record.domid}/device"
            for device_type in await self._ls(home):
                for devid in await self._ls(f"{home}/{device_type}"):
                    front = f"{home}/{device_type}/{devid}"
                    back = await self._read(f"{front}/backend")
                    errors = [await self._read(error_node(path)) for path in (front, back) if path]
                    devices.append(
                        {
                            "type": device_type,
                            "devid": devid,
                            "frontend": _state(await self._read(f"{front}/state")),
                            "backend": _state(await self._read(f"{back}/state")) if back else None,
                            "error": "; ".join(e for e in errors if e) or None,
                        }
                    )
            console = record.domid in self.consoled.consoles
            guests.append(
                {
                    "name": record.config.name,
                    "domid": record.domid,
                    "state": record.state,
                    "console": console,
                    "devices": devices,
                    "booted": await self._booted(record),
                }
            )
        return {"guests": guests, "failures": self.failures}

    async def _booted(self, record: GuestRecord) -> bool:
        """Whether the guest's kernel has finished booting: xenlike's guest kernel then
        writes control/feature-poweroff (as Linux's does), once its devices are up and
        its program loaded. Another kernel is taken as booted once it runs."""
        if record.config.kernel != DEFAULT_GUEST_KERNEL:
            return True
        return (
            await self._read(f"/local/domain/{record.domid}/control/feature-poweroff") is not None
        )

    async def _read(self, path: str) -> str | None:
        try:
            return (await self.xs.read(path)).decode()
        except XenStoreError:
            return None

    # --- the service ------------------------------------------------------------

    async def serve(
        self, path: Path, *, down: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        path.unlink(missing_ok=True)
        listener = await unix_listener(path)
        task_status.started()
        await trio.serve_listeners(functools.partial(self._client, down=down), [listener])

    async def _client(self, stream: trio.SocketStream, down: trio.Event) -> None:
        buffer = b""
        peer = Peer(stream, [])  # `migrate` passes its stream's descriptors (SCM_RIGHTS)
        async with stream:
            while data := await receive_with_fds(stream, peer.fds):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    try:
                        answer = await self._answer(line, down, peer)
                    finally:
                        peer.close_fds()
                    if peer.gone:  # a migration whose command went away: no one to answer
                        return
                    await stream.send_all(json.dumps(answer).encode() + b"\n")

    async def _answer(
        self, line: bytes, down: trio.Event, peer: Peer | None = None
    ) -> dict[str, Any]:
        try:
            request = json.loads(line)
            op = request["op"]
            if op in MIGRATION_OPS and peer is not None:
                return await migration_op(self, request, peer)
            if op == "create":
                config = parse_domain_file(
                    request["config"],
                    request.get("path", "<create>"),
                    images=self.topology.dom0.images,
                    check_imports=True,
                )
                async with self._lock:
                    record = await self.create(config)
                return {"ok": True, "domid": record.domid, "name": record.config.name}
            if op == "shutdown":
                await self.request_shutdown(request["name"], request.get("reason", "poweroff"))
                return {"ok": True}
            if op == "destroy":
                async with self._lock:
                    await self.destroy(request["name"])
                return {"ok": True}
            if op == "status":
                return {"ok": True, **await self.status()}
            if op == "mem-set":
                kib = await self.set_memory_target(request["name"], int(request["kib"]))
                return {"ok": True, "kib": kib}
            if op == "mem-max":
                kib = await self.set_max_memory(request["name"], int(request["kib"]))
                return {"ok": True, "kib": kib}
            if op == "rename":
                async with self._lock:
                    await self.rename(request["name"], request["new_name"])
                return {"ok": True}
            if op == "save":
                return await self._save_op(request, peer)
            if op == "restore":
                return await self._restore_op(request, peer)
            if op == "config":  # what libxl keeps of a domain's configuration
                record = self._record(request["name"])
                kept = attrs.asdict(record.config)
                return {"ok": True, "domid": record.domid, "uuid": record.uuid, "config": kept}
            if op == "attach":
                async with self._lock:
                    devid = await self.attach(request["name"], request["type"], request["spec"])
                return {"ok": True, "devid": devid}
            if op == "detach":
                async with self._lock:
                    found = await self.detach(request["name"], request["type"], request["device"])
                return {"ok": True, **found}
            if op == "device-list":
                devices = await self.device_list(request["name"], request["type"])
                return {"ok": True, "devices": devices}
            if op == "down":
                await self.shutdown_all(float(request.get("timeout", 15.0)))
                down.set()
                return {"ok": True}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except TopologyError as exc:
            return {"ok": False, "error": str(exc)}
        except KeyError as exc:
            return {"ok": False, "error": f"the request has no {exc} field"}
        except json.JSONDecodeError as exc:
            return {"ok": False, "error": f"the request is not JSON: {exc}"}
        except (ValueError, LookupError, HypercallError, XenStoreError) as exc:
            return {"ok": False, "error": str(exc)}


def _number(text: str | None) -> int | None:
    """A number node the way libxl's getinfo reads one (None when absent or not a number)."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _state(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return XenbusState(int(text)).name
    except ValueError:
        return f"?{text}"
