"""Replaying one xs_wire script on a daemon's Unix socket and recording what came back.

A script is a list of `Step`s: a request on one of several connections. The
record of each step is the reply and, for every connection, the watch
events it received meanwhile; a "sync" request on each connection (whose
reply follows every event queued before it) marks where a step's events
end. Two daemons that recorded the same are, for this script, the same.
"""

import collections
import mmap
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from xenlike.abi.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_ERROR,
    XS_GET_DOMAIN_PATH,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_RELEASE,
    XS_RM,
    XS_SET_PERMS,
    XS_TRANSACTION_START,
    XS_WATCH_EVENT,
    XS_WRITE,
)
from xenlike.bytering import XENSTORE, ByteRing
from xenlike.xenstore.store import Quotas, Store
from xenlike.xenstore.wire import MessageReader, XsMessage

__all__ = ["Daemon", "Step", "StoreDaemon", "replay"]

_HEADER = struct.Struct("<IIII")
_SYNC_REQ_ID = 0xFFFFFFF0
BOGUS_TX = 12345


@attrs.frozen
class Step:
    """One request: `tx` is 0, an index into the transactions its connection opened
    (resolved to that daemon's id), or -1 for an id no transaction has."""

    conn: int
    type: int
    payload: bytes
    tx: int | None = None

    def __repr__(self) -> str:
        tx = "" if self.tx is None else f", tx={self.tx}"
        return f"Step({self.conn}, {self.type}, {self.payload!r}{tx})"


class _Socket:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: cxenstored's listen backlog is 1
        self.sock.settimeout(10)
        self.reader = MessageReader()
        self.closed = False

    def send(self, message: XsMessage) -> None:
        try:
            self.sock.sendall(message.encode())
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def receive(self) -> XsMessage | None:
        """The next message, or None once the daemon closed the connection."""
        while not isinstance(message := self.reader.next_message(), XsMessage):
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our request unread
                data = b""
            if not data:
                self.closed = True
                return None
            self.reader.feed(data)
        return message

    def until_reply(self, req_id: int) -> list[XsMessage] | None:
        """Messages up to and including the reply to `req_id` (None: connection closed)."""
        received = []
        while True:
            message = self.receive()
            if message is None:
                return None
            received.append(message)
            if message.type != XS_WATCH_EVENT and message.req_id == req_id:
                return received

    def close(self) -> None:
        self.sock.close()


def _normalise(message: XsMessage) -> tuple[int, int, int, bytes]:
    """What must be equal: everything but DIRECTORY_PART's generation, a private counter."""
    payload = message.payload
    if message.type == XS_DIRECTORY_PART:
        payload = payload[payload.find(b"\0") + 1 :]
    return (message.type, message.req_id, message.tx_id, payload)


class _RingGuest:
    """A guest on cxenstored: requests into its ring page (a file the shim maps), replies out.

    cxenstored hears no event channel here; it looks at domains' rings each
    time its poll loop wakes, so `poke` (a request on a socket) wakes it. A
    guest whose domain is no longer introduced has no connection any more; a
    reply that does not come within 20 s counts as none either.
    """

    def __init__(
        self, ring_path: Path, poke: Callable[[], None], introduced: Callable[[], bool]
    ) -> None:
        with open(ring_path, "r+b") as file:
            self._map = mmap.mmap(file.fileno(), 4096)
        page = memoryview(self._map)
        self._requests = ByteRing(page, XENSTORE.to_backend)
        self._replies = ByteRing(page, XENSTORE.to_guest)
        self._poke = poke
        self._introduced = introduced
        self.reader = MessageReader()
        self.closed = False

    def send(self, message: XsMessage) -> None:
        data = message.encode()
        deadline = time.monotonic() + 5
        while data and time.monotonic() < deadline:
            data = data[self._requests.write(data) :]
            self._poke()
        self.closed = self.closed or bool(data)

    def until_reply(self, req_id: int) -> list[XsMessage] | None:
        received: list[XsMessage] = []
        start = time.monotonic()
        while (waited := time.monotonic() - start) < 20:
            self.reader.feed(self._replies.read())
            for message in self.reader:
                received.append(message)
                if message.type != XS_WATCH_EVENT and message.req_id == req_id:
                    return received
            if waited > 0.2 and not self._introduced():
                break
            self._poke()
        self.closed = True
        return None

    def close(self) -> None:
        self._requests.release()
        self._replies.release()
        self._map.close()


