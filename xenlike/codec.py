"""Fast codecs derived from construct Structs.

construct is the schema: it documents every layout and serves the control
plane. It is far too slow for a ring's hot path (about 115 µs to build one
blkif request, against well under 1 µs for `struct`), so `compile_struct`
derives one `struct.Struct` format from a layout, once, and generates plain
Python functions that pack and unpack records with it. Records are
namedtuples: cheap to build, immutable, and readable (`req.operation`).

Only fixed-size layouts compile: little-endian integers, `Padding`, `Bytes`,
nested `Struct` and `Array` of those. Padding is always written as zeros, so
no stale byte of the writer's memory ever reaches the other side.

Why the functions are generated source (`exec`) and not closures: a
generated `pack_into` calls `struct.pack_into` with a fixed argument list,
which CPython passes by vectorcall; a closure must use `*value`, which
builds a tuple per call. Measured with callgrind (instructions per call,
2026-12): blkif_response pack 1,980 generated against 2,736 as a closure,
a one-segment blkif_request pack 5,390 against 8,967, and a nested start_info
unpack about 3x faster. Every ring entry pays that on both ends.
tests/test_codec.py checks with hypothesis that each generated codec gives
construct's bytes, the plain path.
"""

import functools
import operator
import re
import struct
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import construct

from xenlike.abi._layout import member

__all__ = ["Codec", "LayoutError", "RecordArray", "compile_struct"]


class LayoutError(TypeError):
    """A construct layout uses something a fixed-size codec cannot express."""


@attrs.define(frozen=True, eq=False)
class Codec:
    """Packs and unpacks one fixed-size layout with a precompiled `struct` format.

    `record` is the namedtuple type of decoded values; every field defaults to
    zero, so `codec.record(operation=1, id=7)` builds a sparse entry.
    `unpack_from` reads each byte of the source exactly once (one `struct`
    call), which makes it safe on memory a hostile peer may change under us.
    """

    name: str
    size: int
    format: struct.Struct
    record: Any  # a namedtuple type made at definition time
    pack_into: Callable[[Any, int, Any], None]
    unpack_from: Callable[[Any, int], Any]
    layout: construct.Construct
    # stride -> a function decoding every record of a bytes copy whose records
    # lie `stride` bytes apart (ring slots): see `slots_unpacker`.
    unpack_slots: Callable[[int], Callable[[bytes], list[Any]]]

    def pack(self, value: Any) -> bytes:
        buf = bytearray(self.size)
        self.pack_into(buf, 0, value)
        return bytes(buf)

    def unpack(self, data: bytes) -> Any:
        if len(data) != self.size:
            raise ValueError(f"{self.name}: expected {self.size} bytes, got {len(data)}")
        return self.unpack_from(data, 0)

    def field_packer(self, name: str) -> tuple[int, Callable[[Any, int, Any], None]]:
        """(offset, pack_into) of the top-level integer field `name`: to write that
        one field of a packed record in place."""
        try:
            field = member(self.layout, name)
        except KeyError:
            raise LayoutError(f"{self.name} has no field {name!r}") from None
        if not isinstance(field.type, construct.FormatField):
            raise LayoutError(f"{self.name}.{name} is not an integer field")
        return field.offset, struct.Struct("<" + field.type.fmtstr[1:]).pack_into

    def slots_unpacker(self, stride: int) -> Callable[[bytes], list[Any]]:
        """A decoder of consecutive slots `stride` bytes apart, each holding one
        record from its start: one `iter_unpack` over a copy of the whole run,
        so a ring consumer copies a batch out of shared memory once."""
        if stride < self.size:
            raise ValueError(f"{self.name}: slots of {stride} bytes cannot hold {self.size}")
        return self.unpack_slots(stride)


