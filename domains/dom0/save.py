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

`restore_domain` reads a whole file and checks every layer before anything
starts; then it creates the guest from the file's config, refills its
populated frames (but the boot frames, which the builder wrote anew: libxc's
restore rewrites start_info's too), gives it its execution state and its
XenStore data, and unpauses it. The kernel boots in resume mode: new
XenStore and console connections, every front end's handshake with a fresh
back end, and the program called with its saved state.
"""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from xenlike.abi.domctl import XEN_DOMINF_shutdown, XEN_DOMINF_shutdownshift
from xenlike.abi.sched import ShutdownReason
from xenlike.memory import XEN_PAGE_SIZE, BootLayout
from xenlike.migration import DomainImage, StreamError, read_save_file, write_save_file
from xenlike.topology import DiskSpec, DomainConfig, VifSpec
from xenlike.xenstore import XenStoreError

__all__ = ["ACK_TIMEOUT", "SUSPEND_TIMEOUT", "restore_domain", "save_domain"]

ACK_TIMEOUT = 60.0  # libxl: "guest acknowledgement of suspend request", 60 * 1000 ms
SUSPEND_TIMEOUT = 60.0  # libxl: suspend_common_wait_guest_timeout, 60 * 1000 ms
POLL = 0.02  # seconds between looks at control/shutdown and at the domain's state
SUSPEND_ERROR = "error/suspend"  # the guest kernel's reason for refusing
REFUSAL_LIMIT = 200  # characters of it the user sees
SAVED_XENSTORE = ("data",)  # the guest's own subtrees a save carries


class SaveError(ValueError):
    """A save that did not happen; the message is the one line the user sees."""


async def save_domain(
    toolstack: Any,
    record: Any,
    path: Path,
    *,
    checkpoint: bool,
    progress: Callable[[str], Any] = lambda line: None,
) -> int:
    """Suspend the guest of `record`, write it to `path`; returns the file's size."""
    xc, xs, domid = toolstack.xc, toolstack.xs, record.domid
    name = record.config.name
    if record.state != "running":
        raise SaveError(f"cannot save {name}: it is {record.state}")
    if not path.parent.is_dir():
        raise SaveError(f"cannot save {name} to {path}: no directory {path.parent}")
    await _suspend(xs, xc, domid, name)
    try:
        image = await _image(toolstack, record, progress)
        size = await trio.to_thread.run_sync(_write_atomically, path, image)
    except BaseException:
        with trio.CancelScope(shield=True):
            await xc.resume(domid)
        raise
    if checkpoint:
        await xc.resume(domid)
    else:
        await toolstack._destroy(record)
    return size


async def _suspend(xs: Any, xc: Any, domid: int, name: str) -> None:
    home = f"/local/domain/{domid}"
    try:
        await xs.rm(f"{home}/{SUSPEND_ERROR}")
    except XenStoreError:
        pass
    await xs.write(f"{home}/control/shutdown", "suspend")
    with trio.move_on_after(ACK_TIMEOUT):
        while await _read(xs, f"{home}/control/shutdown") == "suspend":
            await trio.sleep(POLL)
    if not await _cancel_unacknowledged(xs, f"{home}/control/shutdown"):
        raise SaveError(f"cannot save {name}: guest didn't acknowledge suspend, request cancelled")
    refusal = await _read(xs, f"{home}/{SUSPEND_ERROR}")
    if refusal:
        reason = _printable(refusal)
        raise SaveError(f"cannot save {name}: the guest refused to suspend: {reason}")
    with trio.move_on_after(SUSPEND_TIMEOUT):
        while True:
            flags = (await xc.domain_info(domid)).flags
            if flags & XEN_DOMINF_shutdown:
                reason = flags >> XEN_DOMINF_shutdownshift & 0xFF
                if reason != ShutdownReason.suspend:
                    raise SaveError(f"cannot save {name}: it shut down (reason {reason}) instead")
                return
            await trio.sleep(POLL)
    raise SaveError(f"cannot save {name}: guest did not suspend, timed out")


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


async def _image(toolstack: Any, record: Any, progress: Callable[[str], Any]) -> DomainImage:
    """The suspended domain as a DomainImage. Its memory is mapped here whole
    (xc_map_foreign_bulk); only the frames it granted, whose data lives in
    files of their own, are read through the hypervisor."""
    xc, domid = toolstack.xc, record.domid
    nr_pages = record.config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
    pages: dict[int, bytes] = {}
    with await xc.map_memory(domid) as memory:
        total = len(memory.populated)
        step = max(total // 8, 1)
        for done, gfn in enumerate(memory.populated, 1):
            if gfn in memory.moved:
                pages.update(await xc.read_frames(domid, gfn, 1))
            else:
                with memory.frames(gfn) as page:
                    pages[gfn] = bytes(page)
            if done % step == 0 or done == total:
                progress(f"{done * 100 // total}% of {total} frames read")
    layout = BootLayout.for_domain(nr_pages)
    shared_info = pages.get(layout.shared_info_gfn, bytes(XEN_PAGE_SIZE))
    context = await xc.vcpu_context(domid)
    elapsed = await xc.tsc_info(domid)
    xenstore: dict[str, str] = {}
    for subtree in SAVED_XENSTORE:
        await _walk(toolstack.xs, f"/local/domain/{domid}", subtree, xenstore)
    return DomainImage(
        max_pfn=nr_pages - 1,
        pages=pages,
        shared_info=shared_info,
        vcpus={0: context},
        xenstore=xenstore,
        config=attrs.asdict(record.config),
        elapsed_ns=elapsed,
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


def _write_atomically(path: Path, image: DomainImage) -> int:
    """The file appears whole or not at all: a temporary file beside it, fsynced,
    renamed over it, and the directory fsynced."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    size = 0
    try:
        with open(temporary, "wb") as out:
            for chunk in write_save_file(image):
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
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


async def restore_domain(toolstack: Any, path: Path) -> Any:
    """A new guest from the save file at `path`; SaveError (one line) if the file is
    unreadable, corrupt, foreign or names a domain that exists; nothing starts then."""
    try:
        data = await trio.to_thread.run_sync(path.read_bytes)
    except OSError as exc:
        raise SaveError(f"cannot restore from {path}: {exc.strerror}") from None
    try:
        image = read_save_file(data)
    except StreamError as exc:
        raise SaveError(f"cannot restore from {path}: {exc}") from None
    config = _config(image, path)
    if config.name in toolstack.guests:
        raise SaveError(f"cannot restore {config.name}: a domain named {config.name!r} exists")
    nr_pages = config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
    if image.max_pfn != nr_pages - 1:
        raise SaveError(
            f"cannot restore from {path}: {image.max_pfn + 1} frames for a {nr_pages}-frame domain"
        )
    context = image.vcpus.get(0, b"")

    async def refill(domid: int) -> None:
        xc, xs = toolstack.xc, toolstack.xs
        first_free = BootLayout.for_domain(nr_pages).first_free_gfn
        populated = config.memory * 1024 * 1024 // XEN_PAGE_SIZE  # what the builder populated
        with await xc.map_memory(domid, writable=True) as memory:
            for pfn in range(first_free, populated):
                page = image.pages.get(pfn)
                if page is None:
                    continue
                if pfn in memory.moved:  # not in the mapping: through the hypervisor
                    await xc.write_frames(domid, pfn, page)
                    continue
                with memory.frames(pfn) as frame:
                    frame[:] = page
        await xc.set_vcpu_context(domid, context)
        await xc.set_tsc_info(domid, image.elapsed_ns)
        for key, value in image.xenstore.items():
            await xs.write(f"/local/domain/{domid}/{key}", value)

    return await toolstack.create(config, before_unpause=refill)


def _config(image: DomainImage, path: Path) -> DomainConfig:
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
