"""A guest program that uses its kv device and says what it does."""

import trio


async def main(guest) -> None:
    kv = guest.device("kv")
    await kv.put(b"greeting", f"hello from {guest.name}".encode())
    print(f"[{guest.name}] get greeting -> {(await kv.get(b'greeting')).decode()}")
    async with trio.open_nursery() as nursery:  # 100 requests in flight at once
        for n in range(100):
            nursery.start_soon(kv.put, f"key{n}".encode(), str(n * n).encode())
    print(f"[{guest.name}] get key7 -> {(await kv.get(b'key7')).decode()}")
    print(f"[{guest.name}] delete key7 -> {await kv.delete(b'key7')}")
    print(f"[{guest.name}] get key7 -> {await kv.get(b'key7')}")
    await trio.sleep_forever()
