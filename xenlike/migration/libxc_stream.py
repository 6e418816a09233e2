"""libxc's migration stream, version 3 (docs/specs/libxc-migration-stream.pandoc).

The stream libxc's xc_domain_save() writes for an x86 PV guest, in its order
(xg_sr_save.c, xg_sr_save_x86_pv.c): image header, domain header, the static
data (X86_PV_INFO, STATIC_DATA_END), X86_PV_P2M_FRAMES, PAGE_DATA records in
batches of at most 1024 pfns (MAX_BATCH_SIZE), X86_TSC_INFO, SHARED_INFO, the
records of each online vCPU, END. Layouts and numbers are
xg_sr_stream_format.h's; the image header is big-endian, all else little-endian.

Where xenlike differs from a Linux PV guest under Xen, and why:

- X86_PV_P2M_FRAMES carries the pfn range (0 to max_pfn) and no frame list.
  A Linux PV guest keeps its P2M in its own frames, whose pfns the record
  lists; xenlike's P2M lives in the hypervisor, as an auto-translated guest's
  does, so no guest frame holds it. The range is what a restore needs: how
  large a physmap to build. Xen's verifier asks for 8 bytes or more.
- PAGE_DATA lists populated pfns only, every one of type NOTAB (xenlike
  guests have no PV page tables to normalise). A ballooned-out pfn is simply
  absent, as it is when Xen's restore never hears of a pfn; the reader also
  takes XTAB, which live migration uses for a page that went away after it
  was sent.
- The guest's execution state (its kernel's and its program's, serialized by
  the guest) travels in X86_PV_VCPU_XSAVE, after that vCPU's
  X86_PV_VCPU_BASIC. BASIC is where Xen puts a vCPU's context, but its
  content is a fixed struct, vcpu_guest_context_x86_64 (5168 bytes); xenlike
  writes it as Xen's getvcpucontext would for an online vCPU (VGCF_online) with
  no register state to speak of. Of the other per-vCPU records, EXTENDED is a
  fixed struct (xen_domctl_ext_vcpucontext) and MSRS an array of 16-byte MSR
  entries; XSAVE alone is a per-vCPU blob of any length that libxc passes
  between the hypervisor and the stream untouched, which is what a serialized
  program is. Xen's verifier checks these records' 8-byte header only, and
  libxl's EMULATOR_CONTEXT, the other variable-length blob, belongs to the
  domain rather than a vCPU. As Xen, an empty state sends no XSAVE record.
- X86_TSC_INFO: mode 0 (TSC_MODE_DEFAULT), 0 kHz (xenlike emulates no TSC),
  and the domain's uptime as nsec, which a restore continues from.
"""

import struct
from array import array
from collections.abc import Iterator, Mapping, Sequence
from enum import IntEnum

from construct import (
    Array,
    Bytes,
    Int8ul,
    Int16ub,
    Int16ul,
    Int32ub,
    Int32ul,
    Int64ub,
    Int64ul,
    Padding,
    Struct,
)

from xenlike.abi._layout import export_enum, offsetof
from xenlike.hypervisor.core import XEN_VERSION
from xenlike.memory import XEN_PAGE_SHIFT, XEN_PAGE_SIZE
from xenlike.migration._record import REC_TYPE_OPTIONAL, Cursor, record, record_header
from xenlike.migration.image import DomainImage, Page

__all__ = [
    "DHDR_TYPE_X86_HVM",
    "DHDR_TYPE_X86_PV",
    "IHDR_ID",
    "IHDR_MARKER",
    "IHDR_OPT_BIG_ENDIAN",
    "IHDR_VERSION",
    "MAX_BATCH_SIZE",
    "PAGE_DATA_PFN_MASK",
    "PAGE_DATA_TYPE_MASK",
    "PAGE_DATA_TYPE_SHIFT",
    "REC_LENGTH_MAX",
    "REC_TYPE_OPTIONAL",
    "VGCF_online",
    "PageRun",
    "PfInfo",
    "RecType",
    "cpu_user_regs",
    "page_data",
    "page_data_runs",
    "parse_page_data",
    "read",
    "settle_runs",
    "trap_info",
    "vcpu_guest_context_x86_64",
    "write",
    "xc_sr_dhdr",
    "xc_sr_ihdr",
    "xc_sr_rec_page_data_header",
    "xc_sr_rec_x86_pv_info",
    "xc_sr_rec_x86_pv_p2m_frames",
    "xc_sr_rec_x86_pv_vcpu_hdr",
    "xc_sr_rec_x86_tsc_info",
]

IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
IHDR_OPT_BIG_ENDIAN = 1 << 0

DHDR_TYPE_X86_PV = 0x00000001
DHDR_TYPE_X86_HVM = 0x00000002

REC_LENGTH_MAX = 128 << 20  # "somewhat arbitrary": Xen's restore refuses longer records
MAX_BATCH_SIZE = 1024  # pfns per PAGE_DATA record (xg_sr_common.h)

PAGE_DATA_PFN_MASK = 0x000FFFFFFFFFFFFF
PAGE_DATA_TYPE_MASK = 0xF000000000000000
PAGE_DATA_TYPE_SHIFT = 60

VGCF_online = 1 << 5  # vcpu_guest_context.flags: the vCPU is up


class RecType(IntEnum):
    """libxc record types (REC_TYPE_*)."""

    END = 0x00000000
    PAGE_DATA = 0x00000001
    X86_PV_INFO = 0x00000002
    X86_PV_P2M_FRAMES = 0x00000003
    X86_PV_VCPU_BASIC = 0x00000004
    X86_PV_VCPU_EXTENDED = 0x00000005
    X86_PV_VCPU_XSAVE = 0x00000006
    SHARED_INFO = 0x00000007
    X86_TSC_INFO = 0x00000008
    HVM_CONTEXT = 0x00000009
    HVM_PARAMS = 0x0000000A
    TOOLSTACK = 0x0000000B
    X86_PV_VCPU_MSRS = 0x0000000C
    VERIFY = 0x0000000D
    CHECKPOINT = 0x0000000E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0000000F
    STATIC_DATA_END = 0x00000010
    X86_CPUID_POLICY = 0x00000011
    X86_MSR_POLICY = 0x00000012


