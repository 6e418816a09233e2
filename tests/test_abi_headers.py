"""Every size, offset and constant in `xenlike.abi`, checked against Xen's real headers.

The checks are derived by walking the modules' ``__all__``: for each construct
Struct its size and, for every member (nested ones and array elements too),
its offset, its size and the signedness of integer members; for each
constant the C expression of the same name; each IntEnum's members must all
be exported under Xen's names, so they are checked that way. One C program
built on /usr/include/xen prints the C side of every check.

Where a Python name differs from C (``pad`` for ``__pad``, layouts of union
members that have no type name of their own, constants that Xen computes
rather than names) the mapping is written out below.
"""

import enum
import importlib
import pkgutil
import shutil
import subprocess
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import construct
import pytest

import xenlike.abi
from xenlike.abi import memory, ring, trace, xs_wire
from xenlike.abi._layout import Field, fields

XEN_INCLUDE = Path("/usr/include/xen")

PRELUDE = r"""
#define __XEN_TOOLS__ 1
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <errno.h>   /* before xs_wire.h, which then defines xsd_errors[] */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
/* ring.h leaves the barriers to the includer at modern interface versions. */
#define xen_mb()  __sync_synchronize()
#define xen_rmb() __sync_synchronize()
#define xen_wmb() __sync_synchronize()
#include <xen/xen.h>
#include <xen/errno.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/sched.h>
#include <xen/memory.h>
#include <xen/version.h>
#include <xen/trace.h>
#include <xen/domctl.h>
#include <xen/sysctl.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/console.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>
#include <xen/io/protocols.h>

/* The data of records trace.h names but does not lay out, as Xen's sources do:
 * tools/xentrace/xentrace.c (cpu_change_record's data), common/trace.c
 * (insert_lost_records), common/sched/core.c (vcpu_runstate_change). */
struct trc_cpu_change { int cpu; unsigned window_size; };
struct __attribute__((packed)) trc_lost_records {
    uint32_t lost_records; uint16_t did, vid; uint64_t first_tsc;
};
struct trc_runstate_change { uint16_t vcpu; uint16_t domain; };

/* ring.data_intf is the index page of a flex ring; give it a name. */
DEFINE_XEN_FLEX_RING_AND_INTF(xenlike);

static const char *const gnttabop_error_msgs[] = GNTTABOP_error_msgs;

/* 1 for a signed integer; 0 for unsigned ones and for the unions and guest
 * handles that the Python layouts carry as unsigned integers. */
#define SIGNED(x) _Generic((x), signed char: 1, short: 1, int: 1, long: 1, long long: 1, \
                           default: 0)

/* The first word of a struct t_rec with the given bit fields. */
static uint32_t t_rec_word(uint32_t event, uint32_t extra, uint32_t cycles)
{
    struct t_rec rec;
    uint32_t word;
    memset(&rec, 0, sizeof(rec));
    rec.event = event;
    rec.extra_u32 = extra;
    rec.cycles_included = cycles;
    memcpy(&word, &rec, sizeof(word));
    return word;
}

int main(void)
{
"""


def union_member(c_type: str, member: str) -> str:
    """The (anonymous) type of a union member, e.g. netif_extra_info's u.gso."""
    return f"__typeof__((({c_type} *)0)->{member})"


@dataclass(frozen=True)
class CType:
    """How a Python Struct is spelled in C.

    `members` maps a Python member path (no array indices) to the C member's
    name at that step, or to None when C has no such member (its bytes are
    then covered by the struct's size and by the variant layouts).
    """

    type: str
    size: str | None = None
    members: dict[str, str | None] = field(default_factory=dict)


