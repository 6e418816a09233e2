"""Device directories in XenStore, written by the toolstack as libxl does.

For each device the toolstack writes the front end's directory in the
guest's tree (owned by the guest, readable by the back-end domain) and the
back end's in Dom0's (owned by Dom0, readable by the guest), with the cross
links, `state` = Initialising, and the keys of the device type
(xen-abi.md section 7): a vbd's `virtual-device`, `device-type`, `params`,
`mode`; a vif's `handle`, `mac`, `bridge`, `ip`. A custom device's extra
topology keys go to its back end's directory for its driver to read (`params`
names one of Dom0's images and is written as its path in the run directory).

Removing a device is libxl's (libxl__initiate_device_generic_remove and
device_backend_callback): `online` = 0 and the back end's `state` = Closing
in one transaction, so the back end and the front end close the device
between them; up to REMOVE_TIMEOUT seconds for the back end to reach
Closed; then, Closed or not (forced), both directories and their error
nodes are removed, and the buses on both sides stop the drivers.
"""

import logging
from typing import Any

import trio

from xenlike.abi.xenbus import XenbusState
from xenlike.topology import DiskSpec, VifSpec
from xenlike.xenbus.driver import error_node
from xenlike.xenstore import XenStoreError

__all__ = ["DEVICE_WRITERS", "REMOVE_TIMEOUT", "DeviceWriter", "remove_device"]

log = logging.getLogger("xenlike.dom0.devices")
INITIALISING = str(int(XenbusState.Initialising))
CLOSING = str(int(XenbusState.Closing))
CLOSED = str(int(XenbusState.Closed))
REMOVE_TIMEOUT = 10.0  # libxl's LIBXL_DESTROY_TIMEOUT, seconds


class DeviceWriter:
    """A generic device: `devices = [{ type = "echo", key = value, ... }]`."""

    def __init__(self, device_type: str, spec: Any, toolstack: Any) -> None:
        self.type = device_type
        self.spec = spec
        self.toolstack = toolstack

    def devid(self, index: int) -> int:
        return int(self.spec.get("devid", index)) if isinstance(self.spec, dict) else index

    def frontend_keys(self, index: int) -> dict[str, str]:
        return {}

    def backend_keys(self, index: int) -> dict[str, str]:
        skip = {"type", "driver", "devid", "backend"}
        keys = {key: str(value) for key, value in self.spec.items() if key not in skip}
        if "params" in keys:  # one of Dom0's images, by name (the topology checked it)
            keys["params"] = str(
                self.toolstack.topology.image_path(keys["params"], self.toolstack.run_dir)
            )
        return keys

    @property
    def backend_domid(self) -> int:
        backend = (
            self.spec.get("backend", "0") if isinstance(self.spec, dict) else self.spec.backend
        )
        return int(backend)

    async def add(self, xs: Any, domid: int, index: int) -> None:
        devid = self.devid(index)
        back_domid = self.backend_domid
        front = f"/local/domain/{domid}/device/{self.type}/{devid}"
        back = f"/local/domain/{back_domid}/backend/{self.type}/{domid}/{devid}"

        async def write(tx: Any) -> None:
            await tx.write(front, "")
            await tx.set_perms(front, [f"n{domid}", f"r{back_domid}"])
            await tx.write(back, "")
            await tx.set_perms(back, [f"n{back_domid}", f"r{domid}"])
            front_keys = {
                "backend": back,
                "backend-id": str(back_domid),
                "state": INITIALISING,
                **self.frontend_keys(index),
            }
            back_keys = {
                "frontend": front,
                "frontend-id": str(domid),
                "online": "1",
                "state": INITIALISING,
                **self.backend_keys(index),
            }
            for key, value in front_keys.items():
                await tx.write(f"{front}/{key}", value)
            for key, value in back_keys.items():
                await tx.write(f"{back}/{key}", value)

        await xs.transact(write)


class VbdWriter(DeviceWriter):
    """libxl__device_disk_add's keys for `disk = ["...vdev=xvda, target=IMAGE"]`."""

    spec: DiskSpec

    def devid(self, index: int) -> int:
        return self.spec.devid

    def frontend_keys(self, index: int) -> dict[str, str]:
        return {"virtual-device": str(self.spec.devid), "device-type": self.spec.devtype}

    def backend_keys(self, index: int) -> dict[str, str]:
        topology = self.toolstack.topology
        image = topology.image_path(self.spec.target, self.toolstack.run_dir)
        return {
            "params": str(image),
            "type": "file",
            "mode": "r" if self.spec.readonly else "w",
            "dev": self.spec.vdev,
            "device-type": self.spec.devtype,
            "removable": "0",
            "bootable": "1",
            "discard-enable": "1" if self.spec.discard else "0",
        }


class VifWriter(DeviceWriter):
    """libxl__device_nic_add's keys for `vif = ["mac=..., bridge=xenbr0, ip=..."]`."""

    spec: VifSpec

    def frontend_keys(self, index: int) -> dict[str, str]:
        keys = {"handle": str(index), "mac": self.spec.mac}
        if self.spec.mtu is not None:
            keys["mtu"] = str(self.spec.mtu)
        return keys

    def backend_keys(self, index: int) -> dict[str, str]:
        keys = {
            "handle": str(index),
            "mac": self.spec.mac,
            "bridge": self.spec.bridge,
            "type": "vif",
        }
        if self.spec.ip:
            keys["ip"] = self.spec.ip
        if self.spec.vifname:
            keys["vifname"] = self.spec.vifname
        if self.spec.mtu is not None:  # libxl writes it to both ends; each reads its own
            keys["mtu"] = str(self.spec.mtu)
        return keys


async def remove_device(xs: Any, front: str, back: str, timeout: float = REMOVE_TIMEOUT) -> bool:
    """Remove one device as libxl does; True if the back end closed it in time,
    False if it was forced (its nodes are removed either way)."""

    async def close(tx: Any) -> None:
        if await _read(tx, f"{back}/state") is None:
            return  # no back end (already gone): nothing to close
        await tx.write(f"{back}/online", "0")
        await tx.write(f"{back}/state", CLOSING)

    await xs.transact(close)
    closed = False
    with trio.move_on_after(timeout):
        async with xs.watch(f"{back}/state") as events:
            async for _ in events:
                state = await _read(xs, f"{back}/state")
                if state is None or state == CLOSED:
                    closed = True
                    break
    if not closed:
        log.warning("%s: the back end did not reach Closed in %gs: forced", back, timeout)

    async def destroy(tx: Any) -> None:
        errors = [error_node(path).removesuffix("/error") for path in (front, back)]
        for path in (front, back, *errors):
            if await _read(tx, path) is not None:
                await tx.rm(path)

    await xs.transact(destroy)
    return closed


async def _read(xs: Any, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode()
    except XenStoreError:
        return None


DEVICE_WRITERS: dict[str, type[DeviceWriter]] = {
    "vbd": VbdWriter,
    "vif": VifWriter,
    "*": DeviceWriter,
}
