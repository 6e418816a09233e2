"""Event channels (EVTCHNOP_*): Xen's port tables, with eventfds as doorbells.

Each port has an eventfd the hypervisor creates when the port is made; its
owner waits on it. Binding is the hypervisor's business, as in Xen, but
sending is not: a domain that sends on an interdomain port gets the peer
port's eventfd with its first EVTCHNOP_send (or at once from
bind_interdomain) and from then on raises the peer with one write(2), no
round trip. Closing a port gives its peer back the unbound state and tells
the peer's domain, which forgets the doorbell it cached; a new binding
always gets a new eventfd, so a stale doorbell can only ring an empty room,
as a send to an unbound port does in Xen.

Masking is the domain's own business (it is a bit in the guest's
shared_info in Xen); EVTCHNOP_unmask hands the owner its port's eventfd,
which holds whatever arrived while masked, so nothing pending is lost.
"""

import os
from typing import Any

import attrs

from xenlike.abi.errno import Errno
from xenlike.abi.event_channel import (
    EvtchnOp,
    EvtchnStat,
    evtchn_alloc_unbound,
    evtchn_bind_interdomain,
    evtchn_bind_virq,
    evtchn_close,
    evtchn_send,
    evtchn_status,
    evtchn_unmask,
)
from xenlike.abi.xen import DOMID_SELF, NR_VIRQS, Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import HypercallError, Notification
from xenlike.hypervisor.table import Call, hypercall

__all__ = ["EvtchnTable", "Evtchn", "attach", "send_virq", "teardown"]

MAX_PORT_DOMU = 1023  # libxl's default max_event_channels for a guest
MAX_PORT_DOM0 = 4095  # the 2-level ABI's limit (64 words of 64 bits)
CLOSE = compile_struct(evtchn_close, "evtchn_close")
EVTCHN_OP = Hypercall.event_channel_op


@attrs.define(eq=False)
class Evtchn:
    number: int
    state: EvtchnStat
    eventfd: int
    remote_dom: int = 0  # unbound: who may bind; interdomain: the peer
    remote_port: int = 0
    virq: int = 0
    vcpu: int = 0


@attrs.define(eq=False)
class EvtchnTable:
    """One domain's port table."""

    max_port: int
    ports: dict[int, Evtchn] = attrs.field(factory=dict)
    virqs: dict[int, int] = attrs.field(factory=dict)
    dying: bool = False  # torn down: no new ports, as Xen's get_free_port refuses

    def allocate(self, state: EvtchnStat, **fields: Any) -> Evtchn:
        """The lowest free port (port 0 is never valid), with a fresh doorbell."""
        if self.dying:
            raise HypercallError(Errno.EINVAL, "the domain is dying")
        number = next((n for n in range(1, self.max_port + 1) if n not in self.ports), None)
        if number is None:
            raise HypercallError(Errno.ENOSPC, f"all {self.max_port} event channels in use")
        try:
            doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError as exc:  # the host is out of descriptors: Xen's failed allocation
            raise HypercallError(Errno.ENOMEM, f"no eventfd for a port: {exc.strerror}") from None
        port = Evtchn(number, state, doorbell, **fields)
        self.ports[number] = port
        return port

    def get(self, number: int) -> Evtchn:
        port = self.ports.get(number)
        if port is None:
            raise HypercallError(Errno.EINVAL, f"port {number} is not open")
        return port


def table(domain: Any) -> EvtchnTable:
    channels: EvtchnTable = domain.evtchn
    return channels


def attach(hv: Any, domain: Any) -> None:
    domain.evtchn = EvtchnTable(MAX_PORT_DOM0 if domain.privileged else MAX_PORT_DOMU)


def _target(call: Call, dom: int) -> Any:
    """DOMID_SELF or the caller itself; another domain only for Dom0."""
    if dom in (DOMID_SELF, call.caller.domid):
        return call.caller
    if not call.caller.privileged:
        raise HypercallError(Errno.EPERM, f"d{call.caller.domid} may not act for d{dom}")
    return call.hv.lookup(dom)


@hypercall(EVTCHN_OP, EvtchnOp.alloc_unbound, args=evtchn_alloc_unbound)
def alloc_unbound(call: Call, arg: Any) -> tuple[int, Any]:
    owner = _target(call, arg.dom)
    remote = call.caller.domid if arg.remote_dom == DOMID_SELF else arg.remote_dom
    port = table(owner).allocate(EvtchnStat.unbound, remote_dom=remote)
    if owner is call.caller:
        call.send_fd(port.eventfd)
    return 0, arg._replace(port=port.number)


@hypercall(EVTCHN_OP, EvtchnOp.bind_interdomain, args=evtchn_bind_interdomain)
def bind_interdomain(call: Call, arg: Any) -> tuple[int, Any]:
    local = call.caller
    remote_dom = local.domid if arg.remote_dom == DOMID_SELF else arg.remote_dom
    remote = call.hv.lookup(remote_dom)
    remote_port = table(remote).get(arg.remote_port)
    if remote_port.state is not EvtchnStat.unbound or remote_port.remote_dom != local.domid:
        raise HypercallError(
            Errno.EINVAL, f"d{remote_dom} port {arg.remote_port} is not unbound for d{local.domid}"
        )
    port = table(local).allocate(
        EvtchnStat.interdomain, remote_dom=remote_dom, remote_port=remote_port.number
    )
    remote_port.state = EvtchnStat.interdomain
    remote_port.remote_dom = local.domid
    remote_port.remote_port = port.number
    call.send_fd(port.eventfd)  # to wait on
    call.send_fd(remote_port.eventfd)  # to send with, no hypercall needed
    call.hv.notify(
        remote, Notification.port_bound, CLOSE.pack((remote_port.number,)), (port.eventfd,)
    )
    os.eventfd_write(port.eventfd, 1)  # Xen marks the new local port pending
    return 0, arg._replace(local_port=port.number)


