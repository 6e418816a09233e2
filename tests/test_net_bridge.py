"""Dom0's network hardware in-process: the learning bridge, pcap, the capture socket."""

import io
from pathlib import Path

import pytest
import trio

from domains.dom0.hw import bridge as bridge_module
from domains.dom0.hw.bridge import AGEING_TIME, Bridge
from domains.dom0.hw.net import Network
from domains.dom0.hw.nic import PcapNic, TapNic, TapUnavailable
from xenlike.rundir import RunDir
from xenlike.tools.capture import NoSuchBridge, capture_bridge
from xenlike.tools.pcap import PcapError, PcapReader, file_header, read_records, record
from xenlike.topology import parse_topology

A, B, C = (bytes.fromhex(f"00163e00000{n}") for n in (1, 2, 3))
BROADCAST = b"\xff" * 6


class Port:
    def __init__(self, name: str, mac: bytes | None) -> None:
        self.name, self.mac = name, mac
        self.got: list[bytes] = []

    def deliver(self, frame: bytes, flags: int, source: object) -> None:
        self.got.append(frame)


def frame(destination: bytes, source: bytes, tag: bytes = b"") -> bytes:
    return destination + source + b"\x88\xb5" + tag.ljust(46, b".")


@pytest.fixture
def switch() -> tuple[Bridge, Port, Port, Port]:
    bridge = Bridge("xenbr0")
    ports = Port("vif1.0", A), Port("vif2.0", B), Port("uplink", None)
    for port in ports:
        bridge.attach(port)
    return bridge, *ports


def test_unknown_destinations_flood_then_learned_ones_are_switched(switch) -> None:  # type: ignore[no-untyped-def]
    bridge, a, b, up = switch
    first = frame(B, A, b"1")
    bridge.forward(a, [(first, 0)])
    assert (a.got, b.got, up.got) == ([], [first], [first])
    reply = frame(A, B, b"2")
    bridge.forward(b, [(reply, 0)])
    assert a.got == [reply] and up.got == [first]  # A was learned: no flood
    again = frame(B, A, b"3")
    bridge.forward(a, [(again, 0)])
    assert b.got == [first, again] and up.got == [first]
    assert bridge.stats["forwarded"] == 2 and bridge.stats["flooded"] == 1


class BatchPort(Port):
    """A port that takes runs of frames (as a vif does); it records each call's run."""

    def __init__(self, name: str, mac: bytes | None) -> None:
        super().__init__(name, mac)
        self.runs: list[int] = []

    def deliver_many(self, frames: list[tuple[bytes, int]], source: object) -> None:
        self.runs.append(len(frames))
        self.got.extend(frame for frame, _ in frames)


def test_a_drain_goes_to_each_port_in_runs_and_in_order() -> None:
    """Frames of one drain reach each port in the order they came, consecutive ones for
    a port that takes runs in one call; a flood in between ends the run before it."""
    bridge = Bridge("xenbr0")
    a, b, c = Port("vif1.0", A), BatchPort("vif2.0", B), Port("vif3.0", C)
    for port in (a, b, c):
        bridge.attach(port)
    bridge.forward(b, [(frame(A, B), 0)])
    bridge.forward(c, [(frame(A, C), 0)])  # B and C learned
    for port in (a, b, c):
        port.got.clear()
    b.runs.clear()
    sent = [
        frame(B, A, b"1"),
        frame(B, A, b"2"),
        frame(C, A, b"3"),
        frame(B, A, b"4"),
        frame(BROADCAST, A, b"5"),
        frame(B, A, b"6"),
        frame(B, A, b"7"),
    ]
    bridge.forward(a, [(item, 0) for item in sent])
    assert b.got == [sent[i] for i in (0, 1, 3, 4, 5, 6)]
    assert b.runs == [2, 1, 2]  # the broadcast came through `deliver`, between runs
    assert c.got == [sent[2], sent[4]]


def test_broadcasts_flood_and_nothing_goes_back_where_it_came_from(switch) -> None:  # type: ignore[no-untyped-def]
    bridge, a, b, up = switch
    bridge.forward(a, [(frame(BROADCAST, A), 0)])
    assert a.got == [] and len(b.got) == len(up.got) == 1
    moved = frame(C, A)  # A's address, seen behind the uplink now (C is unknown: flooded)
    bridge.forward(up, [(moved, 0)])
    bridge.forward(b, [(frame(A, B), 0)])
    assert len(up.got) == 2 and a.got == [moved]


