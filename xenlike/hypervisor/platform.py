"""xen_version, console_io and sched_op: what every domain may ask of Xen itself."""

from typing import Any

from xenlike.abi.errno import Errno
from xenlike.abi.sched import SchedOp, ShutdownReason, sched_remote_shutdown, sched_shutdown
from xenlike.abi.version import XEN_CAPABILITIES_INFO_LEN, XEN_EXTRAVERSION_LEN, XenVerOp
from xenlike.abi.xen import CONSOLEIO_read, CONSOLEIO_write, Hypercall
from xenlike.hypercall import HYPERCALL_MAX_MESSAGE, HypercallError
from xenlike.hypervisor.core import XEN_VERSION
from xenlike.hypervisor.table import Call, hypercall
from xenlike.memory import XEN_PAGE_SIZE

EXTRAVERSION = b"-xenlike"
CAPABILITIES = b"xen-3.0-x86_64"
CONSOLE_WRITE_MAX = 16 * 1024  # bytes one console_io write may carry


@hypercall(Hypercall.xen_version, XenVerOp.version)
def version(call: Call, _: None) -> int:
    return XEN_VERSION[0] << 16 | XEN_VERSION[1]


@hypercall(Hypercall.xen_version, XenVerOp.extraversion)
def extraversion(call: Call, _: None) -> tuple[int, bytes]:
    return 0, EXTRAVERSION.ljust(XEN_EXTRAVERSION_LEN, b"\0")


@hypercall(Hypercall.xen_version, XenVerOp.capabilities)
def capabilities(call: Call, _: None) -> tuple[int, bytes]:
    return 0, CAPABILITIES.ljust(XEN_CAPABILITIES_INFO_LEN, b"\0")


@hypercall(Hypercall.xen_version, XenVerOp.pagesize)
def pagesize(call: Call, _: None) -> int:
    return XEN_PAGE_SIZE


@hypercall(Hypercall.xen_version, XenVerOp.guest_handle)
def guest_handle(call: Call, _: None) -> tuple[int, bytes]:
    return 0, call.caller.handle


@hypercall(Hypercall.console_io, CONSOLEIO_write, raw=True, name="write")
def console_write(call: Call, text: bytes) -> int:
    """Write to the hypervisor log, which `xenlike dmesg` shows (as `xl dmesg`);
    a guest's writes pass printk_ratelimit, and a suppressed one still succeeds."""
    if len(text) > CONSOLE_WRITE_MAX:
        raise HypercallError(Errno.E2BIG, f"{len(text)} bytes; at most {CONSOLE_WRITE_MAX}")
    call.hv.log_console(call.caller, text.decode("utf-8", "replace"))
    return len(text)


@hypercall(Hypercall.console_io, CONSOLEIO_read, privileged=True, name="read")
def console_read(call: Call, _: None) -> tuple[int, bytes]:
    """The newest lines of the hypervisor log that fit one reply."""
    budget = HYPERCALL_MAX_MESSAGE - 64
    lines: list[bytes] = []
    for line in reversed(call.hv.log_lines):
        data = line.encode() + b"\n"
        if len(data) > budget:
            break
        budget -= len(data)
        lines.append(data)
    text = b"".join(reversed(lines))
    return len(text), text


@hypercall(Hypercall.sched_op, SchedOp.yield_)
def sched_yield(call: Call, _: None) -> int:
    return 0


@hypercall(Hypercall.sched_op, SchedOp.block)
def sched_block(call: Call, _: None) -> int:
    """A domain blocks in its own event loop, waiting on its ports' eventfds."""
    return 0


def _reason(reason: int) -> int:
    if reason not in ShutdownReason._value2member_map_:
        raise HypercallError(Errno.EINVAL, f"shutdown reason {reason}")
    return reason


@hypercall(Hypercall.sched_op, SchedOp.shutdown, args=sched_shutdown)
def shutdown(call: Call, arg: Any) -> int:
    """A suspend's call returns only when Dom0 resumes the domain (1, "cancelled");
    a saved domain is destroyed before it returns."""
    reason = _reason(arg.reason)
    if reason == ShutdownReason.suspend and call.caller.domid != 0:
        call.defer()
        call.caller.suspended_call = (call.connection, call.seq)
    call.hv.shutdown(call.caller, reason)
    return 0


@hypercall(Hypercall.sched_op, SchedOp.shutdown_code, args=sched_shutdown)
def shutdown_code(call: Call, arg: Any) -> int:
    """Record the reason a later crash or watchdog shutdown will report."""
    call.caller.shutdown_reason = _reason(arg.reason)
    return 0


@hypercall(Hypercall.sched_op, SchedOp.remote_shutdown, args=sched_remote_shutdown, privileged=True)
def remote_shutdown(call: Call, arg: Any) -> int:
    call.hv.shutdown(call.hv.lookup(arg.domain_id), _reason(arg.reason))
    return 0
