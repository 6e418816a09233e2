"""xenlike's xenstored against the real C xenstored 4.17: the same requests, the same replies.

Both daemons run as processes on Unix sockets (tests/cxenstored starts the
real one under an LD_PRELOAD shim). Each script is replayed on fresh
connections to each, and every reply and watch event must be equal. Socket
clients are domain 0 in both, so guest-only rules (quotas) are checked by
tests/test_xenstore_rules.py against xenstored's source instead.

Guests too: cxenstored's guest is played on its ring page (a file the shim
maps), xenlike's on its `Store` in this process; the scripts of
`GUEST_SCRIPTS` reach the rules only guests meet (permissions, quotas).

The differences docs/xenstore.md lists as deliberate are the only ones
skipped: `DELIBERATE` holds them, and a test keeps the two lists equal.
"""

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.cxenstored import Unavailable, running
from tests.cxenstored.exchange import Daemon, Step, StoreDaemon, replay
from xenlike.abi.xs_wire import (
    XS_CONTROL,
    XS_DIRECTORY,
    XS_DIRECTORY_PART,
    XS_GET_DOMAIN_PATH,
    XS_GET_PERMS,
    XS_INTRODUCE,
    XS_IS_DOMAIN_INTRODUCED,
    XS_MKDIR,
    XS_READ,
    XS_RELEASE,
    XS_RESET_WATCHES,
    XS_RESUME,
    XS_RM,
    XS_SET_PERMS,
    XS_SET_TARGET,
    XS_TRANSACTION_END,
    XS_TRANSACTION_START,
    XS_UNWATCH,
    XS_WATCH,
    XS_WRITE,
)
from xenlike.xenstore.store import Quotas

DOCS = Path(__file__).resolve().parent.parent / "docs" / "xenstore.md"

SPECIAL = (b"@introduceDomain\0", b"@releaseDomain\0")

# Deliberate differences, by their name in docs/xenstore.md: which steps they cover
# (given the domid each connection speaks for).
DELIBERATE = {
    "control": lambda step, domids: step.type == XS_CONTROL,
    "onearg-malformed": lambda step, domids: (
        step.type in (XS_READ, XS_DIRECTORY, XS_GET_PERMS, XS_MKDIR, XS_RM)
        and (not step.payload or step.payload.find(b"\0") != len(step.payload) - 1)
    ),
    "set-perms-special-refused": lambda step, domids: (
        step.type == XS_SET_PERMS
        and step.payload.startswith(b"@")
        and (domids[step.conn] != 0 or not step.payload.startswith(SPECIAL))
    ),
}


def deliberate(steps: list[Step], domids: tuple[int, ...] = (0, 0, 0)) -> bool:
    return any(rule(step, domids) for step in steps for rule in DELIBERATE.values())


def test_the_deliberate_differences_are_those_the_docs_list():
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", DOCS.read_text(), re.MULTILINE))
    assert listed == set(DELIBERATE)


