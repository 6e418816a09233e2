"""Atomic read-modify-write on shared memory, through GCC's libatomic.

A grant entry's flags word has two writers in two processes: the granter
revokes access with a compare-and-swap (gnttab_end_foreign_access_ref)
while the hypervisor sets and clears GTF_reading/GTF_writing with its own.
CPython has no atomic operations on memory, so these call libatomic's
`__atomic_*` functions through ctypes. Every one is sequentially
consistent, a full barrier, as Xen's guest_cmpxchg and Linux's
sync_cmpxchg are. A call costs about a microsecond.

Memory is given as a writable buffer (memoryview, mmap, bytearray) or as a
raw address, plus a byte offset. A buffer is bounds-checked; a raw address
is the fast path for a caller that keeps the memory mapped and has checked
the offset itself. Either way the word must be naturally aligned.
"""

import ctypes
from typing import Any

__all__ = ["cmpxchg16", "cmpxchg32", "fetch_and16"]

try:
    _libatomic = ctypes.CDLL("libatomic.so.1")
except OSError as exc:
    raise ImportError(
        "xenlike needs GCC's libatomic (libatomic.so.1) for atomic operations on shared "
        "memory, and it is not installed; on Debian: apt-get install libatomic1"
    ) from exc

_SEQ_CST = 5  # __ATOMIC_SEQ_CST

_cas2 = _libatomic["__atomic_compare_exchange_2"]
_cas2.argtypes = [
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint16),
    ctypes.c_uint16,
    ctypes.c_int,
    ctypes.c_int,
]
_cas2.restype = ctypes.c_bool

_cas4 = _libatomic["__atomic_compare_exchange_4"]
_cas4.argtypes = [
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
    ctypes.c_uint32,
    ctypes.c_int,
    ctypes.c_int,
]
_cas4.restype = ctypes.c_bool

_fetch_and2 = _libatomic["__atomic_fetch_and_2"]
_fetch_and2.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.c_int]
_fetch_and2.restype = ctypes.c_uint16


def _address(memory: Any, offset: int, size: int) -> int:
    if isinstance(memory, int):
        address = memory + offset
    else:
        nbytes = memoryview(memory).nbytes
        if not 0 <= offset <= nbytes - size:
            raise IndexError(f"{size}-byte word at offset {offset} outside a {nbytes}-byte buffer")
        # The ctypes object pins the buffer only for this expression; the
        # caller's reference keeps the memory mapped through the operation.
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory)) + offset
    if address % size:
        raise ValueError(f"address {address:#x} is not {size}-byte aligned")
    return address


def cmpxchg16(memory: Any, offset: int, expected: int, new: int) -> int:
    """Store `new` in the u16 at `offset` if it holds `expected`; return what it held.

    The swap happened exactly when the result equals `expected`.
    """
    seen = ctypes.c_uint16(expected)
    _cas2(_address(memory, offset, 2), ctypes.byref(seen), new, _SEQ_CST, _SEQ_CST)
    return seen.value


def cmpxchg32(memory: Any, offset: int, expected: int, new: int) -> int:
    """cmpxchg16 on a u32: Xen swaps a grant entry's flags and domid as one word."""
    seen = ctypes.c_uint32(expected)
    _cas4(_address(memory, offset, 4), ctypes.byref(seen), new, _SEQ_CST, _SEQ_CST)
    return seen.value


def fetch_and16(memory: Any, offset: int, mask: int) -> int:
    """AND `mask` into the u16 at `offset`; return its old value (clears bits atomically)."""
    return _fetch_and2(_address(memory, offset, 2), mask, _SEQ_CST)
