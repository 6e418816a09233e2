"""Version queries (version.h): the xen_version hypercall's commands."""

from enum import IntEnum

from construct import Bytes, Int32ul, Int64ul, Struct

from xenlike.abi._layout import export_enum

__all__ = [
    "XEN_CAPABILITIES_INFO_LEN",
    "XEN_CHANGESET_INFO_LEN",
    "XEN_EXTRAVERSION_LEN",
    "XenVerOp",
    "xen_build_id",
    "xen_compile_info",
    "xen_feature_info",
    "xen_platform_parameters",
]


class XenVerOp(IntEnum):
    """Commands of the xen_version hypercall (XENVER_*)."""

    version = 0  # returns (major << 16) | minor
    extraversion = 1  # char[XEN_EXTRAVERSION_LEN], e.g. ".7"
    compile_info = 2  # xen_compile_info
    capabilities = 3  # char[XEN_CAPABILITIES_INFO_LEN], e.g. "xen-3.0-x86_64 ..."
    changeset = 4  # char[XEN_CHANGESET_INFO_LEN]
    platform_parameters = 5  # xen_platform_parameters
    get_features = 6  # xen_feature_info
    pagesize = 7  # returns the page size
    guest_handle = 8  # 16-byte domain handle (UUID)
    commandline = 9  # char[1024]
    build_id = 10  # xen_build_id; returns the bytes written


__all__ += export_enum(XenVerOp, "XENVER_", globals())

XEN_EXTRAVERSION_LEN = 16
XEN_CAPABILITIES_INFO_LEN = 1024
XEN_CHANGESET_INFO_LEN = 64

xen_compile_info = Struct(
    "compiler" / Bytes(64),
    "compile_by" / Bytes(16),
    "compile_domain" / Bytes(32),
    "compile_date" / Bytes(32),
)

xen_platform_parameters = Struct(
    "virt_start" / Int64ul,
)

xen_feature_info = Struct(
    "submap_idx" / Int32ul,  # IN: which 32-bit submap of XENFEAT_* bits
    "submap" / Int32ul,  # OUT
)

# Header of the build-id reply; `len` bytes of buf[] follow.
xen_build_id = Struct(
    "len" / Int32ul,  # IN: room in buf[]
)
