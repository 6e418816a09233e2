"""Replaying one xs_wire script on a daemon's Unix socket and recording what came back.

A script is a list of `Step`s: a request on one of several connections. The
record of each step is the reply and, for every connection, the watch
events it received meanwhile; a "sync" request on each connection (whose
reply follows every event queued before it) marks where a step's events
end. Two daemons that recorded the same are, for this script, the same.
"""

import socket
import struct

import attrs

from xenlike.abi.xs_wire import (
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_ERROR,
    XS_GET_DOMAIN_PATH,
    XS_IS_DOMAIN_INTRODUCED,
    XS_RELEASE,
    XS_RM,
    XS_SET_PERMS,
    XS_TRANSACTION_START,
    XS_WATCH_EVENT,
)
from xenlike.xenstore.wire import MessageReader, XsMessage

__all__ = ["Daemon", "Step", "replay"]

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


class Daemon:
    """A daemon's socket path and how to put its store back to a fresh start between scripts."""

    def __init__(self, path: str) -> None:
        self.path = path

    def reset(self) -> None:
        """Remove every node outside /tool/xenstored, restore perms, release test domains."""
        conn = _Socket(self.path)
        try:
            def call(type_: int, payload: bytes) -> XsMessage:
                conn.send(XsMessage(type_, 1, 0, payload))
                received = conn.until_reply(1)
                assert received is not None, "daemon closed the reset connection"
                return received[-1]

            for path, keep in ((b"/", b"tool"), (b"/tool", b"xenstored"),
                               (b"/tool/xenstored", None)):
                listing = call(XS_DIRECTORY, path + b"\0")
                for name in listing.payload.split(b"\0")[:-1]:
                    if name != keep:
                        call(XS_RM, (b"" if path == b"/" else path) + b"/" + name + b"\0")
                call(XS_SET_PERMS, path + b"\0n0\0")
            for domid in range(1, 10):
                if call(XS_IS_DOMAIN_INTRODUCED, b"%d\0" % domid).payload == b"T\0":
                    call(XS_RELEASE, b"%d\0" % domid)
        finally:
            conn.close()


def replay(daemon: Daemon, steps: list[Step], conns: int = 3) -> list[object]:
    """Run `steps` on fresh connections; the normalised record of each step."""
    daemon.reset()
    sockets = [_Socket(daemon.path) for _ in range(conns)]
    transactions: list[list[int]] = [[] for _ in range(conns)]
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
                events.append("closed" if synced is None else
                              [_normalise(m) for m in synced[:-1]])
            type_, req_id, echoed, payload = _normalise(answer)
            record.append(((type_, req_id, echoed == tx_id, payload), events))
    finally:
        for sock in sockets:
            sock.close()
    return record
