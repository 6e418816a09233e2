"""The XenStore database and xenstored's request semantics, without I/O.

`Store.handle(conn_id, message)` takes one xs_wire request from one
connection and returns an `Outcome`: the reply, the watch events it fired
(to which connections), and the connections that must go (those of a
released domain). Transports (the Unix socket in `xenlike.xenstore.server`,
a guest's ring page) only move bytes; every rule lives here, and follows the
C xenstored (tools/xenstored/{core,watch,transaction,domain}.c):

- Paths: Xen's characters (`A-Za-z0-9-/_@`), no `//`, no trailing `/`;
  relative paths resolve under `/local/domain/<domid>`; at most
  XENSTORE_REL_PATH_MAX (2048) characters after a `/local/domain/<id>/`
  prefix, for every connection, as 4.17 does. `@`-paths name no node: a
  watch takes any string starting with `@` (check_watch_path()), and
  SET_PERMS the two special ones (`@introduceDomain`, `@releaseDomain`),
  whose perms say who sees their events; elsewhere they are EINVAL.
  Numbers are read as xenstored reads them: atoi() for domids and offsets,
  strtol(, 0) for the domids in permissions.
- Permissions: the first entry names the owner and the access of everyone
  not listed; the owner and domain 0 may do anything. A missing node reports
  ENOENT only to a caller allowed to know (the nearest existing ancestor
  grants the access), else EACCES. New nodes inherit their parent's perms;
  an unprivileged creator becomes the owner.
- Watches fire for the changed path and its ancestors' watches (a watch on
  /a sees a write to /a/b); removing /a fires /a for watches on /a and
  above, and each removed descendant exactly (a watch on /a/b sees
  /a/b). An event reaches a watcher only if it may read the node or its
  parent (before a removal or a perms change, too). A new watch fires once
  at once, after its OK.
- Transactions follow transaction.c: the first access to a node copies it
  into the transaction and remembers its generation; at commit every node
  first *read* must still have that generation, else EAGAIN. Their watch
  events fire on commit only.
  A guest's transaction touches at most 1024 nodes (ENOSPC, and the
  transaction fails: ENOMEM at commit), and each domain's nodes and
  transaction copies together stay under a memory quota, so a guest's open
  transactions cannot grow Dom0 without limit.
- Quotas bind unprivileged domains only (`Quotas`, xenstored's defaults).
  Errors are Xen's: ENOSPC for nodes, node size, permissions and
  transactions, E2BIG for watches and for a reply over XENSTORE_PAYLOAD_MAX,
  ENOMEM for memory. A watch event longer than XENSTORE_PAYLOAD_MAX is
  dropped, not sent (send_event()).
- Domains (XSA-322): xenstored keeps a record per domain that permissions
  name, stamped with the generation count at its creation. A permission
  naming a domain that does not exist is ignored, as is one naming a
  domain released since: its record is gone, and a domain reusing the domid
  gets a new, younger one. SET_PERMS whose owner is no domain answers ENOENT.

Where xenlike deliberately differs from cxenstored, docs/xenstore.md says so.
"""

import re
from collections import Counter
from collections.abc import Callable, Iterator

import attrs

from xenlike.abi.xs_wire import (
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XS_CONTROL,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
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
    XS_WRITE,
)
from xenlike.xenstore.wire import (
    OK,
    XenStoreError,
    XsMessage,
    error_reply,
    join_strings,
    reply,
    split_strings,
    watch_event,
)

__all__ = [
    "DOMID_SELF",
    "XS_PERM_NONE",
    "XS_PERM_OWNER",
    "XS_PERM_READ",
    "XS_PERM_WRITE",
    "Delivery",
    "IntroducedDomain",
    "Node",
    "Outcome",
    "Permission",
    "Quotas",
    "Store",
    "StoreStatistics",
]

# Permission bits (xenstore_lib.h). OWNER is computed, never stored.
XS_PERM_NONE = 0x00
XS_PERM_READ = 0x01
XS_PERM_WRITE = 0x02
XS_PERM_OWNER = 0x08
XS_PERM_IGNORE = 0x10  # the entry names a domain gone since: it grants nothing
_ALL = XS_PERM_READ | XS_PERM_WRITE | XS_PERM_OWNER

DOMID_SELF = 0x7FF0  # xen.h; also DOMID_FIRST_RESERVED

# sizeof(struct xs_tdb_record_hdr) and sizeof(struct xs_permissions) in 4.17:
# what xenstored counts towards a node's size besides value and children.
_NODE_HEADER_SIZE = 24
_PERM_SIZE = 8

_VALID_CHARS = re.compile(rb"[A-Za-z0-9/_@-]*")
_LOCAL_DOMAIN = re.compile(r"/local/domain/\d{1,5}/")  # sscanf "%5u/"

_VALID_PATHS_KEPT = 4096  # at most this many remembered paths,
_VALID_PATH_KEPT_LENGTH = 256  # each this long at most: a bounded cost
_INTRODUCE_DOMAIN = "@introduceDomain"
_RELEASE_DOMAIN = "@releaseDomain"


@attrs.frozen
class Quotas:
    """xenstored's hard quotas and their defaults; domain 0 is exempt from all."""

    nodes: int = 1000  # nodes a domain may own (-E, "nodes")
    watches: int = 128  # watches per domain (-W, "watches")
    outstanding: int = 20  # requests awaiting their reply ("outstanding")
    transactions: int = 10  # open transactions per domain (-t, "transactions")
    node_permissions: int = 5  # entries in one node's perms (-A, "node-permissions")
    node_size: int = 2048  # header, perms, value and child names (-S, "node-size")
    transaction_nodes: int = 1024  # nodes one transaction may touch ("transaction-nodes")
    memory: int = 2 * 1024 * 1024 + 512 * 1024  # bytes per domain (-M, "memory" hard)


