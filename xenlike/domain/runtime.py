"""What every domain kernel starts with: its memory, hypercalls, ports and boot info.

`boot` is the first code a domain process runs (`python -m xenlike.domain`,
spawned by the hypervisor): it maps the domain's memory from the fd it was
given with the boot frames that have files of their own (`xenlike.frames`)
over their places, reads start_info from frame 0, connects its hypercall socket, and
calls the kernel the builder named with a `Domain`. The kernel's return
shuts the domain down with SHUTDOWN_poweroff; an exception prints its
traceback to the hypervisor log and shuts down with SHUTDOWN_crash.
"""

import importlib
import os
import resource
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from xenlike.abi.sched import SchedOp, ShutdownReason, sched_shutdown
from xenlike.abi.xen import SIF_PRIVILEGED, CONSOLEIO_write, Hypercall, start_info
from xenlike.codec import compile_struct
from xenlike.domain.evtchn import EventChannels
from xenlike.domain.grant_table import GrantTable
from xenlike.domain.hypercall import HypercallClient
from xenlike.frames import receive_frames
from xenlike.hypercall import Reply
from xenlike.memory import BootLayout, DomainMemory, PageAllocator
from xenlike.sandbox import set_not_dumpable
from xenlike.save_abi import XENLIKE_VCPUOP_get_context, XENLIKE_VCPUOP_save_context
from xenlike.trace import TraceBuffer, fast_path_recorder
from xenlike.trace.events import EventRecorder

__all__ = ["Domain", "Hardware", "Kernel", "boot", "load_kernel"]

START_INFO = compile_struct(start_info, "start_info")
SHUTDOWN = compile_struct(sched_shutdown, "sched_shutdown")

Kernel = Callable[["Domain"], Awaitable[None]]


@attrs.define(eq=False)
class Hardware:
    """What a driver domain lends its back ends (Dom0's is `domains.dom0.hw`): the
    core never opens a host file or a network device itself."""

    # Opens a disk image for blkback: (path, *, readonly, direct) -> a BlockDevice.
    disks: Callable[..., Any] | None = None
    net: Any = None  # netback's bridges: `net.bridge(name)`


@attrs.define(eq=False)
class Domain:
    """The running domain, as its kernel sees it."""

    domid: int
    start_info: Any
    memory: DomainMemory
    layout: BootLayout
    allocator: PageAllocator
    hypercalls: HypercallClient
    evtchn: EventChannels
    nursery: trio.Nursery  # for the domain's own background tasks
    grants: GrantTable
    trace: EventRecorder | None = None  # XenBus and ring events, into its trace buffer
    hardware: Hardware = attrs.field(factory=Hardware)  # a driver domain's, for its back ends
    shut_down: bool = False

    @property
    def privileged(self) -> bool:
        return bool(self.start_info.flags & SIF_PRIVILEGED)

    @property
    def cmdline(self) -> str:
        return self.start_info.cmd_line.split(b"\0", 1)[0].decode("utf-8", "replace")

    async def console_write(self, text: str) -> None:
        """CONSOLEIO_write: a line in the hypervisor log (early printk)."""
        data = text.encode()
        await self.hypercalls.call(Hypercall.console_io, CONSOLEIO_write, data, len(data))

    async def suspend(self, context: bytes) -> int:
        """Leave `context` as this vCPU's execution state, then SCHEDOP_shutdown
        (SHUTDOWN_suspend). It returns only if Dom0 resumes this domain in place:
        1, "cancelled" (`xl save -c`); a saved domain is destroyed meanwhile."""
        await self.hypercalls.call(Hypercall.vcpu_op, XENLIKE_VCPUOP_save_context, context)
        done = await self.hypercalls.call(
            Hypercall.sched_op, SchedOp.shutdown, SHUTDOWN.pack((ShutdownReason.suspend,)), 1
        )
        return done.result

    async def resume_context(self) -> bytes:
        """The execution state this domain was restored with; empty on a fresh boot."""
        done = await self.hypercalls.call(Hypercall.vcpu_op, XENLIKE_VCPUOP_get_context)
        return done.payload

    async def shutdown(self, reason: int = ShutdownReason.poweroff) -> None:
        """SCHEDOP_shutdown: this domain stops; the hypervisor reaps its process."""
        self.shut_down = True
        await self.hypercalls.call(
            Hypercall.sched_op, SchedOp.shutdown, SHUTDOWN.pack((reason,)), 1
        )


