"""The domain's side of tracing: its fast-path event sends, which the hypervisor never sees."""

import struct
import time
from collections.abc import Callable

from xenlike.abi.event_channel import EvtchnOp
from xenlike.abi.xen import Hypercall
from xenlike.trace._buffer import _ENABLED, _PROD, TraceBuffer
from xenlike.trace._layout import (
    BUFFER_RECORDS_OFFSET,
    RECORD,
    TRACE_FLAG_FAST_PATH,
    TRACE_RECORD_SIZE,
)

__all__ = ["fast_path_recorder"]

# A send's `trace_record`, packed with only what varies: time_ns, then args[0] (the port),
# then count, op, cmd, domid, flags; result, duration and args[1:] are pad bytes, which
# `struct` writes as zeros. Half the cost of packing all twelve fields.
SEND_RECORD = struct.Struct("<Q16xQ24xLLLHH")
assert SEND_RECORD.size == TRACE_RECORD_SIZE and SEND_RECORD.pack(
    1, 2, 3, 4, 5, 6, 7
) == RECORD.format.pack(1, 0, 0, 2, 0, 0, 0, 3, 4, 5, 6, 7)


def fast_path_recorder(buffer: TraceBuffer, domid: int) -> Callable[[int], None]:
    """`EventChannels.on_send` for a domain: one record per send, while a reader is attached.

    Each record reads as the EVTCHNOP_send the send stands for: port as the
    first argument, result 0, no duration. With no reader the cost is one
    load of the buffer's `enabled` word. With one it is `TraceBuffer.write`
    inlined, with everything looked up once here: this runs on every notify.
    """
    words, prods, mapping, nr_records = (
        buffer._words,
        buffer._prods,
        buffer._mapping,
        buffer.nr_records,
    )
    pack, clock = SEND_RECORD.pack_into, time.monotonic_ns
    op, cmd = int(Hypercall.event_channel_op), int(EvtchnOp.send)

    def record_send(port: int) -> None:
        if words[_ENABLED]:
            index = buffer._next
            pack(
                mapping,
                BUFFER_RECORDS_OFFSET + index % nr_records * TRACE_RECORD_SIZE,
                clock(),
                port,
                1,
                op,
                cmd,
                domid,
                TRACE_FLAG_FAST_PATH,
            )
            buffer._next = index + 1
            prods[_PROD] = index + 1

    return record_send
