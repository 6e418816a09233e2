"""The XenBus state diagrams, drawn from the transition table (Mermaid text).

`python -m xenlike.xenbus.diagram > docs/xenbus-states.md` regenerates the
page; a test fails when the page and the table disagree.
"""

from xenlike.abi.xenbus import XenbusState
from xenlike.xenbus.state import TRANSITIONS, Role

__all__ = ["mermaid", "page"]


def mermaid(role: Role) -> str:
    """One end's reactions: own state --peer states / action--> next state."""
    arrows: dict[tuple[XenbusState, XenbusState, str], list[XenbusState]] = {}
    for (row_role, own, peer), reaction in TRANSITIONS.items():
        if row_role is role and reaction.next_state not in (None, own):
            action = reaction.action.value if reaction.action else "-"
            arrows.setdefault((own, reaction.next_state, action), []).append(peer)
    lines = ["stateDiagram-v2"]
    for (own, target, action), peers in sorted(arrows.items(), key=lambda a: (a[0][0], a[0][1])):
        names = (
            "any" if len(peers) == len(XenbusState) else ", ".join(p.name for p in sorted(peers))
        )
        lines.append(f"    {own.name} --> {target.name}: peer {names} / {action}")
    return "\n".join(lines)


def page() -> str:
    parts = [
        "# XenBus handshake states",
        "",
        "Generated from `xenlike.xenbus.state.TRANSITIONS` by "
        "`python -m xenlike.xenbus.diagram`; do not edit by hand.",
        "",
        "Each arrow is one row of the table: when this end is in the state on the left",
        "and sees the peer's `state` node change to *peer X*, it performs the action",
        "and publishes the state on the right.",
        "",
    ]
    for role in Role:
        parts += [f"## The {role.value}", "", "```mermaid", mermaid(role), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(page(), end="")
