"""xl's domain commands against one running topology: list in xl's format, pause and
unpause, info, uptime, domid/domname/rename, usage, and a suspend that is kept.

The topology is real processes, started once for the module; the commands run
in this process through click's runner (the same code as the `xenlike`
executable, whose process start-up test_up.py covers), so the module stays fast.
"""

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from tests.test_up import wait_for
from tests.test_up import xenlike as xenlike_process
from xenlike.abi.domctl import (
    XEN_DOMINF_blocked,
    XEN_DOMINF_paused,
    XEN_DOMINF_running,
    XEN_DOMINF_shutdown,
    XEN_DOMINF_shutdownshift,
)
from xenlike.abi.sched import ShutdownReason
from xenlike.tools.cli import main
from xenlike.tools.domains import LIST_HEADER, list_letters, uptime_to_string

TOPOLOGY = """\
[host]
name = "domains"

[dom0]
memory = 64
images = { "alpha.img" = "64M", "beta.img" = "64M" }

[[domain]]
name = "alpha"
memory = 32
init = "domains.guest.demo:main"
vif = ["mac=00:16:3e:00:00:01, bridge=xenbr0, ip=10.0.0.1/24, mtu=1400"]
disk = ["format=raw, vdev=xvda, access=rw, target=alpha.img"]

[[domain]]
name = "beta"
memory = 32
init = "domains.guest.demo:main"
vif = ["mac=00:16:3e:00:00:02, bridge=xenbr0, ip=10.0.0.2/24"]
disk = ["format=raw, vdev=xvda, access=rw, target=beta.img"]

[[domain]]
name = "clock"
memory = 16
init = "tests.programs:ticker"
"""

# xl list's row: printf("%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f", ...)
XL_ROW = re.compile(
    r"(?P<name>.{40}) (?P<id>[ \d]{4}\d) (?P<mem>[ \d]{4}\d) (?P<vcpus>[ \d]{4}\d)     "
    r"(?P<state>[r-][b-][p-][s-][-rscwS?][d-])  (?P<time>[ \d]{5}\d\.\d)"
)


@attrs.frozen
class Ran:
    returncode: int
    stdout: str
    stderr: str


def xenlike(*args: str, run_dir: Path, check: bool = True) -> Ran:
    """`xenlike ARGS` run in this process against the topology in `run_dir`."""
    result = CliRunner().invoke(main, list(args), env={"XENLIKE_RUN_DIR": str(run_dir)})
    ran = Ran(result.exit_code, result.stdout, result.stderr)
    if check and ran.returncode != 0:
        raise AssertionError(f"xenlike {' '.join(args)} exited {ran.returncode}:\n{ran}")
    return ran


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = tmp_path_factory.mktemp("domains")
    topology = base / "domains.toml"
    topology.write_text(TOPOLOGY)
    path = base / "run"
    xenlike_process("up", str(topology), "--detach", run_dir=path)
    yield path
    xenlike_process("down", "--grace", "2", run_dir=path, check=False)


def demos_done(run_dir: Path) -> None:
    for name in ("alpha", "beta"):
        wait_for(
            lambda name=name: (  # type: ignore[misc]
                "demo done" in xenlike("console", name, "--no-follow", run_dir=run_dir).stdout
            ),
            what=f"{name}'s demo",
        )


def test_state_letters_are_xl_lists() -> None:
    assert list_letters(XEN_DOMINF_running) == "r-----"
    assert list_letters(XEN_DOMINF_blocked) == "-b----"
    assert list_letters(XEN_DOMINF_paused) == "--p---"
    crashed = XEN_DOMINF_shutdown | ShutdownReason.crash << XEN_DOMINF_shutdownshift
    assert list_letters(crashed) == "---sc-"
    suspended = XEN_DOMINF_shutdown | ShutdownReason.suspend << XEN_DOMINF_shutdownshift
    assert list_letters(suspended) == "---ss-"
    assert list_letters(XEN_DOMINF_shutdown) == "---s--"  # poweroff: xl's '-'


def test_uptime_is_written_as_xl_writes_it() -> None:
    assert uptime_to_string(59) == " 0:00:59"
    assert uptime_to_string(3600 * 13 + 61) == "13:01:01"
    assert uptime_to_string(86400 + 5) == "1 day,  0:00:05"
    assert uptime_to_string(3 * 86400 + 7260) == "3 days,  2:01:00"
    assert uptime_to_string(3 * 86400 + 7260, short=True) == "3 days,  2:01"


