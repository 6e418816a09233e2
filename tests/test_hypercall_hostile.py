"""Hostile callers: each gets Xen's errno, and the hypervisor keeps serving everyone else.

After every abuse a fresh Dom0 connection makes a healthy call (`healthy`),
so a hypervisor that fell over, or stopped serving, fails the test. The
guests here are real domain processes (tests/kernels.py) reporting what
their calls came back with through the hypervisor log.
"""

import errno
import os
import random
import signal
import socket
import struct
from collections import Counter

import pytest
import trio
import trio.testing

from tests.conftest import DomainConnector
from tests.test_hypervisor import wait_for_log, wait_for_shutdown
from xenlike.abi.domctl import DomctlOp, xen_domctl_createdomain
from xenlike.abi.errno import Errno
from xenlike.abi.event_channel import (
    EvtchnOp,
    EvtchnStat,
    evtchn_bind_interdomain,
    evtchn_bind_virq,
    evtchn_status,
)
from xenlike.abi.sched import ShutdownReason
from xenlike.abi.version import XenVerOp
from xenlike.abi.xen import DOMID_INVALID, CONSOLEIO_write, Hypercall, Virq
from xenlike.codec import compile_struct
from xenlike.domain import memory_op
from xenlike.domain.hypercall import codec_for
from xenlike.hypercall import (
    ANCILLARY_SPACE,
    HYPERCALL_MAX_MESSAGE,
    HypercallError,
    MessageKind,
    Notification,
    Reply,
    Request,
    fds_ancillary,
    fds_received,
)
from xenlike.hypervisor import Hypervisor
from xenlike.hypervisor.core import XEN_VERSION, HypercallConnection
from xenlike.xc import XenControl

EVTCHN_OP = Hypercall.event_channel_op
STATUS = compile_struct(evtchn_status, "evtchn_status")
VERSION = XEN_VERSION[0] << 16 | XEN_VERSION[1]
PAGES = 1024


async def healthy(hv: Hypervisor) -> None:
    """A new Dom0 connection is served in full: the hypervisor is up for everyone."""
    async with XenControl.connect(hv.run_dir) as other:
        done = await other.hypercalls.call(Hypercall.xen_version, XenVerOp.version)
        assert done.result == VERSION
        assert 0 in [info.domain for info in await other.list_domains()]
    assert "failed:" not in "\n".join(hv.log_lines), "a handler raised instead of refusing"


def reported(log: str, tag: str) -> dict[str, str]:
    """The `tag k=v ...` line a test kernel wrote to the log."""
    line = log[log.index(f") {tag} ") + len(tag) + 3 :].split("\n", 1)[0]
    return dict(word.split("=", 1) for word in line.split())


async def errno_of(call: object) -> Errno:
    with pytest.raises(HypercallError) as refused:
        await call  # type: ignore[misc]
    return refused.value.errno


async def status(xc: XenControl, domid: int, port: int) -> tuple[EvtchnStat, int]:
    """EVTCHNOP_status as Dom0 asks it: the state, and the domain at the other end."""
    _, out, _ = await xc.hypercalls.call_struct(
        EVTCHN_OP, EvtchnOp.status, evtchn_status, STATUS.record(dom=domid, port=port)
    )
    return EvtchnStat(out.status), int.from_bytes(out.u[:2], "little")


async def boot(xc: XenControl, kernel: str, cmdline: str = "") -> int:
    domid = await xc.create_domain(f"tests.kernels:{kernel}", memory_mb=4, cmdline=cmdline)
    await xc.unpause(domid)
    return domid


# --- raw bytes on the control socket ----------------------------------------


