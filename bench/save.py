"""Save and restore time of a guest, against copying its memory to a file and back.

xenlike: wall time of Dom0's toolstack `save` (suspend, map the populated
frames, write xl's save file from them with a temporary file, fsync and
rename, destroy) and `restore` (read and check the whole file, build the
domain, refill its frames, unpause it: the toolstack's answer), asked
through the toolstack socket as the CLI does (the CLI's own Python start-up
is not counted), for a 32 MiB and a 128 MiB guest running the demo program.
`restore_resumed` runs on until the guest's program has resumed (its
"resumed in domain N" line is in its console log): the domain's process
starting, its kernel reconnecting, the program called.

Baseline, in the same run with rounds interleaved: the same number of bytes
as the file `save` wrote, copied from memory to a file in the same
directory with the same fsync, rename and directory fsync, then read back
into fresh memory (`raw_restore`: a new anonymous mapping each round, not yet
touched), as a restore reads it into the new domain's fresh memory: giving a
domain memory is part of a restore's job. Until issue #19's last figure the
read went into the buffer the save had written from, already faulted in;
that figure is still printed (`raw_restore_faulted`), and is not a ratio's.

Also: the file's size against the domain's populated memory, and CPU time
per operation of each process (hypervisor, Dom0, the guest; the
baseline's own process).

`--profile`: where a restore's time goes, as Dom0 times each of its steps
(the domain builder's hypercalls include the hypervisor's share), medians.

Run: `python bench/save.py [--quick] [--profile]`.
"""

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._cost import Costs, Usage, own_usage, process_usage, topology_processes  # noqa: E402
from xenlike.memory import XEN_PAGE_SIZE  # noqa: E402
from xenlike.migration import read_save_file  # noqa: E402
from xenlike.tools.session import find_run_dir, toolstack_request  # noqa: E402

SIZES = (32, 128)  # MiB of guest memory
TIMEOUT = 300.0


def topology(memory: int) -> str:
    return "\n".join(
        [
            "[host]",
            f'name = "save{memory}"',
            "",
            "[dom0]",
            "memory = 128",
            'nic = "none"',
            "",
            "[[domain]]",
            'name = "g"',
            f"memory = {memory}",
            'init = "domains.guest.demo:main"',
            "",
        ]
    )


def xenlike(*args: str, run_dir: Path) -> None:
    import subprocess

    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "xenlike", *args], capture_output=True, text=True, env=env
    )
    if result.returncode != 0:
        raise SystemExit(f"xenlike {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def request(run_dir: Path, what: dict[str, object]) -> dict[str, object]:
    return trio.run(toolstack_request, find_run_dir(run_dir), what, TIMEOUT)


def usages(run_dir: Path) -> dict[str, Usage]:
    """Hypervisor, Dom0 and the guest (whatever its domid), now."""
    found: dict[str, Usage] = {}
    for key, pid in topology_processes(run_dir).items():
        name = "hypervisor" if key == "hypervisor" else "dom0" if key == 0 else "guest"
        try:
            found[name] = process_usage(pid)
        except OSError:
            pass
    return found


def save_round(run_dir: Path, file: Path, costs: Costs, workload: str) -> float:
    before = usages(run_dir)
    start = time.perf_counter()
    request(run_dir, {"op": "save", "name": "g", "path": str(file), "checkpoint": False})
    elapsed = time.perf_counter() - start
    after = usages(run_dir)  # the guest is gone: its share is not counted
    for name in ("hypervisor", "dom0"):
        costs.add(name, workload, after[name] - before[name], 1)
    return elapsed


def restore_round(
    run_dir: Path, file: Path, costs: Costs, workload: str, spans: dict[str, list[int]] | None
) -> tuple[float, float]:
    """(seconds to the toolstack's answer, seconds until the program has resumed);
    with `spans`, Dom0's profile of the restore is added to it."""
    before = usages(run_dir)
    start = time.perf_counter()
    what: dict[str, object] = {"op": "restore", "path": str(file), "profile": spans is not None}
    answer = request(run_dir, what)
    elapsed = time.perf_counter() - start
    log = find_run_dir(run_dir).console_log("g")
    resumed = f"resumed in domain {answer['domid']} ".encode()
    deadline = start + TIMEOUT
    while resumed not in log.read_bytes():
        if time.perf_counter() > deadline:
            raise SystemExit(f"g did not resume in domain {answer['domid']}")
        time.sleep(0.001)
    resumed_after = time.perf_counter() - start
    if spans is not None:
        profile = answer["spans_ns"]
        assert isinstance(profile, dict)
        for name, ns in profile.items():
            spans.setdefault(name, []).append(ns)
        spans.setdefault("answer", []).append(int(elapsed * 1e9))
        spans.setdefault("answer_to_resumed", []).append(int((resumed_after - elapsed) * 1e9))
    after = usages(run_dir)
    for name in ("hypervisor", "dom0"):
        costs.add(name, workload, after[name] - before[name], 1)
    costs.add("guest", workload, after["guest"], 1)  # a new process: all of its time
    return elapsed, resumed_after


def raw_save(memory: bytearray, directory: Path, costs: Costs, workload: str) -> float:
    """The same bytes to a file as `save` writes it: temporary file, fsync, rename,
    directory fsync."""
    target, temporary = directory / "raw.bin", directory / ".raw.bin.tmp"
    before = own_usage()
    start = time.perf_counter()
    with open(temporary, "wb") as out:
        out.write(memory)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, target)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    costs.add("baseline", workload, own_usage() - before, 1)
    return elapsed


