"""Dom0's control library (libxc's place): domctl and sysctl over the control socket.

Dom0 tools reach the hypervisor through `<run-dir>/hypervisor.sock` with
domain 0's rights, as `xl` goes through privcmd::

    async with XenControl.connect(run_dir) as xc:
        domid = await xc.create_domain("domains.guest:main", memory_mb=32)
        await xc.unpause(domid)
"""

import mmap
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from xenlike.abi.domctl import (
    XEN_DOMCTL_INTERFACE_VERSION,
    XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
    XEN_DOMCTL_SHADOW_OP_OFF,
    XEN_DOMCTL_SHADOW_OP_PEEK,
    DomctlOp,
    xen_domctl,
    xen_domctl_createdomain,
    xen_domctl_getdomaininfo,
    xen_domctl_max_mem,
    xen_domctl_shadow_op,
    xen_domctl_tsc_info,
)
from xenlike.abi.errno import Errno
from xenlike.abi.event_channel import EvtchnOp, evtchn_alloc_unbound
from xenlike.abi.sched import SchedOp, ShutdownReason, sched_remote_shutdown
from xenlike.abi.sysctl import SysctlOp, xen_sysctl_getdomaininfolist, xen_sysctl_physinfo
from xenlike.abi.xen import CONSOLEIO_read, Hypercall
from xenlike.codec import compile_struct
from xenlike.domain.hypercall import HypercallClient, codec_for
from xenlike.hypercall import HypercallError
from xenlike.hypervisor.control import XENLIKE_DOMCTL_build, xenlike_domctl_build
from xenlike.memory import XEN_PAGE_SIZE
from xenlike.save_abi import (
    FRAMES_PER_CALL,
    XENLIKE_DOMCTL_getcontext,
    XENLIKE_DOMCTL_map_memory,
    XENLIKE_DOMCTL_read_frames,
    XENLIKE_DOMCTL_setcontext,
    XENLIKE_DOMCTL_write_frames,
    xenlike_frames,
    xenlike_memory,
)

__all__ = ["ForeignMemory", "MemoryFile", "XenControl", "connect_control_socket"]

INFO = compile_struct(xen_domctl_getdomaininfo, "xen_domctl_getdomaininfo")
BUILD = compile_struct(xenlike_domctl_build, "xenlike_domctl_build")
FRAMES = compile_struct(xenlike_frames, "xenlike_frames")
DOMCTL = compile_struct(xen_domctl, "xen_domctl")
SHADOW_OP = compile_struct(xen_domctl_shadow_op, "xen_domctl_shadow_op")
MADV_POPULATE_READ = 22  # Linux 5.14's (asm-generic/mman-common.h): Python 3.11 has no name
MADV_POPULATE_WRITE = 23
ALL_PAGES = (1 << 64) - 1  # a shadow_op bitmap "as large as the domain": Xen clamps `pages`
MEMORY = compile_struct(xenlike_memory, "xenlike_memory")
TSC = compile_struct(xen_domctl_tsc_info, "xen_domctl_tsc_info")


@attrs.define(eq=False)
class ForeignMemory:
    """Another domain's whole memory, mapped here (`XenControl.map_memory`).

    `populated` are its frames that hold memory; `moved` those whose data is in
    a file of their own (frames it granted), not in this mapping: read them
    with `read_frames`. Close it (or use it as a context manager) once done.
    """

    mapping: mmap.mmap
    populated: list[int]
    moved: frozenset[int]

    def frames(self, gfn: int, count: int = 1) -> memoryview:
        """Frames gfn..gfn+count-1; release the view before `close`."""
        return memoryview(self.mapping)[gfn * XEN_PAGE_SIZE : (gfn + count) * XEN_PAGE_SIZE]

    def close(self) -> None:
        """Unmap now or, while views of it are still held (a save's image), once the
        last of them goes."""
        try:
            self.mapping.close()
        except BufferError:
            pass

    def __enter__(self) -> "ForeignMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define(eq=False)
