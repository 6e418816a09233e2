"""The trace layouts: a record, a buffer's header page, the file, the sysctl.

The construct Structs are the schema (and what the package docstring
describes); the recording path uses only the `struct` codecs compiled from
them here, once.
"""

import enum

from construct import Array, Const, GreedyRange, Int16ul, Int32ul, Int64sl, Int64ul, Struct

from xenlike.abi._layout import offsetof
from xenlike.codec import compile_struct
from xenlike.hypercall import MAX_FDS
from xenlike.memory import XEN_PAGE_SIZE

__all__ = [
    "BUFFER_CLOSED",
    "BUFFER_ENABLED",
    "BUFFER_PROD",
    "BUFFER_RECORDS_OFFSET",
    "RECORD",
    "TRACE_BUFFER_MAGIC",
    "TRACE_BUFFER_VERSION",
    "TRACE_FILE_MAGIC",
    "TRACE_FILE_VERSION",
    "TRACE_FLAG_FAST_PATH",
    "TRACE_FLAG_LOST",
    "TRACE_NR_ARGS",
    "TRACE_RECORD_SIZE",
    "TraceSource",
    "XENLIKE_SYSCTL_trace_buffers",
    "XENLIKE_TRACE_BUFFERS_PER_CALL",
    "trace_buffer_header",
    "trace_file",
    "trace_file_header",
    "trace_record",
    "xenlike_trace_buffer",
]

TRACE_NR_ARGS = 4

# trace_record.flags
TRACE_FLAG_FAST_PATH = 1 << 0  # written by the domain: an event send that skipped the hypervisor
TRACE_FLAG_LOST = 1 << 1  # not a call: `count` records of this buffer were overwritten unread

trace_record = Struct(
    "time_ns" / Int64ul,  # CLOCK_MONOTONIC when the call entered: comparable across processes
    "result" / Int64sl,  # Xen's result: >= 0, or -errno
    "duration_ns" / Int64ul,  # until the result was ready; 0 for a fast-path send
    "args" / Array(TRACE_NR_ARGS, Int64ul),  # first integer fields of the (first) argument struct
    "count" / Int32ul,  # argument structs in the call (its batch), or bytes of a raw payload
    "op" / Int32ul,  # __HYPERVISOR_* number
    "cmd" / Int32ul,  # the sub-op: EVTCHNOP_*, XEN_DOMCTL_* ...
    "domid" / Int16ul,  # the calling domain
    "flags" / Int16ul,  # TRACE_FLAG_*
)

RECORD = compile_struct(trace_record, "trace_record")
TRACE_RECORD_SIZE = RECORD.size


class TraceSource(enum.IntEnum):
    """Who writes a buffer: each buffer has exactly one producer."""

    hypervisor = 0  # the domain's hypercalls, as the hypervisor dispatched them
    domain = 1  # the domain's own fast-path event sends


TRACE_BUFFER_MAGIC = 0x42544C58  # "XLTB"
TRACE_BUFFER_VERSION = 1

# The first page of a trace buffer; the record array starts on the next page.
trace_buffer_header = Struct(
    "magic" / Int32ul,  # TRACE_BUFFER_MAGIC
    "version" / Int16ul,  # TRACE_BUFFER_VERSION
    "record_size" / Int16ul,  # TRACE_RECORD_SIZE
    "nr_records" / Int32ul,  # slots in the record array
    "domid" / Int16ul,
    "source" / Int16ul,  # TraceSource
    "enabled" / Int32ul,  # nonzero while a reader is attached; the hypervisor writes it
    "closed" / Int32ul,  # nonzero once the hypervisor let the buffer go: nothing more comes
    "prod" / Int64ul,  # records ever written; record i sits in slot i % nr_records
)

BUFFER_ENABLED = offsetof(trace_buffer_header, "enabled")
BUFFER_CLOSED = offsetof(trace_buffer_header, "closed")
BUFFER_PROD = offsetof(trace_buffer_header, "prod")
BUFFER_RECORDS_OFFSET = XEN_PAGE_SIZE

TRACE_FILE_MAGIC = b"XLTRACE\0"
TRACE_FILE_VERSION = 1

trace_file_header = Struct(
    "magic" / Const(TRACE_FILE_MAGIC),
    "version" / Int32ul,  # TRACE_FILE_VERSION
    "record_size" / Int32ul,  # TRACE_RECORD_SIZE
    "wallclock_ns" / Int64ul,  # CLOCK_REALTIME when the file was written ...
    "monotonic_ns" / Int64ul,  # ... and CLOCK_MONOTONIC at that moment, to date the records
)

trace_file = Struct(
    "header" / trace_file_header,
    "records" / GreedyRange(trace_record),  # to the end of the file, in time order
)

# xenlike's own sysctl, numbered far from Xen's: it takes no argument, makes
# the caller a reader until its connection closes, and returns the buffers
# the caller does not hold yet: one xenlike_trace_buffer each in the reply,
# and its fd, in the same order. The result is how many.
XENLIKE_SYSCTL_trace_buffers = 0x1000
XENLIKE_TRACE_BUFFERS_PER_CALL = MAX_FDS  # at most per reply: the fds one message carries

xenlike_trace_buffer = Struct(
    "domid" / Int16ul,
    "source" / Int16ul,  # TraceSource
)
