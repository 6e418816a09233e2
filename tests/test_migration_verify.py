"""Xen's own verifier judges every save file the writer produces.

Debian's xen-utils-4.17 ships `verify-stream-v2` and its `xen.migration`
package; tests/cxenstored unpacks that package into a cache (scripts/test
fetches it), and these tests run the verifier from there, as Xen's tools would
be run: `verify-stream-v2 -f xl -i FILE`. They skip only when the cache cannot
be had. The vCPU context layout is checked against Xen's C headers too.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cxenstored import Unavailable, package_root
from tests.test_abi_headers import XEN_INCLUDE, CType, c_program, struct_checks
from tests.test_migration_stream import page, sample, save
from xenlike.migration import DomainImage, libxc_stream, libxl_stream, xl_format

VERIFIER = Path("usr/lib/xen-4.17/bin/verify-stream-v2")
PYTHONPATH = Path("usr/lib/xen-4.17/lib/python")


@pytest.fixture(scope="module")
def xen_utils() -> Path:
    try:
        root = package_root()
    except Unavailable as error:
        pytest.skip(f"Xen's verify-stream-v2 cannot be had here: {error}")
    assert (root / VERIFIER).exists(), f"{root} holds no {VERIFIER}"
    return root


def verify(xen_utils: Path, path: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(xen_utils / VERIFIER), "-v", "-f", fmt, "-i", str(path)],
        env={**os.environ, "PYTHONPATH": str(xen_utils / PYTHONPATH)},
        capture_output=True,
        text=True,
        timeout=120,
    )


VARIANTS: dict[str, DomainImage] = {
    "sample": sample(),
    "no-config": sample(config=None),
    "no-xenstore": sample(xenstore={}),
    "one-page-one-vcpu-no-state": DomainImage(
        max_pfn=0, pages={0: page(0)}, shared_info=bytes(4096), vcpus={0: b""}
    ),
    "ballooned-out-holes": sample(
        max_pfn=8191, pages={p: page(p) for p in range(8192) if p % 7 not in (2, 3)}
    ),
    "nothing-populated": sample(pages={}),
    "sparse-vcpus": sample(vcpus={0: b"a", 3: b"", 7: b"state" * 3000, 64: b"\0"}),
    "16-mib-all-populated": sample(max_pfn=4095, pages={p: page(p) for p in range(4096)}),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_verify_stream_v2_accepts_the_save_file(name: str, xen_utils: Path, tmp_path: Path) -> None:
    image = VARIANTS[name]
    path = tmp_path / f"{name}.sav"
    path.write_bytes(save(image))
    result = verify(xen_utils, path, "xl")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Domain Header: x86 PV from Xen 4.17" in result.stdout
    vcpu_lines = [line for line in result.stdout.splitlines() if "basic context" in line]
    assert len(vcpu_lines) == len(image.vcpus)


def test_verify_stream_v2_accepts_each_inner_stream(xen_utils: Path, tmp_path: Path) -> None:
    """Migration sends libxl's stream after xl's header; libxc's stands alone too."""
    image = sample()
    for fmt, data in (
        ("libxl", b"".join(libxl_stream.write(image))),
        ("libxc", b"".join(libxc_stream.write(image))),
    ):
        path = tmp_path / f"{fmt}.stream"
        path.write_bytes(data)
        result = verify(xen_utils, path, fmt)
        assert result.returncode == 0, f"{fmt}: {result.stdout}{result.stderr}"


def test_verify_stream_v2_can_fail(xen_utils: Path, tmp_path: Path) -> None:
    """The verifier does refuse: non-zero padding after the END-preceding record."""
    data = bytearray(save(sample()))
    data[-8 - 2] = 1  # the EMULATOR_CONTEXT record's padding
    path = tmp_path / "bad.sav"
    path.write_bytes(bytes(data))
    result = verify(xen_utils, path, "xl")
    assert result.returncode == 1
    assert "Padding containing non0 bytes found" in result.stderr