class PfInfo(IntEnum):
    """A PAGE_DATA pfn's type, bits 63-60 (XEN_DOMCTL_PFINFO_* shifted by 32)."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


__all__ += export_enum(RecType, "REC_TYPE_", globals())

xc_sr_ihdr = Struct(
    "marker" / Int64ub,
    "id" / Int32ub,
    "version" / Int32ub,
    "options" / Int16ub,
    "_res1" / Int16ub,
    "_res2" / Int32ub,
)

xc_sr_dhdr = Struct(
    "type" / Int32ul,
    "page_shift" / Int16ul,
    "_res1" / Int16ul,
    "xen_major" / Int32ul,
    "xen_minor" / Int32ul,
)

xc_sr_rec_page_data_header = Struct(
    "count" / Int32ul,
    "_res1" / Int32ul,
    # uint64_t pfn[count] follows
)

xc_sr_rec_x86_pv_info = Struct(
    "guest_width" / Int8ul,
    "pt_levels" / Int8ul,
    "_res" / Bytes(6),
)

xc_sr_rec_x86_pv_p2m_frames = Struct(
    "start_pfn" / Int32ul,
    "end_pfn" / Int32ul,
    # uint64_t p2m_pfns[] follows
)

xc_sr_rec_x86_pv_vcpu_hdr = Struct(
    "vcpu_id" / Int32ul,
    "_res1" / Int32ul,
    # uint8_t context[] follows
)

xc_sr_rec_x86_tsc_info = Struct(
    "mode" / Int32ul,
    "khz" / Int32ul,
    "nsec" / Int64ul,
    "incarnation" / Int32ul,
    "_res1" / Int32ul,
)

# The x86_64 vCPU context of arch-x86/xen.h and xen-x86_64.h, which
# XEN_DOMCTL_getvcpucontext returns and X86_PV_VCPU_BASIC carries.
cpu_user_regs = Struct(
    "r15" / Int64ul,
    "r14" / Int64ul,
    "r13" / Int64ul,
    "r12" / Int64ul,
    "rbp" / Int64ul,
    "rbx" / Int64ul,
    "r11" / Int64ul,
    "r10" / Int64ul,
    "r9" / Int64ul,
    "r8" / Int64ul,
    "rax" / Int64ul,
    "rcx" / Int64ul,
    "rdx" / Int64ul,
    "rsi" / Int64ul,
    "rdi" / Int64ul,
    "error_code" / Int32ul,
    "entry_vector" / Int32ul,
    "rip" / Int64ul,
    "cs" / Int16ul,
    Padding(2),
    "saved_upcall_mask" / Int8ul,
    Padding(3),
    "rflags" / Int64ul,
    "rsp" / Int64ul,
    "ss" / Int16ul,
    Padding(6),
    "es" / Int16ul,
    Padding(6),
    "ds" / Int16ul,
    Padding(6),
    "fs" / Int16ul,
    Padding(6),
    "gs" / Int16ul,
    Padding(6),
)

trap_info = Struct(
    "vector" / Int8ul,
    "flags" / Int8ul,
    "cs" / Int16ul,
    Padding(4),
    "address" / Int64ul,
)

vcpu_guest_context_x86_64 = Struct(
    "fpu_ctxt" / Bytes(512),
    "flags" / Int64ul,
    "user_regs" / cpu_user_regs,
    "trap_ctxt" / Array(256, trap_info),
    "ldt_base" / Int64ul,
    "ldt_ents" / Int64ul,
    "gdt_frames" / Array(16, Int64ul),
    "gdt_ents" / Int64ul,
    "kernel_ss" / Int64ul,
    "kernel_sp" / Int64ul,
    "ctrlreg" / Array(8, Int64ul),
    "debugreg" / Array(8, Int64ul),
    "event_callback_eip" / Int64ul,
    "failsafe_callback_eip" / Int64ul,
    "syscall_callback_eip" / Int64ul,
    "vm_assist" / Int64ul,
    "fs_base" / Int64ul,
    "gs_base_kernel" / Int64ul,
    "gs_base_user" / Int64ul,
)

GUEST_WIDTH = 8  # x86_64 guests
PT_LEVELS = 4
_VCPU_CONTEXT_SIZE = vcpu_guest_context_x86_64.sizeof()
_FLAGS_AT = offsetof(vcpu_guest_context_x86_64, "flags")
# An online vCPU's context: everything zero but VGCF_online. Built once.
_ONLINE_CONTEXT = bytes(_FLAGS_AT) + struct.pack("<Q", VGCF_online)
_ONLINE_CONTEXT += bytes(_VCPU_CONTEXT_SIZE - len(_ONLINE_CONTEXT))

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PAGE_DATA_HEADER = struct.Struct("<II")  # xc_sr_rec_page_data_header
_PAGE_DATA_RESERVED = 0x0FF0000000000000  # bits 59-52 of a PAGE_DATA pfn
_PF_TYPES = {int(t) for t in PfInfo}
_NAMES = {int(t): t.name for t in RecType}


def page_data(pages: Mapping[int, Page], pfns: Sequence[int]) -> Iterator[Page]:
    """One PAGE_DATA record for `pfns` (ascending, each in `pages`), in pieces: its
    headers and pfn list, then each page as it is given, uncopied (a whole record
    is up to 4 MiB, which a writer sends with writev straight from where it lies)."""
    count = len(pfns)
    length = _PAGE_DATA_HEADER.size + 8 * count + XEN_PAGE_SIZE * count
    yield b"".join(
        (
            record_header(RecType.PAGE_DATA, length),
            _PAGE_DATA_HEADER.pack(count, 0),
            struct.pack(f"<{count}Q", *pfns),
        )
    )
    for pfn in pfns:
        yield pages[pfn]


def _vcpu(rec_type: RecType, vcpu_id: int, context: bytes) -> bytes:
    header = xc_sr_rec_x86_pv_vcpu_hdr.build({"vcpu_id": vcpu_id, "_res1": 0})
    return record(rec_type, header, context)


def write(image: DomainImage) -> Iterator[Page]:
    """libxc's stream for `image`, in pieces (each page of PAGE_DATA one piece)."""
    yield xc_sr_ihdr.build(
        {
            "marker": IHDR_MARKER,
            "id": IHDR_ID,
            "version": IHDR_VERSION,
            "options": 0,  # little-endian
            "_res1": 0,
            "_res2": 0,
        }
    )
    yield xc_sr_dhdr.build(
        {
            "type": DHDR_TYPE_X86_PV,
            "page_shift": XEN_PAGE_SHIFT,
            "_res1": 0,
            "xen_major": XEN_VERSION[0],
            "xen_minor": XEN_VERSION[1],
        }
    )
    yield record(
        RecType.X86_PV_INFO,
        xc_sr_rec_x86_pv_info.build(
            {"guest_width": GUEST_WIDTH, "pt_levels": PT_LEVELS, "_res": bytes(6)}
        ),
    )
    yield record(RecType.STATIC_DATA_END)
    yield record(
        RecType.X86_PV_P2M_FRAMES,
        xc_sr_rec_x86_pv_p2m_frames.build({"start_pfn": 0, "end_pfn": image.max_pfn}),
    )
    pfns = sorted(image.pages)
    for first in range(0, len(pfns), MAX_BATCH_SIZE):
        yield from page_data(image.pages, pfns[first : first + MAX_BATCH_SIZE])
    yield record(
        RecType.X86_TSC_INFO,
        xc_sr_rec_x86_tsc_info.build(
            {"mode": 0, "khz": 0, "nsec": image.elapsed_ns, "incarnation": 0, "_res1": 0}
        ),
    )
    yield record(RecType.SHARED_INFO, image.shared_info)
    for vcpu_id in sorted(image.vcpus):
        yield _vcpu(RecType.X86_PV_VCPU_BASIC, vcpu_id, _ONLINE_CONTEXT)
        if image.vcpus[vcpu_id]:
            yield _vcpu(RecType.X86_PV_VCPU_XSAVE, vcpu_id, image.vcpus[vcpu_id])
    yield record(RecType.END)