class MemoryFile:
    """Another domain's memory file (`XenControl.memory_file`): `fd` is its memfd,
    `nr_pages` frames long, `bitmap` one bit a frame (1: populated, bit gfn % 8 of
    byte gfn // 8), `moved` the frames whose data is in a file of their own, not in
    this one. Close it (or use it as a context manager) once done."""

    fd: int
    nr_pages: int
    bitmap: bytes
    moved: frozenset[int]

    def populated(self) -> list[int]:
        """The populated frames, ascending."""
        return [
            index * 8 + bit
            for index, byte in enumerate(self.bitmap)
            if byte
            for bit in range(8)
            if byte >> bit & 1
        ]

    def all_populated(self, first: int, end: int) -> bool:
        """Whether every frame from `first` up to `end` is populated."""
        whole = int.from_bytes(self.bitmap, "little")
        span = (1 << (end - first)) - 1
        return end <= self.nr_pages and whole >> first & span == span

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "MemoryFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prefault(
    mapping: mmap.mmap, populated: list[int], moved: frozenset[int], writable: bool
) -> None:
    """Map the populated frames in now, a run of them a call: a save or restore
    touches each, and a fault each costs more than its copy (128 MiB written out:
    200 ms against 240-450 here). Holes stay holes (MAP_POPULATE would fill the
    ballooned-out frames), and so do the frames whose data is elsewhere."""
    advice = MADV_POPULATE_WRITE if writable else MADV_POPULATE_READ
    first = previous = -2
    for gfn in [*populated, -2]:
        if gfn == previous + 1 and gfn not in moved:
            previous = gfn
            continue
        if first >= 0:
            try:
                mapping.madvise(
                    advice, first * XEN_PAGE_SIZE, (previous - first + 1) * XEN_PAGE_SIZE
                )
            except OSError:  # a kernel before 5.14: the frames fault in one by one
                return
        first = previous = gfn if gfn not in moved else -2


async def connect_control_socket(run_dir: str | os.PathLike[str]) -> trio.socket.SocketType:
    """The hypervisor's privileged control socket of a run directory, connected."""
    path = Path(run_dir) / "hypervisor.sock"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        await sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ConnectionError(f"no hypervisor at {path}: {exc.strerror}") from None
    return sock


