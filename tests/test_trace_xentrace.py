"""Traces in Xen's binary trace format, judged by Xen's own readers.

A decoder of the format here checks the writer alone (hypothesis makes the
traces); then the real xenalyze and xentrace_format (Debian's
xen-utils-common, see tests/xentrace_tools.py) read exports of made-up
traces and of the default topology's recorded boot, and their counts are
held against `xenlike trace report` on the same trace.
"""

import json
import os
import re
import signal
import struct
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import xentrace_tools
from tests.test_trace_cli import GNTTAB, made_up_trace
from tests.test_up import XENLIKE, wait_for, xenlike
from xenlike.abi.grant_table import GnttabOp
from xenlike.abi.trace import (
    TRC_HD_EXTRA,
    TRC_HD_INCLUDES_CYCLE_COUNT,
    TRC_HD_TO_EVENT,
    TRC_LOST_RECORDS,
    TRC_MEM_PAGE_GRANT_MAP,
    TRC_PV_HYPERCALL_V2,
    TRC_PV_HYPERCALL_V2_ARG_32,
    TRC_SCHED_RUNSTATE_CHANGE,
    TRC_TRACE_CPU_CHANGE,
)
from xenlike.abi.xen import Hypercall
from xenlike.tools.cli import main
from xenlike.trace import LostRecords, TraceRecord, load, save
from xenlike.trace.events import XenlikeOp
from xenlike.trace.xentrace import FORMATS, xentrace

RUNNABLE_TO_RUNNING = TRC_SCHED_RUNSTATE_CHANGE | 1 << 8 | 0 << 4


def parse(data: bytes) -> list[tuple[int, int, int | None, tuple[int, ...]]]:
    """(pCPU, event, TSC or None, data words) of every record, as xenalyze walks the file:
    a TRC_TRACE_CPU_CHANGE record (cpu, window size), then that many bytes of the CPU's."""
    out = []
    offset, cpu, window_end = 0, -1, 0
    while offset < len(data):
        (head,) = struct.unpack_from("<I", data, offset)
        offset += 4
        tsc = None
        if TRC_HD_INCLUDES_CYCLE_COUNT(head):
            (tsc,) = struct.unpack_from("<Q", data, offset)
            offset += 8
        n = TRC_HD_EXTRA(head)
        words = struct.unpack_from(f"<{n}I", data, offset)
        offset += 4 * n
        event = TRC_HD_TO_EVENT(head)
        if event == TRC_TRACE_CPU_CHANGE:
            assert offset >= window_end and tsc is None
            cpu, window_end = words[0], offset + words[1]
        else:
            assert offset <= window_end, "a record outside its CPU's window"
        out.append((cpu, event, tsc, words))
    assert offset == len(data) == window_end
    return out


records = st.builds(
    TraceRecord,
    time_ns=st.integers(1, 2**63),
    domid=st.integers(0, 0x7FEF),
    op=st.sampled_from([int(h) for h in Hypercall] + list(XenlikeOp)),
    cmd=st.integers(0, 2**32 - 1),
    args=st.tuples(*[st.integers(0, 2**64 - 1)] * 4),
    count=st.integers(0, 5),
    result=st.integers(-100, 2**31),
    duration_ns=st.integers(0, 10**9),
    fast_path=st.booleans(),
)
lost = st.builds(
    LostRecords,
    time_ns=st.integers(1, 2**63),
    domid=st.integers(0, 0x7FEF),
    count=st.integers(1, 2**32 - 1),
    fast_path=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(records | lost, max_size=60))
