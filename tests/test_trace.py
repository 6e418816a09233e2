"""Trace records, buffers, the reader and the file format.

The ring is tested alone first (wrap, overwrite, lost counts, readers
catching up, and every interleaving hypothesis finds of a producer with a
reader in the middle of a copy); then with a real hypervisor and guests
running as processes: what a reader sees of a boot and of an event-channel
ping-pong, and that nothing is recorded once no reader is left.
"""

import os
import subprocess
import sys
from contextlib import aclosing
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import xenlike.trace
from tests import kernels
from tests.conftest import DomainConnector
from tests.test_hypervisor import wait_for_log, wait_for_shutdown
from xenlike.abi.errno import Errno
from xenlike.abi.event_channel import EvtchnOp, evtchn_bind_interdomain
from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.domain import Domain
from xenlike.hypercall import HypercallError
from xenlike.hypervisor import Hypervisor
from xenlike.trace import (
    TRACE_FLAG_FAST_PATH,
    TRACE_FLAG_LOST,
    TRACE_RECORD_SIZE,
    BadTraceBuffer,
    BadTraceFile,
    LostRecords,
    TraceBuffer,
    TraceCursor,
    TraceReader,
    TraceRecord,
    TraceSource,
    XENLIKE_SYSCTL_trace_buffers,
    decode_records,
    fast_path_recorder,
    follow,
    load,
    save,
    trace_buffer_header,
    trace_file,
    trace_record,
)
from xenlike.trace._buffer import _PROD
from xenlike.trace._layout import BUFFER_RECORDS_OFFSET, RECORD
from xenlike.trace._record import summarize
from xenlike.xc import XenControl

SEND = (int(Hypercall.event_channel_op), int(EvtchnOp.send))


def numbered(i: int) -> tuple[int, ...]:
    """The fields of record number `i`: every field derives from i, so a torn one shows."""
    return (1_000 + i, -i, 3 * i, i, i ^ 0xABCDEF, 2 * i, 7, i % 5, 32, 4, 1, 0)


def intact(record: TraceRecord) -> bool:
    return record.fields() == numbered(record.args[0])


def new_buffer(nr_records: int) -> TraceBuffer:
    return TraceBuffer.create(nr_records, domid=1, source=TraceSource.hypervisor)


def read_all(buffer: TraceBuffer, cursor: TraceCursor) -> tuple[int, list[int]]:
    lost, data = buffer.read(cursor)
    return lost, [r.args[0] for r in decode_records(data)]


# --- layouts -----------------------------------------------------------------


def test_layouts_are_what_the_docstring_says() -> None:
    assert trace_record.sizeof() == TRACE_RECORD_SIZE == 72
    assert trace_buffer_header.sizeof() == 32
    assert BUFFER_RECORDS_OFFSET == 4096
    assert RECORD.format.size == 72


@settings(max_examples=100, deadline=None)
@given(
    st.tuples(
        st.integers(0, 2**64 - 1),
        st.integers(-(2**63), 2**63 - 1),
        st.integers(0, 2**64 - 1),
        *[st.integers(0, 2**64 - 1)] * 4,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**16 - 1),
        st.integers(0, 2**16 - 1),
    )
)
def test_the_recording_codec_writes_constructs_bytes(fields: tuple[int, ...]) -> None:
    time_ns, result, duration_ns, a0, a1, a2, a3, count, op, cmd, domid, flags = fields
    built = trace_record.build(
        dict(
            time_ns=time_ns,
            result=result,
            duration_ns=duration_ns,
            args=[a0, a1, a2, a3],
            count=count,
            op=op,
            cmd=cmd,
            domid=domid,
            flags=flags,
        )
    )
    assert RECORD.format.pack(*fields) == built


# --- the ring ----------------------------------------------------------------


def test_a_new_buffer_is_empty_and_disabled() -> None:
    buffer = new_buffer(8)
    try:
        assert (buffer.prod, buffer.enabled, buffer.closed) == (0, False, False)
        assert buffer.read(TraceCursor.oldest(8, 0)) == (0, b"")
    finally:
        buffer.close()