# Structs whose C spelling is not `struct <python name>` with the same member names.
C_TYPES: dict[str, CType] = {
    # Every DEFINE_RING_TYPES sring starts with the same header; blkif's stands for all.
    "ring.sring_header": CType(
        "struct blkif_sring", size="offsetof(struct blkif_sring, ring)", members={"pad": "__pad"}
    ),
    "ring.data_intf": CType("struct xenlike_data_intf"),
    "console.xencons_interface": CType("struct xencons_interface", members={"in_": "in"}),
    "netif.netif_extra_info_gso": CType(union_member("struct netif_extra_info", "u.gso")),
    "netif.netif_extra_info_mcast": CType(union_member("struct netif_extra_info", "u.mcast")),
    "netif.netif_extra_info_hash": CType(union_member("struct netif_extra_info", "u.hash")),
    "grant_table.grant_entry_v2": CType("union grant_entry_v2", members={"body": None}),
    "grant_table.grant_entry_v2_full_page": CType(
        union_member("union grant_entry_v2", "full_page")
    ),
    "grant_table.grant_entry_v2_sub_page": CType(union_member("union grant_entry_v2", "sub_page")),
    "grant_table.grant_entry_v2_transitive": CType(
        union_member("union grant_entry_v2", "transitive")
    ),
    "event_channel.evtchn_status_unbound": CType(union_member("struct evtchn_status", "u.unbound")),
    "event_channel.evtchn_status_interdomain": CType(
        union_member("struct evtchn_status", "u.interdomain")
    ),
    "event_channel.evtchn_init_control": CType(
        "struct evtchn_init_control", members={"pad": "_pad"}
    ),
    "event_channel.evtchn_fifo_control_block": CType(
        "struct evtchn_fifo_control_block", members={"rsvd": "_rsvd"}
    ),
    "xen.start_info_console_dom0": CType(union_member("struct start_info", "console.dom0")),
    "memory.xen_memory_exchange": CType("struct xen_memory_exchange", members={"in_": "in"}),
    # The header word is three bit fields, which offsetof cannot name; the
    # bit layout is checked by FUNCTION_CHECKS below.
    "trace.t_rec": CType("struct t_rec", members={"header": None}),
    "trace.t_rec_cycles": CType(union_member("struct t_rec", "u.cycles")),
    "trace.t_rec_nocycles": CType(union_member("struct t_rec", "u.nocycles")),
    "domctl.xen_domctl": CType("struct xen_domctl", members={"pad": "_pad"}),
}

# Constants that are not a C name of their own: the C expression Xen (or, where
# noted, Xen's hypervisor or Linux sources) computes them with.
C_CONSTANTS: dict[str, str] = {
    "ring.XEN_PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
    "ring.SRING_HEADER_SIZE": "offsetof(struct blkif_sring, ring)",
    "ring.REQ_PROD_OFFSET": "offsetof(struct blkif_sring, req_prod)",
    "ring.REQ_EVENT_OFFSET": "offsetof(struct blkif_sring, req_event)",
    "ring.RSP_PROD_OFFSET": "offsetof(struct blkif_sring, rsp_prod)",
    "ring.RSP_EVENT_OFFSET": "offsetof(struct blkif_sring, rsp_event)",
    "ring.PVT_OFFSET": "offsetof(struct blkif_sring, pvt)",
    "ring.PAD_OFFSET": "offsetof(struct blkif_sring, __pad)",
    # Linux's definition (blkif.h only states the rule).
    "blkif.BLKIF_SEGS_PER_INDIRECT_FRAME": (
        "(1 << XEN_PAGE_SHIFT) / sizeof(struct blkif_request_segment)"
    ),
    "console.XENCONS_IN_SIZE": "sizeof(((struct xencons_interface *)0)->in)",
    "console.XENCONS_OUT_SIZE": "sizeof(((struct xencons_interface *)0)->out)",
    # Xen's common/grant_table.c.
    "grant_table.SHGNT_PER_PAGE_V1": "(1 << XEN_PAGE_SHIFT) / sizeof(grant_entry_v1_t)",
    "grant_table.SHGNT_PER_PAGE_V2": "(1 << XEN_PAGE_SHIFT) / sizeof(grant_entry_v2_t)",
    "grant_table.STGNT_PER_PAGE": "(1 << XEN_PAGE_SHIFT) / sizeof(grant_status_t)",
}


def c_constant(module: str, name: str) -> str:
    if f"{module}.{name}" in C_CONSTANTS:
        return C_CONSTANTS[f"{module}.{name}"]
    if name.startswith("HYPERVISOR_"):
        return "__" + name  # Xen's __HYPERVISOR_*; see xenlike.abi.xen.Hypercall
    return name


