"""Devices that come and go: `xenlike block-attach`, `network-attach`, their -detach
and -list commands against a running topology.

The hypervisor runs in the test's own process (it boots the real Dom0, which
creates the guests as `xenlike up` does), so the test can read its per-domain
tables: after a detach, the guest's grant table, Dom0's maptrack and both
event channel tables are what they were before the attach.
"""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from domains.dom0.devices import remove_device
from drivers.blkif import BLKIF_RING, BlkFront
from drivers.blkif.front import BufferPool
from xenlike.abi.grant_table import GTF_type_mask
from xenlike.hypervisor import Hypervisor
from xenlike.rundir import RunDir
from xenlike.testing import LocalDomain, channel_pair
from xenlike.tools.session import DOM0_KERNEL, toolstack_request
from xenlike.xenbus import DeviceRemoved
from xenlike.xenbus.driver import DeviceInfo, XenbusContext
from xenlike.xenstore import XenStored, open_client

TOPOLOGY = """\
[host]
name = "hotplug"

[dom0]
memory = 96
images = { "boot.img" = "4M", "spare.img" = "8M" }

[[domain]]
name = "alpha"
memory = 16
vif = ["mac=00:16:3e:00:00:02, ip=10.0.0.2/24"]

[[domain]]
name = "beta"
memory = 32
init = "tests.hotplug_guests:follow"
disk = ["format=raw, vdev=xvda, access=rw, target=boot.img"]
"""


async def xenlike(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    return await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "xenlike", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    )


async def ok(run_dir: Path, *args: str) -> str:
    result = await xenlike(run_dir, *args)
    assert result.returncode == 0, f"xenlike {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


async def wait_for_console(run_dir: Path, name: str, text: str, timeout: float = 60) -> str:
    path = run_dir / "console" / f"{name}.log"
    with trio.fail_after(timeout):
        while True:
            log = path.read_text() if path.exists() else ""
            assert "Traceback" not in log, log
            if text in log:
                return log
            await trio.sleep(0.05)


