"""XenStore over the Unix socket and over a ring page: xenlike against a raw baseline.

    python bench/xenstore.py [--quick]

Measures reads, writes and directory listings per second (1 / the median
time of one operation, one request in flight) and watch-event latency,
through `xenlike.xenstore.open_client` against `python -m xenlike.xenstore`. The baseline
sends the very same request bytes over the same kind of socket to a trivial trio server that
answers each with the reply bytes xenstored gave (captured at start), with
no store behind it, read by a bare client. Both servers are separate
processes, so neither shares the client's event loop. Rounds interleave
(baseline, xenlike, baseline, ...) and the figures are medians of rounds.

The same runs again over the transport a guest uses: a xenstore_domain_interface
page shared by two processes, woken by eventfds (`xenlike.bytering`), with
xenstored (or the canned server) in the other process.

Then xenlike's xenstored beside the real C xenstored of Xen 4.17 (Debian's
xen-utils-4.17 under an LD_PRELOAD shim, see tests/cxenstored), with 1 and 4
client processes each sending reads, writes and listings in turn, one
request in flight per client, bare sockets. Rounds interleave the two
daemons; each daemon's CPU time per operation comes from /proc.

The last lines are `ratio NAME: VALUE`, xenlike's rate over the baseline's
(for latency, the baseline's latency over xenlike's): 1.0 means no cost.
The `cxenstored_*` ratios are xenlike's ops/s over cxenstored's.
"""

import argparse
import json
import mmap
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from xenlike._eventfd import EventFd
from xenlike.abi.xs_wire import XS_DIRECTORY, XS_READ, XS_WATCH, XS_WATCH_EVENT, XS_WRITE
from xenlike.bytering import XENSTORE, ByteRing, ByteRingStream
from xenlike.testing import CrossedDoorbell, doorbell_pair
from xenlike.xenstore import (
    Client,
    MessageReader,
    XenStored,
    XsMessage,
    connect_stream,
    open_client,
)

HEADER = struct.Struct("<IIII")
TOKEN = "bench"
CHILDREN = [f"vif{i}" for i in range(16)]
SETUP = [("/bench/key", b"v" * 64), *((f"/bench/dir/{name}", b"1") for name in CHILDREN)]
# The requests timed; "watch" is a write to a node this connection watches.
REQUESTS = {
    "read": XsMessage(XS_READ, 0, 0, b"/bench/key\0"),
    "write": XsMessage(XS_WRITE, 0, 0, b"/bench/written\0" + b"w" * 64),
    "ls": XsMessage(XS_DIRECTORY, 0, 0, b"/bench/dir\0"),
    "watch": XsMessage(XS_WRITE, 0, 0, b"/bench/watched\0x"),
}


# -- the baseline server: canned replies, no store ------------------------------


async def serve_canned(path: str, canned: dict[bytes, bytes]) -> None:
    async def answer(stream: trio.SocketStream) -> None:
        buffer = b""
        while data := await stream.receive_some(65536):
            buffer += data
            replies = []
            while len(buffer) >= HEADER.size:
                end = HEADER.size + HEADER.unpack_from(buffer)[3]
                if len(buffer) < end:
                    break
                replies.append(canned[buffer[:end]])
                buffer = buffer[end:]
            await stream.send_all(b"".join(replies))

    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, answer, [listener])
        print("listening", flush=True)


# -- capturing xenstored's answers -------------------------------------------------


async def capture(path: str) -> dict[bytes, bytes]:
    """Set up the nodes, and record xenstored's reply bytes to each timed request."""
    stream = await trio.open_unix_socket(path)
    reader = MessageReader()

    async def receive() -> XsMessage:
        while not isinstance(message := reader.next_message(), XsMessage):
            reader.feed(await stream.receive_some(65536))
        return message

    async def exchange(request: XsMessage) -> bytes:
        """Send a request; the bytes of the watch events it fired and of its reply."""
        await stream.send_all(request.encode())
        received = [await receive()]
        while received[-1].type == XS_WATCH_EVENT:
            received.append(await receive())
        return b"".join(message.encode() for message in received)

    for node, value in SETUP:
        await exchange(XsMessage(XS_WRITE, 0, 0, node.encode() + b"\0" + value))
    await exchange(XsMessage(XS_WATCH, 0, 0, b"/bench/watched\0" + TOKEN.encode() + b"\0"))
    assert (await receive()).type == XS_WATCH_EVENT  # the watch's first event follows its OK
    canned = {request.encode(): await exchange(request) for request in REQUESTS.values()}
    await stream.aclose()
    return canned


