"""memory_op: the reservation a balloon driver moves, with Xen's results.

Most tests speak to the hypervisor as a built domain through `connect` (a
hypercall socket with no process behind it); the last boots a guest that
balloons itself and checks what Dom0 sees.
"""

import os
import struct

import pytest
import trio

from tests.conftest import DomainConnector
from tests.test_hypervisor import wait_for_log
from xenlike.abi.errno import Errno
from xenlike.abi.memory import (
    XENMEMF_exact_node_request,
    XENMEMF_node,
    XENMEMF_populate_on_demand,
    XenMemOp,
)
from xenlike.abi.xen import DOMID_SELF, Hypercall
from xenlike.domain import memory_op
from xenlike.domain.hypercall import HypercallClient
from xenlike.hypercall import HypercallError
from xenlike.hypervisor import Hypervisor, HypervisorDomain
from xenlike.hypervisor.memory_op import EXTENT_LIST, RESERVATION
from xenlike.memory import XEN_PAGE_SIZE
from xenlike.xc import XenControl

PAGES = 1024  # 4 MiB


def built(hv: Hypervisor, pages: int = PAGES) -> HypervisorDomain:
    """A domain with memory and boot frames, never unpaused."""
    domain = hv.create_domain()
    domain.max_pages = pages
    hv.build_domain(domain, "tests.kernels:sleeper")
    return domain


def blocks(domain: HypervisorDomain) -> int:
    """512-byte blocks the domain's memfd holds (what the host really spends)."""
    assert domain.memory is not None
    return os.fstat(domain.memory.fd).st_blocks


def fill(domain: HypervisorDomain, gfns: list[int]) -> None:
    assert domain.memory is not None
    for gfn in gfns:
        with domain.memory.frame(gfn) as page:
            page[:] = b"\xa5" * XEN_PAGE_SIZE


def is_zero(domain: HypervisorDomain, gfn: int) -> bool:
    assert domain.memory is not None
    with domain.memory.frame(gfn) as page:
        return page == bytes(XEN_PAGE_SIZE)


async def raw(
    client: HypercallClient,
    cmd: XenMemOp,
    frames: list[int],
    *,
    extent_start: int = EXTENT_LIST,
    order: int = 0,
    flags: int = 0,
    domid: int = DOMID_SELF,
    nr_extents: int | None = None,
) -> int:
    """One reservation op with every field and the array under the test's control."""
    head = RESERVATION.record(
        extent_start=extent_start,
        nr_extents=len(frames) if nr_extents is None else nr_extents,
        extent_order=order,
        mem_flags=flags,
        domid=domid,
    )
    return await raw_bytes(
        client, cmd, RESERVATION.pack(head) + struct.pack(f"<{len(frames)}Q", *frames)
    )


async def raw_bytes(client: HypercallClient, cmd: XenMemOp, payload: bytes) -> int:
    return (await client.call(Hypercall.memory_op, cmd, payload)).result


async def test_a_built_domain_holds_every_frame(
    hv: Hypervisor, xc: XenControl, connect: DomainConnector
) -> None:
    domain = built(hv)
    guest = await connect(domain)
    assert await memory_op.current_reservation(guest) == PAGES
    assert await memory_op.maximum_reservation(guest) == PAGES
    assert await memory_op.current_reservation(guest, domain.domid) == PAGES
    assert (await xc.domain_info(domain.domid)).tot_pages == PAGES


async def test_decrease_hands_memory_back_to_the_host(
    hv: Hypervisor, xc: XenControl, connect: DomainConnector
) -> None:
    domain = built(hv)
    guest = await connect(domain)
    frames = list(range(100, 356))
    fill(domain, frames)
    before = blocks(domain)
    assert await memory_op.decrease_reservation(guest, frames) == 256
    assert before - blocks(domain) == 256 * XEN_PAGE_SIZE // 512
    assert await memory_op.current_reservation(guest) == PAGES - 256
    assert (await xc.domain_info(domain.domid)).tot_pages == PAGES - 256
    assert await memory_op.current_reservation(xc.hypercalls, domain.domid) == PAGES - 256
    assert all(is_zero(domain, gfn) for gfn in frames)


