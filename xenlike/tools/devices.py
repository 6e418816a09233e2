"""What `xenlike devices` shows: every split device's two ends, and why one is stuck.

A stuck handshake is the first thing to look at when a device does not
work: each pair of (front-end state, back-end state) has one side waiting
for the other, and the report says which side waits for what — and, when
the trace buffers still hold it, the last XenBus or ring event of either
end (`xenlike.trace.events`). A failed device shows its ends' error nodes
(`error/<device path>/error`, as xenbus_dev_fatal writes them).
"""

import time
from typing import Any

from xenlike.abi.xenbus import XenbusState as S
from xenlike.rundir import RunDir
from xenlike.tools.session import NoSuchDomain
from xenlike.xenbus.driver import error_node
from xenlike.xenstore import open_client

__all__ = [
    "BLOCK_LIST_HEADER",
    "NETWORK_LIST_HEADER",
    "block_list",
    "describe_devices",
    "network_list",
    "waiting_for",
]

_FEATURE_PREFIXES = (
    "feature-",
    "max-ring-page-order",
    "ring-page-order",
    "multi-queue",
    "sectors",
    "sector-size",
    "physical-sector-size",
    "info",
    "discard-",
    "mode",
    "mac",
    "request-rx-copy",
)


def waiting_for(device_type: str, front: S | None, back: S | None) -> str | None:
    """Which end waits, and for what (None when the device is connected or closed)."""
    if front == S.Connected and back == S.Connected:
        return None
    if back in (None, S.Unknown):
        return "the back-end directory is missing: the toolstack did not create it"
    if back == S.Initialising:
        return (
            f"no back end has picked the device up: is a back-end driver for "
            f"'{device_type}' running in the back-end domain?"
        )
    if back == S.InitWait and front in (S.Initialising, S.Unknown, None):
        return (
            f"the back end offers its features and waits for the front end to publish "
            f"its ring (ring-ref, event-channel): is a front-end driver for "
            f"'{device_type}' loaded in the guest?"
        )
    if back == S.InitWait and front == S.Initialised:
        return (
            "the front end published its ring; the back end has not mapped it and "
            "connected: look at the back end's error node and Dom0's log"
        )
    if back == S.Connected and front == S.Initialised:
        return "the back end is Connected; the front end has not yet read its properties"
    if S.Closing in (front, back) or S.Closed in (front, back):
        return "the device is closing or closed: one end disconnected (see the error nodes)"
    return f"front end {front.name if front else '-'}, back end {back.name}"


def _state(text: str | None) -> S | None:
    try:
        return S(int(text)) if text is not None else None
    except ValueError:
        return S.Unknown


async def describe_devices(run_dir: RunDir, name: str | None = None) -> list[dict[str, Any]]:
    """Every device of every guest (or of `name`, a name or a domid), from XenStore;
    NoSuchDomain if no domain answers to `name`."""
    report = []
    known = []
    found = name is None
    async with open_client(run_dir.xenstored_socket) as xs:
        for domid in await xs.ls_optional("/local/domain"):
            domain_name = await xs.read_optional(f"/local/domain/{domid}/name") or f"d{domid}"
            known.append(domain_name)
            if domid == "0" or (name is not None and name not in (domain_name, domid)):
                continue
            found = True
            home = f"/local/domain/{domid}/device"
            for device_type in await xs.ls_optional(home):
                for devid in await xs.ls_optional(f"{home}/{device_type}"):
                    front = f"{home}/{device_type}/{devid}"
                    back = await xs.read_optional(f"{front}/backend")
                    front_state = _state(await xs.read_optional(f"{front}/state"))
                    back_state = _state(await xs.read_optional(f"{back}/state")) if back else None
                    features = {}
                    for side, path in (("backend", back), ("frontend", front)):
                        if path is None:
                            continue
                        for key in await xs.ls_optional(path):
                            if key.startswith(_FEATURE_PREFIXES):
                                features[f"{side}/{key}"] = await xs.read_optional(f"{path}/{key}")
                    errors = []
                    for side, path in (("frontend", front), ("backend", back)):
                        error = await xs.read_optional(error_node(path)) if path else None
                        if error:
                            errors.append(f"{side}: {error}")
                    backend_id = await xs.read_optional(f"{front}/backend-id")
                    report.append(
                        {
                            "domain": domain_name,
                            "domid": int(domid),
                            "type": device_type,
                            "devid": devid,
                            "frontend": front,
                            "backend": back,
                            "frontend_state": front_state.name if front_state is not None else None,
                            "backend_state": back_state.name if back_state is not None else None,
                            "features": features,
                            "errors": errors,
                            "waiting": waiting_for(device_type, front_state, back_state),
                            "backend_domid": int(backend_id)
                            if backend_id and backend_id.isdigit()
                            else None,
                            "last_event": None,
                        }
                    )
    if not found:
        raise NoSuchDomain(f"no domain named {name!r}; domains: {', '.join(known) or 'none'}")
    stuck = [device for device in report if device["waiting"]]
    if stuck:
        await _add_last_events(run_dir, stuck)
    return report


