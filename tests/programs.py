"""Guest programs (init=) the end-to-end tests run."""

from domains.guest import Guest


async def raise_error(guest: Guest) -> None:
    print(f"[{guest.name}] about to fail")
    raise RuntimeError("the guest program failed on purpose")


async def ticker(guest: Guest) -> None:
    """A line on the console every 0.1 s, for a console that is attached meanwhile."""
    import trio

    tick = 0
    while True:
        print(f"[{guest.name}] tick {tick}")
        tick += 1
        await trio.sleep(0.1)


async def hold_pages(guest: Guest) -> None:
    """Try to write its own memory/target, then take 8 MiB of pages from the allocator,
    as drivers' buffers would, and keep them: the balloon must not give those back."""
    import trio

    from xenlike.xenstore import XenStoreError

    try:  # the toolstack's key: a guest cannot raise its own target
        await guest.xs.write("memory/target", "4194304")
        print(f"[{guest.name}] wrote memory/target")
    except XenStoreError as exc:
        print(f"[{guest.name}] memory/target is not ours: {exc.name}")
    held = [guest.domain.allocator.allocate() for _ in range(8 * 256)]
    print(f"[{guest.name}] holding {len(held)} pages")
    await trio.sleep_forever()


async def suspend_self(guest: Guest) -> None:
    """Ask for a suspend as a PV guest does at the end of its part of a save
    (SCHEDOP_shutdown, SHUTDOWN_suspend), with nothing saving it."""
    from xenlike.abi.sched import ShutdownReason

    print(f"[{guest.name}] suspending")
    await guest.domain.shutdown(ShutdownReason.suspend)