PageRun = tuple[int, int, int]
"""Frames whose pages follow one another where they were read: (first pfn, how many,
offset of the first page in the file or buffer); an offset of -1 (one frame) is
an XTAB pfn, a frame gone since it was sent."""


def page_data_runs(head: memoryview, length: int, at: int, max_pfn: int) -> list[PageRun]:
    """A PAGE_DATA record of `length` bytes whose body starts at offset `at`, checked
    from its header and pfn list alone (`head`: the body's first bytes, at least
    those when the record has them): its frames as runs, in the record's order;
    ValueError says what is wrong.

    The usual record is checked whole, with no loop over its entries: the type
    and reserved bits are a pfn entry's top bits, so when the largest entry is
    within `max_pfn` every entry is a NOTAB pfn in range, and the body's length
    says whether every page is there; when its pfns follow one another too (as
    the writer's do) it is one run.
    """
    header_size = _PAGE_DATA_HEADER.size
    if length < header_size:
        raise ValueError(f"PAGE_DATA record of {length} bytes")
    count, reserved = _PAGE_DATA_HEADER.unpack_from(head)
    if count == 0 or reserved:
        raise ValueError(f"PAGE_DATA record with count {count}, reserved {reserved:#x}")
    data_at = header_size + 8 * count
    if length < data_at:
        raise ValueError(f"PAGE_DATA record too short for {count} pfns")
    entries = head[header_size:data_at].cast("B").cast("Q")
    if max(entries) <= max_pfn and length == data_at + XEN_PAGE_SIZE * count:
        first = entries[0]
        if entries.tobytes() == array("Q", range(first, first + count)).tobytes():
            return [(first, count, at + data_at)]
        return [
            (pfn, 1, at + offset)
            for pfn, offset in zip(entries, range(data_at, length, XEN_PAGE_SIZE))
        ]
    runs: list[PageRun] = []
    for index, entry in enumerate(entries):
        pfn = entry & PAGE_DATA_PFN_MASK
        page_type = entry >> PAGE_DATA_TYPE_SHIFT
        if entry & _PAGE_DATA_RESERVED:
            raise ValueError(f"reserved bits set in PAGE_DATA pfn[{index}]")
        if pfn > max_pfn:
            raise ValueError(f"PAGE_DATA pfn {pfn:#x} beyond max_pfn {max_pfn:#x}")
        if page_type == PfInfo.XTAB:
            runs.append((pfn, 1, -1))
        elif page_type == PfInfo.NOTAB:
            if data_at + XEN_PAGE_SIZE > length:
                raise ValueError(f"PAGE_DATA record too short for the contents of {count} pages")
            runs.append((pfn, 1, at + data_at))
            data_at += XEN_PAGE_SIZE
        else:
            name = PfInfo(page_type).name if page_type in _PF_TYPES else hex(page_type)
            raise ValueError(f"PAGE_DATA pfn {pfn:#x} of type {name}")
    if data_at != length:
        raise ValueError(f"PAGE_DATA record has {length - data_at} bytes after its pages")
    return runs


