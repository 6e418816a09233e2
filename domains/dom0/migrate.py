"""`xl migrate` and `xl migrate-receive` in Dom0's toolstack: save and restore over a
stream, with xl's handshake (tools/xl/xl_migrate.c).

The transport (a pipe to a child process, an ssh, a TCP connection) is set up
by the `xenlike migrate` / `migrate-receive` commands, which hand its file
descriptors to Dom0 with SCM_RIGHTS on the toolstack socket, beside their
request: Dom0's toolstack, which holds the privileged handle, then reads and
writes the stream itself, and no process relays the bytes. Progress goes back
to the command as {"progress": LINE} lines before the answer; when the command
goes away (its connection closes) the migration is cancelled, as xl's is when
its process dies.

On the wire, as xl: the receiver writes its banner; the sender writes xl's
save file (header, config, libxl's stream around libxc's) exactly as `save`
writes it; the receiver builds the domain paused as NAME--incoming and says
"ready"; the sender renames its copy NAME--migratedaway and gives "permission
to go"; the receiver renames its copy NAME, unpauses it and reports one
status byte; on 0 the sender destroys its copy. Before "ready" any failure
resumes the domain at the sender ("Migration failed, resuming at sender."),
and the receiver destroys what it had built.
"""

import json
import logging
import os
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import attrs
import trio

from domains.dom0 import save
from xenlike.hypercall import HypercallError
from xenlike.hypervisor.logdirty import bitmap_frames
from xenlike.memory import XEN_PAGE_SIZE
from xenlike.migration import DomainImage, StreamError, read_save_file, write_save_file
from xenlike.migration._record import REC_ALIGN, record
from xenlike.migration.image import Page
from xenlike.migration.libxc_stream import (
    MAX_BATCH_SIZE,
    REC_LENGTH_MAX,
    parse_page_data,
    xc_sr_dhdr,
    xc_sr_ihdr,
    xc_sr_rec_page_data_header,
    xc_sr_rec_x86_tsc_info,
)
from xenlike.migration.libxc_stream import RecType as LibxcRecType
from xenlike.migration.libxl_stream import RecType as LibxlRecType
from xenlike.migration.libxl_stream import libxl__sr_hdr
from xenlike.migration.xl_format import save_file_header, savefileheader_magic
from xenlike.topology import DOMAIN_NAME
from xenlike.xenstore import XenStoreError

__all__ = [
    "MIGRATION_OPS",
    "MigrationError",
    "Peer",
    "migrate_receiver_banner",
    "migrate_receiver_ready",
    "migrate_permission_to_go",
    "migrate_report",
    "migration_op",
    "receive_with_fds",
]

# tools/xl/xl.h: the banner goes without its NUL, the others with theirs.
migrate_receiver_banner = b"xl migration receiver ready, send binary domain data.\n"
migrate_receiver_ready = b"domain received, ready to unpause\0"
migrate_permission_to_go = b"domain is yours, you are cleared to unpause\0"
migrate_report = b"my copy unpause results are as follows\0"  # then one status byte

MIGRATION_OPS = ("migrate", "migrate-receive")
BANNER_TIMEOUT = 60.0  # for the receiver to start (an ssh may ask nothing: it has no tty)
READY_TIMEOUT = 300.0  # for the receiver to build the domain once the stream is in
GO_TIMEOUT = 300.0  # for the sender to rename its copy and say "go"
MAX_FDS = 2
MAX_OPTIONAL = 1 << 20  # bytes of xl optional data (the config) a receiver takes
CHUNK = 1 << 20
MAX_ROUNDS = 5  # xg_sr_save.c's simple_precopy_policy: SPP_MAX_ITERATIONS
DIRTY_THRESHOLD = 50  # and SPP_TARGET_DIRTY_COUNT
_REC_HDR = struct.Struct("<II")
_TSC_SIZE = xc_sr_rec_x86_tsc_info.sizeof()
log = logging.getLogger("xenlike.dom0.migrate")


class MigrationError(ValueError):
    """A migration that did not happen; the message is the one line the user sees."""