class RawClient:
    """A hostile process on the control socket: any bytes, any descriptors."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, hv: Hypervisor) -> "RawClient":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        await sock.connect(str(hv.control_path))
        return cls(sock)

    async def exchange(self, message: bytes, fds: tuple[int, ...] = ()) -> Reply:
        await self.sock.sendmsg([message], fds_ancillary(fds))
        with trio.fail_after(5):
            data, ancdata, _, _ = await self.sock.recvmsg(
                HYPERCALL_MAX_MESSAGE + 1, ANCILLARY_SPACE
            )
        return Reply.decode(data, fds_received(ancdata))

    def close(self) -> None:
        self.sock.close()


def request(
    op: int, cmd: int, payload: bytes = b"", count: int | None = None, seq: int = 7
) -> bytes:
    return Request(seq, op, cmd, len(payload) if count is None else count, payload).encode()


async def test_garbage_frames_get_errors_with_the_callers_sequence_number(hv: Hypervisor) -> None:
    raw = await RawClient.connect(hv)
    for size in range(1, 16):  # shorter than a request header
        reply = await raw.exchange(b"\xff" * size)
        assert (reply.seq, reply.result) == (0, -Errno.EINVAL)
    cases = {
        request(999, 0): -Errno.ENOSYS,
        request(Hypercall.xen_version, 0xFFFF): -Errno.ENOSYS,
        request(Hypercall.xen_version, XenVerOp.version, b"x"): -Errno.EINVAL,
        request(EVTCHN_OP, EvtchnOp.status, bytes(STATUS.size), count=0): -Errno.EINVAL,
        request(EVTCHN_OP, EvtchnOp.status, bytes(STATUS.size), count=2): -Errno.E2BIG,
        request(EVTCHN_OP, EvtchnOp.status, bytes(STATUS.size - 1), count=1): -Errno.EINVAL,
        request(EVTCHN_OP, EvtchnOp.status, bytes(STATUS.size), count=2**32 - 1): -Errno.E2BIG,
        request(Hypercall.console_io, CONSOLEIO_write, b"hello", count=6): -Errno.EINVAL,
    }
    for message, result in cases.items():
        reply = await raw.exchange(message)
        assert (reply.seq, reply.result, reply.payload) == (7, result, b"")
    rng = random.Random(1)
    for seq in range(500):
        noise = rng.randbytes(rng.randrange(0, 300))
        reply = await raw.exchange(
            request(
                rng.randrange(56, 2**32), rng.randrange(2**32), noise, rng.randrange(2**32), seq
            )
        )
        assert (reply.seq, reply.result) == (seq, -Errno.ENOSYS)
    raw.close()
    await healthy(hv)


async def test_messages_over_64k_are_refused_and_the_limit_itself_is_read_whole(
    hv: Hypervisor,
) -> None:
    raw = await RawClient.connect(hv)
    for size in (HYPERCALL_MAX_MESSAGE + 1, 128 * 1024):
        reply = await raw.exchange(b"\0" * size)
        assert reply.result == -Errno.E2BIG
    at_limit = request(
        Hypercall.xen_version, XenVerOp.version, b"\0" * (HYPERCALL_MAX_MESSAGE - 16)
    )
    assert len(at_limit) == HYPERCALL_MAX_MESSAGE
    reply = await raw.exchange(at_limit)
    assert (reply.seq, reply.result) == (7, -Errno.EINVAL)  # xen_version takes no arguments
    reply = await raw.exchange(request(Hypercall.xen_version, XenVerOp.version))
    assert reply.result == VERSION  # the connection is still in step
    raw.close()
    await healthy(hv)


async def test_descriptors_sent_to_the_hypervisor_are_closed(hv: Hypervisor) -> None:
    """The hypervisor runs in this process: a pipe's write end it kept would hold off EOF."""
    raw = await RawClient.connect(hv)
    read_end, write_end = os.pipe()
    for count in (3, 20):  # 20 is more than a reply's ancillary space: the kernel drops the rest
        reply = await raw.exchange(
            request(Hypercall.xen_version, XenVerOp.version), (write_end,) * count
        )
        assert reply.result == VERSION and reply.fds == ()
    os.close(write_end)
    assert os.read(read_end, 1) == b""
    os.close(read_end)
    raw.close()
    await healthy(hv)


async def test_an_empty_message_or_a_hang_up_drops_only_that_connection(hv: Hypervisor) -> None:
    raw = await RawClient.connect(hv)
    await raw.sock.send(b"")  # a zero-length datagram reads as end of stream
    with trio.fail_after(5):
        assert await raw.sock.recv(64) == b""
    raw.close()
    raw = await RawClient.connect(hv)
    await raw.sock.send(request(Hypercall.xen_version, XenVerOp.version))
    raw.sock.shutdown(socket.SHUT_WR)  # then hang up before reading the answer
    raw.close()
    await healthy(hv)


