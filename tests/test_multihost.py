"""Hosts joined at layer 2 by the kernel's VXLAN, and guests that say where they are.

Two network namespaces are two hosts: a veth pair is the wire between them
(10.99.0.1 and 10.99.0.2, MTU 1550 so that 1500-byte guest frames fit in
VXLAN), and `xenlike up` runs in each with the topologies docs/multihost.md
shows (`[dom0] nic = "vxlan:42"`). A guest on one pings a guest on the
other, and tshark on the wire decodes the VXLAN datagrams; then a guest
moves to the other host (save there, restore here) and the VXLAN device it
left learns where it went from its announcement. Nothing reaches the
host's own network; the namespaces are deleted at the end, whatever
happened.

Then a guest's gratuitous ARP (netfront's, on every connection, as Linux's
netdev_notify_peers): after a checkpoint and after a restore, a capture of
xenbr0 sees it announce its MAC and IP.
"""

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from domains.dom0.hw.tunnel import UplinkNames, overhead
from domains.guest.net.wire import ARP, ARP_REQUEST, ETHERNET
from drivers.netif.front import gratuitous_arp
from tests.test_up import wait_for, xenlike
from xenlike.tools.pcap import read_records
from xenlike.topology import TopologyError, parse_topology

VNI = 42
WIRE = {"a": "10.99.0.1", "b": "10.99.0.2"}
PAGE = Path(__file__).resolve().parent.parent / "docs" / "multihost.md"
SHOWN = dict(re.findall(r"```toml\n# file: (\S+)\n(.*?)```", PAGE.read_text(), re.S))
TOPOLOGY = {"a": SHOWN["left.toml"], "b": SHOWN["right.toml"]}
HOST = {"a": "left", "b": "right"}
GUEST = {
    "a": ("alpha", "00:16:3e:00:00:01", "10.0.0.1"),
    "b": ("beta", "00:16:3e:00:00:02", "10.0.0.2"),
}


# --- the topology's keys ---------------------------------------------------------------


def test_a_vxlan_nic_with_its_tunnel_ends_parses() -> None:
    topology = parse_topology(TOPOLOGY["a"])
    assert topology.name == "left" and topology.dom0.nic == "vxlan:42" and topology.vni == 42
    assert topology.local == "10.99.0.1" and topology.peers == ("10.99.0.2",)
    assert parse_topology("").vni is None and parse_topology("").peers == ()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ('[dom0]\nnic = "vxlan:x"\n', 2, "a VXLAN segment is a number (VNI) from 0 to 16777215"),
        ('[dom0]\nnic = "vxlan:16777216"\n', 2, "(VNI) from 0 to 16777215"),
        ('[dom0]\nnic = "vxlan:1"\n', 2, '[host] needs local = "ADDRESS"'),
        ('[host]\npeers = ["10.0.0.2"]\n', 2, 'peers = ...: only for [dom0] nic = "vxlan:VNI"'),
        ('[host]\nlocal = "10.0.0.1"\n', 2, 'local = ...: only for [dom0] nic = "vxlan:VNI"'),
        (
            '[host]\nlocal = "nowhere"\npeers = ["10.0.0.2"]\n[dom0]\nnic = "vxlan:1"\n',
            2,
            "local: 'nowhere' is not a unicast IP address",
        ),
        (
            '[host]\nlocal = "10.0.0.1"\npeers = ["239.1.1.1"]\n[dom0]\nnic = "vxlan:1"\n',
            3,
            "without multicast",
        ),
        (
            '[host]\nlocal = "10.0.0.1"\npeers = []\n[dom0]\nnic = "vxlan:1"\n',
            3,
            "a list of the other hosts' addresses",
        ),
        (
            '[host]\nlocal = "10.0.0.1"\npeers = ["10.0.0.1"]\n[dom0]\nnic = "vxlan:1"\n',
            3,
            "peer 10.0.0.1 is this host (local)",
        ),
        (
            '[host]\nlocal = "10.0.0.1"\npeers = ["10.0.0.2", "10.0.0.2"]\n'
            '[dom0]\nnic = "vxlan:1"\n',
            3,
            "peer 10.0.0.2 is listed twice",
        ),
        (
            '[host]\nlocal = "10.0.0.1"\npeers = ["fd00::2"]\n[dom0]\nnic = "vxlan:1"\n',
            3,
            "peer fd00::2: not of the family of local = '10.0.0.1'",
        ),
        (
            "[host]\nvxlan = 1\n",
            2,
            "unknown key 'vxlan' in [host]; expected: images, local, memory",
        ),
    ],
)
def test_tunnel_mistakes_are_one_line_each(text: str, line: int, message: str) -> None:
    with pytest.raises(TopologyError) as caught:
        parse_topology(text, "t.toml")
    found = [str(p) for p in caught.value.problems]
    assert any(p.startswith(f"t.toml:{line}: ") and message in p for p in found), found


