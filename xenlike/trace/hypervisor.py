"""The hypervisor's side of tracing: every domain's two buffers, and who reads them.

Each domain has two buffers, each with a single producer: one the
hypervisor writes as the `HypercallListener` of every call it dispatches,
and one the domain's process writes for the event sends that never reach
the hypervisor (its fd goes to the process at spawn, as `--trace-fd`).

Tracing is on exactly while a reader holds a connection. Calling
XENLIKE_SYSCTL_trace_buffers makes the calling connection a reader; when
that connection closes — the reader exited, crashed or was killed — it is
one no more, and with the last reader gone the hypervisor takes its
listener out of the dispatcher and clears every buffer's `enabled` word.
So a dead reader cannot leave tracing on, and the recording path reads no
clock or lease to find out: with no reader, dispatch runs no trace code at
all and a fast-path send costs one load of the `enabled` word.

A domain's buffers go when the domain is torn down, except that a reader
which never received them still gets them at its next call: a domain that
lives and dies between two of a reader's rescans is not lost to it. A
buffer's fd is closed only once every reply that carried it has gone out:
a connection's next call is the proof, as the hypervisor answers each
connection's calls one after another.
"""

from typing import Any

import attrs

from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.hypervisor.table import Call, hypercall
from xenlike.trace._buffer import TraceBuffer
from xenlike.trace._layout import (
    XENLIKE_TRACE_BUFFERS_PER_CALL,
    TraceSource,
    XENLIKE_SYSCTL_trace_buffers,
    xenlike_trace_buffer,
)
from xenlike.trace._record import summarize

__all__ = ["BufferStatistics", "DEFAULT_NR_RECORDS", "HypervisorTrace", "TraceStatistics"]

DEFAULT_NR_RECORDS = 4096  # per buffer: 288 KiB, touched only as records are written
BUFFER_INFO = compile_struct(xenlike_trace_buffer, "xenlike_trace_buffer")


@attrs.frozen
class BufferStatistics:
    domid: int
    source: TraceSource
    enabled: bool
    written: int  # records ever written (the buffer's prod)


@attrs.frozen
class TraceStatistics:
    readers: int
    buffers: tuple[BufferStatistics, ...]


@attrs.define(eq=False)
class _DomainBuffers:
    domid: int
    hypervisor: TraceBuffer
    domain: TraceBuffer
    given: set[Any] = attrs.field(factory=set)  # readers that were handed them
    unconfirmed: set[Any] = attrs.field(factory=set)  # ... whose reply may not have gone out
    owed: set[Any] = attrs.field(factory=set)  # once retired: readers still to be handed them

    @property
    def pair(self) -> tuple[TraceBuffer, TraceBuffer]:
        return self.hypervisor, self.domain


