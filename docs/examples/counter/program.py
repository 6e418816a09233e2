"""A resumable program: its count goes on after a save and a restore."""

import trio


async def main(guest):
    # What a suspend saves: a dict of JSON values that the program keeps current.
    # After a restore the program starts again, with that dict as resumed_state.
    state = guest.resumable(guest.resumed_state or {"count": 0})
    if guest.resumed_state is not None:
        print(f"[{guest.name}] resumed at count {state['count']}")
    while True:
        await guest.xs.write("data/count", str(state["count"]))
        await trio.sleep(1)
        state["count"] += 1
