"""A restore's refill: the frames a save file holds land in the new domain's memory
file, through the kernel (splice from the file, pwritev from memory), the boot
frames and frames beyond the builder's left alone, frames with files of their
own written through the hypervisor; a file cut short after its check is one
line and no domain."""

import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domains.dom0.save import Refill, SaveError, restore_domain
from xenlike.memory import XEN_PAGE_SIZE, BootLayout
from xenlike.migration import DomainImage, write_save_file
from xenlike.topology import DomainConfig
from xenlike.xc import MemoryFile

PAGE = XEN_PAGE_SIZE
NR_PAGES = 256  # 1 MiB
DRAWN = 48  # frames the hypothesis cases use


def page(pfn: int) -> bytes:
    return struct.pack("<Q", pfn + 1) * (PAGE // 8)


@attrs.define
class FakeXc:
    """The hypervisor's side of a refill: a memory file, and write_frames."""

    memory: int
    written: dict[int, bytes] = attrs.field(factory=dict)
    before_memory_file: Any = None

    async def memory_file(self, domid: int) -> MemoryFile:
        if self.before_memory_file is not None:
            self.before_memory_file()
        bitmap = bytes([0xFF]) * (NR_PAGES // 8)
        return MemoryFile(os.dup(self.memory), NR_PAGES, bitmap, frozenset())

    async def write_frames(self, domid: int, first: int, data: bytes) -> None:
        for index in range(len(data) // PAGE):
            self.written[first + index] = data[index * PAGE : (index + 1) * PAGE]


def memfd() -> int:
    fd = os.memfd_create("test-refill", os.MFD_CLOEXEC)
    os.ftruncate(fd, NR_PAGES * PAGE)
    return fd


def frames_of(fd: int) -> dict[int, bytes]:
    """The memory file's frames that are not all zero."""
    return {pfn: data for pfn in range(NR_PAGES) if any(data := os.pread(fd, PAGE, pfn * PAGE))}


@st.composite
def refills(draw: st.DrawFn) -> tuple[list[int], frozenset[int], int, int, list[int]]:
    """(pfns in the file, frames moved to files of their own, first, end, gaps in
    pages between the file's runs)."""
    pfns = sorted(draw(st.sets(st.integers(0, DRAWN - 1), max_size=DRAWN)))
    moved = frozenset(draw(st.sets(st.integers(0, DRAWN - 1), max_size=6)))
    first = draw(st.integers(0, 8))
    end = draw(st.integers(first + 1, DRAWN))
    gaps = draw(st.lists(st.integers(0, 2), min_size=len(pfns), max_size=len(pfns)))
    return pfns, moved, first, end, gaps


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(refills())
def test_copy_and_write_put_each_frame_where_a_page_by_page_refill_would(
    case: tuple[list[int], frozenset[int], int, int, list[int]],
) -> None:
    pfns, moved, first, end, gaps = case
    expected_memory = {p: page(p) for p in pfns if first <= p < end and p not in moved}
    expected_written = {p: page(p) for p in pfns if first <= p < end and p in moved}
    # The file: each page after a gap of 0-2 pages, runs of consecutive pfns whose
    # pages follow one another (as scan_save_file gives them).
    runs: list[tuple[int, int, int]] = []
    content = bytearray()
    for pfn, gap in zip(pfns, gaps):
        content += bytes(gap * PAGE)
        if runs and not gap and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((pfn, 1, len(content)))
        content += page(pfn)
    for how in ("copy", "write"):
        memory = memfd()
        xc = FakeXc(memory)
        refill = Refill(xc, 1, MemoryFile(os.dup(memory), NR_PAGES, b"", moved), first, end)
        with tempfile.TemporaryFile() as file:
            file.write(content)
            file.flush()
            if how == "copy":
                trio.run(refill.copy, file.fileno(), runs)
            else:
                trio.run(refill.write, {p: page(p) for p in pfns})
        refill.memory.close()
        assert frames_of(memory) == expected_memory, how
        assert xc.written == expected_written, how
        os.close(memory)


def test_a_file_shorter_than_its_runs_is_eof_not_a_crash() -> None:
    memory = memfd()
    file_of_memory = MemoryFile(os.dup(memory), NR_PAGES, b"", frozenset())
    refill = Refill(FakeXc(memory), 1, file_of_memory, 0, DRAWN)
    with tempfile.TemporaryFile() as file:
        file.write(page(1) * 3)
        file.flush()
        with pytest.raises(EOFError):
            trio.run(refill.copy, file.fileno(), [(10, 4, 0)])
    refill.memory.close()
    os.close(memory)


@attrs.define
class FakeToolstack:
    xc: FakeXc
    guests: dict[str, Any] = attrs.field(factory=dict)
    destroyed: list[int] = attrs.field(factory=list)

    async def create(self, config: DomainConfig, before_unpause: Any, fill: Any) -> Any:
        """As Toolstack.create: any failure before the unpause destroys the domain."""
        try:
            await fill(7)
            await before_unpause(7)
        except BaseException:
            self.destroyed.append(7)
            raise


def test_a_file_cut_short_after_its_check_is_one_line_and_no_domain() -> None:
    nr_pages = NR_PAGES
    first = BootLayout.for_domain(nr_pages).first_free_gfn
    config = DomainConfig(name="beta", memory=1)
    image = DomainImage(
        max_pfn=nr_pages - 1,
        pages={p: page(p) for p in range(first, nr_pages)},
        shared_info=bytes(PAGE),
        vcpus={0: b"state"},
        config=attrs.asdict(config),
    )
    memory = memfd()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "beta.sav"
        with open(path, "wb") as out:
            out.writelines(write_save_file(image))
        xc = FakeXc(memory, before_memory_file=lambda: os.truncate(path, 4096 * 3))
        toolstack = FakeToolstack(xc)
        with pytest.raises(SaveError, match="^cannot restore from .*: the file was cut short"):
            trio.run(restore_domain, toolstack, path)
    assert toolstack.destroyed == [7]
    assert frames_of(memory).keys() <= set(range(first, nr_pages))
    os.close(memory)