# -- the timed loops ------------------------------------------------------------------


async def raw_round(
    path: str, name: str, canned: dict[bytes, bytes], seconds: float
) -> list[float]:
    """Per-operation times of the bare client."""
    async with await trio.open_unix_socket(path) as stream:
        return await _raw_timed(stream, name, canned, seconds)


async def _raw_timed(
    stream: Any, name: str, canned: dict[bytes, bytes], seconds: float
) -> list[float]:
    """The bare client's loop: send the request's bytes, read the reply's length."""
    request = REQUESTS[name].encode()
    expected = len(canned[request])
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        await stream.send_all(request)
        received = 0
        while received < expected:
            received += len(await stream.receive_some(65536))
        times.append(time.perf_counter() - start)
    return times


XENLIKE_OPERATIONS: dict[str, Callable[[Client], Awaitable[object]]] = {
    "read": lambda xs: xs.read("/bench/key"),
    "write": lambda xs: xs.write("/bench/written", b"w" * 64),
    "ls": lambda xs: xs.ls("/bench/dir"),
}


async def xenlike_round(path: str, name: str, seconds: float) -> list[float]:
    """Per-operation times of xenlike's client and xenstored."""
    async with open_client(path) as xs:
        return await _timed(xs, name, seconds)


async def _timed(xs: Client, name: str, seconds: float) -> list[float]:
    """Per-operation times of one kind of request (watch: a write and its event)."""
    times = []
    deadline = time.perf_counter() + seconds
    if name == "watch":
        async with xs.watch("/bench/watched", token=TOKEN) as events:
            await events.__anext__()  # the registration event
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await xs.write("/bench/watched", b"x")
                await events.__anext__()
                times.append(time.perf_counter() - start)
        return times
    operation = XENLIKE_OPERATIONS[name]
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        await operation(xs)
        times.append(time.perf_counter() - start)
    return times


# -- the ring transport ------------------------------------------------------------


class Ring:
    """A XenStore page (a memfd) shared with a server process, and this side's doorbell."""

    def __init__(self, kind: str, canned_path: str) -> None:
        self.fd = os.memfd_create("xsbench-ring")
        os.ftruncate(self.fd, 4096)
        self.page = mmap.mmap(self.fd, 4096)
        self.client_bell, server_bell = doorbell_pair()
        fds = (self.fd, server_bell.mine.fd, server_bell.theirs.fd)
        self.process = start_server(
            [sys.executable, __file__, "--ring-server", kind, canned_path, *map(str, fds)],
            pass_fds=fds,
        )

    def stream(self) -> ByteRingStream:
        view = memoryview(self.page)
        return ByteRingStream(
            ByteRing(view, XENSTORE.to_backend), ByteRing(view, XENSTORE.to_guest), self.client_bell
        )

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


async def ring_server(
    kind: str, canned: dict[bytes, bytes], memfd: int, mine: int, theirs: int
) -> None:
    """The other end of a `Ring`: xenstored, or canned replies with no store."""
    view = memoryview(mmap.mmap(memfd, 4096))
    bell = CrossedDoorbell(EventFd(mine), EventFd(theirs))
    stream = ByteRingStream(
        ByteRing(view, XENSTORE.to_guest), ByteRing(view, XENSTORE.to_backend), bell
    )
    print("listening", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.pump)
        if kind == "xenlike":
            await XenStored().serve_stream(stream, 0)
            return
        buffer = b""
        while data := await stream.receive_some(65536):
            buffer += data
            while len(buffer) >= HEADER.size and len(buffer) >= (
                end := HEADER.size + HEADER.unpack_from(buffer)[3]
            ):
                await stream.send_all(canned[buffer[:end]])
                buffer = buffer[end:]


async def raw_ring_round(
    ring: Ring, name: str, canned: dict[bytes, bytes], seconds: float
) -> list[float]:
    stream = ring.stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.pump)
        times = await _raw_timed(stream, name, canned, seconds)
        nursery.cancel_scope.cancel()
    return times


async def xenlike_ring_round(ring: Ring, name: str, seconds: float) -> list[float]:
    stream = ring.stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.pump)
        async with connect_stream(stream) as xs:
            times = await _timed(xs, name, seconds)
        nursery.cancel_scope.cancel()
    return times


