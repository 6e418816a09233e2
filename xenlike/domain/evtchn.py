"""Event channel ports as trio objects: `await port.wait()`, `port.notify()`.

A port's own eventfd is its doorbell; the peer's eventfd, once the
hypervisor has handed it over (at bind time, by a `port_bound`
notification, or with the reply to a first EVTCHNOP_send), makes `notify`
one write(2) with no hypercall. Until then `notify` sends through the
hypervisor in the background, so it never blocks its caller.

Masking is local, as the mask bit of a real guest's shared_info is: a
masked port's notifications wait in its eventfd and `wait` returns once it
is unmasked.
"""

import os
import select
from collections.abc import Callable
from typing import Any, Protocol

import trio

from xenlike.abi.event_channel import (
    EvtchnOp,
    evtchn_alloc_unbound,
    evtchn_bind_interdomain,
    evtchn_bind_virq,
    evtchn_close,
    evtchn_send,
    evtchn_status,
    evtchn_unmask,
)
from xenlike.abi.xen import DOMID_SELF, Hypercall
from xenlike.codec import compile_struct
from xenlike.domain.hypercall import HypercallClient
from xenlike.hypercall import HypercallError, Notification, Reply

__all__ = ["Doorbell", "EventChannels", "Port", "PortClosed"]

EVTCHN_OP = Hypercall.event_channel_op
ALLOC_UNBOUND = compile_struct(evtchn_alloc_unbound, "evtchn_alloc_unbound")
BIND_INTERDOMAIN = compile_struct(evtchn_bind_interdomain, "evtchn_bind_interdomain")
BIND_VIRQ = compile_struct(evtchn_bind_virq, "evtchn_bind_virq")
CLOSE = compile_struct(evtchn_close, "evtchn_close")
SEND = compile_struct(evtchn_send, "evtchn_send")
STATUS = compile_struct(evtchn_status, "evtchn_status")
UNMASK = compile_struct(evtchn_unmask, "evtchn_unmask")


class Doorbell(Protocol):
    """An event channel port, as far as a data path needs one: every ring channel
    and byte ring takes one. `Port` is one; `xenlike.testing.CrossedDoorbell`
    is another, for tests without a hypervisor."""

    def notify(self) -> None: ...

    async def wait(self) -> int: ...


class PortClosed(trio.ClosedResourceError):
    """The port was closed locally: nothing more can be waited for or sent."""


class Port:
    """One local event channel port."""

    def __init__(
        self, channels: "EventChannels", number: int, wait_fd: int, peer_fd: int | None = None
    ) -> None:
        self._channels = channels
        self.number = number
        self._wait_fd = wait_fd
        self._peer_fd = peer_fd
        self._unmasked = trio.Event()
        self._unmasked.set()
        self.sends = 0  # notifications sent, fast path or not
        self.wakeups = 0

    def __repr__(self) -> str:
        return f"<Port {self.number}>"

    @property
    def closed(self) -> bool:
        return self._wait_fd < 0

    def notify(self) -> None:
        """Raise the event at the other end; never blocks."""
        if self._wait_fd < 0:
            raise PortClosed(f"port {self.number} is closed")
        self.sends += 1
        if self._peer_fd is not None:
            self._channels.trace_send(self.number)  # stamped before the peer can wake
            os.eventfd_write(self._peer_fd, 1)
        else:
            self._channels.send_slow(self)

    async def wait(self) -> int:
        """Sleep until the port is raised (and unmasked); return how many raises arrived."""
        while True:
            if self._wait_fd < 0:
                raise PortClosed(f"port {self.number} is closed")
            if not self._unmasked.is_set():
                await self._unmasked.wait()
                continue
            try:
                count = os.eventfd_read(self._wait_fd)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._wait_fd)
                continue
            self.wakeups += 1
            await trio.lowlevel.checkpoint_if_cancelled()
            return count

    def pending(self) -> bool:
        """Whether a raise is waiting, without consuming it (`evtchn_is_pending`)."""
        if self._wait_fd < 0:
            return False
        poller = select.poll()
        poller.register(self._wait_fd, select.POLLIN)
        return bool(poller.poll(0))

    def mask(self) -> None:
        self._unmasked = trio.Event()

    def unmask(self) -> None:
        """Deliver again: what arrived while masked is still in the doorbell."""
        self._unmasked.set()

    async def status(self) -> Any:
        """EVTCHNOP_status: the hypervisor's view of this port."""
        _, out, _ = await self._channels.hypercalls.call_struct(
            EVTCHN_OP,
            EvtchnOp.status,
            evtchn_status,
            STATUS.record(dom=DOMID_SELF, port=self.number),
        )
        return out

    async def close(self) -> None:
        """EVTCHNOP_close; the peer's port becomes unbound."""
        if self._wait_fd < 0:
            return
        await self._channels.hypercalls.call_struct(
            EVTCHN_OP, EvtchnOp.close, evtchn_close, CLOSE.record(port=self.number)
        )
        self._channels.forget(self)

    def _set_peer(self, fd: int | None) -> None:
        old, self._peer_fd = self._peer_fd, fd
        if old is not None:
            os.close(old)

    def _drop(self) -> None:
        self._set_peer(None)
        if self._wait_fd >= 0:
            os.close(self._wait_fd)
            self._wait_fd = -1
        self._unmasked.set()  # wake waiters so they see PortClosed


