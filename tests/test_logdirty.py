"""Log-dirty (XEN_DOMCTL_shadow_op) as pre-copy migration uses it.

Every writer of a domain's memory counts: the domain itself, a peer through a
grant map it keeps mapped (a persistent grant), and the hypervisor's grant
copies. CLEAN clears, PEEK does not, OFF stops, a guest gets EPERM, hostile
arguments get clear errors, and a destroyed domain's log-dirty state goes.
The first tests speak as built domains without processes (`guest`, from
test_grant_table) so each writer is exact; the later ones boot real guests.
"""

import re

import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.kernels import outcome, params, report
from tests.test_grant_table import Guest, entry, guest, pair  # noqa: F401 (fixtures)
from tests.test_hypercall_hostile import errno_of, healthy, reported
from tests.test_hypervisor import wait_for_log, wait_for_shutdown
from xenlike.abi.domctl import (
    XEN_DOMCTL_INTERFACE_VERSION,
    XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_GET_ALLOCATION,
    XEN_DOMCTL_SHADOW_OP_PEEK,
    DomctlOp,
    xen_domctl,
    xen_domctl_shadow_op,
)
from xenlike.abi.errno import Errno
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.domain import Domain, GrantCopy, GrantRef, LocalFrame
from xenlike.hypervisor import Hypervisor
from xenlike.hypervisor.logdirty import CHUNK_FRAMES, DirtyLog, bitmap_frames, dirty_log
from xenlike.memory import XEN_PAGE_SIZE
from xenlike.xc import XenControl

DOMCTL = compile_struct(xen_domctl, "xen_domctl")
SHADOW_OP = compile_struct(xen_domctl_shadow_op, "xen_domctl_shadow_op")


def frames(bitmap: bytes) -> set[int]:
    return set(bitmap_frames(bitmap))


# --- the sans-I/O part --------------------------------------------------------------


def test_bitmap_order_is_xens() -> None:
    assert bitmap_frames(bytes([0b1000_0001, 0, 0b10])) == [0, 7, 17]


@given(
    nr_pages=st.integers(1, 3 * CHUNK_FRAMES + 5),
    writes=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, XEN_PAGE_SIZE - 1))),
    pages=st.integers(0, 4 * CHUNK_FRAMES),
)
def test_a_scan_marks_exactly_the_frames_whose_content_changed(
    nr_pages: int, writes: list[tuple[int, int]], pages: int
) -> None:
    memory = bytearray(nr_pages * XEN_PAGE_SIZE)
    memory[5::4099] = b"\x07" * len(memory[5::4099])
    log = DirtyLog.start(memory)
    changed = set()
    for frame, offset in writes:
        pfn = frame % nr_pages
        at = pfn * XEN_PAGE_SIZE + offset
        memory[at] ^= 0xFF
        changed ^= {(pfn, offset)}  # the same byte flipped twice is back as it was
    log.scan(memory)
    dirty = {pfn for pfn, _ in changed}
    assert frames(log.bitmap(nr_pages)) == dirty
    assert log.dirty_count == len(dirty)
    bitmap = log.bitmap(pages)
    assert len(bitmap) == (min(pages, nr_pages) + 7) // 8
    assert frames(bitmap) == {pfn for pfn in dirty if pfn < pages}
    log.clean()
    assert log.dirty_count == 0 and log.fault_count == 0
    log.scan(memory)  # the reference took the new contents
    assert not frames(log.bitmap(nr_pages))
    log.close()


@given(st.data())
def test_a_frame_read_becomes_the_reference(data: st.DataObject) -> None:
    """What Dom0 read is what it has: a frame changed before the read is marked, and a
    frame written back after the read to what it was at the last look is marked too
    (the destination holds the read content, not the old one)."""
    memory = bytearray(4 * XEN_PAGE_SIZE)
    log = DirtyLog.start(memory)
    pfn = data.draw(st.integers(0, 3))
    at = pfn * XEN_PAGE_SIZE + data.draw(st.integers(0, XEN_PAGE_SIZE - 1))
    memory[at] = 1
    log.note_read(pfn, bytes(memory[pfn * XEN_PAGE_SIZE : (pfn + 1) * XEN_PAGE_SIZE]))
    assert frames(log.bitmap(4)) == {pfn}
    log.clean()
    memory[at] = 0  # back to what the enable saw
    log.scan(memory)
    assert frames(log.bitmap(4)) == {pfn}


