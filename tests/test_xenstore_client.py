"""The async client against xenstored served in the test's own trio nursery."""

import socket

import attrs
import pytest
import trio
import trio.testing

from xenlike.abi.xs_wire import XS_ERROR, XS_READ, XS_TRANSACTION_START, XS_WATCH, XS_WRITE
from xenlike.xenstore import (
    ConnectionClosed,
    Permission,
    Store,
    WatchEvent,
    XenStored,
    XenStoreError,
    XsMessage,
    connect_stream,
    open_client,
)
from xenlike.xenstore.wire import MessageReader


@attrs.frozen
class Server:
    daemon: XenStored
    path: str


@pytest.fixture
async def server(nursery, tmp_path) -> Server:
    daemon = XenStored()
    path = str(tmp_path / "socket")
    await nursery.start(daemon.serve_unix, path)
    return Server(daemon, path)


async def test_read_write_ls_rm(server):
    async with open_client(server.path) as xs:
        await xs.write("/app/key", b"value")
        await xs.write("/app/text", "unicode é")
        await xs.mkdir("/app/empty")
        assert await xs.read("/app/key") == b"value"
        assert await xs.read("/app/text") == "unicode é".encode()
        assert await xs.ls("/app") == ["key", "text", "empty"]
        assert await xs.read("/local/domain/0/name") == b"Domain-0"
        await xs.rm("/app/key")
        with pytest.raises(XenStoreError) as caught:
            await xs.read("/app/key")
        assert caught.value.name == "ENOENT" and caught.value.errno == 2
        assert "/app/key" in str(caught.value)


async def test_default_socket_path_follows_libxenstore(server, monkeypatch):
    monkeypatch.setenv("XENSTORED_PATH", server.path)
    async with open_client() as xs:
        assert await xs.get_domain_path(3) == "/local/domain/3"


async def test_perms(server):
    async with open_client(server.path) as xs:
        await xs.write("/p", b"")
        assert await xs.get_perms("/p") == [Permission(0, 0)]
        await xs.set_perms("/p", [Permission(0, 1), "b5"])
        assert [str(p) for p in await xs.get_perms("/p")] == ["r0", "b5"]
        with pytest.raises(XenStoreError, match="EINVAL"):
            await xs.set_perms("/p", ["x5"])


async def test_a_long_listing_comes_in_directory_part_pieces(server):
    names = [f"device-with-a-long-name-{i:04d}" for i in range(300)]
    async with open_client(server.path) as xs:
        for name in names:
            await xs.write(f"/many/{name}", b"")
        assert sum(len(n) + 1 for n in names) > 4096
        assert await xs.ls("/many") == names
        async with xs.transaction() as tx:
            assert await tx.ls("/many") == names


async def test_watch_gets_its_registration_event_then_changes(server):
    async with open_client(server.path) as xs, xs.watch("/w", token="mine") as events:
        assert await events.__anext__() == WatchEvent("/w", "mine")
        await xs.write("/w/child", b"1")
        path, token = await events.__anext__()
        assert (path, token) == ("/w/child", "mine")
        assert server.daemon.store.statistics().watches == 1
    assert server.daemon.store.statistics().watches == 0


async def test_watches_are_routed_by_token(server):
    async with open_client(server.path) as xs, xs.watch("/a") as on_a, xs.watch("/b") as on_b:
        assert (await on_a.__anext__()).path == "/a"
        assert (await on_b.__anext__()).path == "/b"
        await xs.write("/b/x", b"")
        await xs.write("/a/y", b"")
        assert (await on_a.__anext__()).path == "/a/y"
        assert (await on_b.__anext__()).path == "/b/x"
        with pytest.raises(ValueError):
            async with xs.watch("/c", token=on_a.token):
                pass


async def test_concurrent_requests_get_their_own_replies(server):
    async with open_client(server.path) as xs:
        for i in range(50):
            await xs.write(f"/c/{i}", b"%d" % i)
        results = {}

        async def read(i):
            results[i] = await xs.read(f"/c/{i}")

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(read, i)
        assert results == {i: b"%d" % i for i in range(50)}


async def test_transaction_commits_on_exit_and_aborts_on_error(server):
    async with open_client(server.path) as xs, open_client(server.path) as other:
        async with xs.transaction() as tx:
            await tx.write("/tx/a", b"1")
            assert await tx.read("/tx/a") == b"1"
            with pytest.raises(XenStoreError, match="ENOENT"):
                await other.read("/tx/a")
        assert await other.read("/tx/a") == b"1"

        with pytest.raises(RuntimeError):
            async with xs.transaction() as tx:
                await tx.write("/tx/b", b"2")
                raise RuntimeError("body failed")
        with pytest.raises(XenStoreError, match="ENOENT"):
            await other.read("/tx/b")
        assert server.daemon.store.statistics().transactions == 0


