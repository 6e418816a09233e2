"""Frames with a file of their own: how a grant reaches one page and no other.

A domain's memory is one memfd, and a memfd cannot be shared by range: a
process given it can map every page, writable. So a frame that is granted
gets a backing file of its own, a sealed one-page memfd. The granter moves
the frame there the first time it grants it (copy the page into the new
file, map the file over the frame's place in its own address space, punch
the old page out of the big memfd) and hands the file to the hypervisor,
which maps it over its own view of the frame too. A grant map then hands
the mapper that one file, reopened read-only for a read-only grant, and
the mapper's runtime closes it once mapped: it holds nothing but its
mapping, and after unmap nothing at all (but Dom0, which may map any
guest's memory, keeps its mappings: `xenlike.memory.FrameCache`). Pages
are granted from a few pools (rings, buffer pools, persistent grants), so
few frames ever move.

A granter that ends a grant to a domain other than Dom0 moves the frame to
a fresh file again, so a hostile mapper that kept its file holds a copy of
the past, not the granter's page.

The files travel over the frame channel, a SOCK_SEQPACKET pair beside each
domain's hypercall socket: one message is the frames' gfns (u64 each)
with one file per gfn in SCM_RIGHTS, in order. The hypervisor sends the
boot frames it made shareable itself (the XenStore and console rings) down
it before the domain starts; the domain sends every frame it moves up it.
The hypervisor reads it whenever it is about to use a domain's frames, so a
file sent before a grant reference was published is always there when a
peer maps that reference.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import stat
import struct
from collections.abc import Sequence

from xenlike.abi.ring import XEN_PAGE_SIZE

__all__ = [
    "FRAME_SEALS",
    "MAX_FRAMES_PER_MESSAGE",
    "BadFrameFile",
    "check_frame_file",
    "frame_file",
    "receive_frames",
    "send_frames",
]

FRAME_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""A frame's file can neither change size (no SIGBUS for its mappers) nor take
a write seal (which would stop new writable mappings) once it is handed over."""
_WRITE_SEALS = fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
MAX_FRAMES_PER_MESSAGE = 253  # SCM_MAX_FD: the fds one message can carry
SEND_TIMEOUT = 5.0  # seconds a granter waits for the hypervisor to make room
_GFN = struct.Struct("<Q")


class BadFrameFile(ValueError):
    """A file offered as a frame's backing is not a sealed one-page memfd."""


def frame_file(name: str, content: bytes | memoryview) -> int:
    """A new sealed one-page memfd holding `content`; the caller owns the fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, XEN_PAGE_SIZE)
        if os.pwrite(fd, content, 0) != XEN_PAGE_SIZE:
            raise OSError(f"short write into the file of {name}")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FRAME_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_frame_file(fd: int) -> None:
    """Refuse a file that a hostile domain could shrink, grow or write-seal under us."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size != XEN_PAGE_SIZE:
        raise BadFrameFile(f"not a one-page file ({info.st_size} bytes)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise BadFrameFile("not a memfd: it takes no seals") from None
    if seals & FRAME_SEALS != FRAME_SEALS or seals & _WRITE_SEALS:
        raise BadFrameFile(
            f"seals {seals:#x}; a frame's file needs exactly "
            f"shrink, grow and seal ({FRAME_SEALS:#x})"
        )


def send_frames(sock: socket.socket, frames: Sequence[tuple[int, int]]) -> None:
    """Send (gfn, fd) pairs down a frame channel; the fds stay the caller's.

    Synchronous, so a granter can move a frame inside grant_access: a full
    channel is waited on for up to SEND_TIMEOUT, since the peer reads its end
    from its own loop and empties it without our help.
    """
    for start in range(0, len(frames), MAX_FRAMES_PER_MESSAGE):
        chunk = frames[start : start + MAX_FRAMES_PER_MESSAGE]
        payload = b"".join(_GFN.pack(gfn) for gfn, _ in chunk)
        fds = array.array("i", (fd for _, fd in chunk)).tobytes()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        while True:
            try:
                sock.sendmsg([payload], ancillary, socket.MSG_DONTWAIT)
                break
            except BlockingIOError:
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                if not poller.poll(SEND_TIMEOUT * 1000):
                    raise TimeoutError(
                        f"the frame channel stayed full for {SEND_TIMEOUT} s: "
                        f"the hypervisor does not read it"
                    ) from None


def receive_frames(sock: socket.socket) -> list[tuple[int, int]] | None:
    """The (gfn, fd) pairs of one message, [] if none waits, None once the peer is gone.

    The fds are the caller's. A malformed message (gfns and files that do
    not pair up) raises BadFrameFile after closing every fd it brought.
    """
    try:
        data, ancdata, flags, _ = sock.recvmsg(
            MAX_FRAMES_PER_MESSAGE * _GFN.size + 1,
            socket.CMSG_SPACE(MAX_FRAMES_PER_MESSAGE * 4),
            socket.MSG_DONTWAIT,
        )
    except BlockingIOError:
        return []
    except OSError:
        return None
    fds = array.array("i")
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
    if not data and not fds:
        return None
    if len(data) % _GFN.size or len(data) // _GFN.size != len(fds) or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise BadFrameFile(f"a frame message of {len(data)} bytes with {len(fds)} files")
    gfns = [gfn for (gfn,) in _GFN.iter_unpack(data)]
    return list(zip(gfns, fds, strict=True))
