"""xenstored as a trio service: the store behind a Unix socket.

Layers, from the store outwards:

- `Store` (xenlike.xenstore.store) decides everything and does no I/O.
- `Connection` is one client of xenstored whatever carries its bytes: the
  domid it speaks for and a bounded queue of messages to send it.
- `XenStored` owns the store and the connections; `dispatch` runs one
  request and hands the reply and watch events to their connections.
- A transport moves bytes. `XenStored.serve_stream` serves any trio byte
  stream (a task reading requests and sending their replies, another
  sending the watch events other clients fire); `serve_unix` runs it for
  each client of the Unix socket, all of them domain 0, as in xenstored.
  A guest's ring page plugs in the same way: a stream over the ring and
  event channel, served with that guest's domid. A transport that is not a
  stream drives a `Connection` itself: `dispatch` each request, send what
  `take_outgoing` returns.

Outgoing queue policy. xenstored queues without bound for its socket
clients; here a client that never reads must not grow the daemon. Each
connection's queue holds at most `queue_bytes` (default 2.5 MiB, xenstored's
per-domain memory quota):

- replies apply back-pressure: the task reading a client's requests sends
  their replies itself, and reads no further request while the queue lacks
  room for a full reply (for a guest, also while `Quotas.outstanding`
  replies wait, as xenstored stops reading a domain's ring at that quota);
- a watch event identical to one still queued is dropped, as xenstored's
  send_event() does (not for `@` paths);
- a watch event that does not fit drops the connection: its client learns
  it by the closed socket, rather than silently missing an event.

Bad input (section 17 of xen-abi.md): only a header with `len` over
XENSTORE_PAYLOAD_MAX closes the connection, without a reply; everything else
gets an error reply from the store, and a partial message is simply waited
for. Should the store ever raise (a defect), only that client's connection
is closed.
"""

import argparse
import collections
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Sequence
from typing import Protocol

import trio

from xenlike.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XS_WATCH_EVENT, XS_WRITE
from xenlike.xenstore.store import Store
from xenlike.xenstore.wire import HEADER_SIZE, MessageReader, XsMessage, XsProtocolError

__all__ = ["DEFAULT_QUEUE_BYTES", "Connection", "XenStored", "main"]

log = logging.getLogger("xenlike.xenstore")

DEFAULT_QUEUE_BYTES = 2 * 1024 * 1024 + 512 * 1024
_MAX_MESSAGE = HEADER_SIZE + XENSTORE_PAYLOAD_MAX
_RECEIVE_SIZE = 65536

# What the toolstack writes for domain 0 on a fresh host, beyond xenstored's
# own /tool/xenstored.
DOM0_NODES = (
    (b"/local/domain/0/name", b"Domain-0"),
    (b"/local/domain/0/domid", b"0"),
)


