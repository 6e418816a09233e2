"""bench/migrate.py runs (`--quick`, root only) and prints its figures in the house format."""

import os
import re
import subprocess

import pytest

from tests.bench_runs import quick

ROW = r"(pre-copy|stop-and-copy) +([\d.]+) ms +[\d.]+ s +(\d+)/(\d+)"  # downtime, lost/explained


def test_migrate_bench_quick_prints_its_figures_and_ratios() -> None:
    result = quick("migrate", timeout=900)
    if os.geteuid() != 0:
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "bench/migrate.py: needs root (network namespaces, veth and VXLAN devices);"
            " run it as root"
        )
        pytest.skip("bench/migrate.py needs root")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rows = {
        match[1]: (float(match[2]), int(match[3]), float(match[4]))
        for line in lines
        if (match := re.match(ROW, line))
    }
    assert set(rows) == {"pre-copy", "stop-and-copy"}, result.stdout
    for downtime, lost, explained in rows.values():
        assert downtime > 0 and lost <= explained + 2  # what the downtime explains, give or take
    assert any(line.startswith("Clark et al. (NSDI 2005), Quake 3 server: 60 ms") for line in lines)
    for process in ("dom0_source", "dom0_destination", "migrate_tools", "baseline"):
        assert any(line.startswith(f"cpu_us_per_op {process} pre-copy") for line in lines), process
    assert re.fullmatch(r"ratio downtime: \d+\.\d+", lines[-2]), lines[-2]
    pages = re.fullmatch(r"ratio pages_sent: (\d+\.\d+)", lines[-1])
    assert pages is not None and 1.0 <= float(pages[1]) <= 1.5, lines[-1]
    assert "xlbm-" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
