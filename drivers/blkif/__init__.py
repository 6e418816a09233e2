"""The PV block device (io/blkif.h): blkfront in the guest, blkback in Dom0.

- `protocol`: the ring spec (the request union by `operation`), segment lists.
- `front`: `BlkFront`, the vbd front end, and `Disk`, the guest program's async disk.
- `back`: `BlkBack`, which serves the ring from a Dom0 disk image.

Registered for device type `vbd` as the `xenlike.drivers` entry point
`vbd = "drivers.blkif:DRIVER"`.
"""

from drivers.blkif.back import BlkBack, BlockDevice, PersistentGrants
from drivers.blkif.front import BlkFront, BlockDeviceError, BufferPool, Disk, FrontParams
from drivers.blkif.protocol import BLKIF_RING, SECTOR_SIZE
from xenlike.xenbus import Driver

__all__ = [
    "BLKIF_RING",
    "DRIVER",
    "SECTOR_SIZE",
    "BlkBack",
    "BlkFront",
    "BlockDevice",
    "BlockDeviceError",
    "BufferPool",
    "Disk",
    "FrontParams",
    "PersistentGrants",
]

DRIVER = Driver("vbd", frontend=BlkFront, backend=BlkBack)
