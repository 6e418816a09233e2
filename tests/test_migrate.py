"""`xenlike migrate`: a running guest moves between two hosts on this machine.

Two real topologies (two run directories, one hypervisor and one Dom0 each)
share an images directory, as hosts that migrate share storage. Host A runs
the default guests; host B runs `gamma`. `beta`'s demo counts in
data/counter and checks its disk after a restore; it moves by run directory
and by tcp://, through a recording proxy whose bytes Xen's verifier reads.
A receiver killed mid-stream leaves beta running at its source; a wrong
token, a name taken at the destination and a program that is not resumable
are each one line, and the guest runs on where it was.
"""

import json
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import xenlike as xenlike_package
from domains.dom0.migrate import migrate_permission_to_go, migrate_receiver_banner
from tests.test_migration_verify import verify, xen_utils  # noqa: F401 (a fixture)
from tests.test_up import XENLIKE, wait_for, xenlike
from xenlike.migration import DomainImage, write_save_file
from xenlike.tools.cli import migration_rune
from xenlike.topology import TopologyError, parse_topology

HOST_B = """
[host]
name = "hostb"
images = "{images}"

[dom0]
memory = 128
images = {{ "alpha.img" = "64M", "beta.img" = "64M", "gamma.img" = "64M" }}

[[domain]]
name = "gamma"
memory = 16
init = "domains.guest.demo:main"
vif = ["mac=00:16:3e:00:00:03, bridge=xenbr0, ip=10.0.0.3/24"]
disk = ["format=raw, vdev=xvda, access=rw, target=gamma.img"]
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    base = tmp_path_factory.mktemp("migrate")
    images = base / "images"
    images.mkdir()
    host_a = base / "a.toml"
    default = (Path(xenlike_package.__file__).parent / "default.toml").read_text()
    host_a.write_text(
        default.replace('name = "default"', f'name = "hosta"\nimages = "{images}"', 1)
    )
    (base / "b.toml").write_text(HOST_B.format(images=images))
    started = []
    try:
        for name in ("a", "b"):
            xenlike("up", str(base / f"{name}.toml"), "--detach", run_dir=base / name)
            started.append(base / name)
        yield base / "a", base / "b"
    finally:
        for run_dir in started:
            xenlike("down", "--grace", "2", run_dir=run_dir, check=False)


def names(run_dir: Path) -> list[str]:
    return [row["name"] for row in json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)]


def counter(run_dir: Path, name: str) -> int:
    found = xenlike("domid", name, run_dir=run_dir, check=False)
    if found.returncode:
        return -1
    domid = found.stdout.strip()
    read = xenlike(
        "xenstore", "read", f"/local/domain/{domid}/data/counter", run_dir=run_dir, check=False
    )
    return int(read.stdout) if read.returncode == 0 else -1


def where(hosts: tuple[Path, Path], name: str) -> tuple[Path, Path]:
    """(the host `name` runs on, the other one)."""
    a, b = hosts
    return (a, b) if name in names(a) else (b, a)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("xenlike:")]


def listen(run_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """A `migrate-receive --listen` on `run_dir`, and the tcp:// it printed."""
    receiver = subprocess.Popen(
        [*XENLIKE, "migrate-receive", "--listen", "127.0.0.1:0", "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    url = receiver.stdout.readline().strip()
    assert re.fullmatch(r"tcp://[A-Za-z0-9_-]+@127\.0\.0\.1:\d+", url), url
    return receiver, url


class Proxy:
    """A TCP relay between a migration's sender and its receiver that keeps what the
    sender sent and, given `cut_after`, stops relaying after that many bytes and
    calls `cut` (which kills the receiver), then closes both sides."""

    def __init__(self, target: str, cut_after: int | None = None, cut: Any = None) -> None:
        token, address = target.removeprefix("tcp://").split("@")
        host, port = address.rsplit(":", 1)
        self.target = (host, int(port))
        self.url = ""
        self.sent = bytearray()
        self.cut_after, self.cut = cut_after, cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://{token}@127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, self.sent)
        back.join(60)

    def _pump(self, source: socket.socket, sink: socket.socket, keep: bytearray | None) -> None:
        try:
            while data := source.recv(1 << 16):
                if keep is not None and self.cut_after is not None:
                    data = data[: self.cut_after - len(keep)]
                sink.sendall(data)
                if keep is not None:
                    keep += data
                    if self.cut_after is not None and len(keep) >= self.cut_after:
                        self.cut()
                        break
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(60)


def test_beta_moves_by_run_directory_and_keeps_counting(hosts: tuple[Path, Path]) -> None:
    source, destination = where(hosts, "beta")
    before = wait_for(lambda: (n := counter(source, "beta")) >= 2 and n, what="beta to count")
    moved = xenlike("migrate", "beta", str(destination), run_dir=source)
    assert "migration target: Ready to receive domain." in moved.stderr, moved.stderr
    assert "migration sender: Target has acknowledged transfer." in moved.stderr
    assert "migration sender: Giving target permission to start." in moved.stderr
    assert moved.stderr.rstrip().endswith("Migration successful."), moved.stderr
    assert "beta" not in names(source)
    assert "beta" in names(destination)
    assert not [n for n in names(source) + names(destination) if "--" in n]
    wait_for(lambda: counter(destination, "beta") > before + 1, what="beta to count on there")
    console = xenlike("console", "beta", "--no-follow", run_dir=destination).stdout
    assert "[beta] xvda after the restore: ok" in console, console
    resumed = re.findall(r"\[beta\] resumed in domain \d+ at count (\d+)", console)
    assert resumed and int(resumed[-1]) >= before, console


def test_beta_moves_over_tcp_and_the_stream_verifies(
    hosts: tuple[Path, Path],
    tmp_path: Path,
    xen_utils: Path,  # noqa: F811
) -> None:
    source, destination = where(hosts, "beta")
    before = wait_for(lambda: (n := counter(source, "beta")) >= 0 and n, what="beta to count")
    receiver, url = listen(destination)
    proxy = Proxy(url)
    try:
        moved = xenlike("migrate", "beta", proxy.url, run_dir=source)
    finally:
        proxy.close()
        _, receiver_err = receiver.communicate(timeout=60)
    assert receiver.returncode == 0, receiver_err
    assert "migration target: Domain started successsfully." in receiver_err
    assert "Migration successful." in moved.stderr, moved.stderr
    assert "beta" not in names(source) and "beta" in names(destination)
    wait_for(lambda: counter(destination, "beta") > before, what="beta to count on there")
    stream = bytes(proxy.sent)
    token_line, _, stream = stream.partition(b"\n")
    assert stream.endswith(migrate_permission_to_go)  # the only bytes after the save file
    recorded = tmp_path / "stream.xl"
    recorded.write_bytes(stream[: -len(migrate_permission_to_go)])
    checked = verify(xen_utils, recorded, "xl")
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("mode", ["live", "--stop-and-copy"])
def test_a_receiver_killed_mid_stream_leaves_beta_running_at_the_source(
    hosts: tuple[Path, Path], mode: str
) -> None:
    """Live, the receiver dies in the first round, while beta runs; stop-and-copy,
    while beta is suspended, which the source cancels (resumes it in place)."""
    source, destination = where(hosts, "beta")
    receiver, url = listen(destination)
    proxy = Proxy(url, cut_after=4 << 20, cut=lambda: os.kill(receiver.pid, signal.SIGKILL))
    options = [mode] if mode != "live" else []
    try:
        failed = xenlike("migrate", *options, "beta", proxy.url, run_dir=source, check=False)
    finally:
        proxy.close()
        receiver.wait(60)
    assert receiver.returncode == -signal.SIGKILL
    assert len(proxy.sent) >= 4 << 20  # it died mid-stream, not before
    assert failed.returncode != 0
    assert errors(failed.stderr) == ["xenlike: Migration failed, resuming at sender."], (
        failed.stderr
    )
    assert "Traceback" not in failed.stderr
    before = counter(source, "beta")
    wait_for(lambda: counter(source, "beta") > before + 1, what="beta to count on at the source")
    assert "beta" in names(source)
    wait_for(
        lambda: not [n for n in names(destination) if n.startswith("beta")],
        what="the destination to clean up beta--incoming",
    )
    if mode == "--stop-and-copy":
        console = xenlike("console", "beta", "--no-follow", run_dir=source).stdout
        assert "[beta] resumed in place (the suspend was cancelled)" in console, console


def test_pre_copy_resends_what_a_writer_dirtied(hosts: tuple[Path, Path], tmp_path: Path) -> None:
    """A guest writes a page every few ms while it migrates: round 1 sends every
    populated frame, later rounds (at most 5) what was written since, then the
    last dirty frames with the guest suspended; each page holds, after the move,
    what the guest last wrote there."""
    a, b = hosts
    config = tmp_path / "churn.cfg"
    config.write_text('name = "churn"\nmemory = 16\ninit = "tests.programs:churn"\n')
    xenlike("create", str(config), run_dir=a)
    try:
        wait_for(
            lambda: "churning" in xenlike("console", "churn", "--no-follow", run_dir=a).stdout,
            what="churn to start",
        )
        moved = xenlike("migrate", "--debug", "churn", str(b), run_dir=a)
        rounds = re.findall(r"round (\d): (\d+) frames sent, (\d+) dirty", moved.stderr)
        assert rounds and rounds[0][0] == "1" and 1 <= len(rounds) <= 5, moved.stderr
        assert int(rounds[0][1]) >= 16 * 256 // 2, rounds  # every populated frame
        assert all(int(dirty) >= 50 for _, _, dirty in rounds[:-1]), rounds
        last = re.search(r"suspended: (\d+) frames sent", moved.stderr)
        assert last is not None, moved.stderr
        assert "Migration successful." in moved.stderr
        assert "churn" not in names(a) and "churn" in names(b)
        console = lambda: xenlike("console", "churn", "--no-follow", run_dir=b).stdout  # noqa: E731
        wait_for(lambda: "pages after the move" in console(), what="churn to check its pages")
        assert "[churn] pages after the move: ok" in console(), console()
    finally:
        for run_dir in hosts:
            xenlike("destroy", "churn", run_dir=run_dir, check=False)


def test_a_wrong_token_is_refused_in_one_line(hosts: tuple[Path, Path]) -> None:
    source, destination = where(hosts, "beta")
    receiver, url = listen(destination)
    wrong = re.sub(r"tcp://[^@]+@", "tcp://not-the-token@", url)
    refused = xenlike("migrate", "beta", wrong, run_dir=source, check=False)
    _, receiver_err = receiver.communicate(timeout=60)
    assert refused.returncode != 0 and receiver.returncode != 0
    assert errors(refused.stderr) == [
        f"xenlike: the receiver at {wrong.rsplit('@', 1)[1].rsplit(':', 1)[0]}:"
        f"{url.rsplit(':', 1)[1]} refused the token"
    ], refused.stderr
    assert errors(receiver_err) == ["xenlike: refused the connection from 127.0.0.1: wrong token"]
    assert "beta" in names(source) and "beta" not in names(destination)


def test_a_name_taken_at_the_destination_resumes_at_the_sender(
    hosts: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = hosts
    config = tmp_path / "gamma.cfg"
    config.write_text('name = "gamma"\nmemory = 16\ninit = "tests.programs:ticker"\n')
    xenlike("create", str(config), run_dir=a)
    try:
        failed = xenlike("migrate", "gamma", str(a), run_dir=b, check=False)
        assert failed.returncode != 0
        assert "xenlike: cannot receive gamma: a domain named 'gamma' exists here" in failed.stderr
        assert errors(failed.stderr)[-1] == "xenlike: Migration failed, resuming at sender."
        before = counter(b, "gamma")
        wait_for(lambda: counter(b, "gamma") > before, what="gamma to count on at B")
        assert names(a).count("gamma") == 1 and "gamma--incoming" not in names(a)
    finally:
        xenlike("destroy", "gamma", run_dir=a, check=False)


def test_a_program_that_is_not_resumable_is_not_migrated(
    hosts: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = hosts
    config = tmp_path / "clock.cfg"
    config.write_text('name = "clock"\nmemory = 16\ninit = "tests.programs:ticker"\n')
    xenlike("create", str(config), run_dir=a)
    try:
        refused = xenlike("migrate", "clock", str(b), run_dir=a, check=False)
        assert refused.returncode != 0
        # the sender's line; the receiver's own (its stderr is ours, as through ssh) follows
        assert errors(refused.stderr)[0] == (
            "xenlike: cannot migrate clock: the guest refused to suspend:"
            " tests.programs:ticker is not resumable (see Guest.resumable)"
        ), refused.stderr
        ticks = xenlike("console", "clock", "--no-follow", run_dir=a).stdout.count("tick")
        wait_for(
            lambda: (
                xenlike("console", "clock", "--no-follow", run_dir=a).stdout.count("tick") > ticks
            ),
            what="clock to tick on",
        )
        assert "clock" not in names(b) and "clock--incoming" not in names(b)
    finally:
        xenlike("destroy", "clock", run_dir=a, check=False)


def test_no_such_domain_and_no_such_host_are_one_line(
    hosts: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = hosts
    missing = xenlike("migrate", "nosuch", str(b), run_dir=a, check=False)
    assert missing.returncode != 0
    assert errors(missing.stderr) == [
        "xenlike: no domain named 'nosuch'; running: " + ", ".join(names(a)[1:])
    ], missing.stderr
    nowhere = xenlike("migrate", "alpha", str(tmp_path / "nohost"), run_dir=a, check=False)
    assert nowhere.returncode != 0 and len(errors(nowhere.stderr)) == 1, nowhere.stderr
    closed = xenlike("migrate", "alpha", "tcp://t@127.0.0.1:1", run_dir=a, check=False)
    assert errors(closed.stderr) == [
        "xenlike: cannot reach the receiver at 127.0.0.1:1: Connection refused"
    ], closed.stderr
    assert "alpha" in names(a)


def test_the_receiver_command_lines_are_xls() -> None:
    assert migration_rune("ssh://root@hostb", "ssh", False) == [
        "sh",
        "-c",
        "exec ssh root@hostb xenlike migrate-receive",
    ]
    assert migration_rune("ssh://hostb", "ssh -p 2222 -i key", True) == [
        "sh",
        "-c",
        "exec ssh -p 2222 -i key hostb xenlike migrate-receive -d",
    ]
    # xl's `-s ""`: HOST is the receiver's whole command line
    assert migration_rune("xenlike migrate-receive --run-dir /b", "", False) == [
        "sh",
        "-c",
        "xenlike migrate-receive --run-dir /b",
    ]
    assert migration_rune("/run/b", "ssh", False)[-3:] == ["migrate-receive", "--run-dir", "/run/b"]


def test_host_images_is_the_shared_images_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    topology = parse_topology(f'[host]\nimages = "{shared}"\n[dom0]\nimages = {{ "a.img" = "1M" }}')
    assert topology.image_path("a.img", tmp_path / "run") == shared / "a.img"
    assert parse_topology("").image_path("a.img", tmp_path) == tmp_path / "a.img"
    for value, problem in (
        ('"relative/dir"', "an absolute directory path"),
        (f'"{tmp_path}/nope"', "no such directory"),
        ("3", "an absolute directory path"),
    ):
        with pytest.raises(TopologyError) as raised:
            parse_topology(f"[host]\nimages = {value}\n", "t.toml")
        (only,) = raised.value.problems
        assert str(only).startswith("t.toml:2: images = ") and problem in str(only), only


def _receive(run_dir: Path, stream: bytes) -> subprocess.CompletedProcess[bytes]:
    """`migrate-receive` on `run_dir`, fed `stream` as a (hostile) sender would."""
    return subprocess.run(
        [*XENLIKE, "migrate-receive", "--run-dir", str(run_dir)],
        input=stream,
        capture_output=True,
        timeout=120,
    )


def test_a_hostile_stream_is_one_line_and_leaves_nothing(hosts: tuple[Path, Path]) -> None:
    _, b = hosts
    before = names(b)
    config = {"name": "hostile", "memory": 16, "init": "tests.programs:ticker"}
    image = DomainImage(
        max_pfn=0xFFFFF, pages={0xFFFF0: bytes(4096)}, shared_info=bytes(4096), vcpus={0: b""}
    )
    cases = {
        b"not a stream at all" * 8: "the migration stream is not xl's (no save file header)",
        b"".join(write_save_file(attrs.evolve(image, config={**config, "name": "../x"}))): (
            "cannot receive a domain named '../x': not a name"
        ),
        b"".join(write_save_file(attrs.evolve(image, config=config))): (
            "cannot receive hostile: PAGE_DATA pfn 0xffff0 beyond max_pfn 0xfff"
        ),
    }
    for stream, error in cases.items():
        received = _receive(b, stream)
        assert received.returncode != 0
        assert received.stdout == migrate_receiver_banner
        assert errors(received.stderr.decode()) == [f"xenlike: {error}"], received.stderr
    assert names(b) == before  # no hostile--incoming, and Dom0 answers
