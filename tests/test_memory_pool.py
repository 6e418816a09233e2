"""The host's memory pool: what domains draw at build and through the balloon ops,
what they give back, and a page kept while Dom0 still maps it through a grant.

The domains here are built and spoken for by the test (`connect`, and
test_grant_table's `guest`), so every count is exact.
"""

from pathlib import Path

import pytest
import trio

from tests.conftest import DomainConnector
from tests.test_grant_table import Guest, guest  # noqa: F401  (the fixture)
from xenlike.abi.errno import Errno
from xenlike.domain import memory_op
from xenlike.hypercall import HypercallError
from xenlike.hypervisor import Hypervisor
from xenlike.memory import XEN_PAGE_SIZE
from xenlike.xc import XenControl

MIB = 1024 * 1024 // XEN_PAGE_SIZE  # pages


@pytest.fixture
async def hv(tmp_path: Path, nursery: trio.Nursery) -> Hypervisor:
    """conftest's, on a host with a 64 MiB pool."""
    hypervisor = Hypervisor(tmp_path / "run", host_memory_mb=64)
    await nursery.start(hypervisor.serve)
    return hypervisor


async def physinfo_pages(run_dir: Path) -> tuple[int, int]:
    async with XenControl.connect(run_dir) as xc:
        info = await xc.physinfo()
    return info.total_pages, info.free_pages


async def test_physinfo_reports_the_pool_and_builds_draw_from_it(hv: Hypervisor) -> None:
    assert await physinfo_pages(hv.run_dir) == (64 * MIB, 64 * MIB)
    async with XenControl.connect(hv.run_dir) as xc:
        first = await xc.create_domain("tests.kernels:sleeper", memory_mb=40)
        assert (await xc.physinfo()).free_pages == 24 * MIB
        with pytest.raises(HypercallError) as refused:
            await xc.create_domain("tests.kernels:sleeper", memory_mb=32)
        assert refused.value.errno == Errno.ENOMEM
        assert (await xc.physinfo()).free_pages == 24 * MIB  # the failed build took nothing
        await xc.destroy(first)
        assert (await xc.physinfo()).free_pages == 64 * MIB
        await xc.destroy(await xc.create_domain("tests.kernels:sleeper", memory_mb=64))


async def test_a_domain_boots_below_its_maximum_and_grows_from_the_pool(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    """maxmem: the memory is sized for max_pages, `nr_pages` are populated at build,
    and populate_physmap fills the rest only while the pool has pages."""
    domain = hv.create_domain()
    domain.max_pages = 48 * MIB
    hv.build_domain(domain, "tests.kernels:sleeper", nr_pages=16 * MIB)
    assert domain.nr_pages == 48 * MIB
    assert hv.free_pages() == 48 * MIB
    client = await connect(domain)
    assert await memory_op.current_reservation(client) == 16 * MIB
    assert await memory_op.maximum_reservation(client) == 48 * MIB
    other = hv.create_domain()
    other.max_pages = 40 * MIB
    hv.build_domain(other, "tests.kernels:sleeper")
    assert hv.free_pages() == 8 * MIB
    wanted = list(range(16 * MIB, 48 * MIB))
    assert await memory_op.populate_physmap(client, wanted) == 8 * MIB  # the pool ran dry
    assert hv.free_pages() == 0
    assert await memory_op.increase_reservation(client, 1) == []
    hv.destroy(other)
    assert await memory_op.populate_physmap(client, wanted[8 * MIB :]) == 24 * MIB
    assert await memory_op.current_reservation(client) == 48 * MIB
    assert hv.free_pages() == 16 * MIB
    assert await memory_op.decrease_reservation(client, wanted) == 32 * MIB
    assert hv.free_pages() == 48 * MIB


async def test_a_build_that_does_not_fit_says_how_much_is_free(hv: Hypervisor) -> None:
    domain = hv.create_domain()
    domain.max_pages = 65 * MIB
    with pytest.raises(HypercallError, match="the host has 64 MiB free, d1 needs 65 MiB"):
        hv.build_domain(domain, "tests.kernels:sleeper")
    assert domain.memory is None and hv.free_pages() == 64 * MIB


async def test_a_page_dom0_maps_is_kept_until_unmapped(hv: Hypervisor, guest) -> None:  # noqa: F811
    """Xen holds a reference for the mapping: the guest's tot_pages drops when it
    balloons the page out, Dom0 still reads (and writes) it, and the pool gets the
    page back only at the unmap."""
    dom0: Guest = await guest(0)
    a: Guest = await guest()
    gfn = a.page(3)
    a.write(gfn, b"granted to dom0")
    ref = a.grants.grant_access(0, gfn)
    mapping = await dom0.grants.map(a.domid, [ref])
    free = hv.free_pages()
    assert await memory_op.decrease_reservation(a.hypercalls, [gfn, a.page(4)]) == 2
    assert await memory_op.current_reservation(a.hypercalls) == 256 - 2
    assert hv.free_pages() == free + 1  # a.page(4) came back; the mapped one did not
    assert bytes(mapping.view[:15]) == b"granted to dom0"
    mapping.view[:5] = b"still"
    assert bytes(mapping.view[:15]) == b"stilled to dom0"
    with hv.domains[a.domid].memory.frame(gfn) as page:  # the page left the domain whole
        assert bytes(page[:15]) == bytes(15)
    await dom0.grants.unmap(mapping)
    assert hv.free_pages() == free + 2
    assert await memory_op.populate_physmap(a.hypercalls, [gfn]) == 1
    assert hv.free_pages() == free + 1
    with hv.domains[a.domid].memory.frame(gfn) as page:  # the hypervisor's view: zeros
        assert bytes(page[:15]) == bytes(15)


async def test_a_kept_page_outlives_its_domain_until_unmapped(hv: Hypervisor, guest) -> None:  # noqa: F811
    dom0: Guest = await guest(0)
    a: Guest = await guest()
    gfn = a.page(0)
    a.write(gfn, b"kept")
    mapping = await dom0.grants.map(a.domid, [a.grants.grant_access(0, gfn)])
    assert await memory_op.decrease_reservation(a.hypercalls, [gfn]) == 1
    hv.destroy(hv.domains[a.domid])
    free = hv.free_pages()
    assert bytes(mapping.view[:4]) == b"kept"
    await dom0.grants.unmap(mapping)
    assert hv.free_pages() == free + 1 and hv.kept_pages == []
