"""Interleaved producer/consumer steps, as hypothesis picks them.

The model tracks what each side has published and whether each side is
asleep (it ran its final check, found nothing and waits for an event). The
properties: nothing is lost, duplicated or reordered, and no wake-up is
lost — a side that sleeps is always notified by the next push that gives it
work, so both sides are never asleep while work is visible.
"""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xenlike.abi import blkif
from xenlike.ring import BackRing, FrontRing, RingOverflow, define_ring

BLKIF = define_ring("blkif", request=blkif.blkif_request, response=blkif.blkif_response)


class RingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mem = memoryview(bytearray(4096 * 2))
        self.front = FrontRing(BLKIF, self.mem)
        self.back = BackRing(BLKIF, self.mem)
        self.next_id = 0
        self.pushed = 0  # requests published to the back end
        self.received: list[int] = []  # request ids in the order the back end got them
        self.unanswered: list[int] = []
        self.answered_unpushed = 0
        self.responses_pushed = 0
        self.completed: set[int] = set()
        self.front_asleep = False
        self.back_asleep = False

    @precondition(lambda self: not self.front_asleep)
    @rule(count=st.integers(1, 70))
    def front_queues(self, count: int) -> None:
        count = min(count, self.front.free_requests())
        record = BLKIF.request.record
        self.front.put_requests(record(id=self.next_id + i, nr_segments=1) for i in range(count))
        self.next_id += count

    @precondition(lambda self: not self.front_asleep)
    @rule()
    def front_pushes(self) -> None:
        new = self.next_id - self.pushed
        notify = self.front.push_requests()
        self.pushed = self.next_id
        if self.back_asleep and new:
            assert notify, "lost wake-up: back end sleeps and the push did not notify"
        if notify:
            self.back_asleep = False

    @precondition(lambda self: not self.back_asleep)
    @rule(limit=st.integers(1, 70))
    def back_consumes(self, limit: int) -> None:
        reqs = self.back.get_requests(limit)
        ids = [r.id for r in reqs]
        start = len(self.received)
        assert ids == list(range(start, start + len(ids))), "requests lost, duplicated or reordered"
        self.received += ids
        self.unanswered += ids

    @precondition(lambda self: not self.back_asleep and self.unanswered)
    @rule(count=st.integers(1, 70), reverse=st.booleans())
    def back_answers(self, count: int, reverse: bool) -> None:
        batch, self.unanswered = self.unanswered[:count], self.unanswered[count:]
        if reverse:
            batch.reverse()  # responses may complete out of order
        self.back.put_responses(BLKIF.response.record(id=i, status=0) for i in batch)
        self.answered_unpushed += len(batch)

    @precondition(lambda self: not self.back_asleep)
    @rule()
    def back_pushes(self) -> None:
        new = self.answered_unpushed
        notify = self.back.push_responses()
        self.responses_pushed += new
        self.answered_unpushed = 0
        if self.front_asleep and new:
            assert notify, "lost wake-up: front end sleeps and the push did not notify"
        if notify:
            self.front_asleep = False

    @precondition(
        lambda self: not self.back_asleep and not self.unanswered and not self.answered_unpushed
    )
    @rule()
    def back_sleeps(self) -> None:
        if not self.back.final_check_for_requests():
            self.back_asleep = True

    @precondition(lambda self: not self.front_asleep)
    @rule()
    def front_consumes(self) -> None:
        for rsp in self.front.get_responses():
            assert rsp.id < self.next_id and rsp.id not in self.completed, (
                "bad or duplicate response"
            )
            self.completed.add(rsp.id)

    @precondition(lambda self: not self.front_asleep and self.pushed == self.next_id)
    @rule()
    def front_sleeps(self) -> None:
        if not self.front.final_check_for_responses():
            self.front_asleep = True

    @precondition(lambda self: self.front_asleep)
    @rule()
    def guest_submits_more(self) -> None:
        """The guest program, not an event, wakes the front end with new work."""
        self.front_asleep = False

    @invariant()
    def never_both_asleep_with_work_visible(self) -> None:
        if self.front_asleep and self.back_asleep:
            assert self.back.unconsumed_requests() == 0
            assert self.front.unconsumed_responses() == 0

    @invariant()
    def free_slots_add_up(self) -> None:
        in_flight = self.next_id - len(self.completed)
        assert self.front.free_requests() == self.front.nr_ents - in_flight


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4), st.integers(0, 2**32 - 1))
def test_garbage_indices_never_escape_the_ring(hdr: list[int], start: int) -> None:
    """Whatever a hostile peer writes into the header, each end either refuses
    with RingOverflow or consumes at most a ring's worth of slots."""
    mem = memoryview(bytearray(4096))
    struct.pack_into("<4I", mem, 0, start, start, start, start)
    back = BackRing(BLKIF, mem, attach=True)
    front = FrontRing(BLKIF, mem, attach=True)
    struct.pack_into("<4I", mem, 0, *hdr)
    try:
        got = back.get_requests()
    except RingOverflow:
        pass
    else:
        assert len(got) <= back.nr_ents
    try:
        assert front.get_responses() == []  # nothing is outstanding
    except RingOverflow:
        assert hdr[2] != start