def test_list_prints_xl_lists_columns_and_widths(run_dir: Path) -> None:
    lines = xenlike("list", run_dir=run_dir).stdout.splitlines()
    assert (
        lines[0]
        == LIST_HEADER
        == ("Name                                        ID   Mem VCPUs\tState\tTime(s)")
    )
    rows = [XL_ROW.fullmatch(line) for line in lines[1:]]
    assert all(rows), lines
    found = {m["name"].rstrip(): m for m in rows if m}
    assert list(found) == ["Domain-0", "alpha", "beta", "clock"]
    assert [int(found[n]["id"]) for n in found] == [0, 1, 2, 3]
    assert (int(found["alpha"]["mem"]), int(found["clock"]["mem"])) == (32, 16)
    assert all(m["vcpus"].strip() == "1" for m in found.values())
    one = xenlike("list", "beta", run_dir=run_dir).stdout.splitlines()
    assert one[0] == LIST_HEADER and len(one) == 2 and one[1].startswith("beta ")
    assert xenlike("list", "2", run_dir=run_dir).stdout == "\n".join(one) + "\n"
    missing = xenlike("list", "nosuch", run_dir=run_dir, check=False)
    assert missing.returncode == 1
    assert missing.stderr == "xenlike: domain 'nosuch' does not exist\n"


def test_list_long_is_libxls_domain_config(run_dir: Path) -> None:
    listing = json.loads(xenlike("list", "-l", run_dir=run_dir).stdout)
    assert [entry["domid"] for entry in listing] == [1, 2, 3]  # Dom0 keeps no config, as in xl
    alpha = json.loads(xenlike("list", "--long", "alpha", run_dir=run_dir).stdout)
    assert len(alpha) == 1 and alpha[0]["domid"] == 1
    config = alpha[0]["config"]
    assert config["c_info"]["name"] == "alpha" and config["c_info"]["type"] == "pv"
    uuid = config["c_info"]["uuid"]
    assert xenlike("xenstore", "read", f"/vm/{uuid}/name", run_dir=run_dir).stdout == "alpha\n"
    assert config["b_info"]["max_memkb"] == config["b_info"]["target_memkb"] == 32 * 1024
    assert config["b_info"]["type.pv"]["init"] == "domains.guest.demo:main"
    assert config["disks"][0]["vdev"] == "xvda" and config["disks"][0]["readwrite"] == 1
    assert config["nics"][0]["mac"] == "00:16:3e:00:00:01"
    assert config["on_crash"] == "destroy"


def test_vif_mtu_reaches_both_ends(run_dir: Path) -> None:
    def read(path: str) -> str:
        return xenlike("xenstore", "read", path, run_dir=run_dir).stdout.strip()

    assert read("/local/domain/0/backend/vif/1/0/mtu") == "1400"
    assert read("/local/domain/1/device/vif/0/mtu") == "1400"
    assert (
        xenlike(
            "xenstore",
            "exists",
            "/local/domain/0/backend/vif/2/0/mtu",
            run_dir=run_dir,
            check=False,
        ).returncode
        != 0
    )


def ticks(run_dir: Path) -> list[int]:
    log = (run_dir / "console" / "clock.log").read_text()
    return [int(n) for n in re.findall(r"\[clock\] tick (\d+)\n", log)]


def state_of(run_dir: Path, name: str) -> str:
    row = XL_ROW.fullmatch(xenlike("list", name, run_dir=run_dir).stdout.splitlines()[1])
    assert row is not None
    return row["state"]


