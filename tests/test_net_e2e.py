"""The PV network end to end under `xenlike up`: guests, Dom0's bridge, real peers.

The guest programs the topologies run are in this module too
(`init = "tests.test_net_e2e:chatter"`). Real peers (ping, a UDP socket,
tshark) run only inside a network namespace the test creates, never on
the host's own network.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from domains.guest import Guest
from tests.test_up import wait_for, xenlike
from xenlike.tools.pcap import read_records
from xenlike.xenstore import XenStoreError

ECHO_PORT, HOST_PORT = 7000, 7001
HOST_IP = "10.0.0.254"


# --- guest programs ----------------------------------------------------------------------


def _params(guest: Guest) -> dict[str, str]:
    return dict(word.split("=", 1) for word in guest.cmdline.split() if "=" in word)


async def _echo(guest: Guest, sock: Any) -> None:
    while True:
        data, sender = await sock.recvfrom()
        print(f"[{guest.name}] udp from {sender[0]}:{sender[1]}: {data.decode()}")
        await sock.sendto(b"echo:" + data, sender)


async def _written(guest: Guest, key: str) -> bool:
    try:
        await guest.xs.read(key)
        return True
    except XenStoreError:
        return False


async def chatter(guest: Guest) -> None:
    """Answers UDP on ECHO_PORT; pings `peer=` and talks to its echo port every 0.2 s, and
    greets `host=` (a real host's UDP port) if given, printing each outcome with a time.
    With `reconnect=1` the vif reconnects once `data/go` is written, as a reloaded
    netfront does."""
    params = _params(guest)
    iface = guest.net()
    print(f"[{guest.name}] up as {iface.address}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_echo, guest, iface.udp(ECHO_PORT))
        client = iface.udp()
        number = 0
        reconnect = params.get("reconnect") == "1"
        while True:
            number += 1
            if reconnect and await _written(guest, "data/go"):
                reconnect = False
                vif = guest.device("vif")
                await vif.reconnect()
                while vif.connected_now:  # until the old rings are gone
                    await trio.sleep(0.01)
                await vif.wait_connected()
                with trio.move_on_after(5):  # the control ring's ADD_GREF_MAPPING follows
                    while not vif.static_grants:
                        await trio.sleep(0.01)
                print(f"[{guest.name}] reconnected; static grants: {vif.static_grants}")
            if "host" in params:
                await client.sendto(
                    f"hello host from {guest.name}".encode(), (params["host"], HOST_PORT)
                )
            if "peer" in params:
                try:
                    rtt = await iface.ping(params["peer"], timeout=1)
                    print(f"[{guest.name}] ping ok {rtt * 1000:.1f} ms at {time.time():.3f}")
                except OSError as exc:  # TimeoutError, HostUnreachable
                    print(f"[{guest.name}] ping lost at {time.time():.3f}: {exc}")
                await client.sendto(
                    f"message {number} from {guest.name}".encode(), (params["peer"], ECHO_PORT)
                )
                with trio.move_on_after(1):
                    data, _ = await client.recvfrom()
                    print(f"[{guest.name}] udp reply: {data.decode()}")
            await trio.sleep(0.2)


def _raw_tx(
    vif: Any, *, size: int, offset: int = 0, gref: int | None = None, data: bytes = b""
) -> int:
    """One tx request written straight on the ring, as a broken or hostile front end
    would; its slot (its id)."""
    slot = vif._tx_free.pop()
    vif._tx_busy[slot] = 1
    vif._tx_pages[slot][offset : offset + len(data)] = data
    vif._tx.put_request((vif._tx_refs[slot] if gref is None else gref, offset, 0, slot, size))
    if vif._tx.push_requests():
        vif._port.notify()
    return slot


async def hostile(guest: Guest) -> None:
    """Once `data/go` is written: floods the bridge, sends malformed and spoofed frames,
    then one only a malicious front end sends: offset + size past its page."""
    vif = guest.device("vif")
    params = _params(guest)
    victim = bytes.fromhex(params["victim"].replace(":", ""))
    junk = b"\xff" * 6 + vif.mac + b"\x88\xb5" + bytes(46)
    async with guest.xs.watch("data/go") as events:
        async for _ in events:
            if await _written(guest, "data/go"):  # a watch also fires once at once
                break
    start = time.time()
    sent = 0
    while time.time() - start < float(params.get("flood", "3")):
        for _ in range(64):
            await vif.transmit(junk)
        sent += 64
        await trio.sleep(0)
    print(f"[{guest.name}] flood from {start:.3f} to {time.time():.3f}: {sent} frames")
    with trio.fail_after(10):  # the raw requests below need free slots: the flood's answered
        while len(vif._tx_free) < 8:
            vif._collect_tx()
            await trio.sleep(0.01)
    before = dict(vif.stats)
    raw_slots = {
        _raw_tx(vif, size=10, data=junk),  # a runt
        _raw_tx(vif, size=0),
        _raw_tx(vif, size=1600, data=junk + bytes(1600)),  # over the MTU
        _raw_tx(vif, size=60, gref=2000, data=junk),  # a grant never given
    }
    await vif.transmit(b"\xff" * 6 + victim + b"\x88\xb5" + bytes(46))  # spoofed source

    def refused() -> tuple[int, int]:
        return (
            vif.stats["tx_errors"] - before["tx_errors"],
            vif.stats["tx_dropped"] - before["tx_dropped"],
        )

    # All five answered: the four raw slots are free again and four refusals are
    # counted (tx responses are reaped lazily, on a send: reap them here). The
    # flood's last answers may come in meanwhile, so a count of free slots alone
    # could be reached before these.
    with trio.fail_after(10):
        while not raw_slots <= set(vif._tx_free) or sum(refused()) < 4:
            vif._collect_tx()
            await trio.sleep(0.01)
    errors, dropped = refused()
    print(f"[{guest.name}] malformed: {errors} errors, {dropped} dropped")
    _raw_tx(vif, size=200, offset=4000, data=junk)
    print(f"[{guest.name}] sent a request crossing its page")
    await trio.sleep_forever()


# --- helpers ----------------------------------------------------------------------------


def console(run_dir: Path, name: str) -> str:
    path = run_dir / "console" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def pings(text: str) -> list[tuple[float, bool]]:
    """(time, answered) of each ping a chatter printed."""
    return [
        (float(stamp), outcome == "ok")
        for outcome, stamp in re.findall(r"ping (ok|lost) .*?at (\d+\.\d+)", text)
    ]


def tshark_problems(path: Path) -> tuple[set[str], list[str]]:
    """The protocols tshark finds in a capture, and its warnings and errors, checksums checked."""
    result = subprocess.run(
        [
            "tshark",
            "-r",
            str(path),
            "-o",
            "ip.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "frame.protocols",
            "-e",
            "_ws.expert.severity",
            "-e",
            "_ws.expert.message",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    protocols, problems = set(), []
    for line in result.stdout.splitlines():
        stack, severity, message = (line.split("\t") + ["", ""])[:3]
        protocols.update(stack.split(":"))
        # 0x00600000 is PI_WARN: checksum errors, malformed packets and worse
        if any(int(value) >= 0x00600000 for value in severity.split(",") if value):
            problems.append(f"{stack}: {message}")
    return protocols, problems


@pytest.fixture
def run_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "run"
    yield path
    subprocess.run(
        [sys.executable, "-m", "xenlike", "down", "--run-dir", str(path)],
        capture_output=True,
        timeout=60,
    )


def topology(path: Path, nic: str, guests: list[tuple[str, str, str]]) -> Path:
    """A topology file: Dom0 with `nic`, and (name, program, extra) guests on 10.0.0.0/24."""
    text = f'[host]\nname = "net"\n\n[dom0]\nmemory = 64\nnic = "{nic}"\n'
    for number, (name, program, extra) in enumerate(guests, start=1):
        text += (
            f'\n[[domain]]\nname = "{name}"\nmemory = 16\n'
            f'init = "tests.test_net_e2e:{program}"\nextra = "{extra}"\n'
            f'vif = ["mac=00:16:3e:00:01:{number:02x}, ip=10.0.0.{number}/24"]\n'
        )
    path.write_text(text)
    return path


# --- tests --------------------------------------------------------------------------------


def test_guests_talk_over_xenbr0_and_captures_decode(run_dir: Path, tmp_path: Path) -> None:
    """Ping and UDP between two guests; `xenlike capture` and the pcap NIC record it all."""
    file = topology(
        tmp_path / "net.toml",
        "pcap:wire.pcap",
        [("alpha", "chatter", "peer=10.0.0.2"), ("beta", "chatter", "peer=10.0.0.1 reconnect=1")],
    )
    xenlike("up", str(file), "--detach", run_dir=run_dir)
    xenlike("xenstore", "write", "/local/domain/2/data/go", "1", run_dir=run_dir)

    def after_reconnect() -> str:
        return console(run_dir, "beta").partition("reconnected; static grants")[2]

    wait_for(
        lambda: "udp reply: echo:" in after_reconnect() and "from alpha" in after_reconnect(),
        what="both ways after beta's vif reconnected",
    )
    assert after_reconnect().startswith(": True")
    capture = tmp_path / "capture.pcap"
    result = xenlike(
        "capture", "xenbr0", "-w", str(capture), "--count", "12", run_dir=run_dir, timeout=60
    )
    assert "capture: 12 frame(s) from xenbr0" in result.stderr
    missing = xenlike(
        "capture", "xenbr7", "-w", str(tmp_path / "none.pcap"), run_dir=run_dir, check=False
    )
    assert missing.returncode == 1 and "no bridge 'xenbr7'" in missing.stderr
    alpha = console(run_dir, "alpha")
    assert "udp from 10.0.0.2" in alpha and "udp reply: echo:message" in alpha
    assert all(answered for _, answered in pings(console(run_dir, "beta"))[1:])
    assert "leaking" not in (run_dir / "domains" / "2.log").read_text()
    devices = json.loads(xenlike("devices", "alpha", "--json", run_dir=run_dir).stdout)
    (vif,) = devices
    assert (vif["type"], vif["frontend_state"], vif["backend_state"]) == (
        "vif",
        "Connected",
        "Connected",
    )
    assert vif["features"]["frontend/request-rx-copy"] == "1"
    counters = "/local/domain/0/backend/vif/1/0/statistics"
    wait_for(
        lambda: (
            int(
                xenlike(
                    "xenstore", "read", f"{counters}/rx_packets", run_dir=run_dir, check=False
                ).stdout
                or 0
            )
            > 0
        ),
        what="netback's statistics in XenStore",
    )
    xenlike("down", run_dir=run_dir)
    wire = run_dir / "wire.pcap"
    frames = [frame for _, frame in read_records(wire.read_bytes())]
    kinds = {frame[12:14] for frame in frames}
    assert {b"\x08\x06", b"\x08\x00"} <= kinds  # ARP and IPv4, from the boot on
    if shutil.which("tshark") is None:
        pytest.skip("tshark is not installed: the captures were checked by xenlike.tools.pcap only")
    for path in (capture, wire):
        protocols, problems = tshark_problems(path)
        assert problems == [], f"{path.name}: {problems}"
        assert {"icmp", "udp"} <= protocols, f"{path.name}: {protocols}"
    assert "arp" in tshark_problems(wire)[0]


def _netns_available() -> str | None:
    """Why a TAP in a network namespace cannot be used here (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces and TAP devices need root"
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, iputils-ping)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    return None


HOST_PEER = f"""
import json, socket
host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
host.bind(("{HOST_IP}", {HOST_PORT}))
host.settimeout(10)
greeting, sender = host.recvfrom(2048)
client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
client.settimeout(10)
client.sendto(b"hello guest from the host", ("10.0.0.1", {ECHO_PORT}))
reply, replier = client.recvfrom(2048)
print(json.dumps({{"greeting": greeting.decode(), "sender": sender[0],
                  "reply": reply.decode(), "replier": list(replier)}}))
"""


def test_a_real_host_pings_and_exchanges_udp_with_a_guest_through_a_tap(
    run_dir: Path, tmp_path: Path
) -> None:
    reason = _netns_available()
    if reason is not None:
        pytest.skip(reason)
    netns = f"xltest-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(["ip", "netns", "add", netns], capture_output=True, text=True)
    if created.returncode != 0:
        pytest.skip(f"ip netns add failed: {created.stderr.strip()}")
    inside = ["ip", "netns", "exec", netns]
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        file = topology(
            tmp_path / "tap.toml",
            "tap:xltap0",
            [("alpha", "chatter", f"host={HOST_IP}"), ("beta", "chatter", "peer=10.0.0.1")],
        )
        env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
        subprocess.run(
            [*inside, sys.executable, "-m", "xenlike", "up", str(file), "--detach"],
            check=True,
            capture_output=True,
            env=env,
            timeout=120,
        )
        if "no NIC" in (run_dir / "domains" / "0.log").read_text():
            pytest.skip(
                "Dom0 could not create the TAP device: "
                + (run_dir / "domains" / "0.log").read_text().split("no NIC: ")[1][:200]
            )
        subprocess.run([*inside, "ip", "addr", "add", f"{HOST_IP}/24", "dev", "xltap0"], check=True)
        subprocess.run([*inside, "ip", "link", "set", "xltap0", "up"], check=True)
        ping = subprocess.run(
            [*inside, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        ping = subprocess.run(
            [*inside, "ping", "-c", "2", "-s", "1400", "-W", "2", "10.0.0.2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ping.returncode == 0, ping.stdout
        peer = subprocess.run(
            [*inside, sys.executable, "-c", HOST_PEER], capture_output=True, text=True, timeout=30
        )
        assert peer.returncode == 0, peer.stderr
        result = json.loads(peer.stdout)
        assert result == {
            "greeting": "hello host from alpha",
            "sender": "10.0.0.1",
            "reply": "echo:hello guest from the host",
            "replier": ["10.0.0.1", ECHO_PORT],
        }
        assert "udp from 10.0.0.254" in console(run_dir, "alpha")
        neighbours = subprocess.run(
            [*inside, "ip", "neigh", "show", "10.0.0.1"], capture_output=True, text=True
        ).stdout
        assert "00:16:3e:00:01:01" in neighbours  # the host resolved the guest with ARP
    finally:
        subprocess.run(
            [sys.executable, "-m", "xenlike", "down", "--run-dir", str(run_dir)],
            capture_output=True,
            timeout=60,
        )
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True)


def test_a_hostile_guest_is_cut_off_while_the_others_keep_working(
    run_dir: Path, tmp_path: Path
) -> None:
    file = topology(
        tmp_path / "hostile.toml",
        "none",
        [
            ("alpha", "chatter", "peer=10.0.0.2"),
            ("beta", "chatter", "peer=10.0.0.1"),
            ("mallory", "hostile", "victim=00:16:3e:00:01:01 flood=3"),
        ],
    )
    xenlike("up", str(file), "--detach", run_dir=run_dir)
    wait_for(  # the others talk before the flood starts
        lambda: all("ping ok" in console(run_dir, name) for name in ("alpha", "beta")),
        timeout=30,
        what="alpha's and beta's first pings",
    )
    xenlike("xenstore", "write", "/local/domain/3/data/go", "1", run_dir=run_dir)
    wait_for(
        lambda: "crossing its page" in console(run_dir, "mallory"),
        timeout=60,
        what="mallory's last request",
    )
    mallory = console(run_dir, "mallory")
    assert "malformed: 3 errors, 1 dropped" in mallory, mallory
    start, end = map(float, re.search(r"flood from (\S+) to (\S+):", mallory).groups())
    wait_for(
        lambda: all(
            any(stamp > end + 1 for stamp, _ in pings(console(run_dir, name)))
            for name in ("alpha", "beta")
        ),
        timeout=30,
        what="pings after the disconnection",
    )
    for name in ("alpha", "beta"):
        during = [ok for stamp, ok in pings(console(run_dir, name)) if start <= stamp <= end]
        after = [ok for stamp, ok in pings(console(run_dir, name)) if stamp > end + 1]
        assert sum(during) >= 5 and len(during) - sum(during) <= 1, (name, during)
        assert after and all(after), (name, after)
    (device,) = json.loads(xenlike("devices", "mallory", "--json", run_dir=run_dir).stdout)
    assert device["backend_state"] in ("Closing", "Closed"), device
    assert any("crosses its page" in error for error in device["errors"]), device
    assert (
        "dropped frames from vif3.0 with source 00:16:3e:00:01:01"
        in (run_dir / "domains" / "0.log").read_text()
    )
    names = [row["name"] for row in json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)]
    assert names == ["Domain-0", "alpha", "beta", "mallory"]
