"""Xen shared rings (io/ring.h) without I/O.

A ring is the shared page(s) of `DEFINE_RING_TYPES`: a 64-byte header
(`req_prod`, `req_event`, `rsp_prod`, `rsp_event`, `pvt`, padding) and then
a power-of-two array of slots, each the size of the larger of the request
and the response. Indices are free-running 32-bit counters masked by the
slot count. `FrontRing` and `BackRing` follow ring.h's macros one for one;
they read and write a memoryview of the shared memory and never block,
sleep or notify: each push says whether the peer must be notified, and the
caller owns the event channel.

Two things CPython does not give for free:

- A memory fence. ring.h puts `xen_mb()` where a store must be visible
  before a later load (publishing an index, then reading the peer's event
  index). x86 may reorder exactly that, and without a fence a ring here lost
  about one wake-up per million sleeps. An uncontended lock acquire+release
  is a locked instruction, a full fence, for about 75 ns: `mb()`. Stores are
  not reordered with stores, nor loads with loads, on x86, so `wmb()` and
  `rmb()` are compiler barriers there, which Python's interpreter already
  is; elsewhere they are real fences too.
- Speed. Entries are packed and unpacked with `struct` formats derived once
  from the construct layouts (`xenlike.codec`), never with construct itself.

The consumer decodes each slot with one `struct` call, which copies every
byte out of shared memory exactly once: what is validated is what is used
(no double fetch). Indices written by the peer are checked before use; a
peer that publishes more entries than the ring can hold gets a
`RingOverflow`, and the caller disconnects the device.
"""

import platform
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import construct

from xenlike.abi.ring import SRING_HEADER_SIZE, XEN_PAGE_SIZE, ring_size
from xenlike.codec import Codec, compile_struct

__all__ = [
    "BackRing",
    "FrontRing",
    "RingError",
    "RingFull",
    "RingOverflow",
    "RingSpec",
    "define_ring",
    "mb",
]

_MASK32 = 0xFFFFFFFF
MAX_RING_PAGE_ORDER = 4
# Header words, as 32-bit indices of the memoryview cast to "I".
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3

_fence = threading.Lock()


def mb() -> None:
    """Full memory barrier (ring.h's `xen_mb()`): a locked read-modify-write."""
    with _fence:
        pass


def _no_barrier() -> None:
    """x86 keeps stores in order and loads in order: a compiler barrier suffices."""


_X86 = platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
wmb = rmb = _no_barrier if _X86 else mb


class RingError(Exception):
    """Base class of ring protocol errors."""


class RingFull(RingError):
    """The producer tried to queue more requests than the ring has free slots.

    This is the local side's mistake: check `free_requests()` first.
    """


class RingOverflow(RingError):
    """The peer published an index the ring cannot hold: a protocol violation.

    The remote side is broken or hostile; the device must be disconnected.
    """


@attrs.define(frozen=True)
class RingSpec:
    """A ring type, as `DEFINE_RING_TYPES(name, request, response)` defines one."""

    name: str
    request: Codec
    response: Codec

    @property
    def entry_size(self) -> int:
        """Size of `union name_sring_entry`: the larger of request and response."""
        return max(self.request.size, self.response.size)

    def nr_ents(self, nr_pages: int = 1) -> int:
        """Slots in a ring of `nr_pages` 4 KiB pages (`__CONST_RING_SIZE`)."""
        slots = ring_size(self.entry_size, nr_pages * XEN_PAGE_SIZE)
        if not slots:
            raise ValueError(f"{self.name}: {nr_pages} page(s) hold no {self.entry_size}-byte slot")
        return slots


def define_ring(
    name: str, *, request: construct.Struct | Codec, response: construct.Struct | Codec
) -> RingSpec:
    """Define a ring type from construct layouts (or ready codecs, e.g. for unions).

    Example: ``blkif = define_ring("blkif", request=blkif_request,
    response=blkif_response)`` gives 32 slots of 112 bytes in one page.
    """

    def as_codec(layout: construct.Struct | Codec, role: str) -> Codec:
        return layout if isinstance(layout, Codec) else compile_struct(layout, f"{name}_{role}")

    return RingSpec(name, as_codec(request, "request"), as_codec(response, "response"))