def settle_runs(runs: Sequence[PageRun]) -> list[PageRun]:
    """Where each frame's last page lies, after `runs` in their order (a frame sent
    again takes its later page; an XTAB frame is dropped): runs by ascending pfn,
    none overlapping, none XTAB, the consecutive ones merged. The writer's runs
    already are, and cost no loop over their frames."""
    if all(at >= 0 for _, _, at in runs) and all(
        before[0] + before[1] <= after[0] for before, after in zip(runs, runs[1:])
    ):
        return list(runs)
    where: dict[int, int] = {}
    for first, count, at in runs:
        if at < 0:
            where.pop(first, None)
            continue
        offsets = range(at, at + count * XEN_PAGE_SIZE, XEN_PAGE_SIZE)
        where.update(zip(range(first, first + count), offsets))
    settled: list[PageRun] = []
    for pfn in sorted(where):
        at = where[pfn]
        if settled:
            first, count, start = settled[-1]
            if pfn == first + count and at == start + count * XEN_PAGE_SIZE:
                settled[-1] = (first, count + 1, start)
                continue
        settled.append((pfn, 1, at))
    return settled


def parse_page_data(body: memoryview, max_pfn: int) -> tuple[dict[int, memoryview], set[int]]:
    """A PAGE_DATA record's body, checked, as (its pages by pfn, views of `body`; the
    pfns it marks XTAB, gone since they were sent); ValueError says what is wrong."""
    pages: dict[int, memoryview] = {}
    gone: set[int] = set()
    for first, count, at in page_data_runs(body, len(body), 0, max_pfn):
        if at < 0:
            pages.pop(first, None)
            gone.add(first)
            continue
        pfns = range(first, first + count)
        pages.update(
            (pfn, body[offset : offset + XEN_PAGE_SIZE])
            for pfn, offset in zip(pfns, range(at, at + count * XEN_PAGE_SIZE, XEN_PAGE_SIZE))
        )
        if gone:
            gone.difference_update(pfns)
    return pages, gone