def test_a_vif_may_only_send_from_its_own_mac(switch) -> None:  # type: ignore[no-untyped-def]
    bridge, a, b, up = switch
    bridge.forward(a, [(frame(B, C), 0), (frame(B, A), 0), (b"short", 0)])
    assert len(b.got) == 1 and bridge.stats["spoofed"] == 1 and bridge.stats["runts"] == 1
    assert bridge.lookup(C) is None and bridge.lookup(A) is a
    bridge.forward(up, [(frame(B, C), 0)])  # the uplink carries many addresses
    assert bridge.lookup(C) is up


def test_learned_addresses_age_out_and_leave_with_their_port(
    switch, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    bridge, a, b, up = switch
    bridge.forward(b, [(frame(BROADCAST, B), 0)])
    assert bridge.lookup(B) is b
    later = bridge_module.time.monotonic() + AGEING_TIME + 1
    monkeypatch.setattr(bridge_module.time, "monotonic", lambda: later)
    assert bridge.lookup(B) is None
    bridge.forward(a, [(frame(B, A), 0)])
    assert len(up.got) == 2  # flooded again
    bridge.forward(b, [(frame(BROADCAST, B), 0)])
    bridge.detach(b)
    assert bridge.lookup(B) is None and b not in bridge.ports


def test_taps_see_every_frame_that_crosses(switch) -> None:  # type: ignore[no-untyped-def]
    bridge, a, b, _ = switch
    seen: list[bytes] = []
    bridge.taps.append(lambda data, flags: seen.append(data))
    frames = [frame(B, A, b"x"), frame(A, B, b"y"), frame(B, C, b"spoofed")]
    bridge.forward(a, [(frames[0], 0)])
    bridge.forward(b, [(frames[1], 0)])
    bridge.forward(a, [(frames[2], 0)])
    assert seen == frames[:2]


def test_pcap_records_round_trip_and_bad_files_are_named() -> None:
    data = file_header() + record(b"a" * 60, 1.25) + record(b"b" * 70000, 2.5)
    (t1, f1), (t2, f2) = read_records(data)
    assert (t1, f1) == (1.25, b"a" * 60) and t2 == 2.5 and len(f2) == 65535  # cut at snaplen
    reader = PcapReader()
    assert reader.feed(data[:30]) == [] and len(reader.feed(data[30:])) == 2
    with pytest.raises(PcapError, match="is not pcap's"):
        list(read_records(b"\0" * 40))


def test_the_pcap_nic_writes_a_file_tshark_reads(tmp_path: Path) -> None:
    nic = PcapNic(tmp_path / "wire.pcap")
    nic(frame(B, A), 0)
    nic._file.close()
    assert [f for _, f in read_records((tmp_path / "wire.pcap").read_bytes())] == [frame(B, A)]


def test_a_tap_that_cannot_be_made_says_why() -> None:
    with pytest.raises(TapUnavailable, match="tap:an-interface-name-far-too-long"):
        TapNic("an-interface-name-far-too-long")


async def test_capture_clients_get_a_pcap_stream_of_the_bridge(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    topology = parse_topology('[[domain]]\nname = "g"\nmemory = 16\nvif = ["bridge=xenbr1"]\n')
    network = Network.from_topology(topology, tmp_path)
    await nursery.start(network.run)
    assert sorted(network.bridges) == ["xenbr0", "xenbr1"]
    with pytest.raises(LookupError, match="bridge 'xenbr9' does not exist in Dom0"):
        network.bridge("xenbr9")
    bridge, port = network.bridge("xenbr1"), Port("vif1.0", A)
    bridge.attach(port)
    sink = io.BytesIO()

    async def traffic() -> None:
        while True:
            bridge.forward(port, [(frame(BROADCAST, A, b"hello"), 0)])
            await trio.sleep(0.01)

    nursery.start_soon(traffic)
    assert await capture_bridge(RunDir(tmp_path), "xenbr1", sink, count=3) == 3
    frames = [f for _, f in read_records(sink.getvalue())]
    assert frames == [frame(BROADCAST, A, b"hello")] * 3
    with pytest.raises(NoSuchBridge, match="no bridge 'xenbr9'.*bridges: xenbr0, xenbr1"):
        await capture_bridge(RunDir(tmp_path), "xenbr9", sink)
    with trio.fail_after(5):
        while len(bridge.taps) > 0:  # the client went away: its tap goes too
            await trio.sleep(0.01)
