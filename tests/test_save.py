"""`xenlike save`: PV suspend as libxl and Linux do it, and xl's save file.

The default topology runs (real processes); `beta`'s demo is resumable and
counts in data/counter. A checkpoint (save -c) leaves it counting on from
where it was; its file passes Xen's own verifier; a program that is not
resumable refuses the suspend, runs on, and the user gets one line.
"""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.frozen_disk import frozen_topology
from tests.save_guests import SECTOR_B, _pattern
from tests.test_migration_verify import verify, xen_utils  # noqa: F401 (a fixture)
from tests.test_up import wait_for, xenlike
from xenlike.migration import read_save_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("save") / "run"
    xenlike("up", "--detach", run_dir=path)
    yield path
    xenlike("down", "--grace", "2", run_dir=path, check=False)


@pytest.fixture(scope="module")
def checkpoint(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A good save file of beta, which runs on."""
    file = tmp_path_factory.mktemp("checkpoint") / "beta.sav"
    xenlike("save", "-c", "beta", str(file), run_dir=run_dir)
    return file.read_bytes()


def counter(run_dir: Path, name: str) -> int:
    domid = xenlike("domid", name, run_dir=run_dir).stdout.strip()
    read = xenlike(
        "xenstore", "read", f"/local/domain/{domid}/data/counter", run_dir=run_dir, check=False
    )
    return int(read.stdout) if read.returncode == 0 else -1


def test_checkpoint_keeps_beta_counting_and_the_file_verifies(
    run_dir: Path,
    tmp_path: Path,
    xen_utils: Path,  # noqa: F811
) -> None:
    start = wait_for(
        lambda: counter(run_dir, "beta") >= 2 and counter(run_dir, "beta"), what="beta to count"
    )
    domid = xenlike("domid", "beta", run_dir=run_dir).stdout.strip()
    file = tmp_path / "beta.sav"
    saved = xenlike("save", "-c", "beta", str(file), run_dir=run_dir)
    assert f"Saving to {file} new xl format (info 0x3/0x0/" in saved.stderr, saved.stderr
    assert "running on" in saved.stderr
    assert xenlike("domid", "beta", run_dir=run_dir).stdout.strip() == domid  # the same domain
    state = wait_for(
        lambda: (row := _row(run_dir, "beta")) and row["state"][3] != "s" and row["state"],
        what="beta to run on",
    )
    assert "s" not in state[3:5], state
    wait_for(lambda: counter(run_dir, "beta") > start + 1, what="beta to count on")
    console = xenlike("console", "beta", "--no-follow", run_dir=run_dir).stdout
    assert "[beta] suspending" in console
    assert "[beta] resumed in place (the suspend was cancelled)" in console
    # xenbus resume: each front end did the handshake again with its back end
    assert "[beta] vbd 51712: reconnected\n[beta] vif 0: reconnected" in console, console
    devices = xenlike("devices", "beta", run_dir=run_dir).stdout
    assert devices.count("frontend Connected, backend Connected") == 2, devices
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file stayed"

    image = read_save_file(file.read_bytes())
    assert image.config is not None and image.config["name"] == "beta"
    assert 0 < len(image.pages) <= image.max_pfn + 1
    assert int(image.xenstore["data/counter"]) >= start
    assert b'"counter"' in image.vcpus[0]
    checked = verify(xen_utils, file, "xl")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _console(run_dir: Path, name: str) -> str:
    return xenlike("console", name, "--no-follow", run_dir=run_dir).stdout


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return list(json.loads(xenlike("list", "--json", run_dir=run_dir).stdout))


def _row(run_dir: Path, name: str) -> dict[str, Any] | None:
    return next((r for r in _rows(run_dir) if r["name"] == name), None)


def test_a_program_that_is_not_resumable_refuses_cleanly(run_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "clock.cfg"
    config.write_text('name = "clock"\nmemory = 16\ninit = "tests.programs:ticker"\n')
    xenlike("create", str(config), run_dir=run_dir)
    try:
        file = tmp_path / "clock.sav"
        refused = xenlike("save", "clock", str(file), run_dir=run_dir, check=False)
        assert refused.returncode != 0
        errors = [line for line in refused.stderr.splitlines() if line.startswith("xenlike:")]
        assert errors == [
            "xenlike: cannot save clock: the guest refused to suspend:"
            " tests.programs:ticker is not resumable (see Guest.resumable)"
        ], refused.stderr
        assert "Traceback" not in refused.stderr
        assert not file.exists() and not list(tmp_path.glob(".*.tmp"))
        before = xenlike("console", "clock", "--no-follow", run_dir=run_dir).stdout.count("tick")
        wait_for(
            lambda: (
                xenlike("console", "clock", "--no-follow", run_dir=run_dir).stdout.count("tick")
                > before
            ),
            what="clock to tick on",
        )
        assert _row(run_dir, "clock")["state"][3] == "-"  # type: ignore[index]
    finally:
        xenlike("destroy", "clock", run_dir=run_dir, check=False)


def test_save_of_an_unknown_domain_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    result = xenlike("save", "nosuch", str(tmp_path / "x.sav"), run_dir=run_dir, check=False)
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1].startswith("xenlike: no domain named 'nosuch'")
    assert "Traceback" not in result.stderr


def test_beta_saved_destroyed_and_restored_counts_on_and_reads_its_disk(
    run_dir: Path,
    tmp_path: Path,
    xen_utils: Path,  # noqa: F811
) -> None:
    wait_for(lambda: counter(run_dir, "beta") >= 1, what="beta to count")
    file = tmp_path / "beta.sav"
    saved = xenlike("save", "beta", str(file), run_dir=run_dir)
    assert "destroyed" in saved.stderr
    assert _row(run_dir, "beta") is None
    image = read_save_file(file.read_bytes())
    at_save = int(image.xenstore["data/counter"])
    assert image.elapsed_ns >= at_save * 10**9  # X86_TSC_INFO: it counted once a second
    checked = verify(xen_utils, file, "xl")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    restored = xenlike("restore", str(file), run_dir=run_dir)
    assert restored.stdout.startswith(f"restored beta from {file} as domain ")
    wait_for(lambda: counter(run_dir, "beta") > at_save, what="beta to count on")
    console = xenlike("console", "beta", "--no-follow", run_dir=run_dir).stdout
    assert "[beta] resuming from a saved state" in console, console
    assert "[beta] resumed in domain" in console
    assert "[beta] xvda after the restore: ok" in console, console
    devices = xenlike("devices", run_dir=run_dir).stdout
    assert "beta vbd 51712: frontend Connected, backend Connected" in devices, devices
    assert "beta vif 0: frontend Connected, backend Connected" in devices, devices

    # The restored beta is on the network: alpha's demo, which pings its peer beta
    # once a second, counts answers again.
    alpha = xenlike("domid", "alpha", run_dir=run_dir).stdout.strip()

    def replies() -> int:
        read = xenlike(
            "xenstore", "read", f"/local/domain/{alpha}/data/ping-replies", run_dir=run_dir
        )
        return int(read.stdout)

    before = replies()
    wait_for(lambda: replies() >= before + 2, what="the restored beta to answer alpha's pings")


@pytest.mark.parametrize(
    ("mangle", "says"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: b"#!/bin/sh\n" * 10, "not an xl save file"),
        (lambda data: data[:36] + b"\xff" * 4 + data[40:], "mandatory"),
    ],
)
def test_a_corrupt_file_is_refused_in_one_line_and_nothing_starts(
    run_dir: Path, tmp_path: Path, checkpoint: bytes, mangle: Any, says: str
) -> None:
    file = tmp_path / "beta.sav"
    file.write_bytes(mangle(checkpoint))
    before = [row["name"] for row in _rows(run_dir)]
    refused = xenlike("restore", str(file), run_dir=run_dir, check=False)
    assert refused.returncode != 0
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xenlike: cannot restore from {file}: ")
    assert says in lines[0]
    assert [row["name"] for row in _rows(run_dir)] == before


def test_a_guests_refusal_reaches_the_user_as_one_printable_line() -> None:
    from domains.dom0.save import REFUSAL_LIMIT, _printable

    assert _printable("not resumable\nxenlike: forged second line") == "not resumable"
    assert _printable("\x1b[2Jcleared") == "?[2Jcleared"
    long = _printable("x" * 10_000)
    assert len(long) == REFUSAL_LIMIT and long.endswith("...")
    assert _printable("") == ""


TOPOLOGY_IN_FLIGHT = """
[dom0]
memory = 64
nic = "none"
images = { "slow/inflight.img" = "16M" }

[[domain]]
name = "inflight"
memory = 16
init = "tests.save_guests:in_flight"
disk = ["format=raw, vdev=xvda, access=rw, target=slow/inflight.img"]
"""


@pytest.fixture
def frozen_fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The topology up, its disk images on a file system the test may freeze (see
    tests/frozen_disk.py). Yields the run directory and the mount point."""
    with frozen_topology(tmp_path, TOPOLOGY_IN_FLIGHT) as where:
        yield where


def test_a_write_in_flight_at_the_save_is_on_the_disk_after_the_restore(
    tmp_path: Path, frozen_fs: tuple[Path, Path]
) -> None:
    """blkfront's shadow: a guest pushes a DISCARD (its back end blocks on the
    frozen file system), a barrier and a WRITE behind it, and is saved while all
    three are in flight; the save does not wait for them. The old back end never
    does the write (it is destroyed with the domain first); the restored blkfront
    resubmits all three, and they land before the program runs again."""
    run_dir, slow = frozen_fs
    image = slow / "inflight.img"
    file = tmp_path / "inflight.sav"
    wait_for(lambda: "[inflight] ready" in _console(run_dir, "inflight"), what="the guest")
    domid = xenlike("domid", "inflight", run_dir=run_dir).stdout.strip()
    subprocess.run(["fsfreeze", "-f", str(slow)], check=True)
    try:
        xenlike("xenstore", "write", f"/local/domain/{domid}/data/go", "1", run_dir=run_dir)
        wait_for(
            lambda: "[inflight] 3 requests in flight" in _console(run_dir, "inflight"),
            what="the requests to be in flight",
        )
        saved = xenlike("save", "inflight", str(file), run_dir=run_dir)
        assert "destroyed" in saved.stderr
    finally:
        subprocess.run(["fsfreeze", "-u", str(slow)], check=True)
    with open(image, "rb") as disk:  # the old back end is gone and never wrote it
        disk.seek(SECTOR_B * 512)
        assert disk.read(4096) == bytes(4096)
    context = json.loads(read_save_file(file.read_bytes()).vcpus[0])
    (shadow,) = context["devices"].values()
    assert [entry[0] for entry in shadow["requests"]] == [5, 2, 1]  # DISCARD, BARRIER, WRITE

    xenlike("restore", str(file), run_dir=run_dir)
    console = wait_for(
        lambda: "sector B written" in (text := _console(run_dir, "inflight")) and text,
        what="the restored guest to read its disk",
    )
    resubmitted = "[inflight] vbd 51712: 3 request(s) in flight at the save resubmitted"
    assert resubmitted in console, console
    assert "[inflight] after the restore: sector A discarded: True" in console, console
    assert "[inflight] after the restore: sector B written: True" in console, console
    with open(image, "rb") as disk:
        disk.seek(SECTOR_B * 512)
        assert disk.read(4096) == _pattern("inflight", "B")
