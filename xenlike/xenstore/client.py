"""An async XenStore client for trio, over any byte stream.

    async with open_client("/run/xenlike/xenstored/socket") as xs:
        await xs.write("/local/domain/0/data/greeting", b"hello")
        async with xs.watch("/local/domain/0/data") as events:
            async for event in events:  # the first event is the registration
                ...

One reader task owns the receiving side: it hands each reply to the request
waiting on its `req_id` and each watch event to the watch registered with
its token, so any number of tasks may share one client. Requests are sent
whole under a lock; a cancellation that tears one (possible only when the
socket is full) closes the client, since the stream is then out of step.

Transactions come in two shapes. `async with xs.transaction() as tx:` runs a
body once: it commits on a normal exit, aborts on an exception, and raises
`XenStoreError` EAGAIN if another change conflicted at commit.
`await xs.transact(fn)` is what callers usually want: it runs
`await fn(tx)` in a fresh transaction until the commit succeeds, as libxl
loops on EAGAIN, and returns what `fn` returned. `fn` may run several times,
so it must only touch XenStore through `tx`.

`open_client` and `connect_stream` hand over a `Client`; a guest's ring
transport supplies a trio stream over its ring page and event channel and
uses `connect_stream`.
"""

import collections
import contextlib
import itertools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import NamedTuple, TypeVar

import trio

from xenlike.abi.xs_wire import (
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_ERROR,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_MKDIR,
    XS_READ,
    XS_RELEASE,
    XS_RM,
    XS_SET_PERMS,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WATCH_EVENT,
    XS_WRITE,
    XsType,
)
from xenlike.xenstore.store import Permission
from xenlike.xenstore.wire import (
    MessageReader,
    XenStoreError,
    XsMessage,
    XsProtocolError,
    join_strings,
    split_strings,
)

__all__ = [
    "Client",
    "ConnectionClosed",
    "Transaction",
    "Watch",
    "WatchEvent",
    "connect_stream",
    "default_socket_path",
    "open_client",
]

log = logging.getLogger("xenlike.xenstore.client")

T = TypeVar("T")

DEFAULT_TRANSACT_ATTEMPTS = 100
_RECEIVE_SIZE = 65536


class ConnectionClosed(XenStoreError):
    """The connection to xenstored is gone (libxenstore reports EBADF)."""

    def __init__(self, detail: str) -> None:
        super().__init__("EBADF", detail)


class WatchEvent(NamedTuple):
    """One event: `async for path, token in events` unpacks it."""

    path: str  # the node that changed (relative if the watch path was)
    token: str


class Watch:
    """The events of one watch, as an async iterator.

    Events wait here until read; one identical to an event still waiting is
    dropped, as xenstored does, so memory is bounded by the distinct paths
    changed meanwhile. Iteration raises `ConnectionClosed` once the
    connection is lost and the waiting events are read.
    """

    def __init__(self, path: str, token: str) -> None:
        self.path = path
        self.token = token
        self._events: collections.deque[WatchEvent] = collections.deque()
        self._waiting: set[WatchEvent] = set()
        self._arrived = trio.lowlevel.ParkingLot()
        self._error: ConnectionClosed | None = None

    def __aiter__(self) -> "Watch":
        return self

    async def __anext__(self) -> WatchEvent:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._events:
            if self._error is not None:
                raise self._error
            await self._arrived.park()
        event = self._events.popleft()
        self._waiting.discard(event)
        return event

    def _push(self, event: WatchEvent) -> None:
        if event not in self._waiting:
            self._waiting.add(event)
            self._events.append(event)
            self._arrived.unpark_all()

    def _fail(self, error: ConnectionClosed) -> None:
        self._error = error
        self._arrived.unpark_all()


def _arg(path: str) -> bytes:
    return path.encode() + b"\0"


def _names(payload: bytes) -> list[str]:
    return [name.decode() for name in split_strings(payload)]


