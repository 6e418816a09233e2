"""Random requests from guests and domain 0, in and out of transactions: the store never raises.

A hostile guest chooses its requests; whatever they are, the store answers
each one (an error is an answer) and keeps its books straight: the tree is
consistent, each domain's node count and memory match what it owns.
"""

from collections import Counter

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
    XS_RESUME,
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
from xenlike.xenstore.store import Quotas, Store, _memory_of
from xenlike.xenstore.wire import XsMessage

DOMIDS = [0, 1, 2, 3]
names = st.sampled_from(["a", "b", "c", "data", "local", "domain", "1", "2", "tool"])
absolute = st.lists(names, min_size=0, max_size=4).map(lambda p: "/" + "/".join(p))
relative = st.lists(names, min_size=1, max_size=3).map("/".join)
in_data = st.lists(st.sampled_from(["a", "b", "c"]), min_size=0, max_size=3).map(
    lambda p: "/".join(["data", *p])
)
in_homes = st.builds(
    lambda domid, tail: f"/local/domain/{domid}/{tail}", st.sampled_from([1, 2, 3]), in_data
)
odd = st.sampled_from(
    [
        "",
        "/a/",
        "//a",
        "/a b",
        "@introduceDomain",
        "@releaseDomain",
        "@x y",
        "/local/domain/1",
        "/local/domain/2/data",
        "a" * 2100,
    ]
)
paths = st.one_of(in_data, in_data, in_homes, absolute, relative, odd).map(str.encode)
perms = st.lists(
    st.builds(
        lambda letter, domid: f"{letter}{domid}".encode(),
        st.sampled_from("nrwbx"),
        st.sampled_from([0, 1, 2, 3, 9, 32752]),
    ),
    min_size=0,
    max_size=7,
)
values = st.binary(max_size=40) | st.just(b"v" * 600)


def z(*args: bytes) -> bytes:
    return b"".join(arg + b"\0" for arg in args)


payloads = {
    XS_READ: paths.map(z),
    XS_DIRECTORY: paths.map(z),
    XS_GET_PERMS: paths.map(z),
    XS_MKDIR: paths.map(z),
    XS_RM: paths.map(z),
    XS_WRITE: st.builds(lambda p, v: p + b"\0" + v, paths, values),
    XS_SET_PERMS: st.builds(lambda p, ps: z(p, *ps), paths, perms),
    XS_WATCH: st.builds(z, paths, st.sampled_from([b"t", b"u", b"x" * 3000])),
    XS_UNWATCH: st.builds(z, paths, st.sampled_from([b"t", b"u"])),
    XS_DIRECTORY_PART: st.builds(
        lambda p, o: z(p, o), paths, st.sampled_from([b"0", b"1", b"3", b"999", b"x"])
    ),
    XS_TRANSACTION_START: st.just(b"\0"),
    XS_TRANSACTION_END: st.sampled_from([b"T\0", b"F\0", b"X\0", b""]),
    XS_INTRODUCE: st.builds(lambda d: z(d, b"99", b"7"), st.sampled_from([b"1", b"2", b"3", b"0"])),
    XS_RELEASE: st.sampled_from([b"1\0", b"2\0", b"3\0", b"0\0", b"x\0"]),
    XS_RESUME: st.sampled_from([b"1\0", b"9\0"]),
    XS_SET_TARGET: st.sampled_from([z(b"2", b"1"), z(b"1", b"3"), z(b"1")]),
    XS_IS_DOMAIN_INTRODUCED: st.sampled_from([b"1\0", b"9\0"]),
    XS_GET_DOMAIN_PATH: st.sampled_from([b"1\0", b"99999999\0"]),
    XS_RESET_WATCHES: st.just(b""),
    XS_CONTROL: st.just(b"help\0"),
    999: st.binary(max_size=8),
}
COMMON = [
    XS_WRITE,
    XS_READ,
    XS_RM,
    XS_DIRECTORY,
    XS_SET_PERMS,
    XS_MKDIR,
    XS_WATCH,
    XS_TRANSACTION_START,
    XS_TRANSACTION_END,
]
requests = st.sampled_from(sorted(payloads) + COMMON * 4).flatmap(
    lambda type_: payloads[type_].map(lambda payload: (type_, payload))
)


