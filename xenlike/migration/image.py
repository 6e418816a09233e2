"""What a saved domain is, as the stream carries it: memory, vCPUs, XenStore, config."""

import re
from collections.abc import Mapping
from typing import Any

import attrs

from xenlike.memory import XEN_PAGE_SIZE

__all__ = ["XENSTORE_KEY", "DomainImage", "Page"]

# The characters xenstored allows in a path (xenstored_core.c's valid_chars).
XENSTORE_KEY = re.compile(r"[A-Za-z0-9\-/_@]+")

# A frame's contents: bytes, or a view of where they lie (a domain's mapped memory,
# a save file read whole), which the writer sends and the reader hands on uncopied.
Page = bytes | bytearray | memoryview

# PAGE_DATA keeps a pfn in 52 bits (PAGE_DATA_PFN_MASK); X86_PV_P2M_FRAMES's
# end_pfn is a uint32_t, which bounds max_pfn tighter.
MAX_PFN_LIMIT = 0xFFFFFFFF


def _check_pages(image: "DomainImage", _: object, pages: Mapping[int, Page]) -> None:
    if pages and not 0 <= min(pages) <= max(pages) <= image.max_pfn:
        pfn = min(pages) if min(pages) < 0 else max(pages)
        raise ValueError(f"page pfn {pfn:#x} is outside 0..max_pfn {image.max_pfn:#x}")
    for pfn, contents in pages.items():
        if len(contents) != XEN_PAGE_SIZE:
            raise ValueError(f"page {pfn:#x} holds {len(contents)} bytes, not {XEN_PAGE_SIZE}")


def _check_shared_info(_: object, __: object, shared_info: bytes) -> None:
    if len(shared_info) != XEN_PAGE_SIZE:
        raise ValueError(f"shared_info holds {len(shared_info)} bytes, not {XEN_PAGE_SIZE}")


def _check_vcpus(_: object, __: object, vcpus: Mapping[int, bytes]) -> None:
    if not vcpus:
        raise ValueError("a domain has at least one online vCPU")
    for vcpu_id in vcpus:
        if not 0 <= vcpu_id <= 0xFFFFFFFF:
            raise ValueError(f"vCPU id {vcpu_id} does not fit a uint32_t")


def _check_xenstore(_: object, __: object, xenstore: Mapping[str, str]) -> None:
    for key, value in xenstore.items():
        if not XENSTORE_KEY.fullmatch(key):
            raise ValueError(f"XenStore key {key!r} has characters xenstored refuses")
        if "\0" in value:
            raise ValueError(f"XenStore value of {key!r} holds a NUL")


@attrs.frozen
class DomainImage:
    """A domain as a save file holds it; `write_save_file` and `read_save_file` map
    it to and from Xen's bytes.

    `pages` holds the populated frames only, by pfn: a pfn up to `max_pfn` that
    is absent was ballooned out (or never populated), and is not sent. A page
    may be a view (of a domain's mapped memory, of the file read): it must
    stay valid while the image is written or used. `vcpus`
    maps each online vCPU's id to its execution state, opaque bytes the guest
    kernel produced. `xenstore` holds keys relative to the domain's device-model
    path, as libxl's emulator records do. `config` is the domain's configuration
    as xl keeps it (a JSON object), or None. `elapsed_ns` is the domain's
    uptime when it was saved (X86_TSC_INFO's nsec).
    """

    max_pfn: int = attrs.field(validator=attrs.validators.in_(range(MAX_PFN_LIMIT + 1)))
    pages: Mapping[int, Page] = attrs.field(validator=_check_pages)
    shared_info: bytes = attrs.field(validator=_check_shared_info)
    vcpus: Mapping[int, bytes] = attrs.field(validator=_check_vcpus)
    xenstore: Mapping[str, str] = attrs.field(factory=dict, validator=_check_xenstore)
    config: Mapping[str, Any] | None = None
    elapsed_ns: int = attrs.field(default=0, validator=attrs.validators.in_(range(1 << 64)))
