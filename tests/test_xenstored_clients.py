"""xenstored as a real process, driven by Debian's xenstore-* tools and raw sockets.

The server runs as `python -m xenlike.xenstore --socket PATH`; the stock
tools find it through XENSTORED_PATH, exactly as they find a real xenstored.
"""

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenlike.abi.xs_wire import (
    XS_ERROR,
    XS_READ,
    XS_TRANSACTION_START,
    XS_WATCH,
    XS_WATCH_EVENT,
    XS_WRITE,
    xsd_sockmsg,
)
from xenlike.xenstore.wire import MessageReader, XsMessage

TOOLS = ["xenstore-read", "xenstore-write", "xenstore-ls", "xenstore-list", "xenstore-rm",
         "xenstore-exists", "xenstore-chmod", "xenstore-watch"]  # fmt: skip
MISSING_TOOLS = [tool for tool in TOOLS if shutil.which(tool) is None]
needs_tools = pytest.mark.skipif(
    bool(MISSING_TOOLS),
    reason=f"xenstore-utils not installed (missing {', '.join(MISSING_TOOLS)}); "
    "apt-get install xenstore-utils",
)
TIMEOUT = 10


@pytest.fixture(scope="module")
def socket_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("xenstored") / "socket"
    server = subprocess.Popen(
        [sys.executable, "-m", "xenlike.xenstore", "--socket", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = server.stdout.readline()
    assert line == f"xenstored: listening on {path}\n", server.stderr.read()
    yield path
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=TIMEOUT) == 0
    assert not path.exists(), "xenstored removes its socket on exit"


def tool(socket_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XENSTORED_PATH": str(socket_path)}
    return subprocess.run(argv, env=env, capture_output=True, timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> bytes:
    assert result.returncode == 0, result.stderr
    return result.stdout


# -- the stock tools -------------------------------------------------------------


@needs_tools
def test_write_then_read(socket_path):
    assert ok(tool(socket_path, "xenstore-write", "/t1/foo", "bar")) == b""
    assert ok(tool(socket_path, "xenstore-read", "/t1/foo")) == b"bar\n"
    assert ok(tool(socket_path, "xenstore-read", "-p", "/t1/foo")) == b"/t1/foo: bar\n"
    assert ok(tool(socket_path, "xenstore-read", "/local/domain/0/name")) == b"Domain-0\n"


@needs_tools
def test_several_keys_go_through_a_transaction(socket_path):
    ok(tool(socket_path, "xenstore-write", "/t2/a", "1", "/t2/b", "2"))
    assert ok(tool(socket_path, "xenstore-read", "/t2/a", "/t2/b")) == b"1\n2\n"


@needs_tools
def test_a_value_with_a_nul(socket_path):
    ok(tool(socket_path, "xenstore-write", "/t3/x", r"a\x00b"))
    assert ok(tool(socket_path, "xenstore-read", "/t3/x")) == b"a\\000b\n"
    assert ok(tool(socket_path, "xenstore-read", "-R", "/t3/x")) == b"a\x00b"


@needs_tools
def test_reading_a_missing_key_fails(socket_path):
    result = tool(socket_path, "xenstore-read", "/t4/nonexistent")
    assert result.returncode == 1
    assert result.stderr == b"xenstore-read: couldn't read path /t4/nonexistent\n"


@needs_tools
def test_ls_prints_the_tree_escaped(socket_path):
    ok(
        tool(
            socket_path, "xenstore-write", "/t5/k", "v", "/t5/d/e", r"tab\tend", "/t5/z", r"a\x00b"
        )
    )
    assert ok(tool(socket_path, "xenstore-ls", "/t5")) == (
        b'k = "v"\n'
        b'd = ""\n'
        b' e = "tab\\tend"\n'
        b'z = "a\\000b"\n'
    )  # fmt: skip
    assert b'local = ""\n domain = ""\n  0 = ""\n   name = "Domain-0"\n' in ok(
        tool(socket_path, "xenstore-ls", "/")
    )


@needs_tools
def test_list_and_exists(socket_path):
    ok(tool(socket_path, "xenstore-write", "/t6/one", "1", "/t6/two", "2"))
    assert ok(tool(socket_path, "xenstore-list", "/t6")) == b"one\ntwo\n"
    assert tool(socket_path, "xenstore-exists", "/t6/one").returncode == 0
    assert tool(socket_path, "xenstore-exists", "/t6/three").returncode == 1


@needs_tools
def test_rm_removes_the_subtree(socket_path):
    ok(tool(socket_path, "xenstore-write", "/t7/a/b", "1", "/t7/c", "2"))
    ok(tool(socket_path, "xenstore-rm", "/t7/a"))
    assert tool(socket_path, "xenstore-exists", "/t7/a/b").returncode == 1
    assert ok(tool(socket_path, "xenstore-list", "/t7")) == b"c\n"


@needs_tools
def test_chmod_shows_in_ls_p(socket_path):
    ok(tool(socket_path, "xenstore-write", "/t8/node", "v"))
    ok(tool(socket_path, "xenstore-chmod", "/t8/node", "r0", "b1"))
    listing = ok(tool(socket_path, "xenstore-ls", "-p", "/t8"))
    assert listing.startswith(b'node = "v"') and listing.endswith(b"(r0,b1)\n")


@needs_tools
def test_watch_fires_at_once_then_on_a_change(socket_path):
    env = {**os.environ, "XENSTORED_PATH": str(socket_path)}
    watcher = subprocess.Popen(
        ["xenstore-watch", "-n", "2", "/t9"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert read_line(watcher.stdout) == b"/t9\n"  # the registration event, before any change
        ok(tool(socket_path, "xenstore-write", "/t9/child", "1"))
        assert read_line(watcher.stdout) == b"/t9/child\n"
        assert watcher.wait(timeout=TIMEOUT) == 0
    finally:
        watcher.kill()
        watcher.wait()


def read_line(pipe) -> bytes:
    """One line from a child's stdout, or fail after TIMEOUT seconds."""
    line = b""
    deadline = time.monotonic() + TIMEOUT
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no complete line within {TIMEOUT}s (got {line!r})"
        chunk = os.read(pipe.fileno(), 1)
        assert chunk, f"EOF after {line!r}"
        line += chunk
    return line


# -- bad input over a raw socket (xen-abi.md section 17) ------------------------------


def connect(socket_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(str(socket_path))
    return sock


def receive(sock: socket.socket, reader: MessageReader) -> XsMessage:
    while not isinstance(message := reader.next_message(), XsMessage):
        data = sock.recv(65536)
        assert data, "xenstored closed the connection"
        reader.feed(data)
    return message


def call(
    sock: socket.socket, type_: int, payload: bytes, tx_id: int = 0, req_id: int = 5
) -> XsMessage:
    sock.sendall(XsMessage(type_, req_id, tx_id, payload).encode())
    answer = receive(sock, MessageReader())
    assert (answer.req_id, answer.tx_id) == (req_id, tx_id)
    return answer


def assert_still_serving(socket_path: Path) -> None:
    with connect(socket_path) as sock:
        assert call(sock, XS_READ, b"/local/domain/0/name\0").payload == b"Domain-0"


def test_a_truncated_header_is_waited_for(socket_path):
    with connect(socket_path) as sock:
        message = XsMessage(XS_READ, 9, 0, b"/local/domain/0/name\0").encode()
        sock.sendall(message[:8])
        ready, _, _ = select.select([sock], [], [], 0.3)
        assert not ready, "no reply, no close, for half a header"
        sock.sendall(message[8:])
        assert receive(sock, MessageReader()) == XsMessage(XS_READ, 9, 0, b"Domain-0")
    assert_still_serving(socket_path)


def test_an_oversized_len_closes_the_connection_without_a_reply(socket_path):
    with connect(socket_path) as sock:
        sock.sendall(xsd_sockmsg.build(dict(type=XS_READ, req_id=0, tx_id=0, len=5000)))
        assert sock.recv(65536) == b""
    assert_still_serving(socket_path)


def test_an_unknown_type_is_enosys_and_the_connection_stays(socket_path):
    with connect(socket_path) as sock:
        assert call(sock, 999, b"") == XsMessage(XS_ERROR, 5, 0, b"ENOSYS\0")
        assert call(sock, XS_READ, b"/local/domain/0/name\0").payload == b"Domain-0"
    assert_still_serving(socket_path)


@pytest.mark.parametrize(
    ("type_", "payload", "tx_id", "expected"),
    [
        (XS_WRITE, b"/t10/no-nul", 0, b"EINVAL\0"),
        (XS_READ, b"/tool", 0, b"EINVAL\0"),
        (XS_READ, b"", 0, b"EINVAL\0"),
        (XS_READ, b"/a//b\0", 0, b"EINVAL\0"),
        (XS_READ, b"/a b\0", 0, b"EINVAL\0"),
        (XS_WATCH, b"/t10\0", 0, b"EINVAL\0"),
        (XS_READ, b"foo\0", 0, b"ENOENT\0"),
        (XS_READ, b"/tool\0", 77, b"ENOENT\0"),
        (XS_READ, b"/" + b"a" * 2047 + b"\0", 0, b"ENOENT\0"),
        (XS_READ, b"/" + b"a" * 2048 + b"\0", 0, b"EINVAL\0"),
    ],
)
def test_bad_requests_get_an_error_and_the_connection_stays(
    socket_path, type_, payload, tx_id, expected
):
    with connect(socket_path) as sock:
        answer = call(sock, type_, payload, tx_id=tx_id)
        assert (answer.type, answer.payload) == (XS_ERROR, expected)
        assert call(sock, XS_READ, b"/local/domain/0/name\0").payload == b"Domain-0"
    assert_still_serving(socket_path)


def test_ten_thousand_watches_on_one_domain_0_connection(socket_path):
    """xenstored's watch quota binds guests only; a socket client is domain 0."""
    count = 10_000
    with connect(socket_path) as sock:
        reader = MessageReader()
        for batch in range(0, count, 1000):
            sock.sendall(
                b"".join(
                    XsMessage(XS_WATCH, i, 0, b"/t11\0tok%d\0" % i).encode()
                    for i in range(batch, batch + 1000)
                )
            )
            replies = [receive(sock, reader) for _ in range(2000)]
            assert sum(m.payload == b"OK\0" for m in replies) == 1000
            assert sum(m.type == XS_WATCH_EVENT for m in replies) == 1000
        sock.sendall(XsMessage(XS_WRITE, 1, 0, b"/t11/x\0v").encode())
        messages = [receive(sock, reader) for _ in range(count + 1)]
        assert sum(m.type == XS_WATCH_EVENT for m in messages) == count
        assert messages[-1] == XsMessage(XS_WRITE, 1, 0, b"OK\0")
    assert_still_serving(socket_path)


def test_a_transaction_left_open_dies_with_its_connection(socket_path):
    with connect(socket_path) as sock:
        tx_id = int(call(sock, XS_TRANSACTION_START, b"\0").payload.rstrip(b"\0"))
        assert call(sock, XS_WRITE, b"/t12/uncommitted\0v", tx_id=tx_id).payload == b"OK\0"
    with connect(socket_path) as sock:
        assert call(sock, XS_READ, b"/t12/uncommitted\0").payload == b"ENOENT\0"
    assert_still_serving(socket_path)