def test_a_reader_catches_up_in_order() -> None:
    buffer = new_buffer(8)
    cursor = TraceCursor.oldest(8, buffer.prod)
    for i in range(3):
        buffer.write(*numbered(i))
    assert read_all(buffer, cursor) == (0, [0, 1, 2])
    assert read_all(buffer, cursor) == (0, [])
    for i in range(3, 10):  # wraps: slots 3..7, then 0..1 again
        buffer.write(*numbered(i))
    assert read_all(buffer, cursor) == (0, list(range(3, 10)))
    buffer.close()


def test_the_producer_overwrites_the_oldest_and_the_reader_counts_what_it_lost() -> None:
    buffer = new_buffer(4)  # holds 3: the fourth slot is the one written next
    cursor = TraceCursor.oldest(4, 0)
    for i in range(11):
        buffer.write(*numbered(i))
    assert buffer.prod == 11
    assert read_all(buffer, cursor) == (8, [8, 9, 10])
    buffer.write(*numbered(11))
    assert read_all(buffer, cursor) == (0, [11])
    buffer.close()


def test_readers_are_independent_and_a_late_one_starts_at_the_oldest_record() -> None:
    buffer = new_buffer(4)
    early = TraceCursor.oldest(4, buffer.prod)
    for i in range(6):
        buffer.write(*numbered(i))
    late = TraceCursor.oldest(4, buffer.prod)
    assert read_all(buffer, late) == (0, [3, 4, 5])
    assert read_all(buffer, early) == (3, [3, 4, 5])
    buffer.close()


