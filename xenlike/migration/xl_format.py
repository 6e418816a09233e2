"""xl's save file: xl's header, the domain's config, then libxl's stream.

`xl save` writes `struct save_file_header` (tools/xl/xl.h): a 32-byte magic,
then four uint32_t in the saving host's byte order — a byte-order marker,
mandatory flags (a restore refuses any it does not know), optional flags, and
the length of the optional data that follows. The optional data is a
uint32_t config length then the config, libxl's domain config as JSON with
its trailing NUL (xl_saverestore.c, save_domain_core_writeconfig); a reader
skips any tail it does not understand (xl_vmcontrol.c). The libxl stream
starts right after.
"""

import json
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
from construct import Bytes, Int32ul, Struct

from xenlike.migration import libxl_stream
from xenlike.migration._record import Cursor, FileCursor
from xenlike.migration.image import DomainImage, Page
from xenlike.migration.libxc_stream import PageRun

__all__ = [
    "SAVEFILE_BYTEORDER_VALUE",
    "XL_MANDATORY_FLAG_ALL",
    "XL_MANDATORY_FLAG_JSON",
    "XL_MANDATORY_FLAG_STREAMv2",
    "header_info",
    "read",
    "save_file_header",
    "savefileheader_magic",
    "scan",
    "write",
]

savefileheader_magic = b"Xen saved domain, xl format\n \0 \r"
SAVEFILE_BYTEORDER_VALUE = 0x01020304
XL_MANDATORY_FLAG_JSON = 1 << 0  # the config data is JSON
XL_MANDATORY_FLAG_STREAMv2 = 1 << 1  # a libxl migration v2 stream follows
XL_MANDATORY_FLAG_ALL = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMv2

save_file_header = Struct(
    "magic" / Bytes(32),
    "byteorder" / Int32ul,
    "mandatory_flags" / Int32ul,
    "optional_flags" / Int32ul,
    "optional_data_len" / Int32ul,
)

_U32 = struct.Struct("<I")


def _config_bytes(config: Mapping[str, Any] | None) -> bytes:
    if config is None:
        return b""
    return json.dumps(config, indent=4, sort_keys=True).encode() + b"\0"


def _optional_data(image: DomainImage) -> tuple[int, bytes]:
    """The header's mandatory flags and the optional data (the config) for `image`."""
    config = _config_bytes(image.config)
    flags = XL_MANDATORY_FLAG_STREAMv2 | (XL_MANDATORY_FLAG_JSON if config else 0)
    return flags, _U32.pack(len(config)) + config


def header_info(image: DomainImage) -> tuple[int, int, int]:
    """What xl prints of the header it writes for `image` ("new xl format (info
    0x%x/0x%x/%u)"): mandatory flags, optional flags, optional data length."""
    flags, optional = _optional_data(image)
    return flags, 0, len(optional)


def write(image: DomainImage) -> Iterator[Page]:
    """The whole save file for `image`, in pieces: xl's header, then libxl's stream."""
    flags, optional = _optional_data(image)
    yield save_file_header.build(
        {
            "magic": savefileheader_magic,
            "byteorder": SAVEFILE_BYTEORDER_VALUE,
            "mandatory_flags": flags,
            "optional_flags": 0,
            "optional_data_len": len(optional),
        }
    )
    yield optional
    yield from libxl_stream.write(image)


def _read_config(cursor: Cursor, optional: memoryview, json_flag: bool, at: int) -> Any:
    if not optional:
        return None
    if len(optional) < _U32.size:
        raise cursor.error("xl optional data too short for the config length", at)
    (length,) = _U32.unpack_from(optional)
    if length > len(optional) - _U32.size:
        raise cursor.error(f"xl config of {length} bytes overruns the optional data", at)
    if not length:
        return None
    if not json_flag:
        raise cursor.error("xl config in the old text format, not JSON", at)
    data = bytes(optional[_U32.size : _U32.size + length])
    if not data.endswith(b"\0"):
        raise cursor.error("xl config not NUL-terminated", at)
    try:
        config = json.loads(data[:-1].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise cursor.error(f"xl config is not JSON ({error})", at) from None
    if not isinstance(config, dict):
        raise cursor.error("xl config is not a JSON object", at)
    return config


def read(data: bytes | bytearray | memoryview) -> DomainImage:
    """The domain a whole save file holds, every layer checked; StreamError otherwise.
    Its pages are views of `data`."""
    return _read(Cursor(data))


def scan(fd: int) -> tuple[DomainImage, list[PageRun]]:
    """The domain the save file open at `fd` holds, checked as `read` checks it but
    with no page read: the image has none, and the runs say where they lie in the
    file (ascending pfns, each frame once). Reads the records' headers and their
    pfn lists alone: a restore moves the pages from the file itself."""
    cursor = FileCursor(fd)
    image = _read(cursor)
    return image, cursor.runs


def _read(cursor: Cursor) -> DomainImage:
    header = save_file_header.parse(cursor.take(save_file_header.sizeof(), "xl header"))
    if header.magic != savefileheader_magic:
        raise cursor.error('not an xl save file (no "Xen saved domain, xl format" header)', 0)
    if header.byteorder == int.from_bytes(_U32.pack(SAVEFILE_BYTEORDER_VALUE), "big"):
        raise cursor.error("xl save file from a host of the other byte order", 32)
    if header.byteorder != SAVEFILE_BYTEORDER_VALUE:
        raise cursor.error(f"bad byte-order marker {header.byteorder:#010x} in xl header", 32)
    unknown = header.mandatory_flags & ~XL_MANDATORY_FLAG_ALL
    if unknown:
        raise cursor.error(f"xl save file has unsupported mandatory flag(s) {unknown:#x}", 36)
    if not header.mandatory_flags & XL_MANDATORY_FLAG_STREAMv2:
        raise cursor.error("xl save file in the legacy format (no v2 stream)", 36)
    if header.optional_flags:
        raise cursor.error(
            f"xl save file has unsupported optional flag(s) {header.optional_flags:#x}", 40
        )
    at = cursor.offset
    optional = cursor.take(header.optional_data_len, "xl optional data")
    json_flag = bool(header.mandatory_flags & XL_MANDATORY_FLAG_JSON)
    config = _read_config(cursor, optional, json_flag, at)
    image = libxl_stream.read(cursor)
    if not cursor.at_end():
        raise cursor.error(f"{cursor.size - cursor.offset} bytes after the libxl END record")
    return attrs.evolve(image, config=config)
