"""Grant tables (GNTTABOP_*): v1 entries in the granter's memory, checked on every map.

A domain's grant table is `nr_grant_frames` frames of its own memory
(BootLayout.grant_table_gfns) holding grant_entry_v1 records, which the
domain writes itself to grant access. The hypervisor reads an entry only
when a peer maps or copies through it, and keeps its own record of every
active mapping (Xen's maptrack), so a dying domain's mappings are released
and its grants can be revoked.
"""

from typing import Any

import attrs

__all__ = ["GrantState", "attach", "teardown"]


@attrs.define(eq=False)
class GrantState:
    """One domain's grant table frames and the mappings it holds of others."""

    table_gfns: range
    maptrack: dict[int, Any] = attrs.field(factory=dict)


def attach(hv: Any, domain: Any) -> None:
    domain.ext["grants"] = GrantState(domain.layout.grant_table_gfns)


def teardown(hv: Any, domain: Any) -> None:
    state = domain.ext.get("grants")
    if state is not None:
        state.maptrack.clear()
