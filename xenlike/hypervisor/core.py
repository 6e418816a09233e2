"""The hypervisor process: the domain table, domain processes, hypercall dispatch.

The hypervisor is not a domain. It creates each domain's memory, writes its
boot frames, spawns the domain as a process running the kernel its builder
named, answers its hypercalls over a SOCK_SEQPACKET socket pair, and reaps
it. Dom0 tools reach it through a privileged control socket in the run
directory, where they act with domain 0's rights, as `xl` does through
privcmd.

Every hypercall goes through `dispatch`, which never lets a handler's
exception escape: one domain's bad call is that call's error, and the
hypervisor keeps serving everyone else.

The host's memory is a pool of `host_memory_mb` MiB (Xen's total_pages).
What is free is what no domain holds: each built domain holds its
tot_pages (see `xenlike.hypervisor.memory_op`), from its build, where the
initial reservation must fit or the build fails with ENOMEM, to its
teardown; a page a domain gave back while another domain still maps it
through a grant stays out of the pool until the last unmap, as Xen keeps a
page alive while it has references.
"""

import enum
import functools
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from xenlike._process import ChildProcess
from xenlike.abi.errno import Errno
from xenlike.abi.grant_table import (
    GNTTAB_RESERVED_CONSOLE,
    GNTTAB_RESERVED_XENSTORE,
    GTF_permit_access,
    grant_entry_v1,
)
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import DOMID_FIRST_RESERVED, SIF_INITDOMAIN, SIF_PRIVILEGED, Virq, start_info
from xenlike.codec import compile_struct
from xenlike.hypercall import (
    HYPERCALL_MAX_MESSAGE,
    REQUEST_HEADER_SIZE,
    HypercallError,
    MessageKind,
    Notification,
    Reply,
    fds_ancillary,
    unpack_request_header,
)
from xenlike.hypervisor import evtchn, grant_table
from xenlike.hypervisor.evtchn import EvtchnTable
from xenlike.hypervisor.frames import SharedFrames
from xenlike.hypervisor.grant_table import HypervisorGrantTable, Maptrack
from xenlike.hypervisor.memory_op import (
    KeptPage,
    Reservation,
    held_pages,
    initial_reservation,
    tot_pages,
)
from xenlike.hypervisor.table import HYPERCALLS, Call
from xenlike.logfile import PrintkRatelimit, ReadThrottle, RotatingLog
from xenlike.memory import XEN_PAGE_SIZE, BootLayout, DomainMemory
from xenlike.sandbox import Protections, SandboxPolicy, domain_environment, domain_protections
from xenlike.trace.hypervisor import HypervisorTrace

__all__ = [
    "DomainState",
    "HypercallConnection",
    "HypercallListener",
    "Hypervisor",
    "HypervisorDomain",
]

START_INFO = compile_struct(start_info, "start_info")
GRANT_ENTRY = compile_struct(grant_entry_v1, "grant_entry_v1")
START_INFO_MAGIC = b"xen-3.0-x86_64"
XEN_VERSION = (4, 17)
SHUTDOWN_GRACE = 2.0  # seconds a shut-down domain gets to exit before SIGKILL
NOTIFY_BACKLOG = 1024  # notifications queued for a domain that does not read its socket
LOG_LINES = 4096  # lines of hypervisor log kept for `dmesg`
LOG_FILE_MAX = 4 << 20  # bytes of hypervisor.log before it rotates to hypervisor.log.1
METER_INTERVAL = 1.0  # seconds between samples of every domain's memory for its metering
OUTPUT_LOG_MAX = 1 << 20  # bytes of a DomU's stdout/stderr log (domains/<id>.log) per generation
OUTPUT_READ = 4096  # bytes read from a DomU's output pipe at a time
_REPLY = int(MessageKind.reply)  # dispatch makes one per call: an enum member costs ~0.3 us (3.11)


class DomainState(enum.Enum):
    created = "created"  # exists, never ran: the builder fills it while it is paused
    running = "running"
    paused = "paused"
    shutdown = "shutdown"  # shut down with a reason; its process is gone or going
    dying = "dying"  # being destroyed


