"""Hypercall tracing: records, per-domain trace buffers, a reader, a file format.

What xentrace and xenalyze do for Xen. Every hypercall yields a record —
the event sends that skip the hypervisor too — in per-domain buffers in
shared memory, which a Dom0 tool follows while the topology runs and can
save to a file.

Records (`trace_record`, 72 bytes, little-endian, naturally aligned)::

    0  time_ns      u64  CLOCK_MONOTONIC at entry, comparable across processes
    8  result       i64  Xen's result: >= 0, or -errno
   16  duration_ns  u64  entry to result; 0 for a fast-path send
   24  args[4]      u64  the first integer fields of the (first) argument struct:
                         port for evtchn_send, dom/remote_dom/port for alloc_unbound,
                         host_addr/flags/ref/dom for a grant map
   56  count        u32  argument structs in the call (a batch), bytes of a raw payload;
                         for a lost-records mark, the records lost
   60  op           u32  __HYPERVISOR_* number
   64  cmd          u32  the sub-op (EVTCHNOP_*, XEN_DOMCTL_* ...)
   68  domid        u16  the calling domain
   70  flags        u16  TRACE_FLAG_FAST_PATH: the domain wrote it (a send that never
                         reached the hypervisor); TRACE_FLAG_LOST: not a call, but
                         `count` records overwritten unread (Xen's TRC_LOST_RECORDS)

Where Xen's `t_rec` is variable-sized and carries raw TSC cycles, a record
here is fixed-size with nanoseconds of one clock every process shares, so
buffers written by different processes merge by time with no calibration.

Buffers: a 4 KiB header page (`trace_buffer_header`), then `nr_records`
record slots::

    0  magic        u32  "XLTB"          12  domid    u16
    4  version      u16                  14  source   u16  TraceSource
    6  record_size  u16  72              16  enabled  u32  the hypervisor's
    8  nr_records   u32                  20  closed   u32  the hypervisor's
                                         24  prod     u64  the producer's

Each domain has two, so that each has exactly one producer, as each of
Xen's per-CPU buffers has one: the hypervisor writes the calls it
dispatched for the domain, and the domain's process writes its fast-path
sends. Each is a sealed memfd the hypervisor makes (the domain's process
gets its own with `--trace-fd`). The producer writes record prod into slot
prod % nr_records, then publishes prod + 1; it never waits, but overwrites
the oldest record, so a buffer is a flight recorder of the last
nr_records - 1 calls. Readers never write: each keeps its own cursor and
learns from prod what it missed (`LostRecords`), so any number of them may
follow one buffer (`xenlike.trace._buffer` says why a record copied while
the producer overwrote it is never delivered).

On only while read: producers write nothing while the header's `enabled`
word is 0. The hypervisor sets it (and lists its listener in the
dispatcher) when a Dom0 connection calls XENLIKE_SYSCTL_trace_buffers, and
clears it when the last such connection closes — however its reader ended,
a SIGKILL included. No lease to refresh, no clock read on the recording
path: with no reader, dispatch runs no trace code at all and a fast-path
send costs one load of `enabled` (`bench/trace_overhead.py` measures it).

Reading: `TraceReader` (await `TraceReader.open(run_dir)`, then
`read_available()` and `rescan()`) and `follow(run_dir)`, an async iterator
of `TraceRecord` and `LostRecords` in time order across every domain.
`TraceRecord` names its call from the hypercall table ("event_channel_op",
"send") and its errno.

Files (`trace_file`): a 32-byte `trace_file_header` — magic b"XLTRACE\\0",
version, record size, then CLOCK_REALTIME and CLOCK_MONOTONIC read together
when the file was written, to date the records — and then `trace_record`s
to the end of the file, lost-record marks among them. `save` and `load`;
`TraceWriter` streams records to a file as they come.

Beside the hypercalls, domains record XenBus handshake and ring events with
ops of xenlike's own (`xenlike.trace.events`). The tools: `live` (what
`xenlike trace` runs), `view` (filters and lines), `report` (the
xenalyze-like summary), `export` (Perfetto JSON), `xentrace` (Xen's binary
trace format, for xenalyze and xentrace_format), `cli` (the commands);
docs/tracing.md shows them at work.
"""

from xenlike.trace._buffer import BadTraceBuffer, TraceBuffer, TraceCursor
from xenlike.trace._domain import fast_path_recorder
from xenlike.trace._file import BadTraceFile, TraceFile, TraceWriter, load, save
from xenlike.trace._layout import (
    TRACE_FILE_MAGIC,
    TRACE_FILE_VERSION,
    TRACE_FLAG_FAST_PATH,
    TRACE_FLAG_LOST,
    TRACE_RECORD_SIZE,
    TraceSource,
    XENLIKE_SYSCTL_trace_buffers,
    trace_buffer_header,
    trace_file,
    trace_file_header,
    trace_record,
    xenlike_trace_buffer,
)
from xenlike.trace._reader import TraceReader, follow
from xenlike.trace._record import LostRecords, TraceEvent, TraceRecord, decode_records

__all__ = [
    "BadTraceBuffer",
    "BadTraceFile",
    "LostRecords",
    "TRACE_FILE_MAGIC",
    "TRACE_FILE_VERSION",
    "TRACE_FLAG_FAST_PATH",
    "TRACE_FLAG_LOST",
    "TRACE_RECORD_SIZE",
    "TraceBuffer",
    "TraceCursor",
    "TraceEvent",
    "TraceFile",
    "TraceReader",
    "TraceRecord",
    "TraceSource",
    "TraceWriter",
    "XENLIKE_SYSCTL_trace_buffers",
    "decode_records",
    "fast_path_recorder",
    "follow",
    "load",
    "save",
    "trace_buffer_header",
    "trace_file",
    "trace_file_header",
    "trace_record",
    "xenlike_trace_buffer",
]
