"""Small domain kernels the hypervisor tests boot as real processes.

Each reports through the hypervisor log (console_io), which the test reads
back with CONSOLEIO_read, as `xl dmesg` does. Parameters come in on the
kernel command line (start_info.cmd_line) as key=value words.
"""

import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from xenlike.abi.domctl import DomctlOp, xen_domctl_getdomaininfo
from xenlike.abi.event_channel import EvtchnOp, EvtchnStat
from xenlike.abi.sched import SchedOp, sched_remote_shutdown
from xenlike.abi.sysctl import SysctlOp, xen_sysctl_physinfo
from xenlike.abi.version import XenVerOp
from xenlike.abi.xen import DOMID_IO, DOMID_SELF, CONSOLEIO_read, CONSOLEIO_write, Hypercall, Virq
from xenlike.domain import Domain, GrantInUse, GrantMapping, memory_op
from xenlike.domain.evtchn import ALLOC_UNBOUND, BIND_VIRQ, CLOSE, SEND, STATUS
from xenlike.domain.evtchn import BIND_INTERDOMAIN as BIND
from xenlike.domain.hypercall import HypercallResult, codec_for
from xenlike.hypercall import HYPERCALL_MAX_MESSAGE, HypercallError


def params(domain: Domain) -> dict[str, str]:
    return dict(word.split("=", 1) for word in domain.cmdline.split())


async def hello(domain: Domain) -> None:
    await domain.console_write(f"hello from d{domain.domid}, {domain.start_info.nr_pages} pages")


async def dumpable(domain: Domain) -> None:
    """Report PR_GET_DUMPABLE: every domain process turns it off as it boots."""
    import ctypes

    pr_get_dumpable = 3
    value = ctypes.CDLL(None).prctl(pr_get_dumpable, 0, 0, 0, 0)
    await domain.console_write(f"dumpable={value}")


async def crash(domain: Domain) -> None:
    raise RuntimeError("this kernel crashes on purpose")


async def sleeper(domain: Domain) -> None:
    await domain.console_write("sleeping")
    await trio.sleep_forever()


async def ping(domain: Domain) -> None:
    """Owns port `port` (allocated for the peer by Dom0); answers `rounds` pings."""
    p = params(domain)
    port = await domain.evtchn.port(int(p["port"]))
    await domain.console_write("ping ready")
    for _ in range(int(p["rounds"])):
        await port.wait()
        port.notify()
    await domain.console_write(f"ping done after {p['rounds']} rounds")


async def pong(domain: Domain) -> None:
    """Binds to the ping domain's port and drives `rounds` round trips."""
    p = params(domain)
    port = await domain.evtchn.bind_interdomain(int(p["peer"]), int(p["port"]))
    await port.wait()  # Xen leaves a freshly bound port pending
    for _ in range(int(p["rounds"])):
        port.notify()
        await port.wait()
    await domain.console_write(f"pong done after {p['rounds']} rounds")


# --- hostile guests and ballooning (test_hypercall_hostile.py, test_memory_op.py) ---
#
# Each reports one line, "<tag> name=value ...", where a value is a result or
# the Xen errno name a refused call came back with.

EVTCHN_OP = Hypercall.event_channel_op


async def outcome(call: Awaitable[Any]) -> str:
    """A call's result, or the errno name it was refused with."""
    try:
        done = await call
    except HypercallError as exc:
        return getattr(exc.errno, "name", str(exc.errno))
    if isinstance(done, HypercallResult):
        return str(done.result)
    return str(done) if isinstance(done, int) else "ok"


async def report(domain: Domain, tag: str, results: dict[str, Any]) -> None:
    await domain.console_write(tag + " " + " ".join(f"{k}={v}" for k, v in results.items()))


def evtchn(domain: Domain, cmd: int, codec: Any, **fields: int) -> Awaitable[Any]:
    """A raw EVTCHNOP, so a refusal is seen rather than handled by the Port API."""
    return domain.hypercalls.call(EVTCHN_OP, cmd, codec.pack(codec.record(**fields)), 1)