@pytest.fixture(scope="module")
def daemons() -> Iterator[tuple[Daemon, Daemon]]:
    try:
        peer = running()
        cxenstored = peer.__enter__()
    except Unavailable as error:
        pytest.skip(f"the real C xenstored cannot run here: {error}")
    with tempfile.TemporaryDirectory(prefix="xl") as tmp:
        path = os.path.join(tmp, "xs.sock")
        ours = subprocess.Popen(
            [sys.executable, "-m", "xenlike.xenstore", "--socket", path],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert ours.stdout is not None and "listening" in ours.stdout.readline()
            yield Daemon(path), Daemon(cxenstored.socket_path)
            assert cxenstored.alive(), "cxenstored died"
        finally:
            ours.terminate()
            ours.wait()
            peer.__exit__(None, None, None)


def compare(daemons: tuple[Daemon, Daemon], steps: list[Step]) -> None:
    ours, theirs = (replay(daemon, steps) for daemon in daemons)
    for step, mine, real in zip(steps, ours, theirs, strict=True):
        assert mine == real, f"{step}\n  xenlike:    {mine}\n  cxenstored: {real}"


def z(*args: bytes) -> bytes:
    return b"".join(arg + b"\0" for arg in args)


# -- hand-picked scripts ----------------------------------------------------------------

SCRIPTS = {
    "bad input": [
        Step(0, XS_READ, z(b"/a//b")),
        Step(0, XS_READ, z(b"/a b")),
        Step(0, XS_READ, z(b"/x/")),
        Step(0, 999, b""),
        Step(0, XS_WRITE, b"/nonul"),
        Step(0, XS_READ, z(b"foo")),
        Step(0, XS_READ, z(b"/"), tx=-1),
        Step(0, XS_WATCH, z(b"/x")),
        Step(0, XS_READ, z(b"/" + b"a" * 2047)),
        Step(0, XS_READ, z(b"/" + b"a" * 2048)),
        Step(0, XS_READ, z(b"/" + b"a" * 2049)),
        Step(0, XS_READ, z(b"/local/domain/0/" + b"a" * 2048)),
        Step(0, XS_READ, z(b"/local/domain/0/" + b"a" * 2049)),
        Step(0, XS_WATCH, z(b"/a", b"t", b"extra")),
        Step(0, XS_TRANSACTION_END, b"T"),
        Step(0, XS_GET_DOMAIN_PATH, z(b"x")),
        Step(0, XS_GET_DOMAIN_PATH, z(b"70000")),
        Step(0, XS_IS_DOMAIN_INTRODUCED, z(b"-1")),
        Step(0, XS_RESUME, z(b"0")),
        Step(0, XS_SET_TARGET, z(b"1")),
        Step(0, XS_WRITE, b"/v\0\xff\x00\x01"),
        Step(0, XS_READ, z(b"/v")),
        Step(0, XS_READ, z(b"/\xc3\xa9")),
        # atoi(): a long's range, then an unsigned int.
        *(
            Step(0, XS_GET_DOMAIN_PATH, z(number))
            for number in (
                b"99999999999999999999999",
                b"-99999999999999999999",
                b"4294967296",
                b"2147483648",
                b"-2147483649",
                b"+7",
                b"  -3x",
            )
        ),
        *(
            Step(0, XS_DIRECTORY_PART, z(b"/tool", number))
            for number in (b"99999999999999999999999", b"-99999999999999999999", b"4294967295")
        ),
    ],
    "tree": [
        Step(0, XS_WRITE, b"/a/b/c\0v"),
        Step(0, XS_DIRECTORY, z(b"/a")),
        Step(0, XS_GET_PERMS, z(b"/a/b")),
        Step(0, XS_MKDIR, z(b"/a")),
        Step(0, XS_READ, z(b"/a")),
        Step(0, XS_RM, z(b"/a/x")),
        Step(0, XS_RM, z(b"/q/x")),
        Step(0, XS_RM, z(b"/")),
        Step(0, XS_RM, z(b"/a")),
        Step(0, XS_READ, z(b"/a/b/c")),
        Step(0, XS_MKDIR, z(b"rel/d")),
        Step(0, XS_DIRECTORY, z(b"/local/domain/0/rel")),
        Step(0, XS_DIRECTORY_PART, z(b"/tool", b"0")),
        Step(0, XS_DIRECTORY_PART, z(b"/tool", b"99")),
        Step(0, XS_DIRECTORY_PART, z(b"/tool", b"x")),
        Step(0, XS_DIRECTORY_PART, z(b"/tool", b"3")),
        Step(0, XS_DIRECTORY_PART, z(b"/tool", b"-1")),
        Step(0, XS_DIRECTORY_PART, z(b"/tool")),
    ],
    "permissions": [
        Step(0, XS_WRITE, b"/p\0"),
        Step(0, XS_SET_PERMS, z(b"/p", b"n5", b"r7", b"b3")),
        Step(0, XS_GET_PERMS, z(b"/p")),
        Step(0, XS_SET_PERMS, z(b"/p", b"x5")),
        Step(0, XS_SET_PERMS, z(b"/p")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n32752")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n99999")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n0", b"r-1")),
        Step(0, XS_GET_PERMS, z(b"/p")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n0x10", b"r 010")),
        Step(0, XS_GET_PERMS, z(b"/p")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n08")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n")),
        Step(0, XS_SET_PERMS, z(b"/nope", b"n1")),
        Step(0, XS_GET_PERMS, z(b"@introduceDomain")),
        Step(0, XS_GET_PERMS, z(b"@other")),
        Step(0, XS_READ, z(b"@introduceDomain")),
        Step(0, XS_SET_PERMS, z(b"/p", b"n1", b"r2", b"r3", b"r4", b"r5", b"r6", b"r7")),
        Step(0, XS_GET_PERMS, z(b"/p")),
        Step(0, XS_WRITE, b"/p/child\0"),
        Step(0, XS_GET_PERMS, z(b"/p/child")),
    ],
    "watches": [
        Step(0, XS_WATCH, z(b"/w", b"t")),
        Step(1, XS_WRITE, b"/w/x\0a"),
        Step(0, XS_WATCH, z(b"w", b"r")),
        Step(1, XS_WRITE, b"/local/domain/0/w/y\0"),
        Step(1, XS_RM, z(b"/w")),
        Step(0, XS_WATCH, z(b"/w", b"t")),
        Step(0, XS_WATCH, z(b"@any thing", b"t")),
        Step(0, XS_UNWATCH, z(b"@any thing", b"t")),
        Step(0, XS_UNWATCH, z(b"/bad path", b"t")),
        Step(0, XS_UNWATCH, z(b"/w")),
        Step(2, XS_WATCH, z(b"/", b"x" * 3000)),
        Step(1, XS_WRITE, b"/w/" + b"y" * 1200 + b"\0"),
        Step(1, XS_WRITE, b"/w/z\0"),
        Step(2, XS_WATCH, z(b"/w", b"t" * 4092)),
        Step(0, XS_WATCH, z(b"@introduceDomain", b"i")),
        Step(2, XS_WATCH, z(b"@releaseDomain", b"r")),
        Step(0, XS_INTRODUCE, z(b"5", b"1", b"9")),
        Step(0, XS_INTRODUCE, z(b"5", b"1", b"9")),
        Step(0, XS_GET_DOMAIN_PATH, z(b"5")),
        Step(0, XS_IS_DOMAIN_INTRODUCED, z(b"5")),
        Step(0, XS_SET_TARGET, z(b"5", b"0")),
        Step(0, XS_RESUME, z(b"5")),
        Step(0, XS_RELEASE, z(b"5")),
        Step(0, XS_RELEASE, z(b"5")),
        Step(0, XS_RELEASE, z(b"0")),
        Step(0, XS_INTRODUCE, z(b"6", b"1", b"0")),
        Step(0, XS_RESET_WATCHES, b""),
        Step(1, XS_WRITE, b"/w\0"),
        Step(0, XS_WATCH, z(b"/w", b"t")),
        Step(0, XS_WATCH, z(b"/w", b"t")),
    ],
    "transactions": [
        Step(0, XS_WRITE, b"/a/b\0" + b"1"),
        Step(0, XS_TRANSACTION_START, b"\0"),
        Step(0, XS_READ, z(b"/a/b"), tx=0),
        Step(1, XS_RM, z(b"/a")),
        Step(0, XS_RM, z(b"/a/b"), tx=0),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(0, XS_TRANSACTION_START, b"\0"),
        Step(0, XS_TRANSACTION_START, b"\0", tx=1),
        Step(0, XS_WRITE, b"/t/x\0v", tx=1),
        Step(1, XS_WATCH, z(b"/t", b"k")),
        Step(0, XS_READ, z(b"/t/x"), tx=1),
        Step(1, XS_READ, z(b"/t/x")),
        Step(0, XS_WATCH, z(b"/u", b"k"), tx=1),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=1),
        Step(0, XS_TRANSACTION_END, z(b"F"), tx=1),
        Step(0, XS_TRANSACTION_END, z(b"T")),
        Step(0, XS_TRANSACTION_START, b"\0"),
        Step(0, XS_TRANSACTION_END, z(b"X"), tx=2),
        Step(0, XS_TRANSACTION_END, b"", tx=2),
        Step(0, XS_WRITE, b"/c\0", tx=2),
        Step(1, XS_WRITE, b"/c\0x"),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=2),
        Step(0, XS_TRANSACTION_START, b"\0"),
        Step(0, XS_DIRECTORY, z(b"/"), tx=3),
        Step(1, XS_WRITE, b"/new\0"),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=3),
        Step(0, XS_TRANSACTION_START, b"\0"),
        Step(0, XS_SET_PERMS, z(b"/c", b"n0", b"r1"), tx=4),
        Step(0, XS_RM, z(b"/new"), tx=4),
        Step(0, XS_MKDIR, z(b"/m/n"), tx=4),
        Step(0, XS_INTRODUCE, z(b"3", b"1", b"9"), tx=4),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=4),
        Step(0, XS_GET_PERMS, z(b"/c")),
        Step(0, XS_DIRECTORY, z(b"/")),
    ],
    "big directory": [
        *(Step(i % 3, XS_WRITE, b"/d/" + b"n" * 140 + b"%d\0" % i) for i in range(32)),
        Step(0, XS_DIRECTORY, z(b"/d")),
        Step(0, XS_DIRECTORY_PART, z(b"/d", b"0")),
        Step(0, XS_DIRECTORY_PART, z(b"/d", b"3999")),
        Step(0, XS_DIRECTORY_PART, z(b"/d", b"4000")),
        Step(0, XS_DIRECTORY_PART, z(b"/d", b"4500")),
        Step(0, XS_DIRECTORY_PART, z(b"/d", b"70")),
        Step(0, XS_WRITE, b"/big\0" + b"v" * 4090),
        Step(0, XS_READ, z(b"/big")),
        Step(0, XS_WRITE, b"/big\0" + b"v" * 4092),
        Step(0, XS_READ, z(b"/big")),
        Step(1, XS_WATCH, z(b"/d", b"w")),
        Step(0, XS_RM, z(b"/d")),
    ],
    "conflicts": [
        Step(0, XS_WRITE, b"/k\0a"),
        Step(0, XS_TRANSACTION_START, b"\0"),
        Step(1, XS_TRANSACTION_START, b"\0"),
        Step(0, XS_READ, z(b"/k"), tx=0),
        Step(1, XS_READ, z(b"/k"), tx=0),
        Step(0, XS_WRITE, b"/k\0b", tx=0),
        Step(1, XS_WRITE, b"/k\0c", tx=0),
        Step(2, XS_WATCH, z(b"/k", b"w")),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(2, XS_READ, z(b"/k")),
        Step(1, XS_TRANSACTION_START, b"\0"),
        Step(1, XS_READ, z(b"/missing"), tx=1),
        Step(0, XS_WRITE, b"/missing\0"),
        Step(1, XS_WRITE, b"/other\0", tx=1),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=1),
        Step(1, XS_TRANSACTION_START, b"\0"),
        Step(1, XS_RM, z(b"/k"), tx=2),
        Step(1, XS_DIRECTORY, z(b"/"), tx=2),
        Step(1, XS_READ, z(b"/k"), tx=2),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=2),
        Step(2, XS_READ, z(b"/k")),
        Step(2, XS_UNWATCH, z(b"/k", b"w")),
        Step(2, XS_UNWATCH, z(b"/k", b"w")),
    ],
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_hand_picked_scripts_get_the_same_replies(daemons, name):
    assert not deliberate(SCRIPTS[name])
    compare(daemons, SCRIPTS[name])


