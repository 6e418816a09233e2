"""Two real processes over a ring in shared memory, woken by eventfds."""

import pytest

from tests.ring_peer import run_pair


def test_100k_requests_pipelined_between_two_processes() -> None:
    outcome = run_pair(count=100_000, depth=32)
    assert outcome.completed == 100_000


def test_multi_page_ring_between_two_processes() -> None:
    outcome = run_pair(count=20_000, depth=128, pages=4)
    assert outcome.completed == 20_000


def test_one_in_flight_sleeps_and_wakes_every_time() -> None:
    outcome = run_pair(count=2_000, depth=1)
    assert outcome.completed == 2_000
    assert outcome.front_sleeps > 1_000  # each answer had to wake the front end


@pytest.mark.slow
def test_two_million_sleep_wake_cycles_lose_no_wakeup() -> None:
    """Every cycle both sides sleep; a lost wake-up shows as a Stall report."""
    outcome = run_pair(count=1_300_000, depth=1, stall_after=5.0)
    assert outcome.front_sleeps + outcome.back_sleeps >= 2_000_000
