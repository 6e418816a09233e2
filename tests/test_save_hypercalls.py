"""The save's hypercalls refuse what they must: a guest reaching Dom0's side, a
context over the limit, Dom0 reading a domain that is not suspended or frames
out of range, and a resume of a domain that never suspended. A suspend's
SCHEDOP_shutdown returns 1 only when Dom0 resumes the domain."""

import trio

from tests.kernels import outcome, report
from tests.test_hypercall_hostile import errno_of, healthy, reported
from tests.test_hypervisor import wait_for_log, wait_for_shutdown
from xenlike.abi.errno import Errno
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import Hypercall
from xenlike.domain import Domain
from xenlike.hypervisor import Hypervisor
from xenlike.save_abi import (
    FRAMES_PER_CALL,
    MAX_CONTEXT,
    XENLIKE_DOMCTL_getcontext,
    XENLIKE_DOMCTL_map_memory,
    XENLIKE_DOMCTL_read_frames,
    XENLIKE_VCPUOP_save_context,
)
from xenlike.xc import XenControl


async def save_abuse(domain: Domain) -> None:
    """Dom0's save calls from a guest, and a context over the limit."""
    call = domain.hypercalls.call
    results = {
        "read_frames": await outcome(
            call(Hypercall.domctl, XENLIKE_DOMCTL_read_frames, bytes(12), 1)
        ),
        "getcontext": await outcome(call(Hypercall.domctl, XENLIKE_DOMCTL_getcontext, bytes(8), 1)),
        "map_memory": await outcome(call(Hypercall.domctl, XENLIKE_DOMCTL_map_memory, bytes(8), 1)),
        "oversize": await outcome(
            call(Hypercall.vcpu_op, XENLIKE_VCPUOP_save_context, bytes(MAX_CONTEXT + 1))
        ),
    }
    await report(domain, "save", results)
    await trio.sleep_forever()


async def suspender(domain: Domain) -> None:
    """Suspend with a context; say what the suspend returned once resumed."""
    result = await domain.suspend(b"context of a suspender")
    await domain.console_write(f"suspend returned {result}")
    await trio.sleep_forever()


async def boot(xc: XenControl, kernel: str) -> int:
    domid = await xc.create_domain(f"tests.test_save_hypercalls:{kernel}", memory_mb=4)
    await xc.unpause(domid)
    return domid


async def test_a_guest_cannot_use_the_saves_hypercalls(hv: Hypervisor, xc: XenControl) -> None:
    domid = await boot(xc, "save_abuse")
    results = reported(await wait_for_log(xc, ") save "), "save")
    assert results == {
        "read_frames": "EPERM",
        "getcontext": "EPERM",
        "map_memory": "EPERM",
        "oversize": "E2BIG",
    }
    # A running domain is not Dom0's to read, nor to resume.
    assert await errno_of(xc.read_frames(domid, 0, 1)) == Errno.EINVAL
    assert await errno_of(xc.map_memory(domid)) == Errno.EINVAL
    assert await errno_of(xc.vcpu_context(domid)) == Errno.EINVAL
    assert await errno_of(xc.resume(domid)) == Errno.EINVAL
    await xc.destroy(domid)
    await healthy(hv)


async def test_suspend_then_resume_returns_1_and_keeps_the_context(
    hv: Hypervisor, xc: XenControl
) -> None:
    domid = await boot(xc, "suspender")
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.suspend
    assert await xc.vcpu_context(domid) == b"context of a suspender"
    assert await xc.tsc_info(domid) > 0  # X86_TSC_INFO's elapsed_nsec
    frames = await xc.read_frames(domid, 0, FRAMES_PER_CALL * 2 + 1)  # calls split the range
    assert frames and all(len(page) == 4096 for page in frames.values())
    pages = (await xc.domain_info(domid)).tot_pages
    # Dom0's mapping of the whole memory agrees with the frames read through replies,
    # but for the granted frames, whose data is in files of their own.
    with await xc.map_memory(domid) as memory:
        assert memory.populated == sorted(frames) + [
            gfn for gfn in memory.populated if gfn > FRAMES_PER_CALL * 2
        ]
        for gfn in set(frames) - memory.moved:
            with memory.frames(gfn) as page:
                assert bytes(page) == frames[gfn]
    assert await errno_of(xc.read_frames(domid, pages * 4, 1)) == Errno.EINVAL
    await xc.resume(domid)
    await wait_for_log(xc, "suspend returned 1")
    assert await errno_of(xc.resume(domid)) == Errno.EINVAL  # it runs: nothing to resume
    await xc.destroy(domid)
    await healthy(hv)


async def test_a_restored_domains_time_goes_on_from_the_saved_elapsed_time(
    hv: Hypervisor, xc: XenControl
) -> None:
    domid = await xc.create_domain("tests.test_save_hypercalls:suspender", memory_mb=4)
    hour = 3600 * 10**9
    await xc.set_tsc_info(domid, hour)
    assert hour <= await xc.tsc_info(domid) < hour + 60 * 10**9
    await xc.unpause(domid)
    assert await errno_of(xc.set_tsc_info(domid, 0)) == Errno.EINVAL  # it has run
    await xc.destroy(domid)
    await healthy(hv)
