"""Logs a guest cannot flood: each file it can fill is bounded, and the host stays responsive.

A real topology runs a guest that floods (tests/flood_guest.py) its PV
console, CONSOLEIO_write, refused hypercalls and its own stdout, next to a
quiet guest with a disk. Every file the flood reaches stays within its
bound, the hypervisor log says how many lines it suppressed, and the CLI
answers throughout.
"""

import re
import time
from pathlib import Path

from domains.dom0.xenconsoled import CONSOLE_LOG_MAX
from xenlike.hypervisor.core import LOG_FILE_MAX, OUTPUT_LOG_MAX
from xenlike.logfile import PRINTK_RATELIMIT_BURST, PrintkRatelimit, RotatingLog
from xenlike.testing import RunningTopology

FLOOD = """
[host]
name = "flood"

[dom0]
memory = 64
images = { "quiet.img" = "4M" }

[[domain]]
name = "quiet"
memory = 16
disk = ["format=raw, vdev=xvda, access=rw, target=quiet.img"]

[[domain]]
name = "flood"
memory = 16
init = "tests.flood_guest:flood"
extra = "seconds=8"
"""


def size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_a_flooding_guest_costs_bounded_disk_and_the_topology_answers(tmp_path: Path) -> None:
    with RunningTopology(FLOOD, tmp_path) as topo:
        flood = topo.domid("flood")
        deadline = time.monotonic() + 90
        slowest = 0.0
        while "flood done" not in topo.console("flood"):
            assert time.monotonic() < deadline, "the flood never ended"
            start = time.monotonic()
            assert {d["name"] for d in topo.domains()} == {"Domain-0", "quiet", "flood"}
            slowest = max(slowest, time.monotonic() - start)
        assert slowest < 10, f"`xenlike list` took {slowest:.1f} s during the flood"
        done = re.search(
            r"flood done: \{'console_bytes': (\d+), 'console_io': (\d+), "
            r"'refused': (\d+), 'stdout_bytes': (\d+)\}",
            topo.console("flood"),
        )
        assert done is not None, topo.console("flood")
        console_bytes, console_io, refused, stdout_bytes = map(int, done.groups())
        assert console_io > 100 and refused > 100, done[0]

        consoles = topo.run_dir / "console"
        assert console_bytes > CONSOLE_LOG_MAX  # it did try to fill its console log
        assert size(consoles / "flood.log") <= CONSOLE_LOG_MAX
        assert 0 < size(consoles / "flood.log.1") <= CONSOLE_LOG_MAX
        output = topo.run_dir / "domains" / f"{flood}.log"
        assert stdout_bytes > OUTPUT_LOG_MAX  # it did try to fill its own output log
        assert size(output) <= OUTPUT_LOG_MAX
        assert 0 < size(Path(f"{output}.1")) <= OUTPUT_LOG_MAX

        log = topo.run_dir / "hypervisor.log"
        assert size(log) + size(Path(f"{log}.1")) <= 2 * LOG_FILE_MAX
        dmesg = topo.xenlike("dmesg").stdout
        ours = [line for line in dmesg.splitlines() if f"(d{flood}) " in line]
        suppressed = sum(
            int(n) for n in re.findall(rf"\(d{flood}\) printk: (\d+) messages suppressed", dmesg)
        )
        # Two buckets (console, refusals) of 10, then one line each per 5 s for the flood.
        flood_lines = [line for line in ours if "flood x" in line or "map of d0" in line]
        assert len(flood_lines) <= 2 * (PRINTK_RATELIMIT_BURST + 3), flood_lines[-5:]
        assert suppressed > 0, ours[-5:]

        devices = topo.devices("quiet")
        assert devices and all(d["frontend_state"] == "Connected" for d in devices), devices


def test_printk_ratelimit_is_xens_burst_then_rate() -> None:
    limit = PrintkRatelimit(last_ms=0)
    assert [limit.allow(0) for _ in range(10)] == [0] * 10  # the burst
    assert limit.allow(0) is None and limit.allow(4999) is None  # then nothing for 5 s
    assert limit.allow(5000) == 2  # a line again, saying two were suppressed
    assert limit.allow(5001) is None
    assert limit.allow(10_000) == 1
    assert limit.allow(10_000 + 10 * 5000) == 0  # refilled, but never beyond the burst
    assert [limit.allow(60_000) for _ in range(10)] == [0] * 9 + [None]


def test_a_rotating_log_keeps_one_generation_and_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = RotatingLog(path, 100)
    for index in range(30):
        log.write(f"line {index:03}\n".encode())  # 9 bytes each
    log.write(b"x" * 250)  # longer than the bound: its end is kept
    log.close()
    assert path.read_bytes() == b"x" * 100
    rotated = Path(f"{path}.1").read_bytes()
    assert rotated.endswith(b"line 029\n") and len(rotated) <= 100
    reopened = RotatingLog(path, 100)  # appends, counting what is there
    reopened.write(b"y")
    reopened.close()
    assert Path(f"{path}.1").read_bytes() == b"x" * 100 and path.read_bytes() == b"y"
    path.unlink()  # a new run: the older generation goes with it
    RotatingLog(path, 100).close()
    assert not Path(f"{path}.1").exists() and path.read_bytes() == b""