@attrs.define(eq=False)
class HypercallConnection:
    """One hypercall socket: a domain's own, or a Dom0 tool's control connection."""

    domain: "HypervisorDomain"
    sock: trio.socket.SocketType
    send_lock: trio.Lock = attrs.field(factory=trio.Lock)

    async def send(self, reply: Reply) -> None:
        """Send one reply; without descriptors it is as a rule one write(2), no yield.

        A datagram goes whole or not at all, so the lock only orders senders
        that find the socket full. The callers' own receives are their
        checkpoints. Descriptors go as copies taken before the first yield:
        the port or frame one belongs to may be closed while the reply waits
        its turn, and its number reused for something this domain must never
        be handed.
        """
        if not reply.fds:
            if not self.send_lock.locked():
                try:
                    os.write(self.sock.fileno(), reply.encode())
                    return
                except BlockingIOError:
                    pass
            async with self.send_lock:
                await self.sock.sendmsg([reply.encode()])
            return
        copies = [os.dup(fd) for fd in reply.fds]
        try:
            async with self.send_lock:
                await self.sock.sendmsg([reply.encode()], fds_ancillary(tuple(copies)))
        finally:
            for fd in copies:
                os.close(fd)


@attrs.define(eq=False)
class HypervisorDomain:
    """A domain as the hypervisor holds it.

    Its memory exists from the moment it is built (`build_domain`), sized by
    its maximum reservation, as the domain builder populates it in Xen.
    """

    domid: int
    privileged: bool
    handle: bytes = bytes(16)
    max_pages: int = 0
    memory: DomainMemory | None = None
    layout: BootLayout | None = None
    frames: SharedFrames | None = None  # its frames with files of their own, from its build
    state: DomainState = DomainState.created
    shutdown_reason: int | None = None
    # Suspend: the execution state the kernel left (what Xen keeps as the vCPU's
    # context), and its SCHEDOP_shutdown, answered when the domain is resumed.
    vcpu_context: bytes = b""
    suspended_call: tuple[HypercallConnection, int] | None = None
    kernel: str | None = None
    process: ChildProcess | None = None
    # The write end of the pipe its process waits on, from its build to its first
    # unpause: the process is spawned and sandboxed at build, runs no guest code
    # until then (a Xen domain is created paused: its vCPU exists, unscheduled).
    hold: int | None = None
    connections: list[HypercallConnection] = attrs.field(factory=list)
    created_at: float = attrs.field(factory=time.monotonic)
    # Where its elapsed time starts (Xen's vtsc_offset): XEN_DOMCTL_settscinfo moves
    # it back on a restore, so a saved domain's time goes on from where it was.
    tsc_offset: float = attrs.field(factory=time.monotonic)
    torn_down: bool = False
    cpu_ns_at_exit: int = 0
    sandbox: Protections | None = None  # what confines its process, once it runs
    # What the lines it causes pass: its console writes, and the refusals of its calls.
    console_ratelimit: PrintkRatelimit = attrs.field(factory=PrintkRatelimit)
    refusal_ratelimit: PrintkRatelimit = attrs.field(factory=PrintkRatelimit)
    # What the hypercall subsystems keep per domain, as Xen keeps it in struct domain.
    evtchn: EvtchnTable | None = None  # its ports, from its creation
    grant_table: HypervisorGrantTable | None = None  # its own grants, from its build
    maptrack: Maptrack = attrs.field(factory=Maptrack)  # what it maps of others' grants
    reservation: Reservation | None = None  # its populated frames, from its build
    # tot_pages integrated over its life, for `xenlike usage`: (KiB x s, pages, when)
    memory_meter: tuple[float, int, float] = attrs.field(factory=lambda: (0.0, 0, time.monotonic()))
    _notices: tuple[trio.MemorySendChannel, trio.MemoryReceiveChannel] = attrs.field(
        factory=lambda: trio.open_memory_channel(NOTIFY_BACKLOG)
    )

    @property
    def nr_pages(self) -> int:
        return self.memory.nr_pages if self.memory is not None else 0

    def require_memory(self) -> DomainMemory:
        if self.memory is None:
            raise HypercallError(Errno.EINVAL, f"d{self.domid} has no memory: it is not built")
        return self.memory

    def cpu_time_ns(self) -> int:
        """User plus system CPU time of the domain's process, as /proc counts it."""
        if self.process is None or self.process.returncode is not None:
            return self.cpu_ns_at_exit
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return self.cpu_ns_at_exit
        ticks = int(fields[11]) + int(fields[12])
        self.cpu_ns_at_exit = ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        return self.cpu_ns_at_exit

    def meter_memory(self) -> float:
        """KiB-seconds of memory held since creation: the frames held at the last
        sample times the time since (sampled each second and at each look)."""
        kib_seconds, pages, at = self.memory_meter
        now = time.monotonic()
        kib_seconds += pages * (XEN_PAGE_SIZE // 1024) * (now - at)
        held = 0 if self.torn_down or self.memory is None else tot_pages(self)
        self.memory_meter = (kib_seconds, held, now)
        return kib_seconds

    def __str__(self) -> str:
        return f"d{self.domid}"


class HypercallListener(Protocol):
    """Observes every dispatched hypercall (the trace buffers attach here).

    Times are CLOCK_MONOTONIC nanoseconds (`time.monotonic_ns`), which every
    process on the host reads alike.
    """

    def hypercall(
        self, domid: int, op: int, cmd: int, arg: Any, result: int, start_ns: int, end_ns: int
    ) -> None: ...


class Hypervisor:
    """The hypervisor of one topology, serving from `run_dir`."""

    def __init__(
        self, run_dir: Path, *, dom0_memory_mb: int = 64, host_memory_mb: int = 1024
    ) -> None:
        self.run_dir = Path(run_dir)
        self.control_path = self.run_dir / "hypervisor.sock"
        self.domains: dict[int, HypervisorDomain] = {}
        self.listeners: list[HypercallListener] = []
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self.log_path = self.run_dir / "hypervisor.log"
        self.dom0_memory_mb = dom0_memory_mb
        self.total_pages = host_memory_mb * 1024 * 1024 // XEN_PAGE_SIZE
        self.kept_pages: list[KeptPage] = []  # given back, still mapped by a peer
        self.started_at = time.monotonic()
        self._next_domid = 1
        self._nursery: trio.Nursery | None = None
        self._child_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)  # see _raise_fd_limit
        self._log_file: RotatingLog | None = None
        self._sandbox: SandboxPolicy | None = None
        self.on_domain_exit: list[Callable[[HypervisorDomain], None]] = []
        self.on_connection_close: list[Callable[[HypercallConnection], None]] = []
        self.trace = HypervisorTrace(self)

    # --- running ----------------------------------------------------------

    async def serve(
        self,
        *,
        dom0_kernel: str | None = None,
        dom0_cmdline: str = "",
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Create Dom0, open the control socket, and serve until cancelled."""
        self._child_nofile = _raise_fd_limit()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "domains").mkdir(exist_ok=True)
        self._log_file = RotatingLog(self.log_path, LOG_FILE_MAX)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.control_path.unlink(missing_ok=True)
            await listener.bind(str(self.control_path))
            listener.listen(64)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                dom0 = self.create_domain(domid=0, privileged=True)
                dom0.max_pages = self.dom0_memory_mb * 256
                self.log(
                    None,
                    f"Xen-compatible xenlike hypervisor {XEN_VERSION[0]}.{XEN_VERSION[1]}"
                    f", run directory {self.run_dir}",
                )
                if dom0_kernel:
                    self.build_domain(dom0, dom0_kernel, cmdline=dom0_cmdline)
                    self.unpause(dom0)
                else:  # Dom0 is only its tools on the control socket
                    nursery.start_soon(self._deliver_notices, dom0)
                nursery.start_soon(self._accept_control, listener, dom0)
                nursery.start_soon(self._meter_domains)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                for domain in list(self.domains.values()):
                    self.teardown(domain, kill=True)
            listener.close()
            self.control_path.unlink(missing_ok=True)
            self._log_file.close()

    async def _meter_domains(self) -> None:
        while True:
            await trio.sleep(METER_INTERVAL)
            for domain in list(self.domains.values()):
                domain.meter_memory()

    def log(self, domain: HypervisorDomain | None, text: str) -> None:
        """A line in the hypervisor log, as Xen's console ring keeps it (`xl dmesg`)."""
        prefix = f"(XEN) [{time.monotonic() - self.started_at:10.6f}] "
        source = f"(d{domain.domid}) " if domain is not None else ""
        for line in text.rstrip("\n").split("\n"):
            entry = prefix + source + line
            self.log_lines.append(entry)
            if self._log_file is not None:
                self._log_file.write(entry.encode() + b"\n")

    def log_console(self, domain: HypervisorDomain, text: str) -> None:
        """What a domain writes with CONSOLEIO_write, under its console rate limit."""
        self._log_limited(domain, domain.console_ratelimit, text)

    def log_refusal(self, domain: HypervisorDomain, text: str) -> None:
        """Why a domain's call was refused, under its refusal rate limit (its own, so
        a guest that floods refusals still gets its console lines through)."""
        self._log_limited(domain, domain.refusal_ratelimit, text)

    def _log_limited(self, domain: HypervisorDomain, limit: PrintkRatelimit, text: str) -> None:
        """Xen's printk_ratelimit, per domain: a burst, then a line every 5 s, and how
        many were suppressed. Dom0 is trusted, as Xen's hardware domain is."""
        if not domain.privileged:
            lost = limit.allow()
            if lost is None:
                return
            if lost:
                self.log(domain, f"printk: {lost} messages suppressed.")
        self.log(domain, text)

    def free_pages(self) -> int:
        """Pages of the host's pool that no domain holds (physinfo's free_pages)."""
        return self.total_pages - held_pages(self.domains.values(), self.kept_pages)

    @property
    def sandbox(self) -> SandboxPolicy:
        """The DomU sandbox this host can enforce, worked out at the first DomU."""
        if self._sandbox is None:
            self._sandbox = SandboxPolicy.for_run_dir(self.run_dir)
        return self._sandbox

    # --- domains ----------------------------------------------------------

    def create_domain(
        self, *, domid: int | None = None, privileged: bool = False, handle: bytes = bytes(16)
    ) -> HypervisorDomain:
        """XEN_DOMCTL_createdomain: an empty, paused domain with its port table."""
        if domid is None:
            domid = self._allocate_domid()
        elif domid in self.domains:
            raise HypercallError(Errno.EEXIST, f"domain {domid} exists")
        domain = HypervisorDomain(domid, privileged, handle=handle)
        self.domains[domid] = domain
        evtchn.attach(self, domain)
        self.log(None, f"created d{domid}")
        return domain

    def _allocate_domid(self) -> int:
        """Domids count up and wrap below DOMID_FIRST_RESERVED, like Xen's rover,
        so a freshly destroyed domain's id is not reused at once."""
        for _ in range(DOMID_FIRST_RESERVED):
            domid = self._next_domid
            self._next_domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self.domains:
                return domid
        raise HypercallError(Errno.ENOSPC, "no free domain id")

    def lookup(self, domid: int) -> HypervisorDomain:
        try:
            return self.domains[domid]
        except KeyError:
            raise HypercallError(Errno.ESRCH, f"no domain {domid}") from None

    def build_domain(
        self,
        domain: HypervisorDomain,
        kernel: str,
        *,
        cmdline: str = "",
        store_evtchn: int = 0,
        console_evtchn: int = 0,
        nr_pages: int = 0,
    ) -> None:
        """What a domain builder does: memory, boot frames, and the kernel to run.

        The memory is sized for max_pages, of which the first `nr_pages` (all
        of it when 0) are populated from the host's pool, as the builder
        populates the boot target in Xen; the rest is the balloon's to fill.
        """
        if domain.state is not DomainState.created or domain.memory is not None:
            raise HypercallError(Errno.EBUSY, f"{domain} is already built")
        if ":" not in kernel:
            raise HypercallError(Errno.EINVAL, f"kernel {kernel!r} is not 'module:function'")
        populated = nr_pages or domain.max_pages
        if populated > domain.max_pages:
            raise HypercallError(
                Errno.EINVAL, f"{populated} pages at boot is above {domain}'s {domain.max_pages}"
            )
        try:
            layout = BootLayout.for_domain(populated)
        except ValueError as exc:
            raise HypercallError(Errno.ENOMEM, str(exc)) from None
        free = self.free_pages()
        if populated > free:
            raise HypercallError(
                Errno.ENOMEM,
                f"the host has {free * XEN_PAGE_SIZE >> 20} MiB free,"
                f" {domain} needs {populated * XEN_PAGE_SIZE >> 20} MiB",
            )
        domain.memory = DomainMemory.create(domain.max_pages, name=f"xenlike-d{domain.domid}")
        domain.layout = layout
        domain.frames = SharedFrames.create(
            domain.memory,
            str(domain),
            frozenset((layout.shared_info_gfn, *layout.grant_table_gfns)),
            lambda text: self.log_refusal(domain, text),
        )
        domain.reservation = initial_reservation(domain, populated)
        grant_table.attach(self, domain)
        flags = SIF_PRIVILEGED | SIF_INITDOMAIN if domain.privileged else 0
        blank = START_INFO.record()
        info = blank._replace(
            magic=START_INFO_MAGIC.ljust(32, b"\0"),
            nr_pages=populated,
            shared_info=layout.shared_info_gfn * XEN_PAGE_SIZE,
            flags=flags,
            store_mfn=layout.store_gfn,
            store_evtchn=store_evtchn,
            console=blank.console._replace(
                domU=blank.console.domU._replace(mfn=layout.console_gfn, evtchn=console_evtchn)
            ),
            cmd_line=cmdline.encode()[:1023].ljust(1024, b"\0"),
        )
        with domain.memory.frame(layout.start_info_gfn) as page:
            START_INFO.pack_into(page, 0, info)
        self._seed_grants(domain)
        domain.frames.share_boot_frames([layout.console_gfn, layout.store_gfn])
        domain.kernel = kernel
        self.log(
            None,
            f"built d{domain.domid}: {populated} of {domain.max_pages} pages, kernel {kernel}",
        )

    def start_held(self, domain: HypervisorDomain) -> None:
        """Spawn a built domain's process, held until its first unpause, as the
        builder's domctl does: its interpreter and kernel load while the toolstack
        still fills the domain, and the first unpause (a restore's, a migration's)
        only lets it go. A domain built without it gets its process at unpause."""
        if domain.kernel is None or domain.process is not None or domain.hold is not None:
            raise HypercallError(Errno.EBUSY, f"{domain} is not built, or has its process")
        assert self._nursery is not None
        hold, domain.hold = os.pipe()
        self._nursery.start_soon(self._run_domain, domain, hold)

    def _seed_grants(self, domain: HypervisorDomain, backend_domid: int = 0) -> None:
        """Grant Dom0 the console and XenStore pages at the reserved refs, as the
        domain builder does (xc_dom_gnttab_init), so xenconsoled and xenstored
        can map them with an ordinary grant map."""
        assert domain.memory is not None and domain.layout is not None
        layout = domain.layout
        with domain.memory.frame(layout.grant_table_gfn) as table:
            for ref, gfn in (
                (GNTTAB_RESERVED_CONSOLE, layout.console_gfn),
                (GNTTAB_RESERVED_XENSTORE, layout.store_gfn),
            ):
                GRANT_ENTRY.pack_into(
                    table, ref * GRANT_ENTRY.size, (GTF_permit_access, backend_domid, gfn)
                )

    def unpause(self, domain: HypervisorDomain) -> None:
        if domain.state is DomainState.created:
            if domain.kernel is None:
                raise HypercallError(Errno.EINVAL, f"{domain} has no kernel: build it first")
            domain.state = DomainState.running
            if domain.hold is not None:
                self._release(domain)
            else:  # built without its process (start_held)
                assert self._nursery is not None
                self._nursery.start_soon(self._run_domain, domain, None)
        elif domain.state is DomainState.paused:
            self._signal(domain, signal.SIGCONT)
            domain.state = DomainState.running
        elif domain.state is not DomainState.running:
            raise HypercallError(Errno.EINVAL, f"{domain} is {domain.state.value}")

    def _release(self, domain: HypervisorDomain) -> None:
        """Let a held process run its kernel; closing the pipe unwritten (at teardown)
        makes it exit instead."""
        hold, domain.hold = domain.hold, None
        if hold is None:
            return
        try:
            if domain.state is DomainState.running:
                os.write(hold, b"\1")
        except OSError:  # it died while held: its exit is reaped as a crash
            pass
        finally:
            os.close(hold)

    def pause(self, domain: HypervisorDomain) -> None:
        """Stop the domain's process: a paused vCPU does not run at all."""
        if domain.state is DomainState.running:
            self._signal(domain, signal.SIGSTOP)
            domain.state = DomainState.paused
        elif domain.state not in (DomainState.paused, DomainState.created):
            raise HypercallError(Errno.EINVAL, f"{domain} is {domain.state.value}")

    def shutdown(self, domain: HypervisorDomain, reason: int) -> None:
        """The domain is shut down for `reason`: it runs no more and Dom0 hears of it."""
        if domain.state in (DomainState.shutdown, DomainState.dying):
            return
        domain.shutdown_reason = reason
        domain.state = DomainState.shutdown
        self.log(domain, f"shutdown: {_reason_name(reason)}")
        running = domain.process is not None and domain.process.returncode is None
        if reason == ShutdownReason.suspend and running:
            # Kept, stopped where it is, for Dom0 to save, destroy or resume.
            self._signal(domain, signal.SIGSTOP)
        elif running:
            self._signal(domain, signal.SIGCONT)
            assert self._nursery is not None
            self._nursery.start_soon(self._kill_after_grace, domain)
        else:
            self.teardown(domain)
        self.domain_exception()

    def resume(self, domain: HypervisorDomain) -> None:
        """XEN_DOMCTL_resumedomain: a suspended domain runs on where it stopped, and its
        SCHEDOP_shutdown returns 1, "cancelled", as xc_domain_resume's does."""
        if domain.state is not DomainState.shutdown or (
            domain.shutdown_reason != ShutdownReason.suspend
        ):
            raise HypercallError(Errno.EINVAL, f"{domain} is not suspended")
        domain.state = DomainState.running
        domain.shutdown_reason = None
        self._signal(domain, signal.SIGCONT)
        self.log(domain, "resumed")
        waiting, domain.suspended_call = domain.suspended_call, None
        if waiting is not None and self._nursery is not None:
            self._nursery.start_soon(self._reply_later, *waiting, 1)

    async def _reply_later(self, conn: HypercallConnection, seq: int, result: int) -> None:
        try:
            await conn.send(Reply(seq, MessageKind.reply, result, b""))
        except (OSError, trio.ClosedResourceError):
            pass

    def destroy(self, domain: HypervisorDomain) -> None:
        """XEN_DOMCTL_destroydomain: kill, tear down and forget the domain."""
        if domain.domid == 0:
            raise HypercallError(Errno.EPERM, "domain 0 cannot be destroyed")
        domain.state = DomainState.dying
        self.teardown(domain, kill=True)
        self.domains.pop(domain.domid, None)
        self.log(None, f"destroyed d{domain.domid}")
        self.domain_exception()

    def teardown(self, domain: HypervisorDomain, *, kill: bool = False) -> None:
        """Release everything the domain holds. Idempotent."""
        if kill and domain.process is not None and domain.process.returncode is None:
            self._signal(domain, signal.SIGKILL)
        if domain.torn_down:
            return
        domain.torn_down = True
        self._release(domain)
        domain.meter_memory()  # its last interval counts; from now on it holds nothing
        grant_table.teardown(self, domain)
        evtchn.teardown(self, domain)
        if domain.frames is not None:
            domain.frames.close()
        for conn in domain.connections:
            conn.sock.close()
        domain.connections.clear()
        domain.cpu_time_ns()
        if domain.memory is not None:
            try:
                domain.memory.close()
            except BufferError:
                self.log(domain, "memory still mapped by the hypervisor; freed when released")
        for hook in self.on_domain_exit:
            hook(domain)

    def domain_exception(self) -> None:
        """VIRQ_DOM_EXC to Dom0: a domain shut down, crashed or was destroyed."""
        dom0 = self.domains.get(0)
        if dom0 is not None:
            evtchn.send_virq(self, dom0, Virq.DOM_EXC)

    def _signal(self, domain: HypervisorDomain, signum: int) -> None:
        if domain.process is not None and domain.process.returncode is None:
            try:
                domain.process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def _kill_after_grace(self, domain: HypervisorDomain) -> None:
        assert domain.process is not None
        with trio.move_on_after(SHUTDOWN_GRACE):
            await domain.process.wait()
        self.teardown(domain, kill=True)

    async def _run_domain(self, domain: HypervisorDomain, hold: int | None) -> None:
        """Spawn the domain's process, serve its hypercalls, reap it.

        With `hold`, the read end of its hold pipe, the process waits on it before
        running its kernel (`_release`)."""
        if domain.torn_down:  # destroyed between its build and this task's start
            if hold is not None:
                os.close(hold)
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log_path = self.run_dir / "domains" / f"{domain.domid}.log"
        memory = domain.require_memory()
        frames = domain.frames
        assert frames is not None and frames.domain_end is not None
        frames_fd = frames.domain_end.fileno()
        argv = [
            sys.executable,
            "-m",
            "xenlike.domain",
            "--hypercall-fd",
            str(theirs.fileno()),
            "--memory-fd",
            str(memory.fd),
            "--nr-pages",
            str(memory.nr_pages),
            "--frames-fd",
            str(frames_fd),
            "--domid",
            str(domain.domid),
            "--kernel",
            str(domain.kernel),
        ]
        trace_fd = self.trace.domain_buffer(domain).fd
        argv += ["--trace-fd", str(trace_fd)]
        passed = [theirs.fileno(), memory.fd, frames_fd, trace_fd]
        if hold is not None:
            argv += ["--hold-fd", str(hold)]
            passed.append(hold)
        policy = None if domain.privileged else self.sandbox
        if policy is None:  # Dom0 is trusted with a file of its own
            output, reader = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), None
        else:
            reader, output = os.pipe()
        try:
            domain.process = ChildProcess(
                argv,
                setup=functools.partial(self._enter_child, policy),
                env=domain_environment(dict(os.environ)) if policy is not None else None,
                pass_fds=passed,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            ours.close()
            if reader is not None:
                os.close(reader)
            self.log(domain, f"could not start its process: {exc}")
            self.shutdown(domain, ShutdownReason.crash)
            return
        finally:
            theirs.close()
            os.close(output)
            if hold is not None:
                os.close(hold)
            if frames.domain_end is not None:  # the child has its own copy now
                frames.domain_end.close()
                frames.domain_end = None
        if reader is not None:
            assert self._nursery is not None
            self._nursery.start_soon(self._keep_output, reader, log_path)
        self.log(domain, f"started pid {domain.process.pid}: {domain.kernel}")
        domain.sandbox = (
            Protections(privileged=True)
            if policy is None
            else domain_protections(domain.process.pid, policy.landlock_abi) or policy.expected()
        )
        self.log(domain, f"sandbox: {domain.sandbox}")
        conn = HypercallConnection(domain, trio.socket.from_stdlib_socket(ours))
        domain.connections.append(conn)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_domain, domain, conn)
            nursery.start_soon(self._deliver_notices, domain)
            nursery.start_soon(self._take_frames, frames)
            await domain.process.wait()
            nursery.cancel_scope.cancel()
        code = domain.process.returncode
        if domain.state not in (DomainState.shutdown, DomainState.dying):
            # Died without saying why (killed, or the kernel broke): that is a crash.
            self.log(domain, f"process exited with status {code} without shutting down")
            self.shutdown(domain, ShutdownReason.crash)
        self.teardown(domain)
        if domain.domid == 0 and self._nursery is not None:
            # The guests' back ends are gone with Dom0: as Xen does when Dom0 dies,
            # everything goes down rather than guests running on without devices.
            how = "crashed" if domain.shutdown_reason == ShutdownReason.crash else "shut down"
            self.log(None, f"Domain 0 {how}: shutting down every domain")
            self._nursery.cancel_scope.cancel()

    async def _serve_domain(self, domain: HypervisorDomain, conn: HypercallConnection) -> None:
        """A domain's hypercalls. A bug met while serving them crashes that domain, as
        Xen crashes a guest, never the hypervisor."""
        try:
            await self.serve_connection(conn)
        except Exception:
            self.log(domain, f"hypercall service failed:\n{traceback.format_exc()}")
            self.shutdown(domain, ShutdownReason.crash)

    async def _take_frames(self, frames: SharedFrames) -> None:
        """Take in the files a domain sends as they come, not only when a map needs them."""
        try:
            while frames.drain():
                await trio.lowlevel.wait_readable(frames.channel)
        except (trio.ClosedResourceError, OSError):  # torn down under us
            return

    def _enter_child(self, policy: SandboxPolicy | None) -> None:
        """In the child, before exec: the fd limit the hypervisor started with (it took
        more for itself), then the sandbox for a DomU."""
        resource.setrlimit(resource.RLIMIT_NOFILE, self._child_nofile)
        if policy is not None:
            policy.enter()

    async def _keep_output(self, reader: int, path: Path) -> None:
        """A DomU's stdout and stderr, from its pipe into a log that rotates, read no
        faster than xenconsoled reads a console: a guest that floods them waits on
        its own pipe, and costs the host bounded disk and CPU."""
        log = RotatingLog(path, OUTPUT_LOG_MAX)
        throttle = ReadThrottle()
        try:
            async with trio.lowlevel.FdStream(reader) as stream:
                while data := await stream.receive_some(OUTPUT_READ):
                    log.write(data)
                    await throttle.read()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            log.close()

    async def _accept_control(
        self, listener: trio.socket.SocketType, dom0: HypervisorDomain
    ) -> None:
        assert self._nursery is not None
        while True:
            sock, _ = await listener.accept()
            conn = HypercallConnection(dom0, sock)
            dom0.connections.append(conn)
            self._nursery.start_soon(self._serve_control, conn)

    async def _serve_control(self, conn: HypercallConnection) -> None:
        try:
            await self.serve_connection(conn)
        finally:
            conn.sock.close()
            if conn in conn.domain.connections:
                conn.domain.connections.remove(conn)
            grant_table.release_connection(self, conn)

    async def serve_connection(self, conn: HypercallConnection) -> None:
        """Answer hypercalls on one socket until it closes; then run `on_connection_close`."""
        try:
            await self._answer(conn)
        finally:
            for hook in self.on_connection_close:
                hook(conn)

    async def _answer(self, conn: HypercallConnection) -> None:
        """The hot path: wait for the socket, read(2) one request, answer it.

        The wait comes first: a reply has just gone, and the domain's next
        request is all but never there yet (it has to wake first), so a read
        before the wait would only find the socket empty. Each request waits
        its turn, so a domain that queues requests lets every other domain
        have theirs. read(2) takes no ancillary data, so descriptors a domain
        sends along are closed by the kernel, never installed here.

        The fd is asked of the socket before each wait: once closed (the domain
        died, even before this task first ran) it is -1, and the loop ends
        there. Waiting on -1 is not merely refused: trio's epoll raises
        ValueError and leaves -1 registered to this task for good, so the next
        closed socket's wait met BusyResourceError. A wait that returns means
        the fd is still the socket's (closing it wakes the wait with
        ClosedResourceError).
        """
        sock = conn.sock
        while (fd := sock.fileno()) >= 0:
            try:
                await trio.lowlevel.wait_readable(fd)
                data = os.read(fd, HYPERCALL_MAX_MESSAGE + 1)
            except BlockingIOError:
                continue
            except (OSError, trio.ClosedResourceError):  # closed under us
                return
            if not data:
                return
            reply = self.dispatch(conn, data)
            if reply is None:  # deferred: the handler replies later
                continue
            try:
                await conn.send(reply)
            except (OSError, ValueError, trio.ClosedResourceError):
                return

    async def _deliver_notices(self, domain: HypervisorDomain) -> None:
        _, receive = domain._notices
        async for reply in receive:
            try:
                for conn in list(domain.connections):
                    try:
                        await conn.send(reply)
                    except (OSError, trio.ClosedResourceError):
                        pass
            finally:
                for fd in reply.fds:
                    os.close(fd)

    def notify(
        self,
        domain: HypervisorDomain,
        code: Notification,
        payload: bytes = b"",
        fds: tuple[int, ...] = (),
    ) -> None:
        """Tell a domain something unasked; dropped (and logged) if it never reads.

        `fds` are duplicated, so the caller may close its own at once.
        """
        send, _ = domain._notices
        reply = Reply(
            0, MessageKind.notification, int(code), payload, tuple(os.dup(fd) for fd in fds)
        )
        try:
            send.send_nowait(reply)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            for fd in reply.fds:
                os.close(fd)
            self.log_refusal(domain, f"notification {code.name} dropped: the domain does not read")

    # --- hypercalls -------------------------------------------------------

    def dispatch(self, conn: HypercallConnection, data: bytes) -> Reply | None:
        """Run one hypercall; every failure becomes a -errno result, never an exception.
        None when the handler deferred its reply (`Call.defer`).

        The trace listeners cost one check of `listeners` when nobody traces.
        """
        start = time.monotonic_ns()
        seq = op = cmd = 0
        arg: Any = None
        call = None
        try:
            if len(data) > HYPERCALL_MAX_MESSAGE:
                raise HypercallError(Errno.E2BIG, f"{len(data)}-byte message")
            if len(data) < REQUEST_HEADER_SIZE:
                raise HypercallError(
                    Errno.EINVAL, f"{len(data)}-byte message is shorter than a header"
                )
            seq, op, cmd, count = unpack_request_header(data)
            entry = HYPERCALLS.lookup(op, cmd)
            if entry.privileged and not conn.domain.privileged:
                raise HypercallError(Errno.EPERM, f"{entry.name} is for Dom0 only")
            payload = data[REQUEST_HEADER_SIZE:]
            arg = entry.decode(count, payload)
            call = Call(self, conn.domain, conn, op, cmd, seq=seq)
            out = entry.handler(call, arg)
            if isinstance(out, tuple):
                result, payload = out[0], entry.encode(out[1])
            elif entry.args is None:
                result, payload = out, b""
            else:  # nothing changed: the arguments go back as they came (Xen's copy-back)
                result = out
        except HypercallError as exc:
            result, payload = -int(exc.errno), b""
        except Exception:
            self.log_refusal(conn.domain, f"hypercall {op}/{cmd} failed:\n{traceback.format_exc()}")
            result, payload = -int(Errno.EINVAL), b""
        if self.listeners:
            self._tell_listeners(conn.domain.domid, op, cmd, arg, result, start)
        if call is None:
            return Reply(seq, _REPLY, result, payload)
        if call.deferred and result >= 0:
            return None
        return Reply(seq, _REPLY, result, payload, tuple(call.fds) if result >= 0 else ())

    def _tell_listeners(
        self, domid: int, op: int, cmd: int, arg: Any, result: int, start: int
    ) -> None:
        end = time.monotonic_ns()
        # A snapshot: a listener that raises is removed below, and one may detach itself
        # (trace readers do); either must not make the next listener skipped.
        for listener in tuple(self.listeners):
            try:
                listener.hypercall(domid, op, cmd, arg, result, start, end)
            except Exception:
                if listener in self.listeners:
                    self.listeners.remove(listener)
                self.log(None, f"trace listener {listener!r} dropped:\n{traceback.format_exc()}")


def _raise_fd_limit() -> tuple[int, int]:
    """Take every fd RLIMIT_NOFILE allows (with CAP_SYS_RESOURCE, all the kernel does:
    an eventfd for every port and a file for every granted frame of every domain
    are held here); return the limit as it was, for the domains' processes."""
    was = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        most = int(Path("/proc/sys/fs/nr_open").read_text())
        resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
    except (OSError, ValueError):  # without CAP_SYS_RESOURCE the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (was[1], was[1]))
    return was


def _reason_name(reason: int) -> str:
    try:
        return ShutdownReason(reason).name
    except ValueError:
        return f"reason {reason}"