@attrs.frozen
class Permission:
    """One entry of a node's perms: `n`, `r`, `w` or `b` (both), and a domid."""

    domid: int
    access: int  # XS_PERM_NONE, XS_PERM_READ, XS_PERM_WRITE or both

    @classmethod
    def parse(cls, text: str) -> "Permission":
        """Parse `r5`-style text as xs_strings_to_perms() does.

        The domid is read by strtol(p, &end, 0), so `r0x10` and `r 020` name
        domain 16, and kept as C's unsigned int; domids no domain can have
        are for the store to judge, not the parser.
        """
        access = _PERM_ACCESS.get(text[:1])
        number = _STRTOL.fullmatch(text, 1)
        if access is None or number is None:
            raise ValueError(f"bad permission {text!r}: want n, r, w or b and a domid")
        sign, digits = number.groups()
        if digits[:2] in ("0x", "0X"):
            value = int(digits[2:], 16)
        elif digits.startswith("0"):
            value = int(digits, 8)
        else:
            value = int(digits)
        value = min(value, 2**63) if sign == "-" else min(value, 2**63 - 1)  # LONG_MIN/MAX
        return cls((-value if sign == "-" else value) & 0xFFFFFFFF, access)

    def __str__(self) -> str:
        domid = self.domid - 2**32 if self.domid >= 2**31 else self.domid  # "%i"
        return f"{_PERM_LETTER[self.access & ~XS_PERM_IGNORE]}{domid}"

    @property
    def ignored(self) -> bool:
        return bool(self.access & XS_PERM_IGNORE)


_PERM_LETTER = {
    XS_PERM_NONE: "n",
    XS_PERM_READ: "r",
    XS_PERM_WRITE: "w",
    XS_PERM_READ | XS_PERM_WRITE: "b",
}
_PERM_ACCESS = {letter: access for access, letter in _PERM_LETTER.items()}
# What strtol(p, &end, 0) consumes, when it must consume everything.
_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


@attrs.frozen
class Node:
    """One node: immutable, so a transaction can hold it by reference."""

    value: bytes
    perms: tuple[Permission, ...]
    children: tuple[str, ...] = ()
    generation: int = 0  # global generation count of its last change

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    def listing(self) -> bytes:
        """The children's names, each NUL-terminated: XS_DIRECTORY's reply."""
        return "\0".join(self.children).encode() + b"\0" if self.children else b""

    def changed(self, generation: int) -> "Node":
        """This node as a change stores it: the same content, a new generation."""
        return Node(self.value, self.perms, self.children, generation)

    def size(self) -> int:
        """The size xenstored checks against the node-size quota (and counts as memory)."""
        return (
            _NODE_HEADER_SIZE
            + _PERM_SIZE * len(self.perms)
            + len(self.value)
            + sum(len(name) + 1 for name in self.children)
        )


@attrs.frozen
class Delivery:
    """A message for one connection."""

    conn_id: int
    message: XsMessage


@attrs.frozen
class Outcome:
    """What a request produced, to be sent in order.

    `deliveries` holds the reply (also in `reply`) and the watch events,
    ordered as xenstored queues them: events a change fired come before the
    reply, a new watch's first event after it. `closed` names connections
    the transport must drop: those of a domain just released.
    """

    reply: XsMessage
    deliveries: tuple[Delivery, ...]
    closed: tuple[int, ...] = ()


@attrs.frozen
class IntroducedDomain:
    """A domain introduced by XS_INTRODUCE: where its XenStore ring lives."""

    domid: int
    gfn: int  # frame of its xenstore_domain_interface page
    port: int  # its event channel for the ring


@attrs.frozen
class StoreStatistics:
    nodes: int
    connections: int
    watches: int
    transactions: int


@attrs.define(eq=False)
class _Watch:
    conn_id: int
    path: str  # canonical
    token: bytes
    prefix_len: int  # a relative watch reports paths relative to the domain home
    seq: int  # registration order, which is also the order events go out


@attrs.define(eq=False)
class _Access:
    """A node a transaction touched (transaction.c's `struct accessed_node`)."""

    node: Node | None  # the transaction's view; None: absent or removed
    generation: int | None  # at first access; None: the node did not exist
    check: bool  # first access was a read: verify `generation` at commit
    old_perms: tuple[Permission, ...] | None  # who could see it before
    memory: int = 0  # what this copy counts towards its domain's memory quota
    modified: bool = False
    fire: bool = False  # a watch event is queued for commit
    exact: bool = True


@attrs.define(eq=False)
class _Transaction:
    id: int
    domid: int  # whose memory its copies count towards
    accessed: dict[str, _Access] = attrs.Factory(dict)
    owned_delta: Counter[int] = attrs.Factory(Counter)
    created: bool = False
    failed: bool = False  # a quota was hit: commit answers ENOMEM
    memory: int = 0


@attrs.define(eq=False)
class _Connection:
    id: int
    domid: int
    watches: dict[tuple[str, bytes], _Watch] = attrs.Factory(dict)
    transactions: dict[int, _Transaction] = attrs.Factory(dict)
    next_tx_id: int = 1

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def home(self) -> str:
        return f"/local/domain/{self.domid}"


@attrs.define(eq=False)
class _Request:
    conn: _Connection
    message: XsMessage
    tx: _Transaction | None = None
    events: list[Delivery] = attrs.Factory(list)
    after_reply: list[Delivery] = attrs.Factory(list)
    closed: list[int] = attrs.Factory(list)


