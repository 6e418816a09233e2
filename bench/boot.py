"""Boot time of a topology, and the memory each guest process holds.

xenlike: wall time of `xenlike up --detach` (hypervisor, Dom0, every guest,
every device Connected), for the default topology and for 16 guests, then
the resident set size of each guest process.

Baseline, in the same run with rounds interleaved: the same number of bare
Python processes (hypervisor + Dom0 + guests) started at once, each
importing the modules a domain imports, and exiting.

Run: `python bench/boot.py [--quick]`.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPORTS = (
    "import trio, construct, attrs, xenlike.domain, xenlike.xenstore, xenlike.xenbus, "
    "domains.guest, domains.dom0, drivers.console"
)


def topology(guests: int) -> str:
    lines = ["[host]", 'name = "boot"', "", "[dom0]", "memory = 128", ""]
    for index in range(guests):
        lines += [
            "[[domain]]",
            f'name = "g{index}"',
            "memory = 16",
            'init = "domains.guest.demo:main"',
            "",
        ]
    return "\n".join(lines)


def xenlike(*args: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    return subprocess.run(
        [sys.executable, "-m", "xenlike", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def boot_once(topology_file: Path | None, run_dir: Path) -> tuple[float, list[int]]:
    """Seconds to `up --detach`, and each guest process's RSS in KiB."""
    args = ["up", "--detach", "--timeout", "240"] + ([str(topology_file)] if topology_file else [])
    start = time.perf_counter()
    result = xenlike(*args, run_dir=run_dir)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"up failed:\n{result.stdout}\n{result.stderr}")
    log = (run_dir / "hypervisor.log").read_text()
    pids = [
        int(pid) for domid, pid in re.findall(r"\(d(\d+)\) started pid (\d+)", log) if domid != "0"
    ]
    rss = []
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        rss.append(int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))
    xenlike("down", run_dir=run_dir)
    return elapsed, rss


def baseline_once(processes: int) -> float:
    start = time.perf_counter()
    children = [
        subprocess.Popen([sys.executable, "-c", IMPORTS], cwd=ROOT) for _ in range(processes)
    ]
    for child in children:
        if child.wait() != 0:
            raise SystemExit("a baseline process failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round, 4 guests for the big case")
    args = parser.parse_args()
    rounds = 1 if args.quick else 5
    big = 4 if args.quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        big_file = Path(tmp) / "big.toml"
        big_file.write_text(topology(big))
        times: dict[str, list[float]] = {
            k: [] for k in ("default", "big", "base_default", "base_big")
        }
        rss: list[int] = []
        for round_ in range(rounds):
            times["base_default"].append(baseline_once(2 + 2))
            elapsed, sizes = boot_once(None, Path(tmp) / f"default{round_}")
            times["default"].append(elapsed)
            rss += sizes
            times["base_big"].append(baseline_once(big + 2))
            elapsed, sizes = boot_once(big_file, Path(tmp) / f"big{round_}")
            times["big"].append(elapsed)
            rss += sizes
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"rounds: {rounds} (medians)")
    print(f"default topology (2 guests) up --detach: {med['default']:.2f} s")
    print(f"baseline, 4 bare processes: {med['base_default']:.2f} s")
    print(f"{big} guests up --detach: {med['big']:.2f} s")
    print(f"baseline, {big + 2} bare processes: {med['base_big']:.2f} s")
    print(
        f"guest RSS median: {statistics.median(rss) / 1024:.1f} MiB, max: {max(rss) / 1024:.1f} MiB"
    )
    print(f"ratio default_boot: {med['default'] / med['base_default']:.3f}")
    print(f"ratio {big}_guests_boot: {med['big'] / med['base_big']:.3f}")
    print(f"ratio max_guest_rss_vs_40MiB: {max(rss) / (40 * 1024):.3f}")


if __name__ == "__main__":
    main()
