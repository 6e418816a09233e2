"""Live migration (pre-copy) against stop-and-copy, between two hosts, with a guest talking.

    python bench/migrate.py [--memory MIB] [--rounds N] [--quick]

Root only (network namespaces, veth and VXLAN devices). Two hosts as
tests/test_multihost.py has them: two network namespaces joined by a veth
wire (10.99.0.1, 10.99.0.2, MTU 1550), each host's xenbr0 joined to the
other's by VXLAN 42, sharing an images directory. Host A runs `mover`, a
guest of MIB MiB (128 by default) whose program fills its memory, then is
a light writer (one of its frames every 10 ms) and answers UDP echo (port
7). Host B runs `pinger`, whose program sends mover an echo request every
5 ms and prints each gap longer than 20 ms between two answers, with the
answers lost in it, on CLOCK_MONOTONIC (one clock for every process on
this machine, whatever its namespace).

Each round moves mover A -> B and back B -> A over tcp:// (a
`migrate-receive --listen` in the destination's namespace, `migrate
--debug` in the source's), once live and once `--stop-and-copy`; the
modes swap directions every round so that neither has the short way.
For each: the downtime (the largest gap in echo answers during the
move; beside it, the guest's own: the gap in its clock frame, which it
writes every millisecond), the total time of the `migrate` command, the frames sent per
round, the answers lost beside those the downtime explains (one per 5
ms), and CPU per move for each process (bench/_cost.py) beside a
baseline that sends the same bytes through a loopback TCP socket. Medians
over the rounds, the absolute downtime beside Clark et al.'s (NSDI 2005),
and the targets of issue #20 last: `ratio downtime: VALUE` (pre-copy's
over stop-and-copy's, at most 0.3) and `ratio pages_sent: VALUE`
(pre-copy's frames sent over the guest's populated frames, at most 1.5).
"""

import argparse
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._cost import Costs, Usage, own_usage, process_usage, topology_processes  # noqa: E402

XENLIKE = [sys.executable, "-m", "xenlike"]
WRITE_EVERY = 0.010  # seconds between the light writer's frames
CLOCK_EVERY = 0.001  # seconds between the clock frame's writes
ECHO_EVERY = 0.005  # seconds between the pinger's echo requests
GAP = 0.020  # seconds without an answer that the pinger reports
ECHO_PORT = 7
CLARK = {"Quake 3 server": 60, "SPECweb99": 210}  # ms of downtime, NSDI 2005
WIRE = {"a": "10.99.0.1", "b": "10.99.0.2"}
MOVER_IP, PINGER_IP = "10.0.0.1", "10.0.0.2"


