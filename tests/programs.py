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


async def page_writer(guest: Guest) -> None:
    """Writes what Dom0 asks, for log-dirty's tests. Dom0 writes `data/logdirty/request`:
    "ID write N" (round ID into the first 16 bytes of N pages of its own, which it
    names) or "ID read SECTOR" (8 sectors of its disk into blkfront's buffers,
    whose sha256 it names); the answer is "ID ..." in `data/logdirty/done`."""
    import hashlib

    pages = [guest.domain.allocator.allocate() for _ in range(8)]
    await guest.xs.write("data/logdirty/request", "")  # ours, for Dom0 to write
    await guest.xs.write("data/logdirty/done", "ready")
    print(f"[{guest.name}] page writer ready")
    last = ""
    async with guest.xs.watch("data/logdirty/request") as events:
        async for _ in events:
            request = (await guest.xs.read("data/logdirty/request")).decode()
            if not request or request == last:
                continue
            last = request
            ident, word, arg = request.split()
            if word == "write":
                for gfn in pages[: int(arg)]:
                    with guest.domain.memory.frame(gfn) as page:
                        page[:16] = f"round {ident}".encode().ljust(16)
                answer = " ".join(str(gfn) for gfn in pages[: int(arg)])
            else:
                data = await guest.device("vbd").read(int(arg), 8)
                answer = hashlib.sha256(data).hexdigest()
            await guest.xs.write("data/logdirty/done", f"{ident} {answer}")


async def churn(guest: Guest) -> None:
    """Resumable, and a light writer for pre-copy's tests: writes a running count into
    64 pages of its own, one page a few ms, round-robin, keeping in its state what
    each page last got; after a resume it says whether every page holds that or a
    later count (the kernel takes the state when the suspend is asked for, and
    the program runs until the domain stops): an older count is a page dirtied
    after it was sent and not sent again."""
    import trio

    state = guest.resumable(guest.resumed_state or {"pages": [], "last": [], "count": 0})
    if guest.resumed_state is None:
        state["pages"] = [guest.domain.allocator.allocate() for _ in range(64)]
        state["last"] = [-1] * 64
        print(f"[{guest.name}] churning {len(state['pages'])} pages")
    else:
        stale = 0
        for gfn, last in zip(state["pages"], state["last"]):
            with guest.domain.memory.frame(gfn) as page:
                held = int(bytes(page[:16]).strip(b" \0") or -1)
            stale += held < last
        print(f"[{guest.name}] pages after the move: {f'{stale} stale' if stale else 'ok'}")
    while True:
        index = state["count"] % len(state["pages"])
        with guest.domain.memory.frame(state["pages"][index]) as page:
            page[:16] = str(state["count"]).encode().ljust(16)
        state["last"][index] = state["count"]
        state["count"] += 1
        await trio.sleep(0.003)