class _Operations:
    """The node operations, shared by `Client` and `Transaction`."""

    _client: "Client"
    _tx_id: int

    async def _call(self, type_: XsType, payload: bytes) -> bytes:
        return await self._client._request(type_, payload, self._tx_id)

    async def read(self, path: str) -> bytes:
        return await self._call(XS_READ, _arg(path))

    async def read_optional(self, path: str) -> str | None:
        """A node's value as text, or None when there is no such node."""
        try:
            return (await self.read(path)).decode()
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return None
            raise

    async def ls_optional(self, path: str) -> list[str]:
        """A node's children, or none when there is no such node."""
        try:
            return await self.ls(path)
        except XenStoreError as exc:
            if exc.name == "ENOENT":
                return []
            raise

    async def write(self, path: str, value: bytes | str) -> None:
        if isinstance(value, str):
            value = value.encode()
        await self._call(XS_WRITE, _arg(path) + value)

    async def mkdir(self, path: str) -> None:
        await self._call(XS_MKDIR, _arg(path))

    async def rm(self, path: str) -> None:
        """Remove a node and everything below it; a missing node is fine."""
        await self._call(XS_RM, _arg(path))

    async def ls(self, path: str) -> list[str]:
        """The names of a node's children (XS_DIRECTORY).

        A list too long for one reply comes in XS_DIRECTORY_PART pieces, as
        libxenstore fetches it, restarting if the node changes meanwhile.
        """
        try:
            return _names(await self._call(XS_DIRECTORY, _arg(path)))
        except XenStoreError as error:
            if error.name != "E2BIG":
                raise
        while True:
            names, generation = b"", None
            while True:
                part = await self._call(
                    XS_DIRECTORY_PART, join_strings(path.encode(), b"%d" % len(names))
                )
                part_generation, _, chunk = part.partition(b"\0")
                if generation is None:
                    generation = part_generation
                elif part_generation != generation:
                    break  # the directory changed between pieces
                if chunk.endswith(b"\0\0") or chunk == b"\0":
                    return _names(names + chunk[:-1])
                names += chunk

    async def get_perms(self, path: str) -> list[Permission]:
        payload = await self._call(XS_GET_PERMS, _arg(path))
        return [Permission.parse(text) for text in _names(payload)]

    async def set_perms(self, path: str, perms: Iterable[Permission | str]) -> None:
        """Set perms; the first names the owner and everyone else's access."""
        texts = [str(perm).encode() for perm in perms]
        await self._call(XS_SET_PERMS, join_strings(path.encode(), *texts))


class Transaction(_Operations):
    """The handle `Client.transaction()` gives: the node operations, in the transaction."""

    def __init__(self, client: "Client", tx_id: int) -> None:
        self._client = client
        self._tx_id = tx_id
        self.ended = False

    @property
    def id(self) -> int:
        return self._tx_id

    async def commit(self) -> None:
        """Commit; raises `XenStoreError` EAGAIN on a conflict (the transaction is over)."""
        await self._end(b"T")

    async def abort(self) -> None:
        await self._end(b"F")

    async def _end(self, how: bytes) -> None:
        self.ended = True
        await self._call(XS_TRANSACTION_END, how + b"\0")


class _Call:
    """A request awaiting its reply (None if the connection is lost first)."""

    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: XsMessage | None = None


