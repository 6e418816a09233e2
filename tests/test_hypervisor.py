"""The hypervisor with real domain processes, driven through the control socket."""

import re
import resource
from pathlib import Path

import pytest
import trio

import xenlike.hypervisor
from xenlike.abi.domctl import XEN_DOMINF_shutdown, XEN_DOMINF_shutdownshift
from xenlike.abi.errno import Errno
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.xen import Hypercall
from xenlike.hypercall import HypercallError
from xenlike.hypervisor import Hypervisor
from xenlike.hypervisor.table import HypercallTable, handlers
from xenlike.xc import XenControl


async def wait_for_log(xc: XenControl, text: str, timeout: float = 20) -> str:
    with trio.fail_after(timeout):
        while True:
            log = await xc.dmesg()
            if text in log:
                return log
            await trio.sleep(0.05)


async def wait_for_shutdown(xc: XenControl, domid: int, timeout: float = 20) -> int:
    with trio.fail_after(timeout):
        while True:
            info = await xc.domain_info(domid)
            if info.flags & XEN_DOMINF_shutdown:
                return info.flags >> XEN_DOMINF_shutdownshift & 0xFF
            await trio.sleep(0.05)


async def test_a_domain_boots_logs_and_powers_off(xc: XenControl) -> None:
    domid = await xc.create_domain("tests.kernels:hello", memory_mb=4)
    assert domid == 1
    await xc.unpause(domid)
    log = await wait_for_log(xc, "hello from d1, 1024 pages")
    assert "(d1) hello" in log
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.poweroff


async def test_a_built_domain_runs_its_process_held_until_the_first_unpause(
    hv: Hypervisor, xc: XenControl
) -> None:
    """Its process starts at build, sandboxed, so the interpreter loads while the
    toolstack fills the domain (a restore's downtime does not pay for it); its kernel
    runs only once unpaused, and a domain destroyed while held takes it along."""
    held = [await xc.create_domain("tests.kernels:hello", memory_mb=4) for _ in range(2)]
    await wait_for_log(xc, f"(d{held[1]}) sandbox:")
    processes = [hv.lookup(domid).process for domid in held]
    assert all(p is not None and p.returncode is None for p in processes)
    assert "hello from" not in await xc.dmesg()
    await xc.unpause(held[0])
    await wait_for_log(xc, f"hello from d{held[0]}")
    await xc.destroy(held[1])
    assert processes[1] is not None
    with trio.fail_after(20):
        await processes[1].wait()
    assert f"hello from d{held[1]}" not in await xc.dmesg()


async def test_a_raising_kernel_crashes_with_its_traceback_logged(xc: XenControl) -> None:
    domid = await xc.create_domain("tests.kernels:crash", memory_mb=4)
    await xc.unpause(domid)
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.crash
    log = await xc.dmesg()
    assert "RuntimeError: this kernel crashes on purpose" in log


async def test_event_channel_ping_pong_between_two_guests(xc: XenControl) -> None:
    rounds = 500
    ping = await xc.createdomain()
    await xc.set_max_mem(ping, 4096)
    port = await xc.alloc_unbound(ping, remote_dom=ping + 1)  # as libxl does for the store port
    await xc.build(ping, "tests.kernels:ping", cmdline=f"port={port} rounds={rounds}")
    pong = await xc.create_domain(
        "tests.kernels:pong", memory_mb=4, cmdline=f"peer={ping} port={port} rounds={rounds}"
    )
    assert pong == ping + 1
    await xc.unpause(ping)
    await xc.unpause(pong)
    await wait_for_log(xc, f"pong done after {rounds} rounds")
    await wait_for_log(xc, f"ping done after {rounds} rounds")


async def test_domctl_is_for_dom0_only_and_unknown_ops_are_enosys(xc: XenControl) -> None:
    with pytest.raises(HypercallError) as info:
        await xc.hypercalls.call(99, 0)
    assert info.value.errno == Errno.ENOSYS
    with pytest.raises(HypercallError) as info:
        await xc.domain_info(42)
    assert info.value.errno == Errno.ESRCH


async def test_list_and_physinfo(xc: XenControl) -> None:
    domid = await xc.create_domain("tests.kernels:sleeper", memory_mb=4)
    domains = await xc.list_domains()
    assert [d.domain for d in domains] == [0, domid]
    physinfo = await xc.physinfo()
    assert physinfo.nr_cpus >= 1 and physinfo.total_pages > 0
    await xc.destroy(domid)
    assert [d.domain for d in await xc.list_domains()] == [0]


async def test_the_hypervisor_takes_the_fds_it_holds_and_domains_keep_the_usual_limit(
    hv: Hypervisor, xc: XenControl
) -> None:
    """A file per granted frame of every domain is held in the hypervisor, so it takes
    all the kernel allows (as root); a domain's process gets the limit it started with."""
    domid = await xc.create_domain("tests.kernels:sleeper", memory_mb=4)
    await xc.unpause(domid)
    await wait_for_log(xc, f"(d{domid}) sleeping")
    pid = hv.domains[domid].process.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    started = hv._child_nofile
    assert re.search(rf"Max open files\s+{started[1]}\s+{started[1]}", limits), limits
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard >= started[1]  # all it may: up to fs.nr_open with CAP_SYS_RESOURCE
    await xc.destroy(domid)


async def test_a_raising_or_detaching_listener_does_not_make_the_next_one_skipped(
    hv: Hypervisor, xc: XenControl
) -> None:
    """The dispatcher drops a listener that raises, and a listener may detach itself
    (trace readers do): neither may hide the hypercall from the listener after it."""
    seen: list[str] = []

    class Raising:
        def hypercall(self, *call: object) -> None:
            seen.append("raising")
            raise RuntimeError("a broken listener")

    class Detaching:
        def hypercall(self, *call: object) -> None:
            seen.append("detaching")
            hv.listeners.remove(self)

    class Recording:
        def __init__(self, name: str) -> None:
            self.name = name

        def hypercall(self, *call: object) -> None:
            seen.append(self.name)

    raising, detaching = Raising(), Detaching()
    after_raising, after_detaching = Recording("after raising"), Recording("after detaching")
    hv.listeners[:] = [raising, after_raising, detaching, after_detaching]
    await xc.physinfo()
    assert seen == ["raising", "after raising", "detaching", "after detaching"]
    assert hv.listeners == [after_raising, after_detaching]
    seen.clear()
    await xc.physinfo()
    assert seen == ["after raising", "after detaching"]


def test_the_hypercall_table_is_built_from_the_listed_subsystems() -> None:
    """Each subsystem contributes its handlers under Xen's names, and marking a
    handler registers nothing until its module is installed."""
    names = {entry.name for entry in xenlike.hypervisor.HYPERCALLS}
    for subsystem in xenlike.hypervisor.SUBSYSTEMS:
        assert handlers(subsystem), f"{subsystem.__name__} handles no hypercall"
        assert {entry.name for entry in handlers(subsystem)} <= names
    assert {"event_channel_op.send", "grant_table_op.map_grant_ref", "sysctl.physinfo"} <= names
    assert "sysctl.xenlike_trace_buffers" in names

    @xenlike.hypervisor.hypercall(Hypercall.sched_op, 99, name="unlisted")
    def unlisted(call: xenlike.hypervisor.Call, arg: None) -> int:
        return 0

    assert "sched_op.unlisted" not in {e.name for e in xenlike.hypervisor.HYPERCALLS}
    table = HypercallTable()
    table.install([xenlike.hypervisor.platform])
    with pytest.raises(ValueError, match="already registered"):
        table.install([xenlike.hypervisor.platform])
