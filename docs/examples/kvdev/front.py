"""The kv front end, in the guest: `get`, `put` and `delete` for the guest program."""

from kvdev.protocol import (
    KV_DELETE,
    KV_ENOENT,
    KV_GET,
    KV_OKAY,
    KV_PUT,
    KV_RING,
    MAX_KEY,
    MAX_VALUE,
)
from xenlike.xenbus import Frontend


class KvError(Exception):
    """The back end refused a request."""


class KvFrontend(Frontend):
    device_type = "kv"
    ring = KV_RING

    async def _call(self, op: int, key: bytes, value: bytes = b""):
        if len(key) > MAX_KEY or len(value) > MAX_VALUE:
            raise ValueError(f"keys hold {MAX_KEY} bytes and values {MAX_VALUE}")
        request = KV_RING.request.record(
            op=op,
            key_len=len(key),
            value_len=len(value),
            key=key.ljust(MAX_KEY, b"\0"),
            value=value.ljust(MAX_VALUE, b"\0"),
        )
        response = await self.call(request)
        if response.status not in (KV_OKAY, KV_ENOENT):
            raise KvError(f"the back end answered {response.status}")
        return response

    async def put(self, key: bytes, value: bytes) -> None:
        await self._call(KV_PUT, key, value)

    async def get(self, key: bytes) -> bytes | None:
        response = await self._call(KV_GET, key)
        return response.value[: response.value_len] if response.status == KV_OKAY else None

    async def delete(self, key: bytes) -> bool:
        return (await self._call(KV_DELETE, key)).status == KV_OKAY
