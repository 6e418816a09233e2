"""The domain's side of the hypercall socket: typed async calls, and notifications.

Any number of tasks may call at once. Replies are matched to calls by
sequence number, and notifications go to the handler the domain registered.

This is the hot path of every hypercall, so it costs about what a bare
request and response would: a request is as a rule one write(2) with no
yield, then the calling task waits for the socket and reads its own reply,
routing anything else that comes first (no hand-over between tasks): one
pass of the scheduler per call. One call reads at a time; calls made
meanwhile park until it hands their replies over.

The background task (`run`) reads while no call does, so notifications are
not left waiting. It waits on its own duplicate of the socket (trio lets
one task wait on an fd at a time), and both fds wake together, so while
calls are being made it stands aside: it sleeps `QUIET` seconds at a time
until a whole one passes with no call made, and only then waits on the
socket again. Handing reading back after every call instead cost the
guest one more scheduler pass per call (see `QUIET`). A notification
that comes between two calls of a burst is read by the next call, or at
the latest when the burst has been quiet for `QUIET`.

A hypercall is synchronous for the vCPU that makes it (Linux's privcmd
ioctl blocks the calling thread until Xen returns), and so is the reading
call here when the hypervisor is another process: it waits for its reply in
the kernel, in poll(2), not in trio's loop, so its reply is read as soon as
it wakes, with no epoll re-arm and no scheduler pass (see `KERNEL_WAIT`).
The guest's other tasks wait meanwhile, as a vCPU's other work waits for a
hypercall, but never longer than `KERNEL_WAIT` in all: past it the call
yields to trio (and waits in trio's loop if its reply is still not there),
so a slow or stalled hypervisor stalls nothing but the calls, and
cancellation works past the cap.
"""

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

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
    fds_received,
    pack_request_header,
)

__all__ = ["HypercallClient", "HypercallResult"]

DOMCTL = compile_struct(xen_domctl, "xen_domctl")
SYSCTL = compile_struct(xen_sysctl, "xen_sysctl")
QUIET = 0.002
"""Seconds without a call before `run` waits on the socket again (see the module doc).

Resumed after every call, `run` cost the guest a scheduler pass per call
(trio's loop: about 30,000 instructions, callgrind). Standing aside, it
wakes about 0.03 times per call in a burst. Measured 2026-12 with
bench/hypercall.py, together with the wait before the read: both ends
pinned to one vCPU, guest CPU per call 28.1 -> 25.0 us (user-space
instructions 119k -> 100k, callgrind); across vCPUs the guest's CPU per
call did not move measurably (61.7 vs 63.3 us, medians of 4 runs)."""
KERNEL_WAIT = 0.002
"""Seconds a guest runs calls without yielding to trio, waiting for replies in poll(2).

Waiting in trio's loop cost the guest an epoll re-arm and a scheduler pass
per call; in the kernel the reply is read as soon as the caller wakes. The
cap bounds how long the guest's other tasks wait (for a slow hypervisor,
or for a burst of fast calls: the calls yield once it is spent). Measured
2026-12 with bench/hypercall.py, main and this alternated (5 x 3 rounds,
medians, load 4-6): guest CPU per call 35.5 -> 25.0 us (raw client 27.2,
27.4), hypervisor's 25.7 -> 22.6 (it too wakes less often for nothing)."""
_NOTIFICATION = int(MessageKind.notification)  # an enum member costs ~0.3 us to look up (3.11)
_codecs: dict[int, Codec] = {}
_decoders: dict[int, Callable[[bytes], list[Any]]] = {}  # a layout's batch decoder


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

    __slots__ = ("error", "reply", "task")

    def __init__(self) -> None:
        self.task: trio.lowlevel.Task | None = None  # set while parked for another's reading
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def deliver(self, reply: Reply) -> None:
        self.reply = reply
        self.wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.wake()

    def wake(self) -> None:
        """Resume the parked call: to take its reply, or to read for itself."""
        if self.task is not None:
            trio.lowlevel.reschedule(self.task)
            self.task = None

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None  # cancelled: a reply now must not reschedule us
        return trio.lowlevel.Abort.SUCCEEDED

    def result(self) -> Reply:
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