# --- every writer, exactly ------------------------------------------------------------


async def test_every_writer_is_logged_and_clean_peek_off_behave(
    hv: Hypervisor,
    xc: XenControl,
    guest,  # noqa: F811
) -> None:
    a: Guest = await guest()
    b: Guest = await guest()
    own, mapped, copied = a.page(0), a.page(1), a.page(2)
    mapped_ref = a.grants.grant_access(b.domid, mapped)
    copied_ref = a.grants.grant_access(b.domid, copied)
    mapping = await b.grants.map(a.domid, [mapped_ref])  # kept mapped: a persistent grant
    b.write(b.page(0), b"the hypervisor copies this")
    await xc.logdirty_enable(a.domid)
    assert frames(await xc.logdirty_clean(a.domid)) == set()

    a.write(own, b"the guest itself")
    mapping.page(0)[:13] = b"through a map"
    await b.grants.copy([GrantCopy(LocalFrame(b.page(0)), GrantRef(a.domid, copied_ref, 8), 9)])
    bitmap = await xc.logdirty_peek(a.domid)
    assert len(bitmap) == a.domain.nr_pages // 8
    assert frames(bitmap) == {own, mapped, copied}
    assert frames(await xc.logdirty_peek(a.domid)) == {own, mapped, copied}  # PEEK keeps
    assert frames(await xc.logdirty_clean(a.domid)) == {own, mapped, copied}
    assert frames(await xc.logdirty_peek(a.domid)) == set()  # CLEAN cleared

    mapping.page(0)[100:101] = b"!"  # still mapped: written at any time, still seen
    assert frames(await xc.logdirty_clean(a.domid)) == {mapped}
    await b.grants.unmap(mapping)

    await xc.logdirty_off(a.domid)
    assert dirty_log(a.domain) is None
    assert await errno_of(xc.logdirty_peek(a.domid)) == Errno.EINVAL
    await xc.logdirty_off(a.domid)  # off twice is off
    assert "(d%d) log-dirty off" % a.domid in "\n".join(hv.log_lines)
    await healthy(hv)


async def test_stats_and_a_smaller_bitmap_are_as_xen_returns_them(
    hv: Hypervisor,
    xc: XenControl,
    guest,  # noqa: F811
) -> None:
    a: Guest = await guest()
    await xc.logdirty_enable(a.domid)
    for index in range(3):
        a.write(a.page(index), b"x")
    answer, bitmap = await xc.shadow_op(a.domid, XEN_DOMCTL_SHADOW_OP_PEEK, pages=a.page(2))
    assert answer.pages == a.page(2)  # the bitmap covers what was asked
    assert frames(bitmap) == {a.page(0), a.page(1)}
    assert (answer.stats.dirty_count, answer.stats.fault_count) == (3, 3)
    answer, bitmap = await xc.shadow_op(
        a.domid, XEN_DOMCTL_SHADOW_OP_CLEAN, mode=XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL
    )
    assert answer.pages == a.domain.nr_pages  # at most the domain's
    assert answer.stats.dirty_count == 3
    answer, _ = await xc.shadow_op(a.domid, XEN_DOMCTL_SHADOW_OP_PEEK)
    assert (answer.stats.dirty_count, answer.stats.fault_count) == (0, 0)
    await xc.logdirty_off(a.domid)
    # The newer spelling of enable: OP_ENABLE with the LOG_DIRTY mode flag.
    await xc.shadow_op(a.domid, XEN_DOMCTL_SHADOW_OP_ENABLE, mode=1 << 2)
    assert dirty_log(a.domain) is not None