class HypervisorTrace:
    """The trace buffers of one hypervisor, and its listener while anyone reads them."""

    def __init__(self, hv: Any, *, nr_records: int = DEFAULT_NR_RECORDS) -> None:
        self.nr_records = nr_records  # for buffers made from now on
        self._hv = hv
        self._live: dict[int, _DomainBuffers] = {}
        self._retired: list[_DomainBuffers] = []
        self._readers: set[Any] = set()
        hv.on_domain_exit.append(self._retire)
        hv.on_connection_close.append(self.remove_reader)

    def domain_buffer(self, domain: Any) -> TraceBuffer:
        """The buffer the domain's own process writes (its fd goes to the process)."""
        return self._buffers(domain).domain

    def _buffers(self, domain: Any) -> _DomainBuffers:
        entry = self._live.get(domain.domid)
        if entry is None:
            hypervisor, own = (
                TraceBuffer.create(self.nr_records, domid=domain.domid, source=source)
                for source in (TraceSource.hypervisor, TraceSource.domain)
            )
            entry = _DomainBuffers(domain.domid, hypervisor, own)
            for buffer in entry.pair:
                buffer.enabled = bool(self._readers)
            self._live[domain.domid] = entry
        return entry

    # --- readers ----------------------------------------------------------

    def hand_out(self, conn: Any) -> list[tuple[TraceBuffer, int, TraceSource]]:
        """Make `conn` a reader; the buffers it does not hold yet, a reply's worth."""
        self._add_reader(conn)
        for entry in [*self._live.values(), *self._retired]:
            entry.unconfirmed.discard(conn)  # this call means our last reply went out
        self._release_done()
        wanted = [e for e in self._retired if conn in e.owed]
        wanted += [self._buffers(d) for d in self._hv.domains.values() if not d.torn_down]
        out: list[tuple[TraceBuffer, int, TraceSource]] = []
        for entry in wanted:
            if conn in entry.given or len(out) + 2 > XENLIKE_TRACE_BUFFERS_PER_CALL:
                continue
            entry.given.add(conn)
            entry.unconfirmed.add(conn)
            entry.owed.discard(conn)
            out += [
                (entry.hypervisor, entry.domid, TraceSource.hypervisor),
                (entry.domain, entry.domid, TraceSource.domain),
            ]
        return out

    def _add_reader(self, conn: Any) -> None:
        if not self._readers:
            for entry in self._live.values():
                for buffer in entry.pair:
                    buffer.enabled = True
            self._hv.listeners.append(self)
        self._readers.add(conn)

    def remove_reader(self, conn: Any) -> None:
        """The connection closed: if it was the last reader, tracing stops."""
        if conn not in self._readers:
            return
        self._readers.discard(conn)
        for entry in [*self._live.values(), *self._retired]:
            entry.given.discard(conn)
            entry.unconfirmed.discard(conn)
            entry.owed.discard(conn)
        self._release_done()
        if not self._readers:
            for entry in self._live.values():
                for buffer in entry.pair:
                    buffer.enabled = False
            if self in self._hv.listeners:  # the dispatcher drops a listener that raised
                self._hv.listeners.remove(self)

    def _retire(self, domain: Any) -> None:
        """The domain is torn down: nothing more is written; readers may still need them."""
        entry = self._live.pop(domain.domid, None)
        if entry is None:
            return
        for buffer in entry.pair:
            buffer.mark_closed()
        entry.owed = self._readers - entry.given
        self._retired.append(entry)
        self._release_done()

    def _release_done(self) -> None:
        for entry in [e for e in self._retired if not e.owed and not e.unconfirmed]:
            self._retired.remove(entry)
            for buffer in entry.pair:
                buffer.close()

    # --- recording --------------------------------------------------------

    def hypercall(
        self, domid: int, op: int, cmd: int, arg: Any, result: int, start_ns: int, end_ns: int
    ) -> None:
        """The HypercallListener: listed in the dispatcher only while someone reads."""
        entry = self._live.get(domid)
        if entry is None:
            domain = self._hv.domains.get(domid)
            if domain is None or domain.torn_down:
                return
            entry = self._buffers(domain)
        entry.hypervisor.write(
            start_ns, result, end_ns - start_ns, *summarize(arg), op, cmd, domid, 0
        )

    def statistics(self) -> TraceStatistics:
        return TraceStatistics(
            len(self._readers),
            tuple(
                BufferStatistics(entry.domid, source, buffer.enabled, buffer.prod)
                for entry in self._live.values()
                for buffer, source in zip(entry.pair, TraceSource)
            ),
        )


@hypercall(
    Hypercall.sysctl, XENLIKE_SYSCTL_trace_buffers, privileged=True, name="xenlike_trace_buffers"
)
def trace_buffers(call: Call, _: None) -> tuple[int, bytes]:
    """Hand a Dom0 reader the buffers it lacks; tracing stays on while its connection lives."""
    out = call.hv.trace.hand_out(call.connection)
    for buffer, _, _ in out:
        call.send_fd(buffer.fd)
    info = b"".join(BUFFER_INFO.pack((domid, source)) for _, domid, source in out)
    return len(out), info