def _parent(path: str) -> str:
    """get_parent(): "/a/b" -> "/a", "/a" -> "/", "@x" -> "/"."""
    slash = path.rfind("/", 1)
    return path[:slash] if slash > 0 else "/"


def _child(path: str, name: str) -> str:
    return f"/{name}" if path == "/" else f"{path}/{name}"


def _basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def _watch_paths(path: str, exact: bool) -> Iterator[str]:
    """Watch paths that an event on `path` matches (watch.c's is_child)."""
    yield path
    if exact or path == "/":
        return
    if path.startswith("/"):
        while path != "/":
            path = _parent(path)
            yield path
    else:
        yield "/"


def _memory_of(path: str, node: Node | None) -> int:
    """What a node costs its domain's memory quota: its record and its key."""
    return len(path) + (0 if node is None else node.size())


def _onearg(payload: bytes) -> bytes:
    """The single argument of a request: the payload must hold exactly one NUL, last."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XenStoreError("EINVAL", "want exactly one NUL-terminated argument")
    return payload[:-1]


def _atoi(raw: bytes) -> int:
    """glibc's atoi(): leading blanks, a sign, digits, whatever follows ignored; the
    value is strtol()'s, so clamped to a long."""
    number = _ATOI.match(raw)
    return max(-(2**63), min(int(number.group()), 2**63 - 1)) if number else 0


_ATOI = re.compile(rb"[ \t\n\v\f\r]*[+-]?[0-9]+")


def _domid(raw: bytes) -> int:
    return _atoi(raw) & 0xFFFFFFFF


