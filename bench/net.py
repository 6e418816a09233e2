"""Guest-to-guest UDP through the PV network, against UDP over loopback between processes.

    python bench/net.py [--quick] [--rounds N]

- xenlike: `xenlike up` runs two guests with a vif each on xenbr0. The
  sender's datagrams go netfront → netback → bridge → netback → netfront,
  through each guest's IP stack (`guest.net().udp()`); the receiver counts
  them. A round is started by a XenStore write and its result read back.
- raw: the same datagrams from this process to a child process over a
  loopback UDP socket, plain blocking sockets (the ceiling Python reaches).

Each round sends a burst of datagrams of 64 bytes (packets/s) or 1400 bytes
(MB/s of payload); the rate is the receiver's: datagrams received over the
time from the first to the last. Rounds interleave (raw 64, xenlike 64,
raw 1400, xenlike 1400, ...) and the figures are medians. Then, per
datagram sent (workloads `64B`, `1400B`), CPU time and voluntary context
switches of the sender and receiver guests (measured by themselves, with
their event channel sends as `wakeups_per_op`), of Dom0 and the
hypervisor (from /proc, over the round), and of raw_sender and
raw_receiver; see bench/_cost.py. The last lines
are `ratio NAME: VALUE`, xenlike's rate over raw's (the target for
packets/s is 0.3 or more).
"""

import argparse
import multiprocessing
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._cost import Costs, Usage, own_usage, process_usage, topology_processes  # noqa: E402
from xenlike.rundir import RunDir  # noqa: E402
from xenlike.xenbus.driver import STATISTICS_INTERVAL  # noqa: E402
from xenlike.xenstore import XenStoreError, open_client  # noqa: E402

PORT = 9000
SENDER_IP, RECEIVER_IP = "10.0.0.1", "10.0.0.2"
START, END = b"START", b"END"

TOPOLOGY = f"""\
[host]
name = "bench-net"

[dom0]
memory = 64

[[domain]]
name = "receiver"
memory = 32
init = "bench.net:receiver"
vif = ["mac=00:16:3e:00:00:02, bridge=xenbr0, ip={RECEIVER_IP}/24"]

[[domain]]
name = "sender"
memory = 32
init = "bench.net:sender"
vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0, ip={SENDER_IP}/24"]
"""


# --- the guests (xenlike) ------------------------------------------------------------


class Counter:
    """The receiving end of a round: datagrams and bytes, first and last arrival,
    this process's usage and event channel sends since the round began, and the
    datagrams its socket dropped (its receive queue was full)."""

    def __init__(
        self, sends: Callable[[], int] = lambda: 0, dropped: Callable[[], int] = lambda: 0
    ) -> None:
        self.count = self.bytes = 0
        self.first = self.last = 0.0
        self._sends = sends
        self._sends_before = sends()
        self._dropped = dropped
        self._dropped_before = dropped()
        self._before = own_usage()

    def add(self, size: int) -> None:
        now = time.perf_counter()
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        self.bytes += size

    def result(self) -> bytes:
        used = own_usage() - self._before
        return (
            f"RESULT {self.count} {self.bytes} {self.last - self.first:.9f} "
            f"{used.cpu:.6f} {used.vcsw} {self._sends() - self._sends_before} "
            f"{self._dropped() - self._dropped_before}"
        ).encode()


def event_sends(guest: Any) -> Callable[[], int]:
    """How many notifications the guest has sent on all its event channel ports."""
    ports = guest.domain.evtchn.ports
    return lambda: sum(port.sends for port in ports.values())


async def receiver(guest: Any) -> None:
    """Counts the datagrams of each round; START resets, END answers with the count."""
    sock = guest.net().udp(PORT)
    sends = event_sends(guest)
    dropped = lambda: sock.dropped  # noqa: E731
    counter = Counter(sends, dropped)
    print(f"[{guest.name}] receiving on {RECEIVER_IP}:{PORT}")
    while True:
        data, sender = await sock.recvfrom()
        if data == START:
            counter = Counter(sends, dropped)
            await sock.sendto(START, sender)
        elif data == END:
            await sock.sendto(counter.result(), sender)
        else:
            counter.add(len(data))


async def _ask(sock: Any, message: bytes, answer: bytes) -> bytes:
    """A control message to the receiver, repeated until an answer starting with `answer`."""
    while True:
        await sock.sendto(message, (RECEIVER_IP, PORT))
        with trio.move_on_after(0.5):
            while True:
                data, _ = await sock.recvfrom()
                if data.startswith(answer):
                    return data


