"""Logs a guest cannot flood: Xen's printk rate limit, and files of bounded size.

A guest decides how much it prints, so what the host keeps of it is bounded
twice: lines a guest causes pass Xen's printk_ratelimit (a burst, then a
steady rate, and one line saying how many were suppressed), and a log file
rotates once it reaches its size, keeping one previous generation
(`<name>.1`), as logrotate's `size` and `rotate 1` would. A log therefore
never takes more than twice its limit on disk.
"""

import os
import time
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

__all__ = ["PrintkRatelimit", "ReadThrottle", "RotatingLog"]

# xen/drivers/char/console.c: printk_ratelimit_ms and printk_ratelimit_burst.
PRINTK_RATELIMIT_MS = 5 * 1000
PRINTK_RATELIMIT_BURST = 10
# tools/console/daemon/io.c: xenconsoled handles 30 events of a domain per 200 ms.
RATE_LIMIT_ALLOWANCE = 30
RATE_LIMIT_PERIOD = 0.2  # seconds


@attrs.define
class PrintkRatelimit:
    """Xen's __printk_ratelimit: a token bucket of `burst` messages, refilled at one
    message per `interval_ms`; `missed` counts what it suppressed since the last pass."""

    interval_ms: int = PRINTK_RATELIMIT_MS
    burst: int = PRINTK_RATELIMIT_BURST
    toks: int = attrs.field()
    last_ms: int = attrs.field(factory=lambda: time.monotonic_ns() // 1_000_000)
    missed: int = 0

    @toks.default
    def _full(self) -> int:
        return self.burst * self.interval_ms

    def allow(self, now_ms: int | None = None) -> int | None:
        """None: suppress this message. Otherwise print it, after a line saying
        how many were suppressed before it when the answer is not 0."""
        now_ms = time.monotonic_ns() // 1_000_000 if now_ms is None else now_ms
        self.toks = min(self.toks + now_ms - self.last_ms, self.burst * self.interval_ms)
        self.last_ms = now_ms
        if self.toks >= self.interval_ms:
            lost, self.missed = self.missed, 0
            self.toks -= self.interval_ms
            return lost
        self.missed += 1
        return None


class ReadThrottle:
    """xenconsoled's throttle on a domain's output: `allowance` reads per `period`
    seconds; past that the reader leaves the domain alone until the period ends,
    and the guest's output waits on its side (a ring, a pipe)."""

    def __init__(
        self, allowance: int = RATE_LIMIT_ALLOWANCE, period: float = RATE_LIMIT_PERIOD
    ) -> None:
        self.allowance = allowance
        self.period = period
        self._period_end = trio.current_time() + period
        self._reads = 0

    async def read(self) -> None:
        """Count one read; sleep out the period once the allowance is spent."""
        self._reads += 1
        now = trio.current_time()
        if now >= self._period_end:
            self._period_end, self._reads = now + self.period, 0
        elif self._reads >= self.allowance:
            await trio.sleep_until(self._period_end)
            self._period_end, self._reads = trio.current_time() + self.period, 0


class RotatingLog:
    """An append-only log file that rotates to `<path>.1` at `max_bytes`.

    The `.1` generation belongs to the file beside it: a log that starts a
    new file (its old one removed, as `xenlike up` clears the run
    directory's logs) removes a `.1` left from before.
    """

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        if not self.path.exists():
            Path(f"{self.path}.1").unlink(missing_ok=True)
        self._file: BinaryIO = self.path.open("ab", buffering=0)
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.max_bytes and self._size:
            self._file.close()
            os.replace(self.path, f"{self.path}.1")
            self._file = self.path.open("ab", buffering=0)
            self._size = 0
        data = data[-self.max_bytes :]  # one write longer than the limit keeps its end
        self._file.write(data)
        self._size += len(data)

    def close(self) -> None:
        self._file.close()