def compile_struct(layout: construct.Struct, name: str = "record") -> Codec:
    """Derive a `Codec` from a construct Struct (once, at definition time)."""
    gen = _Generator()
    unpack_expr, pack_args, record = gen.struct(layout, name, "value")
    fmt = struct.Struct("<" + "".join(gen.fmt))
    pack_fmt = struct.Struct("<" + "".join(gen.pack_fmt))
    if fmt.size != layout.sizeof():
        raise LayoutError(
            f"{name}: struct format {fmt.format!r} is {fmt.size} bytes, "
            f"construct says {layout.sizeof()}"
        )
    namespace: dict[str, Any] = {
        "_unpack_from": fmt.unpack_from,
        "_pack_into": pack_fmt.pack_into,
        "_new": tuple.__new__,
        "_too_many": _too_many,
        **gen.namespace,
    }
    source = (
        "def unpack_from(buf, offset):\n"
        "    v = _unpack_from(buf, offset)\n"
        f"    return {unpack_expr}\n"
        "def pack_into(buf, offset, value):\n"
        + "".join(f"    {line}\n" for line in gen.pack_prelude)
        + f"    _pack_into(buf, offset, {', '.join(pack_args)})\n"
        + "".join(f"    {line}\n" for line in gen.pack_after)
    )
    exec(compile(source, f"<xenlike.codec {name}>", "exec"), namespace)
    # A run of slots: one iter_unpack over the copy, with the record format
    # padded to the stride. A flat record (`_new(R, v)`) is built from each
    # struct tuple as it is, at C speed.
    records = (
        "list(map(_make, _iter(buf)))"
        if unpack_expr.endswith(", v)")
        else f"[{unpack_expr} for v in _iter(buf)]"
    )
    source = (
        "def unpack_slots(stride):\n"
        f"    _iter = _struct.Struct(_fmt + f'{{stride - {fmt.size}}}x').iter_unpack\n"
        "    def unpack_many(buf):\n"
        f"        return {records}\n"
        "    return unpack_many\n"
    )
    namespace.update(
        _struct=struct, _fmt=fmt.format, _make=functools.partial(tuple.__new__, record)
    )
    exec(compile(source, f"<xenlike.codec {name} slots>", "exec"), namespace)
    return Codec(
        name=name,
        size=fmt.size,
        format=fmt,
        record=record,
        pack_into=namespace["pack_into"],
        unpack_from=namespace["unpack_from"],
        layout=layout,
        unpack_slots=namespace["unpack_slots"],
    )


def _too_many(field: str, count: int, items: Any) -> None:
    raise ValueError(f"{field}: at most {count} elements, got {len(items)}")