class HypercallClient:
    """Hypercalls over the domain's SOCK_SEQPACKET socket to the hypervisor.

    `run` must run while the client is in use: it reads what arrives while
    no call is reading (notifications, late replies). It waits through its
    own duplicate of the socket, which it closes when it ends; close `sock`
    only after that, so the hypervisor sees the connection end.

    `wait_in_kernel`: whether a call waits for its reply in poll(2) (see the
    module doc); by default, when the socket's peer is another process.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        on_notification: Callable[[Reply], None] | None = None,
        *,
        wait_in_kernel: bool | None = None,
    ) -> None:
        self.sock = sock
        self.on_notification = on_notification
        self._raw = socket.socket(fileno=os.dup(sock.fileno()))  # shares O_NONBLOCK with sock
        self._seq = 0
        self._waiting: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()
        self._reading = False  # a call is reading the socket for its reply
        self._calls = 0  # calls made so far: `run` stands aside while this moves
        self._closed: BaseException | None = None
        # Waiting for replies in poll(2) would stall a hypervisor in this very process
        # (tests, tools run beside it): by default only when the peer is another process.
        if wait_in_kernel is None:
            wait_in_kernel = _peer_pid(self._raw) != os.getpid()
        self._kernel_wait: select.poll | None = None
        if wait_in_kernel:
            self._kernel_wait = select.poll()
            self._kernel_wait.register(self._raw.fileno(), select.POLLIN)
        self._yield_at = 0.0  # monotonic time past which a call yields to trio first

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read while no call does, until the hypervisor closes the socket."""
        task_status.started()
        seen = self._calls
        try:
            while self._closed is None:
                if self._reading or self._calls != seen:  # calls read: stand aside a while
                    seen = self._calls
                    await trio.sleep(QUIET)
                    continue
                try:
                    self._receive()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._raw)
                else:
                    await trio.lowlevel.checkpoint()
        finally:
            self._fail()
            trio.lowlevel.notify_closing(self._raw)
            self._raw.close()

    def _receive(self) -> None:
        """Take one message off the socket and route it; BlockingIOError if there is none."""
        try:
            data, ancdata, _, _ = self._raw.recvmsg(HYPERCALL_MAX_MESSAGE + 1, ANCILLARY_SPACE)
        except BlockingIOError:
            raise
        except OSError:
            data = b""
        if not data:
            self._fail()
            return
        reply = Reply.decode(data, fds_received(ancdata) if ancdata else ())
        if reply.kind == _NOTIFICATION:
            if self.on_notification is None:
                _close_all(reply.fds)
            else:
                self.on_notification(reply)
            return
        waiter = self._waiting.pop(reply.seq, None)
        if waiter is None:
            _close_all(reply.fds)
        else:
            waiter.deliver(reply)

    def _fail(self) -> None:
        """The socket is gone: every call in flight ends with ConnectionResetError."""
        if self._closed is None:
            self._closed = _reset()
        for waiter in self._waiting.values():
            waiter.fail(_reset())
        self._waiting.clear()

    async def call(
        self, op: int, cmd: int, payload: bytes = b"", count: int | None = None
    ) -> HypercallResult:
        """One hypercall; raises HypercallError when it returns -errno."""
        if self._closed is not None:
            raise _reset()
        if self._kernel_wait is not None:  # the trio checkpoint the wait in trio's loop was
            if time.monotonic() < self._yield_at:
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                await trio.lowlevel.checkpoint()
                self._yield_at = time.monotonic() + KERNEL_WAIT
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self._calls += 1
        waiter = self._waiting[seq] = _Waiter()
        message = (
            pack_request_header(seq, op, cmd, len(payload) if count is None else count) + payload
        )
        try:
            await self._send(message)
            while not waiter.done:
                if not self._reading:  # as a rule: read the reply ourselves
                    await self._read_reply(waiter)
                else:  # another call is reading: it hands our reply, or reading, over
                    waiter.task = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(waiter.abort)
        finally:
            self._waiting.pop(seq, None)
        reply = waiter.result()
        if reply.result < 0:
            _close_all(reply.fds)
            raise HypercallError(-reply.result, f"hypercall {_op_name(op)} cmd {cmd}")
        return HypercallResult(reply.result, reply.payload, reply.fds)

    async def _read_reply(self, waiter: _Waiter) -> None:
        """Wait for the socket, then read until our reply comes, routing whatever else
        arrives meanwhile; then hand reading to a call still waiting, if any.

        The wait comes first: the request has just gone, and its reply is all
        but never there yet, so a read before it would only find the socket
        empty. The wait is in poll(2) while the guest's time without yielding
        lasts (see the module doc), then in trio's loop.
        """
        self._reading = True
        try:
            while not waiter.done:
                if not self._wait_in_kernel():
                    await trio.lowlevel.wait_readable(self.sock)
                    self._yield_at = time.monotonic() + KERNEL_WAIT
                try:
                    self._receive()
                except BlockingIOError:
                    pass
        finally:
            self._reading = False
            for other in self._waiting.values():
                if other.task is not None:
                    other.wake()
                    break

    def _wait_in_kernel(self) -> bool:
        """Block in poll(2) until the socket is readable, within what is left of
        `KERNEL_WAIT`; False when that ran out first (or when the hypervisor is in
        this process). Python retries poll(2) on EINTR, having run signal handlers."""
        if self._kernel_wait is None:
            return False
        left = self._yield_at - time.monotonic()
        return left > 0 and bool(self._kernel_wait.poll(left * 1000))

    async def _send(self, message: bytes) -> None:
        """One datagram, as a rule one write(2) with no yield; the lock orders waiters
        only when the socket is full."""
        if not self._send_lock.locked():
            try:
                self._write(message)
                return
            except BlockingIOError:
                pass
        async with self._send_lock:
            while True:
                await trio.lowlevel.wait_writable(self.sock)
                try:
                    self._write(message)
                    return
                except BlockingIOError:
                    pass

    def _write(self, message: bytes) -> None:
        try:
            os.write(self._raw.fileno(), message)
        except (BrokenPipeError, ConnectionResetError):  # before the reader saw the end
            self._fail()
            raise _reset() from None

    async def call_struct(
        self, op: int, cmd: int, layout: Any, arg: Any
    ) -> tuple[int, Any, tuple[int, ...]]:
        """A call taking one Xen struct; returns (result, the struct as sent back, fds)."""
        codec = codec_for(layout)
        done = await self.call(op, cmd, codec.pack(arg), 1)
        out = codec.unpack(done.payload[: codec.size]) if done.payload else arg
        return done.result, out, done.fds

    async def call_batch(
        self, op: int, cmd: int, layout: Any, args: Sequence[Any]
    ) -> tuple[int, list[Any], tuple[int, ...]]:
        """A batched call (grant-table ops): the elements (records, or tuples in field
        order) packed into one buffer; each comes back with its own status, and
        they are decoded in one pass."""
        codec = codec_for(layout)
        size = codec.size
        buf = bytearray(size * len(args))
        for index, arg in enumerate(args):
            codec.pack_into(buf, index * size, arg)
        done = await self.call(op, cmd, bytes(buf), len(args))
        decode = _decoders.get(id(layout))
        if decode is None:
            decode = _decoders[id(layout)] = codec.slots_unpacker(size)
        count = min(len(args), len(done.payload) // size)
        return done.result, decode(done.payload[: count * size]), done.fds

    async def domctl(
        self, cmd: int, domain: int, union_layout: Any = None, value: Any = None
    ) -> tuple[int, Any]:
        """A xen_domctl with its command struct in `u`; returns (result, the `u` struct back)."""
        u = codec_for(union_layout).pack(value).ljust(128, b"\0") if union_layout else bytes(128)
        arg = DOMCTL.record(
            cmd=cmd, interface_version=XEN_DOMCTL_INTERFACE_VERSION, domain=domain, u=u
        )
        done = await self.call(Hypercall.domctl, cmd, DOMCTL.pack(arg), 1)
        out = DOMCTL.unpack(done.payload[: DOMCTL.size])
        back = (
            codec_for(union_layout).unpack(out.u[: codec_for(union_layout).size])
            if union_layout
            else None
        )
        _close_all(done.fds)
        return out.domain, back

    async def sysctl(self, cmd: int, union_layout: Any, value: Any) -> tuple[int, Any, bytes]:
        """A xen_sysctl; returns (result, the `u` struct back, any records after it)."""
        codec = codec_for(union_layout)
        arg = SYSCTL.record(
            cmd=cmd,
            interface_version=XEN_SYSCTL_INTERFACE_VERSION,
            u=codec.pack(value).ljust(128, b"\0"),
        )
        done = await self.call(Hypercall.sysctl, cmd, SYSCTL.pack(arg), 1)
        out = SYSCTL.unpack(done.payload[: SYSCTL.size])
        return done.result, codec.unpack(out.u[: codec.size]), done.payload[SYSCTL.size :]


def _peer_pid(sock: socket.socket) -> int:
    """The pid of the process that made or accepted the peer end (0 when it is not
    in this pid namespace)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


def _op_name(op: int) -> str:
    try:
        return Hypercall(op).name
    except ValueError:
        return str(op)


def _reset() -> ConnectionResetError:
    return ConnectionResetError("the hypervisor closed the hypercall socket")


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)
