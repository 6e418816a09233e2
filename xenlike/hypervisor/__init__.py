"""The hypervisor process: domains, hypercall table, event channels, grant tables.

The hypercall table is built here, from the subsystems listed in `SUBSYSTEMS`.
Run it on its own with `python -m xenlike.hypervisor --run-dir DIR`.
"""

from xenlike.hypervisor import (
    control,
    evtchn,
    grant_table,
    logdirty,
    memory_op,
    platform,
    save,
)
from xenlike.hypervisor.core import (
    DomainState,
    HypercallConnection,
    HypercallListener,
    Hypervisor,
    HypervisorDomain,
)
from xenlike.hypervisor.table import HYPERCALLS, Call, hypercall
from xenlike.trace import hypervisor as tracing

SUBSYSTEMS = (platform, control, evtchn, grant_table, memory_op, save, logdirty, tracing)
"""The modules whose `@hypercall` handlers make up the hypercall table."""

HYPERCALLS.install(SUBSYSTEMS)

__all__ = [
    "HYPERCALLS",
    "Call",
    "HypercallConnection",
    "SUBSYSTEMS",
    "HypervisorDomain",
    "DomainState",
    "HypercallListener",
    "Hypervisor",
    "hypercall",
]
