"""Hypercall error numbers (errno.h).

Hypercalls fail with minus one of these. They equal Linux's x86 values, but
the ABI fixes them whatever the host's errno numbering is.
"""

from enum import IntEnum

from xenlike.abi._layout import export_enum

__all__ = ["Errno"]


class Errno(IntEnum):
    """Xen's ``enum xen_errno``, without the XEN_ prefix (EINTR and ERESTART are Xen-internal)."""

    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    EIO = 5
    ENXIO = 6
    E2BIG = 7
    ENOEXEC = 8
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    EWOULDBLOCK = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EXDEV = 18
    ENODEV = 19
    ENOTDIR = 20
    EISDIR = 21
    EINVAL = 22
    ENFILE = 23
    EMFILE = 24
    ENOSPC = 28
    EROFS = 30
    EMLINK = 31
    EDOM = 33
    ERANGE = 34
    EDEADLK = 35
    EDEADLOCK = 35
    ENAMETOOLONG = 36
    ENOLCK = 37
    ENOSYS = 38
    ENOTEMPTY = 39
    ENODATA = 61
    ETIME = 62
    EBADMSG = 74
    EOVERFLOW = 75
    EILSEQ = 84
    ENOTSOCK = 88
    EMSGSIZE = 90
    EOPNOTSUPP = 95
    EADDRINUSE = 98
    EADDRNOTAVAIL = 99
    ENOBUFS = 105
    EISCONN = 106
    ENOTCONN = 107
    ETIMEDOUT = 110
    ECONNREFUSED = 111


__all__ += export_enum(Errno, "XEN_", globals())
