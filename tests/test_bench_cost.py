"""bench/_cost.py: the per-process figures the benchmarks print beside their ratios."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench._cost import Costs, Usage, own_usage, process_usage, topology_processes

# A process that sleeps 50 times (50 voluntary switches at least), burns 0.2 s
# of CPU, says so, and waits to be read.
WORKER = """
import sys, time
for _ in range(50):
    time.sleep(0.001)
start = time.process_time()
while time.process_time() - start < 0.2:
    pass
print("done", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def worker():
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, "--domid", "7"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_another_process_is_read_from_proc(worker):
    before = process_usage(worker.pid)
    assert worker.stdout.readline() == "done\n"
    used = process_usage(worker.pid) - before
    assert used.cpu >= 0.15  # 0.2 s burnt, read in 10 ms clock ticks
    assert used.vcsw >= 50


def test_own_usage_counts_this_process():
    before = own_usage()
    start = time.process_time()
    while time.process_time() - start < 0.05:
        pass
    for _ in range(10):
        time.sleep(0.001)
    used = own_usage() - before
    assert used.cpu >= 0.05
    assert used.vcsw >= 10


def test_topology_processes_are_the_hypervisors_children_by_domid(tmp_path: Path, worker):
    (tmp_path / "hypervisor.pid").write_text(f"{os.getpid()}\n")
    assert topology_processes(tmp_path) == {"hypervisor": os.getpid(), 7: worker.pid}


def test_lines_are_medians_per_operation_each_workload_together():
    costs = Costs()
    for cpu in (0.001, 0.003, 0.002):  # medians over rounds: 0.002 s over 1000 ops
        costs.add("guest", "rand4k", Usage(cpu, 40), 1000, wakeups=20)
    costs.add("raw", "rand4k", Usage(0.0005, 0), 1000)
    costs.add("guest", "seq", Usage(0.01, 1), 0)  # a round that did nothing is no figure
    assert costs.lines() == [
        "cpu_us_per_op guest rand4k: 2.00",
        "cpu_us_per_op raw rand4k: 0.50",
        "wakeups_per_op guest rand4k: 0.0200",
        "vcsw_per_op guest rand4k: 0.0400",
        "vcsw_per_op raw rand4k: 0.0000",
    ]
