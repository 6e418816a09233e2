"""Device directories in XenStore, written by the toolstack as libxl does.

For each device the toolstack writes the front end's directory in the
guest's tree (owned by the guest, readable by the back-end domain) and the
back end's in Dom0's (owned by Dom0, readable by the guest), with the cross
links, `state` = Initialising, and the keys of the device type
(xen-abi.md section 7): a vbd's `virtual-device`, `device-type`, `params`,
`mode`; a vif's `handle`, `mac`, `bridge`, `ip`. A custom device's extra
topology keys go to its back end's directory for its driver to read (`params`
names one of Dom0's images and is written as its path in the run directory).
"""

from typing import Any

from xenlike.abi.xenbus import XenbusState
from xenlike.topology import DiskSpec, VifSpec

__all__ = ["DEVICE_WRITERS", "DeviceWriter"]

INITIALISING = str(int(XenbusState.Initialising))


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


DEVICE_WRITERS: dict[str, type[DeviceWriter]] = {
    "vbd": VbdWriter,
    "vif": VifWriter,
    "*": DeviceWriter,
}
