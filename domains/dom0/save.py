"""`xl save` in Dom0's toolstack: suspend a guest as libxl does, write its save file.

libxl_dom_suspend.c's order: write "suspend" to the guest's control/shutdown,
wait up to 60 s for the guest to acknowledge by clearing it (else cancel the
request, in a transaction, unless the guest acknowledged at the last minute),
then wait up to 60 s for the domain to shut down with SHUTDOWN_suspend. A
xenlike kernel that refuses (its program is not resumable) says why in
error/suspend before it acknowledges, and runs on.

The suspended domain's populated frames, shared info page, execution state,
the program's XenStore data (`data/`) and its config make a `DomainImage`;
`write_save_file` turns that into Xen's bytes, written to a temporary file in
the target's directory, fsynced and renamed over the target. Then the domain
is destroyed, or, for a checkpoint (`xl save -c`), resumed in place: its
SCHEDOP_shutdown returns 1 and it runs on. On any failure after the suspend
the domain is resumed, as xl does, and nothing is left at the target.

`restore_domain` checks every layer of a whole file before anything starts
(reading its records but not its pages); then it creates the guest from the
file's config, refills its populated frames from the file (but the boot
frames, which the builder wrote anew: libxc's restore rewrites start_info's
too) with the kernel's copies, gives it its execution state and its XenStore
data, and unpauses it. The kernel boots in resume mode: new
XenStore and console connections, every front end's handshake with a fresh
back end, and the program called with its saved state.
"""

import contextvars
import fcntl
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from xenlike.abi.domctl import XEN_DOMINF_shutdown, XEN_DOMINF_shutdownshift
from xenlike.abi.sched import ShutdownReason
from xenlike.hypervisor.core import XEN_VERSION
from xenlike.memory import XEN_PAGE_SIZE, BootLayout
from xenlike.migration import DomainImage, StreamError, scan_save_file, write_save_file
from xenlike.migration.image import Page
from xenlike.migration.libxc_stream import PageRun
from xenlike.migration.xl_format import header_info, save_file_header
from xenlike.topology import DiskSpec, DomainConfig, VifSpec
from xenlike.xc import MemoryFile
from xenlike.xenstore import XenStoreError

__all__ = [
    "ACK_TIMEOUT",
    "SUSPEND_TIMEOUT",
    "Progress",
    "Refill",
    "SaveError",
    "domain_config",
    "domain_state",
    "finish_restore",
    "profiled",
    "restore_domain",
    "save_domain",
    "span",
    "suspend",
    "suspended_image",
]

ACK_TIMEOUT = 60.0  # libxl: "guest acknowledgement of suspend request", 60 * 1000 ms
SUSPEND_TIMEOUT = 60.0  # libxl: suspend_common_wait_guest_timeout, 60 * 1000 ms
POLL_FIRST = 0.001  # seconds before the first look again at control/shutdown and the state,
POLL = 0.02  # doubling up to this: a guest answers in milliseconds, a loaded one in more
SUSPEND_ERROR = "error/suspend"  # the guest kernel's reason for refusing
REFUSAL_LIMIT = 200  # characters of it the user sees
SAVED_XENSTORE = ("data",)  # the guest's own subtrees a save carries
PROGRESS_MIN_FRAMES = 16384  # 64 MiB: a smaller domain's frames get one progress line
IOV_MAX = 1024  # buffers per writev (Linux's UIO_MAXIOV)
WRITE_CHUNK = 8 << 20  # bytes per writev at most
PIPE_SIZE = 1 << 20  # bytes a splice of a restore moves at most (Linux's pipe-max-size)

_SPANS: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "restore_spans", default=None
)

Progress = Callable[[str], Awaitable[None]]
"""Where progress lines go: the command's stderr (as xl's), or Dom0's log."""


async def _quiet(line: str) -> None:
    pass


class SaveError(ValueError):
    """A save that did not happen; the message is the one line the user sees."""