async def test_a_client_that_never_reads_its_replies_stalls_only_itself(hv: Hypervisor) -> None:
    raw = await RawClient.connect(hv)
    message = request(Hypercall.xen_version, XenVerOp.capabilities)
    sent = 0
    with trio.fail_after(30):
        while True:  # until both socket buffers are full: the hypervisor stopped reading
            try:
                os.write(raw.sock.fileno(), message)
                sent += 1
                continue
            except BlockingIOError:
                await trio.testing.wait_all_tasks_blocked()  # it has read what it will
            try:
                os.write(raw.sock.fileno(), message)
                sent += 1
            except BlockingIOError:
                break
    assert sent > 100
    await healthy(hv)
    raw.close()
    await healthy(hv)


# --- Dom0 naming domains that are not there ---------------------------------


async def test_wrong_domids_from_dom0(hv: Hypervisor, xc: XenControl) -> None:
    missing = 4321
    assert await errno_of(status(xc, missing, 1)) == Errno.ESRCH
    assert await errno_of(xc.alloc_unbound(missing, 0)) == Errno.ESRCH
    assert await errno_of(xc.pause(missing)) == Errno.ESRCH
    assert await errno_of(xc.destroy(missing)) == Errno.ESRCH
    assert await errno_of(xc.shutdown(missing)) == Errno.ESRCH
    assert await errno_of(xc.domain_info(missing)) == Errno.ESRCH
    assert await errno_of(memory_op.current_reservation(xc.hypercalls, missing)) == Errno.ESRCH
    assert await errno_of(xc.destroy(0)) == Errno.EPERM
    bind = codec_for(evtchn_bind_interdomain)
    for remote in (missing, DOMID_INVALID):
        assert (
            await errno_of(
                xc.hypercalls.call_struct(
                    EVTCHN_OP,
                    EvtchnOp.bind_interdomain,
                    evtchn_bind_interdomain,
                    bind.record(remote_dom=remote, remote_port=1),
                )
            )
            == Errno.ESRCH
        )
    await healthy(hv)


# --- hostile guests ---------------------------------------------------------


async def test_a_domu_calling_dom0_hypercalls_gets_eperm(hv: Hypervisor, xc: XenControl) -> None:
    domid = await boot(xc, "privileged_ops")
    results = reported(await wait_for_log(xc, ") privileged "), "privileged")
    assert results.pop("decrease_dom0") == "0"  # reservation ops refuse by doing nothing
    assert results == dict.fromkeys(results, "EPERM")
    assert len(results) == 10
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.poweroff
    dom0 = await xc.domain_info(0)
    assert not dom0.flags & 1 << 1  # XEN_DOMINF_shutdown
    await healthy(hv)


async def test_event_channel_abuse_gets_xens_errnos(hv: Hypervisor, xc: XenControl) -> None:
    dead = await xc.createdomain()
    await xc.destroy(dead)
    other = await xc.create_domain("tests.kernels:sleeper", memory_mb=4)
    offered = await xc.alloc_unbound(other, remote_dom=0)  # offered to Dom0, not to the abuser
    domid = await boot(xc, "evtchn_abuse", f"dead={dead} other={other} other_port={offered}")
    results = reported(await wait_for_log(xc, ") evtchn_abuse "), "evtchn_abuse")
    assert results == {
        "send_never_opened": "EINVAL",
        "send_unbound": "0",  # Xen drops a send on an unbound port silently
        "send_closed": "EINVAL",
        "close_closed": "EINVAL",
        "status_out_of_range": "EINVAL",
        "bind_dead": "ESRCH",
        "bind_reserved_domid": "ESRCH",
        "bind_not_offered": "EINVAL",
        "bind_missing_port": "EINVAL",
        "alloc_for_other": "EPERM",
        "bind_virq_bad": "EINVAL",
        "bind_virq_vcpu1": "ENOENT",
        "short_struct": "EINVAL",
    }
    assert await status(xc, other, offered) == (EvtchnStat.unbound, 0)
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.poweroff
    await healthy(hv)


