"""Dom0's emulated hardware: what only Dom0 opens, and its back ends drive.

- `disk`: raw image files as sector devices, created sparse at boot from
  the topology's `[dom0] images`; blkback reads and writes them straight
  into the guests' granted pages.
- `net`, `bridge`, `nic`: the software bridges (xenbr0) netback plugs vifs
  into, and the NIC on xenbr0 (a TAP device, a pcap recorder, or none).
- `tunnel`: the NIC that joins xenbr0 to other hosts' through the kernel's
  VXLAN (a TAP device in a Linux bridge with a VXLAN device, via iproute2).
"""

from domains.dom0.hw.bridge import Bridge
from domains.dom0.hw.disk import SECTOR_SIZE, Disk, create_image, create_images
from domains.dom0.hw.net import Network

__all__ = ["SECTOR_SIZE", "Bridge", "Disk", "Network", "create_image", "create_images"]