RING_TYPES = {
    # DEFINE_RING_TYPES name -> (request, response)
    "blkif": ("blkif.blkif_request", "blkif.blkif_response"),
    "netif_tx": ("netif.netif_tx_request", "netif.netif_tx_response"),
    "netif_rx": ("netif.netif_rx_request", "netif.netif_rx_response"),
    "xen_netif_ctrl": ("netif.xen_netif_ctrl_request", "netif.xen_netif_ctrl_response"),
}


def _layout(dotted: str) -> construct.Struct:
    module, name = dotted.split(".")
    return getattr(importlib.import_module(f"xenlike.abi.{module}"), name)


def _ring_size_checks() -> Iterator[tuple[str, str, Any]]:
    for tag, (req, rsp) in RING_TYPES.items():
        entry = max(_layout(req).sizeof(), _layout(rsp).sizeof())
        yield f"sizeof(union {tag}_sring_entry)", f"sizeof(union {tag}_sring_entry)", entry
        for pages in (1, 2, 4, 8):
            area = pages * ring.XEN_PAGE_SIZE
            yield (
                f"ring_size({tag} entry, {pages} pages)",
                f"__CONST_RING_SIZE({tag}, {area})",
                ring.ring_size(entry, area),
            )


def _trace_checks() -> Iterator[tuple[str, str, Any]]:
    samples = [(0x0020100D, 3, 1), (0x0FFFFFFF, 7, 0), (0x00028004, 0, 1), (1, 5, 0)]
    for event, extra, cycles in samples:
        word = trace.t_rec_header(event, extra, bool(cycles))
        c_word = f"t_rec_word({event:#x}, {extra}, {cycles})"
        yield f"t_rec_header({event:#x}, {extra}, {cycles})", c_word, word
        yield (
            f"TRC_HD_TO_EVENT({word:#x})",
            f"TRC_HD_TO_EVENT({c_word})",
            trace.TRC_HD_TO_EVENT(word),
        )
        yield f"TRC_HD_EXTRA({word:#x})", f"TRC_HD_EXTRA({c_word})", trace.TRC_HD_EXTRA(word)
        yield (
            f"TRC_HD_INCLUDES_CYCLE_COUNT({word:#x})",
            f"TRC_HD_INCLUDES_CYCLE_COUNT({c_word})",
            trace.TRC_HD_INCLUDES_CYCLE_COUNT(word),
        )
    # The macros shift a plain int, so ARG_64(5) is INT_MIN in C; as the
    # uint32 data word it lands in, it is 0x80000000.
    for i in range(6):
        for name in ("TRC_PV_HYPERCALL_V2_ARG_32", "TRC_PV_HYPERCALL_V2_ARG_64"):
            yield f"{name}({i})", f"(uint32_t){name}({i})", getattr(trace, name)(i)
    yield "t_rec_size(7, True)", "sizeof(struct t_rec)", trace.t_rec_size(7, True)


def _flex_ring_checks() -> Iterator[tuple[str, str, Any]]:
    for order in range(6):
        yield (
            f"XEN_FLEX_RING_SIZE({order})",
            f"XEN_FLEX_RING_SIZE({order})",
            ring.XEN_FLEX_RING_SIZE(order),
        )


def _xs_mask_checks() -> Iterator[tuple[str, str, Any]]:
    for idx in (0, 1023, 1024, 0xFFFFFFFF):
        yield (
            f"MASK_XENSTORE_IDX({idx:#x})",
            f"MASK_XENSTORE_IDX({idx:#x}U)",
            xs_wire.MASK_XENSTORE_IDX(idx),
        )


def _xenmemf_checks() -> Iterator[tuple[str, str, Any]]:
    for node in range(4):
        yield f"XENMEMF_node({node})", f"XENMEMF_node({node})", memory.XENMEMF_node(node)


# Exported functions, each run against its C macro (or, for t_rec_header and
# t_rec_size, against C's bit fields and sizeof). Every function in an
# __all__ must appear here.
FUNCTION_CHECKS: list[tuple[set[str], Callable[[], Iterator[tuple[str, str, Any]]]]] = [
    ({"ring.ring_size"}, _ring_size_checks),
    ({"ring.XEN_FLEX_RING_SIZE"}, _flex_ring_checks),
    ({"memory.XENMEMF_node"}, _xenmemf_checks),
    ({"xs_wire.MASK_XENSTORE_IDX"}, _xs_mask_checks),
    (
        {
            "trace.t_rec_header",
            "trace.t_rec_size",
            "trace.TRC_HD_TO_EVENT",
            "trace.TRC_HD_EXTRA",
            "trace.TRC_HD_INCLUDES_CYCLE_COUNT",
            "trace.TRC_PV_HYPERCALL_V2_ARG_32",
            "trace.TRC_PV_HYPERCALL_V2_ARG_64",
        },
        _trace_checks,
    ),
]