class Client(_Operations):
    """A connection to xenstored. Get one from `open_client` or `connect_stream`."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._client = self
        self._tx_id = 0
        self._stream = stream
        self._send_lock = trio.Lock()
        self._calls: dict[int, _Call] = {}
        self._abandoned: set[int] = set()  # requests cancelled before their reply
        self._watches: dict[bytes, Watch] = {}
        self._req_ids = itertools.count()
        self._tokens = itertools.count(1)
        self._closed: ConnectionClosed | None = None

    async def _request(self, type_: XsType, payload: bytes, tx_id: int = 0) -> bytes:
        if self._closed is not None:
            raise self._closed
        req_id = next(self._req_ids) & 0xFFFFFFFF
        call = self._calls[req_id] = _Call()
        sent = False
        try:
            await self._send(XsMessage(type_, req_id, tx_id, payload).encode())
            sent = True
            await call.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
            raise ConnectionClosed(f"sending {type_.name}: {error}") from error
        finally:
            del self._calls[req_id]
            if sent and not call.done.is_set():  # cancelled: its reply is still to come
                self._abandoned.add(req_id)
        answer = call.reply
        if answer is None:
            assert self._closed is not None
            raise self._closed
        if answer.type == XS_ERROR:
            name = answer.payload.rstrip(b"\0").decode(errors="replace")
            subject = payload.partition(b"\0")[0].decode(errors="replace")
            raise XenStoreError(name, f"{type_.name} {subject}")
        if answer.type != type_:
            raise XsProtocolError(f"{XsType(type_).name} answered by {answer!r}")
        return answer.payload

    async def _send(self, data: bytes) -> None:
        """Send one whole message, or close the client if cancellation tore it.

        Cheap on purpose (no yield to take a free lock, no shield): it runs
        once per request.
        """
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            # Cancelled here, nothing is sent yet. Past this point send_all
            # can only be cancelled while waiting to send the rest of a
            # partly sent message: the stream would be out of step.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await self._stream.send_all(data)
            except trio.Cancelled:
                self._close(ConnectionClosed("a request was cancelled halfway through sending"))
                await trio.aclose_forcefully(self._stream)
                raise
        finally:
            self._send_lock.release()

    async def _receive_loop(self) -> None:
        reader = MessageReader()
        reason = "closed by xenstored"
        try:
            while data := await self._stream.receive_some(_RECEIVE_SIZE):
                reader.feed(data)
                for message in reader:
                    self._route(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError, XsProtocolError) as error:
            reason = str(error) or type(error).__name__
        self._close(ConnectionClosed(reason))

    def _route(self, message: XsMessage) -> None:
        if message.type == XS_WATCH_EVENT:
            args = split_strings(message.payload)
            watch = self._watches.get(args[1]) if len(args) >= 2 else None
            if watch is None:
                log.debug("event for no watch of ours: %r", message)
                return
            watch._push(WatchEvent(args[0].decode(errors="replace"), watch.token))
            return
        call = self._calls.get(message.req_id)
        if call is None and message.req_id in self._abandoned:
            self._abandoned.discard(message.req_id)  # a request its caller gave up on
            return
        if call is None or call.done.is_set():
            log.warning("reply to no request of ours: %r", message)
            return
        call.reply = message
        call.done.set()

    def _close(self, error: ConnectionClosed) -> None:
        self._closed = error
        for call in self._calls.values():
            call.done.set()
        for watch in self._watches.values():
            watch._fail(error)

    @contextlib.asynccontextmanager
    async def watch(self, path: str, token: str | None = None) -> AsyncIterator[Watch]:
        """Watch a path and everything below it; yields a `Watch` to iterate.

        Its first event comes at once, for the path itself. The token
        defaults to a unique one; it must be unique within this client.
        """
        if token is None:
            token = f"xenlike-{next(self._tokens)}"
        key = token.encode()
        if key in self._watches:
            raise ValueError(f"token {token!r} is already used by a watch of this client")
        watch = self._watches[key] = Watch(path, token)
        payload = join_strings(path.encode(), key)
        try:
            # Registered before the request: the first event may precede the reply.
            await self._request(XS_WATCH, payload)
        except BaseException:
            del self._watches[key]
            raise
        try:
            yield watch
        finally:
            del self._watches[key]
            if self._closed is None:
                with contextlib.suppress(XenStoreError):
                    await self._request(XS_UNWATCH, payload)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Run a body in one transaction: commit on exit, abort on an exception."""
        tx_id = int((await self._request(XS_TRANSACTION_START, b"\0")).rstrip(b"\0"))
        tx = Transaction(self, tx_id)
        try:
            yield tx
        except BaseException:
            if not tx.ended and self._closed is None:
                with contextlib.suppress(XenStoreError):
                    await tx.abort()
            raise
        if not tx.ended:
            await tx.commit()

    async def transact(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        attempts: int = DEFAULT_TRANSACT_ATTEMPTS,
    ) -> T:
        """`await fn(tx)` in a transaction, again in a new one while commit says EAGAIN."""
        attempt = 1
        while True:
            try:
                async with self.transaction() as tx:
                    return await fn(tx)
            except XenStoreError as error:
                if error.name != "EAGAIN" or attempt >= attempts:
                    raise
            attempt += 1

    async def introduce(self, domid: int, gfn: int, port: int) -> None:
        """XS_INTRODUCE: xenstored is to serve `domid` over the ring at `gfn`, event channel
        `port`."""
        await self._request(XS_INTRODUCE, join_strings(b"%d" % domid, b"%d" % gfn, b"%d" % port))

    async def release(self, domid: int) -> None:
        """XS_RELEASE: forget a domain; its watches, transactions and nodes go."""
        await self._request(XS_RELEASE, b"%d\0" % domid)

    async def is_domain_introduced(self, domid: int) -> bool:
        return await self._request(XS_IS_DOMAIN_INTRODUCED, b"%d\0" % domid) == b"T\0"

    async def get_domain_path(self, domid: int) -> str:
        return (await self._request(XS_GET_DOMAIN_PATH, b"%d\0" % domid)).rstrip(b"\0").decode()


@contextlib.asynccontextmanager
async def connect_stream(stream: trio.abc.Stream) -> AsyncIterator[Client]:
    """A `Client` over an open stream, its reader task running until the block ends."""
    client = Client(stream)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._receive_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader task does not fail, so a group holds just the body's
        # exception: hand it on as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def default_socket_path() -> str:
    """Where libxenstore looks: $XENSTORED_PATH, $XENSTORED_RUNDIR/socket,
    /var/run/xenstored/socket."""
    if path := os.environ.get("XENSTORED_PATH"):
        return path
    rundir = os.environ.get("XENSTORED_RUNDIR", "/var/run/xenstored")
    return os.path.join(rundir, "socket")


@contextlib.asynccontextmanager
async def open_client(path: str | os.PathLike[str] | None = None) -> AsyncIterator[Client]:
    """Connect to xenstored's Unix socket (by default where libxenstore would)."""
    stream = await trio.open_unix_socket(
        os.fspath(path) if path is not None else default_socket_path()
    )
    async with stream, connect_stream(stream) as client:
        yield client