async def test_ten_thousand_event_channels_end_in_enospc(hv: Hypervisor, xc: XenControl) -> None:
    domid = await boot(xc, "port_flood", "count=10000")
    results = reported(await wait_for_log(xc, ") flood ", timeout=60), "flood")
    assert results == {
        "ok": "1023",
        "highest": "1023",
        "ENOSPC": "8977",
        "freed": "512",
        "again": "512",
        "version": str(VERSION),
    }
    assert len(hv.domains[domid].evtchn.ports) == 1023
    # Nothing else is short of ports: Dom0 still makes them, also for the flooder.
    assert await xc.alloc_unbound(0, remote_dom=domid) > 0
    await xc.destroy(domid)
    await healthy(hv)


async def test_hypercalls_racing_a_domains_death(hv: Hypervisor, xc: XenControl) -> None:
    bystander = await boot(xc, "hammer", "every=20")
    # Back to back, the hypervisor mostly finds a victim's next call already waiting;
    # with pauses it mostly finds its socket idle: both must die cleanly.
    victims = [await boot(xc, "hammer", f"every=1000 pause={pause}") for pause in (0, 0.001, 0.01)]
    for victim in victims:
        await wait_for_log(xc, f"(d{victim}) hammering")
    calls = Counter[int]()

    class Counting:
        def hypercall(self, domid: int, *call: object) -> None:
            calls[domid] += 1

    hv.listeners.append(Counting())
    with trio.fail_after(10):  # all of them deep in their loops: two rounds each
        while any(calls[victim] < 8 for victim in victims):
            await trio.sleep(0.01)
    for victim in victims:
        await xc.destroy(victim)  # while its calls are in flight
        # The bystander goes on calling (counted here: its console lines are rate
        # limited, one per 5 s once its burst is spent, as Xen's printk).
        seen = calls[bystander]
        with trio.fail_after(10):
            while calls[bystander] < seen + 200:
                await trio.sleep(0.01)
        assert victim not in hv.domains
    await xc.destroy(bystander)
    await healthy(hv)


async def test_fuzzed_hypercalls_from_a_guest(hv: Hypervisor, xc: XenControl) -> None:
    domid = await boot(xc, "fuzz", "seed=1 calls=2000")
    tally = reported(await wait_for_log(xc, ") fuzz ", timeout=60), "fuzz")
    assert sum(int(count) for count in tally.values()) == 2000
    assert {"EINVAL", "E2BIG", "ENOSYS"} <= tally.keys()
    assert await wait_for_shutdown(xc, domid) == ShutdownReason.poweroff
    await healthy(hv)


# --- teardown -----------------------------------------------------------------


