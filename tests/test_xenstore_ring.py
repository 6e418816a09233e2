"""XenStore over guests' ring pages: real guests, and one that breaks its ring."""

from pathlib import Path

from tests.test_up import wait_for, xenlike

TOPOLOGY = """\
[host]
name = "vandal"

[dom0]
memory = 64

[[domain]]
name = "vandal"
memory = 16
kernel = "tests.kernels:store_vandal"

[[domain]]
name = "honest"
memory = 16
init = "domains.guest.demo:main"
"""


def test_a_guest_that_corrupts_its_ring_is_cut_off_and_the_rest_carry_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topology = tmp_path / "vandal.toml"
    topology.write_text(TOPOLOGY)
    try:
        # The vandal has no PV console, so `up` reports it; the topology runs regardless.
        xenlike("up", str(topology), "--detach", "--timeout", "10", run_dir=run_dir, check=False)
        log = wait_for(
            lambda: (
                "store vandal: ring error" in (out := xenlike("dmesg", run_dir=run_dir).stdout)
                and out
            ),
            what="the vandal's report",
        )
        assert "store vandal: ring error 2" in log  # XENSTORE_ERROR_RINGIDX
        console = run_dir / "console" / "honest.log"
        wait_for(lambda: "demo done" in console.read_text(), what="the honest guest's demo")
        assert (
            xenlike("xenstore", "read", "/local/domain/2/data/greeting", run_dir=run_dir).stdout
            == "hello from honest\n"
        )
        xenlike("xenstore", "write", "/local/domain/2/data/after", "still served", run_dir=run_dir)
        assert "Domain-0" in xenlike("list", run_dir=run_dir).stdout
    finally:
        xenlike("down", "--grace", "2", run_dir=run_dir, check=False)
