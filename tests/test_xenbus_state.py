"""The XenBus handshake table: every transition, and whole handshakes between two ends."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlike.abi.xenbus import XenbusState as S
from xenlike.xenbus.state import LEGAL, TRANSITIONS, Action, Handshake, IllegalTransition, Role


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("before", "after"), list(itertools.product(S, S)))
def test_every_own_transition_is_legal_or_refused(role: Role, before: S, after: S) -> None:
    machine = Handshake(role, state=before)
    if after == before or after in LEGAL[role].get(before, frozenset()):
        machine.advance(after)
        assert machine.state == after
    else:
        with pytest.raises(IllegalTransition):
            machine.advance(after)
        assert machine.state == before


def test_every_reaction_leads_to_a_legal_state() -> None:
    for (role, own, _), reaction in TRANSITIONS.items():
        assert reaction.next_state is None or reaction.next_state in LEGAL[role][own]


class Link:
    """Two ends joined by a pretend XenStore: each sees the other's published state."""

    def __init__(self) -> None:
        self.front = Handshake(Role.frontend)
        self.back = Handshake(Role.backend)
        self.log: list[tuple[str, Action]] = []

    def step(self, end: Handshake) -> bool:
        """Let one end react to the peer's current state; True if it did something."""
        peer = self.back if end is self.front else self.front
        reaction = end.peer_changed(peer.state)
        if reaction.action is None:
            return False
        self.log.append((end.role.value, reaction.action))
        if reaction.next_state is not None:
            end.advance(reaction.next_state)
        return True

    def settle(self, order: list[int]) -> None:
        """Let the ends act in the given order, then in turn until neither has work."""
        ends = [self.front, self.back]
        for pick in order:
            self.step(ends[pick])
        while self.step(self.front) | self.step(self.back):
            pass


def test_handshake_follows_xens_sequence() -> None:
    link = Link()
    link.settle([1, 0])
    assert (link.front.state, link.back.state) == (S.Connected, S.Connected)
    assert link.log == [
        ("backend", Action.publish_features),
        ("frontend", Action.setup),
        ("backend", Action.connect),
        ("frontend", Action.connected),
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=8))
def test_any_schedule_connects(order: list[int]) -> None:
    link = Link()
    link.settle(order)
    assert (link.front.state, link.back.state) == (S.Connected, S.Connected)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1), min_size=1, max_size=8))
def test_back_end_restart_reconnects(order: list[int]) -> None:
    """The back end goes away (Closing, Closed) and comes back (Initialising)."""
    link = Link()
    link.settle(order)
    link.back.advance(S.Closing)
    link.settle(order)
    link.back.advance(S.Closed)
    link.settle(order)
    assert link.front.state == S.Closed
    link.back = Handshake(Role.backend)  # a new back-end instance
    link.settle(order)
    assert (link.front.state, link.back.state) == (S.Connected, S.Connected)
    assert ("frontend", Action.reinitialise) in link.log


def test_front_end_reinitialising_reconnects() -> None:
    link = Link()
    link.settle([0, 1])
    link.front.advance(S.Closing)
    link.settle([1, 0])
    link.front.advance(S.Closed)
    link.settle([1, 0])
    assert link.back.state == S.Closed
    link.front.advance(S.Initialising)
    link.settle([1, 0])
    assert (link.front.state, link.back.state) == (S.Connected, S.Connected)


def test_failure_heads_for_closing() -> None:
    machine = Handshake(Role.frontend, state=S.Initialised)
    assert machine.fail() == S.Closing
    assert machine.fail() == S.Closed


def test_garbage_peer_state_is_unknown_and_ignored() -> None:
    machine = Handshake(Role.frontend)
    assert machine.peer_changed(99).action is None
    assert machine.peer_state == S.Unknown