def raw_restore(directory: Path, size: int, costs: Costs, workload: str) -> float:
    """The file read back into fresh memory (a new anonymous mapping), unmapped after."""
    before = own_usage()
    start = time.perf_counter()
    memory = mmap.mmap(-1, size)
    with open(directory / "raw.bin", "rb") as source:
        source.readinto(memory)
    elapsed = time.perf_counter() - start
    costs.add("baseline", workload, own_usage() - before, 1)
    memory.close()
    return elapsed


def raw_restore_faulted(memory: bytearray, directory: Path, costs: Costs, workload: str) -> float:
    """The file read back into memory already faulted in (the former baseline)."""
    before = own_usage()
    start = time.perf_counter()
    with open(directory / "raw.bin", "rb") as source:
        source.readinto(memory)
    elapsed = time.perf_counter() - start
    costs.add("baseline", workload, own_usage() - before, 1)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of each")
    parser.add_argument(
        "--profile", action="store_true", help="where a restore's time goes, by Dom0's spans"
    )
    args = parser.parse_args()
    profiles: dict[int, dict[str, list[int]]] = {memory: {} for memory in SIZES}
    rounds = 1 if args.quick else 5
    costs = Costs()
    times: dict[str, list[float]] = {}
    sizes: dict[int, tuple[int, int]] = {}  # memory -> (file bytes, populated bytes)
    with tempfile.TemporaryDirectory() as tmp:
        for memory in SIZES:
            run_dir = Path(tmp) / f"run{memory}"
            spec = Path(tmp) / f"save{memory}.toml"
            spec.write_text(topology(memory))
            xenlike("up", "--detach", "--timeout", "120", str(spec), run_dir=run_dir)
            try:
                file = Path(tmp) / f"g{memory}.sav"
                raw = Path(tmp) / f"raw{memory}"
                raw.mkdir()
                for _ in range(rounds):
                    times.setdefault(f"save_{memory}M", []).append(
                        save_round(run_dir, file, costs, f"save_{memory}M")
                    )
                    buffer = bytearray(file.stat().st_size)
                    times.setdefault(f"raw_save_{memory}M", []).append(
                        raw_save(buffer, raw, costs, f"raw_save_{memory}M")
                    )
                    restored, resumed = restore_round(
                        run_dir,
                        file,
                        costs,
                        f"restore_{memory}M",
                        profiles[memory] if args.profile else None,
                    )
                    times.setdefault(f"restore_{memory}M", []).append(restored)
                    times.setdefault(f"restore_resumed_{memory}M", []).append(resumed)
                    times.setdefault(f"raw_restore_{memory}M", []).append(
                        raw_restore(raw, len(buffer), costs, f"raw_restore_{memory}M")
                    )
                    times.setdefault(f"raw_restore_faulted_{memory}M", []).append(
                        raw_restore_faulted(buffer, raw, costs, f"raw_restore_faulted_{memory}M")
                    )
                image = read_save_file(file.read_bytes())
                sizes[memory] = (file.stat().st_size, len(image.pages) * XEN_PAGE_SIZE)
            finally:
                xenlike("down", "--grace", "2", run_dir=run_dir)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"rounds: {rounds} (medians)")
    for memory in SIZES:
        whats = ("save", "raw_save", "restore", "restore_resumed", "raw_restore")
        for what in (*whats, "raw_restore_faulted"):
            print(f"{what}_{memory}M: {med[f'{what}_{memory}M'] * 1000:.1f} ms")
        file_bytes, populated = sizes[memory]
        print(f"file_bytes_{memory}M: {file_bytes}")
        print(f"populated_bytes_{memory}M: {populated}")
    for line in costs.lines():
        print(line)
    for memory in SIZES:
        for name, values in profiles[memory].items():
            print(f"profile restore_{memory}M {name}: {statistics.median(values) / 1e6:.2f} ms")
    for memory in SIZES:
        peers = (("save", "save"), ("restore", "restore"), ("restore_resumed", "restore"))
        for what, raw_of in peers:
            ratio = med[f"{what}_{memory}M"] / med[f"raw_{raw_of}_{memory}M"]
            print(f"ratio {what}_{memory}M: {ratio:.3f}")
    for memory in SIZES:
        file_bytes, populated = sizes[memory]
        print(f"ratio file_vs_populated_{memory}M: {file_bytes / populated:.3f}")


if __name__ == "__main__":
    main()
