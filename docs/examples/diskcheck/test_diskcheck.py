"""The guest-programs example runs, and what it wrote is on the image."""

from pathlib import Path

from xenlike.testing import RunningTopology

EXAMPLES = Path(__file__).resolve().parent.parent


def test_the_disk_example_runs_and_leaves_its_pattern(tmp_path: Path) -> None:
    topology = (EXAMPLES / "diskcheck.toml").read_text()
    with RunningTopology(topology, tmp_path, pythonpath=[EXAMPLES]) as topo:
        console = topo.wait_for_console("checker", "disk check passed")
        assert "'persistent': True" in console
    image = (topo.run_dir / "check.img").read_bytes()  # Dom0's images live there
    assert image[: 33 * 4096] == bytes(range(256)) * 16 * 33
    assert image[33 * 4096 :] == bytes(len(image) - 33 * 4096)
