"""The domain's hypercall client waiting for replies in poll(2) (`wait_in_kernel`).

A thread stands in for the hypervisor process here: it answers from another
thread as the hypervisor answers from another process, so the calling task
blocks in the kernel while the rest of the trio loop is frozen, as in a guest.
"""

import select
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from xenlike.abi.version import XenVerOp
from xenlike.abi.xen import CONSOLEIO_write, Hypercall
from xenlike.domain.hypercall import HypercallClient
from xenlike.hypercall import (
    HYPERCALL_MAX_MESSAGE,
    REQUEST_HEADER_SIZE,
    HypercallError,
    MessageKind,
    Notification,
    Reply,
    unpack_request_header,
)

Answer = Callable[[socket.socket, int], None]


Ends = tuple[socket.socket, socket.socket]


@pytest.fixture
def ends() -> Iterator[Ends]:
    """A hypercall socket's two ends, the stand-in hypervisor's and the guest's;
    closed after the test, whatever it closed itself."""
    hypervisor_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with hypervisor_end, guest_end:
        yield hypervisor_end, guest_end


def waiting_in_the_kernel(
    guest_end: socket.socket, notices: list[Reply] | None = None
) -> HypercallClient:
    """The guest's client, made to wait for its replies in poll(2) (its peer is a thread)."""
    return HypercallClient(
        trio.socket.from_stdlib_socket(guest_end),
        None if notices is None else notices.append,
        wait_in_kernel=True,
    )


def stand_in_hypervisor(sock: socket.socket, answer: Answer) -> threading.Thread:
    """A thread that takes one request and answers it with `answer(sock, seq)`."""

    def serve() -> None:
        seq = unpack_request_header(sock.recv(HYPERCALL_MAX_MESSAGE + 1))[0]
        answer(sock, seq)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


async def test_a_late_reply_lets_the_guests_other_tasks_run_and_still_arrives(ends: Ends) -> None:
    hypervisor_end, guest_end = ends
    client = waiting_in_the_kernel(guest_end)
    request_seen = threading.Event()
    bystander_ran = threading.Event()
    answered_after_bystander: list[bool] = []

    def answer_late(sock: socket.socket, seq: int) -> None:
        request_seen.set()
        # Only once another task of the guest has run while the call is outstanding:
        # the call must have given trio its loop back, past its wait in the kernel.
        answered_after_bystander.append(bystander_ran.wait(timeout=30))
        sock.send(Reply(seq, MessageKind.reply, 42, b"late").encode())

    thread = stand_in_hypervisor(hypervisor_end, answer_late)

    async def bystander() -> None:
        await trio.to_thread.run_sync(request_seen.wait)
        bystander_ran.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bystander)
        nursery.start_soon(client.run)
        done = await client.call(Hypercall.xen_version, XenVerOp.version)
        nursery.cancel_scope.cancel()
    thread.join()
    assert answered_after_bystander == [True]
    assert (done.result, done.payload) == (42, b"late")


async def test_a_notification_met_while_waiting_in_the_kernel_is_routed(ends: Ends) -> None:
    hypervisor_end, guest_end = ends
    notices: list[Reply] = []
    client = waiting_in_the_kernel(guest_end, notices)

    def notice_then_reply(sock: socket.socket, seq: int) -> None:
        sock.send(Reply(0, MessageKind.notification, Notification.port_unbound, b"\7").encode())
        sock.send(Reply(seq, MessageKind.reply, 7).encode())

    thread = stand_in_hypervisor(hypervisor_end, notice_then_reply)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        done = await client.call(Hypercall.xen_version, XenVerOp.version)
        nursery.cancel_scope.cancel()
    thread.join()
    assert done.result == 7
    assert [(n.result, n.payload) for n in notices] == [(Notification.port_unbound, b"\7")]


