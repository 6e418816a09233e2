"""The kv back end, in Dom0: a dictionary per device, behind the ring."""

from kvdev.protocol import (
    KV_DELETE,
    KV_EINVAL,
    KV_ENOENT,
    KV_ENOSPC,
    KV_GET,
    KV_OKAY,
    KV_PUT,
    KV_RING,
    MAX_KEY,
    MAX_VALUE,
)
from xenlike.xenbus import Backend


class KvBackend(Backend):
    device_type = "kv"
    ring = KV_RING

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.store: dict[bytes, bytes] = {}  # survives reconnects of the same device
        self.max_entries = 1000

    def features(self) -> dict[str, int]:
        return {"max-key-length": MAX_KEY, "max-value-length": MAX_VALUE}

    async def connected(self) -> None:
        # The keys of the topology's `devices` line are in this end's own directory.
        self.max_entries = await self.read_int("max-entries", 1000, otherend=False)

    async def handle(self, request):
        reply = KV_RING.response.record
        # Ring contents are hostile: check every length before using it.
        if request.key_len > MAX_KEY or request.value_len > MAX_VALUE:
            return reply(id=request.id, status=KV_EINVAL)
        key = request.key[: request.key_len]
        if request.op == KV_PUT:
            if key not in self.store and len(self.store) >= self.max_entries:
                return reply(id=request.id, status=KV_ENOSPC)
            self.store[key] = request.value[: request.value_len]
            return reply(id=request.id, status=KV_OKAY)
        if request.op == KV_GET and key in self.store:
            value = self.store[key]
            return reply(
                id=request.id,
                status=KV_OKAY,
                value_len=len(value),
                value=value.ljust(MAX_VALUE, b"\0"),
            )
        if request.op == KV_DELETE and self.store.pop(key, None) is not None:
            return reply(id=request.id, status=KV_OKAY)
        if request.op in (KV_GET, KV_DELETE):
            return reply(id=request.id, status=KV_ENOENT)
        return reply(id=request.id, status=KV_EINVAL)
