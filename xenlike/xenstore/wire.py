"""xs_wire framing without I/O, in the manner of h11.

Bytes go in with `MessageReader.feed`, whole messages come out of
`MessageReader.next_message` (or `NEED_DATA` when a message is still
incomplete), and `XsMessage.encode` gives the bytes to send. The same code
serves xenstored and its clients, over a socket or a ring, since xs_wire is
one byte stream in both cases.

The header is packed with a `struct` format equal to the construct layout
`xenlike.abi.xs_wire.xsd_sockmsg` (a test holds them together): construct is
the schema, `struct` the hot path.
"""

import errno
import struct
from typing import Final

import attrs

from xenlike.abi.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    XS_ERROR,
    XS_WATCH_EVENT,
    XSD_ERRORS,
    XsType,
)

__all__ = [
    "HEADER_SIZE",
    "NEED_DATA",
    "OK",
    "MessageReader",
    "NeedData",
    "XenStoreError",
    "XsMessage",
    "XsProtocolError",
    "error_reply",
    "join_strings",
    "ok_reply",
    "reply",
    "split_strings",
    "watch_event",
]

_HEADER = struct.Struct("<IIII")  # xsd_sockmsg: type, req_id, tx_id, len
HEADER_SIZE: Final = _HEADER.size

OK: Final = b"OK\0"  # what xenstored answers to requests with nothing to say


class XenStoreError(Exception):
    """An error xenstored answers with: XS_ERROR and an errno name from `XSD_ERRORS`.

    `name` is what travels (`"ENOENT"`); `errno` is its number, EINVAL for a
    name libxenstore would not know either.
    """

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(f"{name}: {detail}" if detail else name)
        self.name = name
        self.detail = detail
        number = XSD_ERRORS.get(name) or getattr(errno, name, None)
        self.errno: int = number if isinstance(number, int) else errno.EINVAL


class XsProtocolError(Exception):
    """The peer broke xs_wire's framing; the byte stream cannot be resynchronised.

    xenstored answers this by dropping the connection without a reply.
    """


class NeedData:
    """The type of `NEED_DATA`: more bytes must be fed before the next message."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def _type_name(value: int) -> str:
    try:
        return XsType(value).name
    except ValueError:
        return str(value)


@attrs.frozen(repr=False)
class XsMessage:
    """One xs_wire message: an `xsd_sockmsg` header and its payload.

    `type` stays a plain int so a peer's unknown type survives to be
    answered with ENOSYS; `repr` shows Xen's name when there is one.
    """

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    def __repr__(self) -> str:
        return (
            f"XsMessage({_type_name(self.type)}, req_id={self.req_id}, "
            f"tx_id={self.tx_id}, payload={self.payload!r})"
        )


class MessageReader:
    """Cuts a byte stream into `XsMessage`s, however the bytes were chunked.

    A header whose `len` exceeds `XENSTORE_PAYLOAD_MAX` raises
    `XsProtocolError` as soon as the header is complete, and every later call
    raises it again: after a framing error nothing on the stream can be
    trusted.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # bytes before this offset are already consumed
        self._error: XsProtocolError | None = None

    def feed(self, data: bytes | bytearray) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer) - self._start

    def next_message(self) -> XsMessage | NeedData:
        if self._error is not None:
            raise self._error
        start = self._start
        if len(self._buffer) - start < HEADER_SIZE:
            return NEED_DATA
        type_, req_id, tx_id, length = _HEADER.unpack_from(self._buffer, start)
        if length > XENSTORE_PAYLOAD_MAX:
            self._error = XsProtocolError(
                f"xsd_sockmsg len {length} exceeds XENSTORE_PAYLOAD_MAX "
                f"({XENSTORE_PAYLOAD_MAX}), type {_type_name(type_)}"
            )
            raise self._error
        end = start + HEADER_SIZE + length
        if len(self._buffer) < end:
            return NEED_DATA
        self._start = end
        return XsMessage(type_, req_id, tx_id, bytes(self._buffer[start + HEADER_SIZE : end]))

    def __iter__(self) -> "MessageReader":
        return self

    def __next__(self) -> XsMessage:
        """Iterate over the whole messages buffered so far."""
        message = self.next_message()
        if isinstance(message, NeedData):
            raise StopIteration
        return message


def split_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload, as xenstored's get_strings sees them.

    Bytes after the last NUL belong to no string and are left out.
    """
    return payload.split(b"\0")[:-1]


def join_strings(*strings: bytes) -> bytes:
    """Each string followed by a NUL: the payload of most requests and replies."""
    return b"".join(s + b"\0" for s in strings)


def reply(request: XsMessage, payload: bytes) -> XsMessage:
    """A successful answer: the request's type, req_id and tx_id, a new payload."""
    return XsMessage(request.type, request.req_id, request.tx_id, payload)


def ok_reply(request: XsMessage) -> XsMessage:
    return XsMessage(request.type, request.req_id, request.tx_id, OK)


def error_reply(request: XsMessage, errno_name: str) -> XsMessage:
    """XS_ERROR carrying the errno name and a NUL, keeping req_id and tx_id."""
    return XsMessage(XS_ERROR, request.req_id, request.tx_id, errno_name.encode() + b"\0")


def watch_event(path: bytes, token: bytes) -> XsMessage:
    """XS_WATCH_EVENT `path\\0token\\0`; events carry req_id = tx_id = 0."""
    return XsMessage(XS_WATCH_EVENT, 0, 0, path + b"\0" + token + b"\0")