async def mover(guest: Any) -> None:
    """The moving guest's program (resumable): fills its memory, answers UDP echo,
    writes a frame every WRITE_EVERY and the time into its clock frame every
    CLOCK_EVERY; after a resume prints `downtime N ms` from the time its clock
    frame holds (the downtime as the guest itself sees it)."""
    import struct

    import trio

    memory = guest.domain.memory
    state = guest.resumable(guest.resumed_state or {"clock": 0, "first": 0, "count": 0, "moves": 0})
    if guest.resumed_state is not None:
        with memory.frame(state["clock"]) as page:
            (stopped,) = struct.unpack_from("<d", page)
        downtime = (time.monotonic() - stopped) * 1000
        state["moves"] += 1
        print(f"[{guest.name}] move {state['moves']}: downtime {downtime:.1f} ms")
    else:
        allocator = guest.domain.allocator
        state["clock"] = allocator.allocate()
        state["count"] = allocator.available - 256  # the drivers keep some pages
        state["first"] = allocator.allocate_run(state["count"])
        for number in range(state["count"]):
            with memory.frame(state["first"] + number) as page:
                page[:] = number.to_bytes(8, "little") * (len(page) // 8)
        print(f"[{guest.name}] filled {state['count']} frames")
    guest.domain.nursery.start_soon(_echo, guest.net().udp(ECHO_PORT))
    next_write = time.monotonic()
    index = 0
    while True:
        now = time.monotonic()
        with memory.frame(state["clock"]) as page:
            struct.pack_into("<d", page, 0, now)
        if now >= next_write:
            with memory.frame(state["first"] + index % state["count"]) as page:
                page[:8] = struct.pack("<d", now)
            index += 1
            next_write = now + WRITE_EVERY
        await trio.sleep(CLOCK_EVERY)


async def _echo(sock: Any) -> None:
    while True:
        data, address = await sock.recvfrom()
        await sock.sendto(data, address)


async def pinger(guest: Any) -> None:
    """The guest that stays: an echo request to mover every ECHO_EVERY, numbered;
    prints `answered` at the first answer, then `gap MS ms from T0 to T1, LOST
    lost` for every answer that comes more than GAP after the one before."""
    import struct

    import trio

    sock = guest.net().udp()
    last: list[float] = []
    last_seq = -1

    async def send() -> None:
        seq = 0
        while True:
            await sock.sendto(struct.pack("<Q", seq), (MOVER_IP, ECHO_PORT))
            seq += 1
            await trio.sleep(ECHO_EVERY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        while True:
            data, _ = await sock.recvfrom()
            (seq,) = struct.unpack("<Q", data[:8])
            if seq <= last_seq:
                continue
            now = time.monotonic()
            if not last:
                print(f"[{guest.name}] answered")
            elif now - last[0] > GAP:
                print(
                    f"[{guest.name}] gap {(now - last[0]) * 1000:.1f} ms"
                    f" from {last[0]:.4f} to {now:.4f}, {seq - last_seq - 1} lost"
                )
            last[:] = [now]
            last_seq = seq


def fail(message: str) -> None:
    sys.exit(f"bench/migrate.py: {message}")


def run(*argv: str, space: str | None = None, run_dir: Path | None = None) -> str:
    command = ["ip", "netns", "exec", space, *argv] if space else list(argv)
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)} if run_dir else None
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if done.returncode:
        fail(f"{' '.join(argv[:6])}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout + done.stderr


def console(run_dir: Path, name: str) -> str:
    return run(*XENLIKE, "console", name, "--no-follow", run_dir=run_dir)


def wait_console(run_dir: Path, name: str, pattern: str, timeout: float = 180) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(re.finditer(pattern, console(run_dir, name)))
        if found:
            return found[-1]
        time.sleep(0.2)
    fail(f"{name} did not print {pattern!r} in {timeout:.0f} s")
    raise AssertionError  # not reached


def children_usage() -> Usage:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Usage(usage.ru_utime + usage.ru_stime, usage.ru_nvcsw)


def host_usage(runs: dict[str, Path], source: str) -> dict[str, Usage]:
    """The hypervisor and Dom0 of the source and of the destination."""
    found = {}
    for side, run_dir in runs.items():
        role = "source" if side == source else "destination"
        pids = topology_processes(run_dir)
        found[f"hypervisor_{role}"] = process_usage(int(pids["hypervisor"]))
        found[f"dom0_{role}"] = process_usage(int(pids[0]))
    return found


def move(
    spaces: dict[str, str],
    runs: dict[str, Path],
    source: str,
    live: bool,
    costs: Costs,
    number: int,
) -> dict[str, Any]:
    """Move mover from `source` to the other host (its move `number`); its figures."""
    destination = "b" if source == "a" else "a"
    before, tools = host_usage(runs, source), children_usage()
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", spaces[destination], *XENLIKE, "migrate-receive"]
        + ["--listen", f"{WIRE[destination]}:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XENLIKE_RUN_DIR": str(runs[destination])},
    )
    assert receiver.stdout is not None
    url = receiver.stdout.readline().strip()
    if not url.startswith("tcp://"):
        fail(f"migrate-receive: {receiver.communicate(timeout=60)[1].strip()}")
    options = [] if live else ["--stop-and-copy"]
    started = time.monotonic()
    stderr = run(
        *XENLIKE,
        "migrate",
        "--debug",
        *options,
        "mover",
        url,
        space=spaces[source],
        run_dir=runs[source],
    )
    ended = time.monotonic()
    receiver.communicate(timeout=60)
    workload = "pre-copy" if live else "stop-and-copy"
    after = host_usage(runs, source)
    for process, usage in after.items():
        costs.add(process, workload, usage - before[process], 1)
    costs.add("migrate_tools", workload, children_usage() - tools, 1)
    rounds = [int(n) for n in re.findall(r"round \d+: (\d+) frames sent", stderr)]
    last = re.search(r"suspended: (\d+) frames sent", stderr)
    whole = re.search(r"sent \d+ bytes \((\d+) frames\)", stderr)
    if last is not None:
        rounds.append(int(last.group(1)))
    elif whole is not None:
        rounds.append(int(whole.group(1)))
    time.sleep(1)  # the answers after the move, and the console lines saying so
    gaps = [
        (float(ms), int(lost))
        for ms, start, end, lost in re.findall(
            r"gap ([\d.]+) ms from ([\d.]+) to ([\d.]+), (\d+) lost", console(runs["b"], "pinger")
        )
        if float(end) >= started and float(start) <= ended + 1
    ]
    downtime, lost = max(gaps) if gaps else (GAP * 1000, 0)
    seen = wait_console(runs[destination], "mover", rf"move {number}: downtime ([\d.]+) ms")
    return {
        "guest_ms": float(seen.group(1)),
        "downtime_ms": downtime,
        "lost": lost,
        "total_s": ended - started,
        "rounds": rounds,
    }


def baseline(nbytes: int, costs: Costs) -> None:
    """The same bytes through a loopback TCP socket, by this process: the least a
    move's stream can cost."""
    listener = socket.create_server(("127.0.0.1", 0))
    chunk = bytes(1 << 20)

    def sink() -> None:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    thread = threading.Thread(target=sink)
    thread.start()
    before = own_usage()
    with socket.create_connection(listener.getsockname()) as out:
        for _ in range(nbytes // len(chunk)):
            out.sendall(chunk)
    thread.join()
    listener.close()
    costs.add("baseline", "pre-copy", own_usage() - before, 1)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and VXLAN devices); run it as root"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    return None


