"""xenconsoled: every guest's PV console, logged and reachable interactively.

For each guest the toolstack hands over, the daemon maps the console page
through grant ref GNTTAB_RESERVED_CONSOLE, binds the console port, appends
all output to `<run-dir>/console/<name>.log` (which rotates to `<name>.log.1`
at CONSOLE_LOG_MAX, so a flooding guest takes at most twice that on disk),
and listens on
`<run-dir>/console/<name>.sock`: a client there receives the output from
then on and its bytes are typed into the guest (`xenlike console NAME`).
"""

import logging
import os
import socket
from pathlib import Path
from typing import Any

import attrs
import trio

from drivers.console import ConsoleBack
from xenlike.abi.grant_table import GNTTAB_RESERVED_CONSOLE
from xenlike.logfile import RotatingLog

__all__ = ["XenConsoled"]

log = logging.getLogger("xenlike.dom0.xenconsoled")
CLIENT_BACKLOG = 256  # chunks queued for a slow interactive client before it is dropped
CONSOLE_LOG_MAX = 1 << 20  # bytes of a guest's console log before it rotates


@attrs.define(eq=False)
class _Console:
    domid: int
    name: str
    back: ConsoleBack
    log_file: RotatingLog
    scope: trio.CancelScope
    clients: list[trio.MemorySendChannel[bytes]] = attrs.field(factory=list)


class XenConsoled:
    def __init__(self, domain: Any, console_dir: Path, nursery: trio.Nursery) -> None:
        self.domain = domain
        self.console_dir = Path(console_dir)
        self._nursery = nursery
        self.consoles: dict[int, _Console] = {}

    async def add(self, domid: int, name: str, remote_port: int) -> None:
        """Start serving a guest's console (the toolstack calls this before unpausing)."""
        mapping = await self.domain.grants.map(domid, [GNTTAB_RESERVED_CONSOLE])
        port = await self.domain.evtchn.bind_interdomain(domid, remote_port)
        page = mapping.view
        back = ConsoleBack(page, port)
        log_file = RotatingLog(self.console_dir / f"{name}.log", CONSOLE_LOG_MAX)
        console = _Console(domid, name, back, log_file, trio.CancelScope())
        self.consoles[domid] = console
        ready = trio.Event()
        self._nursery.start_soon(self._serve, console, mapping, page, port, ready)
        await ready.wait()

    def rename(self, domid: int, name: str) -> None:
        """The guest is now called `name` (`xenlike rename`): its log and socket follow,
        as Xen's xenconsoled names a log after the guest's name when it opens it."""
        console = self.consoles.get(domid)
        if console is None:
            return
        for suffix in (".log", ".log.1", ".sock"):
            old = self.console_dir / f"{console.name}{suffix}"
            if old.exists():
                os.replace(old, self.console_dir / f"{name}{suffix}")
        console.log_file.path = self.console_dir / f"{name}.log"
        console.name = name

    def remove(self, domid: int) -> None:
        console = self.consoles.pop(domid, None)
        if console is not None:
            console.scope.cancel()

    async def _serve(
        self, console: _Console, mapping: Any, page: memoryview, port: Any, ready: trio.Event
    ) -> None:
        socket_path = self.console_dir / f"{console.name}.sock"
        with console.scope:
            async with trio.open_nursery() as nursery:
                socket_path.unlink(missing_ok=True)
                listener = await unix_listener(socket_path)
                nursery.start_soon(
                    trio.serve_listeners, lambda s: self._client(console, s), [listener]
                )
                ready.set()
                await console.back.run(lambda data: self._output(console, data))
        with trio.CancelScope(shield=True):
            # by the name it has now, which a rename may have changed
            (self.console_dir / f"{console.name}.sock").unlink(missing_ok=True)
            console.log_file.close()
            await console.back.stream.aclose()
            try:
                await port.close()
            except Exception:
                pass
            console.back.stream.tx.release()
            console.back.stream.rx.release()
            page.release()
            try:
                await self.domain.grants.unmap(mapping)
            except Exception as exc:
                log.warning("d%d: unmapping the console page: %s", console.domid, exc)

    def _output(self, console: _Console, data: bytes) -> None:
        console.log_file.write(data)
        for client in list(console.clients):
            try:
                client.send_nowait(data)
            except trio.WouldBlock:
                console.clients.remove(client)
                client.close()

    async def _client(self, console: _Console, stream: trio.SocketStream) -> None:
        send, receive = trio.open_memory_channel[bytes](CLIENT_BACKLOG)
        console.clients.append(send)
        try:
            async with trio.open_nursery() as nursery:

                async def forward_output() -> None:
                    async for data in receive:
                        await stream.send_all(data)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(forward_output)
                while data := await stream.receive_some(4096):
                    await console.back.send_input(data)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if send in console.clients:
                console.clients.remove(send)
            await stream.aclose()


async def unix_listener(path: Path) -> trio.SocketListener:
    """A listening Unix stream socket at `path` (trio has no open_unix_listener)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)