async def sender(guest: Any) -> None:
    """Runs the round `data/bench/go` names; writes the receiver's count to `data/bench/result`,
    then its own CPU seconds, voluntary switches and event sends over the burst."""
    iface = guest.net()
    sends = event_sends(guest)
    sock = iface.udp(PORT)
    for attempt in range(10):  # as `ping -w 10`: one echo request a second
        try:
            await iface.ping(RECEIVER_IP, timeout=1)
            break
        except TimeoutError:
            if attempt == 9:
                raise
    async with guest.xs.watch("data/bench/go") as events:
        async for _ in events:
            try:
                number, size, count = (await guest.xs.read("data/bench/go")).decode().split()
            except (XenStoreError, ValueError):
                continue  # the watch fires once at once, before any round
            await _ask(sock, START, START)
            before, sent_before = own_usage(), sends()
            payload = b"x" * int(size)
            destination = (RECEIVER_IP, PORT)
            for _ in range(int(count)):
                await sock.sendto(payload, destination)
            await trio.sleep(0.05)  # let the tail drain before asking
            used, sent = own_usage() - before, sends() - sent_before
            result = (await _ask(sock, END, b"RESULT")).decode().removeprefix("RESULT ")
            await guest.xs.write(
                "data/bench/result", f"{number} {result} {used.cpu:.6f} {used.vcsw} {sent}"
            )


# --- raw: loopback UDP between two processes -------------------------------------------


def _raw_receiver(ready: Any, results: Any) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    ready.put(sock.getsockname()[1])
    while True:
        counter = Counter()
        while True:
            data = sock.recv(65536)
            if data == START:
                counter = Counter()
            elif data.startswith(END + b" "):  # END <round>: answered with the round's number
                number = data.split()[1].decode()
                results.put(f"{number} " + counter.result().decode().removeprefix("RESULT "))
                break
            elif data == b"QUIT":
                return
            else:
                counter.add(len(data))


class Raw:
    def __init__(self) -> None:
        self.ready: Any = multiprocessing.Queue()
        self.results: Any = multiprocessing.Queue()
        self.process = multiprocessing.Process(
            target=_raw_receiver, args=(self.ready, self.results), daemon=True
        )
        self.process.start()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", self.ready.get(timeout=30)))
        self.number = 0

    def _ask_result(self) -> list[str]:
        """END until the receiver answers for this round: loopback UDP drops too when
        the receiver falls behind, and a lost END must not stall the run."""
        for _ in range(60):
            self.sock.send(f"END {self.number}".encode())
            try:
                while True:
                    number, *result = self.results.get(timeout=1).split()
                    if int(number) == self.number:
                        return result
            except queue.Empty:
                continue
        raise TimeoutError("the raw receiver does not answer")

    def round(self, size: int, count: int, costs: Costs) -> tuple[int, int, float]:
        self.number += 1
        self.sock.send(START)
        time.sleep(0.01)
        before = own_usage()
        payload, send = b"x" * size, self.sock.send
        for _ in range(count):
            send(payload)
        time.sleep(0.05)
        costs.add("raw_sender", f"{size}B", own_usage() - before, count)
        received, nbytes, elapsed, cpu, switches, _, _ = self._ask_result()
        costs.add("raw_receiver", f"{size}B", Usage(float(cpu), int(switches)), count)
        return int(received), int(nbytes), float(elapsed)

    def close(self) -> None:
        self.sock.send(b"QUIT")
        self.process.join(timeout=5)


# --- the rounds -----------------------------------------------------------------------------


