"""The PV console page between a guest's writer and xenconsoled's reader."""

import trio
import trio.testing

from drivers.console import ConsoleBack, ConsoleFront, ConsoleWriter
from xenlike.logfile import RATE_LIMIT_ALLOWANCE, RATE_LIMIT_PERIOD
from xenlike.testing import doorbell_pair


async def test_output_arrives_whole_and_in_order_and_input_comes_back(nursery) -> None:
    page = memoryview(bytearray(4096))
    guest_bell, daemon_bell = doorbell_pair()
    front, back = ConsoleFront(page, guest_bell), ConsoleBack(page, daemon_bell)
    received = bytearray()
    nursery.start_soon(front.run)
    nursery.start_soon(back.run, received.extend)
    writer = ConsoleWriter(front)
    lines = [f"line {i}: {'x' * (i % 97)}\n" for i in range(3000)]
    for line in lines:
        print(line, end="", file=writer)
    await front.drain()
    expected = "".join(lines).encode()
    with trio.fail_after(10):
        while len(received) < len(expected):
            await trio.sleep(0.01)
    assert bytes(received) == expected
    await back.send_input(b"ls\n")
    with trio.fail_after(5):
        assert await front.read() == b"ls\n"
    nursery.cancel_scope.cancel()


async def test_output_is_bounded_when_nobody_reads(nursery) -> None:
    page = memoryview(bytearray(4096))
    guest_bell, _ = doorbell_pair()
    front = ConsoleFront(page, guest_bell)
    nursery.start_soon(front.run)
    for _ in range(3000):
        front.write(b"y" * 1000)  # 3 MB with no xenconsoled: never blocks, stays bounded
    await trio.testing.wait_all_tasks_blocked()  # the writer task has done all it can
    assert len(front._pending) <= 1 << 20
    nursery.cancel_scope.cancel()


async def test_a_flooding_guest_is_throttled_as_xenconsoled_throttles_it(
    nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The throttle sleeps on trio's clock, so a simulated second shows its five periods."""
    page = memoryview(bytearray(4096))
    guest_bell, daemon_bell = doorbell_pair()
    front, back = ConsoleFront(page, guest_bell), ConsoleBack(page, daemon_bell)
    reads: list[float] = []
    nursery.start_soon(front.run)
    nursery.start_soon(back.run, lambda data: reads.append(trio.current_time()))
    start = trio.current_time()
    for _ in range(1000):
        front.write(b"z" * 1000)  # 1 MB: 500 ring-fulls
    await trio.sleep(1.0)
    elapsed = trio.current_time() - start
    allowed = RATE_LIMIT_ALLOWANCE * (int(elapsed / RATE_LIMIT_PERIOD) + 1)
    assert RATE_LIMIT_ALLOWANCE * 4 < len(reads) <= allowed
    nursery.cancel_scope.cancel()
