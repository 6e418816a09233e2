"""Grant tables: xenlike._atomic, the hypervisor's GNTTABOP_* and the domain's GrantTable.

Most tests speak to the hypervisor as built domains through `connect` (a
hypercall socket with no process behind it), each with a domain-side
GrantTable over its own memory, so one test can be granter and mapper at
once and look at the entries the hypervisor sees. The last tests boot real
guests, where the behaviour crosses processes: a page shared between two of
them, a mapper killed by SIGKILL, a granter that dies while mapped.
"""

import ctypes
import importlib
import mmap
import multiprocessing
import os
import re
import signal
import struct
import sys

import attrs
import pytest
import trio

from tests.conftest import DomainConnector
from tests.test_hypervisor import wait_for_log, wait_for_shutdown
from xenlike import _atomic
from xenlike import memory as memory_module
from xenlike.abi.errno import Errno
from xenlike.abi.event_channel import EvtchnOp, evtchn_bind_interdomain
from xenlike.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GntStatus,
    GnttabOp,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    gnttab_copy,
    gnttab_map_grant_ref,
    gnttab_unmap_grant_ref,
    grant_entry_v1,
)
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import DOMID_SELF, Hypercall
from xenlike.codec import compile_struct
from xenlike.domain import (
    GrantCopy,
    GrantInUse,
    GrantRef,
    GrantStatusError,
    GrantTable,
    LocalFrame,
    NoFreeGrantRefs,
)
from xenlike.domain.hypercall import HypercallClient
from xenlike.domain.runtime import attach_memory
from xenlike.hypercall import MAX_FDS, HypercallError
from xenlike.hypervisor import Hypervisor, HypervisorDomain
from xenlike.hypervisor import grant_table as hypervisor_grant_table
from xenlike.hypervisor.frames import MAX_FRAME_FILES
from xenlike.hypervisor.grant_table import MAX_BATCH, PIN_LIMIT
from xenlike.memory import XEN_PAGE_SIZE, BadFrame, DomainMemory, MemoryInUse, machine_address
from xenlike.xc import XenControl

GNTTAB_OP = Hypercall.grant_table_op
ENTRY = compile_struct(grant_entry_v1, "grant_entry_v1")
MAP = compile_struct(gnttab_map_grant_ref, "gnttab_map_grant_ref")
UNMAP = compile_struct(gnttab_unmap_grant_ref, "gnttab_unmap_grant_ref")
COPY = compile_struct(gnttab_copy, "gnttab_copy")
BIND = compile_struct(evtchn_bind_interdomain, "evtchn_bind_interdomain")
S = GntStatus


# --- xenlike._atomic --------------------------------------------------------------


def test_cmpxchg16_swaps_only_what_it_expects() -> None:
    buf = bytearray(8)
    assert _atomic.cmpxchg16(buf, 2, 0, 0x1234) == 0
    assert _atomic.cmpxchg16(buf, 2, 0, 0x5678) == 0x1234  # refused: reports what is there
    assert buf == bytes([0, 0, 0x34, 0x12, 0, 0, 0, 0])


def test_cmpxchg32_and_fetch_and16() -> None:
    buf = bytearray(8)
    assert _atomic.cmpxchg32(buf, 4, 0, 0x0002_0019) == 0
    assert _atomic.fetch_and16(buf, 4, ~GTF_reading & 0xFFFF) == 0x19
    assert struct.unpack_from("<HH", buf, 4) == (0x11, 2)