async def _add_last_events(run_dir: RunDir, devices: list[dict[str, Any]]) -> None:
    """Point each stuck device at the last thing either end did, as the trace recalls it."""
    from xenlike.trace.live import last_device_events
    from xenlike.trace.view import describe

    try:
        last = await last_device_events(run_dir.path)
    except (ConnectionError, OSError):
        return  # no hypervisor to read the buffers from
    for device in devices:
        if not device["devid"].isdigit():
            continue
        front = (device["domid"], device["type"], int(device["devid"]), device["backend_domid"])
        back = (device["backend_domid"], device["type"], int(device["devid"]), device["domid"])
        found = [event for event in (last.get(front), last.get(back)) if event is not None]
        if found:
            event = max(found, key=lambda e: e.time_ns)
            age = (time.monotonic_ns() - event.time_ns) / 1e9
            device["last_event"] = f"d{event.domid} {describe(event)} ({age:.1f} s ago)"


# --- block-list and network-list: xl's tables ------------------------------------------


def block_list(devices: list[dict[str, Any]]) -> list[str]:
    """xl block-list's rows (tools/xl/xl_block.c) for a toolstack `device-list` of vbds:
    a missing number is -1, as libxl_device_disk_getinfo reads it; lines end
    without xl's trailing padding."""
    lines = []
    for d in devices:
        numbers = [_n(d[key]) for key in ("devid", "backend_id", "frontend_id", "state", "evtch")]
        row = "{:<5} {:<3} {:<6} {:<5} {:<6}".format(*numbers)
        lines.append(f"{row} {_n(d.get('ring-ref')):<8} {d['backend']:<30}".rstrip())
    return lines


def network_list(devices: list[dict[str, Any]]) -> list[str]:
    """xl network-list's rows (tools/xl/xl_nic.c), as `block_list` does for disks."""
    lines = []
    for d in devices:
        mac = d["mac"] or "00:00:00:00:00:00"
        rings = f"{_n(d.get('tx-ring-ref')):>5}/{_n(d.get('rx-ring-ref')):<11}"
        row = f"{_n(d['devid']):<3} {_n(d['backend_id']):<2} {mac}{_n(d['devid']):>6} "
        row += f"{_n(d['state']):>5} {_n(d['evtch']):>6} {rings} {d['backend']:<30}"
        lines.append(row.rstrip())
    return lines


BLOCK_LIST_HEADER = "{:<5} {:<3} {:<6} {:<5} {:<6} {:<8} {:<30}".format(
    "Vdev", "BE", "handle", "state", "evt-ch", "ring-ref", "BE-path"
).rstrip()
NETWORK_LIST_HEADER = "{:<3} {:<2} {:<17} {:<6} {:<5} {:<6} {:>5}/{:<5} {:<30}".format(
    "Idx", "BE", "Mac Addr.", "handle", "state", "evt-ch", "tx-", "rx-ring-ref", "BE-path"
).rstrip()


def _n(value: Any) -> int:
    return -1 if value is None else int(value)