def test_a_paused_domain_runs_no_code_and_resumes_where_it_stopped(run_dir: Path) -> None:
    wait_for(lambda: len(ticks(run_dir)) >= 3, what="clock's ticks")
    assert xenlike("pause", "clock", run_dir=run_dir).stdout == "paused clock\n"
    assert state_of(run_dir, "clock") == "--p---"
    console = run_dir / "console" / "clock.log"
    size = console.stat().st_size
    cpu = json.loads(xenlike("list", "clock", "--json", run_dir=run_dir).stdout)[0]["time"]
    time.sleep(1.0)  # ten ticks' worth: a running clock would have printed
    assert console.stat().st_size == size, "a paused domain's console grew"
    assert json.loads(xenlike("list", "3", "--json", run_dir=run_dir).stdout)[0]["time"] == cpu
    last = ticks(run_dir)[-1]
    assert xenlike("unpause", "3", run_dir=run_dir).stdout == "unpaused 3\n"
    wait_for(lambda: len(ticks(run_dir)) > last + 3, what="clock's ticks after unpause")
    after = ticks(run_dir)
    assert after == list(range(after[0], after[0] + len(after))), "a tick lost or repeated"
    assert state_of(run_dir, "clock")[2] == "-"


def test_dom0_is_not_paused_and_unknown_domains_are_one_line(run_dir: Path) -> None:
    dom0 = xenlike("pause", "0", run_dir=run_dir, check=False)
    assert dom0.returncode == 1 and "Domain-0 cannot be paused" in dom0.stderr
    assert len(dom0.stderr.splitlines()) == 1
    for command in (["pause", "nosuch"], ["unpause", "42"], ["domid", "nosuch"]):
        result = xenlike(*command, run_dir=run_dir, check=False)
        assert result.returncode == 1 and result.stderr.startswith("xenlike: domain ")
        assert "does not exist" in result.stderr and len(result.stderr.splitlines()) == 1


def test_domid_domname_and_rename(run_dir: Path) -> None:
    assert xenlike("domid", "beta", run_dir=run_dir).stdout == "2\n"
    assert xenlike("domname", "2", run_dir=run_dir).stdout == "beta\n"
    assert xenlike("domname", "0", run_dir=run_dir).stdout == "Domain-0\n"
    gone = xenlike("domname", "77", run_dir=run_dir, check=False)
    assert gone.returncode == 1 and gone.stderr == "xenlike: domain 77 does not exist\n"
    taken = xenlike("rename", "clock", "beta", run_dir=run_dir, check=False)
    assert taken.returncode == 1 and "a domain named 'beta' already exists" in taken.stderr
    bad = xenlike("rename", "clock", "a b", run_dir=run_dir, check=False)
    assert bad.returncode == 1 and "new name 'a b'" in bad.stderr
    assert xenlike("rename", "clock", "timer", run_dir=run_dir).stdout == "renamed clock to timer\n"
    try:
        assert xenlike("domid", "timer", run_dir=run_dir).stdout == "3\n"
        assert xenlike("domname", "3", run_dir=run_dir).stdout == "timer\n"
        uuid = json.loads(xenlike("list", "-l", "timer", run_dir=run_dir).stdout)[0]["config"][
            "c_info"
        ]["uuid"]
        assert xenlike("xenstore", "read", f"/vm/{uuid}/name", run_dir=run_dir).stdout == "timer\n"
        gone = xenlike("domid", "clock", run_dir=run_dir, check=False)
        assert gone.returncode == 1
        # its console follows the name: the log goes on growing under the new one
        before = xenlike("console", "timer", "--no-follow", run_dir=run_dir).stdout
        assert "[clock] tick" in before
        wait_for(
            lambda: (
                len(xenlike("console", "3", "--no-follow", run_dir=run_dir).stdout) > len(before)
            ),
            what="timer's console to grow",
        )
        assert not (run_dir / "console" / "clock.log").exists()
    finally:
        xenlike("rename", "timer", "clock", run_dir=run_dir)
    assert xenlike("domid", "clock", run_dir=run_dir).stdout == "3\n"


def test_info_prints_xl_infos_fields_padded_as_xl(run_dir: Path) -> None:
    lines = xenlike("info", run_dir=run_dir).stdout.splitlines()
    for line in lines:
        assert re.fullmatch(r"[a-z0-9_]{1,23} *: ?.*", line) and line[23] == ":", line
    keys = [line[:23].rstrip() for line in lines]
    assert keys[:4] == ["host", "release", "version", "machine"]
    for key in ("nr_cpus", "total_memory", "free_memory", "xen_version", "xen_caps"):
        assert key in keys
    assert keys.index("nr_cpus") < keys.index("total_memory") < keys.index("xen_major")
    facts = json.loads(xenlike("info", "--json", run_dir=run_dir).stdout)
    assert facts["xen_version"] == "4.17-xenlike" and facts["xen_pagesize"] == 4096
    assert 0 < facts["free_memory"] <= facts["total_memory"]
    assert facts["virt_caps"] == " pv gnttab-v1"
    assert "virt_caps              : pv gnttab-v1" in lines
    assert facts["xend_config_format"] == 4
    assert set(facts["domu_protections"]) == {"1", "2", "3"}
    shown = {line for line in lines if line.startswith("d1_protections")}
    assert shown == {f"{'d1_protections':<23}: {facts['domu_protections']['1']}"}