async def test_decrease_stops_at_the_first_frame_the_domain_does_not_hold(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    domain = built(hv)
    assert domain.layout is not None
    guest = await connect(domain)
    assert await memory_op.decrease_reservation(guest, [500]) == 1
    for bad in (500, PAGES, 2**40, domain.layout.shared_info_gfn, domain.layout.grant_table_gfn):
        assert await memory_op.decrease_reservation(guest, [600, 601, bad, 602]) == 2
        assert await memory_op.populate_physmap(guest, [600, 601]) == 2
    assert await memory_op.current_reservation(guest) == PAGES - 1


async def test_an_extent_cut_short_keeps_the_pages_before_the_gap(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    """Xen removes an extent page by page and counts only whole extents."""
    domain = built(hv)
    guest = await connect(domain)
    assert await memory_op.decrease_reservation(guest, [203]) == 1
    assert await memory_op.decrease_reservation(guest, [196, 200], order=2) == 1
    assert await memory_op.current_reservation(guest) == PAGES - 1 - 4 - 3
    assert await memory_op.populate_physmap(guest, [196], order=2) == 1
    assert await memory_op.populate_physmap(guest, [200], order=2) == 1


async def test_populate_brings_frames_back_zeroed_and_only_once(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    domain = built(hv)
    guest = await connect(domain)
    fill(domain, [300, 301, 302])
    assert await memory_op.decrease_reservation(guest, [300, 301, 302]) == 3
    fill(domain, [301])  # a guest bug: writing a frame it gave back; the next owner must not see it
    assert await memory_op.populate_physmap(guest, [300, 301, PAGES, 302]) == 2
    assert is_zero(domain, 300) and is_zero(domain, 301)
    assert await memory_op.populate_physmap(guest, [300]) == 0  # already populated
    assert await memory_op.current_reservation(guest) == PAGES - 1


async def test_increase_chooses_the_lowest_free_frames_up_to_the_limit(
    hv: Hypervisor, xc: XenControl, connect: DomainConnector
) -> None:
    domain = built(hv)
    guest = await connect(domain)
    assert await memory_op.increase_reservation(guest, 1) == []  # all populated
    assert await memory_op.decrease_reservation(guest, [700, 400, 401, 402, 403, 900]) == 6
    assert await memory_op.increase_reservation(guest, 1, order=2) == [400]
    assert await memory_op.increase_reservation(guest, 5) == [700, 900]
    await xc.set_max_mem(domain.domid, (PAGES - 8) * 4)  # Xen lets the toolstack ratchet down
    assert await memory_op.decrease_reservation(guest, list(range(10, 20))) == 10
    assert await memory_op.increase_reservation(guest, 3) == [10, 11]  # up to max_pages
    assert await memory_op.current_reservation(guest) == PAGES - 8
    assert await memory_op.maximum_reservation(guest) == PAGES - 8
    assert await raw(guest, XenMemOp.increase_reservation, [], extent_start=0, nr_extents=4) == 0


async def test_increase_with_a_null_handle_reports_only_the_count(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    domain = built(hv)
    guest = await connect(domain)
    assert await memory_op.decrease_reservation(guest, [40, 41, 42]) == 3
    assert await raw(guest, XenMemOp.increase_reservation, [], extent_start=0, nr_extents=2) == 2
    assert await memory_op.current_reservation(guest) == PAGES - 1


async def test_lists_of_more_than_a_page_go_in_batches(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    domain = built(hv, pages=4096)
    guest = await connect(domain)
    frames = list(range(1000, 2200))  # 1200 frames: three hypercalls of at most 512
    assert await memory_op.decrease_reservation(guest, frames) == 1200
    assert await memory_op.increase_reservation(guest, 1300) == frames
    assert await memory_op.current_reservation(guest) == 4096


@pytest.mark.parametrize(
    "case",
    [
        "garbage_handle",
        "short_array",
        "long_array",
        "no_array",
        "order_10",
        "huge_order",
        "pod",
        "address_bits_12",
        "exact_node_1",
        "short_struct",
        "huge_nr_extents",
    ],
)
async def test_bad_arguments_do_nothing_and_return_zero(
    hv: Hypervisor, connect: DomainConnector, case: str
) -> None:
    """Xen returns `start_extent` (0) for these, never -errno."""
    domain = built(hv)
    guest = await connect(domain)
    decrease = XenMemOp.decrease_reservation
    calls = {
        "garbage_handle": lambda: raw(guest, decrease, [100], extent_start=0xDEAD0000),
        "short_array": lambda: raw(guest, decrease, [100], nr_extents=2),
        "long_array": lambda: raw(guest, decrease, [100, 101], nr_extents=1),
        "no_array": lambda: raw(guest, decrease, [], extent_start=0, nr_extents=1),
        "order_10": lambda: raw(guest, decrease, [0], order=10),  # DomU's memop-max-order is 9
        "huge_order": lambda: raw(guest, decrease, [100], order=2**32 - 1),
        "pod": lambda: raw(
            guest, XenMemOp.populate_physmap, [100], flags=XENMEMF_populate_on_demand
        ),
        "address_bits_12": lambda: raw(guest, decrease, [100], flags=12),
        "exact_node_1": lambda: raw(
            guest, decrease, [100], flags=XENMEMF_node(1) | XENMEMF_exact_node_request
        ),
        "short_struct": lambda: raw_bytes(guest, decrease, bytes(31)),
        "huge_nr_extents": lambda: raw(
            guest, XenMemOp.increase_reservation, [], extent_start=0, nr_extents=2**63
        ),
    }
    assert await calls[case]() == 0
    assert await memory_op.current_reservation(guest) == PAGES


async def test_node_requests_the_host_can_meet_are_accepted(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    guest = await connect(built(hv))
    decrease = XenMemOp.decrease_reservation
    assert (
        await raw(guest, decrease, [100], flags=XENMEMF_node(0) | XENMEMF_exact_node_request) == 1
    )
    assert await raw(guest, decrease, [101], flags=XENMEMF_node(3) | 32) == 1  # a preference


async def test_only_dom0_acts_on_another_domain(
    hv: Hypervisor, xc: XenControl, connect: DomainConnector
) -> None:
    victim, other = built(hv), built(hv)
    guest = await connect(other)
    # Reservation ops refuse by doing nothing; the stat ops say EPERM, after ESRCH.
    assert await memory_op.decrease_reservation(guest, [100], domid=victim.domid) == 0
    assert await memory_op.populate_physmap(guest, [100], domid=victim.domid) == 0
    assert await memory_op.increase_reservation(guest, 1, domid=victim.domid) == []
    for stat in (memory_op.current_reservation, memory_op.maximum_reservation):
        with pytest.raises(HypercallError) as refused:
            await stat(guest, victim.domid)
        assert refused.value.errno == Errno.EPERM
        with pytest.raises(HypercallError) as missing:
            await stat(guest, 4321)
        assert missing.value.errno == Errno.ESRCH
    assert await memory_op.decrease_reservation(guest, [100], domid=other.domid) == 1  # itself
    assert await memory_op.decrease_reservation(guest, [100], domid=4321) == 0
    # Dom0 balloons a guest from outside, as a toolstack may, with its larger max order.
    assert (
        await memory_op.decrease_reservation(xc.hypercalls, [512], order=9, domid=victim.domid) == 1
    )
    assert await memory_op.current_reservation(xc.hypercalls, victim.domid) == PAGES - 512


async def test_a_domain_without_memory_has_nothing_to_move(
    hv: Hypervisor, xc: XenControl, connect: DomainConnector
) -> None:
    unbuilt = hv.create_domain()
    guest = await connect(unbuilt)
    assert await memory_op.decrease_reservation(guest, [100]) == 0
    assert await memory_op.current_reservation(guest) == 0
    domain = built(hv)
    assert await memory_op.decrease_reservation(xc.hypercalls, [100], domid=domain.domid) == 1
    hv.teardown(domain)  # its memory is gone; the count stays for getdomaininfo
    assert await memory_op.populate_physmap(xc.hypercalls, [100], domid=domain.domid) == 0
    assert await memory_op.current_reservation(xc.hypercalls, domain.domid) == PAGES - 1


async def test_a_guest_balloons_itself(hv: Hypervisor, xc: XenControl) -> None:
    domid = await xc.create_domain("tests.kernels:balloon", memory_mb=4, cmdline="out=64 hold=16")
    await xc.unpause(domid)
    log = await wait_for_log(xc, "balloon ")
    line = log[log.index("balloon ") :].split("\n", 1)[0]
    result = dict(word.split("=", 1) for word in line.split()[1:])
    pages_out = 64 * XEN_PAGE_SIZE // 512
    assert result == {
        "tot": str(PAGES),
        "max": str(PAGES),
        "blocks": result["blocks"],
        "out": "64",
        "tot_out": str(PAGES - 64),
        "blocks_out": str(int(result["blocks"]) - pages_out),
        "in": "32",
        "again": "0",
        "increased": "32",
        "increased_match": "True",
        "tot_in": str(PAGES),
        "zeroed": "True",
        "held": "16",
        "tot_held": str(PAGES - 16),
    }
    assert (await xc.domain_info(domid)).tot_pages == PAGES - 16
    # The zero check touched all 64 frames again (shmem backs a page on its first touch,
    # a read too), then 16 went out for good.
    assert blocks(hv.domains[domid]) == int(result["blocks_out"]) + 48 * XEN_PAGE_SIZE // 512
    with trio.fail_after(5):
        await xc.destroy(domid)
