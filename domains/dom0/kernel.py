"""Dom0's boot: its services as trio tasks in one process (see the package docstring)."""

import errno
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from domains.dom0.hw import Disk, create_images
from domains.dom0.hw.net import Network
from domains.dom0.hw.tunnel import UplinkError
from domains.dom0.toolstack import Toolstack
from domains.dom0.xenconsoled import XenConsoled
from domains.dom0.xenstored import Dom0XenStored
from xenlike.domain import Domain
from xenlike.rundir import RunDir
from xenlike.topology import load_topology
from xenlike.xc import XenControl
from xenlike.xenbus import BackendBus, DriverRegistry, XenbusContext
from xenlike.xenstore import open_client

__all__ = ["main"]

log = logging.getLogger("xenlike.dom0")


def _params(cmdline: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in cmdline.split() if "=" in word)


def _image_opener(topology: Any, run_dir: Path) -> Callable[..., Disk]:
    """Disk.open for Dom0's declared images only: a back-end directory naming any
    other file (whoever wrote it) opens nothing."""
    allowed = set()
    for name in topology.dom0.images:
        try:
            allowed.add(topology.image_path(name, run_dir))
        except ValueError as exc:
            log.error("image %s: %s", name, exc)

    def open_image(path: Path, **options: Any) -> Disk:
        if Path(path).resolve() not in allowed:
            raise PermissionError(errno.EACCES, "not one of Dom0's images", str(path))
        return Disk.open(path, **options)

    return open_image


async def main(domain: Domain) -> None:
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s dom0 %(name)s: %(message)s"
    )
    params = _params(domain.cmdline)
    run_dir = RunDir(Path(params["rundir"]))
    topology = load_topology(Path(params.get("topology", run_dir.topology)))
    for image in create_images(topology, run_dir.path):
        log.info("created disk image %s", image)
    domain.hardware.disks = _image_opener(topology, run_dir.path)  # what blkback opens
    domain.hardware.net = network = Network.from_topology(topology, run_dir.path)  # its bridges
    down = trio.Event()
    async with trio.open_nursery() as nursery:
        xenstored = Dom0XenStored(domain, nursery)
        await nursery.start(xenstored.serve_unix, run_dir.xenstored_socket)
        try:
            await nursery.start(network.run)
        except UplinkError as exc:  # told to join other hosts, it will not run cut off
            log.error("no NIC: %s: %s", topology.dom0.nic, exc)
            await domain.console_write(f"dom0: no NIC: {topology.dom0.nic}: {exc}")
            nursery.cancel_scope.cancel()
            return
        async with open_client(run_dir.xenstored_socket) as xs:
            await xs.write("/local/domain/0/name", "Domain-0")
            await xs.write("/local/domain/0/domid", "0")
            registry = DriverRegistry()
            registry.load_entry_points()
            for device in (d for guest in topology.domains for d in guest.devices):
                if "driver" in device:  # one that cannot load fails its devices only
                    if registry.register_dotted(device["driver"], device["type"]) is None:
                        log.error("%s", registry.unloadable(device["type"]))
            backends = BackendBus(XenbusContext(domain, xs, nursery), registry)
            await nursery.start(backends.run)
            consoled = XenConsoled(domain, run_dir.consoles, nursery)
            toolstack = Toolstack(
                domain,
                XenControl(domain.hypercalls),
                xs,
                consoled,
                run_dir.path,
                topology,
                registry,
            )
            nursery.start_soon(toolstack.follow_domains)
            await nursery.start(
                lambda task_status: toolstack.serve(
                    run_dir.toolstack, down=down, task_status=task_status
                )
            )
            await domain.console_write(
                f"dom0: services up; creating {len(topology.domains)} "
                f"guest(s) of topology {topology.name!r}"
            )
            for config in topology.domains:
                try:
                    await toolstack.create(config)
                except Exception as exc:
                    log.error("creating %s failed: %s", config.name, exc)
                    await domain.console_write(f"dom0: creating {config.name} failed: {exc}")
                    toolstack.note_failure(config.name, None, f"not created: {exc}")
            await xs.write("/tool/xenlike/ready", "1")
            await down.wait()
            await domain.console_write("dom0: every guest is down; shutting down")
            nursery.cancel_scope.cancel()
