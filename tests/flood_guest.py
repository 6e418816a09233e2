"""A guest program that floods every log it can reach (tests/test_log_flood.py).

For `seconds=N` (its `extra`), as fast as it can: lines on its PV console
(xenconsoled's log), CONSOLEIO_write to the hypervisor log, grant maps the
hypervisor refuses (a refusal line each), and raw writes to its own stdout
pipe (made non-blocking: the flood never waits). Then it prints
`flood done` with its tallies, and idles.
"""

import os
from typing import Any

import trio

LINE = "flood " + "x" * 250


async def flood(guest: Any) -> None:
    seconds = float(
        dict(word.split("=", 1) for word in guest.cmdline.split() if "=" in word).get(
            "seconds", "3"
        )
    )
    tally = {"console_bytes": 0, "console_io": 0, "refused": 0, "stdout_bytes": 0}
    os.set_blocking(1, False)  # its own stdout pipe: never wait on it
    deadline = trio.current_time() + seconds
    while trio.current_time() < deadline:
        for _ in range(16):
            print(LINE)
            tally["console_bytes"] += len(LINE) + 1
        await guest.domain.console_write(LINE * 60)  # 15 KiB, near the largest write
        tally["console_io"] += 1
        try:
            await guest.domain.grants.map(0, [4000])  # Dom0 granted no such ref
        except Exception:
            tally["refused"] += 1
        try:
            tally["stdout_bytes"] += os.write(1, (LINE + "\n").encode() * 64)
        except BlockingIOError:  # the hypervisor reads it no faster than it allows
            pass
    print(f"flood done: {tally}")
    await trio.sleep_forever()