@dataclass(frozen=True)
class Check:
    label: str
    expr: str
    expected: Any


def _c_path(path: str, ctype: CType) -> str | None:
    """Translate a Python member path ("in_.domid", "seg[3].gref") to C's."""
    steps = []
    prefix = ""
    for step in path.split("."):
        name, bracket, index = step.partition("[")
        prefix = f"{prefix}.{name}" if prefix else name
        if prefix in ctype.members:
            mapped = ctype.members[prefix]
            if mapped is None:
                return None
            name = mapped
        steps.append(name + bracket + index)
    return ".".join(steps)


def _walk(struct: construct.Struct, prefix: str = "", base: int = 0) -> Iterator[tuple[str, Field]]:
    """Every member path of `struct`, with offsets from its start.

    Arrays contribute their first and last elements (and those elements'
    members, for arrays of Structs).
    """
    for f in fields(struct):
        path = prefix + f.name
        yield path, f._replace(offset=base + f.offset)
        if isinstance(f.type, construct.Struct):
            yield from _walk(f.type, path + ".", base + f.offset)
        elif isinstance(f.type, construct.Array):
            elem = f.type.subcon
            while isinstance(elem, construct.Renamed):
                elem = elem.subcon
            size = elem.sizeof()
            for i in sorted({0, f.type.count - 1}):
                at = base + f.offset + i * size
                yield f"{path}[{i}]", Field(f"{f.name}[{i}]", at, size, elem)
                if isinstance(elem, construct.Struct):
                    yield from _walk(elem, f"{path}[{i}].", at)


def struct_checks(label: str, struct: construct.Struct, ctype: CType) -> Iterator[Check]:
    t = ctype.type
    yield Check(f"sizeof {label}", ctype.size or f"sizeof({t})", struct.sizeof())
    for path, f in _walk(struct):
        cpath = _c_path(path, ctype)
        if cpath is None:
            continue
        yield Check(f"offsetof {label}.{path}", f"offsetof({t}, {cpath})", f.offset)
        yield Check(f"sizeof {label}.{path}", f"sizeof((({t} *)0)->{cpath})", f.size)
        if isinstance(f.type, construct.FormatField):
            yield Check(
                f"signed {label}.{path}",
                f"SIGNED((({t} *)0)->{cpath})",
                int(f.type.fmtstr[-1].islower()),
            )


def abi_modules() -> list[types.ModuleType]:
    names = [
        m.name for m in pkgutil.iter_modules(xenlike.abi.__path__) if not m.name.startswith("_")
    ]
    return [importlib.import_module(f"xenlike.abi.{name}") for name in sorted(names)]


def module_checks(module: types.ModuleType) -> Iterator[Check]:
    short = module.__name__.rsplit(".", 1)[1]
    exported = {name: getattr(module, name) for name in module.__all__}
    for name, value in exported.items():
        label = f"{short}.{name}"
        if isinstance(value, construct.Struct):
            yield from struct_checks(label, value, C_TYPES.get(label, CType(f"struct {name}")))
        elif isinstance(value, type) and issubclass(value, enum.Enum):
            missing = [
                member_name
                for member_name, member in value.__members__.items()
                if not any(v is member for v in exported.values())
            ]
            assert not missing, f"{label}: members not exported under Xen's names: {missing}"
        elif isinstance(value, int):
            yield Check(label, c_constant(short, name), int(value))
        elif isinstance(value, str):
            yield Check(label, c_constant(short, name), value)
        elif isinstance(value, tuple) and name == "GNTTABOP_error_msgs":
            yield Check(
                f"len {label}",
                "sizeof(gnttabop_error_msgs) / sizeof(gnttabop_error_msgs[0])",
                len(value),
            )
            for i, message in enumerate(value):
                yield Check(f"{label}[{i}]", f"gnttabop_error_msgs[{i}]", message)
        elif isinstance(value, dict) and label == "xs_wire.XSD_ERRORS":
            yield Check(f"len {label}", "sizeof(xsd_errors) / sizeof(xsd_errors[0])", len(value))
            for i, (errname, errnum) in enumerate(value.items()):
                yield Check(f"{label}[{i}].errstring", f"xsd_errors[{i}].errstring", errname)
                yield Check(f"{label}[{i}].errnum", f"xsd_errors[{i}].errnum", errnum)
        elif callable(value):
            assert any(label in covered for covered, _ in FUNCTION_CHECKS), (
                f"{label}: add checks against its C counterpart to FUNCTION_CHECKS"
            )
        else:
            raise AssertionError(f"{label}: don't know how to check {value!r} against C")
    for covered, generate in FUNCTION_CHECKS:
        if any(label.startswith(f"{short}.") for label in covered):
            for check_label, expr, expected in generate():
                if not isinstance(expected, str):
                    expected = int(expected)  # C prints a bool as 0 or 1
                yield Check(f"{short}.{check_label}", expr, expected)


