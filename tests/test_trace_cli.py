"""`xenlike trace`: filters, lines, reports and Perfetto exports; ring and XenBus events.

The first tests take the pieces alone, on records made up here or on a ring
pair in this process. The last ones run a topology: a guest with an echo
device runs a known workload while `xenlike trace --record --rings`
follows, a second guest is created with a device no back end serves, and
the recording, its report, its export and `xenlike devices` are checked
against what the workload did.
"""

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from click.testing import CliRunner

from domains.guest import Guest
from tests.echo_driver import ECHO_RING
from tests.test_up import XENLIKE, wait_for, xenlike
from xenlike.abi.errno import Errno
from xenlike.abi.event_channel import EvtchnOp, EvtchnStat, evtchn_close
from xenlike.abi.grant_table import GnttabOp
from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import HypercallError
from xenlike.ring import BackRing, FrontRing
from xenlike.testing import doorbell_pair
from xenlike.tools.cli import main
from xenlike.trace import (
    LostRecords,
    TraceBuffer,
    TraceRecord,
    TraceSource,
    TraceWriter,
    decode_records,
    load,
    save,
)
from xenlike.trace.events import (
    DeviceTrace,
    EventRecorder,
    EvtchnEvent,
    RingEvent,
    RingTrace,
    XenbusEvent,
    XenlikeOp,
    pack_name,
    unpack_name,
)
from xenlike.trace.export import perfetto
from xenlike.trace.report import percentile, summarize
from xenlike.trace.view import (
    Filter,
    OpSpec,
    describe,
    format_event,
    parse_duration,
    parse_op,
)
from xenlike.xenbus import Driver, Frontend
from xenlike.xenbus.channel import BackChannel, FrontChannel
from xenlike.xenstore.wire import XenStoreError

EVTCHN = int(Hypercall.event_channel_op)
GNTTAB = int(Hypercall.grant_table_op)
DOMCTL = int(Hypercall.domctl)
CLOSE = compile_struct(evtchn_close, "evtchn_close")
WORKLOAD_CALLS = 300


def call(
    time_ns: int,
    domid: int,
    op: int,
    cmd: int,
    args: tuple[int, ...] = (0, 0, 0, 0),
    *,
    result: int = 0,
    duration_ns: int = 1_000,
    count: int = 1,
    fast: bool = False,
) -> TraceRecord:
    return TraceRecord(time_ns, domid, op, cmd, args, count, result, duration_ns, fast)


def event(
    time_ns: int, domid: int, op: int, cmd: int, args: tuple[int, ...], count: int = 0
) -> TraceRecord:
    return TraceRecord(time_ns, domid, op, cmd, args, count, 0, 0, True)


def ring_push(
    time_ns: int, domid: int, port: int, pushed: int, notify: bool, *, backend: bool = False
) -> TraceRecord:
    cmd = RingEvent.push_responses if backend else RingEvent.push_requests
    return event(time_ns, domid, XenlikeOp.ring, cmd, (port, time_ns, pushed, int(notify)))


# --- parsing and filtering ------------------------------------------------------


def test_durations_take_a_unit() -> None:
    assert [parse_duration(t) for t in ("100us", "2ms", "1.5s", "500ns", "20µs")] == [
        100_000,
        2_000_000,
        1_500_000_000,
        500,
        20_000,
    ]
    with pytest.raises(ValueError, match="a number and a unit"):
        parse_duration("100")


def test_ops_by_name_or_number_with_or_without_a_sub_op() -> None:
    assert parse_op("event_channel_op.send") == OpSpec(EVTCHN, EvtchnOp.send)
    assert parse_op("grant_table_op") == OpSpec(GNTTAB)
    assert parse_op("20") == OpSpec(GNTTAB) and parse_op("32.4") == OpSpec(EVTCHN, 4)
    assert parse_op("xenbus") == OpSpec(XenlikeOp.xenbus)
    assert parse_op("ring.push_requests") == OpSpec(XenlikeOp.ring, RingEvent.push_requests)
    with pytest.raises(ValueError, match="no op named 'nosuch'.*event_channel_op"):
        parse_op("nosuch")
    with pytest.raises(ValueError, match="no sub-op named 'sned'.*send"):
        parse_op("event_channel_op.sned")