class XenControl:
    """Typed domctl/sysctl calls for Dom0 tools (and Dom0's toolstack)."""

    def __init__(self, hypercalls: HypercallClient) -> None:
        self.hypercalls = hypercalls

    @classmethod
    @asynccontextmanager
    async def connect(cls, run_dir: Path) -> AsyncIterator["XenControl"]:
        sock = await connect_control_socket(run_dir)
        client = HypercallClient(sock)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield cls(client)
            finally:
                nursery.cancel_scope.cancel()
                sock.close()

    async def create_domain(
        self,
        kernel: str,
        *,
        memory_mb: int,
        cmdline: str = "",
        store_evtchn: int = 0,
        console_evtchn: int = 0,
        handle: bytes = bytes(16),
    ) -> int:
        """createdomain, max_mem, then build: a paused domain ready to unpause."""
        domid = await self.createdomain(handle)
        try:
            await self.set_max_mem(domid, memory_mb * 1024)
            await self.build(
                domid,
                kernel,
                cmdline=cmdline,
                store_evtchn=store_evtchn,
                console_evtchn=console_evtchn,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.destroy(domid)
            raise
        return domid

    async def createdomain(self, handle: bytes = bytes(16)) -> int:
        """XEN_DOMCTL_createdomain: a new empty domain, paused, with no memory yet."""
        config = codec_for(xen_domctl_createdomain).record(
            handle=handle,
            max_vcpus=1,
            max_evtchn_port=1023,
            max_grant_frames=-1,
            max_maptrack_frames=-1,
        )
        domid, _ = await self.hypercalls.domctl(
            DomctlOp.createdomain, 0, xen_domctl_createdomain, config
        )
        return domid

    async def set_max_mem(self, domid: int, max_memkb: int) -> None:
        await self.hypercalls.domctl(
            DomctlOp.max_mem,
            domid,
            xen_domctl_max_mem,
            codec_for(xen_domctl_max_mem).record(max_memkb=max_memkb),
        )

    async def build(
        self,
        domid: int,
        kernel: str,
        *,
        cmdline: str = "",
        store_evtchn: int = 0,
        console_evtchn: int = 0,
        nr_pages: int = 0,
    ) -> None:
        """The domain builder; `nr_pages` populated at boot (0: all of max_mem)."""
        arg = BUILD.record(
            domain=domid,
            store_evtchn=store_evtchn,
            console_evtchn=console_evtchn,
            nr_pages=nr_pages,
            kernel=kernel.encode().ljust(256, b"\0"),
            cmd_line=cmdline.encode().ljust(1024, b"\0"),
        )
        await self.hypercalls.call(Hypercall.domctl, XENLIKE_DOMCTL_build, BUILD.pack(arg), 1)

    async def alloc_unbound(self, domid: int, remote_dom: int) -> int:
        """A port in `domid` that `remote_dom` may bind (the store and console ports)."""
        _, out, fds = await self.hypercalls.call_struct(
            Hypercall.event_channel_op,
            EvtchnOp.alloc_unbound,
            evtchn_alloc_unbound,
            codec_for(evtchn_alloc_unbound).record(dom=domid, remote_dom=remote_dom),
        )
        return out.port

    async def unpause(self, domid: int) -> None:
        await self.hypercalls.domctl(DomctlOp.unpausedomain, domid)

    async def pause(self, domid: int) -> None:
        await self.hypercalls.domctl(DomctlOp.pausedomain, domid)

    async def resume(self, domid: int) -> None:
        """XEN_DOMCTL_resumedomain: a suspended domain runs on; its suspend returns 1."""
        await self.hypercalls.domctl(DomctlOp.resumedomain, domid)

    async def tsc_info(self, domid: int) -> int:
        """xc_domain_get_tsc_info's elapsed_nsec: the domain's time, in nanoseconds."""
        _, info = await self.hypercalls.domctl(
            DomctlOp.gettscinfo, domid, xen_domctl_tsc_info, TSC.record(0, 0, 0, 0, 0)
        )
        return int(info.elapsed_nsec)

    async def set_tsc_info(self, domid: int, elapsed_nsec: int) -> None:
        """xc_domain_set_tsc_info, on a restore: the new domain's time goes on from there."""
        value = TSC.record(tsc_mode=0, gtsc_khz=0, incarnation=0, pad=0, elapsed_nsec=elapsed_nsec)
        await self.hypercalls.domctl(DomctlOp.settscinfo, domid, xen_domctl_tsc_info, value)

    async def vcpu_context(self, domid: int) -> bytes:
        """A suspended domain's execution state, as its kernel left it."""
        arg = domid.to_bytes(2, "little") + bytes(6)
        done = await self.hypercalls.call(Hypercall.domctl, XENLIKE_DOMCTL_getcontext, arg, 1)
        return done.payload

    async def set_vcpu_context(self, domid: int, context: bytes) -> None:
        """A built, never-run domain's execution state: its kernel boots to resume it."""
        data = domid.to_bytes(2, "little") + bytes(6) + context
        await self.hypercalls.call(Hypercall.domctl, XENLIKE_DOMCTL_setcontext, data)

    async def memory_file(self, domid: int) -> MemoryFile:
        """A suspended (or built, never-run) domain's memory file itself, as Xen's
        privcmd lets Dom0 reach any guest's frames: a restore writes its frames
        into it with the kernel's copies and no mapping here."""
        arg = domid.to_bytes(2, "little") + bytes(6)
        done = await self.hypercalls.call(Hypercall.domctl, XENLIKE_DOMCTL_map_memory, arg, 1)
        fds = list(done.fds)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise HypercallError(Errno.EINVAL, f"map_memory sent {len(fds)} files, not 1")
        head = MEMORY.unpack_from(done.payload, 0)
        bitmap = done.payload[MEMORY.size : MEMORY.size + (head.nr_pages + 7) // 8]
        moved = done.payload[MEMORY.size + len(bitmap) :]
        gfns = frozenset(memoryview(moved[: 4 * head.nr_moved]).cast("I"))
        return MemoryFile(fds[0], head.nr_pages, bytes(bitmap), gfns)

    async def map_memory(self, domid: int, *, writable: bool = False) -> ForeignMemory:
        """A suspended (or built, never-run) domain's memory, mapped here as Xen's
        privcmd maps a guest's frames for libxc's save and restore."""
        with await self.memory_file(domid) as memory:
            mapping = mmap.mmap(
                memory.fd,
                memory.nr_pages * XEN_PAGE_SIZE,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0),
            )
        populated = memory.populated()
        _prefault(mapping, populated, memory.moved, writable)
        return ForeignMemory(mapping, populated, memory.moved)

    async def read_frames(self, domid: int, first: int, count: int) -> dict[int, bytes]:
        """The populated frames among `count` from `first` of a suspended domain, or of a
        live one under log-dirty."""
        out: dict[int, bytes] = {}
        for start in range(first, first + count, FRAMES_PER_CALL):
            n = min(FRAMES_PER_CALL, first + count - start)
            arg = FRAMES.pack(FRAMES.record(domain=domid, first_pfn=start, count=n))
            done = await self.hypercalls.call(Hypercall.domctl, XENLIKE_DOMCTL_read_frames, arg, 1)
            flags = done.payload[FRAMES.size : FRAMES.size + n]
            offset = FRAMES.size + n
            for i, held in enumerate(flags):
                if held:
                    out[start + i] = done.payload[offset : offset + XEN_PAGE_SIZE]
                    offset += XEN_PAGE_SIZE
        return out

    async def write_frames(self, domid: int, first: int, data: bytes) -> None:
        """Fill consecutive populated frames from `first` of a built, never-run domain."""
        count = len(data) // XEN_PAGE_SIZE
        for i in range(0, count, FRAMES_PER_CALL):
            n = min(FRAMES_PER_CALL, count - i)
            head = FRAMES.pack(FRAMES.record(domain=domid, first_pfn=first + i, count=n))
            chunk = data[i * XEN_PAGE_SIZE : (i + n) * XEN_PAGE_SIZE]
            await self.hypercalls.call(Hypercall.domctl, XENLIKE_DOMCTL_write_frames, head + chunk)

    async def shadow_op(
        self, domid: int, op: int, *, mode: int = 0, pages: int = ALL_PAGES
    ) -> tuple[Any, bytes]:
        """XEN_DOMCTL_shadow_op: (the xen_domctl_shadow_op sent back, the dirty bitmap)."""
        request = SHADOW_OP.record(op=op, mode=mode, dirty_bitmap=1, pages=pages)
        arg = DOMCTL.record(
            cmd=DomctlOp.shadow_op,
            interface_version=XEN_DOMCTL_INTERFACE_VERSION,
            domain=domid,
            u=SHADOW_OP.pack(request).ljust(128, b"\0"),
        )
        done = await self.hypercalls.call(Hypercall.domctl, DomctlOp.shadow_op, DOMCTL.pack(arg), 1)
        back = DOMCTL.unpack(done.payload[: DOMCTL.size])
        return SHADOW_OP.unpack(back.u[: SHADOW_OP.size]), done.payload[DOMCTL.size :]

    async def logdirty_enable(self, domid: int) -> None:
        """Log-dirty from now on: later bitmaps mark every frame written since."""
        await self.shadow_op(domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)

    async def logdirty_clean(self, domid: int) -> bytes:
        """The frames written since log-dirty was enabled or last cleaned, one bit each
        (bit pfn % 8 of byte pfn // 8), for all the domain's frames; then cleared."""
        _, bitmap = await self.shadow_op(domid, XEN_DOMCTL_SHADOW_OP_CLEAN)
        return bitmap

    async def logdirty_peek(self, domid: int) -> bytes:
        """As `logdirty_clean`, leaving the bitmap as it is."""
        _, bitmap = await self.shadow_op(domid, XEN_DOMCTL_SHADOW_OP_PEEK)
        return bitmap

    async def logdirty_off(self, domid: int) -> None:
        await self.shadow_op(domid, XEN_DOMCTL_SHADOW_OP_OFF)

    async def destroy(self, domid: int) -> None:
        await self.hypercalls.domctl(DomctlOp.destroydomain, domid)

    async def shutdown(self, domid: int, reason: int = ShutdownReason.poweroff) -> None:
        """SCHEDOP_remote_shutdown: stop a domain now, for `reason`."""
        await self.hypercalls.call_struct(
            Hypercall.sched_op,
            SchedOp.remote_shutdown,
            sched_remote_shutdown,
            codec_for(sched_remote_shutdown).record(domain_id=domid, reason=reason),
        )

    async def domain_info(self, domid: int) -> Any:
        """getdomaininfo of exactly `domid` (Xen answers the next one up; we check)."""
        found, info = await self.hypercalls.domctl(
            DomctlOp.getdomaininfo, domid, xen_domctl_getdomaininfo, INFO.record()
        )
        if found != domid:
            raise HypercallError(Errno.ESRCH, f"no domain {domid}")
        return info

    async def list_domains(self, first: int = 0, max_domains: int = 512) -> list[Any]:
        """sysctl getdomaininfolist: every domain's getdomaininfo, by domid."""
        query = codec_for(xen_sysctl_getdomaininfolist).record(
            first_domain=first, max_domains=max_domains
        )
        count, _, records = await self.hypercalls.sysctl(
            SysctlOp.getdomaininfolist, xen_sysctl_getdomaininfolist, query
        )
        return [INFO.unpack_from(records, i * INFO.size) for i in range(count)]

    async def physinfo(self) -> Any:
        _, info, _ = await self.hypercalls.sysctl(
            SysctlOp.physinfo, xen_sysctl_physinfo, codec_for(xen_sysctl_physinfo).record()
        )
        return info

    async def dmesg(self) -> str:
        """The hypervisor log (CONSOLEIO_read), as `xl dmesg` prints it."""
        done = await self.hypercalls.call(Hypercall.console_io, CONSOLEIO_read)
        return done.payload.decode("utf-8", "replace")