def _ring_area(spec: RingSpec, memory: memoryview) -> tuple[memoryview, memoryview, int]:
    if memory.nbytes % XEN_PAGE_SIZE:
        raise ValueError(
            f"a ring spans whole {XEN_PAGE_SIZE}-byte pages, got {memory.nbytes} bytes"
        )
    nr_pages = memory.nbytes // XEN_PAGE_SIZE
    if not 1 <= nr_pages <= 1 << MAX_RING_PAGE_ORDER:
        raise ValueError(f"a ring has 1 to {1 << MAX_RING_PAGE_ORDER} pages, got {nr_pages}")
    memory = memory.cast("B")
    return memory, memory[:SRING_HEADER_SIZE].cast("I"), spec.nr_ents(nr_pages)


def _copy_slots(
    mem: memoryview,
    start: int,
    count: int,
    nr_ents: int,
    slot: int,
    unpack_slots: Callable[[bytes], list[Any]],
) -> list[Any]:
    """`count` entries from slot `start` on: copied out of shared memory once (one
    or two runs, as the ring wraps), then decoded from the copy."""
    first = min(count, nr_ents - start)
    base = SRING_HEADER_SIZE + start * slot
    out = unpack_slots(bytes(mem[base : base + first * slot]))
    if first < count:
        out += unpack_slots(
            bytes(mem[SRING_HEADER_SIZE : SRING_HEADER_SIZE + (count - first) * slot])
        )
    return out