def test_filters_combine_and_lost_records_always_show_for_their_domain() -> None:
    send = call(1, 1, EVTCHN, EvtchnOp.send, (5, 0, 0, 0), fast=True, duration_ns=0)
    slow_map = call(2, 0, GNTTAB, GnttabOp.map_grant_ref, duration_ns=3_000_000)
    failed = call(3, 1, EVTCHN, EvtchnOp.close, result=-Errno.EINVAL)
    lost = LostRecords(4, 1, 10, True)
    events = [send, slow_map, failed, lost]
    assert [e for e in events if Filter(domains=frozenset({1}))(e)] == [send, failed, lost]
    assert [e for e in events if Filter(ops=(parse_op("event_channel_op.send"),))(e)] == [
        send,
        lost,
    ]
    assert [e for e in events if Filter(errors=True)(e)] == [failed, lost]
    assert [e for e in events if Filter(slower_than_ns=parse_duration("2ms"))(e)] == [
        slow_map,
        lost,
    ]
    assert [e for e in events if Filter(frozenset({0}), errors=True)(e)] == []


def test_a_line_has_time_domain_call_arguments_result_and_duration() -> None:
    def wallclock(ns: int) -> int:
        return 1_700_000_000_000_000_000 + ns

    failed = call(
        0, 1, EVTCHN, EvtchnOp.close, (999, 0, 0, 0), result=-Errno.EINVAL, duration_ns=12_345
    )
    line = format_event(failed, wallclock)
    assert " d1 " in line and "event_channel_op.close" in line and "port=999" in line
    assert line.endswith("= EINVAL  12.3us")
    send = call(0, 2, EVTCHN, EvtchnOp.send, (7, 0, 0, 0), fast=True, duration_ns=0)
    assert format_event(send, wallclock).endswith("= 0  fast path")
    state = event(0, 1, XenlikeOp.xenbus, XenbusEvent.state, (pack_name("vbd"), 51712, 4, 0))
    assert describe(state) == "xenbus.state frontend vbd/51712 -> Connected"
    peer = event(0, 0, XenlikeOp.xenbus, XenbusEvent.peer, (pack_name("vbd"), 51712, 3, 1), 1)
    assert describe(peer) == "xenbus.peer backend vbd/51712 saw frontend (d1) Initialised"
    assert (
        describe(ring_push(0, 1, 5, 3, False)) == "ring.push_requests port 5 prod 0 +3 suppressed"
    )
    assert describe(LostRecords(0, 1, 9, True)) == "lost 9 records (domain buffer)"
    colored = format_event(failed, wallclock, color=True)
    assert "\x1b[" in colored and "EINVAL" in colored
    assert unpack_name(pack_name("console")) == "console"


# --- report and export on made-up records ----------------------------------------------


def made_up_trace() -> list[Any]:
    """d1's front end pushes on port 5 (peer d0:7), d0's back end answers on port 7."""
    return [
        call(1_000, 0, DOMCTL, 1, duration_ns=1_500),
        call(2_000, 1, EVTCHN, EvtchnOp.alloc_unbound, (0x7FF0, 0, 0, 0)),
        call(3_000, 0, EVTCHN, EvtchnOp.bind_interdomain, (1, 5, 0, 0), duration_ns=400),
        call(4_000, 0, GNTTAB, GnttabOp.map_grant_ref, count=2, duration_ns=600),
        event(5_000, 1, XenlikeOp.ring, RingEvent.attach, (pack_name("echo"), 0, 5, 0)),
        event(5_000, 0, XenlikeOp.ring, RingEvent.attach, (pack_name("echo"), 0, 7, 1), 1),
        ring_push(6_000, 1, 5, 4, True),
        call(6_000, 1, EVTCHN, EvtchnOp.send, (5, 0, 0, 0), fast=True, duration_ns=0),
        ring_push(7_000, 0, 7, 4, True, backend=True),
        event(7_500, 0, XenlikeOp.evtchn, EvtchnEvent.peer, (7, 1, 5, EvtchnStat.interdomain)),
        call(7_500, 0, EVTCHN, EvtchnOp.send, (7, 0, 0, 0), fast=True, duration_ns=0),
        ring_push(8_000, 1, 5, 2, False),
        ring_push(9_000, 1, 5, 1, False),
        ring_push(9_500, 1, 5, 1, True),
        call(9_500, 1, EVTCHN, EvtchnOp.send, (5, 0, 0, 0), fast=True, duration_ns=0),
        call(10_000, 1, EVTCHN, EvtchnOp.close, (99, 0, 0, 0), result=-Errno.EINVAL),
        LostRecords(11_000, 1, 3, True),
        call(12_000, 0, GNTTAB, GnttabOp.unmap_grant_ref, count=2, duration_ns=20_000),
    ]


