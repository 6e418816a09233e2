"""Issue #20's done-when: a guest moves between two hosts in two network namespaces.

The hosts of tests/test_multihost.py (two namespaces, a veth wire, xenbr0s joined
by VXLAN 42) share an images directory (`[host] images`). Host left runs alpha
and beta (the demo: each pings the other once a tick); right runs no guest.
First a receiver killed mid-stream (the Proxy of tests/test_migrate.py cuts the
stream after 4 MiB: sender and receiver run outside the namespaces for it, on
the hosts' run directories) leaves beta running on left. Then beta moves over
tcp:// from left to right, sender and receiver each in its host's namespace:
it keeps counting, reads back what it wrote to its disk before the move, and
alpha, which stays on left, keeps getting answers (across the tunnel now, once
beta's announcement taught left's VXLAN device where it went). `xenlike list`
on both hosts agrees after each. Root only; the namespaces are always deleted.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.test_migrate import Proxy, counter, errors, listen, names
from tests.test_multihost import WIRE, _up, wire  # noqa: F401 (a fixture)
from tests.test_up import wait_for, xenlike

HOST = """
[host]
name = "{name}"
local = "{local}"
peers = ["{peer}"]
images = "{images}"

[dom0]
memory = 128
nic = "vxlan:42"
images = {{ "alpha.img" = "64M", "beta.img" = "64M" }}
"""
GUESTS = """
[[domain]]
name = "alpha"
memory = 32
init = "domains.guest.demo:main"
vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0, ip=10.0.0.1/24"]
disk = ["format=raw, vdev=xvda, access=rw, target=alpha.img"]

[[domain]]
name = "beta"
memory = 32
init = "domains.guest.demo:main"
vif = ["mac=00:16:3e:00:00:02, bridge=xenbr0, ip=10.0.0.2/24"]
disk = ["format=raw, vdev=xvda, access=rw, target=beta.img"]
"""


def guests(run_dir: Path) -> list[str]:
    return sorted(name for name in names(run_dir) if name != "Domain-0")


def ping_replies(run_dir: Path) -> int:
    domid = xenlike("domid", "alpha", run_dir=run_dir).stdout.strip()
    read = xenlike(
        "xenstore", "read", f"/local/domain/{domid}/data/ping-replies", run_dir=run_dir, check=False
    )
    return int(read.stdout) if read.returncode == 0 else 0


def test_beta_moves_between_namespaces_over_tcp_and_keeps_talking(
    wire: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    runs = {side: tmp_path / f"run-{side}" for side in "ab"}
    started = []
    try:
        for side, name, peer, extra in (("a", "left", "b", GUESTS), ("b", "right", "a", "")):
            file = tmp_path / f"{name}.toml"
            host = HOST.format(name=name, local=WIRE[side], peer=WIRE[peer], images=images)
            file.write_text(host + extra)
            started.append(runs[side])  # before it can fail: whatever came up goes down
            output, _ = _up(wire[side], runs[side], file).communicate(timeout=120)
            assert "every device Connected" in output, output
        left, right = runs["a"], runs["b"]
        wait_for(lambda: counter(left, "beta") >= 2, what="beta to count")
        wait_for(lambda: ping_replies(left) >= 1, what="alpha to ping beta")

        # A receiver killed mid-stream: beta runs on at the source.
        receiver, url = listen(right)
        proxy = Proxy(url, cut_after=4 << 20, cut=lambda: os.kill(receiver.pid, signal.SIGKILL))
        try:
            failed = xenlike("migrate", "beta", proxy.url, run_dir=left, check=False)
        finally:
            proxy.close()
            receiver.wait(60)
        assert errors(failed.stderr) == ["xenlike: Migration failed, resuming at sender."]
        before = counter(left, "beta")
        wait_for(lambda: counter(left, "beta") > before, what="beta to count on at the source")
        wait_for(lambda: guests(right) == [], what="right to clean up beta--incoming")
        assert guests(left) == ["alpha", "beta"]

        # Over tcp:// between the namespaces.
        env = {**os.environ, "XENLIKE_RUN_DIR": str(right)}
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", wire["b"], sys.executable, "-m", "xenlike"]
            + ["migrate-receive", "--listen", f"{WIRE['b']}:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert receiver.stdout is not None
        url = receiver.stdout.readline().strip()
        assert re.fullmatch(rf"tcp://[A-Za-z0-9_-]+@{re.escape(WIRE['b'])}:\d+", url), url
        before = counter(left, "beta")
        moved = subprocess.run(
            ["ip", "netns", "exec", wire["a"], sys.executable, "-m", "xenlike"]
            + ["migrate", "beta", url],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "XENLIKE_RUN_DIR": str(left)},
        )
        _, receiver_err = receiver.communicate(timeout=60)
        assert moved.returncode == 0 and "Migration successful." in moved.stderr, moved.stderr
        assert receiver.returncode == 0, receiver_err
        assert guests(left) == ["alpha"] and guests(right) == ["beta"]
        wait_for(lambda: counter(right, "beta") > before, what="beta to count on right")
        console = xenlike("console", "beta", "--no-follow", run_dir=right).stdout
        assert "[beta] xvda after the restore: ok" in console, console
        answered = ping_replies(left)
        wait_for(lambda: ping_replies(left) >= answered + 3, what="beta to answer alpha from right")
    finally:
        for run_dir in started:
            xenlike("down", "--grace", "2", run_dir=run_dir, check=False)
