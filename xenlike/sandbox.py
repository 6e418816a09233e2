"""The walls around every DomU process, built by the kernel, not promised by the library.

A guest is hostile code running in its own process, so its containment is
what Linux enforces on that process. The hypervisor puts each DomU in it
between fork and exec (`SandboxPolicy.enter`, run as the child's setup), so
not one line of the domain's own Python runs outside it:

- no-new-privs, so nothing it executes gains a privilege;
- every capability dropped, the bounding set too (a root domain stays
  uid 0 but holds no CAP_*, so file permissions bind it as any owner);
- Landlock: read and execute the Python installation, what import can load
  from sys.path and the few system files the interpreter needs, write
  nothing but /dev/null;
  the run directory (hypervisor.sock, xenstored's socket, the images, the
  logs) is carved out even when an import path contains it; no TCP bind or
  connect; abstract Unix sockets and signals scoped to the domain itself.
  Landlock also denies ptrace and /proc/<pid>/fd of any process outside it;
- a seccomp filter for what Landlock does not cover: no new sockets (a
  socketpair stays: trio needs one), no connect/bind/listen/accept (the
  run directory's sockets are pathname sockets, which Landlock lets
  through), no ptrace or process_vm_*, no new processes or namespaces, no
  signals, rlimits or priorities for any process but itself, no chmod,
  chown or xattrs (Landlock leaves metadata alone), no io_uring (it would
  bypass the filter), no System V IPC or POSIX message queues, no mount,
  bpf, perf, keyrings, modules, kexec;
- core dumps off, and an environment without the run directory in it.

What the kernel lacks is skipped, never fatal; `Protections` records what
is in force, read back from /proc/<pid>/status where the kernel reports it.
Dom0 is privileged, as in Xen (it owns the hardware), and runs unsandboxed.
Nothing here switches uid: the interpreter may live where only root reads
(as on the machine this was built on, under /root, mode 0700).

Raw syscalls through ctypes, on purpose: the Python bindings on PyPI
(`landlock`, a dev release; `pyseccomp`, unmaintained since 2021 and tied
to libseccomp) cover neither Landlock's network and scope rights nor both
architectures with a filter this small.
"""

import ctypes
import errno
import os
import platform
import re
import resource
import stat
import struct
import sys
from collections.abc import Iterable
from importlib.machinery import all_suffixes
from importlib.util import find_spec
from pathlib import Path

import attrs