async def privileged_ops(domain: Domain) -> None:
    """A DomU trying Dom0's hypercalls: every one must come back EPERM."""
    hc = domain.hypercalls
    info = codec_for(xen_domctl_getdomaininfo).record()
    results = {
        "getdomaininfo": await outcome(
            hc.domctl(DomctlOp.getdomaininfo, 0, xen_domctl_getdomaininfo, info)
        ),
        "destroydomain": await outcome(hc.domctl(DomctlOp.destroydomain, 0)),
        "pausedomain": await outcome(hc.domctl(DomctlOp.pausedomain, 0)),
        "createdomain": await outcome(hc.domctl(DomctlOp.createdomain, 0)),
        "physinfo": await outcome(
            hc.sysctl(
                SysctlOp.physinfo, xen_sysctl_physinfo, codec_for(xen_sysctl_physinfo).record()
            )
        ),
        "remote_shutdown": await outcome(
            hc.call_struct(
                Hypercall.sched_op,
                SchedOp.remote_shutdown,
                sched_remote_shutdown,
                codec_for(sched_remote_shutdown).record(domain_id=0, reason=0),
            )
        ),
        "console_read": await outcome(hc.call(Hypercall.console_io, CONSOLEIO_read)),
        "alloc_unbound_for_dom0": await outcome(
            evtchn(domain, EvtchnOp.alloc_unbound, ALLOC_UNBOUND, dom=0, remote_dom=0)
        ),
        "status_of_dom0": await outcome(evtchn(domain, EvtchnOp.status, STATUS, dom=0, port=1)),
        "current_reservation_of_dom0": await outcome(memory_op.current_reservation(hc, 0)),
        "decrease_dom0": await outcome(memory_op.decrease_reservation(hc, [100], domid=0)),
    }
    await report(domain, "privileged", results)


async def evtchn_abuse(domain: Domain) -> None:
    """Bad event channel calls: closed, unbound, foreign and dead-domain ports."""
    p = params(domain)
    dead, other, other_port = int(p["dead"]), int(p["other"]), int(p["other_port"])
    results: dict[str, str] = {}
    results["send_never_opened"] = await outcome(evtchn(domain, EvtchnOp.send, SEND, port=77))
    unbound = await domain.evtchn.alloc_unbound(0)
    results["send_unbound"] = await outcome(
        evtchn(domain, EvtchnOp.send, SEND, port=unbound.number)
    )
    await unbound.close()
    results["send_closed"] = await outcome(evtchn(domain, EvtchnOp.send, SEND, port=unbound.number))
    results["close_closed"] = await outcome(
        evtchn(domain, EvtchnOp.close, CLOSE, port=unbound.number)
    )
    results["status_out_of_range"] = await outcome(
        evtchn(domain, EvtchnOp.status, STATUS, dom=DOMID_SELF, port=5000)
    )
    results["bind_dead"] = await outcome(
        evtchn(domain, EvtchnOp.bind_interdomain, BIND, remote_dom=dead, remote_port=1)
    )
    results["bind_reserved_domid"] = await outcome(
        evtchn(domain, EvtchnOp.bind_interdomain, BIND, remote_dom=DOMID_IO, remote_port=1)
    )
    results["bind_not_offered"] = await outcome(
        evtchn(domain, EvtchnOp.bind_interdomain, BIND, remote_dom=other, remote_port=other_port)
    )
    results["bind_missing_port"] = await outcome(
        evtchn(domain, EvtchnOp.bind_interdomain, BIND, remote_dom=other, remote_port=999)
    )
    results["alloc_for_other"] = await outcome(
        evtchn(domain, EvtchnOp.alloc_unbound, ALLOC_UNBOUND, dom=other, remote_dom=0)
    )
    results["bind_virq_bad"] = await outcome(
        evtchn(domain, EvtchnOp.bind_virq, BIND_VIRQ, virq=99, vcpu=0)
    )
    results["bind_virq_vcpu1"] = await outcome(
        evtchn(domain, EvtchnOp.bind_virq, BIND_VIRQ, virq=Virq.DEBUG, vcpu=1)
    )
    results["short_struct"] = await outcome(
        domain.hypercalls.call(EVTCHN_OP, EvtchnOp.send, b"\x01\x00", 1)
    )
    await report(domain, "evtchn_abuse", results)