class _Generator:
    """Walks a layout, collecting the flat struct format and Python expressions.

    Unpacking maps the flat tuple `v` back to nested records; packing maps a
    nested record to the flat argument list of `struct.pack_into`. The pack
    format differs from the unpack format only where a record array sits:
    there it writes zeros, and `pack_after` then writes the elements given.
    """

    def __init__(self) -> None:
        self.fmt: list[str] = []
        self.pack_fmt: list[str] = []
        self.pack_after: list[str] = []
        self.index = 0
        self.namespace: dict[str, Any] = {}
        self.pack_prelude: list[str] = []
        self._names = 0
        self._records: dict[int, tuple[type, str]] = {}

    def _name(self, prefix: str) -> str:
        self._names += 1
        return f"_{prefix}{self._names}"

    def struct(self, layout: construct.Struct, name: str, src: str) -> tuple[str, list[str], type]:
        fields: list[str] = []
        defaults: list[Any] = []
        exprs: list[str] = []
        args: list[str] = []
        first = self.index
        local = self._name("s")
        self.pack_prelude.append(f"{local} = {src}")
        lazy: dict[int, type] = {}
        for sub in layout.subcons:
            if sub.name is None:
                self.padding(sub)
                continue
            expr, sub_args, default = self.field(
                sub.subcon, f"{name}.{sub.name}", f"{local}[{len(fields)}]"
            )
            if isinstance(default, RecordArray):  # kept as bytes, decoded when read
                lazy[len(fields)] = type(default)
            fields.append(sub.name)
            defaults.append(default)
            exprs.append(expr)
            args.extend(sub_args)
        record, rec_name = self._record(layout, name, fields, defaults, lazy)
        if exprs == [f"v[{i}]" for i in range(first, self.index)] and first == 0:
            unpack = f"_new({rec_name}, v)"
        else:
            unpack = f"_new({rec_name}, ({', '.join(exprs)},))"
        return unpack, args, record

    def _record(
        self,
        layout: construct.Struct,
        name: str,
        fields: list[str],
        defaults: list[Any],
        lazy: dict[int, type],
    ) -> tuple[type, str]:
        """One namedtuple type per layout, shared by every element of an array.

        A record array field holds the raw bytes as decoded (one struct call
        made them); its property turns them into a `RecordArray` when read,
        so a decoded record costs the same with an 11-element array as without.
        """
        if id(layout) not in self._records:
            type_name = re.sub(r"\[\d+\]", "", name).replace(".", "_")
            plain: Any = namedtuple(type_name, fields, defaults=defaults)  # type: ignore[misc]
            record = (
                plain
                if not lazy
                else type(
                    type_name,
                    (plain,),
                    {
                        "__slots__": (),
                        **{
                            fields[i]: _array_property(i, array_type)
                            for i, array_type in lazy.items()
                        },
                        "__repr__": _lazy_repr,
                    },
                )
            )
            rec_name = self._name("R")
            self.namespace[rec_name] = record
            self._records[id(layout)] = (record, rec_name)
        return self._records[id(layout)]

    def _append(self, fmt: str, pack_fmt: str | None = None) -> None:
        self.fmt.append(fmt)
        self.pack_fmt.append(fmt if pack_fmt is None else pack_fmt)

    def padding(self, sub: construct.Construct) -> None:
        if not isinstance(sub, construct.Padded) or sub.subcon is not construct.Pass:
            raise LayoutError(f"unnamed field {sub!r} must be Padding(n)")
        self._append(f"{sub.length}x")

    def field(self, con: construct.Construct, name: str, src: str) -> tuple[str, list[str], Any]:
        if isinstance(con, construct.FormatField):
            if con.fmtstr[0] not in "<=":
                raise LayoutError(f"{name}: {con.fmtstr!r} is not little-endian")
            self._append(con.fmtstr[1:])
            self.index += 1
            return f"v[{self.index - 1}]", [src], 0
        if isinstance(con, construct.Bytes) and isinstance(con.length, int):
            self._append(f"{con.length}s")
            self.index += 1
            return f"v[{self.index - 1}]", [src], b"\0" * con.length
        if isinstance(con, construct.Struct):
            unpack, args, record = self.struct(con, name, src)
            return unpack, args, record()
        if isinstance(con, construct.Array) and isinstance(con.count, int):
            return self.array(con, name, src)
        if isinstance(con, construct.Renamed):
            return self.field(con.subcon, name, src)
        raise LayoutError(f"{name}: {con!r} has no fixed-size struct form")

    def array(self, con: construct.Array, name: str, src: str) -> tuple[str, list[str], Any]:
        """Arrays of scalars (a tuple), or of flat records, the shape of blkif's `seg[11]`.

        A record array is decoded as its raw bytes (one copy, made by the same
        `struct` call as the rest) and each element record is built only when
        read (`RecordArray`), so a request that uses one segment of eleven
        pays for one. Encoding takes fewer elements than the array holds and
        zero-fills the rest, so callers pass only what they use.
        """
        count = con.count
        if not _is_flat(con.subcon):
            raise LayoutError(f"{name}: arrays hold scalars or flat structs only")
        if isinstance(con.subcon, construct.Struct):
            item = compile_struct(con.subcon, re.sub(r"\[\d+\]", "", name).replace(".", "_"))
            array_type: Any = type(
                f"{item.record.__name__}_array",
                (RecordArray,),
                {
                    "__slots__": (),
                    "_item": item,
                    "_count": count,
                    "_size": item.size,
                    "_make": functools.partial(tuple.__new__, item.record),
                    "_iter": item.format.iter_unpack,
                    "_unpack": item.format.unpack_from,
                },
            )
            type_name = self._name("A")
            self.namespace[type_name] = array_type
            offset = struct.calcsize("<" + "".join(self.fmt))
            self.namespace[f"{type_name}_put"] = array_type.put_into
            self.namespace[f"{type_name}_item"] = item.format.pack_into
            local = self._name("a")
            # The hot cases are written inline, a call saved on each: a whole
            # array as its bytes (as decoded, or built once and reused), bare
            # or in a RecordArray, and one element (blkif's usual single segment).
            start, end = f"offset + {offset}", f"offset + {offset + item.size * count}"
            self.pack_after += [
                f"{local} = {src}",
                f"if type({local}) is bytes and len({local}) == {item.size * count}:",
                f"    buf[{start}:{end}] = {local}",
                f"elif type({local}) is {type_name} and len({local}.raw) == {item.size * count}:",
                f"    buf[{start}:{end}] = {local}.raw",
                f"elif type({local}) is not {type_name} and len({local}) == 1:",
                f"    {type_name}_item(buf, {start}, *{local}[0])",
                "else:",
                f"    {type_name}_put(buf, {start}, {local})",
            ]
            self._append(f"{item.size * count}s", f"{item.size * count}x")
            self.index += 1
            return f"v[{self.index - 1}]", [], array_type(bytes(item.size * count))
        first = self.index
        _, _, zero = self.field(con.subcon, f"{name}[0]", "x")
        for _ in range(count - 1):
            self._append(self.fmt[-1])
        self.index = first + count
        local, tail = self._name("a"), self._name("t")
        self.namespace[tail] = tuple((zero,) * (count - n) for n in range(count + 1))
        self.pack_prelude.append(f"{local} = {src}")
        self.pack_prelude.append(
            f"if len({local}) > {count}: _too_many({name!r}, {count}, {local})"
        )
        return f"v[{first}:{self.index}]", [f"*{local}", f"*{tail}[len({local})]"], (zero,) * count


