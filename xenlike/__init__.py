"""xenlike: a Xen-style paravirtualization framework in Python.

Domains are processes under a hypervisor process; they talk through
shared-memory rings in granted pages, event channels and the XenStore, with
Xen's own layouts, numbers and names.

The names a driver author or a tool needs are here; they load on first use,
so that a domain process importing one corner of xenlike pays for no other.
"""

import importlib
from importlib.metadata import version as _version
from typing import Any

__version__ = _version("xenlike")

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
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xenlike' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
