"""Helpers for testing drivers and protocols, for xenlike's tests and yours.

- `channel_pair(spec)`: a front and a back ring channel over one page of
  real shared memory, in one process: drive a back end's request handling
  or a front end's calls without any domain.
- `doorbell_pair()` and `CrossedDoorbell`: event-channel stand-ins over real
  eventfds; `FaultyDoorbell` drops or delays notifications on purpose.
- `HostileFrontRing`: writes raw slot bytes and impossible indices, as a
  malicious front end would.
- `LocalDomain`: a guest domain with no hypervisor behind it (real memory
  and page allocator, a grant table of its own), for a front end driven
  over a `channel_pair`; `granted` is what a back end would map.
- `FakeXenStore` and `FakeGrantTable`: what a back end calls on Dom0's
  XenStore and grant table, over a dict and a guest's real memory, with
  Xen's refusals: to drive a back end's `handle`/`serve` with a hostile
  front end written by hand (see tests/blkif_harness.py).
- `RunningTopology`: a real topology (`xenlike up --detach`) in a temporary run
  directory, with its consoles, XenStore and devices at hand, and
  `RunningTopology.kill(name)` for a guest (and its front ends) that vanishes.

A back end that restarts mid-stream is `Backend.reconnect()` (either end
can reload: the device passes through Closing and Closed and connects
again, and a front end's requests in flight are resubmitted).
"""

import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import trio

from xenlike._eventfd import EventFd
from xenlike.abi.ring import SRING_HEADER_SIZE, XEN_PAGE_SIZE
from xenlike.domain.runtime import Hardware
from xenlike.memory import DomainMemory, PageAllocator, map_frames
from xenlike.ring import BackRing, FrontRing, RingSpec
from xenlike.xenbus.channel import BackChannel, FrontChannel

__all__ = [
    "CrossedDoorbell",
    "FakeGrant",
    "FakeGrantTable",
    "FakeXenStore",
    "FaultyDoorbell",
    "HostileFrontRing",
    "LocalDomain",
    "RunningTopology",
    "channel_pair",
    "detached",
    "doorbell_pair",
    "wait_for",
]

T = TypeVar("T")


class CrossedDoorbell:
    """An event channel stand-in: waits on its own eventfd, rings the other end's.

    Real eventfds, so the pair also works across a fork.
    """

    def __init__(self, mine: EventFd, theirs: EventFd) -> None:
        self.mine, self.theirs = mine, theirs

    def notify(self) -> None:
        self.theirs.notify()

    async def wait(self) -> int:
        return await self.mine.wait()


def doorbell_pair() -> tuple[CrossedDoorbell, CrossedDoorbell]:
    """Two connected ends, like both sides of an interdomain event channel."""
    a, b = EventFd.create(), EventFd.create()
    return CrossedDoorbell(a, b), CrossedDoorbell(b, a)


class FaultyDoorbell:
    """A doorbell that loses a share of its notifications, or delivers them late.

    A driver must not depend on a notification that ring.h's protocol says
    is unnecessary; dropped ones show whether it does (its waits then need a
    timeout or a final check), delayed ones shake out ordering assumptions.
    """

    def __init__(
        self,
        inner: Any,
        *,
        drop: float = 0.0,
        delay: float = 0.0,
        nursery: trio.Nursery | None = None,
        seed: int = 0,
    ) -> None:
        if delay and nursery is None:
            raise ValueError("delayed notifications need a nursery to deliver them from")
        self.inner, self.drop, self.delay, self.nursery = inner, drop, delay, nursery
        self.random = random.Random(seed)
        self.dropped = 0

    def notify(self) -> None:
        if self.random.random() < self.drop:
            self.dropped += 1
            return
        if self.delay and self.nursery is not None:
            self.nursery.start_soon(self._late)
        else:
            self.inner.notify()

    async def _late(self) -> None:
        await trio.sleep(self.random.uniform(0, self.delay))
        self.inner.notify()

    async def wait(self) -> int:
        return await self.inner.wait()


def channel_pair(
    spec: RingSpec, pages: int = 1, *, front_bell: Any = None, back_bell: Any = None
) -> tuple[FrontChannel, BackChannel, memoryview]:
    """A front and a back channel over one shared ring of `pages` pages.

    Run `front.run()` in a nursery to collect responses, and serve the back
    end with `back.batches_of_requests()` / `respond_many`, or a Backend's
    `serve(back)`. The shared memory is returned for tampering.
    """
    memory = memoryview(bytearray(pages * XEN_PAGE_SIZE))
    bells = doorbell_pair()
    front = FrontChannel(FrontRing(spec, memory), front_bell or bells[0])
    back = BackChannel(BackRing(spec, memory), back_bell or bells[1])
    return front, back, memory