async def test_a_killed_guest_is_reaped_and_its_successor_inherits_nothing(
    hv: Hypervisor, xc: XenControl
) -> None:
    _, _, fds = await xc.hypercalls.call_struct(
        EVTCHN_OP,
        EvtchnOp.bind_virq,
        evtchn_bind_virq,
        codec_for(evtchn_bind_virq).record(virq=Virq.DOM_EXC, vcpu=0),
    )
    dom_exc = fds[0]  # Dom0's VIRQ_DOM_EXC port, as a Dom0 kernel would wait on it
    victim = await xc.createdomain()
    peer = victim + 1
    port = await xc.alloc_unbound(victim, remote_dom=peer)
    await xc.set_max_mem(victim, PAGES * 4)
    await xc.build(victim, "tests.kernels:holder", cmdline=f"port={port} out=32")
    assert await boot(xc, "peer_watch", f"peer={victim} port={port}") == peer
    await xc.unpause(victim)
    await wait_for_log(xc, f"(d{victim}) holder ready, 32 frames out")
    log = await wait_for_log(xc, f"(d{peer}) watching local port")
    peer_port = int(log.split(f"(d{peer}) watching local port ")[1].split()[0])
    domain = hv.domains[victim]
    assert domain.process is not None

    os.kill(domain.process.pid, signal.SIGKILL)
    with trio.fail_after(10):
        await trio.lowlevel.wait_readable(dom_exc)
    assert os.eventfd_read(dom_exc) >= 1
    assert await wait_for_shutdown(xc, victim) == ShutdownReason.crash
    await wait_for_log(xc, f"(d{peer}) peer gone: port {peer_port} unbound for d{victim}")
    assert await status(xc, peer, peer_port) == (EvtchnStat.unbound, victim)
    assert await status(xc, victim, port) == (EvtchnStat.closed, 0)
    assert domain.evtchn.ports == {} and domain.connections == []
    assert domain.memory is not None and domain.memory.closed
    # A dead domain takes no new ports and no bindings (Xen: -EINVAL for a dying domain).
    assert await errno_of(xc.alloc_unbound(victim, 0)) == Errno.EINVAL
    assert (
        await errno_of(
            xc.hypercalls.call_struct(
                EVTCHN_OP,
                EvtchnOp.bind_interdomain,
                evtchn_bind_interdomain,
                codec_for(evtchn_bind_interdomain).record(remote_dom=victim, remote_port=port),
            )
        )
        == Errno.EINVAL
    )
    assert await memory_op.populate_physmap(xc.hypercalls, [100], domid=victim) == 0
    assert await memory_op.current_reservation(xc.hypercalls, victim) == PAGES - 32

    hv.teardown(domain)  # idempotent: again, and again after the destroy
    await xc.destroy(victim)
    assert await errno_of(xc.destroy(victim)) == Errno.ESRCH
    hv.teardown(domain, kill=True)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(dom_exc)  # the destroy raised it again
    os.eventfd_read(dom_exc)

    # The same domid again, as a toolstack may ask for it: nothing carries over.
    config = codec_for(xen_domctl_createdomain).record(max_vcpus=1)
    again, _ = await xc.hypercalls.domctl(
        DomctlOp.createdomain, victim, xen_domctl_createdomain, config
    )
    assert again == victim
    await xc.set_max_mem(victim, PAGES * 4)
    await xc.build(victim, "tests.kernels:hello")
    assert hv.domains[victim] is not domain
    assert await memory_op.current_reservation(xc.hypercalls, victim) == PAGES
    assert await status(xc, victim, port) == (EvtchnStat.closed, 0)
    await xc.unpause(victim)
    await wait_for_log(xc, f"hello from d{victim}, {PAGES} pages")
    assert await wait_for_shutdown(xc, victim) == ShutdownReason.poweroff
    os.close(dom_exc)
    await healthy(hv)


# --- many calls at once, cancelled calls, a vanishing hypervisor ---------------
#
# A domain's client reads its own reply on the calling task and hands other
# tasks theirs (xenlike/domain/hypercall.py); these drive it over a socket
# the in-process hypervisor serves, with no domain process behind it.


