"""Every value a guest owns is checked before use, by tracing too (issue 14 section 5).

A hostile guest (tests/hostile_values.py) writes impossible values into its
own device directories while a trace recorder is attached (`up --trace`):
each attacked device closes with its error node, and Dom0, its back ends
and another guest's devices run on.
"""

import json
import re
from pathlib import Path

from tests.test_up import wait_for, xenlike

HOSTILE = 'type = "hostile", driver = "tests.hostile_values:DRIVER"'
TOPOLOGY = f"""\
[host]
name = "hostile-values"

[dom0]
memory = 64

[[domain]]
name = "good"
memory = 16
vif = ["bridge=xenbr0, ip=10.0.0.3/24"]
devices = [{{ type = "faulty", driver = "tests.faulty_driver:DRIVER", fail-in = "never" }}]

[[domain]]
name = "evil"
memory = 16
init = "tests.hostile_values:program"
devices = [{", ".join(f"{{ {HOSTILE}, devid = {devid} }}" for devid in range(7))}]
"""

EXPECTED = {
    1: r"ring-ref = '18446744073709551616' is not a number from 0 to 4294967295",
    2: r"ring-page-order = '9{40}' is not a number from 0 to 4",
    3: r"event-channel = '-1' is not a number",
    4: r"ring-ref = '\u0661\u0662' is not a number",
    5: r"connect failed: ",  # the hypervisor refuses to map a grant never made
    6: r"protocol 'x86_32-abi': only x86_64-abi is spoken",
}


def test_impossible_values_close_their_device_and_nothing_else(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topology = tmp_path / "hostile.toml"
    topology.write_text(TOPOLOGY)
    trace = tmp_path / "trace.xlt"
    try:
        xenlike(
            "up",
            str(topology),
            "--detach",
            "--timeout",
            "10",
            "--trace",
            str(trace),
            run_dir=run_dir,
            check=False,
        )
        console = run_dir / "console" / "evil.log"
        wait_for(
            lambda: "hostile done" in console.read_text(), timeout=90, what="the hostile program"
        )
        text = console.read_text()
        assert "hostile 0: back end state 2" in text, text  # still waiting, unharmed
        for devid, pattern in EXPECTED.items():
            line = re.search(rf"hostile {devid}: back end state (\d): (.*)", text)
            assert line is not None, text
            assert line.group(1) in ("5", "6"), line.group(0)
            assert re.search(pattern, line.group(2)), line.group(0)
        report = json.loads(xenlike("devices", "--json", run_dir=run_dir).stdout)
        good = [d for d in report if d["domain"] == "good"]
        assert len(good) == 2 and all(
            (d["frontend_state"], d["backend_state"]) == ("Connected", "Connected") for d in good
        ), good
        rows = json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)
        assert [r["name"] for r in rows] == ["Domain-0", "good", "evil"]
        assert "Traceback" not in (run_dir / "domains" / "0.log").read_text()
    finally:
        xenlike("down", run_dir=run_dir, check=False)
