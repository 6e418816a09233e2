"""The domain's side of tracing: its fast-path event sends, which the hypervisor never sees."""

import time
from collections.abc import Callable

from xenlike.abi.event_channel import EvtchnOp
from xenlike.abi.xen import Hypercall
from xenlike.trace._buffer import _ENABLED, TraceBuffer
from xenlike.trace._layout import TRACE_FLAG_FAST_PATH

__all__ = ["fast_path_recorder"]


def fast_path_recorder(buffer: TraceBuffer, domid: int) -> Callable[[int], None]:
    """`EventChannels.on_send` for a domain: one record per send, while a reader is attached.

    Each record reads as the EVTCHNOP_send the send stands for: port as the
    first argument, result 0, no duration. With no reader the cost is one
    load of the buffer's `enabled` word.
    """
    words = buffer._words
    write = buffer.write
    op, cmd = int(Hypercall.event_channel_op), int(EvtchnOp.send)

    def record_send(port: int) -> None:
        if words[_ENABLED]:
            write(time.monotonic_ns(), 0, 0, port, 0, 0, 0, 1, op, cmd, domid, TRACE_FLAG_FAST_PATH)

    return record_send