async def test_the_hypervisor_dying_while_a_call_waits_in_the_kernel_resets_it(ends: Ends) -> None:
    hypervisor_end, guest_end = ends
    client = waiting_in_the_kernel(guest_end)
    thread = stand_in_hypervisor(hypervisor_end, lambda sock, _: sock.close())
    outcome: list[type[BaseException]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        for _ in range(2):
            try:
                await client.call(Hypercall.xen_version, XenVerOp.version)
            except ConnectionResetError as exc:
                outcome.append(type(exc))
    thread.join()
    assert outcome == [ConnectionResetError, ConnectionResetError]


async def test_a_call_cancelled_past_its_wait_in_the_kernel_leaves_the_client_in_step(
    ends: Ends,
) -> None:
    hypervisor_end, guest_end = ends
    client = waiting_in_the_kernel(guest_end)

    def answer_both_late() -> None:  # the first call's reply comes after the second call
        first = unpack_request_header(hypervisor_end.recv(HYPERCALL_MAX_MESSAGE + 1))[0]
        second = unpack_request_header(hypervisor_end.recv(HYPERCALL_MAX_MESSAGE + 1))[0]
        hypervisor_end.send(Reply(first, MessageKind.reply, 1).encode())
        hypervisor_end.send(Reply(second, MessageKind.reply, 2).encode())

    thread = threading.Thread(target=answer_both_late, daemon=True)
    thread.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.move_on_after(0.05) as scope:  # never answered in time
            await client.call(Hypercall.xen_version, XenVerOp.version)
        done = await client.call(Hypercall.xen_version, XenVerOp.version)
        nursery.cancel_scope.cancel()
    thread.join()
    assert scope.cancelled_caught
    assert done.result == 2  # the first call's late reply was dropped, not taken for this one


async def test_many_tasks_waiting_in_the_kernel_each_get_their_own_reply(ends: Ends) -> None:
    hypervisor_end, guest_end = ends
    notices: list[Reply] = []
    client = waiting_in_the_kernel(guest_end, notices)

    def answer_out_of_order() -> None:
        """Each reply's result is its request's payload length; the requests waiting
        are answered last first, with a notification between."""
        while True:
            waiting = [hypervisor_end.recv(HYPERCALL_MAX_MESSAGE + 1)]
            while waiting[-1] and select.select([hypervisor_end], [], [], 0.001)[0]:
                waiting.append(hypervisor_end.recv(HYPERCALL_MAX_MESSAGE + 1))
            if not all(waiting):
                return  # the guest hung up
            for message in reversed(waiting):
                seq = unpack_request_header(message)[0]
                length = len(message) - REQUEST_HEADER_SIZE
                hypervisor_end.send(Reply(seq, MessageKind.reply, length).encode())
                hypervisor_end.send(Reply(0, MessageKind.notification, length).encode())

    thread = threading.Thread(target=answer_out_of_order, daemon=True)
    thread.start()
    calls = 0

    async def caller(index: int) -> None:
        nonlocal calls
        for round_ in range(10):
            text = b"x" * (index * 10 + round_ + 1)
            done = await client.call(Hypercall.console_io, CONSOLEIO_write, text)
            assert done.result == len(text)
            calls += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        async with trio.open_nursery() as callers:
            for index in range(20):
                callers.start_soon(caller, index)
        guest_end.shutdown(socket.SHUT_WR)  # the stand-in's end of the conversation
        thread.join()
        hypervisor_end.close()
    assert calls == 200
    assert sorted(n.result for n in notices) == list(range(1, 201))


# What a hostile or broken hypervisor may send: well-formed replies and notifications
# (for this call or another), and anything else.
messages = st.one_of(
    st.builds(
        lambda seq, kind, result, payload: Reply(seq, kind, result, payload).encode(),
        st.sampled_from([0, 1, 2]),
        st.sampled_from([MessageKind.reply, MessageKind.notification, 9]),
        st.integers(-(2**63), 2**63 - 1),
        st.binary(max_size=24),
    ),
    st.binary(max_size=40),
)


async def call_through(sent: list[bytes], wait_in_kernel: bool) -> tuple[object, list[object]]:
    """The first call's outcome, and the notifications seen, when the hypervisor has
    sent `sent` and then shut its end (the reply, if any, is among them: seq 1)."""
    hypervisor_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for message in sent:
        hypervisor_end.send(message)
    hypervisor_end.shutdown(socket.SHUT_WR)
    notices: list[Reply] = []
    client = HypercallClient(
        trio.socket.from_stdlib_socket(guest_end), notices.append, wait_in_kernel=wait_in_kernel
    )
    outcome: object
    try:
        done = await client.call(Hypercall.xen_version, XenVerOp.version)
        outcome = ("result", done.result, done.payload, done.fds)
    except HypercallError as exc:
        outcome = ("errno", exc.errno)
    except ConnectionResetError:
        outcome = ("reset",)
    finally:
        client._raw.close()
        guest_end.close()
        hypervisor_end.close()
    return outcome, [(n.seq, n.kind, n.result, n.payload) for n in notices]


@settings(max_examples=150, deadline=None)
@given(sent=st.lists(messages, max_size=4))
def test_waiting_in_the_kernel_reads_what_waiting_in_trio_reads(sent: list[bytes]) -> None:
    assert trio.run(call_through, sent, True) == trio.run(call_through, sent, False)
