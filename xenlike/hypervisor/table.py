"""The hypercall table: (hypercall number, sub-op) -> handler, layout, privilege.

Adding a hypercall is one decorated function in a subsystem module::

    @hypercall(Hypercall.event_channel_op, EvtchnOp.send, args=evtchn_send)
    def evtchn_send_op(call: Call, arg) -> int:
        ...

The decorator only marks the handler; `HypercallTable.install` takes every
marked function of the subsystems it is given, so the table holds what
`xenlike.hypervisor.SUBSYSTEMS` lists (as Xen's hypercall table lists each
do_*_op) and nothing registers itself by being imported.

The dispatcher decodes the argument structs with the layout's codec,
refuses unknown ops (-ENOSYS), malformed messages (-EINVAL), unprivileged
callers of privileged ops (-EPERM) and oversized batches (-E2BIG) before a
handler runs, and turns any exception a handler raises into an error for
that call alone.
"""

from collections.abc import Callable, Iterable, Iterator
from types import FunctionType, ModuleType
from typing import Any

import attrs
import construct

from xenlike.abi.errno import Errno
from xenlike.abi.xen import Hypercall
from xenlike.codec import Codec, compile_struct
from xenlike.hypercall import HypercallError

__all__ = ["Call", "Entry", "HYPERCALLS", "HypercallTable", "handlers", "hypercall"]


@attrs.define(eq=False)
class Call:
    """One hypercall in progress: who asked, and what goes back besides the result."""

    hv: Any  # the Hypervisor
    caller: Any  # the calling Domain
    connection: Any  # the Connection it arrived on
    op: int
    cmd: int
    fds: list[int] = attrs.field(factory=list)
    seq: int = 0  # the request's, for a reply sent later (`defer`)
    deferred: bool = False

    def defer(self) -> None:
        """No reply now: the handler keeps `seq` and replies later (a suspend's
        SCHEDOP_shutdown returns only when the domain is resumed)."""
        self.deferred = True

    def send_fd(self, fd: int) -> int:
        """Hand `fd` to the caller with the reply; returns its index among the reply's fds."""
        self.fds.append(fd)
        return len(self.fds) - 1


Handler = Callable[[Call, Any], Any]


@attrs.frozen
class Entry:
    op: int
    cmd: int
    name: str
    handler: Handler
    args: Codec | None
    privileged: bool
    max_batch: int
    raw: bool

    def decode(self, count: int, payload: bytes) -> Any:
        """The handler's argument: one record, a list (batched), bytes (raw) or None."""
        if self.raw:
            if count != len(payload):
                raise HypercallError(
                    Errno.EINVAL, f"{self.name}: count {count} != {len(payload)} bytes"
                )
            return payload
        if self.args is None:
            if count or payload:
                raise HypercallError(Errno.EINVAL, f"{self.name} takes no arguments")
            return None
        if not 1 <= count <= self.max_batch:
            errno = Errno.E2BIG if count > self.max_batch else Errno.EINVAL
            raise HypercallError(errno, f"{self.name}: batch of {count}, limit {self.max_batch}")
        size = self.args.size
        if len(payload) != count * size:
            raise HypercallError(
                Errno.EINVAL,
                f"{self.name}: {len(payload)} bytes for {count} x {size}-byte {self.args.name}",
            )
        if self.max_batch == 1:
            return self.args.unpack_from(payload, 0)
        unpack = self.args.unpack_from
        return [unpack(payload, i * size) for i in range(count)]

    def encode(self, out: Any) -> bytes:
        """OUT data for the reply: records as their layout, bytes as they are."""
        if out is None:
            return b""
        if isinstance(out, bytes | bytearray):
            return bytes(out)
        assert self.args is not None, f"{self.name} returned records but has no layout"
        if isinstance(out, list):
            return b"".join(self.args.pack(record) for record in out)
        return self.args.pack(out)


class HypercallTable:
    def __init__(self) -> None:
        self._entries: dict[tuple[int, int], Entry] = {}

    def register(self, entry: Entry) -> None:
        key = (entry.op, entry.cmd)
        if key in self._entries:
            raise ValueError(f"{entry.name} is already registered as {self._entries[key].name}")
        self._entries[key] = entry

    def install(self, subsystems: Iterable[ModuleType]) -> None:
        """Register the handlers of each subsystem module (see `handlers`)."""
        for subsystem in subsystems:
            for entry in handlers(subsystem):
                self.register(entry)

    def lookup(self, op: int, cmd: int) -> Entry:
        try:
            return self._entries[(op, cmd)]
        except KeyError:
            raise HypercallError(Errno.ENOSYS, f"no hypercall {op}/{cmd}") from None

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: (e.op, e.cmd)))


HYPERCALLS = HypercallTable()
"""The hypervisor's table, filled from `xenlike.hypervisor.SUBSYSTEMS` when that package loads."""

_ENTRY = "__hypercall_entry__"


def handlers(subsystem: ModuleType) -> list[Entry]:
    """The hypercalls `subsystem` handles: its own functions marked by `hypercall`."""
    return [
        value.__dict__[_ENTRY]
        for value in vars(subsystem).values()
        if isinstance(value, FunctionType)
        and value.__module__ == subsystem.__name__
        and _ENTRY in value.__dict__
    ]


def hypercall(
    op: int,
    cmd: Any,
    *,
    args: construct.Struct | None = None,
    privileged: bool = False,
    batch: int = 1,
    raw: bool = False,
    name: str | None = None,
) -> Callable[[Handler], Handler]:
    """Mark a handler for (op, cmd), for `HypercallTable.install` to register.

    `args` is the argument struct (Xen's layout); `batch` > 1 accepts that
    many structs in one call, as grant-table ops do; `raw` passes the
    payload as bytes (console writes); `privileged` admits Dom0 only;
    `name` names the sub-op where `cmd` is a plain number.
    """

    def register(handler: Handler) -> Handler:
        cmd_name = name or getattr(cmd, "name", str(int(cmd))).rstrip("_")
        full_name = f"{Hypercall(op).name}.{cmd_name}"
        codec = compile_struct(args, full_name.replace(".", "_")) if args is not None else None
        entry = Entry(int(op), int(cmd), full_name, handler, codec, privileged, batch, raw)
        setattr(handler, _ENTRY, entry)
        return handler

    return register