class EventChannels:
    """A domain's ports, and the notifications that keep them current."""

    def __init__(self, hypercalls: HypercallClient, nursery: trio.Nursery) -> None:
        self.hypercalls = hypercalls
        self._nursery = nursery
        self.ports: dict[int, Port] = {}
        self.on_send: Callable[[int], None] | None = None  # the domain's trace hook

    def trace_send(self, number: int) -> None:
        if self.on_send is not None:
            self.on_send(number)

    def _adopt(self, number: int, fds: tuple[int, ...]) -> Port:
        port = Port(self, number, fds[0], fds[1] if len(fds) > 1 else None)
        self.ports[number] = port
        return port

    async def alloc_unbound(self, remote_dom: int) -> Port:
        """A port for `remote_dom` to bind to (the front end's side of a device)."""
        _, out, fds = await self.hypercalls.call_struct(
            EVTCHN_OP,
            EvtchnOp.alloc_unbound,
            evtchn_alloc_unbound,
            ALLOC_UNBOUND.record(dom=DOMID_SELF, remote_dom=remote_dom),
        )
        return self._adopt(out.port, fds)

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> Port:
        """Connect to a port that `remote_dom` allocated for us (the back end's side)."""
        _, out, fds = await self.hypercalls.call_struct(
            EVTCHN_OP,
            EvtchnOp.bind_interdomain,
            evtchn_bind_interdomain,
            BIND_INTERDOMAIN.record(remote_dom=remote_dom, remote_port=remote_port),
        )
        return self._adopt(out.local_port, fds)

    async def bind_virq(self, virq: int) -> Port:
        _, out, fds = await self.hypercalls.call_struct(
            EVTCHN_OP, EvtchnOp.bind_virq, evtchn_bind_virq, BIND_VIRQ.record(virq=virq, vcpu=0)
        )
        return self._adopt(out.port, fds)

    async def port(self, number: int) -> Port:
        """A port this domain already has (given at boot, e.g. start_info.store_evtchn)."""
        if number in self.ports:
            return self.ports[number]
        done = await self.hypercalls.call(EVTCHN_OP, EvtchnOp.unmask, UNMASK.pack((number,)), 1)
        return self._adopt(number, done.fds)

    def send_slow(self, port: Port) -> None:
        """A send before the peer's doorbell is known: through the hypervisor."""
        self._nursery.start_soon(self._fetch_peer, port)

    async def _fetch_peer(self, port: Port) -> None:
        try:
            done = await self.hypercalls.call(
                EVTCHN_OP, EvtchnOp.send, SEND.pack((port.number,)), 1
            )
        except (HypercallError, ConnectionResetError, trio.ClosedResourceError):
            return  # a closed or unbound port: the send is dropped, as in Xen
        if done.fds:
            if port.closed:
                os.close(done.fds[0])
            else:
                port._set_peer(done.fds[0])

    def forget(self, port: Port) -> None:
        self.ports.pop(port.number, None)
        port._drop()

    def handle_notification(self, reply: Reply) -> bool:
        """Apply a port notification from the hypervisor; False if it is not one."""
        if reply.result not in (Notification.port_bound, Notification.port_unbound):
            return False
        (number,) = CLOSE.unpack(reply.payload[: CLOSE.size])
        port = self.ports.get(number)
        if reply.result == Notification.port_bound and reply.fds:
            if port is None or port.closed:
                os.close(reply.fds[0])
            else:
                port._set_peer(reply.fds[0])
        elif port is not None:
            port._set_peer(None)
        return True

    def close_all(self) -> None:
        for port in list(self.ports.values()):
            self.forget(port)