async def test_hostile_arguments_get_clear_errors(
    hv: Hypervisor,
    xc: XenControl,
    guest,  # noqa: F811
) -> None:
    a: Guest = await guest()
    unbuilt = hv.create_domain()
    assert await errno_of(xc.logdirty_enable(4000)) == Errno.ESRCH
    assert await errno_of(xc.logdirty_enable(0)) == Errno.EINVAL  # not the control domain
    assert await errno_of(xc.logdirty_enable(unbuilt.domid)) == Errno.EINVAL
    assert await errno_of(xc.logdirty_peek(a.domid)) == Errno.EINVAL  # not enabled
    await xc.logdirty_enable(a.domid)
    assert await errno_of(xc.logdirty_enable(a.domid)) == Errno.EINVAL  # on already
    for op, mode in (
        (99, 0),
        (XEN_DOMCTL_SHADOW_OP_GET_ALLOCATION, 0),
        (XEN_DOMCTL_SHADOW_OP_ENABLE, 1 << 3),
        (XEN_DOMCTL_SHADOW_OP_CLEAN, 1 << 5),
    ):
        assert await errno_of(xc.shadow_op(a.domid, op, mode=mode)) == Errno.EINVAL
    answer, bitmap = await xc.shadow_op(a.domid, XEN_DOMCTL_SHADOW_OP_PEEK, pages=0)
    assert (answer.pages, bitmap) == (0, b"")
    # A short union and a wrong interface version, straight on the socket.
    request = SHADOW_OP.record(op=XEN_DOMCTL_SHADOW_OP_PEEK, dirty_bitmap=1, pages=8)
    arg = DOMCTL.record(
        cmd=DomctlOp.shadow_op,
        interface_version=XEN_DOMCTL_INTERFACE_VERSION - 1,
        domain=a.domid,
        u=SHADOW_OP.pack(request).ljust(128, b"\0"),
    )
    call = xc.hypercalls.call
    packed = DOMCTL.pack(arg)
    assert await errno_of(call(Hypercall.domctl, DomctlOp.shadow_op, packed, 1)) == Errno.EACCES
    assert await errno_of(call(Hypercall.domctl, DomctlOp.shadow_op, packed[:40], 1)) == (
        Errno.EINVAL
    )
    await healthy(hv)


# --- real guests ------------------------------------------------------------------------


async def shadow_abuse(domain: Domain) -> None:
    """A guest asking for log-dirty of itself and of Dom0."""
    results = {}
    for target in (domain.domid, 0):
        arg = DOMCTL.record(
            cmd=DomctlOp.shadow_op,
            interface_version=XEN_DOMCTL_INTERFACE_VERSION,
            domain=target,
            u=SHADOW_OP.pack(SHADOW_OP.record(op=XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)).ljust(
                128, b"\0"
            ),
        )
        results[f"d{target}"] = await outcome(
            domain.hypercalls.call(Hypercall.domctl, DomctlOp.shadow_op, DOMCTL.pack(arg), 1)
        )
    await report(domain, "shadow", results)
    await trio.sleep_forever()


async def page_writer(domain: Domain) -> None:
    """Suspends; each time Dom0 resumes it, writes round N into frames `pfns`, says
    so, and suspends again: a writer whose every write the test knows."""
    pfns = [int(pfn) for pfn in params(domain)["pfns"].split(",")]
    written = 0
    while True:
        await domain.suspend(b"")
        written += 1
        for pfn in pfns:
            with domain.memory.frame(pfn) as page:
                page[:8] = written.to_bytes(8, "little")
        await domain.console_write(f"wrote round {written}")


async def test_a_guest_gets_eperm(hv: Hypervisor, xc: XenControl) -> None:
    domid = await xc.create_domain("tests.test_logdirty:shadow_abuse", memory_mb=4)
    await xc.unpause(domid)
    results = reported(await wait_for_log(xc, ") shadow "), "shadow")
    assert results == {f"d{domid}": "EPERM", "d0": "EPERM"}
    await healthy(hv)


