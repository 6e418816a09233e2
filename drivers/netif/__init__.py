"""netif: the PV network device (io/netif.h), a vif in Xen's words.

`Netfront` is a guest's interface (raw Ethernet frames in and out);
`Netback` serves it in the driver domain as a port of a software bridge,
which that domain lends its back ends as `domain.hardware.net` (Dom0's is
in `domains.dom0.hw.net`). The XenStore keys are Linux netfront/netback's:
`tx-ring-ref`, `rx-ring-ref`, `event-channel`, `request-rx-copy`,
`feature-rx-notify`, `feature-sg`, `feature-ctrl-ring` with `ctrl-ring-ref`
and `event-channel-ctrl`, and the toolstack's `mac`, `handle`, `bridge`, `ip`.
"""

from drivers.netif.back import Bridge, BridgePort, Netback, Vif
from drivers.netif.front import Netfront
from xenlike.xenbus import Driver

__all__ = ["DRIVER", "Bridge", "BridgePort", "Netback", "Netfront", "Vif"]

DRIVER = Driver("vif", frontend=Netfront, backend=Netback)