class Guests:
    """The two-guest topology, driven through XenStore."""

    def __init__(self, tmp: Path) -> None:
        self.run_dir = RunDir(tmp / "run")
        topology = tmp / "bench-net.toml"
        topology.write_text(TOPOLOGY)
        self.env = {
            **os.environ,
            "XENLIKE_RUN_DIR": str(self.run_dir.path),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        subprocess.run(
            [sys.executable, "-m", "xenlike", "up", str(topology), "--detach"],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.number = 0
        pids = topology_processes(self.run_dir.path)
        self.hosts = {"dom0": pids[0], "hypervisor": pids["hypervisor"]}

    async def _domid(self, xs: Any, name: str) -> str:
        for domid in await xs.ls("/local/domain"):
            try:
                if (await xs.read(f"/local/domain/{domid}/name")).decode() == name:
                    return domid
            except Exception:
                continue
        raise RuntimeError(f"no guest named {name}")

    async def _check_alive(self, xs: Any, domids: dict[str, str]) -> None:
        """A guest that crashed (its program raised) will never answer: say so at once,
        with its console's last lines, rather than wait out the round's timeout."""
        for name, domid in domids.items():
            try:
                await xs.read(f"/local/domain/{domid}/name")
            except XenStoreError:
                console = self.run_dir.path / "console" / f"{name}.log"
                tail = console.read_text().splitlines()[-12:] if console.exists() else []
                raise RuntimeError(
                    f"the {name} guest is gone; its console:\n" + "\n".join(tail)
                ) from None

    async def _vif_drops(self, xs: Any, domids: dict[str, str]) -> dict[str, int]:
        """The netback counters of the datagrams a vif dropped, as published in
        its back end's statistics/ (what `xenlike top` shows)."""

        async def counter(name: str, key: str) -> int:
            path = f"/local/domain/0/backend/vif/{domids[name]}/0/statistics/{key}"
            try:
                return int(await xs.read(path))
            except (XenStoreError, ValueError):
                return 0

        return {
            "sender vif tx_dropped+tx_errors": await counter("sender", "tx_dropped")
            + await counter("sender", "tx_errors"),
            "receiver vif rx_dropped (netback's rx queue full)": await counter(
                "receiver", "rx_dropped"
            ),
        }

    async def round(
        self, size: int, count: int, costs: Costs
    ) -> tuple[int, int, float, dict[str, int]]:
        """Received datagrams and bytes, the time they took, and the datagrams each
        place counted as dropped; each process's usage goes to `costs`: the
        guests' from themselves, the hosts' from /proc."""
        self.number += 1
        async with open_client(self.run_dir.xenstored_socket) as xs:
            domids = {name: await self._domid(xs, name) for name in ("sender", "receiver")}
            home = f"/local/domain/{domids['sender']}/data/bench"
            drops_before = await self._vif_drops(xs, domids)
            before = {name: process_usage(pid) for name, pid in self.hosts.items()}
            await xs.write(f"{home}/go", f"{self.number} {size} {count}")
            with trio.fail_after(120):
                while True:
                    try:
                        text = (await xs.read(f"{home}/result")).decode()
                    except Exception:
                        text = ""
                    number, *result = text.split() or ["0"]
                    if int(number) == self.number:
                        break
                    await self._check_alive(xs, domids)
                    await trio.sleep(0.05)
            await trio.sleep(STATISTICS_INTERVAL + 0.2)  # netback publishes them once a second
            drops_after = await self._vif_drops(xs, domids)
        for name, pid in self.hosts.items():
            costs.add(name, f"{size}B", process_usage(pid) - before[name], count)
        received, nbytes, elapsed, *usages = result
        for name, (cpu, switches, sends) in (("receiver", usages[0:3]), ("sender", usages[4:7])):
            costs.add(name, f"{size}B", Usage(float(cpu), int(switches)), count, int(sends))
        drops = {key: drops_after[key] - drops_before[key] for key in drops_after}
        drops["receiver socket (its receive queue full)"] = int(usages[3])
        return int(received), int(nbytes), float(elapsed), drops

    def close(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "xenlike", "down"], env=self.env, capture_output=True, timeout=60
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    counts = {"raw": 5_000 if args.quick else 100_000, "xenlike": 2_000 if args.quick else 40_000}
    sizes = (64, 1400)
    rates: dict[tuple[str, int], list[float]] = {}
    lost: dict[tuple[str, int], list[float]] = {}
    where: dict[tuple[int, str], list[float]] = {}  # xenlike's losses, by where they happened
    costs = Costs()
    with tempfile.TemporaryDirectory(prefix="xenlike-bench-net-") as tmp:
        raw = Raw()
        guests = Guests(Path(tmp))
        try:
            for _ in range(rounds):
                for size in sizes:
                    for name in ("raw", "xenlike"):
                        count = counts[name]
                        if name == "raw":
                            received, nbytes, elapsed = raw.round(size, count, costs)
                        else:
                            received, nbytes, elapsed, drops = trio.run(
                                guests.round, size, count, costs
                            )
                            drops["unaccounted"] = count - received - sum(drops.values())
                            for path, dropped in drops.items():
                                where.setdefault((size, path), []).append(dropped / count)
                        rate = (received - 1) / elapsed if elapsed > 0 else 0.0
                        rates.setdefault((name, size), []).append(
                            rate if size == 64 else rate * size / 1e6
                        )
                        lost.setdefault((name, size), []).append(1 - received / count)
        finally:
            guests.close()
            raw.close()
    med = {key: statistics.median(values) for key, values in rates.items()}
    print(
        f"rounds: {rounds} (medians); bursts of {counts['raw']} (raw) and "
        f"{counts['xenlike']} (xenlike) datagrams"
    )
    print(f"raw loopback UDP, 64-byte payloads: {med['raw', 64]:,.0f} packets/s")
    print(f"xenlike guest to guest, 64-byte payloads: {med['xenlike', 64]:,.0f} packets/s")
    print(f"raw loopback UDP, 1400-byte payloads: {med['raw', 1400]:.1f} MB/s")
    print(f"xenlike guest to guest, 1400-byte payloads: {med['xenlike', 1400]:.1f} MB/s")
    for key, values in sorted(lost.items()):
        print(f"{key[0]} {key[1]}-byte datagrams lost: {statistics.median(values):.1%}")
    for (size, path), values in sorted(where.items()):
        print(f"  xenlike {size}-byte datagrams dropped at {path}: {statistics.median(values):.1%}")
    print("\n".join(costs.lines()))
    print(f"ratio packets_per_second: {med['xenlike', 64] / med['raw', 64]:.3f}")
    print(f"ratio megabytes_per_second: {med['xenlike', 1400] / med['raw', 1400]:.3f}")


if __name__ == "__main__":
    main()
