"""CPU time and wake-ups per operation, for each process a benchmark runs.

A ratio of throughputs moves with what a wake-up costs on the machine
(a cross-vCPU eventfd round trip costs 60 µs on one 2-vCPU machine and far
less on another); CPU time per operation and wake-ups per operation move
much less, so they say whether the software got cheaper or dearer.

- `cpu_us_per_op PROCESS WORKLOAD`: user + system CPU time of that process
  over the measured round, by the kernel's accounting, per operation.
  `own_usage` asks getrusage (microseconds); `process_usage` reads
  /proc/<pid>/stat, in clock ticks (10 ms), so short rounds (`--quick`) give
  coarse figures for processes read that way.
- `wakeups_per_op`: notifications the process sent (ring notifies, event
  channel sends) per operation, where the benchmark can count them.
- `vcsw_per_op`: voluntary context switches (times the process went to
  sleep, all its threads) per operation: the proxy for wake-ups where a
  process boundary hides the counters.

A benchmark collects one `Usage` difference per process per round and
prints the medians with `Costs.lines()`, before its ratio lines.
"""

import os
import resource
import statistics
from pathlib import Path
from typing import NamedTuple

__all__ = ["Costs", "Usage", "own_usage", "process_usage", "topology_processes"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Usage(NamedTuple):
    """What the kernel counted for a process: CPU seconds and voluntary switches."""

    cpu: float  # user + system seconds
    vcsw: int  # voluntary context switches

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(self.cpu - other.cpu, self.vcsw - other.vcsw)


def own_usage() -> Usage:
    """This process, every thread, from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return Usage(usage.ru_utime + usage.ru_stime, usage.ru_nvcsw)


def process_usage(pid: int) -> Usage:
    """Another process, every thread, from /proc (any process of the same user)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                switches += int(line.split()[1])
    return Usage(cpu, switches)


def topology_processes(run_dir: Path) -> dict[int | str, int]:
    """The pids of a running topology: `"hypervisor"`, and each domain's by domid
    (the hypervisor's children, each started with `--domid N`)."""
    hypervisor = int((run_dir / "hypervisor.pid").read_text())
    found: dict[int | str, int] = {"hypervisor": hypervisor}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if int(stat.rsplit(")", 1)[1].split()[1]) == hypervisor and b"--domid" in argv:
            found[int(argv[argv.index(b"--domid") + 1])] = int(entry.name)
    return found


class Costs:
    """Per-operation figures of every round, by workload and process; medians printed."""

    def __init__(self) -> None:
        self._rounds: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(
        self, process: str, workload: str, usage: Usage, ops: int, wakeups: int | None = None
    ) -> None:
        """One round of one process: its usage difference over `ops` operations."""
        if ops <= 0:
            return
        figures = self._rounds.setdefault(workload, {}).setdefault(process, {})
        figures.setdefault("cpu_us_per_op", []).append(usage.cpu / ops * 1e6)
        if wakeups is not None:
            figures.setdefault("wakeups_per_op", []).append(wakeups / ops)
        figures.setdefault("vcsw_per_op", []).append(usage.vcsw / ops)

    def lines(self) -> list[str]:
        """`FIGURE PROCESS WORKLOAD: VALUE`, medians, each workload's processes together."""
        out = []
        for workload, processes in self._rounds.items():
            for figure in ("cpu_us_per_op", "wakeups_per_op", "vcsw_per_op"):
                for process, figures in processes.items():
                    if figure in figures:
                        value = statistics.median(figures[figure])
                        digits = 2 if figure == "cpu_us_per_op" else 4
                        out.append(f"{figure} {process} {workload}: {value:.{digits}f}")
        return out
