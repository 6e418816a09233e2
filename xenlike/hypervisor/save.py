"""What libxc's save and restore ask of Xen: a suspended domain's context and
memory, and resuming it in place.

- The guest kernel leaves its execution state with `XENLIKE_VCPUOP_save_context`
  before SCHEDOP_shutdown(SHUTDOWN_suspend): in Xen the hypervisor holds a
  vCPU's registers; here the kernel serializes what stands for them. On a
  restore, Dom0 sets it (`XENLIKE_DOMCTL_setcontext`) before unpausing, and the
  kernel reads it back (`XENLIKE_VCPUOP_get_context`) when it boots.
- Dom0 reads the suspended domain's context (`XENLIKE_DOMCTL_getcontext`, as
  XEN_DOMCTL_getvcpucontext) and its populated frames (`XENLIKE_DOMCTL_read_frames`,
  as xc_map_foreign_bulk plus the p2m: a frame that holds no memory is marked
  and not sent) and refills a new domain's (`XENLIKE_DOMCTL_write_frames`).
- Dom0 may instead map the whole memory of a domain it saves or restores
  (`XENLIKE_DOMCTL_map_memory`, as Xen's privcmd lets Dom0 map any guest's
  frames): the memory file goes with the reply, with which frames are
  populated and which live in files of their own (granted frames, whose
  data Dom0 then reads with read_frames). A 128 MiB guest's frames through
  read_frames replies took 1.8 s to read and 1.1 s to write back here.
- XEN_DOMCTL_gettscinfo gives a domain's elapsed time, which libxc's save
  writes in X86_TSC_INFO; XEN_DOMCTL_settscinfo makes a restored domain's
  time go on from there.
- XEN_DOMCTL_resumedomain runs a suspended domain on, its SCHEDOP_shutdown
  returning 1 ("cancelled"): `xl save -c`.
"""

import itertools
import time
from array import array
from typing import Any

from xenlike.abi.domctl import DomctlOp, xen_domctl_tsc_info
from xenlike.abi.errno import Errno
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import Hypercall
from xenlike.codec import compile_struct
from xenlike.hypercall import HYPERCALL_MAX_MESSAGE, HypercallError
from xenlike.hypervisor.control import domctl
from xenlike.hypervisor.core import DomainState, HypervisorDomain
from xenlike.hypervisor.logdirty import dirty_log, note_read
from xenlike.hypervisor.table import Call, hypercall
from xenlike.memory import XEN_PAGE_SIZE
from xenlike.save_abi import (
    FRAMES_PER_CALL,
    MAX_CONTEXT,
    XENLIKE_DOMCTL_getcontext,
    XENLIKE_DOMCTL_map_memory,
    XENLIKE_DOMCTL_read_frames,
    XENLIKE_DOMCTL_setcontext,
    XENLIKE_DOMCTL_write_frames,
    XENLIKE_VCPUOP_get_context,
    XENLIKE_VCPUOP_save_context,
    xenlike_context,
    xenlike_frames,
    xenlike_memory,
)

__all__ = ["resumedomain"]

FRAMES = compile_struct(xenlike_frames, "xenlike_frames")
CONTEXT = compile_struct(xenlike_context, "xenlike_context")
MEMORY = compile_struct(xenlike_memory, "xenlike_memory")
TSC_INFO = compile_struct(xen_domctl_tsc_info, "xen_domctl_tsc_info")


def _suspended(call: Call, domid: int) -> HypervisorDomain:
    domain = call.hv.lookup(domid)
    if domain.state is not DomainState.shutdown or (
        domain.shutdown_reason != ShutdownReason.suspend
    ):
        raise HypercallError(Errno.EINVAL, f"{domain} is not suspended")
    return domain


def _readable(call: Call, domid: int) -> HypervisorDomain:
    """A suspended domain, or one running under log-dirty: pre-copy reads its frames
    as it runs (Xen's xc_map_foreign_bulk of a live domain) and resends the ones
    log-dirty reports written since."""
    domain = call.hv.lookup(domid)
    if dirty_log(domain) is not None and domain.state in (DomainState.running, DomainState.paused):
        return domain
    return _suspended(call, domid)


