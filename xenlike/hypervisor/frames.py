"""A domain's frames that have files of their own, as the hypervisor keeps them.

What a grant map hands a mapper is the granted frame's own file
(`xenlike.frames`), never the granter's whole memory. The granter moves a
frame into such a file and sends it up its frame channel; `drain` takes
each file in (checked: a sealed one-page memfd, for a frame the domain may
give), maps it over the hypervisor's own view of the frame, and keeps it to
hand out. Anything about to use a domain's frames drains its channel first,
so a file sent before its grant reference was published is always here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import attrs
import trio

from xenlike.frames import BadFrameFile, check_frame_file, frame_file, receive_frames, send_frames
from xenlike.memory import XEN_PAGE_SIZE, DomainMemory, punch

__all__ = ["MAX_FRAME_FILES", "SharedFrames"]

MAX_FRAME_FILES = 4096
"""Frames of one domain that may have files of their own: every one is an fd held
here, so a guest that moves all its frames must not exhaust the hypervisor's.
A default guest moves about a thousand (its blkfront pool, netfront's grants)."""


@attrs.define(eq=False)
class SharedFrames:
    """Frame -> its own file, for one domain; and the hypervisor's end of its frame channel."""

    memory: DomainMemory
    name: str  # "d3", for file names and the log
    forbidden: frozenset[int]  # Xen's own frames (shared_info, the grant table): never moved
    channel: socket.socket
    domain_end: socket.socket | None  # handed to the domain's process when it starts
    log: Callable[[str], None]  # rate-limited: the domain decides how often it is called
    limit: int = MAX_FRAME_FILES
    files: dict[int, int] = attrs.field(factory=dict)  # gfn -> read-write fd
    _readonly: dict[int, int] = attrs.field(factory=dict)  # gfn -> O_RDONLY reopen, on demand

    @classmethod
    def create(
        cls, memory: DomainMemory, name: str, forbidden: frozenset[int], log: Callable[[str], None]
    ) -> SharedFrames:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(memory, name, forbidden, ours, theirs, log)

    def share_boot_frames(self, gfns: list[int]) -> None:
        """Move frames the domain builder grants (XenStore and console rings) into
        files now, and queue the files for the domain to map when it boots."""
        moved = []
        for gfn in gfns:
            with self.memory.frame(gfn) as page:
                fd = frame_file(f"xenlike-{self.name}-gfn-{gfn:#x}", page)
            self._install(gfn, fd)
            punch(self.memory.fd, gfn, 1)
            moved.append((gfn, fd))
        send_frames(self.channel, moved)

    def drain(self) -> bool:
        """Take in every file the domain has sent; a bad one is logged and dropped.

        False once the domain's end is closed: nothing more will come.
        """
        while True:
            try:
                frames = receive_frames(self.channel)
            except BadFrameFile as exc:
                self.log(f"frame channel: {exc}")
                continue
            if frames is None:
                return False
            if not frames:
                return True
            for gfn, fd in frames:
                try:
                    if gfn >= self.memory.nr_pages or gfn in self.forbidden:
                        raise BadFrameFile(f"gfn {gfn:#x} is not the domain's to share")
                    if gfn not in self.files and len(self.files) >= self.limit:
                        raise BadFrameFile(f"{self.limit} frames have files already")
                    check_frame_file(fd)
                    self._install(gfn, fd)
                except (BadFrameFile, OSError) as exc:
                    os.close(fd)
                    self.log(f"frame channel: refused a file for gfn {gfn:#x}: {exc}")

    def _install(self, gfn: int, fd: int) -> None:
        self.memory.back_frame(gfn, fd)
        old = self.files.get(gfn)
        self.files[gfn] = fd
        for stale in (old, self._readonly.pop(gfn, None)):
            if stale is not None:
                os.close(stale)

    def file(self, gfn: int, readonly: bool) -> int | None:
        """The file to hand a mapper of `gfn`, read-only on request; None if it has none."""
        fd = self.files.get(gfn)
        if fd is None or not readonly:
            return fd
        ro = self._readonly.get(gfn)
        if ro is None:
            ro = self._readonly[gfn] = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        return ro

    def punch(self, gfn: int, count: int) -> None:
        """Frames handed back to the host: their own files lose their pages too."""
        for frame in range(gfn, gfn + count):
            fd = self.files.get(frame)
            if fd is not None:
                punch(fd, 0, 1)

    def detach(self, gfn: int) -> int | None:
        """Take frame `gfn`'s file from the domain whole (a peer still maps it) and
        return it; an empty file stands in the hypervisor's view of the frame."""
        fd = self.files.pop(gfn, None)
        if fd is None:
            return None
        readonly = self._readonly.pop(gfn, None)
        if readonly is not None:
            os.close(readonly)
        blank = frame_file(f"xenlike-{self.name}-gfn-{gfn:#x}", bytes(XEN_PAGE_SIZE))
        punch(blank, 0, 1)
        self._install(gfn, blank)
        return fd

    def close(self) -> None:
        """The domain is gone: mappers keep what they mapped, we keep nothing."""
        for fd in (*self.files.values(), *self._readonly.values()):
            os.close(fd)
        self.files.clear()
        self._readonly.clear()
        try:
            trio.lowlevel.notify_closing(self.channel)  # wakes a task waiting to drain it
        except RuntimeError:  # not in a trio run: nobody waits
            pass
        self.channel.close()
        if self.domain_end is not None:
            self.domain_end.close()
            self.domain_end = None
