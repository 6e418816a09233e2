"""Rules a hostile guest reaches, each as xenstored 4.17 has it (issue 15)."""

import logging
import tracemalloc

import pytest
import trio
import trio.testing

from tests.test_xs_store import Conn, error, events, guest_home, ok
from xenlike.abi.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_READ,
    XS_RELEASE,
    XS_RM,
    XS_SET_PERMS,
    XS_UNWATCH,
    XS_WATCH,
)
from xenlike.xenstore import XenStored
from xenlike.xenstore.store import DOMID_SELF, Quotas, Store
from xenlike.xenstore.wire import MessageReader, XsMessage


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def dom0(store: Store) -> Conn:
    return Conn(store, 0)


# -- no exception reaches a client -----------------------------------------------------


def test_removing_a_node_whose_parent_went_outside_the_transaction(dom0):
    """The case that killed the daemon: do_rm answers EINVAL, the commit EAGAIN."""
    ok(dom0.write("/a/b", "1"))
    tx = dom0.start()
    assert dom0.read("/a/b", tx=tx) == b"1"
    ok(dom0.send(XS_RM, b"/a\0"))
    assert error(dom0.send(XS_RM, b"/a/b\0", tx=tx)) == "EINVAL"
    assert error(dom0.end(tx)) == "EAGAIN"
    assert dom0.ls("/") == ["tool"]


async def test_a_store_defect_closes_only_that_connection(caplog):
    """Should the store raise, the daemon drops the one client and serves the others."""

    class Broken(Store):
        def handle(self, conn_id, message):
            if message.payload == b"/boom\0":
                raise RuntimeError("a defect")
            return super().handle(conn_id, message)

    xenstored = XenStored(Broken())

    async def request(stream, payload: bytes) -> XsMessage | None:
        await stream.send_all(XsMessage(XS_READ, 1, 0, payload).encode())
        reader = MessageReader()
        while not isinstance(message := reader.next_message(), XsMessage):
            data = await stream.receive_some(65536)
            if not data:
                return None
            reader.feed(data)
        return message

    async with trio.open_nursery() as nursery:
        (bad, bad_server), (good, good_server) = (
            trio.testing.memory_stream_pair(),
            trio.testing.memory_stream_pair(),
        )
        nursery.start_soon(xenstored.serve_stream, bad_server)
        nursery.start_soon(xenstored.serve_stream, good_server)
        with caplog.at_level(logging.ERROR, "xenlike.xenstore"):
            assert await request(bad, b"/boom\0") is None  # closed, no reply
        assert "a defect" in caplog.text
        answer = await request(good, b"/tool\0")
        assert answer is not None and answer.payload == b""
        await good.aclose()


# -- watches -----------------------------------------------------------------------


def test_a_watch_event_over_the_payload_limit_is_dropped(dom0):
    token = b"t" * 3000
    ok(dom0.send(XS_WATCH, b"/w\0" + token + b"\0"))
    short, long = "/w/x", "/w/" + "y" * 1200
    assert events(dom0.write(short)) == [(short, token.decode())]
    assert len(long) + len(token) + 2 > XENSTORE_PAYLOAD_MAX
    assert events(dom0.write(long)) == []
    assert dom0.read(long) == b""


def test_a_new_watch_whose_first_event_is_too_long_gets_only_its_ok(dom0):
    token = b"t" * (XENSTORE_PAYLOAD_MAX - 3)
    outcome = ok(dom0.send(XS_WATCH, b"/w\0" + token + b"\0"))
    assert events(outcome) == []


@pytest.mark.parametrize("path", [b"@any thing//", b"@", b"@\xff/\x01", b"@" + b"x" * 2047])
def test_special_watch_paths_accept_any_syntax(dom0, path):
    outcome = ok(dom0.send(XS_WATCH, path + b"\0tok\0"))
    assert [d.message.payload for d in outcome.deliveries[1:]] == [path + b"\0tok\0"]
    ok(dom0.send(XS_UNWATCH, path + b"\0tok\0"))


def test_a_special_watch_path_is_at_most_2048_characters(dom0):
    assert error(dom0.send(XS_WATCH, b"@" + b"x" * 2048 + b"\0tok\0")) == "EINVAL"


def test_unwatch_of_a_path_no_watch_has_is_enoent_whatever_its_syntax(dom0):
    assert error(dom0.send(XS_UNWATCH, b"/bad path/\0tok\0")) == "ENOENT"


# -- domains: SET_PERMS owners and XSA-322 ----------------------------------------------


def test_set_perms_whose_owner_is_no_domain_is_enoent():
    store = Store(domain_exists=lambda domid: domid in (0, 5))
    dom0 = Conn(store, 0)
    ok(dom0.write("/x"))
    assert dom0.call(XS_SET_PERMS, "/x", "n7") == b"ENOENT\0"
    assert dom0.call(XS_SET_PERMS, "/x", "n5", "r7") == b"OK\0"
    assert dom0.call(XS_GET_PERMS, "/x") == b"n5\0r7\0"  # shown, but grants nothing
    ok(dom0.write("/y"))
    assert dom0.call(XS_SET_PERMS, "/y", "n0", "r7") == b"OK\0"
    assert Conn(store, 7).read("/y") == b"EACCES\0"


def test_by_default_only_reserved_domids_are_no_domain(dom0):
    ok(dom0.write("/x"))
    assert dom0.call(XS_SET_PERMS, "/x", f"n{DOMID_SELF}") == b"ENOENT\0"
    assert dom0.call(XS_SET_PERMS, "/x", f"n{DOMID_SELF - 1}") == b"OK\0"


def introduce(dom0: Conn, domid: int) -> None:
    assert dom0.call(XS_INTRODUCE, str(domid), "1234", "7") == b"OK\0"


