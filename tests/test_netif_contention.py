"""Two guests flood a third through Dom0's bridge: every datagram is delivered or counted.

Real processes under `xenlike up`. The receiving program reads slowly on
purpose, so datagrams pile up and some must be dropped somewhere (netback's
rx queue, the receiving socket); the test checks that each of them is either
delivered or counted in a named drop counter a user can read (netback's
`statistics/` as `xenlike top` shows them, the guest socket's `dropped`, the
front end's `rx_errors`), never silently gone. No timed assertion: the wait
is a liveness bound only.
"""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from domains.guest import Guest
from tests.test_up import wait_for, xenlike
from xenlike.rundir import RunDir
from xenlike.xenstore import XenStoreError, open_client

PORT = 9100
COUNT = 20_000  # datagrams from each sender
SINK_IP = "10.0.0.1"


def _params(guest: Guest) -> dict[str, str]:
    return dict(word.split("=", 1) for word in guest.cmdline.split() if "=" in word)


# --- guest programs ---------------------------------------------------------------------


async def sink(guest: Guest) -> None:
    """Counts what reaches its socket, with a pause of `pause=` ms every 64 datagrams
    (0: none), and publishes `delivered socket_dropped rx_errors` in data/tally as
    they change."""
    pause = float(_params(guest).get("pause", "0")) / 1000
    sock = guest.net().udp(PORT)
    vif = guest.device("vif")
    delivered = 0

    async def publish() -> None:
        published = ""
        while True:
            tally = f"{delivered} {sock.dropped} {vif.stats['rx_errors']}"
            if tally != published:
                await guest.xs.write("data/tally", tally)
                published = tally
            await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish)
        print(f"[{guest.name}] receiving on {SINK_IP}:{PORT}")
        while True:
            await sock.recvfrom()
            delivered += 1
            if pause and delivered % 64 == 0:
                await trio.sleep(pause)


async def flooder(guest: Guest) -> None:
    """Once `data/go` is written, sends `count=` datagrams of `size=` bytes to the sink
    as fast as its tx ring allows, then says so."""
    params = _params(guest)
    iface = guest.net()
    sock = iface.udp()
    await iface.ping(SINK_IP, timeout=10)
    await guest.xs.write("data/ready", "1")
    async with guest.xs.watch("data/go") as events:
        async for _ in events:
            try:
                await guest.xs.read("data/go")
                break
            except XenStoreError:
                continue  # the watch fires once at once, before the key exists
    payload = b"x" * int(params["size"])
    count = int(params["count"])
    for _ in range(count):
        await sock.sendto(payload, (SINK_IP, PORT))
    print(f"[{guest.name}] sent {count}")
    await trio.sleep_forever()


# --- the test ----------------------------------------------------------------------------


def topology(path: Path, size: int, pause: float) -> Path:
    guests = [
        ("sink", "sink", f"pause={pause}"),
        ("alpha", "flooder", f"count={COUNT} size={size}"),
        ("beta", "flooder", f"count={COUNT} size={size}"),
    ]
    text = '[host]\nname = "contention"\n\n[dom0]\nmemory = 64\n'
    for number, (name, program, extra) in enumerate(guests, start=1):
        text += (
            f'\n[[domain]]\nname = "{name}"\nmemory = 32\n'
            f'init = "tests.test_netif_contention:{program}"\nextra = "{extra}"\n'
            f'vif = ["mac=00:16:3e:00:02:{number:02x}, ip=10.0.0.{number}/24"]\n'
        )
    path.write_text(text)
    return path


async def _read_all(socket: Path, paths: dict[str, str]) -> dict[str, str]:
    out = {}
    async with open_client(socket) as xs:
        for name, path in paths.items():
            try:
                out[name] = (await xs.read(path)).decode()
            except XenStoreError:
                out[name] = ""
    return out


def _accounting(run_dir: Path) -> dict[str, int]:
    """Where each datagram went, by name (sink is domain 1, the senders 2 and 3)."""
    stats = "/local/domain/0/backend/vif/{}/0/statistics/{}"
    paths = {
        "tally": "/local/domain/1/data/tally",
        "sink vif rx_dropped": stats.format(1, "rx_dropped"),
        **{
            f"d{domid} vif {key}": stats.format(domid, key)
            for domid in (2, 3)
            for key in ("tx_dropped", "tx_errors")
        },
    }
    values = trio.run(_read_all, RunDir(run_dir).xenstored_socket, paths)
    delivered, socket_dropped, rx_errors = (int(word) for word in values.pop("tally").split())
    return {
        "delivered": delivered,
        "sink socket dropped": socket_dropped,
        "sink netfront rx_errors": rx_errors,
        **{name: int(value or 0) for name, value in values.items()},
    }


def _consoles(run_dir: Path) -> dict[str, str]:
    return {
        name: (run_dir / "console" / f"{name}.log").read_text()
        if (run_dir / "console" / f"{name}.log").exists()
        else ""
        for name in ("sink", "alpha", "beta")
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path
    subprocess.run(
        [sys.executable, "-m", "xenlike", "down", "--run-dir", str(path)],
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("size", "pause"), [(64, 0), (64, 2), (1400, 0)], ids=["64B", "64B-slow-reader", "1400B"]
)
def test_two_senders_flooding_one_receiver_lose_nothing_silently(
    run_dir: Path, tmp_path: Path, size: int, pause: float
) -> None:
    """The sink reads as fast as it can, or slowly (its socket must drop); each
    datagram is delivered or named."""
    file = topology(tmp_path / "contention.toml", size, pause)
    xenlike("up", str(file), "--detach", run_dir=run_dir)

    def ready() -> bool:
        values = trio.run(
            _read_all,
            RunDir(run_dir).xenstored_socket,
            {domid: f"/local/domain/{domid}/data/ready" for domid in ("2", "3")},
        )
        return all(values.values())

    wait_for(ready, timeout=60, what="both senders ready")
    for domid in (2, 3):
        xenlike("xenstore", "write", f"/local/domain/{domid}/data/go", "1", run_dir=run_dir)
    wait_for(
        lambda: all(f"sent {COUNT}" in _consoles(run_dir)[name] for name in ("alpha", "beta")),
        timeout=120,
        what=f"both senders sending {COUNT} datagrams",
    )
    seen: list[dict[str, int]] = []

    def all_accounted() -> bool:
        seen.append(_accounting(run_dir))
        return sum(seen[-1].values()) == 2 * COUNT

    try:
        wait_for(all_accounted, timeout=30, what="every datagram accounted for")
    except AssertionError:
        raise AssertionError(f"{2 * COUNT} sent, accounted: {seen[-1]}") from None
    figures: dict[str, Any] = seen[-1]
    print(figures)
    assert figures["delivered"] > 0