class FrontRing:
    """The requesting end (ring.h's `front_ring`): the front end of a PV device.

    `memory` is the whole shared ring, one or more pages. With `attach=False`
    (the default) the shared header is initialised, as `XEN_FRONT_RING_INIT`
    does; `attach=True` resumes an existing ring (`FRONT_RING_ATTACH`).
    """

    def __init__(self, spec: RingSpec, memory: memoryview, *, attach: bool = False) -> None:
        self.spec = spec
        self._mem, self._hdr, self.nr_ents = _ring_area(spec, memory)
        self._mask = self.nr_ents - 1
        self._slot = spec.entry_size
        self._pack = spec.request.pack_into
        self._unpack_slots = spec.response.slots_unpacker(spec.entry_size)
        self._id_packers: dict[str, tuple[int, Callable[[Any, int, Any], None]]] = {}
        if attach:
            self.req_prod_pvt = self._hdr[_REQ_PROD]
            self.rsp_cons = self._hdr[_RSP_PROD]
        else:
            self._mem[:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE)  # SHARED_RING_INIT
            self._hdr[_REQ_EVENT] = 1
            self._hdr[_RSP_EVENT] = 1
            self.req_prod_pvt = 0
            self.rsp_cons = 0

    def free_requests(self) -> int:
        """`RING_FREE_REQUESTS`: slots the front end may fill before it must wait."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & _MASK32)

    @property
    def full(self) -> bool:
        """`RING_FULL`."""
        return self.free_requests() == 0

    def put_request(self, request: Any) -> None:
        """Write one request into the next private slot (`RING_GET_REQUEST` + `req_prod_pvt++`).

        Nothing is visible to the back end until `push_requests()`.
        """
        if self.free_requests() == 0:
            raise RingFull(f"{self.spec.name}: all {self.nr_ents} slots are in flight")
        prod = self.req_prod_pvt
        self._pack(self._mem, SRING_HEADER_SIZE + (prod & self._mask) * self._slot, request)
        self.req_prod_pvt = (prod + 1) & _MASK32

    def put_requests(self, requests: Iterable[Any]) -> int:
        """Write requests until they run out or the ring is full; return how many."""
        prod = self.req_prod_pvt
        room = self.nr_ents - ((prod - self.rsp_cons) & _MASK32)
        pack, mem, mask, slot = self._pack, self._mem, self._mask, self._slot
        done = 0
        for request in requests:
            if done == room:
                raise RingFull(f"{self.spec.name}: all {self.nr_ents} slots are in flight")
            pack(mem, SRING_HEADER_SIZE + ((prod + done) & mask) * slot, request)
            done += 1
        self.req_prod_pvt = (prod + done) & _MASK32
        return done

    def put_requests_with_ids(
        self, requests: Sequence[Any], ids: Sequence[int], id_field: str = "id"
    ) -> int:
        """`put_requests`, with `ids[i]` written into request i's `id_field` in its
        slot (the record's own value is not used): no record is rebuilt to change
        one field. Returns how many were written."""
        at, put_id = self.id_packer(id_field)
        prod = self.req_prod_pvt
        room = self.nr_ents - ((prod - self.rsp_cons) & _MASK32)
        if len(requests) > room:
            raise RingFull(f"{self.spec.name}: all {self.nr_ents} slots are in flight")
        pack, mem, mask, slot = self._pack, self._mem, self._mask, self._slot
        for request, rid in zip(requests, ids, strict=True):
            offset = SRING_HEADER_SIZE + (prod & mask) * slot
            pack(mem, offset, request)
            put_id(mem, offset + at, rid)
            prod += 1
        self.req_prod_pvt = prod & _MASK32
        return len(requests)

    def id_packer(self, id_field: str) -> tuple[int, Callable[[Any, int, Any], None]]:
        """(offset in a slot, pack_into) of the requests' `id_field`, found once
        (a LayoutError if the request has no such integer field)."""
        packer = self._id_packers.get(id_field)
        if packer is None:
            packer = self._id_packers[id_field] = self.spec.request.field_packer(id_field)
        return packer

    def push_requests(self) -> bool:
        """`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publish, and say whether to notify."""
        hdr = self._hdr
        old = hdr[_REQ_PROD]
        new = self.req_prod_pvt
        wmb()
        hdr[_REQ_PROD] = new
        mb()
        return ((new - hdr[_REQ_EVENT]) & _MASK32) < ((new - old) & _MASK32)

    def unconsumed_responses(self) -> int:
        """`RING_HAS_UNCONSUMED_RESPONSES`, refusing an impossible `rsp_prod`."""
        produced = (self._hdr[_RSP_PROD] - self.rsp_cons) & _MASK32
        if produced > ((self.req_prod_pvt - self.rsp_cons) & _MASK32):
            raise RingOverflow(
                f"{self.spec.name}: back end published {produced} responses "
                f"for {(self.req_prod_pvt - self.rsp_cons) & _MASK32} outstanding requests"
            )
        return produced

    def get_responses(self) -> list[Any]:
        """Consume every response published so far (decoded copies), in ring order."""
        count = self.unconsumed_responses()
        if not count:
            return []
        rmb()
        out = _copy_slots(
            self._mem,
            self.rsp_cons & self._mask,
            count,
            self.nr_ents,
            self._slot,
            self._unpack_slots,
        )
        self.rsp_cons = (self.rsp_cons + count) & _MASK32
        return out

    def final_check_for_responses(self) -> bool:
        """`RING_FINAL_CHECK_FOR_RESPONSES`: arm `rsp_event`, then look once more.

        Returns True when responses are waiting. When it returns False the
        back end is bound to notify on its next push, so sleeping is safe.
        """
        if self.unconsumed_responses():
            return True
        self._hdr[_RSP_EVENT] = (self.rsp_cons + 1) & _MASK32
        mb()
        return self.unconsumed_responses() > 0

    def header(self) -> dict[str, int]:
        """The shared indices, for tracing and debugging."""
        return _header(self._hdr)

    def release(self) -> None:
        """Drop this ring's views of the shared memory, so it can be unmapped."""
        self._hdr.release()
        self._mem.release()


class BackRing:
    """The serving end (ring.h's `back_ring`): the back end of a PV device.

    It never initialises the shared page (`BACK_RING_INIT` does not); with
    `attach=True` it resumes from the shared indices (`BACK_RING_ATTACH`).
    """

    def __init__(self, spec: RingSpec, memory: memoryview, *, attach: bool = False) -> None:
        self.spec = spec
        self._mem, self._hdr, self.nr_ents = _ring_area(spec, memory)
        self._mask = self.nr_ents - 1
        self._slot = spec.entry_size
        self._pack = spec.response.pack_into
        self._unpack_slots = spec.request.slots_unpacker(spec.entry_size)
        start = self._hdr[_RSP_PROD] if attach else 0
        self.rsp_prod_pvt = start
        self.req_cons = start

    def unconsumed_requests(self) -> int:
        """`RING_HAS_UNCONSUMED_REQUESTS`, refusing an impossible `req_prod`.

        Never more than the slots not yet answered, so a back end that keeps
        up to `nr_ents` requests in flight cannot be made to over-consume.
        """
        req_prod = self._hdr[_REQ_PROD]
        if ((req_prod - self.rsp_prod_pvt) & _MASK32) > self.nr_ents:  # RING_REQUEST_PROD_OVERFLOW
            raise RingOverflow(
                f"{self.spec.name}: front end published req_prod {req_prod}, more than "
                f"{self.nr_ents} slots past the last response {self.rsp_prod_pvt}"
            )
        unconsumed = (req_prod - self.req_cons) & _MASK32
        room = self.nr_ents - ((self.req_cons - self.rsp_prod_pvt) & _MASK32)
        return min(unconsumed, room)

    def get_requests(self, limit: int | None = None) -> list[Any]:
        """Consume the published requests (at most `limit`): each copied once, decoded."""
        count = self.unconsumed_requests()
        if limit is not None:
            count = min(count, limit)
        if not count:
            return []
        rmb()
        out = _copy_slots(
            self._mem,
            self.req_cons & self._mask,
            count,
            self.nr_ents,
            self._slot,
            self._unpack_slots,
        )
        self.req_cons = (self.req_cons + count) & _MASK32
        return out

    def put_response(self, response: Any) -> None:
        """Write one response into the next private slot (`rsp_prod_pvt++`)."""
        if self.rsp_prod_pvt == self.req_cons:
            raise RingFull(f"{self.spec.name}: no consumed request is waiting for a response")
        prod = self.rsp_prod_pvt
        self._pack(self._mem, SRING_HEADER_SIZE + (prod & self._mask) * self._slot, response)
        self.rsp_prod_pvt = (prod + 1) & _MASK32

    def put_responses(self, responses: Iterable[Any]) -> int:
        """Write responses in order, one per consumed request; return how many."""
        prod = self.rsp_prod_pvt
        owed = (self.req_cons - prod) & _MASK32
        pack, mem, mask, slot = self._pack, self._mem, self._mask, self._slot
        done = 0
        for response in responses:
            if done == owed:
                raise RingFull(f"{self.spec.name}: more responses than consumed requests")
            pack(mem, SRING_HEADER_SIZE + ((prod + done) & mask) * slot, response)
            done += 1
        self.rsp_prod_pvt = (prod + done) & _MASK32
        return done

    def push_responses(self) -> bool:
        """`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publish, and say whether to notify."""
        hdr = self._hdr
        old = hdr[_RSP_PROD]
        new = self.rsp_prod_pvt
        wmb()
        hdr[_RSP_PROD] = new
        mb()
        return ((new - hdr[_RSP_EVENT]) & _MASK32) < ((new - old) & _MASK32)

    def final_check_for_requests(self) -> bool:
        """`RING_FINAL_CHECK_FOR_REQUESTS`: arm `req_event`, then look once more."""
        if self.unconsumed_requests():
            return True
        self._hdr[_REQ_EVENT] = (self.req_cons + 1) & _MASK32
        mb()
        return self.unconsumed_requests() > 0

    def header(self) -> dict[str, int]:
        """The shared indices, for tracing and debugging."""
        return _header(self._hdr)

    def release(self) -> None:
        """Drop this ring's views of the shared memory, so it can be unmapped."""
        self._hdr.release()
        self._mem.release()


def _header(hdr: memoryview) -> dict[str, int]:
    return {
        "req_prod": hdr[_REQ_PROD],
        "req_event": hdr[_REQ_EVENT],
        "rsp_prod": hdr[_RSP_PROD],
        "rsp_event": hdr[_RSP_EVENT],
    }
