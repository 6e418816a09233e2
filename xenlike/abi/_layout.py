"""Helpers over the ABI's construct Structs.

Every layout in `xenlike.abi` spells out C's alignment padding with explicit
`Padding`, so a member's offset is simply the sum of the sizes before it.
That keeps `offsetof` a few lines long and lets code (and the header test)
ask a layout the same questions C's `offsetof`/`sizeof` answer.
"""

import keyword
import re
from collections.abc import Iterator, MutableMapping
from enum import IntEnum
from typing import Any, NamedTuple

import construct

__all__ = ["Field", "export_enum", "fields", "member", "offsetof"]


class Field(NamedTuple):
    """One named member of a Struct: C name, byte offset, size, and its type."""

    name: str
    offset: int
    size: int
    type: construct.Construct


def _unwrap(con: construct.Construct) -> construct.Construct:
    while isinstance(con, construct.Renamed):
        con = con.subcon
    return con


def _members(struct: construct.Struct) -> Iterator[Field]:
    offset = 0
    for sub in struct.subcons:
        size = sub.sizeof()
        if sub.name is not None:
            yield Field(sub.name, offset, size, _unwrap(sub))
        offset += size


def fields(struct: construct.Struct) -> list[Field]:
    """The named members of `struct` in order (unnamed `Padding` is skipped)."""
    return list(_members(struct))


_STEP = re.compile(r"([A-Za-z_]\w*)((?:\[\d+\])*)$")


def member(struct: construct.Struct, path: str) -> Field:
    """The member at a C-style path such as ``"seg[1].gref"`` or ``"console.domU.mfn"``.

    The result's `offset` is relative to the start of `struct`.
    """
    con: construct.Construct = struct
    offset = 0
    for step in path.split("."):
        match = _STEP.match(step)
        if match is None:
            raise ValueError(f"bad member path {path!r}")
        name, indices = match.groups()
        if not isinstance(con, construct.Struct):
            raise KeyError(f"{path!r}: {con!r} has no member {name!r}")
        found = next((f for f in _members(con) if f.name == name), None)
        if found is None:
            raise KeyError(f"{path!r}: no member {name!r}")
        offset += found.offset
        con = found.type
        for index in map(int, re.findall(r"\d+", indices)):
            if not isinstance(con, construct.Array) or not 0 <= index < con.count:
                raise IndexError(f"{path!r}: [{index}] is outside {con!r}")
            con = _unwrap(con.subcon)
            offset += index * con.sizeof()
    return Field(path.rsplit(".", 1)[-1], offset, con.sizeof(), con)


def offsetof(struct: construct.Struct, path: str) -> int:
    """C's ``offsetof(struct, path)``; `path` may name nested members and array elements."""
    return member(struct, path).offset


def export_enum(enum: type[IntEnum], prefix: str, namespace: MutableMapping[str, Any]) -> list[str]:
    """Bind every member of `enum` (aliases too) in `namespace` under Xen's full name.

    ``export_enum(GnttabOp, "GNTTABOP_", globals())`` defines
    ``GNTTABOP_map_grant_ref = GnttabOp.map_grant_ref`` and so on, so the short
    member names serve dispatch and trace output while Xen's names still work.
    A member named after a Python keyword carries a trailing underscore
    (``SchedOp.yield_``); its Xen name does not (``SCHEDOP_yield``).
    Returns the new names, for the module's ``__all__``.
    """
    names = []
    for short, value in enum.__members__.items():
        if short.endswith("_") and keyword.iskeyword(short[:-1]):
            short = short[:-1]
        name = prefix + short
        if name in namespace and namespace[name] is not value:
            raise ValueError(f"{name} is already defined")
        namespace[name] = value
        names.append(name)
    return names
