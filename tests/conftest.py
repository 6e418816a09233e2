import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from xenlike.domain.hypercall import HypercallClient
from xenlike.hypervisor import HypercallConnection, Hypervisor, HypervisorDomain
from xenlike.xc import XenControl


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long stress tests too")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="stress run: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
async def hv(tmp_path: Path, nursery: trio.Nursery) -> Hypervisor:
    """A hypervisor served in the test's own process, so tests can reach its domains."""
    hypervisor = Hypervisor(tmp_path / "run")
    await nursery.start(hypervisor.serve)
    return hypervisor


@pytest.fixture
async def xc(hv: Hypervisor) -> AsyncIterator[XenControl]:
    """Dom0's control connection to `hv`."""
    async with XenControl.connect(hv.run_dir) as control:
        yield control


DomainConnector = Callable[[HypervisorDomain], Awaitable[HypercallClient]]


@pytest.fixture
def connect(hv: Hypervisor, nursery: trio.Nursery) -> DomainConnector:
    """`await connect(domain)`: a hypercall socket as `domain`, with no process behind it.

    The hypervisor serves it as it serves a domain's own socket, so tests can
    make a built (or even a never built) domain's calls without booting it.
    """

    async def connect_as(domain: HypervisorDomain) -> HypercallClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn = HypercallConnection(domain, trio.socket.from_stdlib_socket(ours))
        domain.connections.append(conn)
        nursery.start_soon(hv.serve_connection, conn)
        client = HypercallClient(trio.socket.from_stdlib_socket(theirs))
        await nursery.start(client.run)
        return client

    return connect_as