class HostileClients(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Small quotas, so random runs reach them.
        self.store = Store(
            Quotas(nodes=12, watches=3, transactions=2, transaction_nodes=6, memory=3000)
        )
        self.conns: dict[int, int] = {}  # conn id -> domid
        self.txs: dict[int, set[int]] = {}  # conn id -> open transaction ids
        # What the toolstack makes for each guest: a home it reads, a data dir it owns.
        dom0 = self.store.connect(0)
        for domid in (1, 2, 3):
            home = f"/local/domain/{domid}".encode()
            for type_, payload in [
                (XS_INTRODUCE, z(b"%d" % domid, b"99", b"7")),
                (XS_MKDIR, z(home + b"/data")),
                (XS_SET_PERMS, z(home, b"n0", b"r%d" % domid)),
                (XS_SET_PERMS, z(home + b"/data", b"n%d" % domid)),
            ]:
                assert self.store.handle(dom0, XsMessage(type_, 0, 0, payload)).reply.type == type_
        self.store.disconnect(dom0)

    @rule(domid=st.sampled_from(DOMIDS))
    def connect(self, domid):
        conn_id = self.store.connect(domid)
        self.conns[conn_id] = domid
        self.txs[conn_id] = set()

    @precondition(lambda self: self.conns)
    @rule(data=st.data())
    def disconnect(self, data):
        conn_id = data.draw(st.sampled_from(sorted(self.conns)))
        self.store.disconnect(conn_id)
        del self.conns[conn_id], self.txs[conn_id]

    @precondition(lambda self: self.conns)
    @rule(data=st.data(), request=requests, in_tx=st.booleans())
    def send(self, data, request, in_tx):
        conn_id = data.draw(st.sampled_from(sorted(self.conns)))
        type_, payload = request
        tx_id = 0
        if in_tx:
            open_txs = sorted(self.txs[conn_id])
            tx_id = data.draw(
                st.sampled_from(open_txs * 9 + [12345])
                if open_txs
                else st.sampled_from([0] * 9 + [12345])
            )
        outcome = self.store.handle(conn_id, XsMessage(type_, 42, tx_id, payload))
        answer = outcome.reply
        assert (answer.req_id, answer.tx_id) == (42, tx_id)
        assert answer.type in (type_, XS_ERROR)
        assert len(answer.payload) <= 4096
        for delivery in outcome.deliveries:
            assert len(delivery.message.payload) <= 4096
            if delivery.message is not answer:
                assert delivery.message.type == XS_WATCH_EVENT
        if answer.type == XS_TRANSACTION_START:
            self.txs[conn_id].add(int(answer.payload[:-1]))
        if (
            type_ == XS_TRANSACTION_END
            and tx_id in self.txs[conn_id]
            and payload in (b"T\0", b"F\0")
        ):
            self.txs[conn_id].discard(tx_id)
        if type_ == XS_INTRODUCE and answer.type == XS_INTRODUCE:
            # A second introduce resets the domain's connections.
            domid = int(payload.split(b"\0")[0])
            for other, other_domid in self.conns.items():
                if other_domid == domid and domid:
                    self.txs[other].clear()
        if type_ == XS_RESET_WATCHES and answer.type == XS_RESET_WATCHES:
            self.txs[conn_id].clear()
        for closed in outcome.closed:
            del self.conns[closed], self.txs[closed]

    @invariant()
    def tree_is_consistent(self):
        nodes = self.store._nodes
        for path, node in nodes.items():
            assert len(set(node.children)) == len(node.children), path
            for name in node.children:
                child = ("" if path == "/" else path) + "/" + name
                assert child in nodes, child
            if path.startswith("/") and path != "/":
                parent = path.rsplit("/", 1)[0] or "/"
                assert path.rsplit("/", 1)[1] in nodes[parent].children, path

    @invariant()
    def books_match_the_tree(self):
        owned: Counter[int] = Counter()
        memory: Counter[int] = Counter()
        for path, node in self.store._nodes.items():
            if path.startswith("@"):
                continue  # special paths are no nodes: no quota counts them
            owned[node.owner] += 1
            if node.owner:
                memory[node.owner] += _memory_of(path, node)
        for conn in self.store._conns.values():
            for tx in conn.transactions.values():
                memory[tx.domid] += tx.memory if tx.domid else 0
        assert +self.store._owned == +owned
        for domid in set(memory) | set(self.store._memory):
            if domid:
                assert self.store.domain_memory(domid) == memory[domid], domid

    @invariant()
    def open_transactions_are_known(self):
        for conn_id in self.conns:
            assert set(self.store._conns[conn_id].transactions) == self.txs[conn_id]


HostileClients.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_hostile_clients_never_make_the_store_raise = HostileClients.TestCase