def test_every_call_and_loss_lands_on_its_domains_pcpu_in_order(events: list[Any]) -> None:
    events.sort(key=lambda e: e.time_ns)  # as a trace file holds them
    exported = xentrace(events)
    parsed = parse(exported.data)
    assert exported.records == len(parsed)
    assert exported.skipped == sum(isinstance(e, TraceRecord) and e.op >= 0x10000 for e in events)
    domids = sorted(
        {e.domid for e in events if not (isinstance(e, TraceRecord) and e.op >= 0x10000)}
    )
    assert exported.pcpus == {domid: cpu for cpu, domid in enumerate(domids)}
    by_cpu: dict[int, list[tuple[int, int | None, tuple[int, ...]]]] = {}
    for cpu, event, tsc, words in parsed:
        by_cpu.setdefault(cpu, []).append((event, tsc, words))
    assert sorted(by_cpu) == list(range(len(domids)))
    for domid, cpu in exported.pcpus.items():
        stream = by_cpu[cpu]
        assert stream[0][:2] == (TRC_TRACE_CPU_CHANGE, None) and stream[0][2][0] == cpu
        assert stream[1][0] == RUNNABLE_TO_RUNNING and stream[1][2] == (domid << 16,)
        tscs = [tsc for _, tsc, _ in stream[1:]]
        assert tscs == sorted(tscs) and None not in tscs
        mine = [e for e in events if e.domid == domid]
        calls = [
            (e.op, e.cmd) for e in mine if isinstance(e, TraceRecord) and e.op < XenlikeOp.xenbus
        ]
        assert [
            (words[0] & 0xFFFFF, words[1])
            for event, _, words in stream
            if event == TRC_PV_HYPERCALL_V2
        ] == calls
        assert [words[0] for event, _, words in stream if event == TRC_LOST_RECORDS] == [
            e.count for e in mine if isinstance(e, LostRecords)
        ]
        maps = [
            e
            for e in mine
            if isinstance(e, TraceRecord)
            and (e.op, e.cmd, e.result >= 0) == (GNTTAB, GnttabOp.map_grant_ref, True)
        ]
        assert [words for event, _, words in stream if event == TRC_MEM_PAGE_GRANT_MAP] == [
            ((m.args[3] & 0xFFFFFFFF),) for m in maps for _ in range(max(m.count, 1))
        ]


def test_a_hypercall_says_which_arguments_it_carries() -> None:
    [grant] = [e for e in made_up_trace() if isinstance(e, TraceRecord) and e.op == GNTTAB][:1]
    [(_, event, tsc, words)] = [
        r for r in parse(xentrace([grant]).data) if r[1] == TRC_PV_HYPERCALL_V2
    ]
    mask = TRC_PV_HYPERCALL_V2_ARG_32(0) | TRC_PV_HYPERCALL_V2_ARG_32(2)
    assert (tsc, words) == (grant.time_ns, (GNTTAB | mask, GnttabOp.map_grant_ref, 2))


# xenalyze -s: a "|-- Domain N --|" block per domain; under its vCPU's "PV events:", one
# line per hypercall: "    evtchn_op                    [32]:      4".
DOMAIN = re.compile(r"^\|-- Domain (\d+) --\|$")
HYPERCALL = re.compile(r"^    \S.*?\s*\[\s*(\d+)\]:\s+(\d+)$")  # a name may be "(no handler)"