# -- generated scripts --------------------------------------------------------------------

names = st.sampled_from([b"a", b"b", b"c", b"local", b"domain", b"0", b"tool"])
good_paths = st.lists(names, min_size=0, max_size=4).map(lambda parts: b"/" + b"/".join(parts))
relative_paths = st.lists(names, min_size=1, max_size=2).map(b"/".join)
odd_paths = st.sampled_from(
    [
        b"",
        b"/a/",
        b"//a",
        b"/a b",
        b"@introduceDomain",
        b"@releaseDomain",
        b"@x",
        b"/\xff",
        b"a" * 2050,
    ]
)
paths = st.one_of(good_paths, good_paths, relative_paths, odd_paths)
perm_texts = st.lists(
    st.builds(
        lambda letter, domid: letter + domid,
        st.sampled_from([b"n", b"r", b"w", b"b", b"x"]),
        st.sampled_from([b"0", b"1", b"5", b"0x5", b"32752", b"-1", b""]),
    ),
    min_size=0,
    max_size=4,
)
tokens = st.sampled_from([b"t", b"u", b"x" * 3000])
requests = st.one_of(
    st.builds(lambda p: (XS_READ, z(p)), paths),
    st.builds(lambda p: (XS_DIRECTORY, z(p)), paths),
    st.builds(lambda p, o: (XS_DIRECTORY_PART, z(p, o)), paths, st.sampled_from([b"0", b"2"])),
    st.builds(lambda p: (XS_GET_PERMS, z(p)), paths),
    st.builds(lambda p, v: (XS_WRITE, p + b"\0" + v), paths, st.binary(max_size=12)),
    st.builds(lambda p: (XS_MKDIR, z(p)), paths),
    st.builds(lambda p: (XS_RM, z(p)), paths),
    st.builds(
        lambda p, perms: (XS_SET_PERMS, z(p, *perms)),
        st.one_of(good_paths, st.sampled_from([b"@releaseDomain", b"@x"])),
        perm_texts,
    ),
    st.builds(lambda p, t: (XS_WATCH, z(p, t)), paths, tokens),
    st.builds(lambda p, t: (XS_UNWATCH, z(p, t)), paths, tokens),
    st.just((XS_TRANSACTION_START, b"\0")),
    st.builds(lambda arg: (XS_TRANSACTION_END, arg), st.sampled_from([b"T\0", b"F\0", b"X\0"])),
    st.builds(lambda d: (XS_INTRODUCE, z(d, b"1", b"9")), st.sampled_from([b"1", b"2", b"0"])),
    st.builds(lambda d: (XS_RELEASE, z(d)), st.sampled_from([b"1", b"2", b"0", b"9"])),
    st.builds(lambda d: (XS_IS_DOMAIN_INTRODUCED, z(d)), st.sampled_from([b"1", b"2"])),
    st.just((XS_RESET_WATCHES, b"")),
    # Odd arguments and malformed payloads.
    st.builds(
        lambda t, d: (t, d),
        st.sampled_from(
            [
                XS_GET_DOMAIN_PATH,
                XS_IS_DOMAIN_INTRODUCED,
                XS_RESUME,
                XS_RELEASE,
                XS_SET_TARGET,
                XS_INTRODUCE,
            ]
        ),
        st.sampled_from(
            [
                b"",
                b"\0",
                b"1",
                b" 2\0",
                b"-1\0",
                b"0x10\0",
                b"32752\0",
                b"1\0 2\0",
                b"2\0x\0 9\0",
                b"1\0\0\0",
                b"99999999999\0",
            ]
        ),
    ),
    st.builds(
        lambda t, p, tail: (t, p + tail),
        st.sampled_from(
            [
                XS_READ,
                XS_DIRECTORY,
                XS_MKDIR,
                XS_RM,
                XS_GET_PERMS,
                XS_WATCH,
                XS_UNWATCH,
                XS_TRANSACTION_END,
                XS_DIRECTORY_PART,
            ]
        ),
        good_paths,
        st.sampled_from([b"", b"\0\0", b"\0x", b"\0x\0y\0", b"\0 12"]),
    ),
    st.builds(
        lambda p, o: (XS_DIRECTORY_PART, z(p, o)),
        good_paths,
        st.sampled_from([b"1", b"4", b"5", b" 3", b"-2", b"4294967296", b""]),
    ),
)
steps = st.builds(
    lambda conn, request, tx: Step(conn, *request, tx=tx),
    st.integers(0, 2),
    requests,
    st.sampled_from([None, None, None, 0, 1, -1]),
)