def test_numbers_agree_with_the_verifiers_package(xen_utils: Path) -> None:
    """Record types, magics and header formats, as xen.migration spells them."""
    probe = r"""
import json, struct
from xen.migration import libxc, libxl, xl
def types(module):
    return {n[len("REC_TYPE_"):].upper(): getattr(module, n)
            for n in dir(module) if n.startswith("REC_TYPE_")}
print(json.dumps({
    "libxc": types(libxc), "libxl": types(libxl),
    "ihdr": [libxc.IHDR_MARKER, libxc.IHDR_IDENT, struct.calcsize(libxc.IHDR_FORMAT)],
    "dhdr": [libxc.DHDR_TYPE_x86_pv, struct.calcsize(libxc.DHDR_FORMAT)],
    "libxl_hdr": [libxl.HDR_IDENT, libxl.HDR_VERSION, struct.calcsize(libxl.HDR_FORMAT)],
    "tsc": struct.calcsize(libxc.X86_TSC_INFO_FORMAT),
    "pv_info": struct.calcsize(libxc.X86_PV_INFO_FORMAT),
    "emulators": [libxl.EMULATOR_ID_unknown, libxl.EMULATOR_ID_qemu_trad,
                  libxl.EMULATOR_ID_qemu_upstream],
    "xl": [xl.MAGIC, xl.MANDATORY_FLAG_STREAMV2],
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(xen_utils / PYTHONPATH)},
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(out.stdout)
    # The Python package says tsc_info where the spec and xg_sr_stream_format.h say X86_TSC_INFO.
    theirs["libxc"]["X86_TSC_INFO"] = theirs["libxc"].pop("TSC_INFO")
    assert theirs["libxc"] == {t.name: int(t) for t in libxc_stream.RecType}
    assert theirs["libxl"] == {t.name: int(t) for t in libxl_stream.RecType}
    assert theirs["ihdr"] == [
        libxc_stream.IHDR_MARKER,
        libxc_stream.IHDR_ID,
        libxc_stream.xc_sr_ihdr.sizeof(),
    ]
    assert theirs["dhdr"] == [libxc_stream.DHDR_TYPE_X86_PV, libxc_stream.xc_sr_dhdr.sizeof()]
    assert theirs["libxl_hdr"] == [
        libxl_stream.RESTORE_STREAM_IDENT,
        libxl_stream.RESTORE_STREAM_VERSION,
        libxl_stream.libxl__sr_hdr.sizeof(),
    ]
    assert theirs["tsc"] == libxc_stream.xc_sr_rec_x86_tsc_info.sizeof()
    assert theirs["pv_info"] == libxc_stream.xc_sr_rec_x86_pv_info.sizeof()
    assert theirs["emulators"] == [int(e) for e in libxl_stream.EmulatorId]
    assert theirs["xl"] == [
        xl_format.savefileheader_magic.decode(),
        xl_format.XL_MANDATORY_FLAG_STREAMv2,
    ]


def test_vcpu_guest_context_matches_xens_headers(tmp_path: Path) -> None:
    """X86_PV_VCPU_BASIC's content, member by member, against arch-x86/xen.h."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (Debian: apt-get install gcc)")
    if not (XEN_INCLUDE / "arch-x86" / "xen.h").exists():
        pytest.skip(f"Xen's headers are not under {XEN_INCLUDE} (Debian: libxen-dev)")
    checks = [
        *struct_checks(
            "vcpu_guest_context",
            libxc_stream.vcpu_guest_context_x86_64,
            CType("struct vcpu_guest_context"),
        ),
        *struct_checks("cpu_user_regs", libxc_stream.cpu_user_regs, CType("struct cpu_user_regs")),
        *struct_checks("trap_info", libxc_stream.trap_info, CType("struct trap_info")),
    ]
    source = tmp_path / "vcpu.c"
    source.write_text(c_program(checks))
    exe = tmp_path / "vcpu"
    build = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-o", str(exe), str(source)], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    printed = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    mismatches = [
        f"{c.label}: C {printed[str(i)]}, Python {c.expected}"
        for i, c in enumerate(checks)
        if printed[str(i)] != str(c.expected)
    ]
    assert not mismatches, "\n".join(mismatches)
    assert len(checks) > 100
