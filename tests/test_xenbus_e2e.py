"""A custom PV driver pair through the whole stack: toolstack, XenBus, rings, reconnect."""

import json
from pathlib import Path

from tests.test_up import wait_for, xenlike

TOPOLOGY = """\
[host]
name = "echo"

[dom0]
memory = 64

[[domain]]
name = "client"
memory = 16
init = "tests.echo_driver:program"
devices = [{ type = "echo", driver = "tests.echo_driver:DRIVER", factor = "3", \
restart-after = "2" }]
"""


def test_custom_driver_connects_answers_and_survives_a_reconnect(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topology = tmp_path / "echo.toml"
    topology.write_text(TOPOLOGY)
    try:
        xenlike("up", str(topology), "--detach", run_dir=run_dir)
        console = run_dir / "console" / "client.log"
        wait_for(
            lambda: "back-end restart ok" in console.read_text() or "Error" in console.read_text(),
            timeout=60,
            what="the echo program",
        )
        text = console.read_text()
        assert "echo ok: 2000 answers, ring-page-order 1" in text, text
        assert "echo reconnect ok" in text, text
        assert "echo across a back-end restart ok" in text, text
        report = json.loads(xenlike("devices", "client", "--json", run_dir=run_dir).stdout)
        (device,) = report
        assert (device["frontend_state"], device["backend_state"]) == ("Connected", "Connected")
        assert device["features"]["backend/feature-scale"] == "1"
        assert device["features"]["backend/max-ring-page-order"] == "2"
        assert device["waiting"] is None
    finally:
        xenlike("down", run_dir=run_dir, check=False)