def all_checks() -> dict[str, list[Check]]:
    return {m.__name__.rsplit(".", 1)[1]: list(module_checks(m)) for m in abi_modules()}


def c_program(checks: list[Check]) -> str:
    lines = [PRELUDE]
    for i, check in enumerate(checks):
        if isinstance(check.expected, str):
            lines.append(f'    printf("%d %s\\n", {i}, {check.expr});')
        else:
            lines.append(f'    printf("%d %lld\\n", {i}, (long long)({check.expr}));')
    lines.append("    return 0;\n}\n")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def checks() -> dict[str, list[Check]]:
    return all_checks()


@pytest.fixture(scope="module")
def c_values(
    checks: dict[str, list[Check]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Compile and run the C side of every check; label -> printed value."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (Debian: apt-get install gcc)")
    if not (XEN_INCLUDE / "io" / "ring.h").exists():
        pytest.skip(
            f"Xen's headers are not under {XEN_INCLUDE} (Debian: apt-get install libxen-dev)"
        )
    flat = [check for module in checks.values() for check in module]
    assert len({check.label for check in flat}) == len(flat), "check labels must be unique"
    work = tmp_path_factory.mktemp("abi_headers")
    source = work / "abi_headers.c"
    source.write_text(c_program(flat))
    exe = work / "abi_headers"
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-o", str(exe), str(source)], capture_output=True, text=True
    )
    assert build.returncode == 0, f"{source} does not compile:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    printed = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert len(printed) == len(flat)
    return {check.label: printed[str(i)] for i, check in enumerate(flat)}


MODULES = [m.__name__.rsplit(".", 1)[1] for m in abi_modules()]


@pytest.mark.parametrize("module", MODULES)
def test_module_matches_xen_headers(
    module: str, checks: dict[str, list[Check]], c_values: dict[str, str]
) -> None:
    assert checks[module], f"{module} defines nothing to check"
    mismatches = []
    for check in checks[module]:
        c_value = c_values[check.label]
        expected = check.expected if isinstance(check.expected, str) else str(check.expected)
        if c_value != expected:
            mismatches.append(f"  {check.label}: C `{check.expr}` = {c_value}, Python = {expected}")
    assert not mismatches, (
        f"{len(mismatches)} of {len(checks[module])} {module} checks disagree with "
        f"{XEN_INCLUDE}:\n" + "\n".join(mismatches)
    )


def test_every_check_has_a_c_counterpart(checks: dict[str, list[Check]]) -> None:
    """The mapping tables above name only things that exist (no stale entries)."""
    labels = {check.label.split(" ")[-1] for module in checks.values() for check in module}
    structs = {label for label in C_TYPES if label in labels}
    assert structs == set(C_TYPES), set(C_TYPES) - structs
    assert set(C_CONSTANTS) <= labels, set(C_CONSTANTS) - labels
    exported = {
        f"{m.__name__.rsplit('.', 1)[1]}.{name}" for m in abi_modules() for name in m.__all__
    }
    functions = set().union(*(covered for covered, _ in FUNCTION_CHECKS))
    assert functions <= exported, functions - exported