class Store:
    """xenstored's database and request handling; pure, single-threaded, no I/O.

    Connections are plain ids: `connect(domid)` makes one (domid 0 is
    privileged, as xenstored's socket connections are), `handle` serves its
    requests, `disconnect` frees its watches and transactions.
    """

    def __init__(
        self,
        quotas: Quotas = Quotas(),
        domain_exists: Callable[[int], bool] = lambda domid: domid < DOMID_SELF,
    ) -> None:
        """`domain_exists` is the hypervisor's answer to "is there a domain `domid`?"
        (xenstored asks xc_domain_getinfo); by default every domid below
        DOMID_FIRST_RESERVED exists, so only reserved ones name no domain."""
        self.quotas = quotas
        self.domain_exists = domain_exists
        self.domains: dict[int, IntroducedDomain] = {}
        self._nodes: dict[str, Node] = {}
        self._owned: Counter[int] = Counter()  # nodes per owner domid
        self._memory: Counter[int] = Counter()  # bytes per domid other than 0
        # struct domain: the generation count when xenstored first met each domain.
        self._domain_generation: dict[int, int] = {0: 0}
        self._generation = 0
        self._conns: dict[int, _Connection] = {}
        self._next_conn_id = 1
        self._watch_index: dict[str, list[_Watch]] = {}
        self._watch_seq = 0
        self._targets: dict[int, int] = {}  # XS_SET_TARGET: domid -> target domid
        self._valid_paths: dict[bytes, str] = {}  # absolute paths _canonical() accepted
        dom0_none = (Permission(0, XS_PERM_NONE),)
        # setup_structure(): what a fresh xenstored holds.
        for path, children in [
            ("/", ("tool",)),
            ("/tool", ("xenstored",)),
            ("/tool/xenstored", ()),
            (_RELEASE_DOMAIN, ()),
            (_INTRODUCE_DOMAIN, ()),
        ]:
            self._nodes[path] = Node(b"", dom0_none, children, self._next_generation())
            if not path.startswith("@"):
                self._owned[0] += 1

    # -- connections ------------------------------------------------------

    def connect(self, domid: int) -> int:
        """A new connection speaking for `domid`; returns its id."""
        conn = _Connection(self._next_conn_id, domid)
        self._next_conn_id += 1
        self._conns[conn.id] = conn
        return conn.id

    def disconnect(self, conn_id: int) -> None:
        """Forget a connection, its watches and its open transactions."""
        conn = self._conns.pop(conn_id, None)
        if conn is not None:
            self._reset_connection(conn)

    def handle(self, conn_id: int, message: XsMessage) -> Outcome:
        """Serve one request of connection `conn_id`."""
        conn = self._conns[conn_id]
        request = _Request(conn, message)
        try:
            handler, flags = _HANDLERS.get(message.type, (None, 0))
            if handler is None:
                raise XenStoreError("ENOSYS", f"unknown message type {message.type}")
            if flags & _PRIVILEGED and not conn.privileged:
                raise XenStoreError("EACCES", "privileged operation")
            if message.tx_id and not flags & _NO_TX_ID:
                request.tx = conn.transactions.get(message.tx_id)
                if request.tx is None:
                    raise XenStoreError("ENOENT", f"no transaction {message.tx_id}")
            payload = handler(self, request)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                raise XenStoreError("E2BIG", "reply exceeds XENSTORE_PAYLOAD_MAX")
            answer = reply(message, payload)
        except XenStoreError as error:
            answer = error_reply(message, error.name)
            request.after_reply.clear()
        deliveries = (*request.events, Delivery(conn.id, answer), *request.after_reply)
        return Outcome(answer, deliveries, tuple(request.closed))

    def domain_memory(self, domid: int) -> int:
        """Bytes counted against a domain's memory quota: its nodes and its transactions' copies.

        Domain 0 has no quota and is not counted (0).
        """
        return self._memory[domid] if domid else 0

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            nodes=len(self._nodes),
            connections=len(self._conns),
            watches=sum(len(c.watches) for c in self._conns.values()),
            transactions=sum(len(c.transactions) for c in self._conns.values()),
        )

    # -- nodes, through a transaction when there is one -------------------

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _read(self, tx: _Transaction | None, path: str) -> Node | None:
        if tx is None:
            return self._nodes.get(path)
        access = tx.accessed.get(path)
        if access is None:
            node = self._nodes.get(path)
            access = self._access(tx, path, node)
            access.generation = None if node is None else node.generation
            access.check = True
            access.old_perms = None if node is None else node.perms
        return access.node

    def _access(self, tx: _Transaction, path: str, node: Node | None) -> _Access:
        """access_node(): a transaction's first touch of a node, within its quotas.

        A guest's transaction touches at most `Quotas.transaction_nodes` nodes
        (ENOSPC), and its copies count towards the domain's memory (ENOMEM);
        either failure also fails the transaction, so its commit is ENOMEM.
        """
        memory = 0
        if tx.domid:
            if len(tx.accessed) >= self.quotas.transaction_nodes:
                tx.failed = True
                raise XenStoreError("ENOSPC", "transaction-nodes quota")
            memory = _memory_of(path, node)
            if self._memory[tx.domid] + memory >= self.quotas.memory:
                tx.failed = True
                raise XenStoreError("ENOMEM", "memory quota")
            self._memory[tx.domid] += memory
            tx.memory += memory
        access = tx.accessed[path] = _Access(node, None, False, None, memory)
        return access

    def _put(self, tx: _Transaction | None, path: str, node: Node | None) -> None:
        """Store (or, with None, remove) a node; a change takes a new generation."""
        if node is not None:
            node = node.changed(self._next_generation())
        if tx is None:
            old = self._nodes.get(path)
            if old is not None and old.owner:
                self._memory[old.owner] -= _memory_of(path, old)
            if node is None:
                del self._nodes[path]
            else:
                self._nodes[path] = node
                if node.owner:
                    self._memory[node.owner] += _memory_of(path, node)
            return
        access = tx.accessed.get(path)
        if access is None:
            access = self._access(tx, path, None)
        access.node = node
        access.modified = True
        if tx.domid:
            memory = _memory_of(path, node)
            self._memory[tx.domid] += memory - access.memory
            tx.memory += memory - access.memory
            access.memory = memory

    def _check_memory(self, request: _Request, added: int) -> None:
        """domain_memory_add(): a guest's change must keep its domain under the memory quota.

        Checked before anything changes, so a refused request changes nothing.
        """
        domid = request.conn.domid
        if not domid:
            return
        if self._memory[domid] + added >= self.quotas.memory:
            if request.tx is not None:
                request.tx.failed = True
            raise XenStoreError("ENOMEM", "memory quota")

    def _end_transaction(self, conn: _Connection, tx: _Transaction) -> None:
        """Forget a transaction and give back the memory its copies held."""
        del conn.transactions[tx.id]
        if tx.domid:
            self._memory[tx.domid] -= tx.memory

    def _count_owned(self, tx: _Transaction | None, domid: int, delta: int) -> None:
        if tx is None:
            self._owned[domid] += delta
        else:
            tx.owned_delta[domid] += delta

    # -- paths and permissions --------------------------------------------

    def _canonical(self, conn: _Connection, raw: bytes) -> str:
        """canonicalize(): validate a path and make it absolute, or EINVAL.

        Short absolute paths that passed are remembered: the same few paths come
        back all the time, and checking them again was a fair part of a
        request's cost.
        """
        path = self._valid_paths.get(raw)
        if path is not None:
            return path
        if not _VALID_CHARS.fullmatch(raw) or raw.startswith(b"@"):
            raise XenStoreError("EINVAL", f"bad path {raw!r}")
        path = raw.decode("ascii")
        if not path.startswith("/"):
            path = f"{conn.home}/{path}"
        local = _LOCAL_DOMAIN.match(path)
        length = len(path) - (local.end() if local else 0)
        if (path.endswith("/") and path != "/") or "//" in path or length > XENSTORE_REL_PATH_MAX:
            raise XenStoreError("EINVAL", f"bad path {raw!r}")
        if raw[:1] == b"/" and len(raw) <= _VALID_PATH_KEPT_LENGTH:
            if len(self._valid_paths) >= _VALID_PATHS_KEPT:
                self._valid_paths.clear()
            self._valid_paths[raw] = path
        return path

    def _perm(self, conn: _Connection, perms: tuple[Permission, ...]) -> int:
        """perm_for_conn(): what `conn` may do to a node with these perms."""
        if conn.privileged:
            return _ALL
        target = self._targets.get(conn.domid)
        owner = perms[0].domid
        if owner == conn.domid or owner == target:
            return _ALL
        for entry in perms[1:]:
            if (entry.domid == conn.domid or entry.domid == target) and not entry.ignored:
                return entry.access
        return perms[0].access

    def _get_node(self, request: _Request, path: str, perm: int) -> Node:
        """get_node(): the node if the caller has `perm` on it, else ENOENT or EACCES.

        As in errno_from_parents(), a caller learns that a node is missing
        only if the nearest existing ancestor grants it `perm`.
        """
        node = self._read(request.tx, path)
        if node is not None and self._perm(request.conn, node.perms) & perm == perm:
            return node
        ancestor = None
        while ancestor is None:  # ends at the root, its own parent, which always exists
            path = _parent(path)
            ancestor = self._read(request.tx, path)
        if self._perm(request.conn, ancestor.perms) & perm:
            raise XenStoreError("ENOENT" if node is None else "EACCES")
        raise XenStoreError("EACCES")

    def _check_size(self, conn: _Connection, node: Node) -> None:
        if not conn.privileged and node.size() >= self.quotas.node_size:
            raise XenStoreError("ENOSPC", "node-size quota")

    # -- domains (XSA-322) ----------------------------------------------------

    def _alloc_permrefs(self, perms: tuple[Permission, ...]) -> tuple[Permission, ...]:
        """domain_alloc_permrefs(): a record for each domain named; flag those that don't exist."""
        adjusted = []
        for entry in perms:
            if entry.domid not in self._domain_generation:
                if self.domain_exists(entry.domid):
                    self._domain_generation[entry.domid] = self._next_generation()
                else:
                    entry = Permission(entry.domid, entry.access | XS_PERM_IGNORE)
            adjusted.append(entry)
        return tuple(adjusted)

    def _adjust_perms(self, node: Node) -> Node:
        """domain_adjust_node_perms(): flag entries naming a domain younger than the node.

        For a copy a transaction commits: a domain released meanwhile has no
        record, one that took its domid a younger one.
        """
        if len(node.perms) == 1:
            return node
        perms = list(node.perms)
        for i, entry in enumerate(perms[1:], 1):
            born = self._domain_generation.get(entry.domid)
            if not entry.ignored and (born is None or born > node.generation):
                perms[i] = Permission(entry.domid, entry.access | XS_PERM_IGNORE)
        return attrs.evolve(node, perms=tuple(perms))

    def _forget_domain(self, domid: int) -> None:
        """destroy_domain(): drop the domain's record; what names it grants nothing more."""
        del self._domain_generation[domid]
        for path in (_INTRODUCE_DOMAIN, _RELEASE_DOMAIN):  # remove_domid_from_perm()
            special = self._nodes[path]
            if special.owner == domid:
                self._nodes[path] = Node(
                    special.value,
                    (Permission(0, special.perms[0].access), *special.perms[1:]),
                    special.children,
                    special.generation,
                )
        for path, node in self._nodes.items():
            if any(entry.domid == domid and not entry.ignored for entry in node.perms[1:]):
                perms = (
                    node.perms[0],
                    *(
                        Permission(e.domid, e.access | XS_PERM_IGNORE) if e.domid == domid else e
                        for e in node.perms[1:]
                    ),
                )
                self._nodes[path] = attrs.evolve(node, perms=perms)

    # -- watches ------------------------------------------------------------

    def _fire(
        self,
        request: _Request,
        path: str,
        exact: bool,
        old_perms: tuple[Permission, ...] | None = None,
    ) -> None:
        """fire_watches(): queue in the transaction, or send to every permitted watcher."""
        tx = request.tx
        if tx is not None:
            access = tx.accessed[path]
            access.exact = access.exact and exact if access.fire else exact
            access.fire = True
            return
        matches = [w for p in _watch_paths(path, exact) for w in self._watch_index.get(p, ())]
        matches.sort(key=lambda w: (w.conn_id, w.seq))
        permitted: dict[int, bool] = {}
        encoded = path.encode()
        for watch in matches:
            allowed = permitted.get(watch.conn_id)
            if allowed is None:
                allowed = permitted[watch.conn_id] = self._watch_permitted(
                    self._conns[watch.conn_id], path, old_perms
                )
            if allowed:
                reported = encoded[watch.prefix_len :]
                if len(reported) + len(watch.token) + 2 <= XENSTORE_PAYLOAD_MAX:
                    event = watch_event(reported, watch.token)
                    request.events.append(Delivery(watch.conn_id, event))

    def _watch_permitted(
        self, conn: _Connection, path: str, old_perms: tuple[Permission, ...] | None
    ) -> bool:
        """watch_permitted(): may `conn` read the node or its parent (now or before)?"""
        if conn.privileged:
            return True
        if old_perms is not None and self._perm(conn, old_perms) & XS_PERM_READ:
            return True
        node = self._nodes.get(path)
        if node is None:
            return False
        if self._perm(conn, node.perms) & XS_PERM_READ:
            return True
        parent = self._nodes.get(_parent(path))
        return parent is not None and bool(self._perm(conn, parent.perms) & XS_PERM_READ)

    def _add_watch(self, conn: _Connection, path: str, token: bytes, prefix_len: int) -> _Watch:
        self._watch_seq += 1
        watch = _Watch(conn.id, path, token, prefix_len, self._watch_seq)
        conn.watches[path, token] = watch
        self._watch_index.setdefault(path, []).append(watch)
        return watch

    def _remove_watch(self, conn: _Connection, watch: _Watch) -> None:
        del conn.watches[watch.path, watch.token]
        same_path = self._watch_index[watch.path]
        same_path.remove(watch)
        if not same_path:
            del self._watch_index[watch.path]

    def _reset_connection(self, conn: _Connection) -> None:
        """Drop all watches and transactions of a connection."""
        for watch in list(conn.watches.values()):
            self._remove_watch(conn, watch)
        for tx in list(conn.transactions.values()):
            self._end_transaction(conn, tx)

    # -- changing the tree ----------------------------------------------------

    def _create(self, request: _Request, path: str, value: bytes) -> None:
        """create_node(): the node and any missing parents, owner and perms inherited."""
        conn, tx = request.conn, request.tx
        missing = [path]
        parent_path = _parent(path)
        parent = self._read(tx, parent_path)
        while parent is None:
            missing.append(parent_path)
            parent_path = _parent(parent_path)
            parent = self._read(tx, parent_path)
        # create_node() checks each new node against the domain's count, which a
        # transaction leaves alone until its commit checks again.
        added = 1 if tx is not None else len(missing)
        if not conn.privileged and self._owned[conn.domid] + added > self.quotas.nodes:
            raise XenStoreError("ENOSPC", "nodes quota")
        writes = []
        for new_path in reversed(missing):
            perms = parent.perms
            if not conn.privileged:
                perms = (Permission(conn.domid, perms[0].access), *perms[1:])
            parent = attrs.evolve(parent, children=(*parent.children, _basename(new_path)))
            writes.append((parent_path, parent))
            parent_path = new_path
            parent = Node(value if new_path == path else b"", perms)
        writes.append((path, parent))
        for _, node in writes:
            self._check_size(conn, node)
        self._check_memory(request, sum(_memory_of(p, node) for p, node in writes[1:]))
        for node_path, node in writes:
            self._put(tx, node_path, node)
        for _, node in writes[1:]:
            self._count_owned(tx, node.owner, 1)
        if tx is not None:
            tx.created = True

    def _remove(self, request: _Request, path: str, node: Node) -> None:
        """rm_node(): a subtree, deepest first, firing each removed node's watches."""
        tx = request.tx
        parent_path = _parent(path)
        parent = self._read(tx, parent_path)
        if parent is None:
            # Possible in a transaction whose copy of the node outlived its parent.
            raise XenStoreError("EINVAL", f"the parent of {path} is gone")
        removed = []
        stack = [(path, node, iter(node.children))]
        while stack:
            node_path, current, children = stack[-1]
            for name in children:
                child_path = _child(node_path, name)
                child = self._read(tx, child_path)
                if child is not None:
                    stack.append((child_path, child, iter(child.children)))
                    break
            else:
                stack.pop()
                removed.append((node_path, current))
        # Fire while the nodes still exist, so the permission checks see them.
        for node_path, _ in removed:
            self._fire(request, node_path, exact=node_path != path)
        for node_path, current in removed:
            self._put(tx, node_path, None)
            self._count_owned(tx, current.owner, -1)
        name = _basename(path)
        remaining = tuple(child for child in parent.children if child != name)
        self._put(tx, parent_path, attrs.evolve(parent, children=remaining))

    def _commit(self, request: _Request, tx: _Transaction) -> None:
        """finalize_transaction(): check read generations, then publish and fire."""
        conn = request.conn
        if tx.failed:
            raise XenStoreError("ENOMEM", "the transaction hit a quota")
        owned = self._owned[conn.domid] + tx.owned_delta[conn.domid]
        # transaction_fix_domains(): at commit, reaching the quota is already too many.
        if tx.created and not conn.privileged and owned >= self.quotas.nodes:
            raise XenStoreError("ENOSPC", "nodes quota")
        for path, access in tx.accessed.items():
            if access.check:
                current = self._nodes.get(path)
                if (None if current is None else current.generation) != access.generation:
                    raise XenStoreError("EAGAIN", f"transaction conflict on {path}")
        for path, access in tx.accessed.items():
            if access.modified:
                node = access.node
                if node is not None:
                    node = self._adjust_perms(node)
                if path in self._nodes or node is not None:
                    self._put(None, path, node)
        self._owned.update(tx.owned_delta)
        for path, access in tx.accessed.items():
            if access.fire:
                self._fire(request, path, access.exact, access.old_perms)

    # -- the operations (do_* in xenstored) -----------------------------------

    def _do_directory(self, request: _Request) -> bytes:
        path = self._canonical(request.conn, _onearg(request.message.payload))
        node = self._get_node(request, path, XS_PERM_READ)
        return node.listing()

    def _do_directory_part(self, request: _Request) -> bytes:
        """send_directory_part(): children from a byte offset, with the node's generation."""
        args = split_strings(request.message.payload)
        if len(args) != 2:
            raise XenStoreError("EINVAL", "want path and offset")
        path = self._canonical(request.conn, args[0])
        node = self._get_node(request, path, XS_PERM_READ)
        offset = _atoi(args[1]) & 0xFFFFFFFF  # an unsigned int
        gen = f"{node.generation}".encode() + b"\0"
        children = node.listing()
        if offset >= len(children):
            return gen + b"\0"
        limit = XENSTORE_PAYLOAD_MAX - len(gen) - 1
        end = offset
        while True:
            name_len = children.index(b"\0", end) - end
            if end - offset + name_len >= limit:
                break
            end += name_len + 1
            if end == len(children):
                return gen + children[offset:end] + b"\0"
        return gen + children[offset:end]

    def _do_read(self, request: _Request) -> bytes:
        path = self._canonical(request.conn, _onearg(request.message.payload))
        return self._get_node(request, path, XS_PERM_READ).value

    def _do_write(self, request: _Request) -> bytes:
        raw_path, nul, value = request.message.payload.partition(b"\0")
        if not nul:
            raise XenStoreError("EINVAL", "no NUL after the path")
        path = self._canonical(request.conn, raw_path)
        try:
            node = self._get_node(request, path, XS_PERM_WRITE)
        except XenStoreError as error:
            if error.name != "ENOENT":
                raise
            self._create(request, path, value)
        else:
            changed = Node(value, node.perms, node.children, node.generation)
            self._check_size(request.conn, changed)
            self._check_memory(request, len(value) - len(node.value))
            self._put(request.tx, path, changed)
        self._fire(request, path, exact=False)
        return OK

    def _do_mkdir(self, request: _Request) -> bytes:
        path = self._canonical(request.conn, _onearg(request.message.payload))
        try:
            self._get_node(request, path, XS_PERM_WRITE)
        except XenStoreError as error:
            if error.name != "ENOENT":
                raise
            self._create(request, path, b"")
            self._fire(request, path, exact=False)
        return OK

    def _do_rm(self, request: _Request) -> bytes:
        path = self._canonical(request.conn, _onearg(request.message.payload))
        try:
            node = self._get_node(request, path, XS_PERM_WRITE)
        except XenStoreError as error:
            # Removing what is not there is fine, if its parent is.
            if error.name == "ENOENT" and self._read(request.tx, _parent(path)) is not None:
                return OK
            raise
        if path == "/":
            raise XenStoreError("EINVAL", "cannot remove the root")
        self._remove(request, path, node)
        return OK

    def _do_get_perms(self, request: _Request) -> bytes:
        # get_node_canonicalized(): in 4.17 a special path is no node name (EINVAL).
        path = self._canonical(request.conn, _onearg(request.message.payload))
        node = self._get_node(request, path, XS_PERM_READ)
        return join_strings(*(str(entry).encode() for entry in node.perms))

    def _do_set_perms(self, request: _Request) -> bytes:
        conn = request.conn
        args = split_strings(request.message.payload)
        if len(args) < 2:
            raise XenStoreError("EINVAL", "want a path and at least one permission")
        if not conn.privileged and len(args) - 1 > self.quotas.node_permissions:
            raise XenStoreError("ENOSPC", "node-permissions quota")
        try:
            perms = tuple(Permission.parse(arg.decode("ascii")) for arg in args[1:])
        except (UnicodeDecodeError, ValueError) as error:
            raise XenStoreError("EINVAL", str(error)) from None
        perms = self._alloc_permrefs(perms)
        if perms[0].ignored:
            raise XenStoreError("ENOENT", f"the owner, domain {perms[0].domid}, does not exist")
        if args[0].startswith(b"@"):
            self._set_special_perms(conn, args[0].decode("latin-1"), perms)
            return OK
        path = self._canonical(conn, args[0])
        node = self._get_node(request, path, XS_PERM_WRITE | XS_PERM_OWNER)
        if not conn.privileged and perms[0].domid != node.owner:
            raise XenStoreError("EPERM", "only domain 0 may change a node's owner")
        changed = attrs.evolve(node, perms=perms)
        self._check_size(conn, changed)
        self._check_memory(request, _PERM_SIZE * (len(perms) - len(node.perms)))
        self._put(request.tx, path, changed)
        self._count_owned(request.tx, node.owner, -1)
        self._count_owned(request.tx, changed.owner, 1)
        self._fire(request, path, exact=False, old_perms=node.perms)
        return OK

    def _set_special_perms(
        self, conn: _Connection, path: str, perms: tuple[Permission, ...]
    ) -> None:
        """set_perms_special(): who sees `@introduceDomain` or `@releaseDomain` events.

        No node changes: nothing fires, no transaction holds it, no quota counts it.
        """
        node = self._nodes.get(path) if path in (_INTRODUCE_DOMAIN, _RELEASE_DOMAIN) else None
        if node is None:
            raise XenStoreError("EINVAL", f"no special path {path!r}")
        wanted = XS_PERM_WRITE | XS_PERM_OWNER
        if self._perm(conn, node.perms) & wanted != wanted:
            raise XenStoreError("EACCES")
        self._nodes[path] = Node(node.value, perms, node.children, node.generation)

    def _do_watch(self, request: _Request) -> bytes:
        conn = request.conn
        args = split_strings(request.message.payload)
        if len(args) != 2:
            raise XenStoreError("EINVAL", "want a path and a token")
        raw_path, token = args
        relative = not raw_path.startswith((b"/", b"@"))
        if raw_path.startswith(b"@"):
            # check_watch_path(): a special path is any string, not a node name.
            if len(raw_path) > XENSTORE_REL_PATH_MAX:
                raise XenStoreError("EINVAL", "watch path too long")
            path = raw_path.decode("latin-1")
        else:
            path = self._canonical(conn, raw_path)
        if (path, token) in conn.watches:
            raise XenStoreError("EEXIST", "watch already set")
        # do_watch() compares the count before this watch: a guest gets one more.
        if not conn.privileged and len(conn.watches) > self.quotas.watches:
            raise XenStoreError("E2BIG", "watches quota")
        watch = self._add_watch(conn, path, token, len(conn.home) + 1 if relative else 0)
        # Fire once up front, unconditionally: it simplifies clients.
        reported = path.encode("latin-1")[watch.prefix_len :]
        if len(reported) + len(token) + 2 <= XENSTORE_PAYLOAD_MAX:
            request.after_reply.append(Delivery(conn.id, watch_event(reported, token)))
        return OK

    def _do_unwatch(self, request: _Request) -> bytes:
        conn = request.conn
        args = split_strings(request.message.payload)
        if len(args) != 2:
            raise XenStoreError("EINVAL", "want a path and a token")
        # canonicalize() without validation: a path no watch has is ENOENT.
        path = args[0].decode("latin-1")
        if not path.startswith(("/", "@")):
            path = f"{conn.home}/{path}"
        watch = conn.watches.get((path, args[1]))
        if watch is None:
            raise XenStoreError("ENOENT", "no such watch")
        self._remove_watch(conn, watch)
        return OK

    def _do_reset_watches(self, request: _Request) -> bytes:
        self._reset_connection(request.conn)
        return OK

    def _do_transaction_start(self, request: _Request) -> bytes:
        conn = request.conn
        if request.tx is not None:
            raise XenStoreError("EBUSY", "transactions do not nest")
        # do_transaction_start() compares the count before this one: one more, too.
        if not conn.privileged and len(conn.transactions) > self.quotas.transactions:
            raise XenStoreError("ENOSPC", "transactions quota")
        tx_id = conn.next_tx_id
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = _Transaction(tx_id, conn.domid)
        return f"{tx_id}".encode() + b"\0"

    def _do_transaction_end(self, request: _Request) -> bytes:
        arg = _onearg(request.message.payload)
        if arg not in (b"T", b"F"):
            raise XenStoreError("EINVAL", "want T (commit) or F (abort)")
        tx = request.tx
        if tx is None:
            raise XenStoreError("ENOENT", "no transaction")
        self._end_transaction(request.conn, tx)
        request.tx = None  # from here on, changes are global
        if arg == b"T":
            self._commit(request, tx)
        return OK

    def _domid_arg(self, request: _Request) -> int:
        """The domid argument, read with atoi() into an unsigned int as xenstored does."""
        return _domid(_onearg(request.message.payload))

    def _introduced_domain(self, request: _Request) -> int:
        """onearg_domain(): an introduced domain other than 0, else EINVAL or ENOENT."""
        domid = self._domid_arg(request)
        if domid == 0:
            raise XenStoreError("EINVAL", "domain 0 is not released or resumed")
        if domid not in self.domains:
            raise XenStoreError("ENOENT", f"domain {domid} is not introduced")
        return domid

    def _do_introduce(self, request: _Request) -> bytes:
        request.tx = None  # domain changes are never part of a transaction
        args = split_strings(request.message.payload)
        if len(args) < 3:
            raise XenStoreError("EINVAL", "want domid, gfn and event channel")
        domid, port = _domid(args[0]), _domid(args[2])  # atoi(), as do_introduce()
        gfn = _atoi(args[1]) & (2**64 - 1)  # xenstored ignores it; xenlike maps a grant
        if port == 0:
            raise XenStoreError("EINVAL", "event channel 0")
        if domid >= DOMID_SELF:
            raise XenStoreError("EINVAL", f"no domain can have domid {domid}")
        if domid == 0:
            return OK  # domain 0 is introduced from the start
        known = domid in self.domains
        self.domains[domid] = IntroducedDomain(domid, gfn, port)
        if domid not in self._domain_generation:
            # Younger than every node: xenstored uses the current count, which a
            # node written in a transaction just before could share.
            self._domain_generation[domid] = self._next_generation()
        for conn in self._conns.values():
            if conn.domid == domid:
                self._reset_connection(conn)
        if not known:
            self._fire(request, _INTRODUCE_DOMAIN, exact=True)
        return OK

    def _do_release(self, request: _Request) -> bytes:
        """do_release(): forget the domain, its connections and the nodes it owned."""
        request.tx = None  # domain changes are never part of a transaction
        domid = self._introduced_domain(request)
        for conn in [c for c in self._conns.values() if c.domid == domid]:
            self.disconnect(conn.id)
            request.closed.append(conn.id)
        del self.domains[domid]
        self._targets.pop(domid, None)
        # domain_tree_remove(): what the domain owned goes (its home is the
        # toolstack's to remove, as libxl does).
        pending = ["/"]
        while pending:
            path = pending.pop()
            node = self._nodes.get(path)
            if node is None:
                continue
            if node.owner == domid and path != "/":
                self._remove(request, path, node)
            else:
                pending.extend(_child(path, name) for name in reversed(node.children))
        self._forget_domain(domid)
        self._fire(request, _RELEASE_DOMAIN, exact=True)
        return OK

    def _do_resume(self, request: _Request) -> bytes:
        self._introduced_domain(request)
        return OK

    def _do_set_target(self, request: _Request) -> bytes:
        """A domain (a device model) gets the rights of its target domain."""
        args = split_strings(request.message.payload)
        if len(args) < 2:
            raise XenStoreError("EINVAL", "want domid and target domid")
        domid, target = (_domid(arg) for arg in args[:2])
        for each in (domid, target):
            if each != 0 and each not in self.domains:
                raise XenStoreError("ENOENT", f"domain {each} is not introduced")
        self._targets[domid] = target
        return OK

    def _do_is_domain_introduced(self, request: _Request) -> bytes:
        domid = self._domid_arg(request)
        introduced = domid in (0, DOMID_SELF) or domid in self.domains
        return b"T\0" if introduced else b"F\0"

    def _do_get_domain_path(self, request: _Request) -> bytes:
        return f"/local/domain/{self._domid_arg(request)}".encode() + b"\0"

    def _do_control(self, request: _Request) -> bytes:
        raise XenStoreError("ENOSYS", "xenlike implements no XS_CONTROL command")