async def port_flood(domain: Domain) -> None:
    """Asks for `count` event channels: the table fills, the rest are ENOSPC."""
    count = int(params(domain)["count"])
    request = ALLOC_UNBOUND.pack(ALLOC_UNBOUND.record(dom=DOMID_SELF, remote_dom=0))
    outcomes: dict[str, int] = {}
    ports: list[int] = []
    for _ in range(count):
        try:
            done = await domain.hypercalls.call(EVTCHN_OP, EvtchnOp.alloc_unbound, request, 1)
        except HypercallError as exc:
            outcomes[exc.errno.name] = outcomes.get(exc.errno.name, 0) + 1
            continue
        for fd in done.fds:
            os.close(fd)
        ports.append(ALLOC_UNBOUND.unpack(done.payload).port)
    freed = ports[len(ports) // 2]
    await evtchn(domain, EvtchnOp.close, CLOSE, port=freed)
    again = await evtchn(
        domain, EvtchnOp.alloc_unbound, ALLOC_UNBOUND, dom=DOMID_SELF, remote_dom=0
    )
    for fd in again.fds:
        os.close(fd)
    await report(
        domain,
        "flood",
        {
            "ok": len(ports),
            "highest": max(ports),
            **{k: v for k, v in sorted(outcomes.items())},
            "freed": freed,
            "again": ALLOC_UNBOUND.unpack(again.payload).port,
            "version": await outcome(
                domain.hypercalls.call(Hypercall.xen_version, XenVerOp.version)
            ),
        },
    )
    await trio.sleep_forever()


async def hammer(domain: Domain) -> None:
    """Hypercalls for ever, `pause` seconds apart (none: back to back), logging progress
    every `every` rounds."""
    p = params(domain)
    every, pause = int(p.get("every", "200")), float(p.get("pause", "0"))
    rounds = 0
    await domain.console_write("hammering")
    while True:
        if pause:
            await trio.sleep(pause)
        await domain.hypercalls.call(Hypercall.xen_version, XenVerOp.version)
        port = await domain.evtchn.alloc_unbound(0)
        await port.status()
        await port.close()
        await memory_op.current_reservation(domain.hypercalls)
        rounds += 1
        if rounds % every == 0:
            await domain.console_write(f"alive {rounds}")


# The fuzzer may not shut itself down: that is a legitimate call, not garbage; nor write
# to the console: its writes are rate-limited, and would leave no room for its report.
FUZZ_SKIP = {
    (Hypercall.sched_op, SchedOp.shutdown),
    (Hypercall.sched_op, SchedOp.shutdown_code),
    (Hypercall.console_io, CONSOLEIO_write),
}


async def fuzz(domain: Domain) -> None:
    """Seeded garbage through every registered hypercall and some that do not exist."""
    from xenlike.hypervisor import HYPERCALLS

    p = params(domain)
    rng = random.Random(int(p["seed"]))
    entries = [e for e in HYPERCALLS if (e.op, e.cmd) not in FUZZ_SKIP]
    tally: dict[str, int] = {}
    for _ in range(int(p["calls"])):
        entry = rng.choice(entries)
        op, cmd = entry.op, entry.cmd
        size = entry.args.size if entry.args is not None else 8
        shape = rng.randrange(5)
        if shape == 0:  # the right size, random contents
            payload, count = rng.randbytes(size), 1
        elif shape == 1:  # a wrong size
            payload = rng.randbytes(rng.randrange(0, 3 * size + 1))
            count = rng.choice([0, 1, 2, len(payload)])
        elif shape == 2:  # an absurd count
            payload, count = rng.randbytes(size), rng.choice([2**32 - 1, 2**31, 100_000])
        elif shape == 3:  # no such sub-op or hypercall
            op, cmd = rng.choice([(op, rng.randrange(2**32)), (rng.randrange(56, 2**32), cmd)])
            payload, count = rng.randbytes(rng.randrange(64)), 1
        else:  # a large message, near the limit
            payload = rng.randbytes(rng.randrange(32 * 1024, HYPERCALL_MAX_MESSAGE - 16))
            count = len(payload)
        try:
            done = await domain.hypercalls.call(op, cmd, payload, count)
        except HypercallError as exc:
            key = getattr(exc.errno, "name", str(exc.errno))
        else:
            key = "ok"
            for fd in done.fds:
                os.close(fd)
        tally[key] = tally.get(key, 0) + 1
    await report(domain, "fuzz", dict(sorted(tally.items())))


async def balloon(domain: Domain) -> None:
    """Balloons `out` frames out, half of them back in, the rest by increase_reservation,
    then `hold` frames out for good; reports tot_pages and the memfd's blocks on the way."""
    p = params(domain)
    out, hold = int(p["out"]), int(p["hold"])
    hc = domain.hypercalls

    def blocks() -> int:  # the memfd is shared: the guest sees what the host spends
        return os.fstat(domain.memory.fd).st_blocks

    frames = [domain.allocator.allocate() for _ in range(out)]
    for gfn in frames:
        with domain.memory.frame(gfn) as page:
            page[:] = b"\xa5" * len(page)
    results: dict[str, Any] = {
        "tot": await memory_op.current_reservation(hc),
        "max": await memory_op.maximum_reservation(hc),
        "blocks": blocks(),
    }
    results["out"] = await memory_op.decrease_reservation(hc, frames)
    results["tot_out"] = await memory_op.current_reservation(hc)
    results["blocks_out"] = blocks()
    half = sorted(frames)[: out // 2]
    results["in"] = await memory_op.populate_physmap(hc, half)
    results["again"] = await memory_op.populate_physmap(hc, half[:1])  # populated: refused
    gained = await memory_op.increase_reservation(hc, out)  # only out - out//2 are free
    results["increased"] = len(gained)
    results["increased_match"] = sorted(gained) == sorted(frames)[out // 2 :]
    results["tot_in"] = await memory_op.current_reservation(hc)
    results["zeroed"] = all(not any(domain.memory.frame(gfn)) for gfn in frames)
    results["held"] = await memory_op.decrease_reservation(hc, sorted(frames)[:hold])
    results["tot_held"] = await memory_op.current_reservation(hc)
    await report(domain, "balloon", results)
    await trio.sleep_forever()


async def holder(domain: Domain) -> None:
    """Takes port `port` (allocated by Dom0 for a peer), balloons `out` frames out, sleeps."""
    p = params(domain)
    await domain.evtchn.port(int(p["port"]))
    frames = [domain.allocator.allocate() for _ in range(int(p["out"]))]
    done = await memory_op.decrease_reservation(domain.hypercalls, frames)
    await domain.console_write(f"holder ready, {done} frames out")
    await trio.sleep_forever()


async def peer_watch(domain: Domain) -> None:
    """Binds to (peer, port), then watches its own end until the peer is gone."""
    p = params(domain)
    port = await domain.evtchn.bind_interdomain(int(p["peer"]), int(p["port"]))
    await domain.console_write(f"watching local port {port.number}")
    while True:
        status = await port.status()
        if status.status != EvtchnStat.interdomain:
            break
        await trio.sleep(0.01)
    remote = int.from_bytes(status.u[:2], "little")
    await domain.console_write(
        f"peer gone: port {port.number} {EvtchnStat(status.status).name} for d{remote}"
    )
    await trio.sleep_forever()


# --- grant tables (test_grant_table.py) ---------------------------------------
#
# A scripted kernel waits for an event on its `step` port (bound by the test,
# acting as Dom0) before each action of its `script`, and logs
# "step N action: result"; once the script is done, the kernel returns.


async def run_script(domain: Domain, actions: dict[str, Callable[[], Awaitable[str]]]) -> None:
    p = params(domain)
    step = await domain.evtchn.port(int(p["step"]))
    for number, name in enumerate(p["script"].split(","), 1):
        await step.wait()
        try:
            result = await actions[name]()
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        await domain.console_write(f"step {number} {name}: {result}")


def page_text(page: memoryview) -> str:
    return bytes(page[:32]).rstrip(b".").decode()


async def granter(domain: Domain) -> None:
    """Grants `pages` pages to `peer` (read-only with readonly=1), each saying whose
    page it is, and keeps a secret in the page after them; actions: `end` (end
    access to every grant not yet ended), `read`, `rewrite` (new text in every
    granted page)."""
    p = params(domain)
    peer, readonly = int(p["peer"]), p.get("readonly") == "1"
    gfns = [domain.allocator.allocate_run(int(p["pages"]) + 1) + i for i in range(int(p["pages"]))]
    with domain.memory.frame(gfns[-1] + 1) as page:
        page[:32] = f"secret of d{domain.domid}".encode().ljust(32, b".")
    for index, gfn in enumerate(gfns):
        with domain.memory.frame(gfn) as page:
            page[:32] = f"d{domain.domid} page {index}".encode().ljust(32, b".")
    refs = [domain.grants.grant_access(peer, gfn, readonly=readonly) for gfn in gfns]
    live = list(refs)
    await domain.console_write(f"granted refs={','.join(map(str, refs))}")

    async def end() -> str:
        results = []
        for ref in list(live):
            try:
                domain.grants.end_access(ref)
            except GrantInUse:
                results.append(f"{ref} in use")
            else:
                live.remove(ref)
                results.append(f"{ref} ended")
        return ", ".join(results)

    async def read() -> str:
        texts = []
        for gfn in gfns:
            with domain.memory.frame(gfn) as page:
                texts.append(page_text(page))
        return " | ".join(texts)

    async def rewrite() -> str:
        for index, gfn in enumerate(gfns):
            with domain.memory.frame(gfn) as page:
                page[:32] = f"d{domain.domid} page {index} rewritten".encode().ljust(32, b".")
        return "ok"

    await run_script(domain, {"end": end, "read": read, "rewrite": rewrite})


async def mapper(domain: Domain) -> None:
    """Maps `refs` of `peer` (read-only with readonly=1); actions: `map`, `write`
    (into the newest mapping), `read` and `unmap` (the oldest mapping)."""
    p = params(domain)
    peer, readonly = int(p["peer"]), p.get("readonly") == "1"
    refs = [int(ref) for ref in p["refs"].split(",")]
    mappings: list[GrantMapping] = []

    def contents(mapping: GrantMapping) -> str:
        return " | ".join(page_text(mapping.page(i)) for i in range(len(refs)))

    async def map_() -> str:
        mappings.append(await domain.grants.map(peer, refs, readonly=readonly))
        return contents(mappings[-1])

    async def write() -> str:
        for index in range(len(refs)):
            mappings[-1].page(index)[:32] = f"written by d{domain.domid}".encode().ljust(32, b".")
        return "ok"

    async def read() -> str:
        return contents(mappings[0])

    async def unmap() -> str:
        await domain.grants.unmap(mappings.pop(0))
        return "ok"

    await run_script(domain, {"map": map_, "write": write, "read": read, "unmap": unmap})


async def grant_thief(domain: Domain) -> None:
    """A hostile mapper of `refs` of `peer`: maps them with raw hypercalls and keeps
    every file the hypervisor hands it, to reach more than it was granted.

    Actions: `steal` (map, then try everything on the files), `unmap` (the
    hypercall only: the files and their mmaps stay), `peek` (read through what
    it kept), `scribble` (write through what it kept).
    """
    import errno as _errno
    import mmap as _mmap

    from xenlike.abi.grant_table import (
        GNTMAP_host_map,
        GNTMAP_readonly,
        GnttabOp,
        gnttab_map_grant_ref,
        gnttab_unmap_grant_ref,
    )

    p = params(domain)
    peer, readonly = int(p["peer"]), p.get("readonly") == "1"
    refs = [int(ref) for ref in p["refs"].split(",")]
    flags = GNTMAP_host_map | (GNTMAP_readonly if readonly else 0)
    kept: list[tuple[int, _mmap.mmap]] = []
    handles: list[int] = []

    def attempt(action: Callable[[], Any]) -> str:
        try:
            action()
        except OSError as exc:
            return _errno.errorcode.get(exc.errno, str(exc.errno))
        return "allowed"

    def peer_memfds() -> list[int]:
        """Every fd of ours on the peer's memory or its frames."""
        found = []
        for name in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                continue
            if target.startswith(f"/memfd:xenlike-d{peer}"):
                found.append(int(name))
        return found

    async def steal() -> str:
        _, outs, fds = await domain.hypercalls.call_batch(
            Hypercall.grant_table_op,
            GnttabOp.map_grant_ref,
            gnttab_map_grant_ref,
            [(0, flags, ref, peer, 0, 0, 0) for ref in refs],
        )
        handles.extend(out.handle for out in outs)
        sizes = sorted({os.fstat(fd).st_size for fd in peer_memfds()})
        fd = fds[0]
        writable_map = attempt(
            lambda: _mmap.mmap(
                fd, 4096, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE
            ).close()
        )
        pwrite = attempt(lambda: os.pwrite(fd, b"stolen", 0))
        beyond = len(os.pread(fd, 4096, 4096))  # bytes of the granter past the page
        for fd in fds:
            kept.append((fd, _mmap.mmap(fd, 4096, _mmap.MAP_SHARED, _mmap.PROT_READ)))
        return (
            f"files={len(fds)} sizes={sizes} writable_map={writable_map} pwrite={pwrite} "
            f"beyond={beyond} page={page_text(memoryview(kept[0][1]))}"
        )

    async def unmap() -> str:
        _, outs, _ = await domain.hypercalls.call_batch(
            Hypercall.grant_table_op,
            GnttabOp.unmap_grant_ref,
            gnttab_unmap_grant_ref,
            [(0, 0, handle, 0) for handle in handles],
        )
        return ",".join(str(out.status) for out in outs)

    async def peek() -> str:
        return " | ".join(
            f"{page_text(memoryview(mapping))} / {os.pread(fd, 32, 0).rstrip(b'.').decode()}"
            for fd, mapping in kept
        )

    async def scribble() -> str:
        return " | ".join(
            attempt(lambda fd=fd: os.pwrite(fd, b"scribbled".ljust(32, b"."), 0)) for fd, _ in kept
        )

    await run_script(domain, {"steal": steal, "unmap": unmap, "peek": peek, "scribble": scribble})


async def frame_vandal(domain: Domain) -> None:
    """Sends the hypervisor what a hostile guest can up its frame channel: a file it
    then truncates (a SIGBUS for whoever had mapped it), one for its grant table,
    a message whose gfns and files do not pair up, and more files than allowed;
    then grants the frame whose file was refused and says so."""
    import fcntl as _fcntl
    import socket as _socket

    from xenlike.frames import frame_file, send_frames
    from xenlike.hypervisor.frames import MAX_FRAME_FILES

    channel = domain.grants._frames
    gfn = domain.allocator.allocate()
    loose = os.memfd_create("xenlike-vandal", os.MFD_ALLOW_SEALING)
    os.ftruncate(loose, 4096)
    send_frames(channel, [(gfn, loose), (domain.layout.grant_table_gfn, loose)])
    os.ftruncate(loose, 0)
    _fcntl.fcntl(loose, _fcntl.F_ADD_SEALS, _fcntl.F_SEAL_SEAL)
    channel.sendmsg(
        [bytes(16)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, loose.to_bytes(4, "little"))]
    )
    page = frame_file("xenlike-vandal-page", bytes(4096))
    first = domain.layout.first_free_gfn
    for start in range(first, first + MAX_FRAME_FILES + 64, 200):
        send_frames(
            channel,
            [
                (g, page)
                for g in range(start, start + 200)
                if g < domain.start_info.nr_pages and g != gfn
            ],
        )
    os.close(page)
    os.close(loose)
    with domain.memory.frame(gfn) as view:
        view[:5] = b"still"
    await domain.console_write(
        f"vandal done; gfn {gfn:#x} reads {bytes(domain.memory.frame(gfn)[:5]).decode()}"
    )
    await trio.sleep_forever()


async def store_vandal(domain: Domain) -> None:
    """Writes an impossible req_prod into its XenStore ring page and tells xenstored.

    xenstored must give up on this guest's ring (error = XENSTORE_ERROR_RINGIDX)
    and go on serving everyone else.
    """
    import struct as _struct

    from xenlike.abi._layout import offsetof
    from xenlike.abi.xs_wire import xenstore_domain_interface as xs_page

    port = await domain.evtchn.port(domain.start_info.store_evtchn)
    with domain.memory.frame(domain.layout.store_gfn) as page:
        cons = _struct.unpack_from("<I", page, offsetof(xs_page, "req_cons"))[0]
        _struct.pack_into("<I", page, offsetof(xs_page, "req_prod"), cons + 5000)
        port.notify()
        with trio.move_on_after(10):
            while not _struct.unpack_from("<I", page, offsetof(xs_page, "error"))[0]:
                await trio.sleep(0.02)
        error = _struct.unpack_from("<I", page, offsetof(xs_page, "error"))[0]
    await domain.console_write(f"store vandal: ring error {error}")
    await trio.sleep_forever()