def load_kernel(name: str) -> Kernel:
    """Resolve "package.module:function" to the kernel's entry point."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"kernel {name!r} is not 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"kernel {name!r} is not callable")
    return target


def _raise_fd_limit() -> None:
    """Every port is an eventfd: a domain with a thousand ports needs the fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def attach_memory(memory_fd: int, nr_pages: int, frames: socket.socket) -> DomainMemory:
    """The domain's memory, with the frames the builder moved into files mapped over."""
    memory = DomainMemory.attach(memory_fd, nr_pages)
    while moved := receive_frames(frames):
        for gfn, fd in moved:
            try:
                memory.back_frame(gfn, fd)
            finally:
                os.close(fd)
    return memory


async def boot(
    *,
    hypercall_fd: int,
    memory_fd: int,
    nr_pages: int,
    frames_fd: int,
    domid: int,
    kernel: str,
    trace_fd: int,
) -> int:
    """Run one domain to its end; return the process exit status.

    `trace_fd` is the domain's own trace buffer, for the event sends that
    skip the hypervisor (`xenlike.trace`).
    """
    _raise_fd_limit()
    set_not_dumpable()  # Dom0's /proc holds the hardware; a guest's, its own memory
    frames = socket.socket(fileno=frames_fd)
    memory = attach_memory(memory_fd, nr_pages, frames)
    layout = BootLayout.for_domain(nr_pages)
    with memory.frame(layout.start_info_gfn) as page:
        info = START_INFO.unpack(bytes(page[: START_INFO.size]))
    sock = trio.socket.from_stdlib_socket(socket.socket(fileno=hypercall_fd))
    async with trio.open_nursery() as nursery:
        channels: EventChannels | None = None

        def on_notification(reply: Reply) -> None:
            if channels is not None:
                channels.handle_notification(reply)

        hypercalls = HypercallClient(sock, on_notification)
        hypervisor_gone = False

        async def hypercall_reader(task_status: trio.TaskStatus[None]) -> None:
            """A domain cannot outlive its hypervisor: when the socket closes, stop."""
            nonlocal hypervisor_gone
            await hypercalls.run(task_status=task_status)
            hypervisor_gone = True
            print("the hypervisor closed the hypercall socket; stopping", file=sys.stderr)
            nursery.cancel_scope.cancel()

        await nursery.start(hypercall_reader)
        grants = GrantTable(memory, layout, hypercalls, frames, f"xenlike-d{domid}")
        allocator = PageAllocator(layout.first_free_gfn, nr_pages)
        if info.nr_pages < nr_pages:  # booted below maxmem: the rest is the balloon's
            allocator.claim_run(info.nr_pages, nr_pages - info.nr_pages)
        channels = EventChannels(hypercalls, nursery)
        trace = TraceBuffer.attach(trace_fd, writable=True)
        channels.on_send = fast_path_recorder(trace, domid)
        domain = Domain(
            domid,
            info,
            memory,
            layout,
            allocator,
            hypercalls,
            channels,
            nursery,
            grants,
        )
        domain.trace = EventRecorder(trace, domid)
        reason = ShutdownReason.poweroff
        try:
            entry = load_kernel(kernel)
            await entry(domain)
        except Exception:
            reason = ShutdownReason.crash
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            try:
                await domain.console_write(text)
            except Exception:
                pass
        if not domain.shut_down:
            await domain.shutdown(reason)
        nursery.cancel_scope.cancel()
    return 1 if hypervisor_gone else 0
