"""The guest program's `Disk` is apart from blkfront's XenBus calls.

A block `read(sector, count)` on the driver shadowed XenBus's `read(key)`, so
`read_int(key, otherend=False)` on a BlkFront would have read the disk.
"""

import pytest
import trio

from drivers.blkif import BlkFront, Disk
from xenlike.testing import FakeXenStore, LocalDomain
from xenlike.xenbus import DeviceInfo, XenbusContext

OWN, PEER = "device/vbd/51712", "backend/vbd/1/51712"


def blkfront(nursery: trio.Nursery, values: dict[str, str]) -> BlkFront:
    ctx = XenbusContext(LocalDomain(64), FakeXenStore(values), nursery)
    return BlkFront(ctx, DeviceInfo("vbd", 51712, OWN, PEER, 0))


async def test_the_drivers_xenstore_reads_stay_xenstore_reads(nursery: trio.Nursery) -> None:
    front = blkfront(nursery, {f"{OWN}/virtual-device": "51712", f"{PEER}/sectors": "2048"})
    assert await front.read("virtual-device") == "51712"
    assert await front.read_int("virtual-device", -1, otherend=False) == 51712
    assert await front.read_int("sectors", -1) == 2048
    assert await front.read_int("absent", 7, otherend=False) == 7


async def test_a_program_gets_a_disk_with_block_calls_only(nursery: trio.Nursery) -> None:
    front = blkfront(nursery, {})
    disk = front.for_program()
    assert isinstance(disk, Disk) and disk.front is front
    for xenbus_call in ("read_int", "read_otherend", "publish", "call"):
        assert not hasattr(disk, xenbus_call)
    front.sectors = 2048
    assert disk.sectors == 2048 and disk.sector_size == 512 and not disk.readonly
    with pytest.raises(ValueError, match="whole 512-byte sectors"):
        disk.buffer(100)