def test_report_counts_failures_latencies_sends_grants_and_rings() -> None:
    summary = summarize(made_up_trace())
    assert summary["records"] == 17 and summary["lost"] == 3
    rows = {(h["domid"], h["name"]): h for h in summary["hypercalls"]}
    assert rows[(1, "event_channel_op.send")]["count"] == 2
    assert rows[(1, "event_channel_op.send")]["p50_us"] is None  # fast path: no latency
    assert rows[(0, "domctl.createdomain")]["max_us"] == 1.5
    assert rows[(1, "event_channel_op.close")]["failures"] == 1
    assert summary["failures"] == [
        {"domid": 1, "name": "event_channel_op.close", "error": "EINVAL", "count": 1}
    ]
    sends = {(s["domid"], s["port"]): s for s in summary["evtchn_sends"]}
    assert sends[(1, 5)]["peer"] is None and sends[(0, 7)]["peer"] == "d1:5"
    assert (sends[(1, 5)]["ring_pushes"], sends[(1, 5)]["suppressed"]) == (4, 2)
    assert sends[(1, 5)]["suppressed_share"] == 0.5
    assert summary["grants"] == [
        {
            "domid": 0,
            "map_calls": 1,
            "map_refs": 2,
            "map_failures": 0,
            "unmap_calls": 1,
            "unmap_refs": 2,
            "unmap_failures": 0,
        }
    ]
    busiest = summary["rings"][0]
    assert (busiest["domid"], busiest["port"], busiest["device"], busiest["side"]) == (
        1,
        5,
        "echo/0",
        "frontend",
    )
    assert (busiest["pushes"], busiest["entries"], busiest["suppressed"]) == (4, 8, 2)
    domains = {d["domid"]: d for d in summary["domains"]}
    assert domains[1]["fast_path_sends"] == 2 and domains[1]["lost"] == 3
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([5], 0.99) == 5


