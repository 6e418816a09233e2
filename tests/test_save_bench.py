"""bench/save.py runs (`--quick`) and prints its figures in the house format."""

import re

from tests.bench_runs import quick


def test_save_bench_quick_prints_its_figures_and_ratios() -> None:
    result = quick("save", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    ratios = {
        match[1]: float(match[2])
        for line in lines
        if (match := re.fullmatch(r"ratio (\S+): (\d+\.\d+)", line))
    }
    for memory in (32, 128):
        for what in ("save", "restore"):
            assert ratios[f"{what}_{memory}M"] > 0
        # Populated frames only, and little beside them: the file is about the memory.
        assert 1.0 <= ratios[f"file_vs_populated_{memory}M"] < 1.01
    assert lines[-1].startswith("ratio "), "the ratios come last"
    for process in ("hypervisor", "dom0", "baseline"):
        assert any(
            line.startswith(f"cpu_us_per_op {process} save_32M")
            or line.startswith(f"cpu_us_per_op {process} raw_save_32M")
            for line in lines
        )
    assert any(line.startswith("cpu_us_per_op guest restore_32M") for line in lines)