__all__ = [
    "Protections",
    "SandboxPolicy",
    "domain_environment",
    "domain_protections",
    "logged_protections",
    "set_not_dumpable",
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def domain_environment(environ: dict[str, str]) -> dict[str, str]:
    """What a sandboxed domain inherits of `environ`: Python's and the locale's settings.

    Not the run directory, and an empty PATH: with no compiler on it,
    ctypes' find_library (which trio calls as it is imported) skips the
    temporary file it cannot write here and finds nothing, instead of failing.
    """
    kept = {
        key: value
        for key, value in environ.items()
        if key.startswith(("PYTHON", "LC_")) or key in ("LANG", "LANGUAGE", "TZ")
    }
    return {**kept, "PATH": ""}


def set_not_dumpable() -> None:
    """PR_SET_DUMPABLE 0: /proc/<pid>/fd, environ, mem and ptrace of this process
    become root's with CAP_SYS_PTRACE alone, which no sandboxed domain holds."""
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


# --- Landlock (include/uapi/linux/landlock.h) -----------------------------------------

SYS_landlock_create_ruleset = 444  # the same on x86_64 and aarch64
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute .. make_sym
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

READ_TREE = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
SYSTEM_FILES = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/dev/urandom",
)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when it has none (or it is disabled)."""
    version = _libc.syscall(
        SYS_landlock_create_ruleset,
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


def _ruleset_attr(abi: int) -> bytes:
    """landlock_ruleset_attr, as long as this ABI knows it: every right it has is handled."""
    fs = (
        FS_ABI1
        | (FS_REFER if abi >= 2 else 0)
        | (FS_TRUNCATE if abi >= 3 else 0)
        | (FS_IOCTL_DEV if abi >= 5 else 0)
    )
    if abi < 4:
        return struct.pack("<Q", fs)
    net = NET_BIND_TCP | NET_CONNECT_TCP  # no rule follows: no TCP port at all
    if abi < 6:
        return struct.pack("<QQ", fs, net)
    return struct.pack("<QQQ", fs, net, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)


def _landlock(abi: int, rules: Iterable[tuple[str, int]]) -> None:
    """Create, fill and enforce one ruleset on the calling process."""
    data = _ruleset_attr(abi)
    attr = ctypes.create_string_buffer(data, len(data))
    ruleset = _check(
        _libc.syscall(
            SYS_landlock_create_ruleset, attr, ctypes.c_size_t(len(data)), ctypes.c_uint32(0)
        ),
        "landlock_create_ruleset",
    )
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # gone since the policy was worked out: nothing to allow
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE
                rule = ctypes.create_string_buffer(struct.pack("<Qi", access, fd))
                _check(
                    _libc.syscall(
                        SYS_landlock_add_rule,
                        ruleset,
                        ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                        rule,
                        ctypes.c_uint32(0),
                    ),
                    f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        _check(
            _libc.syscall(SYS_landlock_restrict_self, ruleset, ctypes.c_uint32(0)),
            "landlock_restrict_self",
        )
    finally:
        os.close(ruleset)


Rule = tuple[str, int]  # a path and the Landlock rights granted beneath it


def _beneath(path: str, excluded: tuple[str, ...]) -> list[Rule]:
    """Read rules for `path` that reach nothing in `excluded`.

    A rule grants a whole hierarchy, so a directory that contains an
    excluded one is only listed (import finds modules by listing), and its
    children get rules of their own, down to the excluded one. Children are
    taken as they are now: a file created there later is not granted, which
    is what a sandbox wants.
    """
    real = os.path.realpath(path)
    if any(real == ex or real.startswith(ex + "/") for ex in excluded):
        return []
    inside = tuple(ex for ex in excluded if ex.startswith(real.rstrip("/") + "/"))
    if not inside:
        return [(real, READ_TREE)] if os.path.exists(real) else []
    try:
        children = list(os.scandir(real))
    except OSError:
        return []
    rules = [(real, FS_READ_DIR)]
    for child in children:
        rules.extend(_beneath(child.path, inside))
    return rules


def _importable(entry: str, excluded: tuple[str, ...]) -> list[Rule]:
    """Read rules for what import can load from the sys.path entry `entry`: its
    packages (every directory: any may be a namespace package) and modules
    (files with an import suffix), not the other files beside them, such as a
    topology's disk images in the directory `xenlike up` ran from. The entry
    itself is listed only, which lets its file names be seen."""
    if not os.path.isdir(entry):
        return _beneath(entry, excluded)  # a zip file, or nothing
    suffixes = tuple(all_suffixes())
    try:
        children = list(os.scandir(entry))
    except OSError:
        return []
    rules = [(entry, FS_READ_DIR)]
    for child in children:
        if child.is_dir() or child.name.endswith(suffixes):
            rules.extend(_beneath(child.path, excluded))
    return rules


# --- capabilities ------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _status(pid: int | str = "self") -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _drop_capabilities(last: int) -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets
    (capabilities 0 to `last`, the kernel's cap_last_cap)."""
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


# --- seccomp -----------------------------------------------------------------------------

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = 0x7E020080  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME

# Denied outright (EPERM). Names are the kernel's; each table is the arch's numbers.
DENIED = (
    "socket",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "process_mrelease",
    "kcmp",
    "get_robust_list",
    "pidfd_open",
    "pidfd_getfd",
    "pidfd_send_signal",
    "tkill",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "swapon",
    "swapoff",
    "quotactl",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "lookup_dcookie",
    "vhangup",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "acct",
    "syslog",
    "init_module",
    "finit_module",
    "delete_module",
    "keyctl",
    "add_key",
    "request_key",
    "setpriority",
    "ioprio_set",
    "sched_setaffinity",
    "sched_setscheduler",
    "sched_setparam",
    "sched_setattr",
    "migrate_pages",
    "move_pages",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "setxattrat",
    "removexattrat",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "fork",
    "vfork",
    "uselib",
    "iopl",
    "ioperm",
    "modify_ldt",
    # System V IPC and POSIX message queues: namespaces of their own, which
    # Landlock does not cover and where uid 0 owns what other root processes made.
    "shmget",
    "shmat",
    "shmctl",
    "shmdt",
    "semget",
    "semop",
    "semctl",
    "semtimedop",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "mq_open",
    "mq_unlink",
    "mq_timedsend",
    "mq_timedreceive",
    "mq_notify",
    "mq_getsetattr",
)
OWN_PID_ONLY = ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")  # first argument
# Allowed first, so that the data path's calls (eventfd and socket reads and
# writes, epoll, futex) skip the whole list.
HOT = (
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "epoll_wait",
    "epoll_pwait",
    "ppoll",
    "poll",
    "futex",
    "close",
    "mmap",
    "munmap",
    "getpid",
)

SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "read": 0,
        "write": 1,
        "close": 3,
        "poll": 7,
        "mmap": 9,
        "munmap": 11,
        "pread64": 17,
        "pwrite64": 18,
        "readv": 19,
        "writev": 20,
        "getpid": 39,
        "sendto": 44,
        "recvfrom": 45,
        "sendmsg": 46,
        "recvmsg": 47,
        "futex": 202,
        "epoll_wait": 232,
        "ppoll": 271,
        "epoll_pwait": 281,
        "preadv": 295,
        "pwritev": 296,
        "shmget": 29,
        "shmat": 30,
        "shmctl": 31,
        "semget": 64,
        "semop": 65,
        "semctl": 66,
        "shmdt": 67,
        "msgget": 68,
        "msgsnd": 69,
        "msgrcv": 70,
        "msgctl": 71,
        "semtimedop": 220,
        "mq_open": 240,
        "mq_unlink": 241,
        "mq_timedsend": 242,
        "mq_timedreceive": 243,
        "mq_notify": 244,
        "mq_getsetattr": 245,
        "socket": 41,
        "connect": 42,
        "accept": 43,
        "bind": 49,
        "listen": 50,
        "accept4": 288,
        "clone": 56,
        "fork": 57,
        "vfork": 58,
        "kill": 62,
        "chmod": 90,
        "fchmod": 91,
        "chown": 92,
        "fchown": 93,
        "lchown": 94,
        "ptrace": 101,
        "syslog": 103,
        "rt_sigqueueinfo": 129,
        "utime": 132,
        "uselib": 134,
        "setpriority": 141,
        "sched_setparam": 142,
        "sched_setscheduler": 144,
        "vhangup": 153,
        "modify_ldt": 154,
        "pivot_root": 155,
        "chroot": 161,
        "acct": 163,
        "mount": 165,
        "umount2": 166,
        "swapon": 167,
        "swapoff": 168,
        "reboot": 169,
        "iopl": 172,
        "ioperm": 173,
        "init_module": 175,
        "delete_module": 176,
        "quotactl": 179,
        "setxattr": 188,
        "lsetxattr": 189,
        "fsetxattr": 190,
        "removexattr": 197,
        "lremovexattr": 198,
        "fremovexattr": 199,
        "tkill": 200,
        "sched_setaffinity": 203,
        "lookup_dcookie": 212,
        "tgkill": 234,
        "utimes": 235,
        "migrate_pages": 256,
        "kexec_load": 246,
        "add_key": 248,
        "request_key": 249,
        "keyctl": 250,
        "ioprio_set": 251,
        "fchownat": 260,
        "futimesat": 261,
        "fchmodat": 268,
        "unshare": 272,
        "get_robust_list": 274,
        "move_pages": 279,
        "utimensat": 280,
        "rt_tgsigqueueinfo": 297,
        "perf_event_open": 298,
        "fanotify_init": 300,
        "prlimit64": 302,
        "name_to_handle_at": 303,
        "open_by_handle_at": 304,
        "setns": 308,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "kcmp": 312,
        "finit_module": 313,
        "sched_setattr": 314,
        "kexec_file_load": 320,
        "bpf": 321,
        "userfaultfd": 323,
        "pidfd_send_signal": 424,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "pidfd_open": 434,
        "clone3": 435,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "mount_setattr": 442,
        "process_mrelease": 448,
        "fchmodat2": 452,
        "setxattrat": 463,
        "removexattrat": 466,
    },
    "aarch64": {  # asm-generic/unistd.h
        "epoll_pwait": 22,
        "close": 57,
        "read": 63,
        "write": 64,
        "readv": 65,
        "writev": 66,
        "pread64": 67,
        "pwrite64": 68,
        "preadv": 69,
        "pwritev": 70,
        "ppoll": 73,
        "futex": 98,
        "getpid": 172,
        "sendto": 206,
        "recvfrom": 207,
        "sendmsg": 211,
        "recvmsg": 212,
        "munmap": 215,
        "mmap": 222,
        "setxattr": 5,
        "lsetxattr": 6,
        "fsetxattr": 7,
        "removexattr": 14,
        "lremovexattr": 15,
        "fremovexattr": 16,
        "lookup_dcookie": 18,
        "ioprio_set": 30,
        "umount2": 39,
        "mount": 40,
        "pivot_root": 41,
        "chroot": 51,
        "fchmod": 52,
        "fchmodat": 53,
        "fchownat": 54,
        "fchown": 55,
        "vhangup": 58,
        "quotactl": 60,
        "utimensat": 88,
        "acct": 89,
        "unshare": 97,
        "get_robust_list": 100,
        "kexec_load": 104,
        "init_module": 105,
        "delete_module": 106,
        "syslog": 116,
        "ptrace": 117,
        "sched_setparam": 118,
        "sched_setscheduler": 119,
        "sched_setaffinity": 122,
        "kill": 129,
        "tkill": 130,
        "tgkill": 131,
        "rt_sigqueueinfo": 138,
        "setpriority": 140,
        "reboot": 142,
        "mq_open": 180,
        "mq_unlink": 181,
        "mq_timedsend": 182,
        "mq_timedreceive": 183,
        "mq_notify": 184,
        "mq_getsetattr": 185,
        "msgget": 186,
        "msgctl": 187,
        "msgrcv": 188,
        "msgsnd": 189,
        "semget": 190,
        "semctl": 191,
        "semtimedop": 192,
        "semop": 193,
        "shmget": 194,
        "shmctl": 195,
        "shmat": 196,
        "shmdt": 197,
        "socket": 198,
        "bind": 200,
        "listen": 201,
        "accept": 202,
        "connect": 203,
        "add_key": 217,
        "request_key": 218,
        "keyctl": 219,
        "clone": 220,
        "swapon": 224,
        "swapoff": 225,
        "migrate_pages": 238,
        "move_pages": 239,
        "rt_tgsigqueueinfo": 240,
        "perf_event_open": 241,
        "accept4": 242,
        "prlimit64": 261,
        "fanotify_init": 262,
        "name_to_handle_at": 264,
        "open_by_handle_at": 265,
        "setns": 268,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "kcmp": 272,
        "finit_module": 273,
        "sched_setattr": 274,
        "bpf": 280,
        "userfaultfd": 282,
        "kexec_file_load": 294,
        "pidfd_send_signal": 424,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "pidfd_open": 434,
        "clone3": 435,
        "pidfd_getfd": 438,
        "process_madvise": 440,
        "mount_setattr": 442,
        "process_mrelease": 448,
        "fchmodat2": 452,
        "setxattrat": 463,
        "removexattrat": 466,
    },
}

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (little endian: arg0's low word)


def seccomp_filter(machine: str, pid: int) -> bytes:
    """The BPF program, as struct sock_filter entries, for `machine` and a domain `pid`.

    A string in the listing is a label; jumps name labels, resolved in one
    pass (BPF jumps only forward).
    """
    numbers = SYSCALLS[machine]
    code: list[str | tuple[int, int | str, int | str, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ, 0, "deny", AUDIT_ARCH[machine]),  # another ABI's numbers mean other calls
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if machine == "x86_64":
        code.append((_JGE, "deny", 0, X32_SYSCALL_BIT))
    code += [(_JEQ, "allow", 0, numbers[name]) for name in HOT if name in numbers]
    code += [(_JEQ, "deny", 0, numbers[name]) for name in DENIED if name in numbers]
    code += [
        (_JEQ, "enosys", 0, numbers["clone3"]),  # its flags sit in memory: libc falls back to clone
        (_JEQ, 0, "not-clone", numbers["clone"]),
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JSET, "deny", 0, CLONE_NAMESPACES),
        (_JSET, "allow", "deny", CLONE_THREAD),  # threads, never a new process
        "not-clone",
    ]
    for name in OWN_PID_ONLY:
        code += [
            (_JEQ, 0, f"not-{name}", numbers[name]),
            (_LD_W_ABS, 0, 0, _ARG0),
            (_JEQ, "allow", "deny", pid),
            f"not-{name}",
        ]
    code += [
        (_JEQ, 0, "allow", numbers["prlimit64"]),
        (_LD_W_ABS, 0, 0, _ARG0),
        (_JEQ, "allow", 0, 0),  # pid 0 is the caller itself
        (_JEQ, "allow", "deny", pid),
        "allow",
        (_RET, 0, 0, SECCOMP_RET_ALLOW),
        "deny",
        (_RET, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM),
        "enosys",
        (_RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
    ]
    labels: dict[str, int] = {}
    instructions: list[tuple[int, int | str, int | str, int]] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(instructions)
        else:
            instructions.append(item)

    def offset(target: int | str, at: int) -> int:
        if isinstance(target, int):
            return target
        distance = labels[target] - at - 1
        if not 0 <= distance < 256:
            raise ValueError(f"seccomp jump to {target} out of reach")
        return distance

    return b"".join(
        struct.pack("<HBBI", op, offset(jt, at), offset(jf, at), k)
        for at, (op, jt, jf, k) in enumerate(instructions)
    )


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp(machine: str) -> None:
    program = seccomp_filter(machine, os.getpid())
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0),
        "installing the seccomp filter",
    )