def _range(domain: HypervisorDomain, first: int, count: int) -> None:
    if not 0 < count <= FRAMES_PER_CALL or not 0 <= first <= domain.nr_pages - count:
        raise HypercallError(
            Errno.EINVAL, f"frames {first}+{count} of {domain} ({domain.nr_pages} frames)"
        )


@hypercall(
    Hypercall.domctl,
    XENLIKE_DOMCTL_read_frames,
    args=xenlike_frames,
    privileged=True,
    name="xenlike_read_frames",
)
def read_frames(call: Call, arg: Any) -> tuple[int, bytes]:
    """One byte per frame (1: populated), then the populated frames' contents."""
    domain = _readable(call, arg.domain)
    _range(domain, arg.first_pfn, arg.count)
    assert domain.reservation is not None and domain.memory is not None
    if domain.frames is not None:  # a live domain may have moved frames into files since
        domain.frames.drain()
    end = arg.first_pfn + arg.count
    populated = bytes(domain.reservation.populated[arg.first_pfn : end])
    out = [FRAMES.pack(arg), populated]
    for offset, held in enumerate(populated):
        if held:
            with domain.memory.frame(arg.first_pfn + offset) as page:
                content = bytes(page)
            note_read(domain, arg.first_pfn + offset, content)
            out.append(content)
    return 0, b"".join(out)


@hypercall(
    Hypercall.domctl,
    XENLIKE_DOMCTL_write_frames,
    raw=True,
    privileged=True,
    name="xenlike_write_frames",
)
def write_frames(call: Call, data: bytes) -> int:
    """A restore's memory: a xenlike_frames header, then `count` frames, into a
    domain that was built and has not run yet; each must be populated."""
    if len(data) < FRAMES.size:
        raise HypercallError(Errno.EINVAL, "write_frames: no header")
    arg = FRAMES.unpack_from(data, 0)
    domain = call.hv.lookup(arg.domain)
    if domain.state is not DomainState.created or domain.memory is None:
        raise HypercallError(Errno.EINVAL, f"{domain} is not a built domain that never ran")
    _range(domain, arg.first_pfn, arg.count)
    if len(data) != FRAMES.size + arg.count * XEN_PAGE_SIZE:
        raise HypercallError(Errno.EINVAL, f"write_frames: {len(data)} bytes for {arg.count}")
    assert domain.reservation is not None
    end = arg.first_pfn + arg.count
    if not all(domain.reservation.populated[arg.first_pfn : end]):
        raise HypercallError(Errno.EINVAL, f"frames {arg.first_pfn}+{arg.count} not populated")
    with domain.memory.frames(arg.first_pfn, arg.count) as frames:
        frames[:] = data[FRAMES.size :]
    return 0