# --- the toolstack connection: file descriptors, progress, hang-up ----------------------


async def receive_with_fds(stream: trio.SocketStream, fds: list[int]) -> bytes:
    """The next bytes from a toolstack client, and any descriptors it passed with them
    (SCM_RIGHTS), appended to `fds`; at most MAX_FDS are kept, the rest closed."""
    try:
        data, ancillary, _, _ = await stream.socket.recvmsg(
            65536, socket.CMSG_SPACE(MAX_FDS * 4 * 4)
        )
    except OSError:  # a client killed with our answer unread resets: it has gone
        return b""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = list(
                struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
            )
            fds.extend(received)
    while len(fds) > MAX_FDS:
        os.close(fds.pop())
    return data


@attrs.define(eq=False)
class Peer:
    """The client of one migration request: its descriptors and its connection."""

    stream: trio.SocketStream
    fds: list[int]
    gone: bool = False  # the client went away: no answer is sent

    async def say(self, line: str) -> None:
        try:
            await self.stream.send_all(json.dumps({"progress": line}).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.gone = True

    async def hangup(self) -> None:
        """Returns when the client's end closes (it is not to send more)."""
        try:
            while await self.stream.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self.gone = True

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


async def migration_op(toolstack: Any, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
    """One `migrate` or `migrate-receive` request, cancelled if its client goes away."""
    if len(peer.fds) != 2:
        raise MigrationError(f"{request['op']}: pass the stream's two descriptors with it")
    send = trio.lowlevel.FdStream(peer.fds.pop(0))
    recv = trio.lowlevel.FdStream(peer.fds.pop(0))
    answer: dict[str, Any] = {}
    failures: list[Exception] = []

    async def work(cancel: trio.CancelScope) -> None:
        try:
            if request["op"] == "migrate":
                answer.update(await _migrate(toolstack, request, send, recv, peer.say))
            else:
                answer.update(await _receive(toolstack, request, send, recv, peer.say))
        except (ValueError, LookupError, HypercallError, XenStoreError) as exc:
            failures.append(exc)  # the answer's error, not the nursery's exception group
        except Exception as exc:  # the stream broke: one line, never Dom0's end
            failures.append(MigrationError(f"{request['op']}: {_reason(exc)}"))
        finally:
            cancel.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(work, nursery.cancel_scope)
            await peer.hangup()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await send.aclose()
            await recv.aclose()
    if failures:
        raise failures[0]
    if not answer:
        raise MigrationError(f"{request['op']}: the command went away; cancelled")
    return {"ok": True, **answer}


# --- reading the stream -----------------------------------------------------------------


class _Reader:
    """Exact reads from a stream; every byte of the save file is kept in `kept`."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.kept = bytearray()
        self.limit = limit

    async def exactly(self, size: int, what: str, keep: bool = True) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.stream.receive_some(CHUNK)
            if not chunk:
                raise MigrationError(f"the migration stream ended in the {what}")
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        if keep:
            self._keep(data)
        return data

    def _keep(self, data: bytes) -> None:
        if len(self.kept) + len(data) > self.limit:
            raise MigrationError(f"the migration stream's records pass {self.limit} bytes")
        self.kept += data

    async def more(self) -> bool:
        """Whether the stream has a byte to come (False: it ended here)."""
        if not self.buffer:
            self.buffer += await self.stream.receive_some(CHUNK)
        return bool(self.buffer)

    async def expect(self, message: bytes, what: str) -> None:
        """xl's migrate_read_fixedmessage."""
        if await self.exactly(len(message), what, keep=False) != message:
            raise MigrationError(
                f"the migration stream contained unexpected data instead of {what}"
            )

    async def records(self, layer: str, page_data: Callable[[bytes], Awaitable[None]]) -> None:
        """The records of one layer through its END, kept, but libxc's PAGE_DATA
        records, which go to `page_data` (the body) instead."""
        while True:
            header = await self.exactly(8, f"{layer} record header", keep=False)
            rec_type, length = _REC_HDR.unpack(header)
            if length > REC_LENGTH_MAX:
                raise MigrationError(f"{layer} record of {length} bytes in the migration stream")
            if layer == "libxc" and rec_type == LibxcRecType.PAGE_DATA:
                body = await self.exactly(length + -length % REC_ALIGN, "PAGE_DATA", keep=False)
                await page_data(body[:length])
                continue
            self._keep(header)
            await self.exactly(length + -length % REC_ALIGN, f"{layer} record")
            if rec_type == 0:  # END
                return
            if layer == "libxl" and rec_type == LibxlRecType.LIBXC_CONTEXT:
                await self.exactly(xc_sr_ihdr.sizeof() + xc_sr_dhdr.sizeof(), "libxc headers")
                await self.records("libxc", page_data)


def _config_of(optional: bytes) -> dict[str, Any]:
    """The domain config in xl's optional data, for the checks made before the memory
    comes (read_save_file checks the whole stream after)."""
    try:
        (length,) = struct.unpack_from("<I", optional)
        config = json.loads(optional[4 : 4 + length].rstrip(b"\0"))
    except (struct.error, ValueError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise MigrationError("the migration stream carries no domain config")
    return config


# --- the receiver ---------------------------------------------------------------------


async def _receive(
    toolstack: Any,
    request: dict[str, Any],
    send: trio.abc.SendStream,
    recv: trio.abc.ReceiveStream,
    say: Callable[[str], Awaitable[None]],
) -> dict[str, Any]:
    """xl's migrate_receive: the domain is built paused as NAME--incoming once its
    config has come, and its memory written as PAGE_DATA records arrive (a frame
    sent again takes its later content); the rest of the stream is checked whole
    (read_save_file) at its END, before "ready"."""
    await say("migration target: Ready to receive domain.")
    await send.send_all(migrate_receiver_banner)
    reader = _Reader(recv, MAX_OPTIONAL + (16 << 20))
    if not await reader.more():  # the sender gave up before its stream (and says why)
        return {"name": None}
    header = save_file_header.parse(await reader.exactly(save_file_header.sizeof(), "xl header"))
    if header.magic != savefileheader_magic or header.optional_data_len > MAX_OPTIONAL:
        raise MigrationError("the migration stream is not xl's (no save file header)")
    config = _config_of(await reader.exactly(header.optional_data_len, "xl optional data"))
    name = config["name"]
    _check_arrival(toolstack, name, config)
    bare = DomainImage(max_pfn=0, pages={}, shared_info=bytes(XEN_PAGE_SIZE), vcpus={0: b""})
    domain = save.domain_config(attrs.evolve(bare, config=config), "the migration stream")
    incoming = attrs.evolve(domain, name=f"{domain.name}--incoming")
    went = False

    async def before_unpause(domid: int) -> None:
        nonlocal went
        await reader.exactly(libxl__sr_hdr.sizeof(), "libxl stream header")
        async with save.Refill.opened(toolstack.xc, domid, domain) as refill:
            memory = _Memory(refill, domain)
            await reader.records("libxl", memory.page_data)
        await say(f"migration target: received {memory.received} frames of {name}")
        try:
            image = read_save_file(bytes(reader.kept))  # every record but PAGE_DATA
        except StreamError as exc:
            raise MigrationError(f"cannot receive {name}: {exc}") from None
        if image.max_pfn != memory.nr_pages - 1:
            raise MigrationError(
                f"cannot receive {name}: {image.max_pfn + 1} frames for {memory.nr_pages}"
            )
        await save.finish_restore(toolstack, domid, image)
        await say("migration target: Transfer complete, requesting permission to start domain.")
        await send.send_all(migrate_receiver_ready)
        with trio.fail_after(GO_TIMEOUT):
            await reader.expect(migrate_permission_to_go, "GO message")
        went = True
        await say("migration target: Got permission, starting domain.")
        await toolstack.rename(incoming.name, domain.name)

    try:
        async with toolstack._lock:
            _check_arrival(toolstack, name, config)
            record = await toolstack.create(incoming, before_unpause=before_unpause)
    except BaseException:
        if went:  # the sender waits for our report, then takes its domain back
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await send.send_all(migrate_report + b"\x01")
                await say("migration target: Failure, destroying our copy.")
                await send.send_all(migrate_permission_to_go)
        raise
    await send.send_all(migrate_report + b"\x00")
    await say("migration target: Domain started successsfully.")
    return {"name": record.config.name, "domid": record.domid}


class _Memory:
    """Writes PAGE_DATA records into a built, paused domain as they come, with
    `restore`'s refill (save.Refill); a frame sent again takes its later content,
    a frame gone since it was sent (XTAB) is left as it is. A hostile record is
    one line."""

    def __init__(self, refill: save.Refill, config: Any) -> None:
        self.refill, self.name = refill, config.name
        self.nr_pages = config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
        self.received = 0
        self.limit = (MAX_ROUNDS + 1) * self.nr_pages  # every frame in every round

    async def page_data(self, body: bytes) -> None:
        try:
            pages, _ = parse_page_data(memoryview(body), self.nr_pages - 1)
        except ValueError as exc:
            raise MigrationError(f"cannot receive {self.name}: {exc}") from None
        self.received += len(pages)
        if self.received > self.limit:
            raise MigrationError(
                f"cannot receive {self.name}: PAGE_DATA record beyond {self.limit} frames:"
                f" more than {MAX_ROUNDS + 1} rounds"
            )
        await self.refill.write(pages)


def _check_arrival(toolstack: Any, name: str, config: dict[str, Any]) -> None:
    """What would make the domain fail here, found before its memory comes."""
    if not re.fullmatch(DOMAIN_NAME, name):  # it names files here (its console log)
        raise MigrationError(f"cannot receive a domain named {name[:64]!r}: not a name")
    for taken in (name, f"{name}--incoming"):
        if taken in toolstack.guests or taken == "Domain-0":
            raise MigrationError(f"cannot receive {name}: a domain named {taken!r} exists here")
    images = toolstack.topology.dom0.images
    for disk in config.get("disks") or ():
        target = disk.get("target") if isinstance(disk, dict) else None
        if target not in images:
            raise MigrationError(
                f"cannot receive {name}: its disk {target!r} is not one of this host's images"
                " ([dom0] images; the hosts share `[host] images`)"
            )


# --- the sender -----------------------------------------------------------------------


async def _migrate(
    toolstack: Any,
    request: dict[str, Any],
    send: trio.abc.SendStream,
    recv: trio.abc.ReceiveStream,
    say: Callable[[str], Awaitable[None]],
) -> dict[str, Any]:
    async with toolstack._lock:
        record = toolstack._record(request["name"])
        name = record.config.name
        if record.state != "running":
            raise MigrationError(f"cannot migrate {name}: it is {record.state}")
        reader = _Reader(recv, 0)
        try:
            with trio.fail_after(BANNER_TIMEOUT):
                await reader.expect(migrate_receiver_banner, "banner")
        except (MigrationError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
            raise MigrationError(f"cannot migrate {name}: no receiver: {_reason(exc)}") from None
        if request.get("live", True):
            sent = await _send_live(
                toolstack, record, send, reader, say, bool(request.get("debug"))
            )
        else:
            sent = await _send(toolstack, record, send, reader, say)
        return await _hand_over(toolstack, record, send, reader, say, sent)


async def _send_live(
    toolstack: Any,
    record: Any,
    send: trio.abc.SendStream,
    reader: _Reader,
    say: Callable[[str], Awaitable[None]],
    debug: bool,
) -> int:
    """Pre-copy, as xg_sr_save.c's send_memory_live with its simple policy: under
    log-dirty, round 1 sends every populated frame while the guest runs, each
    later round the frames written since the one before, until fewer than
    DIRTY_THRESHOLD are dirty or after MAX_ROUNDS; then the guest is suspended and
    the last dirty frames go with its execution state (stop-and-copy). The
    receiver keeps a frame's last content. Resumes the guest on failure."""
    name, domid, xc = record.config.name, record.domid, toolstack.xc
    nr_pages = record.config.max_memory * 1024 * 1024 // XEN_PAGE_SIZE
    head, _ = _stream_around_memory(_image_without_memory(record, nr_pages))
    sent = 0
    suspended = False

    async def report(line: str) -> None:
        log.info("migrate %s: %s", name, line)
        if debug:
            await say(f"migration sender: {line}")

    await xc.logdirty_enable(domid)
    try:
        for piece in head:
            await send.send_all(piece)
            sent += len(piece)
        started = trio.current_time()
        pfns: Sequence[int] = range(nr_pages)
        for round_number in range(1, MAX_ROUNDS + 1):
            frames, size = await _send_frames(xc, domid, send, pfns)
            sent += size
            pfns = bitmap_frames(await xc.logdirty_clean(domid))
            await report(f"round {round_number}: {frames} frames sent, {len(pfns)} dirty")
            if len(pfns) < DIRTY_THRESHOLD:
                break
        try:
            await save.suspend(toolstack.xs, xc, domid, name)
        except save.SaveError as exc:
            raise MigrationError(str(exc).replace("cannot save", "cannot migrate", 1)) from None
        suspended = True
        suspend_at = trio.current_time()
        # the last round's dirty frames, and those written since (the guest ran on)
        last = sorted({*pfns, *bitmap_frames(await xc.logdirty_clean(domid))})
        frames, size = await _send_frames(xc, domid, send, last)
        sent += size
        _, tail = _stream_around_memory(await save.domain_state(toolstack, record, {}))
        for piece in tail:
            await send.send_all(piece)
            sent += len(piece)
        await report(
            f"suspended: {frames} frames sent in {trio.current_time() - suspend_at:.3f} s;"
            f" {sent} bytes in {trio.current_time() - started:.3f} s"
        )
        with trio.fail_after(READY_TIMEOUT):
            await reader.expect(migrate_receiver_ready, "ready message")
    except MigrationError as exc:
        if not suspended and str(exc).startswith("cannot migrate"):
            raise  # refused to suspend: it never stopped running
        await _resume(xc, domid, suspended)
        await say(f"migration sender: {_reason(exc)}")
        raise MigrationError("Migration failed, resuming at sender.") from None
    except (OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        await _resume(xc, domid, suspended)
        await say(f"migration sender: {_reason(exc)}")
        raise MigrationError("Migration failed, resuming at sender.") from None
    except BaseException:
        await _resume(xc, domid, suspended)
        raise
    finally:
        with trio.CancelScope(shield=True):
            try:
                await xc.logdirty_off(domid)
            except HypercallError:
                pass
    return sent


async def _resume(xc: Any, domid: int, suspended: bool) -> None:
    if suspended:
        with trio.CancelScope(shield=True):
            await xc.resume(domid)


def _image_without_memory(record: Any, nr_pages: int) -> DomainImage:
    return DomainImage(
        max_pfn=nr_pages - 1,
        pages={},
        shared_info=bytes(XEN_PAGE_SIZE),
        vcpus={0: b""},
        config=attrs.asdict(record.config),
    )


def _stream_around_memory(image: DomainImage) -> tuple[list[Page], list[Page]]:
    """`save`'s stream for `image` (which has no pages), cut where its PAGE_DATA
    records would go: before X86_TSC_INFO, the first record after the memory."""
    pieces = list(write_save_file(image))
    tsc = next(
        i
        for i, piece in enumerate(pieces)
        if piece[:8] == _REC_HDR.pack(LibxcRecType.X86_TSC_INFO, _TSC_SIZE)
    )
    return pieces[:tsc], pieces[tsc:]


async def _send_frames(
    xc: Any, domid: int, send: trio.abc.SendStream, pfns: Sequence[int]
) -> tuple[int, int]:
    """PAGE_DATA records for the populated frames among `pfns` (ascending), read
    run by run; (frames sent, bytes sent)."""
    frames = size = 0
    batch: dict[int, bytes] = {}

    async def flush() -> None:
        nonlocal frames, size
        if batch:
            data = _page_data(batch)
            await send.send_all(data)
            frames, size = frames + len(batch), size + len(data)
            batch.clear()

    for first, count in _runs(pfns, MAX_BATCH_SIZE):
        batch.update(await xc.read_frames(domid, first, count))
        if len(batch) >= MAX_BATCH_SIZE // 2:
            await flush()
    await flush()
    return frames, size


def _runs(pfns: Sequence[int], longest: int) -> Iterator[tuple[int, int]]:
    """Ascending pfns as (first, count) runs of consecutive frames, none longer than
    `longest`."""
    first = previous = -2
    for pfn in pfns:
        if pfn == previous + 1 and pfn - first < longest:
            previous = pfn
            continue
        if first >= 0:
            yield first, previous - first + 1
        first = previous = pfn
    if first >= 0:
        yield first, previous - first + 1


def _page_data(pages: dict[int, bytes]) -> bytes:
    pfns = sorted(pages)
    header = xc_sr_rec_page_data_header.build({"count": len(pfns), "_res1": 0})
    listed = struct.pack(f"<{len(pfns)}Q", *pfns)
    return record(LibxcRecType.PAGE_DATA, header, listed, *(pages[pfn] for pfn in pfns))


async def _send(
    toolstack: Any,
    record: Any,
    send: trio.abc.SendStream,
    reader: _Reader,
    say: Callable[[str], Awaitable[None]],
) -> int:
    """Suspend, send the save file, and wait for "ready"; resumes the domain on failure."""
    name, domid, xc = record.config.name, record.domid, toolstack.xc
    try:
        await save.suspend(toolstack.xs, xc, domid, name)
    except save.SaveError as exc:
        raise MigrationError(str(exc).replace("cannot save", "cannot migrate", 1)) from None
    sent = 0
    try:
        async with save.suspended_image(toolstack, record) as image:
            for piece in write_save_file(image):
                await send.send_all(piece)
                sent += len(piece)
            frames = len(image.pages)
        await say(f"migration sender: sent {sent} bytes ({frames} frames)")
        with trio.fail_after(READY_TIMEOUT):
            await reader.expect(migrate_receiver_ready, "ready message")
    except (MigrationError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        with trio.CancelScope(shield=True):
            await xc.resume(domid)
        await say(f"migration sender: {_reason(exc)}")
        raise MigrationError("Migration failed, resuming at sender.") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            await xc.resume(domid)
        raise
    return sent


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "the receiver did not answer in time"
    if isinstance(exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
        return "the other end went away"
    return str(exc)


async def _hand_over(
    toolstack: Any,
    record: Any,
    send: trio.abc.SendStream,
    reader: _Reader,
    say: Callable[[str], Awaitable[None]],
    sent: int,
) -> dict[str, Any]:
    """xl's final handshake: rename away, "go", the report; destroy or take it back."""
    name, domid = record.config.name, record.domid
    away = f"{name}--migratedaway"
    await say("migration sender: Target has acknowledged transfer.")
    try:
        await toolstack.rename(name, away)
    except ValueError:
        await toolstack.xc.resume(domid)
        raise MigrationError("Migration failed, resuming at sender.") from None
    await say("migration sender: Giving target permission to start.")
    try:
        await send.send_all(migrate_permission_to_go)
        with trio.fail_after(READY_TIMEOUT):
            await reader.expect(migrate_report, "success/failure report message")
            status = (await reader.exactly(1, "success/failure status", keep=False))[0]
    except (MigrationError, OSError, trio.BrokenResourceError, trio.TooSlowError):
        raise MigrationError(
            f"** Migration failed during final handshake ** the domain is {away} here:"
            " CHECK AT BOTH ENDS for running instances before resuming at most one"
        ) from None
    if status:
        await say(f"migration sender: Target reports startup failure (status code {status}).")
        with trio.fail_after(READY_TIMEOUT):
            await reader.expect(migrate_permission_to_go, "permission for sender to resume")
        await say("migration sender: Trying to resume at our end.")
        await toolstack.rename(away, name)
        await toolstack.xc.resume(domid)
        raise MigrationError("Migration failed due to problems at target.")
    await say("migration sender: Target reports successful startup.")
    await toolstack._destroy(record)
    return {"name": name, "domid": domid, "bytes": sent}