def xenalyze_counts(trace: Path) -> dict[int, Counter[int]]:
    """Hypercalls by domain and op, as `xenalyze -s` counts them."""
    try:
        binary = xentrace_tools.xenalyze()
    except xentrace_tools.Unavailable as exc:
        pytest.skip(str(exc))
    done = subprocess.run(
        [str(binary), "-s", "--cpu-hz", "1G", str(trace)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Total time" in done.stdout and "using cpu speed 1000.00 MHz" in done.stdout
    counts: dict[int, Counter[int]] = {}
    domid = None
    for line in done.stdout.splitlines():
        if m := DOMAIN.match(line):
            domid = int(m[1])
            counts[domid] = Counter()
        elif (m := HYPERCALL.match(line)) and domid is not None:
            counts[domid][int(m[1])] += int(m[2])
    return counts


def report_counts(trace: Path) -> dict[int, Counter[int]]:
    """Hypercalls by domain and op, as `xenlike trace report --json` counts them."""
    result = CliRunner().invoke(main, ["trace", "report", str(trace), "--json"])
    assert result.exit_code == 0, result.output
    counts: dict[int, Counter[int]] = {}
    for row in json.loads(result.output)["hypercalls"]:
        op = Hypercall[row["name"].split(".")[0]]
        counts.setdefault(row["domid"], Counter())[int(op)] += row["count"]
    return counts


def xentrace_format_lines(trace: Path, tmp_path: Path) -> list[str]:
    """xentrace_format's output with the definitions `xenlike trace formats` prints."""
    try:
        tool, python2 = xentrace_tools.xentrace_format(), xentrace_tools.python2()
    except xentrace_tools.Unavailable as exc:
        pytest.skip(str(exc))
    defs = tmp_path / "formats"
    result = CliRunner().invoke(main, ["trace", "formats"])
    assert result.exit_code == 0
    defs.write_text(result.output)
    with open(trace, "rb") as stdin:
        done = subprocess.run(
            [*python2, str(tool), str(defs)],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout.splitlines()


def export(trace: Path, out: Path) -> str:
    result = CliRunner().invoke(
        main, ["trace", "export", str(trace), "--format", "xentrace", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_the_readers_run(tmp_path: Path) -> None:
    """xenalyze (libc only) and xentrace_format start on this machine: an empty trace."""
    empty = tmp_path / "empty.xentrace"
    empty.write_bytes(b"")
    assert xenalyze_counts(empty) == {}
    assert xentrace_format_lines(empty, tmp_path) == []


def test_xenalyze_counts_a_made_up_trace_as_the_report_does(tmp_path: Path) -> None:
    trace, out = tmp_path / "made.xltrace", tmp_path / "made.xentrace"
    save(made_up_trace(), trace)
    said = export(trace, out)
    assert said == (
        f"wrote 16 xentrace records to {out} (d0v0 on pCPU 0, d1v0 on pCPU 1; 8 xenlike "
        "events left out); cycles are nanoseconds: xenalyze --cpu-hz 1G\n"
    )
    expected = {
        0: Counter({int(Hypercall.domctl): 1, int(Hypercall.event_channel_op): 2, GNTTAB: 2}),
        1: Counter({int(Hypercall.event_channel_op): 4}),
    }
    assert xenalyze_counts(out) == report_counts(trace) == expected


def test_xentrace_format_decodes_every_record_of_a_made_up_trace(tmp_path: Path) -> None:
    trace, out = tmp_path / "made.xltrace", tmp_path / "made.xentrace"
    save(made_up_trace(), trace)
    export(trace, out)
    lines = xentrace_format_lines(out, tmp_path)
    assert len(lines) == xentrace(made_up_trace()).records == 16
    assert lines[:3] == [
        "CPU0  0 (+       0)  cpu_change        0x00000000",
        "CPU0  1000 (+       0)  runnable_to_running [ dom:vcpu = 0x00000000 ]",
        "CPU0  1000 (+       0)  hypercall  [ op = 0x00000024 ]",
    ]
    assert lines[-1] == "CPU1  11000 (+    1000)  lost_records      0x00000003"
    assert sum("page_grant_map      [ domid = 0 ]" in line for line in lines) == 2


def test_formats_define_exactly_what_an_export_holds() -> None:
    defined = {int(line.split()[0], 16) for line in FORMATS.splitlines()}
    assert defined == {
        TRC_LOST_RECORDS,
        TRC_TRACE_CPU_CHANGE,
        RUNNABLE_TO_RUNNING,
        TRC_PV_HYPERCALL_V2,
        TRC_MEM_PAGE_GRANT_MAP,
    }


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default topology's boot, recorded by `up --trace` and, in Xen's format, by
    `xenlike trace --record FILE --format xentrace` beside it."""
    tmp = tmp_path_factory.mktemp("boot")
    run_dir = tmp / "run"
    paths = {"boot": tmp / "boot.xltrace", "live": tmp / "live.xentrace"}
    recorder = None
    try:
        xenlike("up", "--detach", "--trace", str(paths["boot"]), run_dir=run_dir)
        recorder = subprocess.Popen(
            [*XENLIKE, "trace", "--record", str(paths["live"]), "--format", "xentrace"],
            env={**os.environ, "XENLIKE_RUN_DIR": str(run_dir)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        hidden = f".{paths['live'].name}.{recorder.pid}.xltrace"
        wait_for(lambda: load_or_none(tmp / hidden), what="the xentrace recording's first records")
        # Something to record: a call of a guest's, through the tools.
        xenlike("list", run_dir=run_dir)
        recorder.send_signal(signal.SIGINT)
        _, err = recorder.communicate(timeout=60)
        assert recorder.returncode == 0, err
        assert not (tmp / hidden).exists()
    finally:
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
        xenlike("down", run_dir=run_dir, check=False)
    return paths


def load_or_none(path: Path) -> list[Any]:
    try:
        return list(load(path).events)
    except (OSError, ValueError):
        return []


def test_xenalyze_counts_the_boots_hypercalls_as_the_report_does(
    boot: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "boot.xentrace"
    said = export(boot["boot"], out)
    assert "cycles are nanoseconds: xenalyze --cpu-hz 1G" in said
    counts = xenalyze_counts(out)
    report = report_counts(boot["boot"])
    assert counts == report
    assert len(counts) >= 3  # Dom0 and the guests, each with its calls
    assert all(counts[domid] for domid in counts)
    assert int(Hypercall.event_channel_op) in counts[1]


def test_xentrace_format_decodes_every_record_of_the_boot(
    boot: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "boot.xentrace"
    export(boot["boot"], out)
    lines = xentrace_format_lines(out, tmp_path)
    events = list(load(boot["boot"]).events)
    assert len(lines) == xentrace(events).records
    assert sum(" hypercall " in line for line in lines) == sum(
        isinstance(e, TraceRecord) and e.op < XenlikeOp.xenbus for e in events
    )


def test_a_recording_in_xens_format_is_what_xenalyze_reads(boot: dict[str, Path]) -> None:
    counts = xenalyze_counts(boot["live"])
    assert counts and sum(sum(c.values()) for c in counts.values()) > 0


small_traces = st.lists(
    st.builds(
        TraceRecord,
        time_ns=st.integers(1, 10**6),
        domid=st.integers(0, 4),
        op=st.sampled_from([int(h) for h in Hypercall]),
        cmd=st.integers(0, 12),
        args=st.tuples(*[st.integers(0, 2**64 - 1)] * 4),
        count=st.integers(0, 3),
        result=st.integers(-30, 1),
        duration_ns=st.integers(0, 10**4),
        fast_path=st.booleans(),
    )
    | st.builds(
        LostRecords,
        time_ns=st.integers(1, 10**6),
        domid=st.integers(0, 4),
        count=st.integers(1, 1000),
        fast_path=st.booleans(),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None)
@given(small_traces)
def test_xenalyze_reads_any_export_and_counts_every_call(events: list[Any]) -> None:
    """Ties in time, losses first or last on a pCPU, every op: xenalyze takes the file
    without an error and counts each domain's calls by op."""
    events.sort(key=lambda e: e.time_ns)
    expected: dict[int, Counter[int]] = {}
    for e in events:
        calls = expected.setdefault(e.domid, Counter())
        if isinstance(e, TraceRecord):
            calls[e.op] += 1
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.xentrace"
        out.write_bytes(xentrace(events).data)
        assert xenalyze_counts(out) == expected


def test_a_format_needs_a_recording_and_a_failed_write_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["trace", "--format", "xentrace"])
    assert result.exit_code == 2 and "--format: is for --record FILE" in result.output
    trace = tmp_path / "made.xltrace"
    save(made_up_trace(), trace)
    out = tmp_path / "missing" / "made.xentrace"
    result = CliRunner().invoke(
        main, ["trace", "export", str(trace), "--format", "xentrace", "-o", str(out)]
    )
    assert result.exit_code == 1
    assert result.output == f"xenlike trace: cannot write {out}: No such file or directory\n"


def test_a_batch_too_large_for_a_window_is_one_line_not_a_memory_error(tmp_path: Path) -> None:
    """A trace file's count is data: 2**32 - 1 grant maps would be 64 GiB of records."""
    trace = tmp_path / "huge.xltrace"
    huge = TraceRecord(1, 3, GNTTAB, GnttabOp.map_grant_ref, (0, 0, 0, 1), 2**32 - 1, 0, 10)
    save([huge], trace)
    result = CliRunner().invoke(
        main, ["trace", "export", str(trace), "--format", "xentrace", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert result.output == (
        "xenlike trace: d3's records exceed the 4294967295 bytes of one pCPU's window\n"
    )