def test_atomics_take_a_raw_address() -> None:
    buf = mmap.mmap(-1, 4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert _atomic.cmpxchg16(address, 8, 0, 7) == 0
    assert buf[8] == 7
    buf.close()


def test_atomics_refuse_bad_offsets_and_read_only_memory() -> None:
    with pytest.raises(IndexError, match="outside a 8-byte buffer"):
        _atomic.cmpxchg16(bytearray(8), 7, 0, 1)
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        _atomic.cmpxchg32(bytearray(8), 2, 0, 1)
    with pytest.raises(TypeError):
        _atomic.cmpxchg16(bytes(8), 0, 0, 1)


def test_a_missing_libatomic_names_the_debian_package(monkeypatch) -> None:
    def missing(name: str, *args: object, **kwargs: object) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    monkeypatch.delitem(sys.modules, "xenlike._atomic")
    with pytest.raises(ImportError, match="apt-get install libatomic1"):
        importlib.import_module("xenlike._atomic")


def _count(address: int, cas: str, times: int) -> None:
    swap = getattr(_atomic, cas)
    seen = 0
    for _ in range(times):
        while (old := swap(address, 0, seen, seen + 1)) != seen:
            seen = old
        seen += 1


@pytest.mark.parametrize("cas", ["cmpxchg16", "cmpxchg32"])
def test_compare_and_swap_is_atomic_across_processes(cas: str) -> None:
    """Two processes count in one shared word: no increment is lost."""
    shared = mmap.mmap(-1, 4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(shared))
    times = 10_000
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_count, args=(address, cas, times)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert struct.unpack_from("<H" if cas == "cmpxchg16" else "<I", shared)[0] == 2 * times


# --- domains driven from the test -------------------------------------------------


@attrs.define(eq=False)
class Guest:
    """A built domain the test speaks as: its hypercalls, memory and GrantTable."""

    domain: HypervisorDomain
    hypercalls: HypercallClient
    memory: DomainMemory
    grants: GrantTable

    @property
    def domid(self) -> int:
        return self.domain.domid

    def page(self, index: int) -> int:
        """A frame of its own to grant (the guest's allocator would hand these out)."""
        return self.domain.layout.first_free_gfn + index

    def write(self, gfn: int, data: bytes, offset: int = 0) -> None:
        with self.memory.frame(gfn) as page:
            page[offset : offset + len(data)] = data

    def read(self, gfn: int, length: int = 32, offset: int = 0) -> bytes:
        with self.memory.frame(gfn) as page:
            return bytes(page[offset : offset + length])


@pytest.fixture
async def guest(hv: Hypervisor, connect: DomainConnector):
    async def make(domid: int | None = None) -> Guest:
        """A new domain (or Dom0, which the hypervisor made unbuilt), built, not run."""
        domain = hv.domains[0] if domid == 0 else hv.create_domain(domid=domid)
        domain.max_pages = 256
        hv.build_domain(domain, "tests.kernels:sleeper")
        frames = domain.frames.domain_end
        memory = attach_memory(os.dup(domain.memory.fd), domain.nr_pages, frames)
        hypercalls = await connect(domain)
        grants = GrantTable(memory, domain.layout, hypercalls, frames, f"xenlike-d{domain.domid}")
        return Guest(domain, hypercalls, memory, grants)

    return make


def entry(hv: Hypervisor, domid: int, ref: int):
    """Grant entry `ref` of `domid`, as the hypervisor's mapping of its memory shows it."""
    domain = hv.domains[domid]
    with domain.memory.frame(domain.layout.grant_table_gfn + ref // 512) as page:
        return ENTRY.unpack_from(page, ref % 512 * ENTRY.size)


async def raw_map(hypercalls: HypercallClient, ops: list) -> tuple[list, tuple[int, ...]]:
    done = await hypercalls.call(
        GNTTAB_OP, GnttabOp.map_grant_ref, b"".join(MAP.pack(op) for op in ops), len(ops)
    )
    return [MAP.unpack_from(done.payload, i * MAP.size) for i in range(len(ops))], done.fds


async def raw_unmap(hypercalls: HypercallClient, handles: list[int]) -> list[int]:
    done = await hypercalls.call(
        GNTTAB_OP,
        GnttabOp.unmap_grant_ref,
        b"".join(UNMAP.pack(UNMAP.record(handle=h)) for h in handles),
        len(handles),
    )
    return [UNMAP.unpack_from(done.payload, i * UNMAP.size).status for i in range(len(handles))]


def map_op(dom: int, ref: int, flags: int = GNTMAP_host_map):
    return MAP.record(flags=flags, ref=ref, dom=dom)


def frame_mappings(name: str) -> list[str]:
    """This process's mappings of the frame file named `name` (/proc/self/maps lines)."""
    with open("/proc/self/maps") as maps:
        return [line for line in maps if f"/memfd:{name} " in line or line.endswith(name + "\n")]


def close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)


# --- granting ------------------------------------------------------------------------


async def test_grant_access_writes_xen_entries_and_end_access_frees_the_ref(
    hv: Hypervisor, guest
) -> None:
    a = await guest()
    ref = a.grants.grant_access(7, a.page(0))
    ro = a.grants.grant_access(9, a.page(1), readonly=True)
    assert (ref, ro) == (8, 9)  # refs 0..7 are the toolstack's
    assert entry(hv, a.domid, ref) == (GTF_permit_access, 7, a.page(0))
    assert entry(hv, a.domid, ro) == (GTF_permit_access | GTF_readonly, 9, a.page(1))
    a.grants.end_access(ref)
    assert entry(hv, a.domid, ref).flags == 0
    assert a.grants.grant_access(7, a.page(2)) == ref  # freed refs are used again
    with pytest.raises(ValueError, match="not one this table granted"):
        a.grants.end_access(100)
    with pytest.raises(BadFrame, match="outside this domain's memory"):
        a.grants.grant_access(7, 256)


async def test_running_out_of_grant_refs_is_a_clear_error(guest) -> None:
    a = await guest()
    for _ in range(a.grants.nr_entries - 8):
        a.grants.grant_access(1, a.page(0))
    with pytest.raises(NoFreeGrantRefs, match="all 2040 grant references are in use"):
        a.grants.grant_access(1, a.page(0))


# --- mapping -------------------------------------------------------------------------


async def test_a_mapper_reads_and_writes_the_granted_pages(hv: Hypervisor, guest) -> None:
    a, b = await guest(), await guest()
    a.write(a.page(0), b"first page")
    a.write(a.page(5), b"second page")
    refs = [a.grants.grant_access(b.domid, a.page(0)), a.grants.grant_access(b.domid, a.page(5))]
    mapping = await b.grants.map(a.domid, refs)
    assert mapping.frames == (a.page(0), a.page(5))
    assert bytes(mapping.view[:10]) == b"first page"
    assert bytes(mapping.page(1)[:11]) == b"second page"
    mapping.page(1)[:7] = b"written"
    assert a.read(a.page(5), 11) == b"writtenpage"
    for ref in refs:
        assert entry(hv, a.domid, ref).flags == GTF_permit_access | GTF_reading | GTF_writing

    with pytest.raises(
        GrantInUse,
        match=f"grant ref {refs[0]} is still in use by d{b.domid} "
        r"\(GTF_reading\|GTF_writing set\)",
    ):
        a.grants.end_access(refs[0])
    assert entry(hv, a.domid, refs[0]).flags & GTF_permit_access  # nothing changed

    await b.grants.unmap(mapping)
    assert mapping.unmapped
    for ref in refs:
        assert entry(hv, a.domid, ref).flags == GTF_permit_access
        a.grants.end_access(ref)
        assert entry(hv, a.domid, ref).flags == 0


async def test_unmap_refuses_while_views_are_alive(guest) -> None:
    a, b = await guest(), await guest()
    mapping = await b.grants.map(a.domid, [a.grants.grant_access(b.domid, a.page(0))])
    view = mapping.view
    with pytest.raises(MemoryInUse):
        await b.grants.unmap(mapping)
    view.release()
    await b.grants.unmap(mapping)
    with pytest.raises(ValueError, match="is unmapped"):
        await b.grants.unmap(mapping)


async def test_a_read_only_grant_refuses_a_writable_map(hv: Hypervisor, guest) -> None:
    a, b = await guest(), await guest()
    a.write(a.page(0), b"read me")
    ref = a.grants.grant_access(b.domid, a.page(0), readonly=True)
    with pytest.raises(
        GrantStatusError,
        match=f"d{a.domid} ref {ref}: GNTST_general_error "
        r"\(undefined error\)",
    ):
        await b.grants.map(a.domid, [ref])
    assert entry(hv, a.domid, ref).flags == GTF_permit_access | GTF_readonly  # no trace
    mapping = await b.grants.map(a.domid, [ref], readonly=True)
    assert bytes(mapping.view[:7]) == b"read me"
    with pytest.raises(TypeError):
        mapping.view[0] = 0
    assert entry(hv, a.domid, ref).flags == GTF_permit_access | GTF_readonly | GTF_reading
    await b.grants.unmap(mapping)
    a.grants.end_access(ref)


async def test_dom0_s_grant_maps_follow_the_grant_rules_too(guest) -> None:
    """Dom0 is privileged, but a read-only grant maps read-only for it as well, so a
    back end that writes where it may not fails here as it would under Xen."""
    dom0, a = await guest(0), await guest()
    a.write(a.page(0), b"read me")
    ref = a.grants.grant_access(0, a.page(0), readonly=True)
    outs, fds = await raw_map(
        dom0.hypercalls, [map_op(a.domid, ref, GNTMAP_host_map | GNTMAP_readonly)]
    )
    assert outs[0].status == S.okay and os.fstat(fds[0]).st_size == XEN_PAGE_SIZE
    with pytest.raises(PermissionError):
        mmap.mmap(fds[0], XEN_PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    close_all(fds)
    assert await raw_unmap(dom0.hypercalls, [outs[0].handle]) == [S.okay]
    mapping = await dom0.grants.map(a.domid, [ref], readonly=True)
    with pytest.raises(TypeError):
        mapping.view[0] = 0
    await dom0.grants.unmap(mapping)
    a.grants.end_access(ref)


async def test_dom0_keeps_the_frames_it_maps_and_sees_the_file_a_granter_moves_to(
    hv: Hypervisor, guest, monkeypatch
) -> None:
    """Dom0 may map any guest's memory (privcmd), so its runtime keeps the files it is
    handed mapped, and mapping the same frame again costs no mmap. A frame whose
    grant to a guest ended moves to a fresh file, and Dom0's next map shows that
    one, never the copy of the past it kept."""
    dom0, a, b = await guest(0), await guest(), await guest()
    calls = []
    mmap_fixed = memory_module._mmap_fixed

    def recording(address: int, length: int, prot: int, fd: int, offset: int) -> None:
        calls.append(fd)
        mmap_fixed(address, length, prot, fd, offset)

    a.write(a.page(0), b"first")
    ref = a.grants.grant_access(0, a.page(0))
    monkeypatch.setattr(memory_module, "_mmap_fixed", recording)
    for round in range(3):
        mapping = await dom0.grants.map(a.domid, [ref])
        assert bytes(mapping.view[:5]) == b"first"
        await dom0.grants.unmap(mapping)
        if not round:
            first = len(calls)  # the hypervisor's view of the moved frame, and Dom0's map
    assert len(calls) == first
    a.grants.end_access(ref)

    to_b = a.grants.grant_access(b.domid, a.page(0))
    theirs = await b.grants.map(a.domid, [to_b])
    await b.grants.unmap(theirs)
    a.grants.end_access(to_b)  # the frame moves to a fresh file
    a.write(a.page(0), b"after")
    ref = a.grants.grant_access(0, a.page(0))
    mapping = await dom0.grants.map(a.domid, [ref])
    assert bytes(mapping.view[:5]) == b"after"
    mapping.view[:4] = b"dom0"
    await dom0.grants.unmap(mapping)
    assert a.read(a.page(0), 5) == b"dom0r"
    a.grants.end_access(ref)


async def test_a_guest_s_runtime_keeps_no_mapping_past_unmap_and_dom0_s_does(
    hv: Hypervisor, guest
) -> None:
    dom0, a, b = await guest(0), await guest(), await guest()
    name = f"xenlike-d{a.domid}-gfn-{a.page(0):#x}"  # the frame's files, old and new
    for mapper in (b, dom0):
        ref = a.grants.grant_access(mapper.domid, a.page(0))
        mapping = await mapper.grants.map(a.domid, [ref])
        mapped = len(frame_mappings(name))  # the granter's, the hypervisor's, the mapper's
        await mapper.grants.unmap(mapping)
        a.grants.end_access(ref)
        if mapper is b:
            assert len(frame_mappings(name)) == mapped - 1  # nothing reaches the page
        else:
            assert len(frame_mappings(name)) == mapped  # Dom0 keeps it
    dom0.grants.forget(a.domid)
    assert len(frame_mappings(name)) == mapped - 1


async def test_dom0_takes_scattered_frames_page_by_page(hv: Hypervisor, guest) -> None:
    dom0, a = await guest(0), await guest()
    for index, text in ((3, b"three"), (1, b"one")):
        a.write(a.page(index), text)
    refs = [a.grants.grant_access(0, a.page(i), readonly=True) for i in (3, 1)]
    mapping = await dom0.grants.map(a.domid, refs, readonly=True, side_by_side=False)
    assert not mapping.side_by_side
    with pytest.raises(ValueError, match="side by side"):
        mapping.view  # noqa: B018
    pages = mapping.pages()
    assert [bytes(page[:5]) for page in pages] == [b"three", b"one\0\0"]
    with pytest.raises(TypeError):
        pages[0][0] = 0
    with pytest.raises(MemoryInUse):
        await dom0.grants.unmap(mapping)
    for page in pages:
        page.release()
    await dom0.grants.unmap(mapping)
    side_by_side = await dom0.grants.map(a.domid, refs, readonly=True)  # mapped the plain way
    assert side_by_side.side_by_side
    assert bytes(side_by_side.view[XEN_PAGE_SIZE : XEN_PAGE_SIZE + 3]) == b"one"
    await dom0.grants.unmap(side_by_side)
    for ref in refs:
        a.grants.end_access(ref)


async def test_maps_xen_refuses(guest) -> None:
    a, b, c = await guest(), await guest(), await guest()
    to_c = a.grants.grant_access(c.domid, a.page(0))
    cases = {
        "never granted": (a.domid, 100, S.general_error),
        "granted to another domain": (a.domid, to_c, S.general_error),
        "reserved, never granted": (a.domid, 3, S.general_error),
        "past the table": (a.domid, 2048, S.bad_gntref),
        "far past the table": (a.domid, 0xFFFFFFFF, S.bad_gntref),
        "no such domain": (77, 8, S.bad_domain),
        "DOMID_SELF": (DOMID_SELF, 8, S.bad_domain),
    }
    for what, (dom, ref, status) in cases.items():
        with pytest.raises(GrantStatusError) as info:
            await b.grants.map(dom, [ref])
        assert info.value.statuses == [status], what
        assert f"GNTST_{status.name}" in str(info.value)
    outs, fds = await raw_map(b.hypercalls, [map_op(a.domid, to_c, flags=GNTMAP_readonly)])
    assert outs[0].status == S.bad_gntref and fds == ()  # GNTMAP_host_map is required


async def test_a_ref_mapped_twice_has_two_handles_and_stays_in_use_until_both_go(
    hv: Hypervisor, guest
) -> None:
    a, b = await guest(), await guest()
    ref = a.grants.grant_access(b.domid, a.page(0))
    first = await b.grants.map(a.domid, [ref])
    second = await b.grants.map(a.domid, [ref], readonly=True)
    assert first.handles != second.handles
    await b.grants.unmap(first)  # the last writer: GTF_writing goes, GTF_reading stays
    assert entry(hv, a.domid, ref).flags == GTF_permit_access | GTF_reading
    with pytest.raises(GrantInUse):
        a.grants.end_access(ref)
    await b.grants.unmap(second)
    a.grants.end_access(ref)


async def test_unmap_of_unknown_or_released_handles_is_bad_handle(guest) -> None:
    a, b = await guest(), await guest()
    ref = a.grants.grant_access(b.domid, a.page(0))
    outs, fds = await raw_map(b.hypercalls, [map_op(a.domid, ref)])
    close_all(fds)
    handle = outs[0].handle
    assert await raw_unmap(b.hypercalls, [12345, handle, handle]) == [
        S.bad_handle,
        S.okay,
        S.bad_handle,
    ]
    assert await raw_unmap(a.hypercalls, [handle]) == [S.bad_handle]  # handles are per mapper


async def test_a_batch_gets_a_status_per_element_and_failures_leave_no_trace(
    hv: Hypervisor, guest
) -> None:
    a, b = await guest(), await guest()
    a.write(a.page(0), b"page zero")
    a.write(a.page(1), b"page one")
    good = [a.grants.grant_access(b.domid, a.page(0)), a.grants.grant_access(b.domid, a.page(1))]
    ro = a.grants.grant_access(b.domid, a.page(2), readonly=True)
    ops = [
        map_op(a.domid, good[0]),
        map_op(a.domid, 100),
        map_op(a.domid, ro),
        map_op(a.domid, good[1]),
        map_op(a.domid, 4096),
        map_op(99, 8),
    ]
    outs, fds = await raw_map(b.hypercalls, ops)
    assert [out.status for out in outs] == [
        S.okay,
        S.general_error,
        S.general_error,
        S.okay,
        S.bad_gntref,
        S.bad_domain,
    ]
    assert len(fds) == 2  # each good element's page, in order
    region = hv.domains[a.domid].grant_table.region
    assert [outs[0].dev_bus_addr, outs[3].dev_bus_addr] == [
        machine_address(region, a.page(0)),
        machine_address(region, a.page(1)),
    ]
    assert entry(hv, a.domid, ro).flags == GTF_permit_access | GTF_readonly
    assert len(hv.domains[b.domid].maptrack.entries) == 2
    view = memoryview(mmap.mmap(fds[1], 4096))
    assert bytes(view[:8]) == b"page one"
    view.release()
    close_all(fds)
    assert await raw_unmap(b.hypercalls, [outs[0].handle, outs[3].handle]) == [S.okay, S.okay]
    for ref in good:
        a.grants.end_access(ref)


async def test_map_and_unmap_replies_are_xen_s_copy_back_of_each_element(guest) -> None:
    """The handlers pack their replies field by field: every field a caller sent comes
    back as it was, beside the status, handle and dev_bus_addr of the element, as
    the records would have them."""
    a, b = await guest(), await guest()
    ref = a.grants.grant_access(b.domid, a.page(0))
    ops = [
        MAP.record(host_addr=0x1234, flags=GNTMAP_host_map, ref=ref, dom=a.domid, handle=77),
        MAP.record(host_addr=0x5678, flags=GNTMAP_host_map, ref=100, dom=a.domid, handle=88),
    ]
    outs, fds = await raw_map(b.hypercalls, ops)
    close_all(fds)
    region = b.domain.maptrack.entries[outs[0].handle].table.region
    assert outs == [
        ops[0]._replace(
            status=S.okay,
            handle=outs[0].handle,
            dev_bus_addr=machine_address(region, a.page(0)),
        ),
        ops[1]._replace(status=S.general_error),
    ]
    unmaps = [
        UNMAP.record(host_addr=0x1234, handle=outs[0].handle),
        UNMAP.record(host_addr=0x9, dev_bus_addr=0, handle=0xDEAD),
    ]
    done = await b.hypercalls.call(
        GNTTAB_OP, GnttabOp.unmap_grant_ref, b"".join(UNMAP.pack(op) for op in unmaps), 2
    )
    back = [UNMAP.unpack_from(done.payload, i * UNMAP.size) for i in range(2)]
    assert back == [unmaps[0]._replace(status=S.okay), unmaps[1]._replace(status=S.bad_handle)]
    a.grants.end_access(ref)


async def test_each_mapped_page_comes_as_a_file_of_its_own(
    hv: Hypervisor, guest, connect: DomainConnector
) -> None:
    """One file per element, whatever the socket: the page, and nothing else of the granter."""
    a, b = await guest(), await guest()
    ref = a.grants.grant_access(b.domid, a.page(0))
    first, fds = await raw_map(b.hypercalls, [map_op(a.domid, ref), map_op(a.domid, ref)])
    assert len(fds) == 2 and all(os.fstat(fd).st_size == XEN_PAGE_SIZE for fd in fds)
    assert os.path.samestat(os.fstat(fds[0]), os.fstat(fds[1]))
    close_all(fds)
    other_socket = await connect(b.domain)
    again, fds = await raw_map(other_socket, [map_op(a.domid, ref)])
    assert len(fds) == 1
    close_all(fds)
    handles = [first[0].handle, first[1].handle, again[0].handle]
    assert len(set(handles)) == 3  # one maptrack per domain, whatever the socket
    assert await raw_unmap(b.hypercalls, handles) == [S.okay] * 3
    a.grants.end_access(ref)


async def test_a_reply_carries_at_most_max_fds_files_and_the_rest_is_eagain(
    hv: Hypervisor, guest
) -> None:
    a, b = await guest(), await guest()
    refs = [a.grants.grant_access(b.domid, a.page(i % 8)) for i in range(MAX_FDS + 1)]
    ops = [map_op(a.domid, ref) for ref in refs]
    outs, fds = await raw_map(b.hypercalls, ops)
    close_all(fds)
    assert len(fds) == MAX_FDS
    assert [out.status for out in outs] == [S.okay] * MAX_FDS + [S.eagain]
    assert entry(hv, a.domid, refs[-1]).flags == GTF_permit_access  # untouched
    again, fds = await raw_map(b.hypercalls, ops[-1:])  # trying again works
    close_all(fds)
    assert again[0].status == S.okay and len(fds) == 1
    handles = [out.handle for out in outs[:MAX_FDS]] + [again[0].handle]
    assert await raw_unmap(b.hypercalls, handles) == [S.okay] * len(handles)
    mapping = await b.grants.map(a.domid, refs)  # the runtime maps in chunks of MAX_FDS
    assert len(mapping.handles) == len(refs) and bytes(mapping.page(MAX_FDS)[:1]) == b"\0"
    await b.grants.unmap(mapping)


async def test_pins_and_handles_have_xen_s_limits(hv: Hypervisor, guest, monkeypatch) -> None:
    a, b, c = await guest(), await guest(), await guest()
    ref = a.grants.grant_access(b.domid, a.page(0))
    read_only = map_op(a.domid, ref, GNTMAP_host_map | GNTMAP_readonly)
    outs, fds = await raw_map(b.hypercalls, [read_only] * (PIN_LIMIT + 1))
    close_all(fds)
    assert [out.status for out in outs] == [S.okay] * PIN_LIMIT + [S.general_error]
    assert (
        await raw_unmap(b.hypercalls, [out.handle for out in outs[:PIN_LIMIT]])
        == [S.okay] * PIN_LIMIT
    )
    a.grants.end_access(ref)

    monkeypatch.setattr(hypervisor_grant_table, "MAPTRACK_LIMIT", 2)
    ref = a.grants.grant_access(c.domid, a.page(0))
    outs, fds = await raw_map(c.hypercalls, [map_op(a.domid, ref)] * 3)
    close_all(fds)
    assert [out.status for out in outs] == [S.okay, S.okay, S.no_device_space]
    assert await raw_unmap(c.hypercalls, [outs[0].handle, outs[1].handle]) == [S.okay, S.okay]
    a.grants.end_access(ref)


async def test_a_pinned_grant_keeps_its_frame_and_its_mapper(hv: Hypervisor, guest) -> None:
    """A granter that rewrites an entry while it is mapped changes nothing that is pinned."""
    a, b, c = await guest(), await guest(), await guest()
    a.write(a.page(0), b"granted")
    ref = a.grants.grant_access(b.domid, a.page(0))
    first = await b.grants.map(a.domid, [ref])
    a.write(
        a.domain.layout.grant_table_gfn, struct.pack("<HI", c.domid, a.page(1)), offset=ref * 8 + 2
    )
    with pytest.raises(GrantStatusError, match="GNTST_general_error"):
        await c.grants.map(a.domid, [ref])
    second = await b.grants.map(a.domid, [ref])
    assert second.frames == first.frames and bytes(second.view[:7]) == b"granted"
    await b.grants.unmap(first)
    await b.grants.unmap(second)


async def test_batches_beyond_the_limit_are_e2big(guest) -> None:
    b = await guest()
    with pytest.raises(HypercallError) as info:
        await raw_map(b.hypercalls, [map_op(0, 8)] * (MAX_BATCH + 1))
    assert info.value.errno == Errno.E2BIG


# --- copying --------------------------------------------------------------------------


async def test_grant_copy_both_ways_and_its_checks(hv: Hypervisor, guest) -> None:
    a, b = await guest(), await guest()
    a.write(a.page(0), b"from the granter", offset=100)
    writable = a.grants.grant_access(b.domid, a.page(0))
    readonly = a.grants.grant_access(b.domid, a.page(1), readonly=True)
    b.write(b.page(3), b"from the copier")

    await b.grants.copy(
        [
            GrantCopy(GrantRef(a.domid, writable, 100), LocalFrame(b.page(4), 10), 16),
            GrantCopy(LocalFrame(b.page(3)), GrantRef(a.domid, writable, 4000), 15),
        ]
    )
    assert b.read(b.page(4), 16, offset=10) == b"from the granter"
    assert a.read(a.page(0), 15, offset=4000) == b"from the copier"
    assert entry(hv, a.domid, writable).flags == GTF_permit_access  # pins end with the copy

    with pytest.raises(GrantStatusError) as info:
        await b.grants.copy(
            [
                GrantCopy(LocalFrame(b.page(3)), GrantRef(a.domid, writable, 4090), 7),
                GrantCopy(LocalFrame(b.page(3), 4095), LocalFrame(b.page(4)), 2),
                GrantCopy(LocalFrame(b.page(3)), GrantRef(a.domid, readonly), 4),
                GrantCopy(GrantRef(a.domid, readonly), LocalFrame(b.page(4)), 4),
                GrantCopy(GrantRef(a.domid, 2048), LocalFrame(b.page(4)), 4),
                GrantCopy(LocalFrame(10_000), LocalFrame(b.page(4)), 4),
                GrantCopy(GrantRef(88, writable), LocalFrame(b.page(4)), 4),
            ]
        )
    assert info.value.statuses == [
        S.bad_copy_arg,
        S.bad_copy_arg,
        S.general_error,
        S.okay,
        S.bad_gntref,
        S.bad_page,
        S.bad_domain,
    ]
    assert "copy 0 (7 bytes): GNTST_bad_copy_arg (copy arguments cross page boundary)" in str(
        info.value
    )
    assert entry(hv, a.domid, readonly).flags == GTF_permit_access | GTF_readonly


async def test_only_domid_self_may_copy_by_frame(guest) -> None:
    a, b = await guest(), await guest()
    op = COPY.record()
    op = op._replace(
        source=op.source._replace(u=a.page(0), domid=a.domid),
        dest=op.dest._replace(u=b.page(0), domid=DOMID_SELF),
        len=4,
    )
    done = await b.hypercalls.call(GNTTAB_OP, GnttabOp.copy, COPY.pack(op), 1)
    assert COPY.unpack(done.payload).status == S.permission_denied


# --- the table's frames ----------------------------------------------------------------


async def test_query_size_and_setup_table(hv: Hypervisor, guest) -> None:
    dom0, a, b = await guest(0), await guest(), await guest()
    assert await a.grants.query_size() == (4, 4)
    assert await a.grants.setup_table() == list(a.domain.layout.grant_table_gfns)
    assert await a.grants.setup_table(1) == [a.domain.layout.grant_table_gfn]
    with pytest.raises(GrantStatusError, match="GNTST_general_error"):
        await a.grants.setup_table(5)
    with pytest.raises(GrantStatusError, match="GNTST_permission_denied"):
        await a.grants.query_size(b.domid)
    with pytest.raises(GrantStatusError, match="GNTST_bad_domain"):
        await dom0.grants.query_size(55)
    assert await dom0.grants.query_size(b.domid) == (4, 4)
    assert await dom0.grants.setup_table(2, domid=b.domid) == list(
        b.domain.layout.grant_table_gfns[:2]
    )


# --- domains that go away -------------------------------------------------------------------


async def test_a_destroyed_mapper_releases_its_mappings(hv: Hypervisor, guest) -> None:
    a, b = await guest(), await guest()
    refs = [a.grants.grant_access(b.domid, a.page(i)) for i in range(3)]
    await b.grants.map(a.domid, refs)
    await b.grants.map(a.domid, refs[:1], readonly=True)
    hv.destroy(b.domain)
    for ref in refs:
        assert entry(hv, a.domid, ref).flags == GTF_permit_access
        a.grants.end_access(ref)


async def test_mappings_outlive_their_granter(hv: Hypervisor, guest) -> None:
    a, b = await guest(), await guest()
    a.write(a.page(0), b"still here")
    mapping = await b.grants.map(a.domid, [a.grants.grant_access(b.domid, a.page(0))])
    hv.destroy(a.domain)
    assert bytes(mapping.view[:10]) == b"still here"
    with pytest.raises(GrantStatusError, match="GNTST_bad_domain"):
        await b.grants.map(a.domid, [8])
    await b.grants.unmap(mapping)


async def test_a_reused_domid_inherits_nothing(hv: Hypervisor, guest) -> None:
    """Dom0 maps two domains that had the same id, one after the other; the old
    mapping never touches the new domain's grants."""
    dom0 = await guest(0)
    old = await guest()
    old.write(old.page(0), b"old domain")
    old_map = await dom0.grants.map(old.domid, [old.grants.grant_access(0, old.page(0))])
    hv.destroy(old.domain)

    new = await guest(old.domid)
    new.write(new.page(0), b"new domain")
    ref = new.grants.grant_access(0, new.page(0))
    assert ref == 8 and new.domain.grant_table.active == {}
    new_map = await dom0.grants.map(new.domid, [ref])
    assert bytes(new_map.view[:10]) == b"new domain"
    assert bytes(old_map.view[:10]) == b"old domain"
    await dom0.grants.unmap(old_map)
    assert entry(hv, new.domid, ref).flags == GTF_permit_access | GTF_reading | GTF_writing
    await dom0.grants.unmap(new_map)
    new.grants.end_access(ref)


async def test_a_dom0_tool_s_mappings_end_with_its_socket(hv: Hypervisor, guest) -> None:
    """As gntdev's mappings end when its file is closed."""
    a = await guest()
    ref = a.grants.grant_access(0, a.page(0))
    async with XenControl.connect(hv.run_dir) as tool:
        outs, fds = await raw_map(tool.hypercalls, [map_op(a.domid, ref)])
        close_all(fds)
        assert outs[0].status == S.okay
        assert entry(hv, a.domid, ref).flags & GTF_reading
    with trio.fail_after(5):
        while entry(hv, a.domid, ref).flags != GTF_permit_access:
            await trio.sleep(0.01)
    a.grants.end_access(ref)


# --- guests as processes ------------------------------------------------------------------------


@attrs.define(eq=False)
class Scripted:
    """A guest running a scripted kernel (tests.kernels.run_script), stepped by the test."""

    xc: XenControl
    domid: int
    doorbell: int  # the guest's step port's eventfd
    steps: int = 0

    async def step(self, action: str) -> str:
        """Run the guest's next action; return what it logged."""
        self.steps += 1
        os.eventfd_write(self.doorbell, 1)
        marker = f"(d{self.domid}) step {self.steps} {action}: "
        log = await wait_for_log(self.xc, marker)
        return log.split(marker, 1)[1].split("\n", 1)[0]


async def boot_scripted(xc: XenControl, domid: int, kernel: str, cmdline: str) -> Scripted:
    """Build and start `domid` with a step port that the test, as Dom0, rings."""
    await xc.set_max_mem(domid, 4096)
    port = await xc.alloc_unbound(domid, remote_dom=0)
    _, _, fds = await xc.hypercalls.call_struct(
        Hypercall.event_channel_op,
        EvtchnOp.bind_interdomain,
        evtchn_bind_interdomain,
        BIND.record(remote_dom=domid, remote_port=port),
    )
    os.close(fds[0])  # Dom0's own end: the test never waits on it
    await xc.build(domid, kernel, cmdline=f"{cmdline} step={port}")
    await xc.unpause(domid)
    return Scripted(xc, domid, fds[1])


@pytest.fixture
async def pair(xc: XenControl):
    """A granter guest and a mapper guest: `await pair(granter_args, mapper_script)`."""
    guests: list[Scripted] = []

    async def start(
        granter_args: str,
        granter_script: str,
        mapper_script: str,
        mapper_args: str = "",
        mapper_kernel: str = "mapper",
    ) -> tuple[Scripted, Scripted, list[int]]:
        granter_id, mapper_id = await xc.createdomain(), await xc.createdomain()
        granter = await boot_scripted(
            xc,
            granter_id,
            "tests.kernels:granter",
            f"peer={mapper_id} {granter_args} script={granter_script}",
        )
        log = await wait_for_log(xc, f"(d{granter_id}) granted refs=")
        refs = re.search(rf"\(d{granter_id}\) granted refs=([\d,]+)", log).group(1)
        mapper = await boot_scripted(
            xc,
            mapper_id,
            f"tests.kernels:{mapper_kernel}",
            f"peer={granter_id} refs={refs} {mapper_args} script={mapper_script}",
        )
        guests.extend((granter, mapper))
        return granter, mapper, [int(ref) for ref in refs.split(",")]

    yield start
    for scripted in guests:
        os.close(scripted.doorbell)


async def test_two_guests_share_pages(hv: Hypervisor, pair) -> None:
    granter, mapper, refs = await pair("pages=2", "end,end,read", "map,write,unmap")
    assert refs == [8, 9]
    assert await mapper.step("map") == f"d{granter.domid} page 0 | d{granter.domid} page 1"
    assert entry(hv, granter.domid, 8).flags == GTF_permit_access | GTF_reading | GTF_writing
    assert await mapper.step("write") == "ok"
    assert await granter.step("end") == "8 in use, 9 in use"
    assert await mapper.step("unmap") == "ok"
    assert await granter.step("end") == "8 ended, 9 ended"
    assert await granter.step("read") == f"written by d{mapper.domid} | written by d{mapper.domid}"


async def test_a_read_only_grant_between_guests(pair) -> None:
    granter, mapper, _ = await pair(
        "pages=1 readonly=1", "end", "map,map,write,unmap,unmap", mapper_args="readonly=1"
    )
    assert await mapper.step("map") == f"d{granter.domid} page 0"
    assert await mapper.step("map") == f"d{granter.domid} page 0"
    assert (await mapper.step("write")).startswith("TypeError")
    assert await mapper.step("unmap") == "ok"
    assert await granter.step("end") == "8 in use"  # the mapper still holds its second mapping


async def test_a_hostile_mapper_reaches_the_read_only_page_alone_and_only_while_granted(
    pair,
) -> None:
    """Containment: the file a read-only map hands over is that one page, read-only;
    once unmapped and ended, what the thief kept no longer follows the page."""
    granter, thief, refs = await pair(
        "pages=1 readonly=1",
        "read,end,rewrite,read",
        "steal,unmap,peek,scribble",
        mapper_args="readonly=1",
        mapper_kernel="grant_thief",
    )
    stolen = await thief.step("steal")
    assert stolen == (
        f"files=1 sizes=[4096] writable_map=EACCES pwrite=EBADF beyond=0 "
        f"page=d{granter.domid} page 0"
    ), stolen
    assert await granter.step("read") == f"d{granter.domid} page 0"  # the write never landed
    assert await thief.step("unmap") == "0"
    assert await granter.step("end") == f"{refs[0]} ended"
    assert await granter.step("rewrite") == "ok"
    assert await thief.step("peek") == f"d{granter.domid} page 0 / d{granter.domid} page 0"
    assert await thief.step("scribble") == "EBADF"
    assert await granter.step("read") == f"d{granter.domid} page 0 rewritten"


async def test_a_writable_grant_kept_past_its_end_reaches_a_copy_of_the_past(pair) -> None:
    granter, thief, refs = await pair(
        "pages=2", "end,rewrite,read", "steal,unmap,scribble,peek", mapper_kernel="grant_thief"
    )
    stolen = await thief.step("steal")
    assert stolen.startswith("files=2 sizes=[4096] writable_map=allowed pwrite=allowed beyond=0"), (
        stolen
    )
    assert await thief.step("unmap") == "0,0"
    assert await granter.step("end") == f"{refs[0]} ended, {refs[1]} ended"
    assert await granter.step("rewrite") == "ok"
    assert await thief.step("scribble") == "allowed | allowed"
    assert await granter.step("read") == (
        f"d{granter.domid} page 0 rewritten | d{granter.domid} page 1 rewritten"
    )
    assert "rewritten" not in await thief.step("peek")


async def test_a_guest_that_abuses_its_frame_channel_harms_only_itself(
    hv: Hypervisor, xc: XenControl
) -> None:
    """A file it truncates, one for its grant table, a malformed message, more files
    than allowed: each is refused (in the rate-limited log), the hypervisor never
    maps what could fault under it, and holds at most MAX_FRAME_FILES of its fds."""
    domid = await xc.create_domain("tests.kernels:frame_vandal", memory_mb=32)
    await xc.unpause(domid)
    log = await wait_for_log(xc, f"(d{domid}) vandal done")
    gfn = int(re.search(rf"\(d{domid}\) vandal done; gfn (0x[0-9a-f]+)", log).group(1), 16)
    frames = hv.domains[domid].frames
    with trio.fail_after(10):
        while len(frames.files) < MAX_FRAME_FILES:  # the rest of its sends, taken in
            await trio.sleep(0.02)
    assert len(frames.files) == MAX_FRAME_FILES
    assert gfn not in frames.files and hv.domains[domid].layout.grant_table_gfn not in frames.files
    assert f"(d{domid}) frame channel: refused a file for gfn {gfn:#x}" in log
    assert "printk: " in await xc.dmesg() or log.count("frame channel") <= 10
    assert domid in {info.domain for info in await xc.list_domains()}  # it runs on
    await xc.destroy(domid)


async def test_a_killed_mapper_s_mappings_are_released(
    hv: Hypervisor, xc: XenControl, pair
) -> None:
    granter, mapper, _ = await pair("pages=1", "end,end", "map,unmap")
    await mapper.step("map")
    assert await granter.step("end") == "8 in use"
    os.kill(hv.domains[mapper.domid].process.pid, signal.SIGKILL)
    assert await wait_for_shutdown(xc, mapper.domid) == ShutdownReason.crash
    assert entry(hv, granter.domid, 8).flags == GTF_permit_access
    assert await granter.step("end") == "8 ended"


def memfds_of(pid: int, domid: int) -> int:
    """How many fds process `pid` holds on domain `domid`'s memory or its frames' files."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        count += target.startswith((f"/memfd:xenlike-d{domid} ", f"/memfd:xenlike-d{domid}-"))
    return count


async def test_a_mapper_keeps_reading_after_its_granter_dies(
    hv: Hypervisor, xc: XenControl, pair
) -> None:
    granter, mapper, _ = await pair("pages=2", "read", "map,read,map,unmap")
    await mapper.step("map")
    pid = hv.domains[mapper.domid].process.pid
    assert memfds_of(pid, granter.domid) == 0  # its pages' files were closed once mapped
    await granter.step("read")  # its last action: the granter powers off
    assert await wait_for_shutdown(xc, granter.domid) == ShutdownReason.poweroff
    await xc.destroy(granter.domid)  # as the toolstack does
    assert await mapper.step("read") == f"d{granter.domid} page 0 | d{granter.domid} page 1"
    assert "GNTST_bad_domain" in await mapper.step("map")
    assert await mapper.step("unmap") == "ok"