class Connection:
    """One client of xenstored: its store id, its domid and its outgoing queue.

    Transport-independent. A transport feeds `XenStored.dispatch` with the
    client's requests and sends what `take_outgoing` returns: right after
    handling requests, so a reply leaves at once, and from a task that
    `wait_outgoing` wakes for the watch events other clients' requests
    fire. One send at a time: `sending` says one is under way.
    """

    def __init__(self, conn_id: int, domid: int, queue_bytes: int, outstanding: int | None):
        self.conn_id = conn_id
        self.domid = domid
        self.sending = False
        self.serving_requests = False  # the request task will send what gets queued
        self.closed = False
        self.input_done = False  # the client sent its last request
        self.dropped_reason: str | None = None
        self.cancel_scope: trio.CancelScope | None = None  # set by the transport
        self._queue_bytes = queue_bytes
        self._outstanding = outstanding  # None: unlimited (domain 0)
        # (encoded message, is a watch event)
        self._queue: collections.deque[tuple[bytes, bool]] = collections.deque()
        self._queued = 0
        self._replies = 0
        self._pending_events: collections.Counter[bytes] = collections.Counter()
        self._has_output = trio.lowlevel.ParkingLot()
        self._has_room = trio.lowlevel.ParkingLot()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def queued_replies(self) -> int:
        return self._replies

    def has_room(self) -> bool:
        """Whether the queue can take this client's next reply.

        A guest also waits while `Quotas.outstanding` replies are queued, as
        xenstored stops reading a domain's ring at that quota.
        """
        return self._queued <= self._queue_bytes - _MAX_MESSAGE and (
            self._outstanding is None or self._replies < self._outstanding
        )

    def deliver(self, message: XsMessage) -> None:
        """Queue a message; never blocks (a watch event may come from any connection)."""
        if self.closed:
            return
        data = message.encode()
        is_event = message.type == XS_WATCH_EVENT
        if is_event and self._pending_events[data] and not message.payload.startswith(b"@"):
            return
        if self._queued + len(data) > self._queue_bytes:
            log.warning(
                "connection %d (domain %d) does not read its watch events", self.conn_id, self.domid
            )
            self.drop("outgoing queue full")
            return
        self._queue.append((data, is_event))
        self._queued += len(data)
        if is_event:
            self._pending_events[data] += 1
        else:
            self._replies += 1
        if not self.serving_requests and self._has_output:
            self._has_output.unpark_all()

    def take_outgoing(self) -> bytes:
        """Everything queued, joined (b"" if nothing); the caller sends it."""
        if not self._queue:
            return b""
        chunks = []
        while self._queue:
            data, is_event = self._queue.popleft()
            chunks.append(data)
            if is_event:
                self._pending_events[data] -= 1
                if not self._pending_events[data]:
                    del self._pending_events[data]
            else:
                self._replies -= 1
        self._queued = 0
        if self._has_room:
            self._has_room.unpark_all()
        return b"".join(chunks)

    async def wait_outgoing(self) -> bool:
        """Wait until something is queued and no send is under way; False once done."""
        while not self.closed:
            if not self.sending:
                if self._queue:
                    return True
                if self.input_done:
                    return False
            await self._has_output.park()
        return False

    async def wait_room(self) -> None:
        """Wait until queued messages are taken (or the connection is dropped)."""
        await self._has_room.park()

    def finish_input(self) -> None:
        """The client will send no more: what it is owed is sent, then the connection ends."""
        self.input_done = True
        self._has_output.unpark_all()

    def drop(self, reason: str) -> None:
        """Close at once, discarding anything still queued."""
        if self.closed:
            return
        self.closed = True
        self.dropped_reason = reason
        self._queue.clear()
        log.info("dropping connection %d (domain %d): %s", self.conn_id, self.domid, reason)
        self._has_output.unpark_all()
        self._has_room.unpark_all()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()


