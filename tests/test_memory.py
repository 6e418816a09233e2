import ctypes
import errno
import faulthandler
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import xenlike.memory
from xenlike.abi.grant_table import SHGNT_PER_PAGE_V1
from xenlike.frames import frame_file
from xenlike.memory import (
    REGION_FRAMES,
    XEN_PAGE_SIZE,
    BadFrame,
    BootLayout,
    DomainMemory,
    DoubleFree,
    FrameCache,
    MemoryInUse,
    MemoryTooSmall,
    OutOfPages,
    PageAllocator,
    XenMemoryError,
    map_frames,
)

_names = itertools.count()


@pytest.fixture
def memory_name() -> str:
    """A memfd name no other test uses, to find this test's mappings in /proc/self/maps."""
    return f"xenlike-test-{os.getpid()}-{next(_names)}"


@pytest.fixture
def memory(memory_name: str) -> Iterator[DomainMemory]:
    with DomainMemory.create(16, name=memory_name) as memory:
        yield memory


def fill_frames(memory: DomainMemory) -> None:
    """Stamp each frame with a pattern unique to its gfn."""
    for gfn in range(memory.nr_pages):
        with memory.frame(gfn) as frame:
            frame[:] = bytes([gfn + 1]) * XEN_PAGE_SIZE


def mappings_of(memfd_name: str) -> list[tuple[int, int, str, int]]:
    """(start, end, perms, file offset) of this process's mappings of a memfd."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == f"/memfd:{memfd_name}":
                start, end = (int(address, 16) for address in fields[0].split("-"))
                found.append((start, end, fields[1], int(fields[2], 16)))
    return found


# DomainMemory


def test_two_attachments_share_the_same_frames(memory: DomainMemory) -> None:
    with DomainMemory.attach(os.dup(memory.fd), memory.nr_pages) as other:
        with memory.frame(5) as frame:
            frame[100:105] = b"hello"
        with other.frame(5) as frame:
            assert bytes(frame[100:105]) == b"hello"


def test_a_child_process_attaches_by_fd_and_shares_the_frames(memory: DomainMemory) -> None:
    with memory.frame(3) as frame:
        frame[:4] = b"ping"
    child = textwrap.dedent(
        f"""
        from xenlike.memory import DomainMemory
        with DomainMemory.attach({memory.fd}, {memory.nr_pages}) as memory:
            with memory.frame(3) as ping, memory.frame(9) as pong:
                assert bytes(ping[:4]) == b"ping", bytes(ping[:4])
                pong[:4] = b"pong"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child],
        pass_fds=[memory.fd],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with memory.frame(9) as frame:
        assert bytes(frame[:4]) == b"pong"


def test_frames_is_one_view_over_consecutive_frames(memory: DomainMemory) -> None:
    fill_frames(memory)
    with memory.frames(4, 3) as run:
        assert len(run) == 3 * XEN_PAGE_SIZE
        assert bytes(run[::XEN_PAGE_SIZE]) == bytes([5, 6, 7])


@pytest.mark.parametrize("gfn", [-1, 16, 1000])
def test_frame_outside_the_domain_is_refused(memory: DomainMemory, gfn: int) -> None:
    with pytest.raises(BadFrame, match=f"gfn {gfn} outside domain memory"):
        memory.frame(gfn)


def test_frames_running_past_the_end_are_refused(memory: DomainMemory) -> None:
    with pytest.raises(BadFrame, match=r"gfns 15\.\.16"):
        memory.frames(15, 2)
    with pytest.raises(ValueError):
        memory.frames(0, 0)


def test_bad_frame_is_a_memory_error_and_a_value_error() -> None:
    assert issubclass(BadFrame, XenMemoryError)
    assert issubclass(BadFrame, ValueError)


def test_attach_refuses_a_size_mismatch(memory: DomainMemory) -> None:
    with pytest.raises(ValueError, match="bytes"):
        DomainMemory.attach(memory.fd, memory.nr_pages + 1)