def _array_property(index: int, array_type: type) -> property:
    getter = operator.itemgetter(index)

    def get(self: tuple[Any, ...]) -> Any:
        value = getter(self)
        return array_type(value) if type(value) is bytes else value

    return property(get, doc=f"field {index}, decoded as a {array_type.__name__} when read")


def _lazy_repr(self: tuple[Any, ...]) -> str:
    fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)  # type: ignore[attr-defined]
    return f"{type(self).__name__}({fields})"


def _is_flat(con: construct.Construct) -> bool:
    """A scalar, bytes, or a Struct of only those (and padding)."""
    while isinstance(con, construct.Renamed):
        con = con.subcon
    if isinstance(con, construct.Struct):
        return all(sub.name is None or _is_flat(sub) for sub in con.subcons)
    return isinstance(con, construct.FormatField | construct.Bytes)


class RecordArray(Sequence[Any]):
    """A fixed array of flat records, kept as bytes and decoded per element.

    It reads like a tuple of records (len, index, slice, iterate, compare).
    The bytes are a private copy, so reading an element twice gives the same
    answer even if the shared page changed meanwhile.
    """

    __slots__ = ("raw",)
    _item: Codec
    _count: int
    _size: int
    _make: Callable[[tuple[Any, ...]], Any]  # tuple -> element record, at C speed
    _iter: Callable[[bytes], Iterator[tuple[Any, ...]]]  # the element format's iter_unpack
    _unpack: Callable[[bytes, int], tuple[Any, ...]]

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    @classmethod
    def put_into(cls, buf: Any, offset: int, items: Any) -> None:
        """Write records (or tuples in field order) from `offset`; the rest stays as is.

        The enclosing codec has already zeroed the whole array, so a caller
        passes only the elements it uses.
        """
        if type(items) is cls:
            if len(items.raw) > cls._count * cls._size:
                raise ValueError(
                    f"{cls.__name__}: {len(items.raw)} bytes, more than {cls._count} elements"
                )
            buf[offset : offset + len(items.raw)] = items.raw
            return
        if len(items) > cls._count:
            raise ValueError(f"{cls.__name__}: at most {cls._count} elements, got {len(items)}")
        pack, size = cls._item.format.pack_into, cls._item.size
        for item in items:
            pack(buf, offset, *item)
            offset += size

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.start or 0, index.stop, index.step
            if step is None and start >= 0 and stop is not None and stop >= 0:
                # The common `seg[:nr_segments]`, at C speed; one element is the
                # commonest of all (a 4 KiB request). bench/ring.py's back end reads
                # its requests so: without this it ran 20-35% slower (batched, 2026-12).
                if start == 0 and stop == 1:
                    return (self._make(self._unpack(self.raw, 0)),)
                size = self._size
                return tuple(
                    map(
                        self._make,
                        self._iter(self.raw[start * size : min(stop, self._count) * size]),
                    )
                )
            return tuple(self)[index]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"{type(self).__name__} index {index} out of range")
        return self._make(self._unpack(self.raw, index * self._size))

    def __iter__(self) -> Iterator[Any]:
        return map(self._make, self._iter(self.raw))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordArray):
            return self.raw == other.raw
        if isinstance(other, tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return repr(tuple(self))