async def save_domain(
    toolstack: Any,
    record: Any,
    path: Path,
    *,
    checkpoint: bool,
    progress: Progress = _quiet,
) -> int:
    """Suspend the guest of `record`, write it to `path`; returns the file's size."""
    xc, xs, domid = toolstack.xc, toolstack.xs, record.domid
    name = record.config.name
    if record.state != "running":
        raise SaveError(f"cannot save {name}: it is {record.state}")
    if not path.parent.is_dir():
        raise SaveError(f"cannot save {name} to {path}: no directory {path.parent}")
    await suspend(xs, xc, domid, name)
    try:
        async with suspended_image(toolstack, record) as image:
            mandatory, optional, length = header_info(image)
            await progress(
                f"Saving to {path} new xl format (info {mandatory:#x}/{optional:#x}/{length})"
            )
            await progress(f"xc: info: Saving domain {domid}, type x86 PV")
            size = await trio.to_thread.run_sync(
                _write_atomically, path, write_save_file(image), _frames_progress(image, progress)
            )
            await progress("xc: End of stream: 0/0    0%")
    except BaseException:
        with trio.CancelScope(shield=True):
            await xc.resume(domid)
        raise
    if checkpoint:
        await xc.resume(domid)
    else:
        await toolstack._destroy(record)
    return size


