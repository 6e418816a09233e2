"""xenlike's ring against Xen's own ring.h and blkif.h macros, over one shared page.

A C program (tests/c/ringpeer.c) built on the real headers drives one end
while xenlike drives the other. A second, all-Python ring replays the same
steps beside it: every notify decision and every header index must match,
and every request and response field must arrive intact, both ways round.
"""

import mmap
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from xenlike.abi import blkif
from xenlike.ring import BackRing, FrontRing, define_ring

BLKIF = define_ring("blkif", request=blkif.blkif_request, response=blkif.blkif_response)
SOURCE = Path(__file__).parent / "c" / "ringpeer.c"


@pytest.fixture(scope="module")
def ringpeer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (Debian: apt-get install gcc)")
    if not Path("/usr/include/xen/io/ring.h").exists():
        pytest.skip("Xen's headers are not installed (Debian: apt-get install libxen-dev)")
    exe = tmp_path_factory.mktemp("ringpeer") / "ringpeer"
    subprocess.run(["gcc", "-Wall", "-Werror", "-O2", "-o", str(exe), str(SOURCE)], check=True)
    return exe


class CPeer:
    def __init__(self, exe: Path, shared: Path) -> None:
        self.proc = subprocess.Popen(
            [str(exe), str(shared)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def ask(self, command: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def ask_list(self, command: str) -> tuple[list[list[str]], bool]:
        """Lines up to the closing "more N"."""
        lines = [self.ask(command).split()]
        while lines[-1][0] != "more":
            lines.append(self.proc.stdout.readline().split())  # type: ignore[union-attr]
        return lines[:-1], lines[-1][1] == "1"

    def header(self) -> tuple[int, ...]:
        return tuple(int(x) for x in self.ask("header").split()[1:])

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        assert self.proc.wait(timeout=10) == 0


@pytest.fixture
def shared(tmp_path: Path):
    path = tmp_path / "ring-page"
    path.write_bytes(bytes(4096))
    with path.open("r+b") as f:
        yield path, memoryview(mmap.mmap(f.fileno(), 4096))


def py_header(view: memoryview) -> tuple[int, ...]:
    return struct.unpack_from("<4I", view, 0)


def split(items: list, rng: random.Random) -> list[list]:
    """Cut a batch into one to three consecutive pushes."""
    cuts = (
        sorted(rng.sample(range(1, len(items)), min(2, len(items) - 1))) if len(items) > 1 else []
    )
    return [items[a:b] for a, b in zip([0, *cuts], [*cuts, len(items)])]


def make_request(rid: int, rng: random.Random):
    nseg = rng.randint(0, blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST)
    seg = BLKIF.request.record().seg[0]
    return BLKIF.request.record(
        operation=rng.choice([blkif.BLKIF_OP_READ, blkif.BLKIF_OP_WRITE]),
        nr_segments=nseg,
        handle=51712,
        id=rid,
        sector_number=rng.randrange(2**40),
        seg=[
            seg._replace(gref=rng.randrange(2**32), first_sect=i % 8, last_sect=7)
            for i in range(nseg)
        ],
    )


def test_c_front_end_with_xenlike_back_end(ringpeer: Path, shared) -> None:
    path, view = shared
    rng = random.Random(1)
    c = CPeer(ringpeer, path)
    shadow_mem = memoryview(bytearray(4096))
    shadow_front, shadow_back = FrontRing(BLKIF, shadow_mem), BackRing(BLKIF, shadow_mem)
    assert c.ask("front-init") == "ok 32"
    back = BackRing(BLKIF, view)
    next_id = 2**63
    for _ in range(60):  # ~15 laps of the 32-slot ring
        batch = [make_request(next_id + i, rng) for i in range(rng.randint(1, 32))]
        next_id += len(batch)
        for group in split(batch, rng):  # several pushes before the back end runs
            for r in group:
                grefs = " ".join(str(s.gref) for s in r.seg[: r.nr_segments])
                assert (
                    c.ask(f"put {r.id} {r.operation} {r.nr_segments} {r.sector_number} {grefs}")
                    == "ok"
                )
            shadow_front.put_requests(group)
            expected_notify = shadow_front.push_requests()
            assert c.ask("push-requests") == f"notify {int(expected_notify)}"
            assert c.header() == py_header(shadow_mem)

        got = back.get_requests()
        assert back.final_check_for_requests() is False
        shadow_back.get_requests()
        shadow_back.final_check_for_requests()
        assert [(r.id, r.operation, r.nr_segments, r.sector_number, r.handle) for r in got] == [
            (r.id, r.operation, r.nr_segments, r.sector_number, 51712) for r in batch
        ]
        for g, r in zip(got, batch):
            assert g.seg[: g.nr_segments] == tuple(r.seg[: r.nr_segments])
        assert py_header(view) == py_header(shadow_mem)

        rng.shuffle(got)
        responses = [
            BLKIF.response.record(id=r.id, operation=r.operation, status=rng.choice([0, -1, -2]))
            for r in got
        ]
        for group in split(responses, rng):
            back.put_responses(group)
            shadow_back.put_responses(group)
            assert back.push_responses() == shadow_back.push_responses()
        lines, more = c.ask_list("take-responses")
        assert not more
        assert lines == [["rsp", str(r.id), str(r.operation), str(r.status)] for r in responses]
        shadow_front.get_responses()
        shadow_front.final_check_for_responses()
        assert py_header(view) == py_header(shadow_mem)
    c.close()


def test_xenlike_front_end_with_c_back_end(ringpeer: Path, shared) -> None:
    path, view = shared
    rng = random.Random(2)
    front = FrontRing(BLKIF, view)
    c = CPeer(ringpeer, path)
    assert c.ask("back-init") == "ok 32"
    shadow_mem = memoryview(bytearray(4096))
    shadow_front, shadow_back = FrontRing(BLKIF, shadow_mem), BackRing(BLKIF, shadow_mem)
    next_id = 1
    for _ in range(60):
        batch = [make_request(next_id + i, rng) for i in range(rng.randint(1, 32))]
        next_id += len(batch)
        for group in split(batch, rng):
            front.put_requests(group)
            shadow_front.put_requests(group)
            assert front.push_requests() == shadow_front.push_requests()
        lines, more = c.ask_list("take-requests")
        assert not more
        for line, r in zip(lines, batch, strict=True):
            segs = [f"{s.gref}:{s.first_sect}:{s.last_sect}" for s in r.seg[: r.nr_segments]]
            assert line == [
                "req",
                str(r.id),
                str(r.operation),
                str(r.nr_segments),
                "51712",
                str(r.sector_number),
                *segs,
            ]
        shadow_back.get_requests()
        shadow_back.final_check_for_requests()
        assert c.header() == py_header(shadow_mem)

        order = list(batch)
        rng.shuffle(order)
        for group in split(order, rng):
            for r in group:
                status = rng.choice([0, -1, -2])
                assert c.ask(f"respond {r.id} {r.operation} {status}") == "ok"
                shadow_back.put_response(
                    BLKIF.response.record(id=r.id, operation=r.operation, status=status)
                )
            assert c.ask("push-responses") == f"notify {int(shadow_back.push_responses())}"
            assert c.header() == py_header(shadow_mem)
        got = front.get_responses()
        assert front.final_check_for_responses() is False
        expected = shadow_front.get_responses()
        shadow_front.final_check_for_responses()
        assert got == expected and sorted(r.id for r in got) == [r.id for r in batch]
        assert py_header(view) == py_header(shadow_mem)
    c.close()