@settings(
    max_examples=int(os.environ.get("XENSTORE_DIFF_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(steps, min_size=1, max_size=25))
def test_generated_scripts_get_the_same_replies(daemons, script):
    assume(not deliberate(script))
    compare(daemons, script)


# -- guests ---------------------------------------------------------------------------------

GUESTS = (0, 5, 6)  # connection 0 is domain 0, 1 is domain 5, 2 is domain 6


def guest_peers(quotas: Quotas, args: tuple[str, ...]) -> Iterator[tuple[StoreDaemon, Daemon]]:
    with tempfile.TemporaryDirectory(prefix="cxs-rings") as ring_dir:
        try:
            peer = running(ring_dir=ring_dir, extra_args=args)
            cxenstored = peer.__enter__()
        except Unavailable as error:
            pytest.skip(f"the real C xenstored cannot run here: {error}")
        try:
            yield StoreDaemon(quotas), Daemon(cxenstored.socket_path, ring_dir)
            assert cxenstored.alive(), "cxenstored died"
        finally:
            peer.__exit__(None, None, None)


@pytest.fixture(scope="module")
def guest_daemons() -> Iterator[tuple[StoreDaemon, Daemon]]:
    yield from guest_peers(Quotas(), ())


@pytest.fixture(scope="module")
def small_quota_daemons() -> Iterator[tuple[StoreDaemon, Daemon]]:
    """Both with a node quota of 30 and a transaction-node quota of 8 (-E, -Q)."""
    yield from guest_peers(
        Quotas(nodes=30, transaction_nodes=8), ("-E", "30", "-Q", "transaction-nodes=8")
    )


def compare_guests(daemons: tuple[StoreDaemon, Daemon], steps: list[Step]) -> None:
    ours, theirs = (replay(daemon, steps, GUESTS) for daemon in daemons)
    for step, mine, real in zip(steps, ours, theirs, strict=True):
        assert mine == real, f"{step}\n  xenlike:    {mine}\n  cxenstored: {real}"


def home(domid: int) -> list[Step]:
    """What the toolstack makes: a home the guest reads, a data directory it owns."""
    path = b"/local/domain/%d" % domid
    return [
        Step(0, XS_WRITE, path + b"/data\0"),
        Step(0, XS_SET_PERMS, z(path, b"n0", b"r%d" % domid)),
        Step(0, XS_SET_PERMS, z(path + b"/data", b"n%d" % domid)),
    ]


HOMES = [*home(5), *home(6)]

GUEST_SCRIPTS = {
    "paths and permissions": [
        *HOMES,
        Step(1, XS_READ, z(b"data")),
        Step(1, XS_WRITE, b"data/x\0v"),
        Step(1, XS_WRITE, b"/local/domain/5/y\0v"),
        Step(1, XS_READ, z(b"/local/domain/6/data")),
        Step(1, XS_READ, z(b"/local/domain/6/nothing")),
        Step(1, XS_READ, z(b"/nothing")),
        Step(1, XS_DIRECTORY, z(b"/local/domain/5")),
        Step(1, XS_GET_PERMS, z(b"data/x")),
        Step(1, XS_SET_PERMS, z(b"data/x", b"n6")),
        Step(1, XS_SET_PERMS, z(b"data/x", b"n5", b"r6")),
        Step(2, XS_READ, z(b"/local/domain/5/data/x")),
        Step(2, XS_WRITE, b"/local/domain/5/data/x\0"),
        Step(1, XS_SET_PERMS, z(b"data/x", b"n5", b"b6")),
        Step(2, XS_WRITE, b"/local/domain/5/data/x\0w"),
        Step(2, XS_GET_PERMS, z(b"/local/domain/5/data/x")),
        Step(1, XS_RM, z(b"data/x")),
        Step(1, XS_RM, z(b"/local/domain/5")),
        Step(1, XS_MKDIR, z(b"data/m")),
        Step(1, XS_GET_DOMAIN_PATH, z(b"5")),
        Step(1, XS_INTRODUCE, z(b"7", b"1", b"9")),
        Step(1, XS_IS_DOMAIN_INTRODUCED, z(b"5")),
        Step(1, XS_RELEASE, z(b"6")),
        Step(1, XS_SET_TARGET, z(b"5", b"6")),
        Step(1, XS_RESUME, z(b"5")),
    ],
    "watches": [
        *HOMES,
        Step(1, XS_WATCH, z(b"data", b"rel")),
        Step(1, XS_WATCH, z(b"/local/domain/6", b"o")),
        Step(1, XS_WATCH, z(b"@releaseDomain", b"r")),
        Step(0, XS_WRITE, b"/local/domain/5/data/a\0"),
        Step(2, XS_WRITE, b"/local/domain/6/data/b\0"),
        Step(0, XS_WRITE, b"/local/domain/6/c\0"),
        Step(0, XS_SET_PERMS, z(b"/local/domain/6/c", b"n0", b"r5")),
        Step(0, XS_WRITE, b"/local/domain/6/c\0x"),
        Step(0, XS_RM, z(b"/local/domain/6")),
        Step(1, XS_UNWATCH, z(b"data", b"rel")),
        Step(1, XS_RESET_WATCHES, b""),
        Step(0, XS_WRITE, b"/local/domain/5/data/a\0z"),
    ],
    "quotas": [
        *HOMES,
        Step(1, XS_WRITE, b"data/v\0" + b"x" * 2015),
        Step(1, XS_WRITE, b"data/v\0" + b"x" * 2016),
        Step(1, XS_WRITE, b"data/v\0" + b"x" * 2000),
        Step(1, XS_WRITE, b"data/p\0"),
        Step(1, XS_SET_PERMS, z(b"data/p", b"n5", b"r1", b"r2", b"r3", b"r4")),
        Step(1, XS_SET_PERMS, z(b"data/p", b"n5", b"r1", b"r2", b"r3", b"r4", b"r6")),
        *(Step(1, XS_WATCH, z(b"data", b"%d" % i)) for i in range(131)),
        *(Step(1, XS_TRANSACTION_START, b"\0") for _ in range(12)),
        Step(1, XS_WRITE, b"data/t\0", tx=0),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(0, XS_WRITE, b"/local/domain/5/data/own\0"),
    ],
    "release": [
        *HOMES,
        Step(2, XS_WRITE, b"data/mine/deep\0"),
        Step(0, XS_WRITE, b"/shared/by6\0"),
        Step(0, XS_SET_PERMS, z(b"/shared/by6", b"n6", b"r5")),
        Step(1, XS_WATCH, z(b"@releaseDomain", b"r")),
        Step(1, XS_WATCH, z(b"/shared", b"s")),
        Step(0, XS_WATCH, z(b"@releaseDomain", b"r0")),
        Step(0, XS_WATCH, z(b"/local", b"l")),
        Step(0, XS_SET_PERMS, z(b"@releaseDomain", b"n0", b"r5")),
        Step(0, XS_RELEASE, z(b"6")),
        Step(0, XS_DIRECTORY, z(b"/local/domain/6/data")),
        Step(0, XS_READ, z(b"/shared/by6")),
        Step(1, XS_READ, z(b"/shared/by6")),
        Step(0, XS_IS_DOMAIN_INTRODUCED, z(b"6")),
        Step(2, XS_READ, z(b"data")),
    ],
}


@pytest.mark.parametrize("name", sorted(GUEST_SCRIPTS))
def test_guests_get_the_same_replies(guest_daemons, name):
    assert not deliberate(GUEST_SCRIPTS[name], GUESTS)
    compare_guests(guest_daemons, GUEST_SCRIPTS[name])


SMALL_QUOTA_SCRIPTS = {
    "nodes": [
        *HOMES,
        *(Step(1, XS_WRITE, b"data/n%d\0" % i) for i in range(30)),
        Step(1, XS_WRITE, b"data/a/b/c\0"),
        Step(1, XS_RM, z(b"data/n1")),
        Step(1, XS_WRITE, b"data/a/b\0"),
        Step(1, XS_TRANSACTION_START, b"\0"),
        Step(1, XS_RM, z(b"data/n2"), tx=0),
        Step(1, XS_WRITE, b"data/x/y\0", tx=0),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(1, XS_DIRECTORY, z(b"data/x")),
    ],
    "transaction nodes": [
        *HOMES,
        *(Step(0, XS_WRITE, b"/local/domain/5/r%d\0v" % i) for i in range(10)),
        Step(1, XS_TRANSACTION_START, b"\0"),
        *(Step(1, XS_READ, z(b"r%d" % i), tx=0) for i in range(10)),
        Step(1, XS_READ, z(b"r0"), tx=0),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(1, XS_TRANSACTION_START, b"\0"),
        Step(1, XS_READ, z(b"r9"), tx=1),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=1),
        Step(0, XS_TRANSACTION_START, b"\0"),
        *(Step(0, XS_READ, z(b"/local/domain/5/r%d" % i), tx=0) for i in range(10)),
        Step(0, XS_TRANSACTION_END, z(b"T"), tx=0),
    ],
    "a removal whose parent went": [
        *HOMES,
        Step(1, XS_WRITE, b"data/a/b\0"),
        Step(1, XS_TRANSACTION_START, b"\0"),
        Step(1, XS_READ, z(b"data/a/b"), tx=0),
        Step(1, XS_RM, z(b"data/a")),
        Step(1, XS_RM, z(b"data/a/b"), tx=0),
        Step(1, XS_TRANSACTION_END, z(b"T"), tx=0),
        Step(1, XS_DIRECTORY, z(b"data")),
    ],
}


@pytest.mark.parametrize("name", sorted(SMALL_QUOTA_SCRIPTS))
def test_guests_meet_the_same_quotas(small_quota_daemons, name):
    compare_guests(small_quota_daemons, SMALL_QUOTA_SCRIPTS[name])


guest_names = st.sampled_from([b"a", b"b", b"data", b"5", b"6"])
guest_paths = st.one_of(
    st.lists(guest_names, min_size=1, max_size=3).map(b"/".join),
    st.builds(
        lambda domid, tail: b"/local/domain/%d/" % domid + b"/".join(tail),
        st.sampled_from([5, 6]),
        st.lists(guest_names, min_size=1, max_size=3),
    ),
    st.sampled_from([b"/", b"/local/domain", b"/tool", b"@releaseDomain", b"data/"]),
)
guest_requests = st.one_of(
    st.builds(lambda p: (XS_READ, z(p)), guest_paths),
    st.builds(lambda p: (XS_DIRECTORY, z(p)), guest_paths),
    st.builds(lambda p: (XS_GET_PERMS, z(p)), guest_paths),
    st.builds(lambda p, v: (XS_WRITE, p + b"\0" + v), guest_paths, st.binary(max_size=8)),
    st.builds(lambda p: (XS_MKDIR, z(p)), guest_paths),
    st.builds(lambda p: (XS_RM, z(p)), guest_paths),
    st.builds(lambda p, perms: (XS_SET_PERMS, z(p, *perms)), guest_paths, perm_texts),
    st.builds(lambda p, t: (XS_WATCH, z(p, t)), guest_paths, st.sampled_from([b"t", b"u"])),
    st.builds(lambda p, t: (XS_UNWATCH, z(p, t)), guest_paths, st.sampled_from([b"t", b"u"])),
    st.just((XS_TRANSACTION_START, b"\0")),
    st.builds(lambda arg: (XS_TRANSACTION_END, arg), st.sampled_from([b"T\0", b"F\0"])),
    st.builds(lambda d: (XS_INTRODUCE, z(d, b"1", b"9")), st.sampled_from([b"5", b"1"])),
    st.just((XS_RESET_WATCHES, b"")),
)
guest_steps = st.builds(
    lambda conn, request, tx: Step(conn, *request, tx=tx),
    st.integers(0, 2),
    guest_requests,
    st.sampled_from([None, None, 0, 1]),
)


@settings(
    max_examples=int(os.environ.get("XENSTORE_DIFF_EXAMPLES", "60")) // 2,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(guest_steps, min_size=1, max_size=20))
def test_generated_guest_scripts_get_the_same_replies(small_quota_daemons, script):
    assume(not deliberate(script, GUESTS))
    compare_guests(small_quota_daemons, [*HOMES, *script])