def wire(spaces: dict[str, str], tag: str) -> None:
    """Two namespaces joined by a veth pair, MTU 1550 so guest frames fit in VXLAN."""
    for space in spaces.values():
        run("ip", "netns", "add", space)
    ends = {"a": f"xba{tag}", "b": f"xbb{tag}"}
    run(
        "ip",
        "link",
        "add",
        ends["a"],
        "netns",
        spaces["a"],
        "type",
        "veth",
        "peer",
        "name",
        ends["b"],
        "netns",
        spaces["b"],
    )
    for side in "ab":
        run("ip", "-n", spaces[side], "addr", "add", f"{WIRE[side]}/24", "dev", ends[side])
        run("ip", "-n", spaces[side], "link", "set", ends[side], "mtu", "1550", "up")


def topology(side: str, images: Path, memory: int) -> str:
    other = "b" if side == "a" else "a"
    name, mac, ip = ("mover", "01", MOVER_IP) if side == "a" else ("pinger", "02", PINGER_IP)
    return (
        f'[host]\nname = "bench-{side}"\nlocal = "{WIRE[side]}"\npeers = ["{WIRE[other]}"]\n'
        f'images = "{images}"\n[dom0]\nmemory = 128\nnic = "vxlan:42"\n'
        f'[[domain]]\nname = "{name}"\nmemory = {memory if side == "a" else 32}\n'
        f'init = "bench.migrate:{name}"\non_crash = "destroy"\n'
        f'vif = ["mac=00:16:3e:00:00:{mac}, bridge=xenbr0, ip={ip}/24"]\n'
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=128, help="the moving guest's MiB")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each moves both ways)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 32 MiB, one round")
    args = parser.parse_args()
    if args.quick:
        args.memory, args.rounds = 32, 1
    reason = unavailable()
    if reason is not None:
        fail(reason)
    tag = uuid.uuid4().hex[:6]
    spaces = {side: f"xlbm-{side}-{tag}" for side in "ab"}
    costs = Costs()
    figures: dict[str, list[dict[str, Any]]] = {"pre-copy": [], "stop-and-copy": []}
    with tempfile.TemporaryDirectory(prefix="xenlike-bench-migrate-") as base_name:
        base = Path(base_name)
        (base / "images").mkdir()
        runs = {side: base / side for side in "ab"}
        try:
            wire(spaces, tag)
            for side in "ab":
                (base / f"{side}.toml").write_text(topology(side, base / "images", args.memory))
                run(
                    *XENLIKE,
                    "up",
                    "--detach",
                    str(base / f"{side}.toml"),
                    space=spaces[side],
                    run_dir=runs[side],
                )
            filled = int(wait_console(runs["a"], "mover", r"filled (\d+) frames").group(1))
            wait_console(runs["b"], "pinger", r"\] answered")
            time.sleep(1)  # the light writer at work
            for number in range(args.rounds):
                first_live = number % 2 == 0  # the modes swap directions every round
                for source, live in (("a", first_live), ("b", not first_live)):
                    name = "pre-copy" if live else "stop-and-copy"
                    moves = len(figures["pre-copy"]) + len(figures["stop-and-copy"]) + 1
                    figures[name].append(move(spaces, runs, source, live, costs, moves))
                baseline(args.memory << 20, costs)
        finally:
            for side in "ab":
                subprocess.run(
                    [*XENLIKE, "down", "--grace", "2", "--run-dir", str(runs[side])],
                    capture_output=True,
                    cwd=ROOT,
                    timeout=120,
                )
            for space in spaces.values():
                subprocess.run(["ip", "netns", "delete", space], capture_output=True, timeout=30)
    populated = args.memory * 256
    print(
        f"guest: {args.memory} MiB, {populated} populated frames ({filled} filled with data),"
        f" a light writer; {args.rounds} round(s), medians; echo every {ECHO_EVERY * 1000:.0f} ms"
    )
    print(
        f"{'':16}{'downtime':>12}{'total':>10}  {'lost/explained':>15}{'guest clock':>14}"
        "  frames sent per round"
    )
    medians = {}
    for name, rows in figures.items():
        downtime = statistics.median(row["downtime_ms"] for row in rows)
        total = statistics.median(row["total_s"] for row in rows)
        lost = statistics.median(row["lost"] for row in rows)
        guest = statistics.median(row["guest_ms"] for row in rows)
        sent = statistics.median(sum(row["rounds"]) for row in rows)
        medians[name] = (downtime, sent)
        explained = downtime / (ECHO_EVERY * 1000)
        last = rows[len(rows) // 2]["rounds"]
        print(
            f"{name:16}{downtime:>9.1f} ms{total:>8.2f} s  {lost:>7.0f}/{explained:<7.0f}"
            f"{guest:>11.1f} ms  " + " + ".join(map(str, last))
        )
    for workload, ms in CLARK.items():
        print(f"Clark et al. (NSDI 2005), {workload}: {ms} ms of downtime")
    for line in costs.lines():
        print(line)
    print(f"ratio downtime: {medians['pre-copy'][0] / medians['stop-and-copy'][0]:.2f}")
    print(f"ratio pages_sent: {medians['pre-copy'][1] / populated:.2f}")


if __name__ == "__main__":
    main()
