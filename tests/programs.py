"""Guest programs (init=) the end-to-end tests run."""

from domains.guest import Guest


async def raise_error(guest: Guest) -> None:
    print(f"[{guest.name}] about to fail")
    raise RuntimeError("the guest program failed on purpose")