@hypercall(
    Hypercall.domctl,
    XENLIKE_DOMCTL_map_memory,
    args=xenlike_context,
    privileged=True,
    name="xenlike_map_memory",
)
def map_memory(call: Call, arg: Any) -> tuple[int, bytes]:
    """A suspended domain's memory (a save), or a built one's that never ran (a
    restore): its memory file with the reply, then which frames are populated
    and which have files of their own (see the module docstring)."""
    domain = call.hv.lookup(arg.domain)
    fresh = domain.state is DomainState.created
    if not fresh:
        domain = _suspended(call, arg.domain)
    if domain.memory is None or domain.reservation is None:
        raise HypercallError(Errno.EINVAL, f"{domain} has no memory: not built")
    if domain.frames is not None:
        domain.frames.drain()
    moved = sorted(domain.frames.files) if domain.frames is not None else []
    flags = domain.reservation.populated
    bitmap = bytearray((len(flags) + 7) // 8)
    for gfn in itertools.compress(range(len(flags)), flags):
        bitmap[gfn >> 3] |= 1 << (gfn & 7)
    payload = MEMORY.pack(MEMORY.record(len(flags), len(moved))) + bytes(bitmap)
    payload += array("I", moved).tobytes()
    if len(payload) > HYPERCALL_MAX_MESSAGE - 1024:
        raise HypercallError(Errno.E2BIG, f"{domain}: {len(payload)} bytes of frame map")
    call.send_fd(domain.memory.fd)  # the receiver gets its own descriptor
    return 0, payload


TSC_MODE_ALWAYS_EMULATE = 1  # Xen's: a domain's time here is the hypervisor's clock
TSC_KHZ = 1_000_000  # one tick a nanosecond


@domctl(DomctlOp.gettscinfo)
def gettscinfo(call: Call, arg: Any) -> tuple[int, Any]:
    """tsc_get_info: the domain's elapsed time, which libxc saves as X86_TSC_INFO."""
    domain = call.hv.lookup(arg.domain)
    elapsed = max(0, int((time.monotonic() - domain.tsc_offset) * 1e9))
    info = TSC_INFO.record(TSC_MODE_ALWAYS_EMULATE, TSC_KHZ, 0, 0, elapsed)
    return 0, arg._replace(u=TSC_INFO.pack(info).ljust(128, b"\0"))


@domctl(DomctlOp.settscinfo)
def settscinfo(call: Call, arg: Any) -> int:
    """tsc_set_info, on a restore: a built domain that never ran starts its time at
    the saved elapsed time, as Xen sets vtsc_offset = now - elapsed_nsec."""
    domain = call.hv.lookup(arg.domain)
    if domain.state is not DomainState.created:
        raise HypercallError(Errno.EINVAL, f"{domain} has run already")
    info = TSC_INFO.unpack(arg.u[: TSC_INFO.size])
    domain.tsc_offset = time.monotonic() - info.elapsed_nsec / 1e9
    return 0


@domctl(DomctlOp.resumedomain)
def resumedomain(call: Call, arg: Any) -> int:
    call.hv.resume(call.hv.lookup(arg.domain))
    return 0


@hypercall(
    Hypercall.domctl,
    XENLIKE_DOMCTL_getcontext,
    args=xenlike_context,
    privileged=True,
    name="xenlike_getcontext",
)
def getcontext(call: Call, arg: Any) -> tuple[int, bytes]:
    domain = _suspended(call, arg.domain)
    return len(domain.vcpu_context), domain.vcpu_context


@hypercall(
    Hypercall.domctl,
    XENLIKE_DOMCTL_setcontext,
    raw=True,
    privileged=True,
    name="xenlike_setcontext",
)
def setcontext(call: Call, data: bytes) -> int:
    """A restore's execution state: a xenlike_context, then the bytes."""
    if len(data) < CONTEXT.size:
        raise HypercallError(Errno.EINVAL, "setcontext: no domain")
    domain = call.hv.lookup(CONTEXT.unpack_from(data, 0).domain)
    if domain.state is not DomainState.created:
        raise HypercallError(Errno.EINVAL, f"{domain} has run already")
    domain.vcpu_context = data[CONTEXT.size :]
    return 0


@hypercall(Hypercall.vcpu_op, XENLIKE_VCPUOP_save_context, raw=True, name="xenlike_save_context")
def save_context(call: Call, data: bytes) -> int:
    """The kernel's execution state, left before it suspends."""
    if len(data) > MAX_CONTEXT:
        raise HypercallError(Errno.E2BIG, f"{len(data)}-byte context, limit {MAX_CONTEXT}")
    call.caller.vcpu_context = data
    return 0


@hypercall(Hypercall.vcpu_op, XENLIKE_VCPUOP_get_context, name="xenlike_get_context")
def get_context(call: Call, _: None) -> tuple[int, bytes]:
    """The state a restored kernel resumes from; empty for a fresh boot."""
    return len(call.caller.vcpu_context), call.caller.vcpu_context