_PRIVILEGED = 1  # XS_FLAG_PRIV: domain 0 only
_NO_TX_ID = 2  # XS_FLAG_NOTID: the transaction id is ignored

_HANDLERS: dict[int, tuple[Callable[[Store, _Request], bytes], int]] = {
    XS_CONTROL: (Store._do_control, _PRIVILEGED),
    XS_DIRECTORY: (Store._do_directory, 0),
    XS_READ: (Store._do_read, 0),
    XS_GET_PERMS: (Store._do_get_perms, 0),
    XS_WATCH: (Store._do_watch, _NO_TX_ID),
    XS_UNWATCH: (Store._do_unwatch, _NO_TX_ID),
    XS_TRANSACTION_START: (Store._do_transaction_start, 0),
    XS_TRANSACTION_END: (Store._do_transaction_end, 0),
    XS_INTRODUCE: (Store._do_introduce, _PRIVILEGED),
    XS_RELEASE: (Store._do_release, _PRIVILEGED),
    XS_GET_DOMAIN_PATH: (Store._do_get_domain_path, 0),
    XS_WRITE: (Store._do_write, 0),
    XS_MKDIR: (Store._do_mkdir, 0),
    XS_RM: (Store._do_rm, 0),
    XS_SET_PERMS: (Store._do_set_perms, 0),
    XS_IS_DOMAIN_INTRODUCED: (Store._do_is_domain_introduced, _PRIVILEGED),
    XS_RESUME: (Store._do_resume, _PRIVILEGED),
    XS_SET_TARGET: (Store._do_set_target, _PRIVILEGED),
    XS_RESET_WATCHES: (Store._do_reset_watches, 0),
    XS_DIRECTORY_PART: (Store._do_directory_part, 0),
}