async def bench_ring(
    rounds: int, seconds: float, canned: dict[bytes, bytes], canned_path: str
) -> dict[str, float]:
    raw_ring, our_ring = Ring("raw", canned_path), Ring("xenlike", canned_path)
    try:
        stream = our_ring.stream()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.pump)
            async with connect_stream(stream) as xs:
                for node, value in SETUP:
                    await xs.write(node, value)
            nursery.cancel_scope.cancel()
        raw, ours = await interleaved(
            rounds,
            lambda name: raw_ring_round(raw_ring, name, canned, seconds),
            lambda name: xenlike_ring_round(our_ring, name, seconds),
        )
    finally:
        raw_ring.stop()
        our_ring.stop()
    return _report(
        "xenstore over a ring page (eventfd doorbells)", rounds, seconds, raw, ours, "ring_"
    )


async def interleaved(
    rounds: int,
    raw_round: Callable[[str], Awaitable[list[float]]],
    our_round: Callable[[str], Awaitable[list[float]]],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Each request's rounds, raw and xenlike in turn. Per round, the median time
    of one operation: robust to the stalls other processes on the machine cause."""
    raw: dict[str, list[float]] = {name: [] for name in REQUESTS}
    ours: dict[str, list[float]] = {name: [] for name in REQUESTS}
    for _ in range(rounds):
        for name in REQUESTS:
            raw[name].append(statistics.median(await raw_round(name)))
            ours[name].append(statistics.median(await our_round(name)))
    return raw, ours


def start_server(argv: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, pass_fds=pass_fds)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening" not in line:
        raise SystemExit(f"server {argv} did not start: {line!r}")
    return process


async def bench(rounds: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="xsbench") as tmp:
        xs_path, raw_path, canned_path = (
            os.path.join(tmp, n) for n in ("xs.sock", "raw.sock", "canned")
        )
        servers = [start_server([sys.executable, "-m", "xenlike.xenstore", "--socket", xs_path])]
        try:
            canned = await capture(xs_path)
            with open(canned_path, "w") as file:
                json.dump({k.hex(): v.hex() for k, v in canned.items()}, file)
            servers.append(
                start_server([sys.executable, __file__, "--raw-server", raw_path, canned_path])
            )
            raw, ours = await interleaved(
                rounds,
                lambda name: raw_round(raw_path, name, canned, seconds),
                lambda name: xenlike_round(xs_path, name, seconds),
            )
        finally:
            for server in servers:
                server.terminate()
                server.wait()
        ratios = _report("xenstore over a Unix socket", rounds, seconds, raw, ours, "")
        ring_ratios = await bench_ring(rounds, seconds, canned, canned_path)
    peer_ratios = bench_peer(rounds, seconds * 2)
    for name, ratio in {**ratios, **ring_ratios, **peer_ratios}.items():
        print(f"ratio {name}: {ratio:.2f}")


# -- beside the real C xenstored ------------------------------------------------------

CLIENT_COUNTS = (1, 4)
MIX = [REQUESTS[name].encode() for name in ("read", "write", "ls")]


def run_client(socket_path: str, seconds: float) -> None:
    """One client process: connect, say "ready", read the start time (time.time()) from
    stdin, then send requests in turn for `seconds` and print how many got their reply.
    Blocking sockets, so the client costs as little as it can."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    buffer = b""
    done = 0
    time.sleep(max(0.0, start - time.time()))
    deadline = start + seconds
    while time.time() < deadline:
        sock.sendall(MIX[done % len(MIX)])
        while True:
            if len(buffer) >= HEADER.size:
                end = HEADER.size + HEADER.unpack_from(buffer)[3]
                if len(buffer) >= end:
                    buffer = buffer[end:]
                    break
            buffer += sock.recv(65536)
        done += 1
    print(done, flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peer_round(socket_path: str, pid: int, clients: int, seconds: float) -> tuple[float, float]:
    """ops/s of `clients` client processes against one daemon, and its CPU seconds per op."""
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", socket_path, repr(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(clients)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    start = time.time() + 0.05
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{start!r}\n")
        process.stdin.close()
    time.sleep(max(0.0, start - time.time()))
    cpu_before = cpu_seconds(pid)
    time.sleep(seconds)
    cpu_used = cpu_seconds(pid) - cpu_before
    done = 0
    for process in processes:
        assert process.stdout is not None
        out = process.stdout.read()
        process.wait()
        if process.returncode:
            raise SystemExit(f"a client of {socket_path} failed")
        done += int(out)
    return done / seconds, cpu_used / max(done, 1)


def _setup_nodes(socket_path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    reader = MessageReader()
    for node, value in SETUP:
        sock.sendall(XsMessage(XS_WRITE, 0, 0, node.encode() + b"\0" + value).encode())
        while not isinstance(reader.next_message(), XsMessage):
            reader.feed(sock.recv(65536))
    sock.close()


def bench_peer(rounds: int, seconds: float) -> dict[str, float]:
    """xenlike's xenstored and cxenstored, side by side; their ratios (empty if no cxenstored)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.cxenstored import Unavailable, running

    print(
        f"beside cxenstored (Xen 4.17, C): {rounds} interleaved rounds of {seconds}s, "
        "clients sending read, write and ls in turn"
    )
    try:
        peer = running()
        cxenstored = peer.__enter__()
    except Unavailable as error:
        print(f"cxenstored unavailable, no comparison: {error}")
        return {}
    with tempfile.TemporaryDirectory(prefix="xsbench") as tmp:
        xs_path = os.path.join(tmp, "xs.sock")
        ours = start_server([sys.executable, "-m", "xenlike.xenstore", "--socket", xs_path])
        try:
            daemons = {
                "xenlike": (xs_path, ours.pid),
                "cxenstored": (cxenstored.socket_path, cxenstored.pid),
            }
            for path, _ in daemons.values():
                _setup_nodes(path)
            rates: dict[tuple[str, int], list[float]] = {}
            costs: dict[tuple[str, int], list[float]] = {}
            for _ in range(rounds):
                for clients in CLIENT_COUNTS:
                    for name, (path, pid) in daemons.items():
                        rate, cost = peer_round(path, pid, clients, seconds)
                        rates.setdefault((name, clients), []).append(rate)
                        costs.setdefault((name, clients), []).append(cost)
        finally:
            ours.terminate()
            ours.wait()
            peer.__exit__(None, None, None)
    ratios = {}
    for clients in CLIENT_COUNTS:
        label = f"{clients}client" + ("s" if clients > 1 else "")
        for name in daemons:
            rate = statistics.median(rates[name, clients])
            cost = statistics.median(costs[name, clients])
            print(f"{name} {label}: {rate:.0f} ops/s, {cost * 1e6:.1f} us CPU per op")
        ratios[f"cxenstored_{label}"] = statistics.median(
            rates["xenlike", clients]
        ) / statistics.median(rates["cxenstored", clients])
    return ratios


def _report(
    title: str,
    rounds: int,
    seconds: float,
    raw: dict[str, list[float]],
    ours: dict[str, list[float]],
    prefix: str,
) -> dict[str, float]:
    """Print one transport's figures; return its ratios (xenlike rate / raw rate)."""
    print(f"{title}: {rounds} interleaved rounds of {seconds}s, one request in flight")
    ratios = {}
    for name in REQUESTS:
        raw_time, our_time = statistics.median(raw[name]), statistics.median(ours[name])
        ratios[prefix + name] = raw_time / our_time
        if name == "watch":
            print(f"raw {prefix}watch-event latency: {raw_time * 1e6:.1f} us")
            print(f"xenlike {prefix}watch-event latency: {our_time * 1e6:.1f} us")
        else:
            print(f"raw {prefix}{name}: {1 / raw_time:.0f} ops/s")
            print(f"xenlike {prefix}{name}: {1 / our_time:.0f} ops/s")
    return ratios


def _load_canned(path: str) -> dict[bytes, bytes]:
    with open(path) as file:
        return {bytes.fromhex(k): bytes.fromhex(v) for k, v in json.load(file).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--raw-server", nargs=2, metavar=("SOCKET", "CANNED"), help=argparse.SUPPRESS
    )
    parser.add_argument("--ring-server", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        socket_path, seconds = args.client
        run_client(socket_path, float(seconds))
        return
    if args.ring_server:
        kind, canned_path, *fds = args.ring_server
        trio.run(ring_server, kind, _load_canned(canned_path), *map(int, fds))
        return
    if args.raw_server:
        socket_path, canned_path = args.raw_server
        trio.run(serve_canned, socket_path, _load_canned(canned_path))
        return
    rounds, seconds = (3, 0.15) if args.quick else (7, 0.5)
    trio.run(bench, rounds, seconds)


if __name__ == "__main__":
    main()
