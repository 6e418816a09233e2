"""The PV block device through `xenlike up`: guests, blkfront, the ring, blkback, image files."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

from tests.blkif_guests import DISCARDED, WRITES, pattern
from tests.blkif_hostile import LEGIT
from tests.test_up import XENLIKE, started_pids, wait_for, wait_gone, xenlike

TOPOLOGY = """\
[host]
name = "blk"

[dom0]
memory = 96
images = { "rw.img" = "32M", "plain.img" = "32M", "ro.img" = "4M" }

[[domain]]
name = "rw"
memory = 32
init = "tests.blkif_guests:exercise"
extra = "xen_blkfront.max_ring_page_order=2"
disk = ["format=raw, vdev=xvda, access=rw, target=rw.img"]

[[domain]]
name = "plain"
memory = 32
init = "tests.blkif_guests:exercise"
extra = "xen_blkfront.feature_persistent=0 xen_blkfront.max_indirect_segments=0"
disk = ["format=raw, vdev=xvdb, access=rw, target=plain.img"]

[[domain]]
name = "ro"
memory = 16
init = "tests.blkif_guests:read_only"
disk = ["format=raw, vdev=xvda, access=ro, target=ro.img"]
"""


def console(run_dir: Path, name: str) -> str:
    path = run_dir / "console" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def wait_for_line(run_dir: Path, name: str, line: str, timeout: float = 60) -> str:
    def seen() -> str | None:
        text = console(run_dir, name)
        if "Traceback" in text:
            raise AssertionError(f"{name} failed:\n{text}")
        return text if line in text else None

    return wait_for(seen, timeout=timeout, what=f"{line!r} on {name}'s console")


def test_disks_through_xenlike_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topology = tmp_path / "blk.toml"
    topology.write_text(TOPOLOGY)
    ro_image = run_dir / "ro.img"  # Dom0's images live in the run directory
    run_dir.mkdir()
    ro_image.write_bytes(pattern("ro", 4096) + bytes((4 << 20) - 4096))
    try:
        xenlike("up", str(topology), "--detach", run_dir=run_dir)
        for name in ("rw", "plain"):
            wait_for_line(run_dir, name, "blk ok")
        wait_for_line(run_dir, "ro", "ro ok")
        report = {
            (d["domain"], d["type"]): d
            for d in json.loads(xenlike("devices", "--json", run_dir=run_dir).stdout)
        }
        rw, plain, ro = (report[(name, "vbd")] for name in ("rw", "plain", "ro"))
        for device in (rw, plain, ro):
            assert (device["frontend_state"], device["backend_state"]) == ("Connected", "Connected")
        assert rw["features"]["frontend/ring-page-order"] == "2"
        assert rw["features"]["frontend/feature-persistent"] == "1"
        assert rw["features"]["backend/feature-max-indirect-segments"] == "256"
        assert rw["features"]["backend/sectors"] == str(32 << 11)
        assert plain["features"]["frontend/feature-persistent"] == "0"
        assert plain["devid"] == "51728"  # xvdb
        assert ro["features"]["backend/info"] == "4"  # VDISK_READONLY
        assert "'persistent': True, 'max-indirect-segments': 256, 'ring-page-order': 2" in console(
            run_dir, "rw"
        )
        assert "'persistent': False, 'max-indirect-segments': 0, 'ring-page-order': 0" in console(
            run_dir, "plain"
        )
    finally:
        xenlike("down", run_dir=run_dir, check=False)
    for name in ("rw", "plain"):
        image = (run_dir / f"{name}.img").read_bytes()
        expected = bytearray(32 << 20)
        for label, sector, count in WRITES:
            expected[sector * 512 : (sector + count) * 512] = pattern(label, count * 512)
        start, count = DISCARDED
        expected[start * 512 : (start + count) * 512] = bytes(count * 512)
        assert image == bytes(expected), f"{name}.img is not what the guest wrote"
    assert ro_image.read_bytes() == pattern("ro", 4096) + bytes((4 << 20) - 4096)


DURABLE = """\
[host]
name = "durable"

[dom0]
memory = 64
images = { "d.img" = "8M" }

[[domain]]
name = "d"
memory = 16
init = "tests.blkif_guests:durable"
disk = ["format=raw, vdev=xvda, access=rw, target=d.img"]
"""


def test_a_flushed_write_survives_killing_everything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topology = tmp_path / "durable.toml"
    topology.write_text(DURABLE)
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    up = subprocess.Popen(
        [*XENLIKE, "up", str(topology)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_for_line(run_dir, "d", "flushed")
        pids = started_pids(run_dir)
        up.send_signal(signal.SIGKILL)  # the hypervisor and every domain die with it
        up.wait()
        assert wait_gone(pids) == []
    finally:
        if up.poll() is None:
            up.kill()
    data = (run_dir / "d.img").read_bytes()
    assert data[4096 * 512 : 4096 * 512 + (1 << 20)] == pattern("durable", 1 << 20)


HOSTILE = """\
[host]
name = "hostile"

[dom0]
memory = 96
images = { "victim.img" = "32M", "hostile.img" = "32M" }

[[domain]]
name = "victim"
memory = 32
init = "tests.blkif_guests:exercise"
disk = ["format=raw, vdev=xvda, access=rw, target=victim.img"]

[[domain]]
name = "hostile"
memory = 16
init = "tests.blkif_hostile:hostile"
devices = [{ type = "vbd-hostile", driver = "tests.blkif_hostile:DRIVER", devid = "51712", \
params = "hostile.img", mode = "w" }]
"""


def test_a_hostile_front_end_gets_errors_and_a_closed_device_and_harms_nothing(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    image = run_dir / "hostile.img"
    run_dir.mkdir()
    original = os.urandom(4 << 20)
    image.write_bytes(original)
    topology = tmp_path / "hostile.toml"
    topology.write_text(HOSTILE)
    try:
        xenlike("up", str(topology), "--detach", run_dir=run_dir)
        xenlike("xenstore", "write", "/local/domain/2/data/attack", "1", run_dir=run_dir)
        text = wait_for_line(run_dir, "hostile", "hostile done")
        for outcome in (
            "a grant never made: refused",
            "a grant made to another domain: refused",
            "a read-only grant for a read: refused",
            "7 slots of random bytes: refused",
            "the same id twice: the second refused",
            "a legitimate write: done",
            "a runaway req_prod: the back end is Closing (",
        ):
            assert outcome in text, text
        assert re.search(r"the back end is Closing \(\d+ ring protocol violation", text), text
        wait_for_line(run_dir, "victim", "blk ok")
        rows = json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)
        assert [r["name"] for r in rows] == ["Domain-0", "victim", "hostile"]
        report = {
            d["domain"]: d for d in json.loads(xenlike("devices", "--json", run_dir=run_dir).stdout)
        }
        assert report["victim"]["backend_state"] == "Connected"
        assert report["hostile"]["backend_state"] in ("Closing", "Closed")
        assert any("ring protocol violation" in e for e in report["hostile"]["errors"])
    finally:
        xenlike("down", run_dir=run_dir, check=False)
    expected = bytearray(original)
    sector, label = LEGIT
    expected[sector * 512 : sector * 512 + 4096] = pattern(label, 4096)
    assert image.read_bytes() == bytes(expected), "bytes outside the legitimate write changed"
    victim = bytearray(32 << 20)
    for label, start, count in WRITES:
        victim[start * 512 : (start + count) * 512] = pattern(label, count * 512)
    start, count = DISCARDED
    victim[start * 512 : (start + count) * 512] = bytes(count * 512)
    assert (run_dir / "victim.img").read_bytes() == bytes(victim)
