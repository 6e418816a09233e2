"""The store's semantics, request by request, against xenstored's behaviour."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xenlike.abi.xs_wire import (
    XS_CONTROL,
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
    XS_RESET_WATCHES,
    XS_RM,
    XS_SET_PERMS,
    XS_SET_TARGET,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WATCH_EVENT,
    XS_WRITE,
)
from xenlike.xenstore.store import DOMID_SELF, Outcome, Permission, Quotas, Store
from xenlike.xenstore.wire import XsMessage, join_strings


class Conn:
    """One connection to a store, with a request helper per operation."""

    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.id = store.connect(domid)

    def send(self, type_: int, payload: bytes, tx: int = 0, req_id: int = 77) -> Outcome:
        outcome = self.store.handle(self.id, XsMessage(type_, req_id, tx, payload))
        assert outcome.reply.req_id == req_id and outcome.reply.tx_id == tx
        return outcome

    def call(self, type_: int, *args: str | bytes, tx: int = 0) -> bytes:
        """Send a request of NUL-terminated args; the reply payload, or the errno name."""
        reply = self.send(type_, join_strings(*(_b(a) for a in args)), tx).reply
        if reply.type == XS_ERROR:
            return reply.payload
        assert reply.type == type_
        return reply.payload

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(XS_READ, path, tx=tx)

    def write(self, path: str, value: bytes | str = b"", tx: int = 0) -> Outcome:
        return self.send(XS_WRITE, _b(path) + b"\0" + _b(value), tx)

    def ls(self, path: str, tx: int = 0) -> list[str] | bytes:
        """The child names, or the error payload."""
        reply = self.send(XS_DIRECTORY, _b(path) + b"\0", tx).reply
        if reply.type == XS_ERROR:
            return reply.payload
        return [name.decode() for name in reply.payload.split(b"\0")[:-1]]

    def start(self) -> int:
        return int(self.call(XS_TRANSACTION_START, b"").rstrip(b"\0"))

    def end(self, tx: int, commit: bool = True) -> Outcome:
        return self.send(XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)


def _b(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def ok(outcome: Outcome) -> Outcome:
    assert outcome.reply.type != XS_ERROR, outcome.reply
    return outcome


def error(outcome: Outcome) -> str | None:
    if outcome.reply.type != XS_ERROR:
        return None
    return outcome.reply.payload.rstrip(b"\0").decode()


def events(outcome: Outcome, conn: Conn | None = None) -> list[tuple[str, str]]:
    """The (path, token) watch events of an outcome, for one connection or all."""
    found = []
    for delivery in outcome.deliveries:
        if delivery.message.type == XS_WATCH_EVENT and (
            conn is None or delivery.conn_id == conn.id
        ):
            path, token, _ = delivery.message.payload.split(b"\0")
            found.append((path.decode(), token.decode()))
    return found


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def dom0(store: Store) -> Conn:
    return Conn(store, 0)


def guest_home(dom0: Conn, domid: int) -> Conn:
    """A guest's home as the toolstack makes it: owned by dom0, readable by the guest,
    with a `data` directory the guest owns."""
    home = f"/local/domain/{domid}"
    ok(dom0.write(home))
    assert dom0.call(XS_SET_PERMS, home, "n0", f"r{domid}") == b"OK\0"
    ok(dom0.write(f"{home}/data"))
    assert dom0.call(XS_SET_PERMS, f"{home}/data", f"n{domid}") == b"OK\0"
    return Conn(dom0.store, domid)


# -- the tree ----------------------------------------------------------------


def test_a_fresh_store_is_what_xenstored_starts_with(dom0):
    assert dom0.ls("/") == ["tool"]
    assert dom0.ls("/tool") == ["xenstored"]
    assert dom0.call(XS_GET_PERMS, "/") == b"n0\0"
    # 4.17's GET_PERMS takes node names only; SET_PERMS also takes the two special ones.
    assert dom0.call(XS_GET_PERMS, "@introduceDomain") == b"EINVAL\0"
    assert dom0.call(XS_SET_PERMS, "@introduceDomain", "n0") == b"OK\0"


def test_write_creates_missing_parents_empty(dom0):
    ok(dom0.write("/a/b/c", "value"))
    assert dom0.read("/a/b/c") == b"value"
    assert dom0.read("/a") == b"" and dom0.read("/a/b") == b""
    assert dom0.ls("/a") == ["b"]


def test_values_are_raw_bytes_without_a_terminating_nul(dom0):
    ok(dom0.write("/x", b"a\0b"))
    assert dom0.read("/x") == b"a\0b"
    ok(dom0.write("/x", b""))
    assert dom0.read("/x") == b""


def test_directory_lists_children_in_creation_order(dom0):
    for name in ["zeta", "alpha", "mid"]:
        ok(dom0.write(f"/d/{name}", "1"))
    assert dom0.ls("/d") == ["zeta", "alpha", "mid"]
    assert dom0.ls("/d/zeta") == []


def test_mkdir_creates_once_and_keeps_an_existing_value(dom0):
    ok(dom0.send(XS_MKDIR, b"/m/n\0"))
    assert dom0.read("/m/n") == b""
    ok(dom0.write("/m/n", "kept"))
    ok(dom0.send(XS_MKDIR, b"/m/n\0"))
    assert dom0.read("/m/n") == b"kept"


def test_rm_removes_a_subtree(dom0):
    ok(dom0.write("/r/a/b", "1"))
    ok(dom0.write("/r/c", "2"))
    ok(dom0.send(XS_RM, b"/r/a\0"))
    assert dom0.ls("/r") == ["c"]
    assert dom0.read("/r/a/b") == b"ENOENT\0"
    assert dom0.store.statistics().nodes == Store().statistics().nodes + 2


def test_rm_of_a_missing_node_is_fine_only_if_its_parent_exists(dom0):
    assert dom0.call(XS_RM, "/tool/nothing") == b"OK\0"
    assert dom0.call(XS_RM, "/nothing/below") == b"ENOENT\0"
    assert dom0.call(XS_RM, "/") == b"EINVAL\0"


def test_relative_paths_resolve_under_the_callers_home(dom0):
    assert dom0.read("foo") == b"ENOENT\0"
    ok(dom0.write("data/x", "1"))
    assert dom0.read("/local/domain/0/data/x") == b"1"
    assert dom0.call(XS_GET_DOMAIN_PATH, "5") == b"/local/domain/5\0"


def test_directory_part_reassembles_a_long_listing(dom0):
    names = [f"child-with-a-rather-long-name-{i:04d}" for i in range(200)]
    for name in names:
        ok(dom0.write(f"/big/{name}"))
    assert dom0.ls("/big") == b"E2BIG\0"  # 7200 bytes do not fit one reply
    collected, offset, generation = b"", 0, None
    while True:
        part = dom0.call(XS_DIRECTORY_PART, "/big", str(offset))
        gen, _, chunk = part.partition(b"\0")
        assert generation in (None, gen)
        generation = gen
        assert len(part) <= 4096
        if chunk.endswith(b"\0\0") or chunk == b"\0":
            collected += chunk[:-1]
            break
        collected += chunk
        offset += len(chunk)
    assert collected.split(b"\0")[:-1] == [n.encode() for n in names]
    assert dom0.call(XS_DIRECTORY_PART, "/big") == b"EINVAL\0"


# -- bad input, as xen-abi.md section 17 tabulates -------------------------------


@pytest.mark.parametrize(
    ("type_", "payload", "expected"),
    [
        (999, b"", "ENOSYS"),
        (20, b"/\0", "ENOSYS"),  # the removed XS_RESTRICT
        (XS_WATCH_EVENT, b"/\0t\0", "ENOSYS"),
        (XS_ERROR, b"EINVAL\0", "ENOSYS"),
        (XS_WRITE, b"/no-nul", "EINVAL"),
        (XS_READ, b"/tool", "EINVAL"),
        (XS_READ, b"", "EINVAL"),
        (XS_READ, b"/tool\0/x\0", "EINVAL"),
        (XS_READ, b"/a//b\0", "EINVAL"),
        (XS_READ, b"/a b\0", "EINVAL"),
        (XS_READ, b"/tool/\0", "EINVAL"),
        (XS_READ, b"@introduceDomain\0", "EINVAL"),
        (XS_READ, "/caf\u00e9\0".encode(), "EINVAL"),
        (XS_WATCH, b"/tool\0", "EINVAL"),
        (XS_TRANSACTION_END, b"X\0", "EINVAL"),
        (XS_TRANSACTION_END, b"T\0", "ENOENT"),  # no transaction
        (XS_SET_PERMS, b"/tool\0", "EINVAL"),
        (XS_SET_PERMS, b"/tool\0x0\0", "EINVAL"),
        (XS_SET_PERMS, b"/tool\0r\0", "EINVAL"),
        (XS_CONTROL, b"print\0", "ENOSYS"),
        (XS_UNWATCH, b"/tool\0never\0", "ENOENT"),
    ],
)
def test_bad_requests_get_xenstoreds_errors(dom0, type_, payload, expected):
    assert error(dom0.send(type_, payload)) == expected


def test_unknown_transaction_is_enoent_and_echoes_its_id(dom0):
    reply = dom0.send(XS_READ, b"/tool\0", tx=4242).reply
    assert reply.payload == b"ENOENT\0" and reply.tx_id == 4242
    # Watches ignore the transaction id, as XS_FLAG_NOTID says.
    assert error(dom0.send(XS_WATCH, b"/tool\0t\0", tx=4242)) is None


def test_path_length_limit_is_2048_characters(dom0):
    assert dom0.read("/" + "a" * 2047) == b"ENOENT\0"
    assert dom0.read("/" + "a" * 2048) == b"EINVAL\0"
    # Under /local/domain/<id>/ only the rest counts.
    assert dom0.read("/local/domain/5/" + "a" * 2048) == b"ENOENT\0"
    assert dom0.read("/local/domain/5/" + "a" * 2049) == b"EINVAL\0"


# -- permissions -------------------------------------------------------------------


def test_perms_round_trip_and_parse(dom0):
    ok(dom0.write("/p"))
    assert dom0.call(XS_SET_PERMS, "/p", "w3", "r1", "b2", "n4") == b"OK\0"
    assert dom0.call(XS_GET_PERMS, "/p") == b"w3\0r1\0b2\0n4\0"
    assert Permission.parse("b12") == Permission(12, 3) and str(Permission(7, 0)) == "n7"
    with pytest.raises(ValueError):
        Permission.parse("r")


def test_domain_0_may_do_anything(dom0):
    ok(dom0.write("/secret", "x"))
    assert dom0.call(XS_SET_PERMS, "/secret", "n5") == b"OK\0"
    assert dom0.read("/secret") == b"x"
    ok(dom0.write("/secret", "y"))
    assert dom0.call(XS_SET_PERMS, "/secret", "n0") == b"OK\0"


def test_a_guest_reads_only_what_perms_grant(dom0, store):
    guest = Conn(store, 5)
    ok(dom0.write("/pub", "public"))
    ok(dom0.write("/priv", "private"))
    assert dom0.call(XS_SET_PERMS, "/pub", "r0") == b"OK\0"  # owner 0, everyone reads
    assert dom0.call(XS_SET_PERMS, "/priv", "n0", "r6") == b"OK\0"  # only domain 6 reads
    assert guest.read("/pub") == b"public"
    assert guest.read("/priv") == b"EACCES\0"
    assert Conn(store, 6).read("/priv") == b"private"
    assert guest.call(XS_WRITE, b"/pub\0x") == b"EACCES\0"
    assert guest.call(XS_GET_PERMS, "/priv") == b"EACCES\0"


def test_a_missing_node_is_enoent_only_to_those_who_may_know(dom0, store):
    guest = Conn(store, 5)
    # The root is n0: the guest may not learn what exists under it.
    assert guest.read("/nothing") == b"EACCES\0"
    ok(dom0.write("/open"))
    assert dom0.call(XS_SET_PERMS, "/open", "r0") == b"OK\0"
    assert guest.read("/open/nothing") == b"ENOENT\0"


def test_a_guest_owns_what_it_creates_and_inherits_the_acl(dom0, store):
    guest = guest_home(dom0, 5)
    assert dom0.call(XS_SET_PERMS, "/local/domain/5/data", "n5", "r7") == b"OK\0"
    ok(guest.write("data/a/b", "v"))
    assert guest.call(XS_GET_PERMS, "data/a/b") == b"n5\0r7\0"
    assert guest.read("/local/domain/5/data/a/b") == b"v"
    assert Conn(store, 7).read("/local/domain/5/data/a/b") == b"v"
    assert Conn(store, 8).read("/local/domain/5/data/a/b") == b"EACCES\0"
    # The guest may read its home (r5) but not write it.
    assert guest.call(XS_WRITE, b"/local/domain/5/x\0v") == b"EACCES\0"


def test_only_the_owner_sets_perms_and_a_guest_cannot_give_nodes_away(dom0, store):
    guest = guest_home(dom0, 5)
    ok(guest.write("data/mine"))
    assert guest.call(XS_SET_PERMS, "data/mine", "n5", "b6") == b"OK\0"
    assert guest.call(XS_SET_PERMS, "data/mine", "n6") == b"EPERM\0"
    other = Conn(store, 6)  # may read and write, but is not the owner
    assert other.call(XS_SET_PERMS, "/local/domain/5/data/mine", "n5") == b"EACCES\0"
    ok(other.write("/local/domain/5/data/mine", "written by 6"))


def test_set_target_gives_a_device_model_its_targets_rights(dom0, store):
    guest_home(dom0, 5)
    ok(dom0.send(XS_INTRODUCE, b"5\x00100\x001\x00"))
    ok(dom0.send(XS_INTRODUCE, b"9\x00101\x001\x00"))
    ok(dom0.write("/local/domain/5/data/k", "v"))
    stubdom = Conn(store, 9)
    assert stubdom.read("/local/domain/5/data/k") == b"EACCES\0"
    assert stubdom.call(XS_SET_TARGET, "9", "5") == b"EACCES\0"
    assert dom0.call(XS_SET_TARGET, "9", "5") == b"OK\0"
    assert stubdom.read("/local/domain/5/data/k") == b"v"
    assert dom0.call(XS_SET_TARGET, "9", "12") == b"ENOENT\0"


# -- watches -----------------------------------------------------------------------


def test_a_new_watch_fires_once_after_its_ok(dom0):
    outcome = ok(dom0.send(XS_WATCH, b"/nowhere\0tok\0"))
    kinds = [d.message.type for d in outcome.deliveries]
    assert kinds == [XS_WATCH, XS_WATCH_EVENT]
    assert events(outcome) == [("/nowhere", "tok")]
    assert events(dom0.write("/elsewhere")) == []


def test_watches_fire_for_the_path_and_everything_below(dom0):
    ok(dom0.send(XS_WATCH, b"/a\0A\0"))
    ok(dom0.send(XS_WATCH, b"/a/b/c\0C\0"))
    ok(dom0.send(XS_WATCH, b"/\0ROOT\0"))
    assert events(dom0.write("/a/b/c/d", "1")) == [
        ("/a/b/c/d", "A"),
        ("/a/b/c/d", "C"),
        ("/a/b/c/d", "ROOT"),
    ]
    assert events(dom0.write("/a", "2")) == [("/a", "A"), ("/a", "ROOT")]
    assert events(dom0.write("/ab", "3")) == [("/ab", "ROOT")]  # not below /a


def test_events_come_before_the_reply_of_the_change(dom0):
    ok(dom0.send(XS_WATCH, b"/a\0A\0"))
    kinds = [d.message.type for d in dom0.write("/a/x").deliveries]
    assert kinds == [XS_WATCH_EVENT, XS_WRITE]


def test_removal_fires_removed_descendants_exactly(dom0):
    ok(dom0.write("/a/b/c", "1"))
    ok(dom0.write("/a/other", "1"))
    for path, token in [("/a", "A"), ("/a/b", "B"), ("/a/b/c", "C"), ("/a/b/c/d", "D"), ("/", "R")]:
        ok(dom0.send(XS_WATCH, join_strings(path.encode(), token.encode())))
    fired = events(dom0.send(XS_RM, b"/a\0"))
    assert sorted(fired) == sorted([("/a/b/c", "C"), ("/a/b", "B"), ("/a", "A"), ("/a", "R")])
    # Deepest first, the removed root last.
    assert fired.index(("/a/b/c", "C")) < fired.index(("/a/b", "B")) < fired.index(("/a", "A"))


def test_mkdir_of_an_existing_node_fires_nothing(dom0):
    ok(dom0.write("/m"))
    ok(dom0.send(XS_WATCH, b"/m\0M\0"))
    assert events(dom0.send(XS_MKDIR, b"/m\0")) == []
    assert events(dom0.send(XS_MKDIR, b"/m/n\0")) == [("/m/n", "M")]


def test_relative_watches_report_relative_paths(dom0, store):
    guest = guest_home(dom0, 5)
    assert events(ok(guest.send(XS_WATCH, b"data\0rel\0"))) == [("data", "rel")]
    assert events(guest.write("data/device/vif", "1"), guest) == [("data/device/vif", "rel")]


def test_one_watch_per_path_and_token(dom0):
    ok(dom0.send(XS_WATCH, b"/w\0t\0"))
    assert error(dom0.send(XS_WATCH, b"/w\0t\0")) == "EEXIST"
    ok(dom0.send(XS_WATCH, b"/w\0t2\0"))
    assert events(dom0.write("/w")) == [("/w", "t"), ("/w", "t2")]
    ok(dom0.send(XS_UNWATCH, b"/w\0t\0"))
    assert events(dom0.write("/w")) == [("/w", "t2")]
    ok(dom0.send(XS_RESET_WATCHES, b"\0"))
    assert events(dom0.write("/w")) == []


def test_events_go_to_the_watching_connection_only(dom0, store):
    other = Conn(store, 0)
    ok(other.send(XS_WATCH, b"/w\0theirs\0"))
    outcome = dom0.write("/w")
    assert events(outcome, other) == [("/w", "theirs")]
    assert events(outcome, dom0) == []


def test_events_do_not_leak_to_watchers_who_cannot_read(dom0, store):
    guest_home(dom0, 6)
    snoop = Conn(store, 5)
    assert events(ok(snoop.send(XS_WATCH, b"/local/domain/6\0snoop\0")), snoop) == [
        ("/local/domain/6", "snoop")  # the registration event is unconditional
    ]
    ok(snoop.send(XS_WATCH, b"/\0everything\0"))
    assert events(dom0.write("/local/domain/6/data/secret", "x"), snoop) == []
    assert events(dom0.send(XS_RM, b"/local/domain/6/data/secret\0"), snoop) == []
    assert events(dom0.write("/local/domain/6/data/secret", "x"), snoop) == []
    # Read access to the node (or its parent) lets the event through.
    assert dom0.call(XS_SET_PERMS, "/local/domain/6/data/secret", "n6", "r5") == b"OK\0"
    assert events(dom0.write("/local/domain/6/data/secret", "y"), snoop) == [
        ("/local/domain/6/data/secret", "snoop"),
        ("/local/domain/6/data/secret", "everything"),
    ]
    # Losing access is itself an event the watcher sees (checked with the old perms).
    outcome = dom0.send(XS_SET_PERMS, b"/local/domain/6/data/secret\0n6\0")
    assert len(events(outcome, snoop)) == 2
    assert events(dom0.write("/local/domain/6/data/secret", "z"), snoop) == []


def test_domain_events_reach_domain_0_and_only_permitted_guests(dom0, store):
    guest = Conn(store, 5)
    for conn in (dom0, guest):
        ok(conn.send(XS_WATCH, b"@introduceDomain\0intro\0"))
        ok(conn.send(XS_WATCH, b"@releaseDomain\0release\0"))
    outcome = ok(dom0.send(XS_INTRODUCE, b"7\x001234\x003\x00"))
    assert events(outcome, dom0) == [("@introduceDomain", "intro")]
    assert events(outcome, guest) == []
    assert dom0.call(XS_SET_PERMS, "@releaseDomain", "n0", "r5") == b"OK\0"
    outcome = ok(dom0.send(XS_RELEASE, b"7\0"))
    assert events(outcome, dom0) == [("@releaseDomain", "release")]
    assert events(outcome, guest) == [("@releaseDomain", "release")]


# -- transactions ------------------------------------------------------------------


def test_transaction_changes_are_invisible_until_commit(dom0, store):
    other = Conn(store, 0)
    ok(dom0.write("/t/a", "old"))
    tx = dom0.start()
    assert tx == 1 and dom0.start() == 2  # per-connection ids, from 1
    ok(dom0.write("/t/a", "new", tx=tx))
    ok(dom0.write("/t/b/c", "created", tx=tx))
    assert dom0.read("/t/a", tx=tx) == b"new"
    assert dom0.ls("/t", tx=tx) == ["a", "b"]
    assert other.read("/t/a") == b"old"
    assert other.ls("/t") == ["a"]
    ok(dom0.end(tx))
    assert other.read("/t/a") == b"new" and other.read("/t/b/c") == b"created"


def test_abort_discards_and_ends_the_transaction(dom0):
    tx = dom0.start()
    ok(dom0.write("/gone", "x", tx=tx))
    ok(dom0.end(tx, commit=False))
    assert dom0.read("/gone") == b"ENOENT\0"
    assert error(dom0.end(tx)) == "ENOENT"


def test_a_conflicting_change_makes_commit_fail_with_eagain(dom0, store):
    other = Conn(store, 0)
    ok(dom0.write("/c/k", "1"))
    tx = dom0.start()
    assert dom0.read("/c/k", tx=tx) == b"1"
    ok(dom0.write("/c/out", "x", tx=tx))
    ok(other.write("/c/k", "2"))
    assert error(dom0.end(tx)) == "EAGAIN"
    assert dom0.read("/c/out") == b"ENOENT\0"
    assert error(dom0.end(tx)) == "ENOENT"  # a failed commit ends the transaction too


def test_a_new_child_conflicts_with_a_listing(dom0, store):
    other = Conn(store, 0)
    ok(dom0.write("/dir/a"))
    tx = dom0.start()
    assert dom0.ls("/dir", tx=tx) == ["a"]
    ok(other.write("/dir/b"))
    assert error(dom0.end(tx)) == "EAGAIN"


def test_unrelated_changes_do_not_conflict(dom0, store):
    other = Conn(store, 0)
    ok(dom0.write("/u/mine", "1"))
    tx = dom0.start()
    ok(dom0.write("/u/mine", "2", tx=tx))
    ok(other.write("/elsewhere", "x"))
    ok(dom0.end(tx))
    assert dom0.read("/u/mine") == b"2"


def test_reading_a_missing_node_conflicts_with_its_creation(dom0, store):
    other = Conn(store, 0)
    tx = dom0.start()
    assert dom0.read("/later", tx=tx) == b"ENOENT\0"
    ok(other.write("/later", "now"))
    assert error(dom0.end(tx)) == "EAGAIN"


def test_transaction_watch_events_fire_on_commit_only(dom0):
    ok(dom0.send(XS_WATCH, b"/t\0T\0"))
    ok(dom0.write("/t/gone"))
    tx = dom0.start()
    assert events(dom0.write("/t/x", "1", tx=tx)) == []
    assert events(dom0.send(XS_RM, b"/t/gone\0", tx=tx)) == []
    assert sorted(events(ok(dom0.end(tx)))) == [("/t/gone", "T"), ("/t/x", "T")]
    tx = dom0.start()
    ok(dom0.write("/t/y", "1", tx=tx))
    assert events(ok(dom0.end(tx, commit=False))) == []


def test_transactions_do_not_nest(dom0):
    tx = dom0.start()
    reply = dom0.send(XS_TRANSACTION_START, b"\0", tx=tx).reply
    assert reply.payload == b"EBUSY\0"


def test_a_removed_and_recreated_node_still_conflicts(dom0, store):
    other = Conn(store, 0)
    ok(dom0.write("/rr", "same"))
    tx = dom0.start()
    assert dom0.read("/rr", tx=tx) == b"same"
    ok(other.send(XS_RM, b"/rr\0"))
    ok(other.write("/rr", "same"))
    assert error(dom0.end(tx)) == "EAGAIN"


# -- quotas: xenstored's defaults, for guests only ------------------------------------


def test_quota_defaults_are_xenstoreds():
    assert Quotas() == Quotas(
        nodes=1000,
        watches=128,
        outstanding=20,
        transactions=10,
        node_permissions=5,
        node_size=2048,
        transaction_nodes=1024,
        memory=2621440,
    )


def test_watch_quota_is_e2big_for_a_guest_and_absent_for_domain_0(dom0, store):
    guest = Conn(store, 5)
    for i in range(129):  # xenstored 4.17 checks `>`: the quota plus one
        ok(guest.send(XS_WATCH, b"@releaseDomain\0%d\0" % i))
    assert error(guest.send(XS_WATCH, b"@releaseDomain\0one-more\0")) == "E2BIG"
    for i in range(1000):
        ok(dom0.send(XS_WATCH, b"/\0%d\0" % i))


def test_transaction_quota_is_enospc_for_a_guest(store):
    guest = Conn(store, 5)
    for _ in range(11):  # xenstored 4.17 checks `>`: the quota plus one
        guest.start()
    assert error(guest.send(XS_TRANSACTION_START, b"\0")) == "ENOSPC"


def test_node_size_quota_is_enospc_for_a_guest(dom0, store):
    guest = guest_home(dom0, 5)
    # 24 bytes of header and 8 per permission count too, and write_node_raw() refuses
    # a record of 2048 bytes or more: 2047 - 32 = 2015.
    ok(guest.write("data/v", b"x" * 2015))
    assert error(guest.write("data/v", b"x" * 2016)) == "ENOSPC"
    ok(dom0.write("/local/domain/5/data/v", b"x" * 4000))


def test_permission_count_quota_is_enospc_for_a_guest(dom0, store):
    guest = guest_home(dom0, 5)
    ok(guest.write("data/p"))
    assert guest.call(XS_SET_PERMS, "data/p", "n5", "r1", "r2", "r3", "r4") == b"OK\0"
    assert guest.call(XS_SET_PERMS, "data/p", "n5", "r1", "r2", "r3", "r4", "r6") == b"ENOSPC\0"


def test_node_quota_counts_every_node_a_guest_owns():
    store = Store(Quotas(nodes=6))
    dom0 = Conn(store, 0)
    guest = guest_home(dom0, 5)  # owns data: 1 node
    ok(guest.write("data/a/b/c"))  # 3 more
    assert error(guest.write("data/x/y/z")) == "ENOSPC"  # would be 7
    assert guest.read("data/x") == b"ENOENT\0"  # nothing half-created
    ok(guest.write("data/x/y"))  # 6
    assert error(guest.write("data/z")) == "ENOSPC"
    ok(guest.send(XS_RM, b"data/a\0"))  # frees 3
    ok(guest.write("data/z"))
    ok(dom0.write("/local/domain/5/data/many/more/nodes/for/dom0"))  # dom0 is not limited


def test_node_quota_applies_at_commit(dom0):
    store = Store(Quotas(nodes=4))
    dom0 = Conn(store, 0)
    guest = guest_home(dom0, 5)
    first, second = guest.start(), guest.start()
    ok(guest.write("data/a/b", tx=first))
    ok(guest.write("data/c/d", tx=second))
    ok(guest.end(first))
    assert error(guest.end(second)) == "ENOSPC"


def test_reply_over_the_payload_limit_is_e2big(dom0):
    ok(dom0.write("/big", b"v" * 4000))
    for i in range(30):
        ok(dom0.write(f"/dir/{'n' * 140}{i}"))
    assert dom0.ls("/dir") == b"E2BIG\0"


# -- domains -------------------------------------------------------------------------


def test_introduce_and_is_domain_introduced(dom0, store):
    assert dom0.call(XS_IS_DOMAIN_INTRODUCED, "3") == b"F\0"
    assert dom0.call(XS_IS_DOMAIN_INTRODUCED, "0") == b"T\0"
    assert dom0.call(XS_IS_DOMAIN_INTRODUCED, str(DOMID_SELF)) == b"T\0"
    ok(dom0.send(XS_INTRODUCE, b"3\x00999\x005\x00"))
    assert dom0.call(XS_IS_DOMAIN_INTRODUCED, "3") == b"T\0"
    assert store.domains[3].gfn == 999 and store.domains[3].port == 5
    assert dom0.call(XS_INTRODUCE, "4", "1", "0") == b"EINVAL\0"  # no event channel 0
    assert dom0.call(XS_INTRODUCE, "4", "1") == b"EINVAL\0"


def test_a_second_introduce_resets_the_domain_and_fires_nothing(dom0, store):
    ok(dom0.send(XS_INTRODUCE, b"3\x001\x005\x00"))
    guest = Conn(store, 3)
    ok(guest.send(XS_WATCH, b"@releaseDomain\0w\0"))
    guest.start()
    ok(dom0.send(XS_WATCH, b"@introduceDomain\0i\0"))
    assert events(ok(dom0.send(XS_INTRODUCE, b"3\x001\x006\x00")), dom0) == []
    assert store.statistics().watches == 1 and store.statistics().transactions == 0


def test_domain_operations_are_for_domain_0_only(store):
    guest = Conn(store, 5)
    for type_, payload in [
        (XS_INTRODUCE, b"6\x001\x001\x00"),
        (XS_RELEASE, b"6\0"),
        (XS_IS_DOMAIN_INTRODUCED, b"6\0"),
        (XS_SET_TARGET, b"6\x005\x00"),
        (XS_CONTROL, b"print\0"),
    ]:
        assert error(guest.send(type_, payload)) == "EACCES"
    assert guest.call(XS_GET_DOMAIN_PATH, "6") == b"/local/domain/6\0"


def test_release_frees_the_domain_its_connections_and_its_nodes(dom0, store):
    guest = guest_home(dom0, 5)
    ok(dom0.send(XS_INTRODUCE, b"5\x00100\x007\x00"))
    ok(guest.write("data/a/b", "1"))
    ok(guest.send(XS_WATCH, b"data\0mine\0"))
    guest.start()
    # A backend directory in dom0's tree, owned by the guest, goes too.
    ok(dom0.write("/local/domain/0/backend/vif/5/0", "x"))
    assert dom0.call(XS_SET_PERMS, "/local/domain/0/backend/vif/5", "n5") == b"OK\0"
    ok(dom0.send(XS_WATCH, b"/local/domain/5\0home\0"))
    ok(dom0.send(XS_WATCH, b"@releaseDomain\0rel\0"))
    before = store.statistics()

    outcome = ok(dom0.send(XS_RELEASE, b"5\0"))

    assert outcome.closed == (guest.id,)
    assert events(outcome, guest) == []
    assert ("/local/domain/5/data", "home") in events(outcome, dom0)
    assert events(outcome, dom0)[-1] == ("@releaseDomain", "rel")
    assert dom0.ls("/local/domain/5") == []  # the home is the toolstack's to remove
    assert dom0.ls("/local/domain/0/backend/vif") == []
    after = store.statistics()
    assert after.connections == before.connections - 1
    assert after.watches == before.watches - 1 and after.transactions == 0
    assert dom0.call(XS_IS_DOMAIN_INTRODUCED, "5") == b"F\0"
    assert dom0.call(XS_RELEASE, "5") == b"ENOENT\0"
    assert dom0.call(XS_RELEASE, "0") == b"EINVAL\0"


def test_disconnect_frees_watches_and_transactions(dom0, store):
    conn = Conn(store, 0)
    ok(conn.send(XS_WATCH, b"/\0w\0"))
    tx = conn.start()
    ok(conn.write("/never", "1", tx=tx))
    assert store.statistics().watches == 1 and store.statistics().transactions == 1
    store.disconnect(conn.id)
    assert store.statistics().watches == 0 and store.statistics().transactions == 0
    assert events(dom0.write("/x")) == []
    assert dom0.read("/never") == b"ENOENT\0"


# -- the store against a dict of paths --------------------------------------------------

segments = st.sampled_from(["a", "b", "c"])
paths = st.lists(segments, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
values = st.binary(max_size=8)


class StoreAgainstModel(RuleBasedStateMachine):
    """Domain 0, no transactions: the store behaves as a dict of paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = Conn(Store(), 0)
        self.model = {"/": b"", "/tool": b"", "/tool/xenstored": b""}

    def parent(self, path: str) -> str:
        return path.rsplit("/", 1)[0] or "/"

    def children(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        return sorted(
            p[len(prefix) :]
            for p in self.model
            if p != path and p.startswith(prefix) and "/" not in p[len(prefix) :]
        )

    @rule(path=paths, value=values)
    def write(self, path, value):
        ok(self.conn.write(path, value))
        self.model[path] = value
        while (path := self.parent(path)) not in self.model:
            self.model[path] = b""

    @rule(path=paths)
    def rm(self, path):
        outcome = self.conn.send(XS_RM, path.encode() + b"\0")
        if path in self.model or self.parent(path) in self.model:
            ok(outcome)
            for p in [p for p in self.model if p == path or p.startswith(path + "/")]:
                del self.model[p]
        else:
            assert error(outcome) == "ENOENT"

    @rule(path=paths)
    def read(self, path):
        expected = self.model.get(path, b"ENOENT\0")
        assert self.conn.read(path) == expected

    @rule(path=st.one_of(paths, st.just("/")))
    def ls(self, path):
        listing = self.conn.ls(path)
        if path in self.model:
            assert sorted(listing) == self.children(path)
        else:
            assert listing == b"ENOENT\0"

    @precondition(lambda self: len(self.model) > 3)
    @rule()
    def mkdir_existing_keeps_value(self):
        path = sorted(self.model)[-1]
        ok(self.conn.send(XS_MKDIR, path.encode() + b"\0"))
        assert self.conn.read(path) == self.model[path]

    @invariant()
    def node_count_matches(self):
        specials = 2  # @introduceDomain, @releaseDomain
        assert self.conn.store.statistics().nodes == len(self.model) + specials


StoreAgainstModel.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
test_store_against_a_dict_of_paths = StoreAgainstModel.TestCase