@settings(max_examples=400, deadline=None)
@given(
    nr_records=st.integers(2, 6),
    steps=st.lists(st.sampled_from(["write", "tear", "begin", "copy", "finish"]), max_size=120),
)
def test_interleaved_producer_and_reader_never_deliver_a_torn_record(
    nr_records: int, steps: list[str]
) -> None:
    """The reader copies one slot per step, the producer writes (or is halfway through
    writing: "tear") between any two of them."""
    buffer = new_buffer(nr_records)
    cursor = TraceCursor.oldest(nr_records, 0)
    written = lost = 0
    delivered: list[TraceRecord] = []
    copying: tuple[int, int, list[bytes]] | None = None

    def finish() -> None:
        nonlocal lost, copying
        assert copying is not None
        first, end, chunks = copying
        while len(chunks) < end - first:
            chunks.append(buffer.copy(first + len(chunks), first + len(chunks) + 1))
        missed, start = cursor.accept(first, end, buffer.prod)
        lost += missed
        delivered.extend(decode_records(b"".join(chunks)[(start - first) * TRACE_RECORD_SIZE :]))
        copying = None

    try:
        for step in steps:
            if step == "write":
                buffer.write(*numbered(written))
                written += 1
            elif step == "tear":  # half of the next record, over the oldest one's slot
                half = RECORD.format.pack(*numbered(written))[: TRACE_RECORD_SIZE // 2]
                offset = BUFFER_RECORDS_OFFSET + written % nr_records * TRACE_RECORD_SIZE
                buffer._mapping[offset : offset + len(half)] = half
            elif step == "begin" and copying is None:
                copying = (*cursor.window(buffer.prod), [])
            elif step == "copy" and copying is not None:
                first, end, chunks = copying
                if len(chunks) < end - first:
                    chunks.append(buffer.copy(first + len(chunks), first + len(chunks) + 1))
            elif step == "finish" and copying is not None:
                finish()
        if copying is not None:
            finish()
        missed, data = buffer.read(cursor)  # and a last read with the producer at rest
        lost += missed
        delivered.extend(decode_records(data))
    finally:
        buffer.close()
    indices = [r.args[0] for r in delivered]
    assert all(intact(r) for r in delivered)
    assert indices == sorted(set(indices))
    assert lost + len(indices) == written == cursor.next
    assert set(range(max(0, written - nr_records + 1), written)) <= set(indices)


def test_a_misbehaving_producer_cannot_break_a_reader() -> None:
    buffer = new_buffer(4)
    cursor = TraceCursor.oldest(4, 0)
    for i in range(3):
        buffer.write(*numbered(i))
    assert read_all(buffer, cursor) == (0, [0, 1, 2])
    forger = TraceBuffer.attach(os.dup(buffer.fd), writable=True)
    forger._prods[_PROD] = 1  # prod goes back
    assert read_all(buffer, cursor) == (0, [])
    forger._prods[_PROD] = 2**64 - 1
    lost, indices = read_all(buffer, cursor)
    assert lost == 2**64 - 1 - 3 - 1 and len(indices) == 3
    forger.close()
    buffer.close()


def test_attach_refuses_what_is_not_a_trace_buffer() -> None:
    fd = os.memfd_create("not-a-trace-buffer")
    os.ftruncate(fd, 4096 + 100)
    with pytest.raises(BadTraceBuffer):
        TraceBuffer.attach(fd, writable=False)
    with pytest.raises(OSError):
        os.fstat(fd)  # attach closed it, as it promises
    buffer = new_buffer(4)
    buffer._mapping[0:4] = b"XXXX"
    with pytest.raises(BadTraceBuffer, match="header"):
        TraceBuffer.attach(os.dup(buffer.fd), writable=True)
    buffer.close()


def test_a_buffer_cannot_be_resized_under_its_readers() -> None:
    buffer = new_buffer(4)
    with pytest.raises(PermissionError):
        os.ftruncate(buffer.fd, 4096)
    buffer.close()


# --- records -----------------------------------------------------------------


def test_fast_path_sends_are_recorded_only_while_enabled() -> None:
    buffer = new_buffer(8)
    record_send = fast_path_recorder(TraceBuffer.attach(os.dup(buffer.fd), writable=True), domid=3)
    record_send(5)
    assert buffer.prod == 0
    buffer.enabled = True
    record_send(5)
    buffer.enabled = False
    record_send(6)
    (record,) = decode_records(buffer.read(TraceCursor.oldest(8, 0))[1])
    assert record.fast_path and (record.domid, record.name, record.arguments) == (
        3,
        "event_channel_op.send",
        {"port": 5},
    )
    assert (record.result, record.duration_ns, record.count, record.error) == (0, 0, 1, None)
    buffer.close()


def test_a_reader_believes_the_hypervisor_not_the_domain_about_who_wrote_a_record() -> None:
    forged = RECORD.format.pack(1, 0, 0, 0, 0, 0, 0, 99, *SEND, 0, TRACE_FLAG_LOST)
    (record,) = decode_records(forged, domid=4, flags=TRACE_FLAG_FAST_PATH)
    assert isinstance(record, TraceRecord) and record.domid == 4 and record.fast_path
    (lost,) = decode_records(forged)
    assert lost == LostRecords(1, 0, 99)


def test_records_are_named_from_the_hypercall_table() -> None:
    bind = TraceRecord(
        0, 2, Hypercall.event_channel_op, EvtchnOp.bind_interdomain, (1, 5, 0, 0), 1, -22, 900
    )
    assert (bind.op_name, bind.cmd_name, bind.error) == (
        "event_channel_op",
        "bind_interdomain",
        "EINVAL",
    )
    assert bind.arguments == {"remote_dom": 1, "remote_port": 5, "local_port": 0}
    unknown = TraceRecord(0, 0, 99, 3, (0,) * 4, 0, -Errno.ENOSYS, 1)
    assert (unknown.name, unknown.error, unknown.arguments) == ("99.3", "ENOSYS", {})
    trace = TraceRecord(0, 0, Hypercall.sysctl, XENLIKE_SYSCTL_trace_buffers, (0,) * 4, 0, 2, 1)
    assert trace.name == "sysctl.xenlike_trace_buffers"


def test_arguments_are_summarised_by_their_first_integer_fields() -> None:
    codec = compile_struct(evtchn_bind_interdomain, "bind")
    one = codec.record(remote_dom=1, remote_port=5)
    assert summarize(None) == (0, 0, 0, 0, 0)
    assert summarize(b"hello") == (0, 0, 0, 0, 5)
    assert summarize(one) == (1, 5, 0, 0, 1)
    assert summarize([one, one, one]) == (1, 5, 0, 0, 3)


# --- files -------------------------------------------------------------------

EVENTS = st.lists(
    st.one_of(
        st.builds(
            TraceRecord,
            st.integers(0, 2**63),
            st.integers(0, 0x7FEF),
            st.integers(0, 60),
            st.integers(0, 0x2000),
            st.tuples(*[st.integers(0, 2**64 - 1)] * 4),
            st.integers(0, 2**32 - 1),
            st.integers(-(2**63), 2**63 - 1),
            st.integers(0, 2**40),
            st.booleans(),
        ),
        st.builds(
            LostRecords,
            st.integers(0, 2**63),
            st.integers(0, 0x7FEF),
            st.integers(1, 2**32 - 1),
            st.booleans(),
        ),
    ),
    max_size=30,
)


@settings(max_examples=50, deadline=None)
@given(events=EVENTS)
def test_save_and_load_round_trip(
    tmp_path_factory: pytest.TempPathFactory, events: list[TraceRecord | LostRecords]
) -> None:
    path = tmp_path_factory.mktemp("trace") / "t.xltrace"
    assert save(events, path) == len(events)
    loaded = load(path)
    assert list(loaded.events) == events
    parsed = trace_file.parse(path.read_bytes())  # construct reads the same file
    assert [r.time_ns for r in parsed.records] == [e.time_ns for e in events]
    assert loaded.wallclock(loaded.monotonic_ns) == loaded.wallclock_ns


def test_load_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "t.xltrace"
    save([LostRecords(1, 2, 3)], path)
    data = path.read_bytes()
    for bad in (b"NOTTRACE" + data[8:], data[:8] + b"\x02" + data[9:], data[:-1]):
        path.write_bytes(bad)
        with pytest.raises(BadTraceFile):
            load(path)


def test_the_public_names_exist() -> None:
    assert all(hasattr(xenlike.trace, name) for name in xenlike.trace.__all__)


# --- with a hypervisor and guests ---------------------------------------------


async def ping_and_stay(domain: Domain) -> None:
    await kernels.ping(domain)
    await trio.sleep_forever()


async def pong_and_stay(domain: Domain) -> None:
    await kernels.pong(domain)
    await trio.sleep_forever()


async def ping_pong(xc: XenControl, rounds: int, *, stay: bool = False) -> tuple[int, int, int]:
    """Two guests that bounce an event `rounds` times: (ping, pong, ping's port). Paused."""
    ping_kernel, pong_kernel = (
        ("tests.test_trace:ping_and_stay", "tests.test_trace:pong_and_stay")
        if stay
        else ("tests.kernels:ping", "tests.kernels:pong")
    )
    ping = await xc.createdomain()
    await xc.set_max_mem(ping, 4096)
    port = await xc.alloc_unbound(ping, remote_dom=ping + 1)
    await xc.build(ping, ping_kernel, cmdline=f"port={port} rounds={rounds}")
    pong = await xc.create_domain(
        pong_kernel, memory_mb=4, cmdline=f"peer={ping} port={port} rounds={rounds}"
    )
    return ping, pong, port


async def run_ping_pong(xc: XenControl, ping: int, pong: int, rounds: int) -> None:
    await xc.unpause(ping)
    await xc.unpause(pong)
    await wait_for_log(xc, f"pong done after {rounds} rounds")
    await wait_for_log(xc, f"ping done after {rounds} rounds")


def calls(events: list, domid: int) -> list[TraceRecord]:
    return [e for e in events if isinstance(e, TraceRecord) and e.domid == domid]


async def wait_for_readers(hv: Hypervisor, count: int) -> None:
    with trio.fail_after(10):
        while hv.trace.statistics().readers != count:
            await trio.sleep(0.01)


async def test_a_reader_sees_a_guest_boot_in_order(
    hv: Hypervisor, xc: XenControl, tmp_path: Path
) -> None:
    with await TraceReader.open(hv.run_dir) as reader:
        domid = await xc.create_domain("tests.kernels:hello", memory_mb=4)
        await xc.unpause(domid)
        await wait_for_shutdown(xc, domid)
        with pytest.raises(HypercallError):
            await xc.hypercalls.call(99, 3)
        assert await reader.rescan() == 2  # the guest's: gone, but kept for this reader
        events = reader.read_available()
    assert [e.time_ns for e in events] == sorted(e.time_ns for e in events)
    guest = calls(events, domid)
    assert [r.name for r in guest] == ["console_io.write", "sched_op.shutdown"]
    text = "hello from d1, 1024 pages"
    assert (guest[0].count, guest[0].result) == (len(text), len(text))
    assert guest[1].arguments == {"reason": 0} and not any(r.fast_path for r in guest)
    dom0 = [r.name for r in calls(events, 0)]
    assert dom0[0] == "sysctl.xenlike_trace_buffers"
    expected = [
        "domctl.createdomain",
        "domctl.max_mem",
        "domctl.xenlike_build",
        "domctl.unpausedomain",
        "99.3",
        "sysctl.xenlike_trace_buffers",
    ]
    assert [n for n in dom0[1:] if n in expected] == expected
    failed = [r for r in calls(events, 0) if r.name == "99.3"]
    assert failed[0].error == "ENOSYS" and failed[0].duration_ns > 0
    save(events, tmp_path / "boot.xltrace")
    assert list(load(tmp_path / "boot.xltrace").events) == events


async def test_fast_path_sends_of_a_ping_pong_interleave_in_time(
    hv: Hypervisor, xc: XenControl
) -> None:
    rounds = 200
    with await TraceReader.open(hv.run_dir) as reader:
        ping, pong, port = await ping_pong(xc, rounds)
        await run_ping_pong(xc, ping, pong, rounds)
        await reader.rescan()
        events = reader.read_available()
    assert not any(isinstance(e, LostRecords) for e in events)
    sends = [e for e in events if isinstance(e, TraceRecord) and (e.op, e.cmd) == SEND]
    # Each domain sends once a round, and only after the other's send woke it.
    assert [s.domid for s in sends] == [pong, ping] * rounds
    assert sum(s.fast_path for s in sends) >= 2 * rounds - 2  # a first send may go the slow way
    assert all(s.result == 0 for s in sends)
    (bind,) = [r for r in calls(events, pong) if r.cmd_name == "bind_interdomain"]
    assert bind.arguments == {"remote_dom": ping, "remote_port": port, "local_port": 0}
    assert [r.name for r in calls(events, ping)][0] == "event_channel_op.unmask"


async def test_with_no_reader_nothing_is_recorded(hv: Hypervisor, xc: XenControl) -> None:
    rounds = 100
    ping, pong, _ = await ping_pong(xc, rounds, stay=True)
    await run_ping_pong(xc, ping, pong, rounds)
    stats = hv.trace.statistics()
    assert stats.readers == 0 and hv.trace not in hv.listeners
    assert {ping, pong} <= {b.domid for b in stats.buffers}
    assert all(b.written == 0 and not b.enabled for b in stats.buffers)
    with await TraceReader.open(hv.run_dir) as reader:
        assert [r.name for r in reader.read_available()] == ["sysctl.xenlike_trace_buffers"]


async def test_a_reader_that_goes_away_turns_tracing_off(hv: Hypervisor, xc: XenControl) -> None:
    sleeper = await xc.create_domain("tests.kernels:sleeper", memory_mb=4)
    await xc.unpause(sleeper)
    await wait_for_log(xc, f"(d{sleeper}) sleeping")
    script = (
        "import sys, trio\n"
        "from xenlike.trace import TraceReader\n"
        "async def main():\n"
        "    with await TraceReader.open(sys.argv[1]):\n"
        "        print('reading', flush=True)\n"
        "        await trio.sleep_forever()\n"
        "trio.run(main)\n"
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", script, str(hv.run_dir)], stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        said = b""
        with trio.fail_after(20):
            while not said.endswith(b"\n"):
                said += await process.stdout.receive_some()
        assert said == b"reading\n"
        assert hv.trace.statistics().readers == 1 and hv.trace in hv.listeners
        assert all(b.enabled for b in hv.trace.statistics().buffers)
    finally:
        process.kill()  # SIGKILL: the reader has no chance to say goodbye
        await process.wait()
        await process.stdout.aclose()
    await wait_for_readers(hv, 0)
    assert hv.trace not in hv.listeners
    assert not any(b.enabled for b in hv.trace.statistics().buffers)
    reader = await TraceReader.open(hv.run_dir)  # and a reader that closes cleanly
    await wait_for_readers(hv, 1)
    reader.close()
    await wait_for_readers(hv, 0)
    assert not any(b.enabled for b in hv.trace.statistics().buffers)


async def test_small_buffers_lose_the_oldest_records_and_say_how_many(
    hv: Hypervisor, xc: XenControl
) -> None:
    rounds = 500
    hv.trace.nr_records = 64
    with await TraceReader.open(hv.run_dir) as reader:
        ping, pong, _ = await ping_pong(xc, rounds)
        assert await reader.rescan() == 4
        await run_ping_pong(xc, ping, pong, rounds)
        events = reader.read_available()
    for domid in (ping, pong):
        lost = [e for e in events if isinstance(e, LostRecords) and e.domid == domid]
        fast = [r for r in calls(events, domid) if r.fast_path]
        slow = [r for r in calls(events, domid) if (r.op, r.cmd) == SEND and not r.fast_path]
        assert len(fast) == 63 and len(lost) == 1 and lost[0].fast_path
        assert lost[0].count + len(fast) + len(slow) == rounds
        assert events.index(lost[0]) < events.index(fast[0])


async def test_follow_finds_new_domains_and_yields_in_time_order(
    hv: Hypervisor, xc: XenControl
) -> None:
    seen: list = []
    async with aclosing(follow(hv.run_dir, poll_interval=0.01, rescan_interval=0.05)) as events:
        domid = await xc.create_domain("tests.kernels:hello", memory_mb=4)
        await xc.unpause(domid)
        with trio.fail_after(20):
            async for event in events:
                seen.append(event)
                if (
                    isinstance(event, TraceRecord)
                    and event.domid == domid
                    and event.name == "sched_op.shutdown"
                ):
                    break
    await wait_for_readers(hv, 0)
    assert [e.time_ns for e in seen] == sorted(e.time_ns for e in seen)
    assert [r.name for r in calls(seen, domid)] == ["console_io.write", "sched_op.shutdown"]


async def test_only_dom0_may_read_the_traces(hv: Hypervisor, connect: DomainConnector) -> None:
    guest = await connect(hv.create_domain())
    with pytest.raises(HypercallError) as info:
        await guest.call(Hypercall.sysctl, XENLIKE_SYSCTL_trace_buffers)
    assert info.value.errno == Errno.EPERM
    assert hv.trace.statistics().readers == 0


async def test_a_new_reader_starts_at_the_present_and_replays_only_when_asked(
    hv: Hypervisor, xc: XenControl
) -> None:
    with await TraceReader.open(hv.run_dir):
        with pytest.raises(HypercallError):
            await xc.hypercalls.call(99, 3)  # recorded while the first reader is attached
    await wait_for_readers(hv, 0)
    with await TraceReader.open(hv.run_dir) as reader:
        with pytest.raises(HypercallError):
            await xc.hypercalls.call(99, 4)
        now = [r.name for r in calls(reader.read_available(), 0)]
    assert "99.4" in now and "99.3" not in now
    assert not any(isinstance(e, LostRecords) for e in reader.read_available())
    await wait_for_readers(hv, 0)
    with await TraceReader.open(hv.run_dir, history=True) as reader:
        replayed = [r.name for r in calls(reader.read_available(), 0)]
    assert replayed.index("99.3") < replayed.index("99.4")