# --- the policy ----------------------------------------------------------------------------


@attrs.frozen
class Protections:
    """What confines one domain's process, as `xenlike dmesg` (and `info`) reports it."""

    privileged: bool = False
    no_new_privs: bool = False
    capabilities_dropped: bool = False
    landlock_abi: int = 0
    seccomp: bool = False

    def names(self) -> list[str]:
        if self.privileged:
            return ["privileged (not sandboxed)"]
        names = ["no-new-privs"] if self.no_new_privs else []
        names += ["capabilities dropped"] if self.capabilities_dropped else []
        names += [f"landlock ABI {self.landlock_abi}"] if self.landlock_abi else []
        names += ["seccomp"] if self.seccomp else []
        return names

    def __str__(self) -> str:
        return ", ".join(self.names()) or NO_PROTECTION

    @classmethod
    def parse(cls, text: str) -> "Protections":
        """The record back from its `str`, as the hypervisor log carries it."""
        names = set(text.split(", "))
        abi = re.search(r"landlock ABI (\d+)", text)
        return cls(
            privileged="privileged (not sandboxed)" in names,
            no_new_privs="no-new-privs" in names,
            capabilities_dropped="capabilities dropped" in names,
            landlock_abi=int(abi[1]) if abi else 0,
            seccomp="seccomp" in names,
        )


