"""The tutorial driver's own tests, written with xenlike.testing."""

from pathlib import Path

from kvdev import KvBackend
from kvdev.protocol import KV_EINVAL, KV_ENOENT, KV_GET, KV_OKAY, KV_PUT, KV_RING
from xenlike.testing import RunningTopology, channel_pair, detached

EXAMPLES = Path(__file__).resolve().parent.parent


async def test_the_back_end_stores_answers_and_refuses_bad_lengths(nursery) -> None:
    front, back, _ = channel_pair(KV_RING)
    backend = detached(KvBackend)
    nursery.start_soon(front.run)
    nursery.start_soon(backend.serve, back)
    request = KV_RING.request.record
    put = await front.call(request(op=KV_PUT, key_len=1, value_len=2, key=b"k", value=b"vv"))
    got = await front.call(request(op=KV_GET, key_len=1, key=b"k"))
    missing = await front.call(request(op=KV_GET, key_len=1, key=b"x"))
    hostile = await front.call(request(op=KV_GET, key_len=200, key=b"k"))
    assert put.status == KV_OKAY and (got.status, got.value[: got.value_len]) == (KV_OKAY, b"vv")
    assert missing.status == KV_ENOENT and hostile.status == KV_EINVAL
    nursery.cancel_scope.cancel()


def test_the_tutorial_topology_runs(tmp_path: Path) -> None:
    topology = (EXAMPLES / "kvdev.toml").read_text()
    with RunningTopology(topology, tmp_path, pythonpath=[EXAMPLES]) as topo:
        console = topo.wait_for_console("client", "get key7 -> None")
        assert "get greeting -> hello from client" in console
        assert "get key7 -> 49" in console and "delete key7 -> True" in console
        (device,) = topo.devices("client")
        assert (device["frontend_state"], device["backend_state"]) == ("Connected", "Connected")