class Daemon:
    """A daemon on a Unix socket: fresh connections, and its store put back between scripts.

    With `ring_dir` (cxenstored under the shim's XSHIM_RINGDIR), a connection
    may also speak for a guest: the domain is introduced, and its ring page
    is played from here.
    """

    def __init__(self, path: str, ring_dir: str | None = None) -> None:
        self.path = path
        self.ring_dir = ring_dir
        self._poker: _Socket | None = None

    def connect(self, domid: int) -> Any:
        if domid == 0:
            return _Socket(self.path)
        assert self.ring_dir is not None, "only cxenstored's rings are played here"
        introduced = self._call(XS_INTRODUCE, b"%d\0%d\0%d\0" % (domid, 1, 9))
        assert introduced.type == XS_INTRODUCE, introduced
        return _RingGuest(
            Path(self.ring_dir) / f"dom{domid}.ring",
            self._poke,
            lambda: self._call(XS_IS_DOMAIN_INTRODUCED, b"%d\0" % domid).payload == b"T\0",
        )

    def _call(self, type_: int, payload: bytes) -> XsMessage:
        if self._poker is None:
            self._poker = _Socket(self.path)
        self._poker.send(XsMessage(type_, 1, 0, payload))
        received = self._poker.until_reply(1)
        assert received is not None, "the daemon closed its control connection"
        return received[-1]

    def _poke(self) -> None:
        self._call(XS_GET_DOMAIN_PATH, b"0\0")

    def reset(self) -> None:
        """Remove every node outside /tool/xenstored, empty and restore what is left,
        release test domains."""
        for path, keep in ((b"/", b"tool"), (b"/tool", b"xenstored"), (b"/tool/xenstored", None)):
            listing = self._call(XS_DIRECTORY, path + b"\0")
            for name in listing.payload.split(b"\0")[:-1]:
                if name != keep:
                    self._call(XS_RM, (b"" if path == b"/" else path) + b"/" + name + b"\0")
            self._call(XS_WRITE, path + b"\0")
            self._call(XS_SET_PERMS, path + b"\0n0\0")
        for domid in range(1, 10):
            if self._call(XS_IS_DOMAIN_INTRODUCED, b"%d\0" % domid).payload == b"T\0":
                self._call(XS_RELEASE, b"%d\0" % domid)


class _StoreConnection:
    """A connection to an in-process `Store`: what `handle` delivers lands in inboxes."""

    def __init__(self, daemon: "StoreDaemon", domid: int) -> None:
        self.daemon = daemon
        self.id = daemon.store.connect(domid)
        daemon.inboxes[self.id] = collections.deque()
        daemon.connections[self.id] = self
        self.closed = False

    def send(self, message: XsMessage) -> None:
        if self.closed:
            return
        if len(message.payload) > XENSTORE_PAYLOAD_MAX:
            self.closed = True  # as the transports do: no reply, the connection is dropped
            self.daemon.store.disconnect(self.id)
            return
        outcome = self.daemon.store.handle(self.id, message)
        for delivery in outcome.deliveries:
            self.daemon.inboxes[delivery.conn_id].append(delivery.message)
        for conn_id in outcome.closed:
            self.daemon.connections[conn_id].closed = True

    def until_reply(self, req_id: int) -> list[XsMessage] | None:
        received = []
        inbox = self.daemon.inboxes[self.id]
        while inbox and not self.closed:
            received.append(inbox.popleft())
            if received[-1].type != XS_WATCH_EVENT and received[-1].req_id == req_id:
                return received
        self.closed = True
        return None

    def close(self) -> None:
        if not self.closed:
            self.daemon.store.disconnect(self.id)


class StoreDaemon:
    """xenlike's `Store` in this process, fresh for each script: guests need no ring here."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.reset()

    def reset(self) -> None:
        self.store = Store(self.quotas)
        self.inboxes: dict[int, collections.deque[XsMessage]] = {}
        self.connections: dict[int, _StoreConnection] = {}

    def connect(self, domid: int) -> _StoreConnection:
        if domid:
            dom0 = self.store.connect(0)
            introduce = XsMessage(XS_INTRODUCE, 1, 0, b"%d\0%d\0%d\0" % (domid, 1, 9))
            assert self.store.handle(dom0, introduce).reply.type == XS_INTRODUCE
            self.store.disconnect(dom0)
        return _StoreConnection(self, domid)


def replay(
    daemon: Daemon | StoreDaemon, steps: list[Step], domids: tuple[int, ...] = (0, 0, 0)
) -> list[object]:
    """Run `steps` on fresh connections, the i-th speaking for `domids[i]`; the
    normalised record of each step."""
    daemon.reset()
    sockets = [daemon.connect(domid) for domid in domids]
    transactions: list[list[int]] = [[] for _ in domids]
    record: list[object] = []
    try:
        for number, step in enumerate(steps, 1):
            sock = sockets[step.conn]
            if sock.closed:
                record.append("closed")
                continue
            tx_id = 0
            if step.tx is not None:
                opened = transactions[step.conn]
                tx_id = opened[step.tx] if 0 <= step.tx < len(opened) else BOGUS_TX
            sock.send(XsMessage(step.type, number, tx_id, step.payload))
            received = sock.until_reply(number)
            if received is None:
                record.append(("closed", step.conn))
                continue
            answer = received[-1]
            if step.type == XS_TRANSACTION_START and answer.type != XS_ERROR:
                transactions[step.conn].append(int(answer.payload[:-1]))
                answer = XsMessage(answer.type, answer.req_id, answer.tx_id, b"<tx id>")
            events: list[object] = [[_normalise(m) for m in received[:-1]]]
            for other in sockets:
                if other.closed:
                    events.append("closed")
                    continue
                other.send(XsMessage(XS_GET_DOMAIN_PATH, _SYNC_REQ_ID, 0, b"0\0"))
                synced = other.until_reply(_SYNC_REQ_ID)
                events.append("closed" if synced is None else [_normalise(m) for m in synced[:-1]])
            type_, req_id, echoed, payload = _normalise(answer)
            record.append(((type_, req_id, echoed == tx_id, payload), events))
    finally:
        for sock in sockets:
            sock.close()
    return record