NO_PROTECTION = "none: the kernel offers no sandbox here"


def logged_protections(log: str) -> dict[int, Protections]:
    """What confines each domain, from the hypervisor log's `(dN) sandbox: ...`
    lines (`xenlike dmesg`); the newest line of a domain id wins."""
    return {
        int(domid): Protections.parse(text)
        for domid, text in re.findall(r"\(d(\d+)\) sandbox: (.+)$", log, re.MULTILINE)
    }


def domain_protections(pid: int, landlock: int) -> Protections | None:
    """What /proc/<pid>/status says is in force, plus the Landlock ABI entered
    (the kernel reports no Landlock state there); None once the process is gone."""
    status = _status(pid)
    if not status:
        return None
    return Protections(
        no_new_privs=status.get("NoNewPrivs") == "1",
        capabilities_dropped=all(
            int(status.get(key, "1"), 16) == 0
            for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
        ),
        landlock_abi=landlock,
        seccomp=status.get("Seccomp") == "2",
    )


@attrs.frozen
class SandboxPolicy:
    """What this host can enforce and what a DomU may read, worked out once."""

    landlock_abi: int
    seccomp_machine: str | None  # None: no seccomp filter on this kernel or architecture
    last_capability: int  # 0: nothing to drop (no CAP_SETPCAP to drop the bounding set with)
    readable: tuple[Rule, ...]  # what it may read (and execute); it writes nothing
    writable: tuple[str, ...] = ("/dev/null",)

    @classmethod
    def for_run_dir(cls, run_dir: Path) -> "SandboxPolicy":
        """The policy for the domains of the topology served from `run_dir`."""
        excluded = (os.path.realpath(run_dir),)
        roots = {
            sys.prefix,
            sys.base_prefix,
            sys.exec_prefix,
            sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)),
            *SYSTEM_FILES,
        }
        for package in ("xenlike", "domains", "drivers"):  # editable installs map them
            spec = find_spec(package)
            roots.update(spec.submodule_search_locations or () if spec else ())
        readable = {rule for root in roots for rule in _beneath(root, excluded)}
        trees = [path for path, access in readable if access == READ_TREE]
        for entry in sys.path:
            real = os.path.realpath(entry or os.curdir)
            if not any(real == tree or real.startswith(tree + "/") for tree in trees):
                readable.update(_importable(real, excluded))
        status = _status()
        machine = platform.machine()
        seccomp = "Seccomp_filters" in status and machine in SYSCALLS
        last_capability = 0
        if int(status.get("CapEff", "0"), 16) >> 8 & 1:  # CAP_SETPCAP drops the bounding set
            last_capability = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
        return cls(
            landlock_abi(), machine if seccomp else None, last_capability, tuple(sorted(readable))
        )

    def expected(self) -> Protections:
        """What `enter` puts in force on this host."""
        return Protections(
            no_new_privs=True,
            capabilities_dropped=self.last_capability > 0,
            landlock_abi=self.landlock_abi,
            seccomp=self.seccomp_machine is not None,
        )

    def enter(self) -> None:
        """Confine the calling process for good; run in the domain's child before exec.

        Anything the policy expects and the kernel then refuses raises: a
        domain never starts less confined than the log says.
        """
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no-new-privs")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.landlock_abi:
            own = f"/proc/{os.getpid()}"  # its own /proc, which the interpreter reads
            _landlock(
                self.landlock_abi,
                [*self.readable]
                + [(path, FS_READ_FILE | FS_WRITE_FILE) for path in self.writable]
                + [(own, FS_READ_FILE | FS_READ_DIR)],
            )
        if self.last_capability:
            _drop_capabilities(self.last_capability)
        if self.seccomp_machine is not None:
            _seccomp(self.seccomp_machine)
