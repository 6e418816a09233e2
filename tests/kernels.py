"""Small domain kernels the hypervisor tests boot as real processes.

Each reports through the hypervisor log (console_io), which the test reads
back with CONSOLEIO_read, as `xl dmesg` does. Parameters come in on the
kernel command line (start_info.cmd_line) as key=value words.
"""

import trio

from xenlike.domain import Domain


def params(domain: Domain) -> dict[str, str]:
    return dict(word.split("=", 1) for word in domain.cmdline.split())


async def hello(domain: Domain) -> None:
    await domain.console_write(f"hello from d{domain.domid}, {domain.start_info.nr_pages} pages")


async def crash(domain: Domain) -> None:
    raise RuntimeError("this kernel crashes on purpose")


async def sleeper(domain: Domain) -> None:
    await domain.console_write("sleeping")
    await trio.sleep_forever()


async def ping(domain: Domain) -> None:
    """Owns port `port` (allocated for the peer by Dom0); answers `rounds` pings."""
    p = params(domain)
    port = await domain.evtchn.port(int(p["port"]))
    await domain.console_write("ping ready")
    for _ in range(int(p["rounds"])):
        await port.wait()
        port.notify()
    await domain.console_write(f"ping done after {p['rounds']} rounds")


async def pong(domain: Domain) -> None:
    """Binds to the ping domain's port and drives `rounds` round trips."""
    p = params(domain)
    port = await domain.evtchn.bind_interdomain(int(p["peer"]), int(p["port"]))
    await port.wait()  # Xen leaves a freshly bound port pending
    for _ in range(int(p["rounds"])):
        port.notify()
        await port.wait()
    await domain.console_write(f"pong done after {p['rounds']} rounds")
