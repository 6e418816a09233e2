"""The classic pcap file format (what tcpdump writes and tshark/Wireshark read).

A 24-byte file header, then per frame a 16-byte record header (seconds,
microseconds, captured length, original length) and the frame's bytes.
Ethernet frames are LINKTYPE_ETHERNET. Dom0 writes this format for
`nic = "pcap:FILE"` and streams it on one Unix socket per bridge,
`<run-dir>/net/<bridge>.pcap.sock`, which `xenlike capture` reads.
"""

import time
from collections.abc import Iterator
from pathlib import Path

from construct import Int16ul, Int32sl, Int32ul, Struct

from xenlike.codec import compile_struct

__all__ = [
    "LINKTYPE_ETHERNET",
    "PCAP_MAGIC",
    "SNAPLEN",
    "PcapError",
    "PcapReader",
    "capture_socket",
    "file_header",
    "pcap_hdr",
    "pcaprec_hdr",
    "read_records",
    "record",
]

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps, written in our (little-endian) order
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535

pcap_hdr = Struct(
    "magic_number" / Int32ul,
    "version_major" / Int16ul,  # 2
    "version_minor" / Int16ul,  # 4
    "thiszone" / Int32sl,  # GMT offset, always 0
    "sigfigs" / Int32ul,  # timestamp accuracy, always 0
    "snaplen" / Int32ul,
    "network" / Int32ul,  # LINKTYPE_*
)

pcaprec_hdr = Struct(
    "ts_sec" / Int32ul,
    "ts_usec" / Int32ul,
    "incl_len" / Int32ul,  # bytes saved in the file
    "orig_len" / Int32ul,  # bytes on the wire
)

_FILE = compile_struct(pcap_hdr, "pcap_hdr")
_RECORD = compile_struct(pcaprec_hdr, "pcaprec_hdr")
_pack_record = _RECORD.format.pack


class PcapError(ValueError):
    """The bytes are not a pcap stream this module reads."""


def capture_socket(run_dir: Path, bridge: str) -> Path:
    """Where Dom0 streams a bridge's traffic as pcap."""
    return Path(run_dir) / "net" / f"{bridge}.pcap.sock"


def file_header(snaplen: int = SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return _FILE.pack(
        _FILE.record(
            magic_number=PCAP_MAGIC,
            version_major=2,
            version_minor=4,
            snaplen=snaplen,
            network=linktype,
        )
    )


def record(frame: bytes, timestamp: float | None = None) -> bytes:
    """One frame as a pcap record (cut at SNAPLEN), stamped now unless told."""
    stamp = time.time() if timestamp is None else timestamp
    seconds = int(stamp)
    kept = frame[:SNAPLEN]
    return _pack_record(seconds, int((stamp - seconds) * 1e6), len(kept), len(frame)) + kept


class PcapReader:
    """Cuts a pcap byte stream into whole records as its bytes arrive (no I/O)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.header: bytes | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """The records (record header and frame, raw) that `data` completes."""
        buffer = self._buffer
        buffer += data
        if self.header is None:
            if len(buffer) < _FILE.size:
                return []
            magic = _FILE.unpack_from(buffer, 0).magic_number
            if magic != PCAP_MAGIC:
                raise PcapError(f"magic {magic:#x} is not pcap's {PCAP_MAGIC:#x}")
            self.header = bytes(buffer[: _FILE.size])
            del buffer[: _FILE.size]
        records, offset = [], 0
        while offset + _RECORD.size <= len(buffer):
            end = offset + _RECORD.size + _RECORD.unpack_from(buffer, offset).incl_len
            if end > len(buffer):
                break
            records.append(bytes(buffer[offset:end]))
            offset = end
        del buffer[:offset]
        return records

    @staticmethod
    def parse(raw: bytes) -> tuple[float, bytes]:
        """(timestamp, frame) of one raw record."""
        rec = _RECORD.unpack_from(raw, 0)
        return rec.ts_sec + rec.ts_usec / 1e6, raw[_RECORD.size :]


def read_records(data: bytes) -> Iterator[tuple[float, bytes]]:
    """(timestamp, frame) of each whole record of a pcap file's bytes."""
    if len(data) < _FILE.size:
        raise PcapError(f"{len(data)} bytes are too few for a pcap file header")
    for raw in PcapReader().feed(data):
        yield PcapReader.parse(raw)