def test_memory_cannot_be_shrunk_under_other_mappings(memory: DomainMemory) -> None:
    with pytest.raises(PermissionError):
        os.ftruncate(memory.fd, XEN_PAGE_SIZE)


def test_close_is_refused_while_a_view_is_alive(memory_name: str) -> None:
    memory = DomainMemory.create(4, name=memory_name)
    frame = memory.frame(1)
    with pytest.raises(MemoryInUse):
        memory.close()
    frame[0] = 7
    assert memory.frame(1)[0] == 7
    frame.release()
    memory.close()
    memory.close()
    assert memory.closed
    assert mappings_of(memory_name) == []
    with pytest.raises(ValueError, match="closed"):
        memory.frame(0)
    with pytest.raises(ValueError, match="closed"):
        _ = memory.fd


def test_close_releases_the_fd(memory_name: str) -> None:
    memory = DomainMemory.create(4, name=memory_name)
    fd = memory.fd
    memory.close()
    with pytest.raises(OSError) as excinfo:
        os.fstat(fd)
    assert excinfo.value.errno == errno.EBADF


# map_frames


def test_map_frames_puts_scattered_frames_side_by_side_in_order(memory: DomainMemory) -> None:
    fill_frames(memory)
    gfns = [9, 2, 3, 4, 12, 0]
    with map_frames(memory.fd, gfns, writable=True) as mapping:
        assert mapping.gfns == tuple(gfns)
        with mapping.view as view:
            assert len(view) == len(gfns) * XEN_PAGE_SIZE
            for index, gfn in enumerate(gfns):
                assert view[index * XEN_PAGE_SIZE : (index + 1) * XEN_PAGE_SIZE] == (
                    bytes([gfn + 1]) * XEN_PAGE_SIZE
                )
            # One write across the boundary of two scattered frames.
            view[XEN_PAGE_SIZE - 2 : XEN_PAGE_SIZE + 2] = b"ABCD"
        with mapping.page(4) as page:
            page[0] = 0xEE
    with memory.frame(9) as frame:
        assert bytes(frame[-2:]) == b"AB"
    with memory.frame(2) as frame:
        assert bytes(frame[:2]) == b"CD"
    with memory.frame(12) as frame:
        assert frame[0] == 0xEE
    with memory.frame(1) as untouched:
        assert bytes(untouched) == bytes([2]) * XEN_PAGE_SIZE


