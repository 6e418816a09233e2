"""xenlike: a Xen-style paravirtualization framework in Python.

Domains are processes under a hypervisor process; they talk through
shared-memory rings in granted pages, event channels and the XenStore, with
Xen's own layouts, numbers and names.

The names a driver author or a tool needs are here; they load on first use,
so that a domain process importing one corner of xenlike pays for no other.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ loads, spelled out for type checkers (kept equal by a test)
    __version__: str
    from xenlike.domain import Domain as Domain
    from xenlike.hypervisor import Hypervisor as Hypervisor
    from xenlike.ring import BackRing as BackRing
    from xenlike.ring import FrontRing as FrontRing
    from xenlike.ring import RingFull as RingFull
    from xenlike.ring import RingOverflow as RingOverflow
    from xenlike.ring import RingSpec as RingSpec
    from xenlike.ring import define_ring as define_ring
    from xenlike.topology import Topology as Topology
    from xenlike.topology import TopologyError as TopologyError
    from xenlike.topology import load_topology as load_topology
    from xenlike.xc import XenControl as XenControl
    from xenlike.xenbus import BackChannel as BackChannel
    from xenlike.xenbus import Backend as Backend
    from xenlike.xenbus import Driver as Driver
    from xenlike.xenbus import FrontChannel as FrontChannel
    from xenlike.xenbus import Frontend as Frontend
    from xenlike.xenbus import SharedRing as SharedRing
    from xenlike.xenstore import XenStoreError as XenStoreError
    from xenlike.xenstore import open_client as open_client

_EXPORTS = {
    # rings: the data path
    "define_ring": "xenlike.ring",
    "RingSpec": "xenlike.ring",
    "FrontRing": "xenlike.ring",
    "BackRing": "xenlike.ring",
    "RingFull": "xenlike.ring",
    "RingOverflow": "xenlike.ring",
    # XenBus: the driver framework
    "Frontend": "xenlike.xenbus",
    "Backend": "xenlike.xenbus",
    "Driver": "xenlike.xenbus",
    "SharedRing": "xenlike.xenbus",
    "FrontChannel": "xenlike.xenbus",
    "BackChannel": "xenlike.xenbus",
    # the domain side and Dom0's tools
    "Domain": "xenlike.domain",
    "XenControl": "xenlike.xc",
    "Hypervisor": "xenlike.hypervisor",
    # XenStore
    "open_client": "xenlike.xenstore",
    "XenStoreError": "xenlike.xenstore",
    # topologies
    "Topology": "xenlike.topology",
    "load_topology": "xenlike.topology",
    "TopologyError": "xenlike.topology",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name == "__version__":  # importlib.metadata costs every process ~25 ms: only on demand
        from importlib.metadata import version

        globals()[name] = value = version("xenlike")
        return value
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xenlike' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
