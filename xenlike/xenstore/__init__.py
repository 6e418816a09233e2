"""XenStore for xenlike: xs_wire, the store, xenstored and an async client.

Xen's semantics and protocol, byte for byte, so the stock xenstore-* tools
work against xenstored here (point XENSTORED_PATH at its socket).

- `wire`: xs_wire framing without I/O (`XsMessage`, `MessageReader`).
- `store`: the database and every request's rules, without I/O (`Store`).
- `server`: xenstored as a trio service (`XenStored`); run it alone with
  `python -m xenlike.xenstore --socket PATH`.
- `client`: the async client (`open_client`, `Client`).
"""

from xenlike.xenstore.client import (
    Client,
    ConnectionClosed,
    Transaction,
    Watch,
    WatchEvent,
    connect_stream,
    default_socket_path,
    open_client,
)
from xenlike.xenstore.server import Connection, XenStored
from xenlike.xenstore.store import (
    Delivery,
    IntroducedDomain,
    Outcome,
    Permission,
    Quotas,
    Store,
    StoreStatistics,
)
from xenlike.xenstore.wire import (
    NEED_DATA,
    MessageReader,
    XenStoreError,
    XsMessage,
    XsProtocolError,
)

__all__ = [
    "NEED_DATA",
    "Client",
    "Connection",
    "ConnectionClosed",
    "Delivery",
    "IntroducedDomain",
    "MessageReader",
    "Outcome",
    "Permission",
    "Quotas",
    "Store",
    "StoreStatistics",
    "Transaction",
    "Watch",
    "WatchEvent",
    "XenStoreError",
    "XenStored",
    "XsMessage",
    "XsProtocolError",
    "connect_stream",
    "default_socket_path",
    "open_client",
]
