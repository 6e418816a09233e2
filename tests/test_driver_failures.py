"""A driver that raises fails its device, never its domain (issue 16 section 1).

One guest gets a device per place a driver can raise (tests/faulty_driver.py);
another guest's devices, Dom0, xenstored and the toolstack must run on, and
`xenlike devices` must show each failed device with its error.
"""

import json
from pathlib import Path

from tests.test_up import wait_for, xenlike

FAULTY = 'driver = "tests.faulty_driver:DRIVER"'
TOPOLOGY = f"""\
[host]
name = "faulty"

[dom0]
memory = 64

[[domain]]
name = "bad"
memory = 16
init = "tests.faulty_driver:program"
devices = [
  {{ type = "faulty", {FAULTY}, devid = 0, fail-in = "handle" }},
  {{ type = "faulty", {FAULTY}, devid = 1, fail-in = "connected" }},
  {{ type = "faulty", {FAULTY}, devid = 2, fail-in = "statistics" }},
  {{ type = "faulty", {FAULTY}, devid = 3, fail-in = "background" }},
  {{ type = "faulty", {FAULTY}, devid = 4, fail-in = "front-connected" }},
  {{ type = "faulty", {FAULTY}, devid = 5, fail-in = "never" }},
  {{ type = "faulty-features", driver = "tests.faulty_driver:FEATURES_DRIVER" }},
]

[[domain]]
name = "good"
memory = 16
init = "tests.faulty_driver:program"
vif = ["bridge=xenbr0, ip=10.0.0.3/24"]
devices = [{{ type = "faulty", {FAULTY}, devid = 0, fail-in = "never" }}]
"""

EXPECTED = {  # devid -> which end failed, and what its error node says
    "0": ("backend", "handle raised ZeroDivisionError: handle on purpose"),
    "1": ("backend", "connect raised DriverBug: connected on purpose"),
    "2": ("backend", "statistics raised DriverBug: statistics on purpose"),
    "3": ("backend", "_background raised DriverBug: background work on purpose"),
    "4": ("frontend", "connected raised DriverBug: the front end's connected on purpose"),
}


def test_a_driver_that_raises_fails_its_device_and_nothing_else(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    topology = tmp_path / "faulty.toml"
    topology.write_text(TOPOLOGY)
    try:
        xenlike("up", str(topology), "--detach", "--timeout", "20", run_dir=run_dir, check=False)
        console = run_dir / "console" / "bad.log"
        wait_for(
            lambda: "faulty done" in console.read_text(), timeout=60, what="the bad guest's program"
        )
        wait_for(
            lambda: "faulty done" in (run_dir / "console" / "good.log").read_text(),
            timeout=30,
            what="the good guest's program",
        )
        text = console.read_text()
        for devid, (_side, message) in EXPECTED.items():
            assert f"faulty {devid}: failed: " in text and message in text, text
        assert "faulty 5: ok" in text, text
        assert "faulty-features 0: failed: " in text, text
        assert "faulty 0: ok" in (run_dir / "console" / "good.log").read_text()

        report = json.loads(xenlike("devices", "--json", run_dir=run_dir).stdout)
        by_name = {(d["domain"], d["type"], d["devid"]): d for d in report}
        for key in [("good", "faulty", "0"), ("good", "vif", "0"), ("bad", "faulty", "5")]:
            device = by_name[key]
            assert (device["frontend_state"], device["backend_state"]) == (
                "Connected",
                "Connected",
            ), device
        for devid, (side, message) in EXPECTED.items():
            device = by_name[("bad", "faulty", devid)]
            assert "Connected" not in (device["frontend_state"], device["backend_state"]), device
            assert any(e.startswith(f"{side}: 5 ") and message in e for e in device["errors"]), (
                device
            )
        features = by_name[("bad", "faulty-features", "0")]
        assert any("publish features raised DriverBug" in e for e in features["errors"])

        table = xenlike("devices", "bad", run_dir=run_dir).stdout
        assert "error: backend: 5 handle raised ZeroDivisionError: handle on purpose" in table
        rows = json.loads(xenlike("list", "--json", run_dir=run_dir).stdout)
        assert [r["name"] for r in rows] == ["Domain-0", "bad", "good"]
        dmesg = xenlike("dmesg", run_dir=run_dir).stdout
        assert "xenbus: /local/domain/0/backend/faulty/1/0: handle raised" in dmesg
        dom0_log = (run_dir / "domains" / "0.log").read_text()
        assert "Traceback" in dom0_log and "ZeroDivisionError: handle on purpose" in dom0_log
        node = "/local/domain/0/error/backend/faulty/1/0/error"
        assert "handle raised" in xenlike("xenstore", "read", node, run_dir=run_dir).stdout
        xenlike("destroy", "bad", run_dir=run_dir)  # its error nodes go with its back ends
        assert xenlike("xenstore", "read", node, run_dir=run_dir, check=False).returncode == 1
        good = json.loads(xenlike("devices", "good", "--json", run_dir=run_dir).stdout)
        assert all(d["backend_state"] == "Connected" for d in good)
    finally:
        xenlike("down", run_dir=run_dir, check=False)


class _Store:
    """Just enough XenStore for probing: reads, listings and writes over a dict."""

    def __init__(self, nodes: dict[str, str]) -> None:
        self.nodes = nodes

    async def read_optional(self, path: str) -> str | None:
        return self.nodes.get(path)

    async def ls_optional(self, path: str) -> list[str]:
        return sorted(
            {p[len(path) + 1 :].split("/")[0] for p in self.nodes if p.startswith(path + "/")}
        )

    async def write(self, path: str, value: str) -> None:
        self.nodes[path] = value


async def test_a_driver_that_cannot_be_loaded_fails_its_devices_only(nursery) -> None:  # type: ignore[no-untyped-def]
    """A guest (or Dom0) whose driver module is gone by the time it loads it: the
    device of that type fails with the reason; another type's device is probed."""
    from types import SimpleNamespace

    from xenlike.xenbus import DriverRegistry, FrontendBus, XenbusContext

    home = "/local/domain/1/device"
    store = _Store(
        {
            f"{home}/gone/0/backend": "/local/domain/0/backend/gone/1/0",
            f"{home}/gone/0/backend-id": "0",
            f"{home}/other/0/backend": "/local/domain/0/backend/other/1/0",
            f"{home}/other/0/backend-id": "0",
        }
    )
    registry = DriverRegistry()
    assert registry.register_dotted("tests.no_such_driver:DRIVER", "gone") is None
    bus = FrontendBus(XenbusContext(SimpleNamespace(domid=1), store, nursery), registry)
    await bus._probe(nursery)
    error = store.nodes["/local/domain/1/error/device/gone/0/error"]
    assert error.startswith("5 driver 'tests.no_such_driver:DRIVER' cannot be loaded"), error
    assert store.nodes[f"{home}/gone/0/state"] == "5"  # Closing
    assert f"{home}/other/0/state" not in store.nodes  # no driver: left alone, not failed
    await bus._probe(nursery)  # probed again: reported once, not in a loop
    assert bus.devices == {}