def test_device_names_fit_ifnamsiz_and_stay_apart() -> None:
    assert UplinkNames.for_host("left") == UplinkNames("tap-left", "br-left", "vx-left")
    long_one, long_two = (UplinkNames.for_host(f"datacenter-{n}-rack-7") for n in (1, 2))
    assert long_one != long_two
    assert all(len(name) <= 15 for name in long_one.devices + long_two.devices)
    assert overhead("10.0.0.1") == 50 and overhead("fd00::1") == 70


# --- two hosts in two network namespaces --------------------------------------------------


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces, veth and VXLAN devices need root"
    for tool in ("ip", "bridge", "tshark"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2, tshark)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    return None


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def wire() -> Iterator[dict[str, str]]:
    """Two namespaces joined by a veth pair; deleted afterwards, whatever happened."""
    reason = _namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    tag = uuid.uuid4().hex[:6]
    spaces = {side: f"xlmh-{side}-{tag}" for side in "ab"}
    made: list[str] = []
    try:
        for space in spaces.values():
            created = _ip("netns", "add", space)
            if created.returncode != 0:
                pytest.skip(f"ip netns add is refused here: {created.stderr.strip()}")
            made.append(space)
        ends = {"a": f"xla{tag}", "b": f"xlb{tag}"}
        steps: list[tuple[str, ...]] = [
            ("link", "add", ends["a"], "netns", spaces["a"], "type", "veth", "peer", "name")
            + (ends["b"], "netns", spaces["b"]),
        ]
        for side in "ab":
            steps += [
                ("-n", spaces[side], "addr", "add", f"{WIRE[side]}/24", "dev", ends[side]),
                ("-n", spaces[side], "link", "set", ends[side], "mtu", "1550", "up"),
            ]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield {**spaces, "wire": ends["a"]}
    finally:
        for space in made:
            _ip("netns", "delete", space)