def check_trace_events(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The structure a trace-event viewer needs; returns the events."""
    events = document["traceEvents"]
    assert isinstance(events, list) and events
    assert {e["ph"] for e in events} <= {"M", "X", "i", "s", "f"}
    for e in events:
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] != "M":
            assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
    starts = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts.keys() == ends.keys()
    for flow, start in starts.items():
        assert ends[flow]["ts"] >= start["ts"]
    slices: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for e in events:
        if e["ph"] == "X":
            slices.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for track in slices.values():  # slices on one track nest, never half-overlap
        track.sort(key=lambda s: (s[0], -s[1]))
        open_ends: list[float] = []
        for begin, end in track:
            while open_ends and open_ends[-1] <= begin:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + 1e-6
            open_ends.append(end)
    json.dumps(document)
    return events


def test_perfetto_export_of_made_up_records() -> None:
    events = check_trace_events(perfetto(made_up_trace()))
    flows = [e for e in events if e["ph"] == "s"]
    # d1's sends on port 5 go to d0 (its bind_interdomain), d0's on port 7 to d1:5 (a peer record).
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert [(s["pid"], ends[s["id"]]["pid"]) for s in flows] == [(1, 0), (0, 1), (1, 0)]
    names = {e["name"] for e in events if e["ph"] == "i"}
    assert "ring.attach frontend echo/0 (peer d0) on port 5" in names
    assert "lost 3 records (domain buffer)" in names
    creates = [e for e in events if e.get("name") == "domctl.createdomain"]
    assert creates[0]["ts"] == 0 and creates[0]["dur"] == 1.5 and creates[0]["tid"] == 0


# --- files, recorders and ring channels --------------------------------------------


def test_a_streamed_file_is_readable_at_every_flush(tmp_path: Path) -> None:
    path = tmp_path / "stream.xltrace"
    records = made_up_trace()
    with TraceWriter(path) as writer:
        for record in records[:5]:
            writer.write(record)
        assert load(path).events == ()  # written, not flushed yet
        writer.flush()
        assert list(load(path).events) == records[:5]
        for record in records[5:]:
            writer.write(record)
    assert list(load(path).events) == records and writer.count == len(records)
    save(records[:2], tmp_path / "saved.xltrace")
    assert list(load(tmp_path / "saved.xltrace").events) == records[:2]


def buffer_events(buffer: TraceBuffer) -> list[Any]:
    return decode_records(buffer.copy(0, buffer.prod))


async def test_traced_ring_channels_record_pushes_notifies_and_final_checks(nursery) -> None:
    buffer = TraceBuffer.create(4096, domid=1, source=TraceSource.domain)
    buffer.enabled = True
    recorder = EventRecorder(buffer, 1)
    page = memoryview(bytearray(4096))
    front_bell, back_bell = doorbell_pair()
    front = FrontChannel(FrontRing(ECHO_RING, page), front_bell)
    back = BackChannel(BackRing(ECHO_RING, page), back_bell)
    front.trace = RingTrace(recorder, front.ring, 5, backend=False)
    back.trace = RingTrace(recorder, back.ring, 7, backend=True)

    async def serve() -> None:
        async for batch in back.batches_of_requests():
            back.respond_many([ECHO_RING.response.record(id=r.id, value=r.value) for r in batch])

    nursery.start_soon(front.run)
    nursery.start_soon(serve)
    async with trio.open_nursery() as callers:
        for value in range(200):
            callers.start_soon(front.call, ECHO_RING.request.record(value=value))
    await trio.testing.wait_all_tasks_blocked()  # the last pushes and final checks are traced
    nursery.cancel_scope.cancel()
    records = [r for r in buffer_events(buffer) if isinstance(r, TraceRecord)]
    pushes = [r for r in records if r.cmd == RingEvent.push_requests]
    answers = [r for r in records if r.cmd == RingEvent.push_responses]
    assert sum(r.arguments["pushed"] for r in pushes) == front.submitted == 200
    assert sum(r.arguments["pushed"] for r in answers) == back.answered == 200
    assert sum(r.arguments["notify"] for r in pushes) == front.notifies
    assert sum(r.arguments["notify"] for r in answers) == back.notifies < 200  # suppression
    assert all(r.arguments["port"] == 5 for r in pushes) and pushes[-1].arguments["prod"] == 200
    checks = [r for r in records if r.cmd == RingEvent.final_check_requests]
    assert checks and checks[-1].arguments == {"port": 7, "cons": 200, "more": 0}
    assert all(r.op == XenlikeOp.ring and r.domid == 1 for r in records)
    buffer.enabled = False
    front.trace.pushed(True)
    assert buffer_events(buffer)[-1] == records[-1]  # nothing written with no reader
    buffer.close()


async def test_a_device_records_its_state_writes_and_what_it_saw() -> None:
    buffer = TraceBuffer.create(64, domid=2, source=TraceSource.domain)
    buffer.enabled = True
    trace = DeviceTrace(
        EventRecorder(buffer, 2), "vif", 0, "/local/domain/2/device/vif/0", 0, backend=False
    )
    trace.saw_peer(2)
    async with trace.state_write(3):
        pass
    with pytest.raises(XenStoreError):
        async with trace.state_write(4):
            raise XenStoreError("EACCES")
    peer, ok, refused = buffer_events(buffer)
    assert peer.name == "xenbus.peer" and peer.arguments == {
        "device": pack_name("vif"),
        "devid": 0,
        "state": 2,
        "otherend": 0,
    }
    assert ok.name == "xenbus.state" and ok.arguments["state"] == 3 and ok.result == 0
    assert refused.error == "EACCES" and refused.duration_ns > 0
    silent = DeviceTrace(None, "vif", 0, "/x", 0, backend=True)  # a domain with no buffer
    silent.saw_peer(1)
    silent.set_rings(True)
    buffer.close()


def test_bad_options_are_usage_errors_that_say_what_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "t.xltrace"
    save(made_up_trace(), path)
    runner = CliRunner()
    bad_op = runner.invoke(main, ["trace", "show", str(path), "--op", "nosuch"])
    assert bad_op.exit_code == 2 and "no op named 'nosuch'" in bad_op.output
    bad_time = runner.invoke(main, ["trace", "show", str(path), "--slower-than", "3"])
    assert bad_time.exit_code == 2 and "a number and a unit" in bad_time.output
    named = runner.invoke(main, ["trace", "show", str(path), "--domain", "alpha"])
    assert named.exit_code == 2 and "domids only" in named.output
    (tmp_path / "junk").write_bytes(b"not a trace")
    junk = runner.invoke(main, ["trace", "report", str(tmp_path / "junk")])
    assert junk.exit_code == 1 and "not a xenlike trace file" in junk.output
    shown = runner.invoke(main, ["trace", "show", str(path), "-d", "1", "--errors"])
    assert shown.exit_code == 0
    assert [line.split()[2] for line in shown.output.splitlines()] == [
        "event_channel_op.close",
        "lost",
    ]


def test_every_trace_command_has_an_example() -> None:
    runner = CliRunner()
    for args in (["trace"], ["trace", "show"], ["trace", "report"], ["trace", "export"], ["top"]):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0 and "Example:" in result.output, args


# --- a topology, traced ------------------------------------------------------------


async def workload(guest: Guest) -> None:
    """Waits for data/go; then WORKLOAD_CALLS echo calls at once and one refused close."""
    async with guest.xs.watch("data/go") as events:
        async for _ in events:
            try:
                if (await guest.xs.read("data/go")) == b"1":
                    break
            except XenStoreError:
                pass
    device = guest.device("echo")
    async with trio.open_nursery() as nursery:
        for value in range(WORKLOAD_CALLS):
            nursery.start_soon(device.scale, value)
    try:
        await guest.domain.hypercalls.call(
            Hypercall.event_channel_op, EvtchnOp.close, CLOSE.pack((999,)), 1
        )
    except HypercallError as exc:
        print(f"[{guest.name}] close 999: {Errno(exc.errno).name}")
    print(f"[{guest.name}] workload done")
    await trio.sleep_forever()


class StuckFrontend(Frontend):
    """A front end whose device no back end serves: it waits forever in Initialising."""

    device_type = "stuck"
    ring = ECHO_RING


STUCK = Driver("stuck", frontend=StuckFrontend)

TOPOLOGY = """\
[host]
name = "traced"

[dom0]
memory = 64

[[domain]]
name = "client"
memory = 16
init = "tests.test_trace_cli:workload"
devices = [{ type = "echo", driver = "tests.echo_driver:DRIVER", factor = "3" }]
"""

GAMMA = """\
name = "gamma"
memory = 16
devices = [{ type = "stuck", driver = "tests.test_trace_cli:STUCK" }]
"""


def recorded(path: Path) -> list[Any]:
    try:
        return list(load(path).events)
    except (OSError, ValueError):
        return []


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The scenario, run once: paths of the two recordings and what the CLI said."""
    tmp = tmp_path_factory.mktemp("traced")
    run_dir = tmp / "run"
    (tmp / "traced.toml").write_text(TOPOLOGY)
    (tmp / "gamma.cfg").write_text(GAMMA)
    boot, live = tmp / "boot.xltrace", tmp / "live.xltrace"
    env = {**os.environ, "XENLIKE_RUN_DIR": str(run_dir)}
    recorder = None
    try:
        xenlike("up", str(tmp / "traced.toml"), "--detach", "--trace", str(boot), run_dir=run_dir)
        # --history: the handshakes happened before this recorder attached
        recorder = subprocess.Popen(
            [*XENLIKE, "trace", "--record", str(live), "--rings", "--history"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: (
                sum((r.op, r.cmd) == (XenlikeOp.ring, RingEvent.attach) for r in recorded(live))
                == 2
            ),
            what="both ends' rings traced",
        )
        created = xenlike(
            "create",
            str(tmp / "gamma.cfg"),
            "--no-wait",  # a stuck device
            run_dir=run_dir,
        ).stdout
        xenlike("xenstore", "write", "/local/domain/1/data/go", "1", run_dir=run_dir)
        console = run_dir / "console" / "client.log"
        wait_for(lambda: "workload done" in console.read_text(), what="the workload")

        def stuck() -> dict[str, Any] | None:
            report = json.loads(xenlike("devices", "gamma", "--json", run_dir=run_dir).stdout)
            return report[0] if report and report[0]["last_event"] else None

        gamma_device = wait_for(stuck, what="gamma's stuck device in the trace")
        devices_text = xenlike("devices", "gamma", run_dir=run_dir).stdout
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=30)
        rings_left = xenlike(
            "xenstore", "ls", "/local/domain/1/device/echo/0", run_dir=run_dir
        ).stdout
        yield {
            "boot": boot,
            "live": live,
            "created": created,
            "console": console.read_text(),
            "device": gamma_device,
            "devices_text": devices_text,
            "recorder_exit": recorder.returncode,
            "recorder_err": err,
            "rings_left": rings_left,
            "run_dir": run_dir,
            "tmp": tmp,
        }
    finally:
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
        # gamma waits for its device and would not answer a clean shutdown for a while
        xenlike("destroy", "gamma", run_dir=run_dir, check=False)
        xenlike("down", run_dir=run_dir, check=False)


TOOLS = {"sysctl.xenlike_trace_buffers", "event_channel_op.status"}  # the readers' own calls


def names(records: list[Any], domid: int, *, tools: bool = False) -> list[str]:
    """The hypercalls (not sends, not events) a domain made, in order.

    Without `tools`, Dom0's calls that the trace readers themselves make
    (their rescans, the recorder's EVTCHNOP_status) are left out.
    """
    skip = set() if tools else TOOLS
    return [
        r.name
        for r in records
        if isinstance(r, TraceRecord)
        and r.domid == domid
        and r.op < XenlikeOp.xenbus
        and r.cmd_name != "send"
        and r.name not in skip
    ]


def test_the_recorder_stops_cleanly_and_switches_ring_events_off(traced: dict) -> None:
    assert traced["recorder_exit"] == 0, traced["recorder_err"]
    assert "ring events on for: client/echo/0" in traced["recorder_err"]
    assert f"recorded {len(recorded(traced['live']))} records to" in traced["recorder_err"]
    assert "trace-rings" not in traced["rings_left"]
    assert "close 999: EINVAL" in traced["console"]


def about(record: TraceRecord, domid: int) -> bool:
    """Whether a Dom0 call acts on `domid` (its first argument fields name it)."""
    return domid in (record.arguments.get(key) for key in ("domain", "dom", "remote_dom"))


def test_a_guest_boot_is_recorded_call_by_call(traced: dict) -> None:
    records = recorded(traced["live"])
    assert "created gamma as domain 2" in traced["created"]
    gamma = 2
    # Its kernel asks once whether it boots to resume a saved state (save and restore).
    assert names(records, gamma) == [
        "event_channel_op.unmask",
        "event_channel_op.unmask",
        "vcpu_op.xenlike_get_context",
    ]
    dom0 = [
        r
        for r in records
        if isinstance(r, TraceRecord) and r.domid == 0 and r.name in names([r], 0)
    ]
    mine = [r for r in dom0 if about(r, gamma)]
    toolstack = [
        "domctl.createdomain",
        "domctl.max_mem",
        "event_channel_op.alloc_unbound",
        "event_channel_op.alloc_unbound",
        "domctl.xenlike_build",
        "domctl.unpausedomain",
    ]
    assert [r.name for r in mine if r.name in toolstack] == toolstack[1:]
    assert dom0[dom0.index(mine[0]) - 1].name == "domctl.createdomain"  # its result is d2
    build = next(r for r in mine if r.name == "domctl.xenlike_build")
    store_port, console_port = build.arguments["store_evtchn"], build.arguments["console_evtchn"]
    services = [
        (r.name, r.arguments.get("ref"), r.arguments.get("remote_port"))
        for r in mine
        if r.name not in toolstack
    ]
    # XS_INTRODUCE has xenstored map the store page (ref 1) and bind the store port;
    # xenconsoled maps the console page (ref 0) and binds its port; the two interleave.
    assert sorted(services, key=str) == sorted(
        [
            ("grant_table_op.map_grant_ref", 1, None),
            ("event_channel_op.bind_interdomain", None, store_port),
            ("grant_table_op.map_grant_ref", 0, None),
            ("event_channel_op.bind_interdomain", None, console_port),
        ],
        key=str,
    )
    for ref, port in ((1, store_port), (0, console_port)):
        assert services.index(("grant_table_op.map_grant_ref", ref, None)) < services.index(
            ("event_channel_op.bind_interdomain", None, port)
        )
    assert all(r.result >= 0 for r in mine)
    boot = recorded(traced["boot"])  # `up --trace` started before Dom0 created the client
    assert "domctl.createdomain" in names(boot, 0)
    assert names(boot, 1)[:2] == ["event_channel_op.unmask", "event_channel_op.unmask"]


def test_ring_and_handshake_events_match_the_workload(traced: dict) -> None:
    records = [r for r in recorded(traced["live"]) if isinstance(r, TraceRecord)]
    pushes = [
        r for r in records if (r.domid, r.op, r.cmd) == (1, XenlikeOp.ring, RingEvent.push_requests)
    ]
    answers = [
        r
        for r in records
        if (r.domid, r.op, r.cmd) == (0, XenlikeOp.ring, RingEvent.push_responses)
    ]
    assert sum(r.arguments["pushed"] for r in pushes) == WORKLOAD_CALLS
    assert sum(r.arguments["pushed"] for r in answers) == WORKLOAD_CALLS
    gamma_events = [describe(r) for r in records if r.domid == 2 and r.op == XenlikeOp.xenbus]
    assert gamma_events[0] == "xenbus.peer frontend stuck/0 saw backend (d0) Initialising"
    assert "waiting: no back end has picked the device up" in traced["devices_text"]
    assert (
        "last event: d2 xenbus.peer frontend stuck/0 saw backend (d0) Initialising"
        in traced["devices_text"]
    )
    assert traced["device"]["last_event"].startswith("d2 xenbus.peer frontend stuck/0")


def test_the_report_counts_what_the_file_holds(traced: dict) -> None:
    records = recorded(traced["live"])
    result = xenlike("trace", "report", str(traced["live"]), "--json", run_dir=traced["run_dir"])
    summary = json.loads(result.stdout)
    calls = [r for r in records if isinstance(r, TraceRecord) and r.op < XenlikeOp.xenbus]
    assert summary["records"] == sum(isinstance(r, TraceRecord) for r in records)
    assert sum(h["count"] for h in summary["hypercalls"]) == len(calls)
    for row in summary["hypercalls"]:
        mine = [r for r in calls if (r.domid, r.name) == (row["domid"], row["name"])]
        assert row["count"] == len(mine)
        assert row["failures"] == sum(r.result < 0 for r in mine)
    assert {"domid": 1, "name": "event_channel_op.close", "error": "EINVAL", "count": 1} in summary[
        "failures"
    ]
    ring = next(r for r in summary["rings"] if (r["domid"], r["side"]) == (1, "frontend"))
    assert ring["device"] == "echo/0" and ring["entries"] == WORKLOAD_CALLS
    port = next(s for s in summary["evtchn_sends"] if (s["domid"], s["port"]) == (1, ring["port"]))
    assert port["peer"].startswith("d0:") and port["ring_pushes"] == ring["pushes"]
    assert port["sends"] == ring["notified"]  # every notify is a send, every send a notify
    assert 0 < port["suppressed_share"] < 1
    assert summary["grants"][0]["map_calls"] >= 2  # the ring pages and both boot pages
    text = xenlike("trace", "report", str(traced["live"]), run_dir=traced["run_dir"]).stdout
    assert "busiest rings" in text and "echo/0" in text and "EINVAL" in text


def test_the_export_is_valid_trace_event_json(traced: dict) -> None:
    out = traced["tmp"] / "live.json"
    result = xenlike(
        "trace",
        "export",
        str(traced["live"]),
        "--format",
        "perfetto",
        "-o",
        str(out),
        run_dir=traced["run_dir"],
    )
    assert "trace events" in result.stdout
    events = check_trace_events(json.loads(out.read_text()))
    processes = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert {"d0", "d1", "d2"} <= processes
    flows = {e["id"]: e for e in events if e["ph"] == "s"}
    ends = [e for e in events if e["ph"] == "f"]
    assert len(ends) > WORKLOAD_CALLS / 32  # the echo ring's notifies at least
    assert any(flows[e["id"]]["pid"] == 1 and e["pid"] == 0 for e in ends)
    assert any(flows[e["id"]]["pid"] == 0 and e["pid"] == 1 for e in ends)
    instants = [e["name"] for e in events if e["ph"] == "i"]
    assert any(name.startswith("xenbus.state frontend echo/0") for name in instants)


def test_show_filters_the_file_as_live_would(traced: dict) -> None:
    def show(*args: str) -> list[str]:
        return xenlike(
            "trace", "show", str(traced["live"]), *args, run_dir=traced["run_dir"]
        ).stdout.splitlines()

    errors = show("--errors")
    assert len(errors) == 1 and "event_channel_op.close" in errors[0] and "EINVAL" in errors[0]
    sends = show("-d", "1", "--op", "32.4")
    assert sends and all(" d1 " in line and "event_channel_op.send" in line for line in sends)
    xenbus = show("--op", "xenbus", "-d", "2")
    assert xenbus and all("xenbus." in line for line in xenbus)
    assert show("--slower-than", "10s") == []


def test_up_trace_records_ring_events_of_devices_that_appear_later(tmp_path: Path) -> None:
    """`up --trace` records ring events, for the guests it boots and for one created
    afterwards: the recorder follows devices as they appear."""
    run_dir = tmp_path / "run"
    trace = tmp_path / "up.xltrace"
    cfg = tmp_path / "gamma.cfg"
    cfg.write_text(
        'name = "gamma"\nmemory = 16\n'  # a driver Dom0 did not boot with
        'devices = [{ type = "echo", driver = "tests.echo_driver:DRIVER" }]\n'
    )
    try:
        xenlike("up", "--detach", "--trace", str(trace), run_dir=run_dir)
        xenlike("create", str(cfg), run_dir=run_dir)

        def attached() -> set[int]:
            return {
                r.domid
                for r in recorded(trace)
                if (r.op, r.cmd) == (XenlikeOp.ring, RingEvent.attach)
            }

        # Ring attach events of the booted guests and of gamma, created later. (Pushes
        # are not waited for: the guests' boot I/O may be done before the recorder
        # follows their rings, and after it they are idle.)
        wait_for(lambda: {1, 2, 3} <= attached(), what="ring events of d1, d2 and d3")
    finally:
        xenlike("down", run_dir=run_dir, check=False)