def test_uptime_lists_every_domain_as_xl_uptime(run_dir: Path) -> None:
    lines = xenlike("uptime", run_dir=run_dir).stdout.splitlines()
    assert lines[0] == f"{'Name':<33} {'ID':>4} Uptime"
    assert [line[:33].rstrip() for line in lines[1:]] == ["Domain-0", "alpha", "beta", "clock"]
    for line in lines[1:]:
        assert re.fullmatch(r".{33} [ \d]{3}\d (\d+ days?, )?[ \d]\d:\d\d:\d\d", line), line
    one = xenlike("uptime", "beta", run_dir=run_dir).stdout.splitlines()
    assert len(one) == 2 and one[1].startswith("beta ")


def test_usage_meters_cpu_memory_disk_and_network(run_dir: Path) -> None:
    demos_done(run_dir)

    def usage() -> dict[str, dict]:  # type: ignore[type-arg]
        rows = json.loads(xenlike("usage", "--json", run_dir=run_dir).stdout)
        return {row["name"]: row for row in rows}

    first = wait_for(
        lambda: (u := usage())["alpha"]["uptime_s"] >= 5 and u, what="alpha's 5 s of uptime"
    )
    assert list(first) == ["Domain-0", "alpha", "beta", "clock"]
    alpha = first["alpha"]
    assert alpha["cpu_s"] > 0
    # 32 MiB held since its build; the meter samples each second, so the second
    # between the creation and the first sample after the build may go uncounted.
    assert 32 * (alpha["uptime_s"] - 3) <= alpha["mem_mib_s"] <= 32 * alpha["uptime_s"]
    assert alpha["rd_req"] >= 1 and alpha["wr_req"] >= 1 and alpha["rd_kib"] >= 64
    assert alpha["tx_packets"] >= 1 and alpha["rx_packets"] >= 1 and alpha["tx_bytes"] > 0
    assert first["clock"]["rd_req"] == 0 and first["clock"]["tx_packets"] == 0
    later = wait_for(
        lambda: (u := usage())["alpha"]["mem_mib_s"] > alpha["mem_mib_s"] and u,
        what="alpha's memory metering to grow",
    )
    assert later["clock"]["cpu_s"] >= first["clock"]["cpu_s"]
    table = xenlike("usage", run_dir=run_dir).stdout.splitlines()
    assert table[0].split()[:5] == ["Name", "ID", "Uptime(s)", "CPU(s)", "Mem(MiB*s)"]
    assert [line.split()[0] for line in table[1:]] == ["Domain-0", "alpha", "beta", "clock"]


def test_a_suspended_guest_is_kept_not_crashed(run_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "sleeper.cfg"
    config.write_text('name = "sleeper"\nmemory = 8\ninit = "tests.programs:suspend_self"\n')
    created = xenlike("create", str(config), "--no-wait", run_dir=run_dir).stdout
    domid = re.search(r"as domain (\d+)", created)
    assert domid is not None
    try:
        wait_for(
            lambda: state_of(run_dir, "sleeper") == "---ss-",
            what="sleeper to be shut down for a suspend",
        )
        note = f"toolstack: sleeper (d{domid[1]}) suspended: kept"
        dmesg = wait_for(
            lambda: note in (log := xenlike("dmesg", run_dir=run_dir).stdout) and log,
            what="the toolstack's note",
        )
        assert f"(d{domid[1]}) shutdown: suspend" in dmesg
        assert f"sleeper (d{domid[1]}) crash" not in dmesg
        assert state_of(run_dir, "sleeper") == "---ss-"  # on_crash (destroy) did not run
    finally:
        xenlike("destroy", "sleeper", run_dir=run_dir, check=False)
