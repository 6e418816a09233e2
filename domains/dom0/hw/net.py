"""Dom0's network hardware: the bridges netback plugs vifs into, the NIC, captures.

Dom0 boots with xenbr0 and every bridge its topology's vif lines name; the
NIC (`[dom0] nic`) is xenbr0's uplink. Back ends reach the bridges through
`domain.hardware.net.bridge(name)`. A `vxlan:VNI` NIC joins xenbr0 to the
other hosts' (`tunnel`); if the kernel refuses it, Dom0 does not boot
(`UplinkError`): a host cut off from the hosts it was told to join would
look up and not be.

Capturing: each bridge listens on `<run-dir>/net/<bridge>.pcap.sock`; a
client that connects gets a pcap stream (file header, then one record per
frame crossing the bridge from then on) until it closes the connection.
That is what `xenlike capture` reads. A client too slow to keep up loses
frames, never the bridge its speed: each has a bounded queue.
"""

import contextlib
import logging
from collections import deque
from pathlib import Path
from typing import Any

import trio

from domains.dom0.hw.bridge import Bridge
from domains.dom0.hw.nic import PcapNic, TapNic, TapUnavailable, complete
from domains.dom0.hw.tunnel import VxlanUplink
from domains.dom0.xenconsoled import unix_listener
from drivers.netif.protocol import DEFAULT_MTU
from xenlike.tools.pcap import capture_socket, file_header, record
from xenlike.topology import Topology

__all__ = ["DEFAULT_BRIDGE", "Network"]

log = logging.getLogger("xenlike.dom0.net")

DEFAULT_BRIDGE = "xenbr0"
CAPTURE_QUEUE = 4096  # records waiting for a slow capture client before it loses frames


class Network:
    """The bridges by name, the NIC, and one capture socket per bridge."""

    def __init__(self, bridges: list[str], nic: str, run_dir: Path, topology: Topology) -> None:
        self.bridges = {name: Bridge(name) for name in dict.fromkeys([DEFAULT_BRIDGE, *bridges])}
        self.nic = nic
        self.run_dir = Path(run_dir)
        self._topology = topology

    @classmethod
    def from_topology(cls, topology: Topology, run_dir: Path) -> "Network":
        names = [vif.bridge for guest in topology.domains for vif in guest.vifs]
        return cls(names, topology.dom0.nic, run_dir, topology)

    def bridge(self, name: str) -> Bridge:
        """A bridge by name; LookupError when Dom0 has none of that name (as a missing
        bridge fails Xen's vif-bridge script)."""
        try:
            return self.bridges[name]
        except KeyError:
            raise LookupError(
                f"bridge {name!r} does not exist in Dom0; its bridges: {', '.join(self.bridges)}"
            ) from None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Capture sockets and the NIC, until cancelled; UplinkError before it has
        started when a vxlan NIC cannot be built."""
        sockets = self.run_dir / "net"
        sockets.mkdir(parents=True, exist_ok=True)
        uplink = self._uplink()
        tap = await uplink.open() if uplink is not None else None
        try:
            async with trio.open_nursery() as nursery:
                for bridge in self.bridges.values():
                    path = capture_socket(self.run_dir, bridge.name)
                    path.unlink(missing_ok=True)
                    listener = await unix_listener(path)
                    nursery.start_soon(
                        trio.serve_listeners, self._capture_handler(bridge), [listener]
                    )
                if tap is not None:
                    nursery.start_soon(tap.run, self.bridges[DEFAULT_BRIDGE])
                else:
                    self._start_nic(nursery)
                task_status.started()
        finally:
            if tap is not None:
                tap.close()
            if uplink is not None:
                with trio.CancelScope(shield=True):
                    await uplink.close()

    def _uplink(self) -> VxlanUplink | None:
        """The VXLAN uplink a `vxlan:VNI` NIC asks for, sized for the guests' largest MTU."""
        topology = self._topology
        if topology.vni is None or topology.local is None:
            return None
        vifs = [vif for guest in topology.domains for vif in guest.vifs]
        return VxlanUplink(
            host=topology.name,
            vni=topology.vni,
            local=topology.local,
            peers=topology.peers,
            mtu=max([vif.mtu or DEFAULT_MTU for vif in vifs], default=DEFAULT_MTU),
            run_dir=self.run_dir,
        )

    def _start_nic(self, nursery: trio.Nursery) -> None:
        mode, _, argument = self.nic.partition(":")
        uplink = self.bridges[DEFAULT_BRIDGE]
        if mode == "tap":
            try:
                tap = TapNic(argument)
            except TapUnavailable as exc:
                log.error("no NIC: %s", exc)
                return
            nursery.start_soon(tap.run, uplink)
            log.info("NIC: TAP device %s on %s", argument, uplink.name)
        elif mode == "pcap":
            try:
                pcap = PcapNic(self._topology.image_path(argument, self.run_dir))
            except ValueError as exc:
                log.error("no NIC: %s", exc)
                return
            uplink.taps.append(pcap)
            nursery.start_soon(pcap.run)
            log.info("NIC: recording %s to %s", uplink.name, pcap.path)

    def _capture_handler(self, bridge: Bridge) -> Any:
        async def handle(stream: trio.SocketStream) -> None:
            await self._stream_capture(bridge, stream)

        return handle

    async def _stream_capture(self, bridge: Bridge, stream: trio.SocketStream) -> None:
        """One capture client: pcap records of the bridge's frames until it hangs up."""
        queue: deque[bytes] = deque()
        wake = trio.Event()
        dropped = 0

        def tap(frame: bytes, flags: int) -> None:
            nonlocal wake, dropped
            if len(queue) >= CAPTURE_QUEUE:
                dropped += 1
                return
            data = complete(frame, flags)
            if data is not None:
                queue.append(record(data))
                wake.set()

        async def send() -> None:
            nonlocal wake
            await stream.send_all(file_header())
            while True:
                await wake.wait()
                wake = trio.Event()
                batch = b"".join(queue)
                queue.clear()
                await stream.send_all(batch)

        async def until_hangup() -> None:
            while await stream.receive_some(4096):
                pass

        bridge.taps.append(tap)
        log.info("%s: capture client connected", bridge.name)
        try:
            async with trio.open_nursery() as nursery:

                async def then_stop(task: Any) -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await task()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(then_stop, send)
                nursery.start_soon(then_stop, until_hangup)
        finally:
            bridge.taps.remove(tap)
            log.info("%s: capture client gone (%d frames lost to its queue)", bridge.name, dropped)
            await trio.aclose_forcefully(stream)
