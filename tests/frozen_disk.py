"""A topology whose guests' disk images sit on a small ext4 file system that a
test may freeze (fsfreeze) to hold a back end's I/O for as long as it wants:
a slow or stuck disk that is real, not a mock. Needs root and a loop device."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.test_up import xenlike

__all__ = ["frozen_topology"]


@contextmanager
def frozen_topology(tmp_path: Path, topology: str) -> Iterator[tuple[Path, Path]]:
    """`topology` up, its run directory's `slow/` a loop-mounted ext4 (images named
    `slow/...` live there); yields the run directory and the mount point, and
    thaws, brings down and unmounts whatever the test left."""
    if os.geteuid() != 0 or not all(map(shutil.which, ("mkfs.ext4", "fsfreeze", "mount"))):
        pytest.skip("needs root, mkfs.ext4, mount and fsfreeze")
    image, run = tmp_path / "fs.img", tmp_path / "run"
    mountpoint = run / "slow"
    mountpoint.mkdir(parents=True)
    with open(image, "wb") as out:
        out.truncate(64 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", str(image)], capture_output=True, text=True)
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True
    )
    if made.returncode or mounted.returncode:
        pytest.skip(f"cannot mount a loop file system: {made.stderr}{mounted.stderr}")
    file = tmp_path / "topology.toml"
    file.write_text(topology)
    try:
        xenlike("up", "--detach", str(file), run_dir=run)
        yield run, mountpoint
    finally:
        subprocess.run(["fsfreeze", "-u", str(mountpoint)], capture_output=True)
        xenlike("down", "--grace", "2", run_dir=run, check=False)
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
