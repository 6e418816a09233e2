"""The kv device's ring: one request and one response layout, as construct Structs."""

from construct import Bytes, Int8ul, Int16sl, Int16ul, Int64ul, Padding, Struct

from xenlike.ring import define_ring

KV_GET, KV_PUT, KV_DELETE = 0, 1, 2
KV_OKAY, KV_ENOENT, KV_EINVAL, KV_ENOSPC = 0, -2, -22, -28  # Xen's errno values, negated
MAX_KEY, MAX_VALUE = 32, 64

kv_request = Struct(
    "id" / Int64ul,  # the channel fills it in and matches the response by it
    "op" / Int8ul,
    "key_len" / Int8ul,
    "value_len" / Int16ul,
    Padding(4),
    "key" / Bytes(MAX_KEY),
    "value" / Bytes(MAX_VALUE),
)

kv_response = Struct(
    "id" / Int64ul,
    "status" / Int16sl,
    "value_len" / Int16ul,
    Padding(4),
    "value" / Bytes(MAX_VALUE),
)

KV_RING = define_ring("kv", request=kv_request, response=kv_response)
