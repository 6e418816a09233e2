"""The hypervisor process: domains, hypercall table, event channels, grant tables.

Importing this package registers every hypercall handler in `HYPERCALLS`.
Run it on its own with `python -m xenlike.hypervisor --run-dir DIR`.
"""

from xenlike.hypervisor import control, evtchn, grant_table, memory_op, platform  # noqa: F401  (registration)
from xenlike.hypervisor.core import (
    DomainState,
    HypercallConnection,
    HypercallListener,
    Hypervisor,
    HypervisorDomain,
)
from xenlike.hypervisor.table import HYPERCALLS, Call, hypercall
from xenlike.trace import hypervisor as _trace  # noqa: F401  (registration)

__all__ = [
    "HYPERCALLS",
    "Call",
    "HypercallConnection",
    "HypervisorDomain",
    "DomainState",
    "HypercallListener",
    "Hypervisor",
    "hypercall",
]