async def test_many_tasks_calling_at_once_each_get_their_own_reply(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    client = await connect(hv.create_domain())

    async def caller(index: int) -> None:
        for round_ in range(20):
            text = b"x" * (index * 20 + round_ + 1)  # console_io returns the length written
            done = await client.call(Hypercall.console_io, CONSOLEIO_write, text)
            assert done.result == len(text)

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(caller, index)
    await healthy(hv)


async def test_notifications_are_routed_whether_or_not_a_call_is_reading(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    got: list[int] = []
    client = await connect(hv.domains[0])  # Dom0's connections hear Dom0's notifications
    client.on_notification = lambda reply: got.append(struct.unpack("<I", reply.payload)[0])
    hv.notify(hv.domains[0], Notification.port_unbound, struct.pack("<I", 1))
    with trio.fail_after(5):
        while got != [1]:  # no call in flight: the background reader takes it
            await trio.sleep(0.001)
    for port in range(2, 50):
        hv.notify(hv.domains[0], Notification.port_unbound, struct.pack("<I", port))
        await client.call(Hypercall.xen_version, XenVerOp.version)  # may read it first
    with trio.fail_after(5):
        while len(got) < 49:
            await trio.sleep(0.001)
    assert got == list(range(1, 50))


async def test_cancelled_calls_leave_the_client_in_step(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    client = await connect(hv.create_domain())

    async def write(text: bytes) -> int:
        return (await client.call(Hypercall.console_io, CONSOLEIO_write, text)).result

    with trio.CancelScope() as scope:  # cancelled while reading its reply
        scope.cancel()
        await write(b"lost")
    async with trio.open_nursery() as nursery:  # one reads, the other parks, then is cancelled
        nursery.start_soon(write, b"reader")
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: write(b"follower"))
            await trio.lowlevel.checkpoint()
            scope.cancel()
    for length in range(1, 30):  # late replies are dropped, never taken for these
        assert await write(b"x" * length) == length


async def test_calls_end_with_connection_reset_when_the_hypervisor_goes(
    hv: Hypervisor, connect: DomainConnector
) -> None:
    domain = hv.create_domain()
    client = await connect(domain)
    assert (await client.call(Hypercall.xen_version, XenVerOp.version)).result == VERSION
    hv.teardown(domain)  # closes the domain's hypercall socket
    for _ in range(2):
        with pytest.raises(ConnectionResetError), trio.fail_after(5):
            await client.call(Hypercall.xen_version, XenVerOp.version)
    await healthy(hv)


async def test_a_host_out_of_descriptors_fails_a_port_with_enomem(
    hv: Hypervisor, xc: XenControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_more(*_: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "eventfd", no_more)
    assert await errno_of(xc.alloc_unbound(0, 0)) == Errno.ENOMEM
    monkeypatch.undo()
    assert await xc.alloc_unbound(0, 0) > 0
    await healthy(hv)


async def test_a_socket_closed_before_its_service_starts(hv: Hypervisor, xc: XenControl) -> None:
    """A domain destroyed as soon as it is built has its socket closed before its
    hypercall service first runs. Waiting on a closed socket (fd -1) made trio's
    epoll raise ValueError and keep -1 registered, so the next such domain's
    service met BusyResourceError (once that took the hypervisor down)."""
    domain = hv.lookup(await xc.createdomain())
    for _ in range(3):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.close()
        conn = HypercallConnection(domain, trio.socket.from_stdlib_socket(ours))
        conn.sock.close()
        await hv.serve_connection(conn)  # nothing to serve: it returns at once
    await healthy(hv)


async def test_domains_destroyed_as_they_are_built(hv: Hypervisor, xc: XenControl) -> None:
    """Two Dom0 connections build and destroy at once, back to back: every domain
    goes cleanly, whichever of its service and its destruction runs first."""

    async def churn(control: XenControl) -> None:
        for _ in range(12):
            await control.destroy(await control.create_domain("tests.kernels:hammer", memory_mb=4))

    async with XenControl.connect(hv.run_dir) as other, trio.open_nursery() as nursery:
        nursery.start_soon(churn, xc)
        nursery.start_soon(churn, other)
    assert list(hv.domains) == [0]
    await healthy(hv)


async def test_a_reply_carries_the_descriptor_it_was_given(hv: Hypervisor, xc: XenControl) -> None:
    """A reply that waits its turn still hands over what the handler gave it, even
    if that descriptor is closed meanwhile and its number reused (a port closed
    by another domain, a frame freed by a teardown)."""
    domain = hv.lookup(await xc.createdomain())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn = HypercallConnection(domain, trio.socket.from_stdlib_socket(ours))
    given = os.eventfd(7)
    async with trio.open_nursery() as nursery:
        await conn.send_lock.acquire()  # another sender has the socket
        nursery.start_soon(conn.send, Reply(1, MessageKind.reply, 0, b"", (given,)))
        await trio.testing.wait_all_tasks_blocked()
        os.close(given)
        reused = os.eventfd(99)
        assert reused == given  # the lowest free number: the same one
        conn.send_lock.release()
    _, fds, _, _ = socket.recv_fds(theirs, 64, 1)
    assert os.eventfd_read(fds[0]) == 7
    for fd in (*fds, reused):
        os.close(fd)
    conn.sock.close()
    theirs.close()
