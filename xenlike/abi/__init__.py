"""Xen's ABI: byte layouts and constants from Xen's public headers.

One module per header (``ring`` for io/ring.h, ``blkif`` for io/blkif.h,
``grant_table`` for grant_table.h, ...), imported as
``from xenlike.abi import blkif``. Struct, field and constant names are Xen's
own, so a Xen developer can read them at sight, and the numbers are those of
interface version 0x00040e00 on x86-64 (little endian).

Layouts are construct Structs with C's alignment padding written out, so
``sizeof()`` equals C's ``sizeof``; `xenlike.codec` derives fast `struct`
codecs from them. The real headers are the authority:
tests/test_abi_headers.py compiles a C program against them and checks every
size, offset and constant defined here.
"""
