"""The domain's side of the hypercall socket: typed async calls, and notifications.

One reader task receives every message: replies go to the task that made
the call (matched by sequence number), notifications to the handler the
domain registered. Any number of tasks may call at once.

This is the hot path of every hypercall, so a request is as a rule one
write(2) with no yield, and a call parks its task until the reader
reschedules it with the reply (no channel per call). Each request is one
whole datagram, so the send lock only orders tasks that find the socket full.
"""

import os
from collections.abc import Callable
from typing import Any

import outcome
import trio

from xenlike.abi.domctl import XEN_DOMCTL_INTERFACE_VERSION, xen_domctl
from xenlike.abi.sysctl import XEN_SYSCTL_INTERFACE_VERSION, xen_sysctl
from xenlike.abi.xen import Hypercall
from xenlike.codec import Codec, compile_struct
from xenlike.hypercall import (
    ANCILLARY_SPACE,
    HYPERCALL_MAX_MESSAGE,
    HypercallError,
    MessageKind,
    Reply,
    Request,
    fds_received,
)

__all__ = ["HypercallClient", "HypercallResult"]

DOMCTL = compile_struct(xen_domctl, "xen_domctl")
SYSCTL = compile_struct(xen_sysctl, "xen_sysctl")
_codecs: dict[int, Codec] = {}


def codec_for(layout: Any) -> Codec:
    """One compiled codec per layout, shared by every call."""
    codec = _codecs.get(id(layout))
    if codec is None:
        codec = _codecs[id(layout)] = compile_struct(layout, "arg")
    return codec


class HypercallResult:
    """A successful call: Xen's result, the OUT payload, and descriptors it brought."""

    __slots__ = ("result", "payload", "fds")

    def __init__(self, result: int, payload: bytes, fds: tuple[int, ...]) -> None:
        self.result = result
        self.payload = payload
        self.fds = fds


class _Waiter:
    """A call in flight: its reply (or the socket's end) and, once parked, its task."""

    __slots__ = ("task", "outcome")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.outcome: outcome.Outcome[Reply] | None = None

    def deliver(self, result: outcome.Outcome[Reply]) -> None:
        self.outcome = result
        if self.task is not None:
            trio.lowlevel.reschedule(self.task, result)


def _abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.SUCCEEDED


class HypercallClient:
    """Hypercalls over the domain's SOCK_SEQPACKET socket to the hypervisor."""

    def __init__(self, sock: trio.socket.SocketType,
                 on_notification: Callable[[Reply], None] | None = None) -> None:
        self.sock = sock
        self.on_notification = on_notification
        self._seq = 0
        self._waiting: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self._closed: BaseException | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Receive replies and notifications until the hypervisor closes the socket."""
        task_status.started()
        try:
            while True:
                data, ancdata, _, _ = await self.sock.recvmsg(HYPERCALL_MAX_MESSAGE + 1,
                                                              ANCILLARY_SPACE)
                if not data:
                    break
                reply = Reply.decode(data, fds_received(ancdata))
                if reply.kind == MessageKind.notification:
                    self._notify(reply)
                    continue
                waiter = self._waiting.pop(reply.seq, None)
                if waiter is None:
                    _close_all(reply.fds)
                else:
                    waiter.deliver(outcome.Value(reply))
        finally:
            self._closed = ConnectionResetError("the hypervisor closed the hypercall socket")
            for waiter in self._waiting.values():
                waiter.deliver(outcome.Error(ConnectionResetError(
                    "the hypervisor closed the hypercall socket")))
            self._waiting.clear()

    def _notify(self, reply: Reply) -> None:
        if self.on_notification is None:
            _close_all(reply.fds)
        else:
            self.on_notification(reply)

    async def call(self, op: int, cmd: int, payload: bytes = b"", count: int | None = None
                   ) -> HypercallResult:
        """One hypercall; raises HypercallError when it returns -errno."""
        if self._closed is not None:
            raise self._closed
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        waiter = self._waiting[seq] = _Waiter()
        message = Request(seq, op, cmd, len(payload) if count is None else count, payload).encode()
        try:
            await self._send(message)
            if waiter.outcome is None:  # as a rule: park until the reader hands the reply over
                waiter.task = trio.lowlevel.current_task()
                reply = await trio.lowlevel.wait_task_rescheduled(_abort)
            else:  # it came while the send yielded
                reply = waiter.outcome.unwrap()
        finally:
            self._waiting.pop(seq, None)
        if reply.result < 0:
            _close_all(reply.fds)
            raise HypercallError(-reply.result, f"hypercall {_op_name(op)} cmd {cmd}")
        return HypercallResult(reply.result, reply.payload, reply.fds)

    async def _send(self, message: bytes) -> None:
        if not self._send_lock.locked():
            try:
                os.write(self.sock.fileno(), message)  # one datagram; the reply wait checkpoints
                return
            except BlockingIOError:
                pass
        async with self._send_lock:
            await self.sock.send(message)

    async def call_struct(self, op: int, cmd: int, layout: Any, arg: Any) -> tuple[int, Any, tuple[int, ...]]:
        """A call taking one Xen struct; returns (result, the struct as sent back, fds)."""
        codec = codec_for(layout)
        done = await self.call(op, cmd, codec.pack(arg), 1)
        out = codec.unpack(done.payload[: codec.size]) if done.payload else arg
        return done.result, out, done.fds

    async def call_batch(self, op: int, cmd: int, layout: Any, args: list[Any]
                         ) -> tuple[int, list[Any], tuple[int, ...]]:
        """A batched call (grant-table ops): each struct comes back with its own status."""
        codec = codec_for(layout)
        done = await self.call(op, cmd, b"".join(codec.pack(a) for a in args), len(args))
        size = codec.size
        outs = [codec.unpack_from(done.payload, i * size) for i in range(len(done.payload) // size)]
        return done.result, outs, done.fds

    async def domctl(self, cmd: int, domain: int, union_layout: Any = None, value: Any = None
                     ) -> tuple[int, Any]:
        """A xen_domctl with its command struct in `u`; returns (result, the `u` struct back)."""
        u = codec_for(union_layout).pack(value).ljust(128, b"\0") if union_layout else bytes(128)
        arg = DOMCTL.record(cmd=cmd, interface_version=XEN_DOMCTL_INTERFACE_VERSION,
                            domain=domain, u=u)
        done = await self.call(Hypercall.domctl, cmd, DOMCTL.pack(arg), 1)
        out = DOMCTL.unpack(done.payload[: DOMCTL.size])
        back = codec_for(union_layout).unpack(out.u[: codec_for(union_layout).size]) \
            if union_layout else None
        _close_all(done.fds)
        return out.domain, back

    async def sysctl(self, cmd: int, union_layout: Any, value: Any) -> tuple[int, Any, bytes]:
        """A xen_sysctl; returns (result, the `u` struct back, any records after it)."""
        codec = codec_for(union_layout)
        arg = SYSCTL.record(cmd=cmd, interface_version=XEN_SYSCTL_INTERFACE_VERSION,
                            u=codec.pack(value).ljust(128, b"\0"))
        done = await self.call(Hypercall.sysctl, cmd, SYSCTL.pack(arg), 1)
        out = SYSCTL.unpack(done.payload[: SYSCTL.size])
        return done.result, codec.unpack(out.u[: codec.size]), done.payload[SYSCTL.size:]


def _op_name(op: int) -> str:
    try:
        return Hypercall(op).name
    except ValueError:
        return str(op)


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