def tables(hv: Hypervisor, domid: int) -> dict[str, Any]:
    """What a device holds in the hypervisor, on both sides: the guest's grants (its
    table's live entries, and the active ones others map), Dom0's maps, and both
    domains' ports."""
    guest, dom0 = hv.domains[domid], hv.domains[0]
    assert guest.grant_table is not None and guest.grant_table.words is not None
    assert guest.evtchn is not None and dom0.evtchn is not None
    words = guest.grant_table.words
    granted = sum(1 for ref in range(len(words) // 2) if words[2 * ref] & GTF_type_mask)
    return {
        "granted": granted,
        "active": len(guest.grant_table.active),
        "dom0 maptrack": len(dom0.maptrack.entries),
        "guest ports": sorted(guest.evtchn.ports),
        "dom0 ports": sorted(dom0.evtchn.ports),
    }


async def settle(hv: Hypervisor, domid: int, expected: dict[str, Any]) -> None:
    """The tables come back to `expected` (a back end lets go a moment after it closes)."""
    with trio.move_on_after(20):
        while tables(hv, domid) != expected:
            await trio.sleep(0.05)
    assert tables(hv, domid) == expected


@pytest.fixture
async def topology(tmp_path: Path, nursery: trio.Nursery) -> Any:
    run_dir = tmp_path / "run"
    rd = RunDir(run_dir)
    lock = rd.acquire()
    source = tmp_path / "hotplug.toml"
    source.write_text(TOPOLOGY)
    rd.topology.write_text(TOPOLOGY)
    hv = Hypervisor(run_dir, dom0_memory_mb=96)
    await nursery.start(
        lambda task_status: hv.serve(
            dom0_kernel=DOM0_KERNEL,
            dom0_cmdline=f"rundir={run_dir} topology={source}",
            task_status=task_status,
        )
    )
    try:
        yield hv, run_dir
    finally:
        # The guests shut down as `xenlike down` shuts them; the hypervisor is this
        # process's (the nursery ends it), so no CLI waits for it to exit.
        with trio.CancelScope(shield=True):
            await toolstack_request(rd, {"op": "down", "timeout": 15.0})
        os.close(lock)


async def test_a_disk_and_a_vif_come_and_go_leaving_nothing_mapped(topology: Any) -> None:
    hv, run_dir = topology
    await wait_for_console(run_dir, "beta", "[beta] waiting for devices")
    listed = json.loads(await ok(run_dir, "list", "--json"))
    beta = next(domain["id"] for domain in listed if domain["name"] == "beta")
    before = tables(hv, beta)

    out = await ok(
        run_dir, "block-attach", "beta", "format=raw, vdev=xvdb, access=rw, target=spare.img"
    )
    assert out == "attached vbd 51728 to beta\n"
    await wait_for_console(run_dir, "beta", "[beta] vbd 51728: wrote and read back 4096 bytes")
    listing = (await ok(run_dir, "block-list", "beta")).splitlines()
    assert listing[0] == "Vdev  BE  handle state evt-ch ring-ref BE-path"
    rows = [line.split() for line in listing[1:]]
    assert [row[0] for row in rows] == ["51712", "51728"]
    assert rows[1][1:4] == ["0", str(beta), "4"]  # Dom0's back end, beta's, Connected
    assert rows[1][6] == f"/local/domain/0/backend/vbd/{beta}/51728"
    during = tables(hv, beta)
    assert during["dom0 maptrack"] > before["dom0 maptrack"]
    assert len(during["guest ports"]) == len(before["guest ports"]) + 1

    out = await ok(run_dir, "block-detach", "beta", "xvdb")
    assert out == "detached vbd 51728 from beta\n"
    log = await wait_for_console(run_dir, "beta", "[beta] event: remove vbd 51728")
    assert "[beta] vbd 51728 ended: ENODEV (DeviceRemoved)" in log
    await settle(hv, beta, before)
    listing = (await ok(run_dir, "block-list", "beta")).splitlines()
    assert [line.split()[0] for line in listing[1:]] == ["51712"]

    out = await ok(run_dir, "network-attach", "beta", "mac=00:16:3e:00:00:03,ip=10.0.0.3/24")
    assert out == "attached vif 0 to beta\n"
    await wait_for_console(run_dir, "beta", "[beta] eth0: ping 10.0.0.2 answered")
    listing = (await ok(run_dir, "network-list", "beta")).splitlines()
    assert listing[0] == "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path"
    row = listing[1].split()
    assert row[:5] == ["0", "0", "00:16:3e:00:00:03", "0", "4"]
    assert row[-1] == f"/local/domain/0/backend/vif/{beta}/0"

    out = await ok(run_dir, "network-detach", "beta", "00:16:3e:00:00:03")
    assert out == "detached vif 0 from beta\n"
    log = await wait_for_console(run_dir, "beta", "[beta] event: remove vif 0")
    await wait_for_console(run_dir, "beta", "[beta] eth0 recvfrom ended: ENODEV (DeviceRemoved)")
    await wait_for_console(run_dir, "beta", "[beta] eth0 ping ended: ENODEV (DeviceRemoved)")
    await settle(hv, beta, before)
    assert (await ok(run_dir, "network-list", "beta")).splitlines()[1:] == []


async def test_bad_specs_and_unknown_devices_are_one_line_errors(topology: Any) -> None:
    _, run_dir = topology
    await wait_for_console(run_dir, "beta", "[beta] waiting for devices")
    cases = {
        ("block-attach", "beta", "vdev=xvdb, target=/etc/passwd"): "not one of Dom0's images",
        ("block-attach", "beta", "vdev=xvdb, target=../x"): "not one of Dom0's images",
        ("block-attach", "beta", "vdev=xvda, target=spare.img"): "already has a disk xvda",
        ("block-attach", "beta", "target=spare.img"): "a disk needs vdev=",
        ("block-attach", "alpha", "vdev=xvdb, target=boot.img"): "only read-only images may",
        ("block-attach", "alpha", "vdev=xvdb, access=ro, target=boot.img"): "attached to beta",
        ("network-attach", "beta", "mac=00:16:3e:00:00:02"): "is alpha's vif 0",
        ("block-attach", "nobody", "vdev=xvdb, target=spare.img"): "no domain named 'nobody'",
        ("block-detach", "beta", "xvdz"): "Error: Device xvdz not connected.",
        ("network-attach", "beta", "mac=01:00:00:00:00:01"): "multicast",
        ("network-detach", "beta", "00:16:3e:00:00:09"): "Unknown device 00:16:3e:00:00:09.",
        ("network-detach", "beta", "7"): "Unknown device 7.",
    }
    for args, message in cases.items():
        result = await xenlike(run_dir, *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


async def test_requests_in_flight_and_queued_fail_with_enodev_on_removal(nursery) -> None:
    """A back end that never answers: reads in flight on the ring, reads queued for
    pool pages, and a later caller all get ENODEV once the device is removed."""
    guest = LocalDomain(512)
    front = BlkFront(XenbusContext(guest, None, nursery), DeviceInfo("vbd", 51712, "b", "f", 0))
    channel, back, _ = channel_pair(BLKIF_RING)
    front.channel, front.sectors = channel, 4096
    front.pool = BufferPool(guest, 0, 1, max_pages=24)
    front._ready.set()
    nursery.start_soon(channel.run)
    outcomes: list[BaseException] = []

    async def read(sector: int) -> None:
        try:
            await front.read_sectors(sector, 8)
        except OSError as exc:
            outcomes.append(exc)

    for i in range(40):  # 24 get pages and go on the ring, 16 wait for pages
        nursery.start_soon(read, 8 * i)
    await trio.testing.wait_all_tasks_blocked()
    assert len(channel._in_flight) == 24 and not outcomes
    front.remove()  # what the bus does when the device's directory goes
    await front.disconnect()
    await trio.testing.wait_all_tasks_blocked()
    assert len(outcomes) == 40
    assert all(isinstance(exc, DeviceRemoved) and exc.errno == errno.ENODEV for exc in outcomes)
    with pytest.raises(DeviceRemoved, match="removed"):
        await front.write(0, bytes(512))


FRONT = "/local/domain/1/device/vbd/51728"
BACK = "/local/domain/0/backend/vbd/1/51728"


async def a_device(xs: Any) -> None:
    for path in (FRONT, BACK):
        await xs.write(f"{path}/state", "4")
    await xs.write(f"{BACK}/online", "1")
    await xs.write("/local/domain/1/error/device/vbd/51728/error", "5 an old failure")


async def test_removal_closes_through_the_back_end_then_removes_both_ends(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """libxl's order: online=0 and Closing together, the back end's Closed, then rm."""
    daemon = XenStored()
    await nursery.start(daemon.serve_unix, str(tmp_path / "socket"))
    async with open_client(str(tmp_path / "socket")) as xs:
        await a_device(xs)
        seen: list[tuple[str, str]] = []

        async def back_end() -> None:  # what Backend does when it sees Closing
            async with xs.watch(f"{BACK}/state") as events:
                async for _ in events:
                    state = await xs.read_optional(f"{BACK}/state")
                    online = await xs.read_optional(f"{BACK}/online")
                    if state == "5":
                        seen.append((state, str(online)))
                        await xs.write(f"{BACK}/state", "6")
                        return

        nursery.start_soon(back_end)
        await trio.testing.wait_all_tasks_blocked()
        assert await remove_device(xs, FRONT, BACK, timeout=10) is True
        assert seen == [("5", "0")]
        for path in (FRONT, BACK, "/local/domain/1/error/device/vbd/51728"):
            assert await xs.read_optional(path) is None


async def test_a_back_end_that_never_closes_is_forced_after_the_timeout(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    daemon = XenStored()
    await nursery.start(daemon.serve_unix, str(tmp_path / "socket"))
    async with open_client(str(tmp_path / "socket")) as xs:
        await a_device(xs)
        assert await remove_device(xs, FRONT, BACK, timeout=0.5) is False
        assert await xs.read_optional(FRONT) is None and await xs.read_optional(BACK) is None
