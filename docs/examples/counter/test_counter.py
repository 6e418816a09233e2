"""The resumable example counts on after a save, a destroy and a restore."""

from pathlib import Path

from xenlike.testing import RunningTopology, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent


def test_the_count_survives_a_save_and_a_restore(tmp_path: Path) -> None:
    topology = (EXAMPLES / "counter.toml").read_text()
    with RunningTopology(topology, tmp_path, pythonpath=[EXAMPLES]) as topo:

        def count() -> int:
            path = f"/local/domain/{topo.domid('counter')}/data/count"
            read = topo.xenlike("xenstore", "read", path, check=False)
            return int(read.stdout) if read.returncode == 0 else -1

        wait_for(lambda: count() >= 2, what="the count to reach 2")
        file = tmp_path / "counter.sav"
        topo.xenlike("save", "counter", str(file))
        topo.xenlike("restore", str(file))
        console = topo.wait_for_console("counter", "resumed at count")
        resumed_at = int(console.rsplit("resumed at count ", 1)[1].split()[0])
        assert resumed_at >= 2  # not from 0
        wait_for(lambda: count() > resumed_at, what="the count to go on")