async def test_a_guest_writing_its_own_frames_is_logged_exactly(
    hv: Hypervisor, xc: XenControl
) -> None:
    pfns = [700, 701, 1000]
    domid = await xc.create_domain(
        "tests.test_logdirty:page_writer", memory_mb=4, cmdline=f"pfns={','.join(map(str, pfns))}"
    )
    await xc.unpause(domid)
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.suspend
    await xc.logdirty_enable(domid)
    assert frames(await xc.logdirty_clean(domid)) == set()
    for written in (1, 2):
        await xc.resume(domid)
        await wait_for_log(xc, f"(d{domid}) wrote round {written}")
        assert await wait_for_shutdown(xc, domid) == ShutdownReason.suspend
        assert frames(await xc.logdirty_peek(domid)) == set(pfns)
        assert frames(await xc.logdirty_clean(domid)) == set(pfns)
        assert frames(await xc.logdirty_peek(domid)) == set()
    await healthy(hv)


async def test_read_frames_of_a_live_domain_only_under_log_dirty(
    hv: Hypervisor, xc: XenControl
) -> None:
    """What xc_map_foreign_bulk of a live domain is to pre-copy; bounds still checked."""
    domid = await xc.create_domain("tests.kernels:sleeper", memory_mb=4)
    await xc.unpause(domid)
    await wait_for_log(xc, f"(d{domid}) sleeping")  # it sleeps on, running
    domain = hv.domains[domid]
    assert await errno_of(xc.read_frames(domid, 0, 1)) == Errno.EINVAL
    await xc.logdirty_enable(domid)
    read = await xc.read_frames(domid, 0, 1024)
    with domain.memory.frame(domain.layout.start_info_gfn) as page:
        assert read[domain.layout.start_info_gfn] == bytes(page)
    assert await errno_of(xc.read_frames(domid, 1024, 1)) == Errno.EINVAL
    assert await errno_of(xc.read_frames(domid, 1000, 100)) == Errno.EINVAL
    await xc.logdirty_off(domid)
    assert await errno_of(xc.read_frames(domid, 0, 1)) == Errno.EINVAL
    await healthy(hv)


async def test_a_destroyed_domains_log_dirty_is_freed(hv: Hypervisor, xc: XenControl) -> None:
    domid = await xc.create_domain("tests.kernels:sleeper", memory_mb=4)
    await xc.unpause(domid)
    await wait_for_log(xc, f"(d{domid}) sleeping")
    await xc.logdirty_enable(domid)
    domain = hv.domains[domid]
    log = dirty_log(domain)
    assert log is not None
    await xc.destroy(domid)
    assert dirty_log(domain) is None and log.reference.closed
    assert re.search(rf"\(d{domid}\) log-dirty off: \d+ KiB", "\n".join(hv.log_lines))
    await healthy(hv)


async def test_a_mapper_process_writing_through_a_kept_map_is_logged(
    hv: Hypervisor,
    xc: XenControl,
    pair,  # noqa: F811
) -> None:
    """Two real guests: a back end's persistent grant is written at any time."""
    granter, mapper, refs = await pair("pages=2", "rewrite,read", "map,write,write,unmap")
    gfns = {int(entry(hv, granter.domid, ref).frame) for ref in refs}
    assert await mapper.step("map")
    await xc.logdirty_enable(granter.domid)
    assert await mapper.step("write") == "ok"
    assert frames(await xc.logdirty_clean(granter.domid)) == gfns
    assert await granter.step("rewrite") == "ok"  # the guest's own process
    assert frames(await xc.logdirty_clean(granter.domid)) == gfns
    assert await mapper.step("write") == "ok"
    assert frames(await xc.logdirty_clean(granter.domid)) == gfns
    assert await mapper.step("unmap") == "ok"
    await healthy(hv)
