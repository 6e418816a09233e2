"""A guest that publishes impossible XenStore values for its own devices.

Dom0 runs a back end for the `hostile` device type; the guest has no front
end for it, so its program plays the front end and writes, device by device,
what no honest front end would: a `state` far past any XenbusState, a
`ring-ref` past grant_ref_t, a `ring-page-order` of twenty digits, a
negative `event-channel`, digits that are not ASCII, a grant never made, a
protocol nobody speaks. Each attacked device must close with its error
node; Dom0 and every other device run on.
"""

from typing import Any

import trio

from tests.faulty_driver import FaultyBackend
from xenlike.xenbus import Driver, error_node
from xenlike.xenstore import XenStoreError


class TargetBackend(FaultyBackend):
    device_type = "hostile"


DRIVER = Driver("hostile", backend=TargetBackend)  # the program below plays the front end

HUGE = "9" * 40
ATTACKS: dict[int, dict[str, str]] = {  # devid -> the front end's keys, state last
    0: {"state": HUGE},
    1: {"ring-ref": str(1 << 64), "event-channel": "5", "state": "3"},
    2: {"ring-ref": "8", "event-channel": "5", "ring-page-order": HUGE, "state": "3"},
    3: {"ring-ref": "8", "event-channel": "-1", "state": "3"},
    4: {"ring-ref": "\u0661\u0662", "event-channel": "5", "state": "3"},
    5: {"ring-ref": "4000", "event-channel": "5", "state": "3"},
    6: {"ring-ref": "8", "event-channel": "5", "protocol": "x86_32-abi", "state": "3"},
}


async def _state(xs: Any, path: str) -> str:
    try:
        return (await xs.read(path)).decode()
    except XenStoreError:
        return "?"


async def _wait_state(xs: Any, path: str, states: set[str], timeout: float = 20) -> str:
    with trio.move_on_after(timeout):
        while await _state(xs, path) not in states:
            await trio.sleep(0.05)
    return await _state(xs, path)


async def program(guest: Any) -> None:
    xs, name = guest.xs, guest.name
    for devid, keys in ATTACKS.items():
        node = f"/local/domain/{guest.domid}/device/hostile/{devid}"
        backend = (await xs.read(f"{node}/backend")).decode()
        await _wait_state(xs, f"{backend}/state", {"2"})  # InitWait: it offers itself
        for key, value in keys.items():
            await xs.write(f"{node}/{key}", value)
        if devid == 0:
            # Absence: garbage states must change nothing, and no event says "ignored".
            # Each value stays long enough for the back end's watch (milliseconds) to read
            # it: a later write would otherwise hide it, as a watch reads the node's latest.
            await trio.sleep(1)
            await xs.write(f"{node}/state", "three")
            await trio.sleep(0.5)
            state = await _state(xs, f"{backend}/state")
            print(f"[{name}] hostile {devid}: back end state {state}")
            continue
        state = await _wait_state(xs, f"{backend}/state", {"5", "6"})
        try:
            error = (await xs.read(error_node(backend))).decode()
        except XenStoreError as exc:
            error = f"no error node ({exc})"
        print(f"[{name}] hostile {devid}: back end state {state}: {error}")
    print(f"[{name}] hostile done")
    await trio.sleep_forever()
