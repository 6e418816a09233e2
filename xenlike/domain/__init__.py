"""The domain side: what a kernel running in a domain process uses.

A kernel is an async function taking a `Domain`: its memory and page
allocator, its hypercall client, its event channel ports, its grant table,
and its boot information, with the same meaning as a PV guest's start_info.
"""

from xenlike.domain.evtchn import EventChannels, Port, PortClosed
from xenlike.domain.grant_table import (
    GrantCopy,
    GrantError,
    GrantInUse,
    GrantMapping,
    GrantRef,
    GrantStatusError,
    GrantTable,
    LocalFrame,
    NoFreeGrantRefs,
)
from xenlike.domain.hypercall import HypercallClient, HypercallResult
from xenlike.domain.runtime import Domain, Hardware, Kernel, boot, load_kernel

__all__ = [
    "Domain",
    "EventChannels",
    "GrantCopy",
    "GrantError",
    "GrantInUse",
    "GrantMapping",
    "GrantRef",
    "GrantStatusError",
    "GrantTable",
    "Hardware",
    "HypercallClient",
    "HypercallResult",
    "Kernel",
    "LocalFrame",
    "NoFreeGrantRefs",
    "Port",
    "PortClosed",
    "boot",
    "load_kernel",
]