def test_map_frames_maps_only_the_listed_frames(memory: DomainMemory, memory_name: str) -> None:
    gfns = [9, 2, 3, 4, 12]
    with map_frames(memory.fd, gfns, writable=True) as mapping:
        with mapping.page(0) as page:
            start = ctypes.addressof(ctypes.c_char.from_buffer(page))
        end = start + len(gfns) * XEN_PAGE_SIZE
        mine = [m for m in mappings_of(memory_name) if start <= m[0] < end]
        mapped = [
            m[3] // XEN_PAGE_SIZE + page
            for m in mine
            for page in range((m[1] - m[0]) // XEN_PAGE_SIZE)
        ]
        assert mapped == gfns
        assert all(m[2] == "rw-s" for m in mine)


def test_map_frames_makes_one_mmap_call_per_run_of_consecutive_gfns(
    memory: DomainMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    mmap_fixed = xenlike.memory._mmap_fixed

    def recording(address: int, length: int, prot: int, fd: int, offset: int) -> None:
        calls.append((length // XEN_PAGE_SIZE, offset // XEN_PAGE_SIZE))
        mmap_fixed(address, length, prot, fd, offset)

    monkeypatch.setattr(xenlike.memory, "_mmap_fixed", recording)
    with map_frames(memory.fd, [9, 2, 3, 4, 12, 13, 5], writable=False):
        assert calls == [(1, 9), (3, 2), (2, 12), (1, 5)]


def test_a_mapping_outlives_the_fd_it_was_made_from(memory: DomainMemory) -> None:
    fd = os.dup(memory.fd)
    mapping = map_frames(fd, [7], writable=True)
    os.close(fd)
    with mapping.page(0) as page:
        page[0] = 42
    mapping.close()
    with memory.frame(7) as frame:
        assert frame[0] == 42


def test_read_only_mapping_refuses_writes_with_type_error(memory: DomainMemory) -> None:
    with map_frames(memory.fd, [1, 5], writable=False) as mapping:
        assert not mapping.writable
        with mapping.view as view, mapping.page(1) as page:
            assert view.readonly and page.readonly
            with pytest.raises(TypeError):
                view[0] = 1
            with pytest.raises(TypeError):
                page[0] = 1


def test_read_only_mapping_is_prot_read_in_the_page_tables(
    memory: DomainMemory, memory_name: str
) -> None:
    with map_frames(memory.fd, [1, 5], writable=False) as mapping:
        read_only = [m for m in mappings_of(memory_name) if m[2] == "r--s"]
        assert sorted(m[3] for m in read_only) == [1 * XEN_PAGE_SIZE, 5 * XEN_PAGE_SIZE]
        address = min(m[0] for m in read_only)
        pid = os.fork()
        if pid == 0:
            try:
                faulthandler.disable()
                ctypes.memmove(address, b"x", 1)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        with mapping.page(0) as page:
            assert page[0] == 0


def test_map_frames_refuses_frames_outside_the_memory(memory: DomainMemory) -> None:
    with pytest.raises(BadFrame, match="gfn 16"):
        map_frames(memory.fd, [0, 16], writable=False)
    with pytest.raises(BadFrame, match="gfn -1"):
        map_frames(memory.fd, [-1], writable=False)
    with pytest.raises(ValueError, match="at least one gfn"):
        map_frames(memory.fd, [], writable=False)


def test_map_frames_reports_mmap_errno(memory: DomainMemory) -> None:
    read_only_fd = os.open(f"/proc/self/fd/{memory.fd}", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as excinfo:
            map_frames(read_only_fd, [2, 3], writable=True)
        assert excinfo.value.errno == errno.EACCES
        with map_frames(read_only_fd, [2, 3], writable=False) as mapping:
            assert len(mapping.view) == 2 * XEN_PAGE_SIZE
    finally:
        os.close(read_only_fd)


def test_mapping_close_is_refused_while_a_view_is_alive(
    memory: DomainMemory, memory_name: str
) -> None:
    mapping = map_frames(memory.fd, [4, 6], writable=True)
    page = mapping.page(1)
    with pytest.raises(MemoryInUse):
        mapping.close()
    page[0] = 9
    page.release()
    mapping.close()
    mapping.close()
    assert [m[3] for m in mappings_of(memory_name)] == [0]
    with pytest.raises(ValueError, match="closed"):
        _ = mapping.view
    with memory.frame(6) as frame:
        assert frame[0] == 9


def test_mapping_page_index_is_checked(memory: DomainMemory) -> None:
    with map_frames(memory.fd, [4, 6], writable=True) as mapping:
        with pytest.raises(IndexError):
            mapping.page(2)
        with pytest.raises(IndexError):
            mapping.page(-1)


# FrameCache: the foreign frames Dom0 keeps mapped between grant maps


@pytest.fixture
def files(memory_name: str) -> Iterator[list[int]]:
    """Four frame files, file i named `memory_name`-i and stamped i + 1."""
    fds = [frame_file(f"{memory_name}-{i}", bytes([i + 1]) * XEN_PAGE_SIZE) for i in range(4)]
    yield fds
    for fd in fds:
        os.close(fd)


def read_only(fd: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


def recording_mmaps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds of every file mapped from now on."""
    calls: list[int] = []
    mmap_fixed = xenlike.memory._mmap_fixed

    def recording(address: int, length: int, prot: int, fd: int, offset: int) -> None:
        calls.append(fd)
        mmap_fixed(address, length, prot, fd, offset)

    monkeypatch.setattr(xenlike.memory, "_mmap_fixed", recording)
    return calls


def test_the_frame_cache_shows_exactly_the_frames_asked_for_and_maps_each_file_once(
    files: list[int], memory_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recording_mmaps(monkeypatch)
    cache = FrameCache()
    pages = cache.map(1, [7, 3], files[:2], writable=True)
    assert pages is not None and not pages.side_by_side
    assert bytes(pages.page(0)) == b"\x01" * XEN_PAGE_SIZE
    assert bytes(pages.page(1)) == b"\x02" * XEN_PAGE_SIZE
    with pytest.raises(ValueError, match="do not lie side by side"):
        pages.view  # noqa: B018
    with pytest.raises(IndexError):
        pages.page(2)
    with pages.page(1) as page:
        page[:5] = b"hello"
    assert os.pread(files[1], 5, 0) == b"hello"
    pages.close()
    assert calls == files[:2] and len(cache) == 2
    (kept,) = mappings_of(f"{memory_name}-0")

    again = cache.map(1, [7], files[:1], writable=True)
    assert again is not None and bytes(again.page(0)[:1]) == b"\x01"
    again.close()
    assert calls == files[:2]  # served from the cache: no mmap at all
    assert mappings_of(f"{memory_name}-0") == [kept]


def test_frames_side_by_side_come_as_one_view(files: list[int]) -> None:
    cache = FrameCache()
    pages = cache.map(2, [5, 6, 7], files[:3], writable=True)
    assert pages is not None and pages.side_by_side
    with pages.view as view:
        assert len(view) == 3 * XEN_PAGE_SIZE
        assert bytes(view[::XEN_PAGE_SIZE]) == b"\x01\x02\x03"
    pages.close()


def test_a_fresh_file_for_a_frame_replaces_the_one_cached(
    files: list[int], memory_name: str
) -> None:
    """A granter moves a frame to a fresh file when a grant to a guest ends: the
    cache shows the file it is handed now, never the one it kept."""
    cache = FrameCache()
    pages = cache.map(1, [7], files[:1], writable=True)
    assert pages is not None
    pages.close()
    pages = cache.map(1, [7], files[1:2], writable=True)
    assert pages is not None and bytes(pages.page(0)[:1]) == b"\x02"
    pages.close()
    assert mappings_of(f"{memory_name}-0") == [] and len(cache) == 1


def test_the_frame_cache_keeps_the_rights_of_each_map(files: list[int], memory_name: str) -> None:
    cache = FrameCache()
    ro = read_only(files[0])
    try:
        pages = cache.map(1, [7], [ro], writable=False)
        assert pages is not None
        with pages.page(0) as page:
            assert page.readonly
            with pytest.raises(TypeError):
                page[0] = 9
        assert [m[2] for m in mappings_of(f"{memory_name}-0")] == ["r--s"]
        writable = cache.map(1, [7], files[:1], writable=True)  # the same file, writable now
        assert writable is not None
        assert [m[2] for m in mappings_of(f"{memory_name}-0")] == ["rw-s"]
        with writable.page(0) as page:
            page[0] = 9
        again = cache.map(1, [7], [ro], writable=False)
        assert again is not None
        with pages.page(0) as page, again.page(0) as other:
            assert page[0] == other[0] == 9 and other.readonly
        for mapping in (pages, writable, again):
            mapping.close()
    finally:
        os.close(ro)


def test_a_cached_mapping_refuses_to_close_while_a_view_is_alive(files: list[int]) -> None:
    cache = FrameCache()
    pages = cache.map(1, [7], files[:1], writable=True)
    assert pages is not None
    page = pages.page(0)
    piece = page[1:3]
    page.release()
    with pytest.raises(MemoryInUse):
        pages.close()
    assert piece[0] == 1  # nothing changed
    piece.release()
    pages.close()
    pages.close()
    with pytest.raises(ValueError, match="closed"):
        pages.page(0)


def test_the_frame_cache_lets_unused_frames_go_at_its_limit(
    files: list[int], memory_name: str
) -> None:
    cache = FrameCache(limit=2)
    first = cache.map(1, [1], files[:1], writable=True)
    second = cache.map(1, [2], files[1:2], writable=True)
    assert first is not None and second is not None
    assert cache.map(1, [3], files[2:3], writable=True) is None  # both in use: no room
    assert mappings_of(f"{memory_name}-2") == [] and len(cache) == 2
    first.close()
    third = cache.map(1, [3], files[2:3], writable=True)
    assert third is not None and bytes(third.page(0)[:1]) == b"\x03"
    assert mappings_of(f"{memory_name}-0") == []  # the unused one went
    assert bytes(second.page(0)[:1]) == b"\x02"
    second.close()
    third.close()


def test_a_forgotten_granter_s_frames_go_once_unused(files: list[int], memory_name: str) -> None:
    cache = FrameCache()
    pages = cache.map(1, [1, 2], files[:2], writable=True)
    kept = cache.map(1, [3], files[2:3], writable=True)
    assert pages is not None and kept is not None
    kept.close()
    cache.forget(1)
    assert mappings_of(f"{memory_name}-2") == []
    assert bytes(pages.page(1)[:1]) == b"\x02"  # still mapped while shown
    assert cache.map(1, [3], files[2:3], writable=True) is None
    pages.close()
    assert len(cache) == 0 and cache.regions() == []
    assert mappings_of(f"{memory_name}-0") == mappings_of(f"{memory_name}-1") == []
    cache.forget(1)  # twice: nothing more to do


def test_frames_beyond_the_cache_s_reach_are_left_to_the_caller(files: list[int]) -> None:
    assert FrameCache().map(1, [REGION_FRAMES], files[:1], writable=True) is None


# PageAllocator


def test_allocator_hands_out_each_frame_once_then_runs_out() -> None:
    allocator = PageAllocator(8, 12)
    assert allocator.available == 4
    got = {allocator.allocate() for _ in range(4)}
    assert got == {8, 9, 10, 11}
    assert allocator.available == 0
    with pytest.raises(OutOfPages):
        allocator.allocate()
    allocator.free(10)
    assert allocator.allocate() == 10


def test_allocator_refuses_double_free() -> None:
    allocator = PageAllocator(8, 12)
    gfn = allocator.allocate()
    allocator.free(gfn)
    with pytest.raises(DoubleFree, match=f"gfn {gfn}"):
        allocator.free(gfn)
    assert allocator.available == 4


def test_allocator_refuses_frames_outside_its_range() -> None:
    allocator = PageAllocator(8, 12)
    for gfn in (7, 12, 0):
        with pytest.raises(BadFrame):
            allocator.free(gfn)
    with pytest.raises(BadFrame):
        allocator.free_run(10, 3)


def test_free_run_is_all_or_nothing() -> None:
    allocator = PageAllocator(8, 16)
    first = allocator.allocate_run(4)
    allocator.free(first + 2)
    with pytest.raises(DoubleFree, match=f"gfn {first + 2}"):
        allocator.free_run(first, 4)
    assert allocator.available == 5
    allocator.free_run(first, 2)
    allocator.free(first + 3)
    assert allocator.available == 8


def test_allocate_run_is_contiguous_and_skips_fragments() -> None:
    allocator = PageAllocator(8, 16)
    for _ in range(8):
        allocator.allocate()
    for gfn in (8, 10, 11, 13, 14, 15):
        allocator.free(gfn)
    assert allocator.allocate_run(3) == 13
    assert allocator.allocate_run(2) == 10
    with pytest.raises(OutOfPages, match="no run of 2"):
        allocator.allocate_run(2)
    assert allocator.allocate() == 8
    assert allocator.available == 0
    with pytest.raises(ValueError):
        allocator.allocate_run(0)


def test_empty_allocator_range() -> None:
    allocator = PageAllocator(8, 8)
    assert allocator.available == 0
    with pytest.raises(OutOfPages):
        allocator.allocate()


class AllocatorAgainstAModel(RuleBasedStateMachine):
    """Random allocate/free sequences must match a plain set of free frames."""

    first, end = 3, 27

    def __init__(self) -> None:
        super().__init__()
        self.allocator = PageAllocator(self.first, self.end)
        self.free = set(range(self.first, self.end))

    def has_run(self, count: int) -> bool:
        return any(
            all(gfn in self.free for gfn in range(start, start + count))
            for start in range(self.first, self.end - count + 1)
        )

    @rule()
    def allocate(self) -> None:
        if not self.free:
            with pytest.raises(OutOfPages):
                self.allocator.allocate()
            return
        gfn = self.allocator.allocate()
        assert gfn in self.free
        self.free.remove(gfn)

    @rule(count=st.integers(1, 8))
    def allocate_run(self, count: int) -> None:
        if not self.has_run(count):
            with pytest.raises(OutOfPages):
                self.allocator.allocate_run(count)
            return
        first = self.allocator.allocate_run(count)
        run = set(range(first, first + count))
        assert run <= self.free
        self.free -= run

    @precondition(lambda self: len(self.free) < self.end - self.first)
    @rule(data=st.data(), count=st.integers(1, 4))
    def free_run(self, data: st.DataObject, count: int) -> None:
        allocated = sorted(set(range(self.first, self.end)) - self.free)
        gfn = data.draw(st.sampled_from(allocated))
        run = set(range(gfn, gfn + count))
        if gfn + count > self.end:
            with pytest.raises(BadFrame):
                self.allocator.free_run(gfn, count)
        elif run & self.free:
            with pytest.raises(DoubleFree):
                self.allocator.free_run(gfn, count)
        else:
            self.allocator.free_run(gfn, count)
            self.free |= run

    @precondition(lambda self: bool(self.free))
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        gfn = data.draw(st.sampled_from(sorted(self.free)))
        with pytest.raises(DoubleFree):
            self.allocator.free(gfn)

    @invariant()
    def available_matches(self) -> None:
        assert self.allocator.available == len(self.free)


TestAllocatorAgainstAModel = AllocatorAgainstAModel.TestCase


# BootLayout


def test_boot_layout_with_the_default_grant_table() -> None:
    layout = BootLayout.for_domain(256)
    assert layout.start_info_gfn == 0
    assert layout.shared_info_gfn == 1
    assert layout.grant_table_gfns == range(2, 6)
    assert layout.nr_grant_frames * SHGNT_PER_PAGE_V1 == 2048
    assert layout.store_gfn == 6
    assert layout.console_gfn == 7
    assert layout.first_free_gfn == 8
    assert layout.nr_pages == 256


def test_boot_layout_follows_the_grant_table_size() -> None:
    layout = BootLayout.for_domain(64, nr_grant_frames=1)
    assert layout.grant_table_gfns == range(2, 3)
    assert (layout.store_gfn, layout.console_gfn, layout.first_free_gfn) == (3, 4, 5)


def test_boot_layout_refuses_too_small_memory() -> None:
    assert BootLayout.for_domain(9).first_free_gfn == 8
    with pytest.raises(MemoryTooSmall, match="8 frames"):
        BootLayout.for_domain(8)
    with pytest.raises(MemoryTooSmall):
        BootLayout.for_domain(40, nr_grant_frames=36)
    with pytest.raises(ValueError):
        BootLayout.for_domain(64, nr_grant_frames=0)


def test_boot_layout_is_a_frozen_record() -> None:
    layout = BootLayout.for_domain(64)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        layout.store_gfn = 9  # type: ignore[misc]
    assert layout == BootLayout.for_domain(64)