async def test_a_conflict_raises_eagain_from_the_transaction(server):
    async with open_client(server.path) as xs, open_client(server.path) as other:
        await xs.write("/k", b"0")
        with pytest.raises(XenStoreError) as caught:
            async with xs.transaction() as tx:
                await tx.read("/k")
                await other.write("/k", b"changed")
                await tx.write("/k", b"mine")
        assert caught.value.name == "EAGAIN"
        assert await xs.read("/k") == b"changed"


async def test_transact_retries_the_body_after_a_conflict(server):
    async with open_client(server.path) as xs, open_client(server.path) as other:
        await xs.write("/counter", b"0")
        attempts = 0

        async def increment(tx):
            nonlocal attempts
            attempts += 1
            value = int(await tx.read("/counter"))
            if attempts == 1:
                await other.write("/counter", b"10")  # a change behind the first attempt's back
            await tx.write("/counter", b"%d" % (value + 1))
            return value + 1

        assert await xs.transact(increment) == 11
        assert attempts == 2
        assert await xs.read("/counter") == b"11"


async def test_transact_gives_up_after_its_attempts(server):
    async with open_client(server.path) as xs, open_client(server.path) as other:
        await xs.write("/hot", b"0")

        async def always_conflicts(tx):
            await tx.read("/hot")
            await other.write("/hot", b"again")

        with pytest.raises(XenStoreError, match="EAGAIN"):
            await xs.transact(always_conflicts, attempts=3)


async def test_domain_operations(server):
    async with open_client(server.path) as xs, xs.watch("@introduceDomain") as introduced:
        assert (await introduced.__anext__()).path == "@introduceDomain"
        assert not await xs.is_domain_introduced(4)
        await xs.introduce(4, gfn=0x1234, port=3)
        assert (await introduced.__anext__()).path == "@introduceDomain"
        assert await xs.is_domain_introduced(4)
        assert server.daemon.store.domains[4].gfn == 0x1234
        assert await xs.get_domain_path(4) == "/local/domain/4"
        await xs.release(4)
        assert not await xs.is_domain_introduced(4)
        with pytest.raises(XenStoreError, match="ENOENT"):
            await xs.release(4)


async def test_a_guest_over_any_stream_gets_guest_rules(server, nursery):
    """The transport boundary: a guest connection is a byte stream and a domid."""
    daemon_side, guest_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.daemon.serve_stream, daemon_side, 5)
    async with open_client(server.path) as dom0, connect_stream(guest_side) as guest:
        await dom0.write("/local/domain/5/data", b"")
        await dom0.set_perms("/local/domain/5/data", ["n5"])
        await guest.write("data/hello", b"from the guest")
        assert await dom0.read("/local/domain/5/data/hello") == b"from the guest"
        assert await dom0.get_perms("/local/domain/5/data/hello") == [Permission(5, 0)]
        with pytest.raises(XenStoreError, match="EACCES"):
            await guest.read("/local/domain/0/name")
        with pytest.raises(XenStoreError, match="EACCES"):
            await guest.introduce(6, 1, 1)


class CountingStore(Store):
    def __init__(self) -> None:
        super().__init__()
        self.handled = 0

    def handle(self, conn_id, message):
        self.handled += 1
        return super().handle(conn_id, message)


async def test_releasing_a_domain_closes_its_connection(server, nursery):
    daemon_side, guest_side = trio.testing.memory_stream_pair()
    nursery.start_soon(server.daemon.serve_stream, daemon_side, 5)
    async with open_client(server.path) as dom0, connect_stream(guest_side) as guest:
        await dom0.write("/local/domain/5/data", b"")
        await dom0.set_perms("/local/domain/5/data", ["n5"])
        await dom0.introduce(5, gfn=1, port=1)
        async with guest.watch("data") as events:
            assert await events.__anext__() == WatchEvent("data", events.token)
            await dom0.release(5)
            with pytest.raises(ConnectionClosed):
                await events.__anext__()
        with pytest.raises(ConnectionClosed):
            await guest.read("data")
        # What the domain owned goes; its home is the toolstack's to remove.
        assert await dom0.ls("/local/domain/5") == []


async def test_a_guest_is_not_read_past_its_outstanding_quota(nursery):
    """Like xenstored, stop reading a guest whose replies wait (20 by default)."""
    store = CountingStore()
    daemon_side, guest_side = trio.testing.lockstep_stream_pair()  # nothing is buffered
    nursery.start_soon(XenStored(store).serve_stream, daemon_side, 5)
    requests = b"".join(XsMessage(XS_READ, i, 0, b"/nope\0").encode() for i in range(100))
    nursery.start_soon(guest_side.send_all, requests)  # and never read a reply
    await trio.testing.wait_all_tasks_blocked()
    assert store.handled == store.quotas.outstanding


