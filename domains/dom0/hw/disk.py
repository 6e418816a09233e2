"""Dom0's disks: raw image files seen as arrays of 512-byte sectors.

An image is created sparse, at the size the topology gives, the first time
Dom0 boots with it; after that it is never resized or rewritten by anyone
but its back end. `Disk` is the sector interface blkback drives: vectored
reads and writes straight into the caller's buffers (the granted pages),
flush (fdatasync), and discard (fallocate PUNCH_HOLE | KEEP_SIZE, so a
discarded range reads back as zeros and gives its blocks back to the host).

Buffered I/O is the default: reads served from the host's page cache cost
a few microseconds. `nowait` reads (RWF_NOWAIT) let a caller that must not
block try the page cache first and hand a miss to a thread. With
`direct=True` the file is opened O_DIRECT: buffers must then be 512-byte
aligned, which page-aligned grant mappings are.
"""

import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = ["SECTOR_SIZE", "Disk", "create_image", "create_images"]

SECTOR_SIZE = 512

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

log = logging.getLogger("xenlike.dom0.hw.disk")

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]  # off_t: LP64
_fallocate.restype = ctypes.c_int


def create_image(path: Path, size: int) -> bool:
    """Create a sparse image of `size` bytes unless one exists; True if created.

    An existing image is left exactly as it is, whatever its size: it holds
    a guest's data.
    """
    if size <= 0 or size % SECTOR_SIZE:
        raise ValueError(
            f"{path}: an image of {size} bytes is not a whole number of {SECTOR_SIZE}-byte sectors"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.ftruncate(fd, size)
    except OSError:
        path.unlink(missing_ok=True)  # not a 0-byte image that a later boot would reuse
        raise
    finally:
        os.close(fd)
    return True


def create_images(topology: Any, run_dir: Path) -> list[Path]:
    """Dom0's boot step: every `[dom0] images` entry that is missing, created sparse.

    Images live in the run directory, and only there (`Topology.image_path`).
    A failure is logged and the rest go on: the back end of a disk whose
    image is missing says so in its error node.
    """
    created = []
    for name, size in topology.dom0.images.items():
        try:
            path = topology.image_path(name, run_dir)
            if create_image(path, size):
                created.append(path)
        except (OSError, ValueError) as exc:
            log.error("cannot create disk image %s: %s", name, exc)
    return created


@attrs.define(eq=False)
class Disk:
    """An open image file: `sectors` sectors of SECTOR_SIZE bytes.

    Every method checks that the sectors it is given lie on the disk; the
    back end has checked them already, this is the last line.
    """

    path: Path
    fd: int
    sectors: int
    readonly: bool
    direct: bool
    physical_sector_size: int

    @classmethod
    def open(cls, path: Path | str, *, readonly: bool = False, direct: bool = False) -> "Disk":
        path = Path(path)
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000) == 0o100000:
                raise OSError(
                    errno.EINVAL,
                    f"{path} is not a regular file (only raw image files are disks here)",
                )
            physical = max(SECTOR_SIZE, st.st_blksize)
            return cls(path, fd, st.st_size // SECTOR_SIZE, readonly, direct, physical)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _check(self, sector: int, count: int) -> int:
        if sector < 0 or count < 0 or sector + count > self.sectors:
            raise ValueError(
                f"{self.path.name}: sectors {sector}..{sector + count - 1} are not "
                f"on a disk of {self.sectors} sectors"
            )
        return sector * SECTOR_SIZE

    # --- the sector interface (buffers are the caller's: no copy here) -----------

    def readv(self, sector: int, buffers: Sequence[Any], *, nowait: bool = False) -> int:
        """Read into `buffers` from `sector`; returns bytes read.

        With `nowait`, raise BlockingIOError instead of waiting for the
        device (RWF_NOWAIT): what is not in the page cache is not read.
        """
        offset = self._check(sector, sum(map(len, buffers)) // SECTOR_SIZE)
        return os.preadv(self.fd, buffers, offset, os.RWF_NOWAIT if nowait else 0)

    def writev(self, sector: int, buffers: Sequence[Any]) -> int:
        """Write `buffers` from `sector`; returns bytes written."""
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.path.name} is open read-only")
        offset = self._check(sector, sum(map(len, buffers)) // SECTOR_SIZE)
        return os.pwritev(self.fd, buffers, offset)

    def flush(self) -> None:
        """Make every completed write durable (the data, and the size it needs)."""
        os.fdatasync(self.fd)

    def discard(self, sector: int, count: int, *, secure: bool = False) -> None:
        """Give the sectors back: they read as zeros afterwards.

        `secure` overwrites them with zeros and flushes before punching the
        hole, so the old contents do not survive in the host's blocks.
        """
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.path.name} is open read-only")
        offset = self._check(sector, count)
        if not count:
            return
        if secure:
            self._zero(sector, count)
            self.flush()
        if _fallocate(
            self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count * SECTOR_SIZE
        ):
            code = ctypes.get_errno()
            raise OSError(code, f"fallocate(PUNCH_HOLE) on {self.path.name}: {os.strerror(code)}")

    def _zero(self, sector: int, count: int) -> None:
        chunk = 256 * 1024
        with mmap.mmap(-1, chunk) as zeros:  # page aligned, as O_DIRECT wants
            done = 0
            while done < count:
                step = min(count - done, chunk // SECTOR_SIZE)
                view = memoryview(zeros)[: step * SECTOR_SIZE]
                try:
                    self.writev(sector + done, [view])
                finally:
                    view.release()
                done += step

    # --- bytes in, bytes out (tests and tools; not the data path) ------------------

    def read(self, sector: int, count: int) -> bytes:
        self._check(sector, count)
        size = count * SECTOR_SIZE
        with mmap.mmap(-1, max(size, 1)) as buffer:  # page aligned, as O_DIRECT wants
            view = memoryview(buffer)[:size]
            try:
                got = self.readv(sector, [view])
                return bytes(view[:got])
            finally:
                view.release()

    def write(self, sector: int, data: bytes) -> None:
        if len(data) % SECTOR_SIZE:
            raise ValueError(f"{len(data)} bytes are not whole {SECTOR_SIZE}-byte sectors")
        self._check(sector, len(data) // SECTOR_SIZE)
        with mmap.mmap(-1, max(len(data), 1)) as buffer:
            buffer[: len(data)] = data
            view = memoryview(buffer)[: len(data)]
            try:
                self.writev(sector, [view])
            finally:
                view.release()
