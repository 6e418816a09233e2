"""Frames with files of their own (xenlike/frames.py): the files, the frame channel,
and the hypervisor's end of it, fed what a hostile domain would send."""

import fcntl
import mmap
import os
import socket

import pytest

from xenlike.frames import (
    MAX_FRAMES_PER_MESSAGE,
    BadFrameFile,
    check_frame_file,
    frame_file,
    receive_frames,
    send_frames,
)
from xenlike.hypervisor.frames import SharedFrames
from xenlike.memory import XEN_PAGE_SIZE, DomainMemory

PAGE = bytes(range(256)) * 16


def test_a_frame_file_holds_the_page_and_is_sealed() -> None:
    fd = frame_file("xenlike-test", PAGE)
    try:
        check_frame_file(fd)
        assert os.pread(fd, XEN_PAGE_SIZE + 1, 0) == PAGE
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 * XEN_PAGE_SIZE)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(fd)


def _memfd(size: int, seals: int) -> int:
    fd = os.memfd_create("xenlike-hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.mark.parametrize(
    ("size", "seals", "why"),
    [
        (XEN_PAGE_SIZE, 0, "seals 0x0"),  # could be truncated under its mappers: SIGBUS
        (XEN_PAGE_SIZE, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, "seals 0x6"),  # could take more
        (
            XEN_PAGE_SIZE,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL | fcntl.F_SEAL_WRITE,
            "seals 0xf",
        ),
        (
            2 * XEN_PAGE_SIZE,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
            "8192 bytes",
        ),
    ],
)
def test_files_a_hostile_domain_could_change_under_its_mappers_are_refused(
    size: int, seals: int, why: str
) -> None:
    fd = _memfd(size, seals)
    try:
        with pytest.raises(BadFrameFile, match=why):
            check_frame_file(fd)
    finally:
        os.close(fd)


def test_a_file_that_is_no_memfd_is_refused(tmp_path) -> None:
    path = tmp_path / "page"
    path.write_bytes(PAGE)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BadFrameFile, match="not a memfd"):
            check_frame_file(fd)
    finally:
        os.close(fd)


def test_the_frame_channel_carries_gfns_and_files_in_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [
        frame_file(f"xenlike-test-{i}", bytes([i]) * XEN_PAGE_SIZE)
        for i in range(MAX_FRAMES_PER_MESSAGE + 2)
    ]
    try:
        assert receive_frames(theirs) == []
        send_frames(ours, [(gfn * 3, fd) for gfn, fd in enumerate(fds)])
        received = receive_frames(theirs) + receive_frames(theirs)  # two messages
        assert [gfn for gfn, _ in received] == [gfn * 3 for gfn in range(len(fds))]
        assert [os.pread(fd, 1, 0) for _, fd in received] == [bytes([i]) for i in range(len(fds))]
        for _, fd in received:
            os.close(fd)
        ours.close()
        assert receive_frames(theirs) is None
    finally:
        for fd in fds:
            os.close(fd)
        theirs.close()


def test_a_malformed_frame_message_is_refused_and_its_files_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = frame_file("xenlike-test", PAGE)
    before = len(os.listdir("/proc/self/fd"))
    ours.sendmsg(
        [b"\0" * 16], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
    )  # two gfns, one file
    with pytest.raises(BadFrameFile, match="16 bytes with 1 files"):
        receive_frames(theirs)
    assert len(os.listdir("/proc/self/fd")) == before
    os.close(fd)
    ours.close()
    theirs.close()


@pytest.fixture
def shared():
    memory = DomainMemory.create(16, name="xenlike-test")
    lines: list[str] = []
    frames = SharedFrames.create(memory, "d7", frozenset({1, 2}), lines.append)
    yield memory, frames, lines
    frames.close()
    memory.close()


def test_the_hypervisor_maps_a_domain_s_file_over_its_view(shared) -> None:
    memory, frames, lines = shared
    domain_end = frames.domain_end
    fd = frame_file("xenlike-d7-gfn-0x5", PAGE)
    send_frames(domain_end, [(5, fd)])
    assert frames.drain()
    with memory.frame(5) as page:
        assert bytes(page) == PAGE
        page[:4] = b"seen"
    assert os.pread(fd, 4, 0) == b"seen"
    ro = frames.file(5, readonly=True)
    with pytest.raises(PermissionError):
        mmap.mmap(ro, XEN_PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    assert frames.file(6, readonly=False) is None
    os.close(fd)
    assert lines == []


def test_hostile_files_leave_the_hypervisor_s_view_alone(shared) -> None:
    memory, frames, lines = shared
    domain_end = frames.domain_end
    unsealed = _memfd(XEN_PAGE_SIZE, 0)
    good = frame_file("xenlike-d7", PAGE)
    send_frames(domain_end, [(5, unsealed), (1, good), (16, good), (2**63, good)])
    assert frames.drain()
    os.ftruncate(unsealed, 0)  # would be SIGBUS for the hypervisor, had it mapped this
    with memory.frame(5) as page:
        assert bytes(page) == bytes(XEN_PAGE_SIZE)
    assert frames.files == {}
    assert len(lines) == 4 and all("refused a file" in line for line in lines)
    assert "gfn 0x1 is not the domain's to share" in lines[1]
    for fd in (unsealed, good):
        os.close(fd)


def test_a_moved_frame_that_is_ballooned_out_reads_zeros(shared) -> None:
    memory, frames, _ = shared
    fd = frame_file("xenlike-d7-gfn-0x5", PAGE)
    send_frames(frames.domain_end, [(5, fd)])
    frames.drain()
    frames.punch(4, 3)
    assert os.pread(fd, XEN_PAGE_SIZE, 0) == bytes(XEN_PAGE_SIZE)
    os.close(fd)


def test_a_domain_cannot_make_the_hypervisor_hold_more_files_than_the_limit() -> None:
    memory = DomainMemory.create(16, name="xenlike-test")
    lines: list[str] = []
    frames = SharedFrames.create(memory, "d7", frozenset(), lines.append)
    frames.limit = 3
    fds = [frame_file(f"xenlike-d7-gfn-{gfn}", PAGE) for gfn in range(5)]
    try:
        send_frames(frames.domain_end, list(enumerate(fds)))
        frames.drain()
        assert sorted(frames.files) == [0, 1, 2]
        assert lines == [
            "frame channel: refused a file for gfn 0x3: 3 frames have files already",
            "frame channel: refused a file for gfn 0x4: 3 frames have files already",
        ]
        send_frames(frames.domain_end, [(1, fds[4])])  # moving a frame again is no new file
        frames.drain()
        assert sorted(frames.files) == [0, 1, 2] and len(lines) == 2
    finally:
        for fd in fds:
            os.close(fd)
        frames.close()
        memory.close()