async def test_a_client_that_never_reads_is_not_served_without_bound(server):
    request = XsMessage(XS_READ, 0, 0, b"/local/domain/0/name\0").encode() * 64
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(server.path)
        raw.setblocking(False)
        # Send until xenstored stops reading us: both socket buffers and its
        # queue are full, and every task is idle.
        while True:
            try:
                raw.send(request)
            except BlockingIOError:
                await trio.testing.wait_all_tasks_blocked()
                try:
                    raw.send(request)
                except BlockingIOError:
                    break
        (conn,) = server.daemon.connections.values()
        assert conn.sending  # stuck handing replies to a socket nobody reads
        assert conn.queued_bytes <= server.daemon.queue_bytes
        async with open_client(server.path) as xs:
            assert await xs.read("/local/domain/0/name") == b"Domain-0"


async def test_a_watcher_that_never_reads_is_dropped_when_its_queue_overflows(nursery, tmp_path):
    daemon = XenStored(queue_bytes=8192)
    path = str(tmp_path / "socket")
    await nursery.start(daemon.serve_unix, path)
    watcher = await trio.open_unix_socket(path)
    await watcher.send_all(XsMessage(XS_WATCH, 0, 0, b"/flood\0w\0").encode())
    await trio.testing.wait_all_tasks_blocked()
    (watcher_conn,) = daemon.connections.values()
    async with open_client(path) as writer:
        for i in range(10_000):  # it takes some hundreds here
            if watcher_conn.closed:
                break
            await writer.write(f"/flood/{i}", b"")
        assert watcher_conn.closed and watcher_conn.dropped_reason == "outgoing queue full"
        assert await writer.read("/local/domain/0/name") == b"Domain-0"
    # The watcher finds its connection closed once it reads what was sent.
    reader = MessageReader()
    while data := await watcher.receive_some(65536):
        reader.feed(data)
    assert next(reader) == XsMessage(XS_WATCH, 0, 0, b"OK\0")
    await watcher.aclose()


async def test_a_transaction_left_open_is_freed_with_its_connection(server):
    stream = await trio.open_unix_socket(server.path)
    reader = MessageReader()
    for message in [
        XsMessage(XS_TRANSACTION_START, 1, 0, b"\0"),
        XsMessage(XS_WRITE, 2, 1, b"/left/open\0x"),
    ]:
        await stream.send_all(message.encode())
        while not (replies := list(reader)):
            reader.feed(await stream.receive_some(65536))
        assert replies[0].type == message.type
    assert server.daemon.store.statistics().transactions == 1
    await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert server.daemon.store.statistics().transactions == 0
    assert server.daemon.connections == {}
    async with open_client(server.path) as xs:
        with pytest.raises(XenStoreError, match="ENOENT"):
            await xs.read("/left/open")


async def test_pending_calls_and_watches_fail_when_xenstored_goes(nursery, tmp_path):
    path = str(tmp_path / "socket")
    serving = await nursery.start(serve_cancellably, XenStored(), path)
    async with open_client(path) as xs, xs.watch("/w") as events:
        assert (await events.__anext__()).path == "/w"
        serving.cancel()
        with pytest.raises(ConnectionClosed):
            await events.__anext__()
        with pytest.raises(ConnectionClosed) as caught:
            await xs.read("/w")
        assert caught.value.name == "EBADF"


async def serve_cancellably(daemon, path, *, task_status=trio.TASK_STATUS_IGNORED):
    """Serve until the cancel scope handed to the starter is cancelled."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve_unix, path)
            task_status.started(scope)


async def test_the_late_reply_to_a_cancelled_request_is_dropped_quietly(nursery, caplog):
    """A caller cancelled while its request is out (a driver stopped mid-read): the
    reply that comes afterwards is expected, not a stray to warn about."""
    ours, theirs = trio.testing.memory_stream_pair()
    async with connect_stream(ours) as xs:
        with trio.move_on_after(0.2):
            await xs.read("/local/domain/1/device/vbd/51728/state")
        reader = MessageReader()
        reader.feed(await theirs.receive_some(4096))
        (request,) = list(reader)
        caplog.clear()
        await theirs.send_all(XsMessage(XS_ERROR, request.req_id, 0, b"EACCES\0").encode())
        await trio.testing.wait_all_tasks_blocked()
        await theirs.send_all(XsMessage(XS_ERROR, request.req_id, 0, b"EACCES\0").encode())
        await trio.testing.wait_all_tasks_blocked()
    assert caplog.text.count("reply to no request") == 1  # the second one is a stray