class _Reader:
    """Reads one libxc stream, checking each record against what came before."""

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self.static_done = False
        self.pv_info = False
        self.max_pfn: int | None = None
        self.runs: list[PageRun] = []  # every PAGE_DATA record's, in the stream's order
        self.tsc_nsec: int | None = None
        self.shared_info: bytes | None = None
        self.vcpus: dict[int, bytes] = {}
        self.last_basic: int | None = None

    def headers(self) -> None:
        cursor = self.cursor
        start = cursor.offset
        ihdr = xc_sr_ihdr.parse(cursor.take(xc_sr_ihdr.sizeof(), "libxc image header"))
        if ihdr.marker != IHDR_MARKER or ihdr.id != IHDR_ID:
            raise cursor.error('no libxc image header (marker and "XENF")', start)
        if ihdr.version != IHDR_VERSION:
            raise cursor.error(f"libxc stream version {ihdr.version}, not {IHDR_VERSION}", start)
        if ihdr.options & IHDR_OPT_BIG_ENDIAN:
            raise cursor.error("big-endian libxc stream", start)
        if ihdr.options or ihdr._res1 or ihdr._res2:
            raise cursor.error("reserved bits set in the libxc image header", start)
        start = cursor.offset
        dhdr = xc_sr_dhdr.parse(cursor.take(xc_sr_dhdr.sizeof(), "libxc domain header"))
        if dhdr.type != DHDR_TYPE_X86_PV:
            raise cursor.error(f"domain type {dhdr.type:#x} is not x86 PV", start)
        if dhdr.page_shift != XEN_PAGE_SHIFT:
            raise cursor.error(f"page shift {dhdr.page_shift}, not {XEN_PAGE_SHIFT}", start)
        if dhdr._res1:
            raise cursor.error("reserved bits set in the libxc domain header", start)

    def records(self) -> None:
        cursor = self.cursor
        while True:
            rec_type, start, body_at, length = cursor.record_at(_NAMES, "libxc", REC_LENGTH_MAX)
            if rec_type == RecType.END:
                if length:
                    raise cursor.error("END record with a body", start)
                break
            if rec_type & REC_TYPE_OPTIONAL:
                continue  # "the contents of optional records may be ignored"
            if rec_type == RecType.PAGE_DATA:
                self.page_data(body_at, length, start)
                continue
            handler = self.HANDLERS.get(RecType(rec_type))
            if handler is None:
                raise cursor.error(f"{_NAMES[rec_type]} record in an x86 PV save file", start)
            handler(self, cursor.read(body_at, length, _NAMES[rec_type], start), start)
        missing = [
            name
            for name, value in (("X86_TSC_INFO", self.tsc_nsec), ("SHARED_INFO", self.shared_info))
            if value is None
        ]
        if not self.vcpus:
            missing.append("X86_PV_VCPU_BASIC")
        if missing:
            raise cursor.error(f"libxc stream ends without {', '.join(missing)}")

    def _fixed(self, body: memoryview, start: int, name: str, size: int) -> None:
        if len(body) != size:
            raise self.cursor.error(f"{name} record of {len(body)} bytes, not {size}", start)

    def _need_memory(self, name: str, start: int) -> int:
        if self.max_pfn is None:
            raise self.cursor.error(f"{name} record before X86_PV_P2M_FRAMES", start)
        return self.max_pfn

    def x86_pv_info(self, body: memoryview, start: int) -> None:
        self._fixed(body, start, "X86_PV_INFO", xc_sr_rec_x86_pv_info.sizeof())
        if self.pv_info:
            raise self.cursor.error("second X86_PV_INFO record", start)
        info = xc_sr_rec_x86_pv_info.parse(body)
        if (info.guest_width, info.pt_levels) != (GUEST_WIDTH, PT_LEVELS):
            raise self.cursor.error(
                f"guest width {info.guest_width} with {info.pt_levels} page-table levels "
                f"(xenlike saves 64-bit guests: {GUEST_WIDTH}, {PT_LEVELS})",
                start,
            )
        if any(info._res):
            raise self.cursor.error("reserved bits set in X86_PV_INFO", start)
        self.pv_info = True

    def static_data_end(self, body: memoryview, start: int) -> None:
        self._fixed(body, start, "STATIC_DATA_END", 0)
        if not self.pv_info:
            raise self.cursor.error("STATIC_DATA_END before X86_PV_INFO", start)
        if self.static_done:
            raise self.cursor.error("second STATIC_DATA_END record", start)
        self.static_done = True

    def x86_pv_p2m_frames(self, body: memoryview, start: int) -> None:
        if not self.static_done:
            raise self.cursor.error("X86_PV_P2M_FRAMES before STATIC_DATA_END", start)
        if self.max_pfn is not None:
            raise self.cursor.error("second X86_PV_P2M_FRAMES record", start)
        self._fixed(body, start, "X86_PV_P2M_FRAMES", xc_sr_rec_x86_pv_p2m_frames.sizeof())
        frames = xc_sr_rec_x86_pv_p2m_frames.parse(body)
        if frames.start_pfn != 0 or frames.end_pfn < frames.start_pfn:
            raise self.cursor.error(
                f"P2M range {frames.start_pfn:#x}..{frames.end_pfn:#x} does not start at 0", start
            )
        self.max_pfn = frames.end_pfn

    def page_data(self, body_at: int, length: int, start: int) -> None:
        """A PAGE_DATA record checked from its header and pfn list: its pages are left
        where they lie, found again by `runs`."""
        max_pfn = self._need_memory("PAGE_DATA", start)
        if self.shared_info is not None or self.vcpus:
            raise self.cursor.error("PAGE_DATA record after the vCPU state", start)
        head_size = _PAGE_DATA_HEADER.size
        what = "PAGE_DATA record"
        head = self.cursor.read(body_at, min(length, head_size + 8 * MAX_BATCH_SIZE), what, start)
        if length >= head_size:
            (count,) = _U32.unpack_from(head)
            if len(head) < head_size + 8 * count <= length:
                head = self.cursor.read(body_at, head_size + 8 * count, what, start)
        try:
            self.runs += page_data_runs(head, length, body_at, max_pfn)
        except ValueError as error:
            raise self.cursor.error(str(error), start) from None

    def x86_tsc_info(self, body: memoryview, start: int) -> None:
        self._fixed(body, start, "X86_TSC_INFO", xc_sr_rec_x86_tsc_info.sizeof())
        tsc = xc_sr_rec_x86_tsc_info.parse(body)
        if tsc._res1:
            raise self.cursor.error("reserved bits set in X86_TSC_INFO", start)
        self.tsc_nsec = tsc.nsec

    def shared_info_record(self, body: memoryview, start: int) -> None:
        self._need_memory("SHARED_INFO", start)
        self._fixed(body, start, "SHARED_INFO", XEN_PAGE_SIZE)
        if self.shared_info is not None:
            raise self.cursor.error("second SHARED_INFO record", start)
        self.shared_info = bytes(body)

    def _vcpu_header(self, body: memoryview, start: int, name: str) -> int:
        self._need_memory(name, start)
        header_size = xc_sr_rec_x86_pv_vcpu_hdr.sizeof()
        if len(body) < header_size:
            raise self.cursor.error(f"{name} record of {len(body)} bytes", start)
        header = xc_sr_rec_x86_pv_vcpu_hdr.parse(body[:header_size])
        if header._res1:
            raise self.cursor.error(f"reserved bits set in {name}", start)
        return int(header.vcpu_id)

    def vcpu_basic(self, body: memoryview, start: int) -> None:
        vcpu_id = self._vcpu_header(body, start, "X86_PV_VCPU_BASIC")
        self._fixed(body, start, "X86_PV_VCPU_BASIC", 8 + _VCPU_CONTEXT_SIZE)
        if vcpu_id in self.vcpus:
            raise self.cursor.error(f"second X86_PV_VCPU_BASIC record for vCPU {vcpu_id}", start)
        (flags,) = _U64.unpack_from(body, 8 + _FLAGS_AT)
        if not flags & VGCF_online:
            raise self.cursor.error(f"vCPU {vcpu_id} is saved but not online", start)
        self.vcpus[vcpu_id] = b""
        self.last_basic = vcpu_id

    def vcpu_xsave(self, body: memoryview, start: int) -> None:
        vcpu_id = self._vcpu_header(body, start, "X86_PV_VCPU_XSAVE")
        if vcpu_id != self.last_basic or self.vcpus[vcpu_id]:
            raise self.cursor.error(
                f"X86_PV_VCPU_XSAVE for vCPU {vcpu_id} does not follow its X86_PV_VCPU_BASIC",
                start,
            )
        if len(body) == 8:
            raise self.cursor.error(f"empty X86_PV_VCPU_XSAVE for vCPU {vcpu_id}", start)
        self.vcpus[vcpu_id] = bytes(body[8:])

    HANDLERS = {
        RecType.X86_PV_INFO: x86_pv_info,
        RecType.STATIC_DATA_END: static_data_end,
        RecType.X86_PV_P2M_FRAMES: x86_pv_p2m_frames,
        RecType.X86_TSC_INFO: x86_tsc_info,
        RecType.SHARED_INFO: shared_info_record,
        RecType.X86_PV_VCPU_BASIC: vcpu_basic,
        RecType.X86_PV_VCPU_XSAVE: vcpu_xsave,
    }


def read(cursor: Cursor) -> DomainImage:
    """Read one libxc stream at `cursor` (through its END record), checking everything.

    Raises StreamError for anything xenlike's writer would not have written
    and Xen's format does not allow; the image has no XenStore data or config,
    which live in the layers above.
    """
    reader = _Reader(cursor)
    reader.headers()
    reader.records()
    assert reader.max_pfn is not None and reader.shared_info is not None
    assert reader.tsc_nsec is not None
    return DomainImage(
        max_pfn=reader.max_pfn,
        pages=cursor.pages(settle_runs(reader.runs)),
        shared_info=reader.shared_info,
        vcpus=reader.vcpus,
        elapsed_ns=reader.tsc_nsec,
    )
