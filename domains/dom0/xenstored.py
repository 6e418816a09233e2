"""Dom0's xenstored: the Unix socket for Dom0 tools, and each guest's ring.

When the toolstack introduces a domain (XS_INTRODUCE), xenstored maps the
guest's XenStore page through grant ref GNTTAB_RESERVED_XENSTORE (which the
domain builder granted to Dom0), binds the store event channel the
toolstack allocated, and serves the ring as a connection of that domain:
its paths resolve under /local/domain/<id> and its permissions apply.
XS_RELEASE, or the guest breaking the ring protocol, ends it.
"""

import logging
from typing import Any

import trio

from xenlike.abi._layout import offsetof
from xenlike.abi.grant_table import GNTTAB_RESERVED_XENSTORE
from xenlike.abi.xs_wire import XENSTORE_ERROR_RINGIDX, xenstore_domain_interface
from xenlike.bytering import XENSTORE, ByteRing, ByteRingStream
from xenlike.xenstore import IntroducedDomain, XenStored
from xenlike.xenstore.wire import XsMessage

__all__ = ["Dom0XenStored"]

log = logging.getLogger("xenlike.dom0.xenstored")
ERROR_OFFSET = offsetof(xenstore_domain_interface, "error")


class Dom0XenStored(XenStored):
    """xenstored with the ring transport of a domain that can map grants."""

    def __init__(self, domain: Any, nursery: trio.Nursery) -> None:
        super().__init__()
        self.domain = domain
        self._nursery = nursery
        self.rings: dict[int, trio.CancelScope] = {}

    def dispatch(self, conn: Any, message: XsMessage) -> None:
        before = set(self.store.domains)
        super().dispatch(conn, message)
        for domid in set(self.store.domains) - before:
            self._nursery.start_soon(self.serve_ring, self.store.domains[domid])

    async def serve_ring(self, introduced: IntroducedDomain) -> None:
        """Serve one guest's ring until it is released or breaks the protocol."""
        domid = introduced.domid
        grants, evtchn = self.domain.grants, self.domain.evtchn
        try:
            mapping = await grants.map(domid, [GNTTAB_RESERVED_XENSTORE])
        except Exception as exc:
            log.error("d%d: cannot map the XenStore page: %s", domid, exc)
            return
        try:
            port = await evtchn.bind_interdomain(domid, introduced.port)
        except Exception as exc:
            log.error("d%d: cannot bind store port %d: %s", domid, introduced.port, exc)
            await grants.unmap(mapping)
            return
        page = mapping.view
        to_guest, from_guest = (
            ByteRing(page, XENSTORE.to_guest),
            ByteRing(page, XENSTORE.to_backend),
        )
        stream = ByteRingStream(to_guest, from_guest, port)
        with trio.CancelScope() as scope:
            self.rings[domid] = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.pump)
                await self.serve_stream(stream, domid)
                if stream.broken is not None:
                    log.warning("d%d broke its XenStore ring: %s", domid, stream.broken)
                    page[ERROR_OFFSET : ERROR_OFFSET + 4] = XENSTORE_ERROR_RINGIDX.to_bytes(
                        4, "little"
                    )
                nursery.cancel_scope.cancel()
        self.rings.pop(domid, None)
        with trio.CancelScope(shield=True):
            await stream.aclose()
            try:
                await port.close()
            except Exception:
                pass
            for ring in (to_guest, from_guest):
                ring.release()
            page.release()
            await grants.unmap(mapping)
