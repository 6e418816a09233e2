"""The XenBus handshake as a sans-I/O state machine, driven by a transition table.

Both ends of a split device keep a `state` node in XenStore and watch the
other's. Each end's reaction to the peer's state is a row of `TRANSITIONS`:
(role, own state, peer state) → what to do, and the state to publish after
doing it. The table follows Linux's blkfront/blkback (`blkback_changed`,
`frontend_changed`), which netfront/netback and Mini-OS share in substance:

    back   Initialising ─publish features→ InitWait
    front  Initialising ─sees InitWait: grant rings, event channel→ Initialised
    back   InitWait ─sees Initialised: map, bind, publish properties→ Connected
    front  Initialised ─sees Connected: read properties→ Connected
    either Connected ─sees Closing→ Closing ─sees Closed→ Closed
    back   Closed ─sees front Initialising again→ InitWait   (reconnect)
    front  Closed ─sees back InitWait again→ Initialising → …  (reconnect)

The machine performs no I/O: `Handshake.peer_changed` returns the `Action`
the driver must carry out and the state it then publishes with `advance`.
A failure while acting is reported with `fail`, which heads for Closing.
"""

import enum

import attrs

from xenlike.abi.xenbus import XenbusState

__all__ = [
    "Action",
    "Handshake",
    "IllegalTransition",
    "LEGAL",
    "Reaction",
    "Role",
    "TRANSITIONS",
]

S = XenbusState


class Role(enum.Enum):
    frontend = "frontend"
    backend = "backend"


class Action(enum.Enum):
    """What the driver does before it publishes its next state."""

    publish_features = "publish features"  # back: feature-* keys, limits
    setup = "setup"  # front: read features, grant ring pages, alloc evtchn, write keys
    connect = "connect"  # back: read ring-ref/event-channel, map, bind, publish properties
    connected = "connected"  # front: read the back end's properties, start I/O
    disconnect = "disconnect"  # either: stop I/O, unmap or end grants, close the port
    reinitialise = "reinitialise"  # front: the back end came back; start over


@attrs.frozen
class Reaction:
    action: Action | None
    next_state: XenbusState | None  # None: stay


class IllegalTransition(Exception):
    """A state change the protocol does not allow, by this end (local misuse)."""


# (role, own state, peer state) -> reaction. Rows that are absent mean "nothing to do".
TRANSITIONS: dict[tuple[Role, XenbusState, XenbusState], Reaction] = {}


def _row(
    role: Role,
    own: tuple[XenbusState, ...],
    peer: tuple[XenbusState, ...],
    action: Action | None,
    next_state: XenbusState | None,
) -> None:
    for o in own:
        for p in peer:
            TRANSITIONS[(role, o, p)] = Reaction(action, next_state)


_FRONT, _BACK = Role.frontend, Role.backend
# The back end publishes its features as soon as it probes the device,
# whatever the front end is doing (blkback's probe), and waits.
_row(_BACK, (S.Initialising,), tuple(S), Action.publish_features, S.InitWait)
# ... and connects once the front end has published its rings.
_row(_BACK, (S.InitWait,), (S.Initialised, S.Connected), Action.connect, S.Connected)
# A front end that starts over after a disconnect: the back end offers itself again.
_row(_BACK, (S.Closed,), (S.Initialising,), Action.publish_features, S.InitWait)
_row(
    _BACK,
    (S.Initialising, S.InitWait, S.Initialised, S.Connected),
    (S.Closing,),
    Action.disconnect,
    S.Closing,
)
# A front end seen starting over while still connected (its Closing and Closed
# were missed: watch events coalesce) closes the back end, which then offers
# itself again.
_row(_BACK, (S.Connected, S.Closing), (S.Initialising,), Action.disconnect, S.Closed)
# A back end that closes on its own (to restart) is Closed once the front end
# has let go of the ring.
_row(_BACK, (S.Closing,), (S.Closing,), Action.disconnect, S.Closed)
# A closed front end closes a connected back end; a back end that only waits
# (InitWait) keeps waiting, since a closed front end may yet start over.
_row(_BACK, (S.Closing, S.Connected), (S.Closed,), Action.disconnect, S.Closed)

# The front end sets up its rings when the back end waits for them (or, as Xen
# allows, straight away if the back end skipped InitWait and is Connected).
_row(_FRONT, (S.Initialising,), (S.InitWait,), Action.setup, S.Initialised)
_row(_FRONT, (S.Initialised,), (S.Connected,), Action.connected, S.Connected)
_row(
    _FRONT, (S.Initialising, S.Initialised, S.Connected), (S.Closing,), Action.disconnect, S.Closing
)
_row(_FRONT, (S.Initialised, S.Connected, S.Closing), (S.Closed,), Action.disconnect, S.Closed)
# A front end that closes on its own (to reconnect) is Closed once the back end
# has let go of the ring (blkfront's closing on the back end's Closing).
_row(_FRONT, (S.Closing,), (S.Closing,), Action.disconnect, S.Closed)
# After a disconnect, a back end that offers itself again is a reconnection.
_row(_FRONT, (S.Closed, S.Closing), (S.InitWait,), Action.reinitialise, S.Initialising)

# The states each end may move to from each state, by its own choice.
LEGAL: dict[Role, dict[XenbusState, frozenset[XenbusState]]] = {
    _BACK: {
        S.Unknown: frozenset({S.Initialising}),
        S.Initialising: frozenset({S.InitWait, S.Connected, S.Closing, S.Closed}),
        S.InitWait: frozenset({S.Connected, S.Closing, S.Closed}),
        S.Initialised: frozenset({S.Connected, S.Closing, S.Closed}),
        S.Connected: frozenset({S.Closing, S.Closed}),
        S.Closing: frozenset({S.Closed}),
        S.Closed: frozenset({S.InitWait, S.Initialising}),
    },
    _FRONT: {
        S.Unknown: frozenset({S.Initialising}),
        S.Initialising: frozenset({S.Initialised, S.Closing, S.Closed}),
        S.InitWait: frozenset({S.Initialised, S.Closing, S.Closed}),
        S.Initialised: frozenset({S.Connected, S.Closing, S.Closed}),
        S.Connected: frozenset({S.Closing, S.Closed}),
        S.Closing: frozenset({S.Closed, S.Initialising}),
        S.Closed: frozenset({S.Initialising}),
    },
}


@attrs.define
class Handshake:
    """One end of one device's handshake."""

    role: Role
    state: XenbusState = S.Initialising
    peer_state: XenbusState = S.Unknown

    def peer_changed(self, peer_state: int) -> Reaction:
        """The peer's `state` node changed: what should this end do now?"""
        try:
            self.peer_state = XenbusState(peer_state)
        except ValueError:
            self.peer_state = S.Unknown
        return TRANSITIONS.get((self.role, self.state, self.peer_state), Reaction(None, None))

    def start(self) -> Reaction:
        """The reaction to the peer as last seen, e.g. right after the device appeared."""
        return TRANSITIONS.get((self.role, self.state, self.peer_state), Reaction(None, None))

    def advance(self, new_state: XenbusState) -> None:
        """Record the state this end publishes; refuses what the protocol forbids."""
        if new_state == self.state:
            return
        if new_state not in LEGAL[self.role].get(self.state, frozenset()):
            raise IllegalTransition(f"{self.role.value}: {self.state.name} -> {new_state.name}")
        self.state = new_state

    def fail(self) -> XenbusState:
        """Something went wrong while acting: head for Closing (xenbus_dev_fatal)."""
        target = S.Closed if self.state in (S.Closing, S.Closed) else S.Closing
        if target != self.state:
            self.state = target
        return target
