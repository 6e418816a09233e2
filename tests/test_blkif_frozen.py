"""A disk whose writes block stalls its own device only (blkback's thread per vbd).

The frozen disk is real: an ext4 file system on a loop device, frozen with
fsfreeze (as tests/test_save.py's in-flight test does), so every write to it
blocks in the kernel until it is thawed."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.frozen_disk import frozen_topology
from tests.test_up import wait_for, xenlike

TOPOLOGY = """
[dom0]
memory = 64
nic = "none"
images = { "slow/frozen.img" = "16M", "other.img" = "16M" }

[[domain]]
name = "frozen"
memory = 16
init = "tests.frozen_guests:writer"
disk = ["format=raw, vdev=xvda, access=rw, target=slow/frozen.img"]

[[domain]]
name = "other"
memory = 16
init = "tests.frozen_guests:writer"
disk = ["format=raw, vdev=xvda, access=rw, target=other.img"]
"""


@pytest.fixture
def frozen_fs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The topology up, its disk images on a file system the test may freeze (see
    tests/frozen_disk.py). Yields the run directory and the mount point."""
    with frozen_topology(tmp_path, TOPOLOGY) as where:
        yield where


def _writes(run_dir: Path, name: str) -> int:
    domid = xenlike("domid", name, run_dir=run_dir).stdout.strip()
    read = xenlike(
        "xenstore", "read", f"/local/domain/{domid}/data/writes", run_dir=run_dir, check=False
    )
    return int(read.stdout.strip() or 0) if read.returncode == 0 else 0


def test_a_frozen_disk_stops_neither_another_guests_disk_nor_the_toolstack(
    frozen_fs: tuple[Path, Path],
) -> None:
    run_dir, slow = frozen_fs
    for name in ("frozen", "other"):
        wait_for(lambda name=name: _writes(run_dir, name) > 0, what=f"{name}'s first write")
    subprocess.run(["fsfreeze", "-f", str(slow)], check=True)
    try:
        before = _writes(run_dir, "other")
        wait_for(
            lambda: _writes(run_dir, "other") > before + 10,
            what="the other guest's writes to go on while a disk is frozen",
        )
        listed = xenlike("list", run_dir=run_dir, timeout=30).stdout
        assert "frozen" in listed and "other" in listed
    finally:
        subprocess.run(["fsfreeze", "-u", str(slow)], check=True)
    stuck = _writes(run_dir, "frozen")
    wait_for(lambda: _writes(run_dir, "frozen") > stuck, what="the thawed disk's writes")