def _frames_progress(image: DomainImage, progress: Progress) -> Callable[[int], None]:
    """libxc's "Frames" progress (xc_report_progress_step), called from the writing
    thread with the frames written so far: each tenth for a large domain, else the end."""
    total = len(image.pages)
    step = max(total // 10 if total >= PROGRESS_MIN_FRAMES else total, 1)
    reported = 0

    def frames(done: int) -> None:
        nonlocal reported
        if done >= reported + step or done == total != reported:
            reported = done
            line = f"xc: Frames: {done}/{total}  {done * 100 // max(total, 1):3d}%"
            trio.from_thread.run(progress, line)

    return frames


async def suspend(xs: Any, xc: Any, domid: int, name: str) -> None:
    """libxl's suspend of a PV guest (the module docstring): returns once the domain
    is shut down for suspend; SaveError (one line) if it refuses or does not."""
    home = f"/local/domain/{domid}"
    try:
        await xs.rm(f"{home}/{SUSPEND_ERROR}")
    except XenStoreError:
        pass
    await xs.write(f"{home}/control/shutdown", "suspend")
    with trio.move_on_after(ACK_TIMEOUT):
        for pause in _polls():
            if await _read(xs, f"{home}/control/shutdown") != "suspend":
                break
            await trio.sleep(pause)
    if not await _cancel_unacknowledged(xs, f"{home}/control/shutdown"):
        raise SaveError(f"cannot save {name}: guest didn't acknowledge suspend, request cancelled")
    refusal = await _read(xs, f"{home}/{SUSPEND_ERROR}")
    if refusal:
        reason = _printable(refusal)
        raise SaveError(f"cannot save {name}: the guest refused to suspend: {reason}")
    with trio.move_on_after(SUSPEND_TIMEOUT):
        for pause in _polls():
            flags = (await xc.domain_info(domid)).flags
            if flags & XEN_DOMINF_shutdown:
                reason = flags >> XEN_DOMINF_shutdownshift & 0xFF
                if reason != ShutdownReason.suspend:
                    raise SaveError(f"cannot save {name}: it shut down (reason {reason}) instead")
                return
            await trio.sleep(pause)
    raise SaveError(f"cannot save {name}: guest did not suspend, timed out")


def _polls() -> Iterator[float]:
    """The pauses between looks: from POLL_FIRST, doubling, then POLL for ever."""
    pause = POLL_FIRST
    while True:
        yield pause
        pause = min(pause * 2, POLL)


def _printable(text: str, limit: int = REFUSAL_LIMIT) -> str:
    """The guest's words as one line of printable text, no longer than `limit`: they
    reach the user's terminal, and the guest may be hostile."""
    first = next(iter(text.splitlines()), "")
    line = "".join(c if c.isprintable() else "?" for c in first)
    return line if len(line) <= limit else line[: limit - 3] + "..."


async def _cancel_unacknowledged(xs: Any, path: str) -> bool:
    """Whether the guest acknowledged; if not, withdraw the request, in a transaction
    so that an acknowledgement at the last minute still counts (as libxl)."""
    acked = True

    async def cancel(tx: Any) -> None:
        nonlocal acked
        try:
            acked = (await tx.read(path)).decode() != "suspend"
        except XenStoreError:
            acked = True
        if not acked:
            await tx.write(path, "")

    await xs.transact(cancel)
    return acked


async def _read(xs: Any, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode()
    except XenStoreError:
        return None


@asynccontextmanager
async def suspended_image(toolstack: Any, record: Any) -> AsyncIterator[DomainImage]:
    """The suspended domain as a DomainImage whose pages are views of its memory,
    mapped whole here (xc_map_foreign_bulk), valid inside the block; only the frames
    it granted, whose data lives in files of their own, are read through the
    hypervisor. Every page is a memoryview (the writer counts them by that)."""
    xc, domid = toolstack.xc, record.domid
    with await xc.map_memory(domid) as memory:
        whole = memoryview(memory.mapping)
        pages: dict[int, Page] = {
            gfn: whole[gfn * XEN_PAGE_SIZE : (gfn + 1) * XEN_PAGE_SIZE] for gfn in memory.populated
        }
        for gfn in memory.moved.intersection(pages):
            pages.update(
                (pfn, memoryview(page))
                for pfn, page in (await xc.read_frames(domid, gfn, 1)).items()
            )
        yield await domain_state(toolstack, record, pages)


async def domain_state(toolstack: Any, record: Any, pages: Mapping[int, Page]) -> DomainImage:
    """A suspended domain's image around `pages` (all of its memory for a save, none
    for the end of a live migration, which sent it before): its shared info page,
    execution state, elapsed time, XenStore data and config."""
    xc, domid = toolstack.xc, record.domid
    nr_pages = record.config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
    shared_gfn = BootLayout.for_domain(nr_pages).shared_info_gfn
    shared_info = pages.get(shared_gfn)
    if shared_info is None:
        shared_info = (await xc.read_frames(domid, shared_gfn, 1)).get(
            shared_gfn, bytes(XEN_PAGE_SIZE)
        )
    xenstore: dict[str, str] = {}
    for subtree in SAVED_XENSTORE:
        await _walk(toolstack.xs, f"/local/domain/{domid}", subtree, xenstore)
    return DomainImage(
        max_pfn=nr_pages - 1,
        pages=pages,
        shared_info=bytes(shared_info),
        vcpus={0: await xc.vcpu_context(domid)},
        xenstore=xenstore,
        config=attrs.asdict(record.config),
        elapsed_ns=await xc.tsc_info(domid),
    )


async def _walk(xs: Any, home: str, key: str, out: dict[str, str]) -> None:
    try:
        value = (await xs.read(f"{home}/{key}")).decode("utf-8", "replace")
        children = await xs.ls(f"{home}/{key}")
    except XenStoreError:
        return
    if value or not children:
        out[key] = value
    for child in children:
        await _walk(xs, home, f"{key}/{child}", out)


def _write_atomically(
    path: Path, pieces: Iterable[Page], frames: Callable[[int], None] = lambda done: None
) -> int:
    """The file appears whole or not at all: a temporary file beside it, fsynced,
    renamed over it, and the directory fsynced. The pieces go out uncopied, up to
    IOV_MAX of them or WRITE_CHUNK bytes a writev; `frames` hears how many pages
    (the memoryview pieces) are written."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    size = 0
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            batch: list[Page] = []
            batched = pages = 0
            for piece in pieces:
                batch.append(piece)
                batched += len(piece)
                pages += isinstance(piece, memoryview)
                if len(batch) == IOV_MAX or batched >= WRITE_CHUNK:
                    _writev(fd, batch)
                    size += batched
                    batch, batched = [], 0
                    frames(pages)
            _writev(fd, batch)
            size += batched
            frames(pages)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return size


def _writev(fd: int, buffers: list[Page], at: int | None = None) -> None:
    """All of `buffers`, in order, however short each writev falls: at the file's
    position, or from offset `at` (pwritev, which leaves the position alone)."""
    first = 0
    while first < len(buffers):
        rest = buffers[first:] if first else buffers
        written = os.writev(fd, rest) if at is None else os.pwritev(fd, rest, at)
        if at is not None:
            at += written
        while first < len(buffers) and written >= len(buffers[first]):
            written -= len(buffers[first])
            first += 1
        if written:
            buffers[first] = memoryview(buffers[first])[written:]


async def restore_domain(toolstack: Any, path: Path, progress: Progress = _quiet) -> Any:
    """A new guest from the save file at `path`; SaveError (one line) if the file is
    unreadable, corrupt, foreign or names a domain that exists; nothing starts then.
    Every record of the file is checked before anything starts, in one pass over
    its record headers and pfn lists (`scan_save_file`); the pages are then moved
    from the file into the new domain's memory by the kernel (`Refill.copy`), from
    the same open file: one cut short since is a clean error, and no domain."""
    try:
        with span("read_and_check"):
            source, header, image, runs = await trio.to_thread.run_sync(_scan, path)
    except OSError as exc:
        raise SaveError(f"cannot restore from {path}: {exc.strerror}") from None
    except StreamError as exc:
        raise SaveError(f"cannot restore from {path}: {exc}") from None
    try:
        return await _restore(toolstack, path, progress, source, header, image, runs)
    finally:
        os.close(source)


async def _restore(
    toolstack: Any,
    path: Path,
    progress: Progress,
    source: int,
    header: Any,
    image: DomainImage,
    runs: list[PageRun],
) -> Any:
    config = domain_config(image, path)
    if config.name in toolstack.guests:
        raise SaveError(f"cannot restore {config.name}: a domain named {config.name!r} exists")
    nr_pages = config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
    if image.max_pfn != nr_pages - 1:
        raise SaveError(
            f"cannot restore from {path}: {image.max_pfn + 1} frames for a {nr_pages}-frame domain"
        )
    await progress(
        f"Loading new save file {path} (new xl fmt info {header.mandatory_flags:#x}/"
        f"{header.optional_flags:#x}/{header.optional_data_len})"
    )
    await progress(" Savefile contains xl domain config in JSON format")
    await progress("Parsing config from <saved>")
    await progress(f"xc: info: Found x86 PV domain from Xen {XEN_VERSION[0]}.{XEN_VERSION[1]}")
    await progress("xc: info: Restoring domain")

    async def refill(domid: int) -> None:
        with span("refill"):
            async with Refill.opened(toolstack.xc, domid, config) as memory:
                try:
                    await memory.copy(source, runs)
                except EOFError:
                    raise SaveError(
                        f"cannot restore from {path}: the file was cut short as it was restored"
                    ) from None
                except OSError as exc:
                    raise SaveError(f"cannot restore from {path}: {exc.strerror}") from None

    async def finish(domid: int) -> None:
        await finish_restore(toolstack, domid, image)

    record = await toolstack.create(config, fill=refill, before_unpause=finish)
    await progress("xc: info: Restore successful")
    return record


@contextmanager
def span(name: str) -> Iterator[None]:
    """Time a step of a restore that asked for its profile (`profiled`), in ns, added
    under `name`; anything else runs untimed."""
    spans = _SPANS.get()
    if spans is None:
        yield
        return
    start = time.perf_counter_ns()
    try:
        yield
    finally:
        spans[name] = spans.get(name, 0) + time.perf_counter_ns() - start


@contextmanager
def profiled() -> Iterator[dict[str, int]]:
    """The spans (`span`) of what runs inside, by name, in ns."""
    spans: dict[str, int] = {}
    token = _SPANS.set(spans)
    try:
        yield spans
    finally:
        _SPANS.reset(token)


def _scan(path: Path) -> tuple[int, Any, DomainImage, list[PageRun]]:
    """The file opened, its xl header, the image its records hold (no pages) and where
    its pages lie; the descriptor is the caller's to close, unless this raises."""
    source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        image, runs = scan_save_file(source)
        header = save_file_header.parse(os.pread(source, save_file_header.sizeof(), 0))
    except BaseException:
        os.close(source)
        raise
    return source, header, image, runs


@attrs.define(eq=False)
class Refill:
    """Writes a saved domain's frames into a new domain built for them, before it
    first runs, straight into its memory file: all but the boot frames, which the
    builder wrote anew (libxc's restore rewrites start_info's too), and none beyond
    what the builder populated. The kernel copies the bytes: Dom0 maps none of
    them, so no page of the new memory is faulted or zeroed here (shmem allocates
    each page as it is written). `restore` copies them from its file (`copy`),
    `migrate-receive` writes them as they arrive (`write`)."""

    xc: Any
    domid: int
    memory: MemoryFile
    first: int  # the first frame after the boot frames
    end: int  # one past the last frame the builder populated

    @classmethod
    @asynccontextmanager
    async def opened(cls, xc: Any, domid: int, config: DomainConfig) -> AsyncIterator["Refill"]:
        nr_pages = config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
        first = BootLayout.for_domain(nr_pages).first_free_gfn
        end = config.memory * 1024 * 1024 // XEN_PAGE_SIZE
        with span("refill_open"):
            memory = await xc.memory_file(domid)
        with memory:
            if not memory.all_populated(first, end):  # the builder's, so never
                raise SaveError(f"d{domid}'s frames {first}..{end - 1} are not all populated")
            yield cls(xc, domid, memory, first, end)

    async def write(self, pages: Mapping[int, Page]) -> None:
        """Each of `pages` into its frame (a later write of a frame wins), a run of
        consecutive frames a pwritev."""
        moved, fd = self.memory.moved, self.memory.fd
        batch: list[Page] = []
        at = 0  # the frame batch[0] goes to
        for pfn, page in pages.items():
            if not self.first <= pfn < self.end:
                continue
            if pfn in moved:  # not in the memory file: through the hypervisor
                await self.xc.write_frames(self.domid, pfn, bytes(page))
                continue
            if batch and pfn == at + len(batch) and len(batch) < IOV_MAX:
                batch.append(page)
                continue
            if batch:
                _writev(fd, batch, at * XEN_PAGE_SIZE)
            batch, at = [page], pfn
        if batch:
            _writev(fd, batch, at * XEN_PAGE_SIZE)

    async def copy(self, source: int, runs: Iterable[PageRun]) -> None:
        """The frames `runs` name (ascending, each once, as `scan_save_file` gives them)
        from the file open at `source`, in a worker thread: EOFError if the file is
        shorter than the runs say (cut short since it was checked)."""
        segments: list[tuple[int, int, int]] = []  # (file offset, memory offset, bytes)
        apart: list[tuple[int, int]] = []  # (moved frame, file offset)
        moved = self.memory.moved
        for first, count, at in runs:
            low, high = max(first, self.first), min(first + count, self.end)
            at += (low - first) * XEN_PAGE_SIZE
            for pfn in sorted(pfn for pfn in moved if low <= pfn < high):
                apart.append((pfn, at + (pfn - low) * XEN_PAGE_SIZE))
                if pfn > low:
                    segments.append((at, low * XEN_PAGE_SIZE, (pfn - low) * XEN_PAGE_SIZE))
                at += (pfn + 1 - low) * XEN_PAGE_SIZE
                low = pfn + 1
            if low < high:
                segments.append((at, low * XEN_PAGE_SIZE, (high - low) * XEN_PAGE_SIZE))
        await trio.to_thread.run_sync(_splice, source, self.memory.fd, segments)
        for pfn, at in apart:
            page = os.pread(source, XEN_PAGE_SIZE, at)
            if len(page) != XEN_PAGE_SIZE:
                raise EOFError(f"frame {pfn:#x} at offset {at}")
            await self.xc.write_frames(self.domid, pfn, page)


def _splice(source: int, target: int, segments: Iterable[tuple[int, int, int]]) -> None:
    """Each (source offset, target offset, bytes) from file to file through a pipe:
    the source's page-cache pages go into the pipe by reference and out of it
    with one copy, into the target's pages as shmem allocates them. Explicit
    offsets on both sides: the target is the hypervisor's own open file, whose
    position is not ours to move. EOFError if the source ends first."""
    out, into = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            capacity = fcntl.fcntl(into, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above /proc/sys/fs/pipe-max-size: the default
            capacity = fcntl.fcntl(into, fcntl.F_GETPIPE_SZ)
        for at, to, size in segments:
            while size:
                moved = os.splice(source, into, min(size, capacity), offset_src=at)
                if not moved:
                    raise EOFError(f"offset {at}")
                at, size = at + moved, size - moved
                while moved:
                    written = os.splice(out, target, moved, offset_dst=to)
                    to, moved = to + written, moved - written
    finally:
        os.close(out)
        os.close(into)


async def finish_restore(toolstack: Any, domid: int, image: DomainImage) -> None:
    """What a restored domain gets besides its memory, before it first runs: its
    execution state, its time (X86_TSC_INFO's elapsed ns), its XenStore data."""
    with span("finish_context"):
        await toolstack.xc.set_vcpu_context(domid, image.vcpus.get(0, b""))
        await toolstack.xc.set_tsc_info(domid, image.elapsed_ns)

    async def write(tx: Any) -> None:
        for key, value in image.xenstore.items():
            await tx.write(f"/local/domain/{domid}/{key}", value)

    if image.xenstore:
        with span("finish_xenstore"):
            await toolstack.xs.transact(write)  # one commit, as the domain tree's


def domain_config(image: DomainImage, path: Path | str) -> DomainConfig:
    """The file's config (JSON, as `config` keeps it) as a DomainConfig, or one line."""
    if image.config is None:
        raise SaveError(f"cannot restore from {path}: the file holds no domain config")
    try:
        fields = dict(image.config)
        fields["disks"] = tuple(DiskSpec(**disk) for disk in fields.get("disks", ()))
        fields["vifs"] = tuple(VifSpec(**vif) for vif in fields.get("vifs", ()))
        fields["devices"] = tuple(dict(device) for device in fields.get("devices", ()))
        config = DomainConfig(**fields)
        if not isinstance(config.name, str) or not isinstance(config.memory, int):
            raise TypeError("name and memory are a string and a number")
    except (TypeError, ValueError) as exc:
        raise SaveError(
            f"cannot restore from {path}: its config is not a domain's: {exc}"
        ) from None
    return config