def test_permissions_naming_a_released_domain_do_not_pass_to_its_successor(dom0, store):
    introduce(dom0, 5)
    ok(dom0.write("/secret", "s"))
    assert dom0.call(XS_SET_PERMS, "/secret", "n0", "r5") == b"OK\0"
    assert Conn(store, 5).read("/secret") == b"s"
    assert dom0.call(XS_RELEASE, "5") == b"OK\0"
    introduce(dom0, 5)  # another guest, the same domid
    successor = Conn(store, 5)
    assert successor.read("/secret") == b"EACCES\0"
    ok(dom0.write("/secret", "still"))  # a later change does not revive the entry
    assert successor.read("/secret") == b"EACCES\0"
    assert dom0.call(XS_SET_PERMS, "/secret", "n0", "r5") == b"OK\0"  # named anew: granted
    assert successor.read("/secret") == b"still"


def test_a_transaction_cannot_revive_a_released_domains_permission(dom0, store):
    introduce(dom0, 5)
    ok(dom0.write("/secret", "s"))
    assert dom0.call(XS_SET_PERMS, "/secret", "n0", "r5") == b"OK\0"
    tx = dom0.start()
    ok(dom0.write("/secret", "from the transaction", tx=tx))
    assert dom0.call(XS_RELEASE, "5") == b"OK\0"
    introduce(dom0, 5)
    ok(dom0.end(tx))
    assert Conn(store, 5).read("/secret") == b"EACCES\0"


# -- transaction and memory quotas --------------------------------------------------------


def readable_nodes(dom0: Conn, count: int, name_length: int = 8) -> list[str]:
    paths = [f"/pub/{i:0{name_length}}" for i in range(count)]
    for path in paths:
        ok(dom0.write(path, "v"))
    assert dom0.call(XS_SET_PERMS, "/pub", "n0", "r5") == b"OK\0"
    for path in paths:
        assert dom0.call(XS_SET_PERMS, path, "n0", "r5") == b"OK\0"
    return paths


def test_a_guest_transaction_touches_at_most_1024_nodes_then_fails_with_enomem(dom0, store):
    paths = readable_nodes(dom0, 1100)
    guest = Conn(store, 5)
    tx = guest.start()
    for path in paths[:1024]:
        assert guest.read(path, tx=tx) == b"v"
    assert guest.read(paths[1024], tx=tx) == b"ENOSPC\0"
    assert guest.read(paths[0], tx=tx) == b"v"  # already in the transaction
    assert error(guest.end(tx)) == "ENOMEM"
    tx = guest.start()  # a fresh transaction starts from nothing
    assert guest.read(paths[1024], tx=tx) == b"v"
    ok(guest.end(tx))
    tx = dom0.start()  # domain 0 is not limited
    for path in paths:
        assert dom0.read(path, tx=tx) == b"v"
    ok(dom0.end(tx))


def test_open_transactions_cannot_grow_dom0_past_the_domain_memory_quota(dom0, store):
    """The issue's ten transactions of thousands of reads: bounded by the memory quota."""
    paths = readable_nodes(dom0, 1500, name_length=1900)
    guest = Conn(store, 5)
    answers = set()
    txs = [guest.start() for _ in range(10)]
    for tx in txs:
        for path in paths:
            answers.add(guest.read(path, tx=tx))
    assert answers == {b"v", b"ENOMEM\0", b"ENOSPC\0"}
    assert store.domain_memory(5) < store.quotas.memory
    for tx in txs:
        assert error(guest.end(tx)) == "ENOMEM"
    assert store.domain_memory(5) == 0


def test_a_guests_nodes_count_towards_its_memory_quota(dom0):
    store = Store(Quotas(memory=10_000))
    dom0 = Conn(store, 0)
    guest = guest_home(dom0, 5)
    ok(guest.write("data/a", b"x" * 1500))
    used = store.domain_memory(5)
    assert used > 1500
    results = [error(guest.write(f"data/n{i}", b"x" * 1500)) for i in range(8)]
    assert "ENOMEM" in results
    assert store.domain_memory(5) < 10_000
    ok(guest.send(XS_RM, b"data\0"))
    assert store.domain_memory(5) == 0
    ok(dom0.write("/local/domain/5/big", b"x" * 20_000))  # domain 0 has no quota


def test_memory_of_transaction_copies_is_given_back_when_the_connection_goes(dom0, store):
    paths = readable_nodes(dom0, 10)
    guest = Conn(store, 5)
    tx = guest.start()
    for path in paths:
        guest.read(path, tx=tx)
    assert store.domain_memory(5) > 0
    store.disconnect(guest.id)
    assert store.domain_memory(5) == 0


def test_a_write_in_a_transaction_counts_towards_memory(dom0):
    store = Store(Quotas(memory=8_000))
    dom0 = Conn(store, 0)
    guest = guest_home(dom0, 5)
    tx = guest.start()
    results = [error(guest.write(f"data/n{i}", b"x" * 1500, tx=tx)) for i in range(6)]
    assert "ENOMEM" in results
    assert error(guest.end(tx)) == "ENOMEM"
    assert guest.ls("data") == []


def test_the_issues_ten_transactions_of_5000_reads_stay_within_a_few_mib(dom0, store):
    """Measured, not counted: what the store's Python objects grow by (tracemalloc).
    Before the quotas, the same reads grew it by 27 MiB."""
    paths = readable_nodes(dom0, 5000, name_length=400)
    guest = Conn(store, 5)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        txs = [guest.start() for _ in range(10)]
        for tx in txs:
            for path in paths:
                guest.read(path, tx=tx)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The memory quota (2.5 MiB) counts paths and node records; Python's own
    # bookkeeping per touched node comes on top, bounded by the node quota.
    assert grown < 8 * 1024 * 1024, grown
