"""Ballooning end to end: `xenlike mem-set` and `mem-max`, the guest kernel's balloon
driver, and the host's pool as physinfo reports it."""

import json
from pathlib import Path

import pytest
import trio

from xenlike.testing import RunningTopology, wait_for
from xenlike.tools.cli import parse_mem_size_kb
from xenlike.xc import XenControl

MIB = 256  # pages


def free_pages(topo: RunningTopology) -> int:
    async def ask() -> int:
        async with XenControl.connect(topo.run_dir) as xc:
            return int((await xc.physinfo()).free_pages)

    return trio.run(ask)


def free_memory(topo: RunningTopology) -> int:
    return int(json.loads(topo.xenlike("info", "--json").stdout)["free_memory"])


def mem(topo: RunningTopology, name: str) -> int:
    return next(int(d["mem"]) for d in topo.domains() if d["name"] == name)


def test_mem_set_shrinks_beta_and_the_host_gets_the_memory_back(tmp_path: Path) -> None:
    with RunningTopology(None, tmp_path) as topo:
        free = free_pages(topo)
        assert free == (1024 - 128 - 32 - 32) * MIB
        assert free_memory(topo) == 1024 - 128 - 32 - 32
        assert topo.xenstore("read", "/local/domain/2/memory/static-max") == "32768"
        wait_for(lambda: topo.xenstore("read", "/local/domain/2/control/feature-balloon"), 10)
        topo.xenlike("mem-set", "beta", "16m")
        wait_for(lambda: mem(topo, "beta") == 16, 10, "beta at 16 MiB")
        assert free_pages(topo) == free + 16 * MIB
        assert free_memory(topo) == 1024 - 128 - 32 - 16  # xl info's free_memory, MiB
        assert topo.xenstore("read", "/local/domain/2/memory/target") == "16384"
        assert mem(topo, "alpha") == 32
        topo.xenlike("mem-set", "beta", "32")  # no suffix: MiB, as xl
        wait_for(lambda: mem(topo, "beta") == 32, 10, "beta back at 32 MiB")
        assert free_pages(topo) == free
        refused = topo.xenlike("mem-set", "beta", "33m", check=False)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr == (
            "xenlike: cannot set beta's memory to 33792 KiB: memory_dynamic_max must be less"
            " than or equal to memory_static_max (32768 KiB; raise it with mem-max)\n"
        )
        bad = topo.xenlike("mem-set", "beta", "16mb", check=False)
        assert (bad.returncode, bad.stderr) == (1, "xenlike: invalid memory size: 16mb\n")


SMALL_HOST = """
[host]
memory = 256

[dom0]
memory = 128

[[domain]]
name = "grow"
memory = 32
maxmem = 128
"""


def test_a_guest_grows_to_maxmem_as_the_pool_allows(tmp_path: Path) -> None:
    """The pool (256 MiB) runs dry before `grow` reaches its target: the balloon keeps
    what it got and retries; once another guest is destroyed it gets the rest. A
    create that does not fit is one clear line; so is a mem-max beyond maxmem."""
    (tmp_path / "other.cfg").write_text('name = "other"\nmemory = 64\n')
    (tmp_path / "big.cfg").write_text('name = "big"\nmemory = 64\n')
    with RunningTopology(SMALL_HOST, tmp_path) as topo:
        assert mem(topo, "grow") == 32
        assert topo.xenstore("read", "/local/domain/1/memory/static-max") == "131072"
        assert free_pages(topo) == 96 * MIB
        topo.xenlike("create", str(tmp_path / "other.cfg"))
        assert free_pages(topo) == 32 * MIB
        wait_for(lambda: topo.xenstore("read", "/local/domain/1/control/feature-balloon"), 10)
        topo.xenlike("mem-set", "grow", "128m")
        wait_for(lambda: mem(topo, "grow") == 64, 10, "grow to take the 32 MiB left")
        assert free_pages(topo) == 0
        refused = topo.xenlike("create", str(tmp_path / "big.cfg"), check=False)
        assert refused.returncode == 1
        assert refused.stderr == (
            "xenlike: cannot create big: the host has 0 MiB free, big needs 64 MiB\n"
        )
        topo.xenlike("destroy", "other")
        wait_for(lambda: mem(topo, "grow") == 128, 40, "grow to reach 128 MiB on a retry")
        assert free_pages(topo) == 0
        too_big = topo.xenlike("mem-max", "grow", "129m", check=False)
        assert too_big.returncode == 1 and "sized for 131072 KiB at create" in too_big.stderr


HOLDER = """
[[domain]]
name = "holder"
memory = 32
init = "tests.programs:hold_pages"
"""


def test_the_balloon_never_gives_back_pages_in_use(tmp_path: Path) -> None:
    """The program holds 8 MiB of pages: asked to go to 4 MiB, the balloon stops above
    them (and its 1 MiB reserve), says so once, and the pool gets the rest."""
    with RunningTopology(HOLDER, tmp_path) as topo:
        console = topo.wait_for_console("holder", "holding 2048 pages")
        assert "memory/target is not ours: EACCES" in console
        assert topo.xenstore("read", "/local/domain/1/memory/target") == "32768"
        free = free_pages(topo)
        topo.xenlike("mem-set", "holder", "4m")
        console = topo.wait_for_console("holder", "balloon: cannot go below", 20)
        assert console.count("balloon: cannot go below") == 1
        floor = mem(topo, "holder")
        assert 9 <= floor < 11, floor
        assert free_pages(topo) - free >= (32 - 11) * MIB
        topo.xenlike("mem-set", "holder", "32m")
        wait_for(lambda: mem(topo, "holder") == 32, 10, "holder back at 32 MiB")
        assert free_pages(topo) == free


@pytest.mark.parametrize(
    "text,kib",
    [("16m", 16384), ("16", 16384), ("16M", 16384), ("512k", 512), ("1g", 1 << 20)]
    + [("4096b", 4), ("2T", 2 << 30)],
)
def test_sizes_are_read_as_xl_reads_them(text: str, kib: int) -> None:
    assert parse_mem_size_kb(text) == kib


@pytest.mark.parametrize("text", ["", "m", "1.5g", "16mb", "-3", "0", "12x", "0x10"])
def test_sizes_xl_refuses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_mem_size_kb(text)