class XenStored:
    """The XenStore daemon: a `Store`, its connections, and the transports serving them."""

    def __init__(self, store: Store | None = None, *, queue_bytes: int = DEFAULT_QUEUE_BYTES):
        if store is None:
            store = Store()
            _seed(store)
        self.store = store
        self.queue_bytes = queue_bytes
        self.connections: dict[int, Connection] = {}

    def open_connection(self, domid: int) -> Connection:
        conn_id = self.store.connect(domid)
        outstanding = None if domid == 0 else self.store.quotas.outstanding
        conn = Connection(conn_id, domid, self.queue_bytes, outstanding)
        self.connections[conn_id] = conn
        return conn

    def close_connection(self, conn: Connection) -> None:
        """Free the connection's watches and transactions."""
        self.connections.pop(conn.conn_id, None)
        self.store.disconnect(conn.conn_id)

    def dispatch(self, conn: Connection, message: XsMessage) -> None:
        """Run one request and queue its reply and watch events."""
        if conn.closed:
            return  # dropped meanwhile (its domain released, say): the store forgot it
        try:
            outcome = self.store.handle(conn.conn_id, message)
        except Exception:
            # A defect in the store, not the client's fault; it costs this client
            # its connection, never the daemon.
            log.exception("connection %d (domain %d): %r failed", conn.conn_id, conn.domid, message)
            conn.drop("internal error")
            return
        for delivery in outcome.deliveries:
            target = self.connections.get(delivery.conn_id)
            if target is not None:
                target.deliver(delivery.message)
        for conn_id in outcome.closed:
            released = self.connections.pop(conn_id, None)
            if released is not None:
                released.drop("domain released")

    async def serve_stream(self, stream: trio.abc.Stream, domid: int = 0) -> None:
        """Serve one client over a byte stream until it closes or is dropped, then close it."""
        conn = self.open_connection(domid)
        log.debug("connection %d (domain %d) opened", conn.conn_id, domid)
        transport: _ByteStream = (
            _DirectSocket(stream) if isinstance(stream, trio.SocketStream) else stream
        )
        try:
            async with trio.open_nursery() as nursery:
                conn.cancel_scope = nursery.cancel_scope
                nursery.start_soon(self._send_loop, conn, transport)
                await self._receive_loop(conn, transport)
        finally:
            self.close_connection(conn)
            await trio.aclose_forcefully(stream)
            log.debug("connection %d (domain %d) closed", conn.conn_id, domid)

    async def _receive_loop(self, conn: Connection, stream: "_ByteStream") -> None:
        reader = MessageReader()
        try:
            while not conn.closed and (data := await stream.receive_some(_RECEIVE_SIZE)):
                reader.feed(data)
                conn.serving_requests = True
                for message in reader:
                    while not conn.has_room():
                        if conn.closed:
                            return
                        if conn.sending:
                            await conn.wait_room()
                        else:
                            await self._flush(conn, stream)
                    self.dispatch(conn, message)
                await self._flush(conn, stream)
                conn.serving_requests = False
        except XsProtocolError as error:
            log.warning("connection %d (domain %d): %s", conn.conn_id, conn.domid, error)
            conn.drop("protocol error")
        except trio.BrokenResourceError:
            conn.drop("client gone")
        else:
            conn.finish_input()

    async def _send_loop(self, conn: Connection, stream: "_ByteStream") -> None:
        """Send the watch events that other connections' requests queue."""
        try:
            while await conn.wait_outgoing():
                await self._flush(conn, stream)
        except trio.BrokenResourceError:
            conn.drop("client gone")

    @staticmethod
    async def _flush(conn: Connection, stream: "_ByteStream") -> None:
        """Send what is queued, unless another task's send is under way (it sends the rest)."""
        while not conn.sending and (data := conn.take_outgoing()):
            conn.sending = True
            try:
                await stream.send_all(data)
            finally:
                conn.sending = False

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a Unix stream socket; every client there is domain 0."""
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self.serve_stream, [listener])
                task_status.started()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class _ByteStream(Protocol):
    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...

    async def send_all(self, data: bytes | bytearray | memoryview) -> None: ...


class _DirectSocket:
    """A client's socket, read and written without trio's checkpoint on every call.

    trio's SocketStream yields to the scheduler on each call even when the
    socket is ready; with one request in flight per client that was most of
    xenstored's CPU per request. Here a call yields only when it must wait,
    and after `_BUSY_CALLS` calls that did not, so a client that never lets
    up cannot starve the others. The stream stays its owner's to close.
    """

    _BUSY_CALLS = 16

    def __init__(self, stream: trio.SocketStream) -> None:
        self._fd = stream.socket.fileno()
        self._busy = 0

    async def _after_ready_call(self) -> None:
        self._busy += 1
        if self._busy >= self._BUSY_CALLS:
            self._busy = 0
            await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                self._busy = 0
                await trio.lowlevel.wait_readable(self._fd)
                continue
            except OSError as error:
                raise trio.BrokenResourceError(error) from error
            await self._after_ready_call()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                self._busy = 0
                await trio.lowlevel.wait_writable(self._fd)
            except OSError as error:
                raise trio.BrokenResourceError(error) from error
        await self._after_ready_call()


def _seed(store: Store) -> None:
    conn_id = store.connect(0)
    for path, value in DOM0_NODES:
        store.handle(conn_id, XsMessage(XS_WRITE, 0, 0, path + b"\0" + value))
    store.disconnect(conn_id)


async def _run(path: str) -> None:
    xenstored = XenStored()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(xenstored.serve_unix, path)
            print(f"xenstored: listening on {path}", flush=True)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xenlike.xenstore",
        description="Run xenstored on a Unix socket (point XENSTORED_PATH at it "
        "to use the xenstore-* tools).",
        epilog="Example: python -m xenlike.xenstore --socket /tmp/xenstored.sock",
    )
    parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="xenstored: %(message)s"
    )
    trio.run(_run, args.socket)