class HostileFrontRing:
    """The front end of a ring that does not play by the rules."""

    def __init__(self, spec: RingSpec, memory: memoryview) -> None:
        self.spec = spec
        self.memory = memory
        self.ring = FrontRing(spec, memory)

    def put_raw(self, slot_bytes: bytes) -> None:
        """Write arbitrary bytes as the next request (padded with zeros to the slot)."""
        index = self.ring.req_prod_pvt & (self.ring.nr_ents - 1)
        offset = SRING_HEADER_SIZE + index * self.spec.entry_size
        data = slot_bytes[: self.spec.entry_size].ljust(self.spec.entry_size, b"\0")
        self.memory[offset : offset + len(data)] = data
        self.ring.req_prod_pvt = (self.ring.req_prod_pvt + 1) & 0xFFFFFFFF

    def push(self) -> bool:
        return self.ring.push_requests()

    def set_req_prod(self, value: int) -> None:
        """Publish any producer index at all, e.g. far past what the ring holds."""
        struct.pack_into("<I", self.memory, 0, value & 0xFFFFFFFF)


class LocalDomain:
    """A guest domain without a hypervisor, for testing front ends in one process.

    Its memory is a real `DomainMemory` with a real `PageAllocator` (frames
    from 16 on); its grant table is local: `grants.entries` maps each ref to
    (gfn, readonly), and `granted` is a read-only mapping from ref to the
    granted page, as a back end would map it.
    """

    def __init__(self, pages: int = 1024, *, domid: int = 1, cmdline: str = "") -> None:
        self.domid, self.cmdline = domid, cmdline
        self.trace, self.hardware = None, Hardware()
        self.memory = DomainMemory.create(pages)
        self.allocator = PageAllocator(16, pages)
        self.grants = _LocalGrants()
        self.granted = _GrantedPages(self)