@hypercall(EVTCHN_OP, EvtchnOp.bind_virq, args=evtchn_bind_virq)
def bind_virq(call: Call, arg: Any) -> tuple[int, Any]:
    if not 0 <= arg.virq < NR_VIRQS:
        raise HypercallError(Errno.EINVAL, f"virq {arg.virq} out of range")
    if arg.vcpu != 0:
        raise HypercallError(Errno.ENOENT, f"vcpu {arg.vcpu} does not exist")
    channels = table(call.caller)
    if arg.virq in channels.virqs:
        raise HypercallError(Errno.EEXIST, f"virq {arg.virq} is already bound")
    port = channels.allocate(EvtchnStat.virq, virq=arg.virq)
    channels.virqs[arg.virq] = port.number
    call.send_fd(port.eventfd)
    return 0, arg._replace(port=port.number)


@hypercall(EVTCHN_OP, EvtchnOp.send, args=evtchn_send)
def send(call: Call, arg: Any) -> int:
    port = table(call.caller).get(arg.port)
    if port.state is EvtchnStat.interdomain:
        peer = table(call.hv.lookup(port.remote_dom)).get(port.remote_port)
        os.eventfd_write(peer.eventfd, 1)
        call.send_fd(peer.eventfd)  # later sends go straight to it
    elif port.state is not EvtchnStat.unbound:  # a send on an unbound port is dropped
        raise HypercallError(Errno.EINVAL, f"port {arg.port} is {port.state.name}")
    return 0


@hypercall(EVTCHN_OP, EvtchnOp.close, args=evtchn_close)
def close(call: Call, arg: Any) -> int:
    close_port(call.hv, call.caller, table(call.caller).get(arg.port))
    return 0


@hypercall(EVTCHN_OP, EvtchnOp.status, args=evtchn_status)
def status(call: Call, arg: Any) -> tuple[int, Any]:
    owner = _target(call, arg.dom)
    port = table(owner).ports.get(arg.port)
    if port is None:
        if not 0 < arg.port <= table(owner).max_port:
            raise HypercallError(Errno.EINVAL, f"port {arg.port} out of range")
        return 0, arg._replace(status=EvtchnStat.closed, vcpu=0, u=bytes(8))
    if port.state is EvtchnStat.unbound:
        u = port.remote_dom.to_bytes(2, "little").ljust(8, b"\0")
    elif port.state is EvtchnStat.interdomain:
        u = (
            port.remote_dom.to_bytes(2, "little")
            + bytes(2)
            + port.remote_port.to_bytes(4, "little")
        )
    else:
        u = port.virq.to_bytes(4, "little").ljust(8, b"\0")
    return 0, arg._replace(status=port.state, vcpu=port.vcpu, u=u)


@hypercall(EVTCHN_OP, EvtchnOp.unmask, args=evtchn_unmask)
def unmask(call: Call, arg: Any) -> int:
    """Hand the owner its port's doorbell, and the peer's if the port is bound."""
    port = table(call.caller).get(arg.port)
    call.send_fd(port.eventfd)
    if port.state is EvtchnStat.interdomain:
        call.send_fd(table(call.hv.lookup(port.remote_dom)).get(port.remote_port).eventfd)
    return 0


def close_port(hv: Any, domain: Any, port: Evtchn) -> None:
    """EVTCHNOP_close: free the port; an interdomain peer goes back to unbound."""
    channels = table(domain)
    if port.state is EvtchnStat.interdomain:
        peer_domain = hv.domains.get(port.remote_dom)
        peer = table(peer_domain).ports.get(port.remote_port) if peer_domain else None
        if peer is not None and peer.state is EvtchnStat.interdomain:
            peer.state = EvtchnStat.unbound
            peer.remote_dom = domain.domid
            peer.remote_port = 0
            hv.notify(peer_domain, Notification.port_unbound, CLOSE.pack((peer.number,)))
    if port.state is EvtchnStat.virq:
        channels.virqs.pop(port.virq, None)
    channels.ports.pop(port.number, None)
    os.close(port.eventfd)


def teardown(hv: Any, domain: Any) -> None:
    """Close every port of a dying domain; each peer sees its port unbound."""
    channels = domain.evtchn
    if channels is None:
        return
    channels.dying = True
    for port in list(channels.ports.values()):
        close_port(hv, domain, port)


def send_virq(hv: Any, domain: Any, virq: int) -> None:
    """Raise a VIRQ in `domain` if it bound one; otherwise it is dropped, as in Xen."""
    number = table(domain).virqs.get(virq)
    if number is not None:
        os.eventfd_write(table(domain).ports[number].eventfd, 1)