def _up(space: str, run_dir: Path, topology: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    command = [sys.executable, "-m", "xenlike", "up", "--detach", str(topology)]
    return subprocess.Popen(
        ["ip", "netns", "exec", space, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _links(space: str) -> str:
    return _ip("-n", space, "-br", "link").stdout


def test_a_guest_pings_a_guest_on_another_host_through_vxlan(
    wire: dict[str, str], tmp_path: Path
) -> None:
    runs = {side: tmp_path / f"run-{side}" for side in "ab"}
    capture = tmp_path / "wire.pcap"
    tshark = subprocess.Popen(
        ["ip", "netns", "exec", wire["a"], "tshark", "-q", "-i", wire["wire"], "-w", str(capture)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: capture.exists(), what="tshark to start capturing")
        starting = {}
        for side in "ab":
            file = tmp_path / f"{side}.toml"
            file.write_text(TOPOLOGY[side])
            starting[side] = _up(wire[side], runs[side], file)
        for process in starting.values():
            output, _ = process.communicate(timeout=120)
            assert process.returncode == 0, output
            assert "every device Connected" in output, output
        for side in "ab":
            names = UplinkNames.for_host(HOST[side])
            links = _links(wire[side])
            assert all(name in links for name in names.devices), links
            log = (runs[side] / "domains" / "0.log").read_text()
            assert f"VXLAN {VNI}, local {WIRE[side]}" in log, log

        def pinged(side: str) -> bool:
            name, other = GUEST[side][0], GUEST["b" if side == "a" else "a"][2]
            console = xenlike("console", name, "--no-follow", run_dir=runs[side]).stdout
            return (
                f"[{name}] ping {other}: reply in" in console
                and f"[{name}] udp echo from {other}: hello from {name}" in console
            )

        wait_for(lambda: pinged("a") and pinged("b"), what="the guests to ping across hosts")

        # beta moves from right to left (save there, restore here): its announcement
        # crosses the tunnel, and right's VXLAN device learns at once that beta's MAC
        # lives behind left now (nothing else of beta's crosses: alpha is on left too).
        right = UplinkNames.for_host(HOST["b"])
        (_, mac_b, _), saved = GUEST["b"], tmp_path / "beta.sav"
        xenlike("save", "beta", str(saved), run_dir=runs["b"])
        xenlike("restore", str(saved), run_dir=runs["a"])

        def learned() -> bool:
            fdb = subprocess.run(
                ["bridge", "-n", wire["b"], "fdb", "show", "dev", right.vxlan],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            return f"{mac_b} dst {WIRE['a']} self" in fdb

        wait_for(learned, what="right's VXLAN device to learn where beta went")
    finally:
        for side in "ab":
            xenlike("down", "--grace", "2", run_dir=runs[side], check=False)
        tshark.terminate()
        tshark.wait(timeout=30)

    for side in "ab":  # down removed the uplink's devices (the reaper may take a moment)
        wait_for(
            lambda side=side: "vx-" not in _links(wire[side]) and "br-" not in _links(wire[side]),
            what="the uplink's devices to go",
        )
    fields = ["ip.src", "ip.dst", "udp.dstport", "vxlan.vni", "eth.src", "icmp.type"]
    decoded = subprocess.run(
        ["tshark", "-r", str(capture), "-d", "udp.port==4789,vxlan", "-Y", "vxlan && icmp"]
        + ["-T", "fields"]
        + [arg for field in fields for arg in ("-e", field)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert decoded.returncode == 0, decoded.stderr
    rows = [line.split("\t") for line in decoded.stdout.splitlines()]
    # (outer source, inner source), (outer destination, inner destination), the UDP port,
    # the VNI, the inner frame's source MAC, echo request (8) or reply (0): both ways.
    (_, mac_a, ip_a), (_, mac_b, ip_b) = GUEST["a"], GUEST["b"]
    a, b = f"{WIRE['a']},{ip_a}", f"{WIRE['b']},{ip_b}"
    seen = {(row[0], row[1], row[2], row[3], row[4].split(",")[-1], row[5]) for row in rows}
    for icmp_type in ("8", "0"):
        assert (a, b, "4789", str(VNI), mac_a, icmp_type) in seen, sorted(seen)
        assert (b, a, "4789", str(VNI), mac_b, icmp_type) in seen, sorted(seen)
    sources = subprocess.run(
        ["tshark", "-r", str(capture), "-d", "udp.port==4789,vxlan", "-Y", "vxlan"]
        + ["-T", "fields", "-e", "eth.src"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    inner = {line.split(",")[-1] for line in sources}
    assert inner == {mac_a, mac_b}, f"the tunnel carried frames of others: {inner}"
    fragments = subprocess.run(
        ["tshark", "-r", str(capture), "-Y", "ip.flags.mf == 1 || ip.frag_offset > 0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fragments.stdout.strip() == "", "VXLAN datagrams were fragmented on the 1550-byte wire"


def test_an_uplink_name_taken_is_one_line_and_a_crashed_hosts_set_is_cleaned(
    wire: dict[str, str], tmp_path: Path
) -> None:
    host = HOST["a"]
    names = UplinkNames.for_host(host)
    file = tmp_path / "left.toml"
    file.write_text(TOPOLOGY["a"])
    run = tmp_path / "run"
    # A device of that name that is not xenlike's: Dom0 refuses, in one line, and
    # nothing of the uplink stays.
    assert _ip("-n", wire["a"], "link", "add", names.bridge, "type", "bridge").returncode == 0
    refused = _up(wire["a"], run, file)
    output, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1, output
    assert f"no NIC: vxlan:{VNI}: device {names.bridge} exists and is not xenlike's" in output, (
        output
    )
    assert names.vxlan not in _links(wire["a"]) and names.tap not in _links(wire["a"])
    assert _ip("-n", wire["a"], "link", "del", names.bridge).returncode == 0

    # A wire that cannot carry a whole guest frame in VXLAN: Dom0 says so, and runs.
    assert _ip("-n", wire["a"], "link", "set", wire["wire"], "mtu", "1500").returncode == 0
    started = _up(wire["a"], run, file)
    assert started.communicate(timeout=120)[0].count("every device Connected") == 1
    try:
        assert (
            f"uplink: peer {WIRE['b']} is reached through {wire['wire']}, MTU 1500: 1500-byte "
            "guest frames need 1550 in VXLAN; raise its MTU, or give the vifs mtu=1450"
        ) in (run / "domains" / "0.log").read_text()

        # A Dom0 killed with its reaper leaves the bridge and the VXLAN device: the next
        # `up` of that host removes them and builds its own.
        # Only this namespace's: a run elsewhere on the machine may have its own.
        ours = set(_ip("netns", "pids", wire["a"]).stdout.split())
        reapers = [
            pid
            for pid in subprocess.run(
                ["pgrep", "-f", f"link del dev {names.vxlan}"], capture_output=True, text=True
            ).stdout.split()
            if pid in ours
        ]
        assert len(reapers) == 1, reapers
        os.kill(int(reapers[0]), 9)
        os.kill(int((run / "hypervisor.pid").read_text()), 9)
        wait_for(lambda: names.tap not in _links(wire["a"]), what="Dom0 to die")
        assert names.vxlan in _links(wire["a"]) and names.bridge in _links(wire["a"])
        xenlike("down", run_dir=run, check=False)  # the stopped run's sockets
        again = _up(wire["a"], run, file)
        assert again.communicate(timeout=120)[0].count("every device Connected") == 1
        log = (run / "domains" / "0.log").read_text()
        assert f"deleted {names.vxlan}, left by a stopped run of host {host!r}" in log, log
        assert f"deleted {names.bridge}, left by a stopped run of host {host!r}" in log, log
    finally:
        xenlike("down", "--grace", "0", run_dir=run, check=False)
    deadline = time.monotonic() + 10
    while names.bridge in _links(wire["a"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert names.bridge not in _links(wire["a"])


# --- a guest's gratuitous ARP, after a resume and after a restore ----------------------------

BETA_MAC, BETA_IP = "00:16:3e:00:00:02", "10.0.0.2"  # the default topology's beta


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("announce") / "run"
    xenlike("up", "--detach", run_dir=path)
    yield path
    xenlike("down", "--grace", "2", run_dir=path, check=False)


@pytest.fixture
def capture(default_run: Path, tmp_path: Path) -> Iterator[Path]:
    """`xenlike capture xenbr0 -w FILE` running; FILE fills as frames cross."""
    file = tmp_path / "xenbr0.pcap"
    env = {**os.environ, "XENLIKE_RUN_DIR": str(default_run)}
    process = subprocess.Popen(
        [sys.executable, "-m", "xenlike", "capture", "xenbr0", "-w", str(file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for(lambda: file.exists() and file.stat().st_size >= 24, what="the pcap header")
        yield file
    finally:
        process.terminate()
        process.wait(timeout=30)


def announcements(file: Path, mac: str, ip: str) -> int:
    """Gratuitous ARPs in the capture: broadcast ARP requests from `mac` whose sender
    and target address are both `ip`."""
    own, address = bytes.fromhex(mac.replace(":", "")), socket.inet_aton(ip)
    found = 0
    for _, frame in read_records(file.read_bytes()):
        if frame[:6] != b"\xff" * 6 or frame[6:12] != own or frame[12:14] != b"\x08\x06":
            continue
        operation, sender_mac, sender_ip, target_ip = struct.unpack_from("!6xH6s4s6x4s", frame, 14)
        found += (operation, sender_mac, sender_ip, target_ip) == (1, own, address, address)
    return found


def test_netfront_announces_the_guest_after_a_checkpoints_resume(
    default_run: Path, capture: Path, tmp_path: Path
) -> None:
    xenlike("save", "-c", "beta", str(tmp_path / "beta.sav"), run_dir=default_run)
    wait_for(
        lambda: announcements(capture, BETA_MAC, BETA_IP) >= 1,
        what="beta's gratuitous ARP after the resume",
    )


def test_a_restored_guest_announces_its_mac_and_address(
    default_run: Path, capture: Path, tmp_path: Path
) -> None:
    file = tmp_path / "beta.sav"
    xenlike("save", "beta", str(file), run_dir=default_run)
    restored = xenlike("restore", str(file), run_dir=default_run)
    assert restored.stdout.startswith(f"restored beta from {file} as domain ")
    wait_for(
        lambda: announcements(capture, BETA_MAC, BETA_IP) >= 1,
        what="beta's gratuitous ARP after the restore",
    )


def test_netfronts_announcement_is_the_guest_stacks_gratuitous_arp() -> None:
    mac = bytes.fromhex("00163e000002")
    ip = socket.inet_aton(BETA_IP)
    stack = ETHERNET.pack(b"\xff" * 6, mac, 0x0806)
    stack += ARP.pack(1, 0x0800, 6, 4, ARP_REQUEST, mac, ip, bytes(6), ip)
    assert gratuitous_arp(mac, f"{BETA_IP}/24") == stack


def test_without_the_right_to_make_network_devices_up_fails_in_one_line(
    wire: dict[str, str], tmp_path: Path
) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    file = tmp_path / "left.toml"
    file.write_text(TOPOLOGY["a"])
    env = {**os.environ, "XENLIKE_RUN_DIR": str(tmp_path / "run")}
    refused = subprocess.run(
        ["ip", "netns", "exec", wire["a"], "setpriv", "--bounding-set=-net_admin"]
        + ["--inh-caps=-net_admin", "--", sys.executable, "-m", "xenlike", "up", "--detach"]
        + [str(file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert (
        f"no NIC: vxlan:{VNI}: cannot create the TAP device tap-left: Operation not permitted"
        in refused.stderr
    ), refused.stderr
    assert "Traceback" not in refused.stderr