class _LocalGrants:
    """`grant_access` / `end_access` over a dict: ref -> (gfn, readonly)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[int, bool]] = {}
        self._next_ref = 8  # refs below 8 are reserved, as in Xen

    def grant_access(self, domid: int, gfn: int, readonly: bool = False) -> int:
        ref, self._next_ref = self._next_ref, self._next_ref + 1
        self.entries[ref] = (gfn, readonly)
        return ref

    def end_access(self, ref: int) -> None:
        del self.entries[ref]


class _GrantedPages(Mapping[int, memoryview]):
    def __init__(self, domain: LocalDomain) -> None:
        self._domain = domain

    def __getitem__(self, ref: int) -> memoryview:
        return self._domain.memory.frame(self._domain.grants.entries[ref][0])

    def __iter__(self) -> Iterator[int]:
        return iter(self._domain.grants.entries)

    def __len__(self) -> int:
        return len(self._domain.grants.entries)


class FakeXenStore:
    """The XenStore calls a back end makes (read, write, transact), over a dict.

    A missing key is XenStoreError ENOENT, as xenstored answers it; values
    are kept as text.
    """

    def __init__(self, values: Mapping[str, str] = {}) -> None:  # noqa: B006 - copied
        self.values = dict(values)

    async def read(self, path: str) -> bytes:
        from xenlike.xenstore import XenStoreError

        try:
            return self.values[path].encode()
        except KeyError:
            raise XenStoreError("ENOENT", path) from None

    async def write(self, path: str, value: Any) -> None:
        self.values[path] = str(value)

    async def transact(self, body: Callable[["FakeXenStore"], Any]) -> None:
        await body(self)


class FakeGrant(NamedTuple):
    """One entry of a `FakeGrantTable`."""

    gfn: int
    domid: int  # the grantee
    readonly: bool


class FakeGrantTable:
    """A guest's memory and grant table, and the map/unmap calls a back end makes on it.

    `grant(gfn)` grants one of the guest's frames (to Dom0 unless told
    otherwise); `map` refuses, element by element, as Xen refuses: a ref
    never granted (GNTST_bad_gntref), granted to another domain or
    read-only for a writable map (GNTST_general_error), another granter
    (GNTST_bad_domain). Mapped pages are the guest's real memory, so what
    the back end writes the test reads back. `maps`, `unmaps` and `mapped`
    count what the back end did; `map_delay` slows each map down.
    """

    def __init__(self, domid: int = 1, nr_pages: int = 16384) -> None:
        self.domid = domid
        self.memory = DomainMemory.create(nr_pages)
        self.entries: dict[int, FakeGrant] = {}
        self._next_ref = 8  # refs below 8 are reserved, as in Xen
        self.maps = self.unmaps = 0
        self.mapped: set[int] = set()
        self.map_delay = 0.0

    def grant(self, gfn: int, *, domid: int = 0, readonly: bool = False) -> int:
        ref, self._next_ref = self._next_ref, self._next_ref + 1
        self.entries[ref] = FakeGrant(gfn, domid, readonly)
        return ref

    def page(self, gfn: int) -> memoryview:
        return self.memory.frame(gfn)

    async def map(
        self, domid: int, refs: Any, readonly: bool = False, *, side_by_side: bool = True
    ) -> Any:
        """As GrantTable.map; the pages always lie side by side, whatever `side_by_side` asks."""
        from xenlike.abi.grant_table import GntStatus
        from xenlike.domain.grant_table import GrantMapping, GrantStatusError

        refs = tuple(refs)
        self.maps += 1
        with trio.CancelScope(shield=True):  # as GrantTable's: a hypercall is not cancelled
            await trio.sleep(self.map_delay)
        statuses = []
        for ref in refs:
            entry = self.entries.get(ref)
            if domid != self.domid:
                statuses.append(GntStatus.bad_domain)
            elif entry is None:
                statuses.append(GntStatus.bad_gntref)
            elif entry.domid != 0 or (entry.readonly and not readonly):
                statuses.append(GntStatus.general_error)
            else:
                statuses.append(GntStatus.okay)
        if any(statuses):
            raise GrantStatusError("GNTTABOP_map_grant_ref", [f"ref {r}" for r in refs], statuses)
        frames = tuple(self.entries[ref].gfn for ref in refs)
        self.mapped.update(refs)
        pages = map_frames(self.memory.fd, frames, writable=not readonly)
        return GrantMapping(domid, refs, tuple(range(len(refs))), frames, readonly, pages)

    async def unmap(self, mapping: Any) -> None:
        """As GrantTable.unmap: refused (MemoryInUse) while views are alive."""
        self.unmaps += 1
        mapping._mapped().close()
        mapping._pages = None
        self.mapped.difference_update(mapping.refs)


def detached(driver_class: type[T], device_type: str | None = None) -> T:
    """A driver instance with no XenStore or domain behind it, to call `handle` or
    `serve` on directly (with `channel_pair`)."""
    from types import SimpleNamespace

    from xenlike.xenbus.driver import DeviceInfo, XenbusContext

    name = str(device_type or getattr(driver_class, "device_type", "test"))
    context: Any = XenbusContext  # no XenStore, no nursery: typed fields left empty
    nothing = context(
        domain=SimpleNamespace(domid=0, trace=None, hardware=Hardware()), xs=None, nursery=None
    )
    make: Any = driver_class
    driver: T = make(nothing, DeviceInfo(name, 0, f"backend/{name}/1/0", f"device/{name}/0", 1))
    return driver


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "the condition") -> T:
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class RunningTopology:
    """A topology brought up with `xenlike up --detach` in its own run directory.

    with RunningTopology(TOML_TEXT, tmp_path) as topo:
        topo.wait_for_console("client", "ready")
        assert topo.xenstore("read", "/local/domain/1/name") == "client"
    """

    def __init__(
        self,
        toml: str | None,
        directory: Path,
        *,
        timeout: float = 60.0,
        pythonpath: Sequence[Path] = (),
    ) -> None:
        self.directory = Path(directory)
        self.pythonpath = [str(Path(p).resolve()) for p in pythonpath]
        self.run_dir = self.directory / "run"
        self.file = None
        if toml is not None:
            self.file = self.directory / "topology.toml"
            self.file.write_text(toml)
        self.timeout = timeout

    def xenlike(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the CLI against this topology."""
        env = {**os.environ, "XENLIKE_RUN_DIR": str(self.run_dir)}
        if self.pythonpath:  # where the domains import a driver or program from
            env["PYTHONPATH"] = os.pathsep.join([*self.pythonpath, env.get("PYTHONPATH", "")])
        result = subprocess.run(
            [sys.executable, "-m", "xenlike", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=self.timeout + 60,
        )
        if check and result.returncode:
            raise AssertionError(
                f"xenlike {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def __enter__(self) -> "RunningTopology":
        args = ["up", "--detach", "--timeout", str(self.timeout)]
        self.xenlike(*args, *([str(self.file)] if self.file else []))
        return self

    def __exit__(self, *exc: object) -> None:
        self.xenlike("down", "--grace", "5", check=False)

    def console(self, name: str) -> str:
        path = self.run_dir / "console" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_console(self, name: str, text: str, timeout: float = 30.0) -> str:
        def seen() -> str:
            console = self.console(name)
            return console if text in console else ""

        return wait_for(seen, timeout, f"{text!r} on {name}'s console")

    def xenstore(self, *args: str) -> str:
        return self.xenlike("xenstore", *args).stdout.rstrip("\n")

    def devices(self, name: str | None = None) -> list[dict[str, Any]]:
        return json.loads(self.xenlike("devices", *([name] if name else []), "--json").stdout)

    def domains(self) -> list[dict[str, Any]]:
        return json.loads(self.xenlike("list", "--json").stdout)

    def domid(self, name: str) -> int:
        for domain in self.domains():
            if domain["name"] == name:
                return int(domain["id"])
        raise LookupError(f"no domain named {name!r}")

    def kill(self, name: str) -> None:
        """SIGKILL a guest's process, as a crash would end it: nothing says goodbye."""
        domid = self.domid(name)
        log = (self.run_dir / "hypervisor.log").read_text()
        pids = re.findall(rf"\(d{domid}\) started pid (\d+)", log)
        if not pids:
            raise LookupError(f"no process found for {name} (d{domid})")
        os.kill(int(pids[-1]), signal.SIGKILL)
