"""`xenlike top`: the rows from two samples, the XenStore statistics keys, and the command."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_up import xenlike
from xenlike.abi.domctl import (
    XEN_DOMINF_blocked,
    XEN_DOMINF_running,
    XEN_DOMINF_shutdown,
)
from xenlike.abi.sched import ShutdownReason
from xenlike.testing import wait_for
from xenlike.tools.top import (
    VBD_KEYS,
    VIF_KEYS,
    Sample,
    TopSampler,
    device_counters,
    format_frame,
    rows,
    state_letters,
)
from xenlike.xenstore.client import _Operations
from xenlike.xenstore.wire import XenStoreError


def info(
    domid: int, cpu_ns: int, pages: int = 4096, flags: int = XEN_DOMINF_running
) -> SimpleNamespace:
    return SimpleNamespace(
        domain=domid,
        cpu_time=cpu_ns,
        tot_pages=pages,
        max_pages=pages,
        flags=flags,
        nr_online_vcpus=1,
    )


def sample(
    at: float,
    infos: list[SimpleNamespace],
    hypercalls: dict[int, int],
    sends: dict[int, int],
    devices: dict[int, dict[str, int]] | None = None,
) -> Sample:
    zero = dict.fromkeys((*VBD_KEYS, *VIF_KEYS, "vbds", "vifs"), 0)
    return Sample(
        at,
        65536,
        {i.domain: i for i in infos},
        {i.domain: f"guest{i.domain}" for i in infos},
        hypercalls,
        sends,
        devices or {i.domain: zero for i in infos},
    )


def test_state_letters_are_xentops() -> None:
    assert state_letters(XEN_DOMINF_running) == "-----r"
    assert state_letters(XEN_DOMINF_blocked) == "--b---"
    crashed = XEN_DOMINF_shutdown | ShutdownReason.crash << 16
    assert state_letters(crashed) == "----c-"
    assert state_letters(XEN_DOMINF_shutdown) == "-s----"


def test_rates_come_from_two_samples() -> None:
    before = sample(10.0, [info(0, 1_000_000_000)], {0: 100}, {0: 10})
    after = sample(
        12.0,
        [info(0, 1_500_000_000), info(1, 200_000_000, pages=1024)],
        {0: 300, 1: 50},
        {0: 30, 1: 8},
    )
    dom0, guest = rows(before, after)
    assert (dom0["cpu_s"], dom0["cpu_pct"]) == (1.5, 25.0)  # 0.5 s of CPU in 2 s
    assert (dom0["hypercalls_s"], dom0["evtchn_sends_s"]) == (100.0, 10.0)
    assert (guest["cpu_pct"], guest["hypercalls_s"], guest["evtchn_sends_s"]) == (0.0, 25.0, 4.0)
    assert (guest["mem_k"], guest["mem_pct"], guest["name"]) == (4096, 1.6, "guest1")
    frame = format_frame([dom0, guest]).splitlines()
    assert frame[1].split()[:12] == [  # xentop's order
        "NAME",
        "ID",
        "STATE",
        "CPU(sec)",
        "CPU(%)",
        "MEM(k)",
        "MEM(%)",
        "MAXMEM(k)",
        "MAXMEM(%)",
        "VCPUS",
        "HCALL/s",
        "EVTCHN/s",
    ]
    assert frame[2].split()[:3] == ["guest0", "0", "-----r"] and len(frame) == 4


class FakeStore(_Operations):
    """Just enough of a XenStore client: read and ls over a dict of paths (the
    client's own read_optional and ls_optional on top)."""

    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = nodes

    async def read(self, path: str) -> bytes:
        if path not in self.nodes:
            raise XenStoreError("ENOENT")
        return self.nodes[path].encode()

    async def ls(self, path: str) -> list[str]:
        children = {
            p[len(path) + 1 :].split("/")[0] for p in self.nodes if p.startswith(path + "/")
        }
        if not children:
            raise XenStoreError("ENOENT")
        return sorted(children)


async def test_io_counters_are_read_from_the_back_ends_statistics_keys() -> None:
    back = "/local/domain/0/backend"
    store = FakeStore(
        {
            "/local/domain/1/device/vbd/51712/backend": f"{back}/vbd/1/51712",
            "/local/domain/1/device/vbd/51728/backend": f"{back}/vbd/1/51728",
            "/local/domain/1/device/vif/0/backend": f"{back}/vif/1/0",
            f"{back}/vbd/1/51712/statistics/rd_req": "7",
            f"{back}/vbd/1/51712/statistics/rd_sect": "56",
            f"{back}/vbd/1/51728/statistics/rd_req": "3",
            f"{back}/vbd/1/51728/statistics/wr_req": "2",
            f"{back}/vif/1/0/statistics/tx_packets": "11",
            f"{back}/vif/1/0/statistics/rx_bytes": "4096",
        }
    )
    counters = await device_counters(store, 1)
    assert counters == {
        "rd_req": 10,
        "wr_req": 2,
        "rd_sect": 56,
        "wr_sect": 0,
        "oo_req": 0,
        "tx_packets": 11,
        "tx_bytes": 0,
        "rx_packets": 0,
        "rx_bytes": 4096,
        "vbds": 2,
        "vifs": 1,
    }
    assert (await device_counters(store, 2))["rd_req"] == 0  # no devices: zeros


@pytest.fixture
def run_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "run"
    yield path
    xenlike("down", run_dir=path, check=False)


def test_top_batch_and_json_print_every_domain(run_dir: Path) -> None:
    xenlike("up", "--detach", run_dir=run_dir)
    batch = xenlike(
        "top", "--batch", "--iterations", "2", "--delay", "0.3", run_dir=run_dir
    ).stdout.splitlines()
    tables = [i for i, line in enumerate(batch) if line.startswith("xenlike top - ")]
    assert len(tables) == 2 and "3 domains" in batch[0]
    names = [line.split()[0] for line in batch[tables[0] + 2 : tables[0] + 5]]
    assert names == ["Domain-0", "alpha", "beta"]
    frames = [
        json.loads(line)
        for line in xenlike(
            "top", "--json", "-i", "1", "-d", "0.3", run_dir=run_dir
        ).stdout.splitlines()
    ]
    assert len(frames) == 1
    domains = {d["name"]: d for d in frames[0]["domains"]}
    assert set(domains) == {"Domain-0", "alpha", "beta"}
    assert domains["Domain-0"]["hypercalls_s"] > 0  # top's own calls, at least
    assert domains["alpha"]["mem_k"] == 32 * 1024
    assert domains["alpha"]["maxmem_k"] == 32 * 1024 and domains["alpha"]["vcpus"] == 1
    assert domains["alpha"]["uptime_s"] > 0 and domains["alpha"]["mem_mib_s"] >= 0

    def alpha_reads() -> int:
        frame = json.loads(
            xenlike("top", "--json", "-i", "1", "-d", "0.3", run_dir=run_dir).stdout.splitlines()[0]
        )
        return next(d["rd_req"] for d in frame["domains"] if d["name"] == "alpha")

    # The demo reads its pattern back: blkback's counters reach top within a second or so.
    assert wait_for(alpha_reads, 20, "alpha's disk reads in xenlike top") >= 1
    assert (
        xenlike("top", "-i", "1", run_dir=run_dir.parent / "nothing", check=False).returncode == 1
    )


def test_the_table_fits_80_columns_and_shows_other_devices_statistics() -> None:
    before = sample(10.0, [info(0, 1_000_000_000)], {0: 100}, {0: 10})
    after = sample(
        12.0,
        [info(0, 1_500_000_000), info(1, 200_000_000, pages=1024)],
        {0: 300, 1: 50},
        {0: 30, 1: 8},
    )
    table = rows(before, after)
    table[1]["devices"] = {"kv": {"gets": 7, "puts": 3}}
    frame = format_frame(table, 80).splitlines()
    assert all(len(line) <= 80 for line in frame), frame
    assert frame[1].split()[:7] == [
        "NAME",
        "ID",
        "STATE",
        "CPU(%)",
        "MEM(k)",
        "HCALL/s",
        "EVTCHN/s",
    ]
    wide = format_frame(table).splitlines()
    assert wide[3].endswith("kv gets=7 puts=3")
    header = wide[1].split()
    assert header[header.index("MEM(%)") + 1 :][:3] == ["MAXMEM(k)", "MAXMEM(%)", "VCPUS"]
    assert wide[3].split()[header.index("MAXMEM(k)") : header.index("VCPUS") + 1] == [
        "4096",  # 1024 pages
        "1.6",  # of the host's 65536 pages
        "1",
    ]


async def test_other_device_types_statistics_are_summed_per_type() -> None:
    back = "/local/domain/0/backend"
    store = FakeStore(
        {
            "/local/domain/1/device/kv/0/backend": f"{back}/kv/1/0",
            "/local/domain/1/device/kv/1/backend": f"{back}/kv/1/1",
            f"{back}/kv/1/0/statistics/gets": "4",
            f"{back}/kv/1/1/statistics/gets": "3",
            f"{back}/kv/1/1/statistics/note": "not a number",
        }
    )
    sampler = TopSampler(None, store, None)  # type: ignore[arg-type]  # only XenStore is used
    assert await sampler._custom_counters(1) == {"kv": {"gets": 7}}


def test_top_on_a_terminal_quits_on_q(run_dir: Path) -> None:
    import os
    import pty
    import signal
    import subprocess
    import sys
    import time

    xenlike("up", "--detach", run_dir=run_dir)
    master, slave = pty.openpty()
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir), "COLUMNS": "80", "LINES": "24"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenlike", "top", "-d", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 20
        while b"(q quits)" not in output and time.monotonic() < deadline:
            output += os.read(master, 65536)
        os.write(master, b"q")
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        os.close(master)
    assert proc.returncode == 0, output
    frame = output.decode(errors="replace").split("\x1b[2J")[-1]
    assert all(len(line.rstrip("\r")) <= 80 for line in frame.splitlines()), frame
    assert "Domain-0" in frame and "alpha" in frame
