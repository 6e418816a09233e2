"""Log-dirty of a guest in a running topology: the frames its program writes and the
frames blkback fills for a block read (a back end writing through a grant) are
all reported, and the block read's data is what Dom0 reads back from them."""

import hashlib
import os
from pathlib import Path

import trio

from xenlike.hypervisor.logdirty import bitmap_frames
from xenlike.testing import RunningTopology, wait_for
from xenlike.xc import XenControl

WRITER = """
[dom0]
images = { "writer.img" = "4M" }

[[domain]]
name = "writer"
memory = 16
init = "tests.programs:page_writer"
disk = ["format=raw, vdev=xvda, access=rw, target=writer.img"]
"""
SECTOR = 64


def test_the_guests_writes_and_blkbacks_are_logged(tmp_path: Path) -> None:
    with RunningTopology(WRITER, tmp_path) as topo:
        domid = topo.domid("writer")
        base = f"/local/domain/{domid}/data/logdirty"
        wait_for(lambda: topo.xenstore("read", f"{base}/done") == "ready", 30, "the writer")
        block = os.urandom(4096)  # on the disk only: no frame of the guest holds it yet
        with (topo.run_dir / "writer.img").open("r+b") as image:
            image.seek(SECTOR * 512)
            image.write(block)

        def ask(ident: int, request: str) -> str:
            topo.xenstore("write", f"{base}/request", f"{ident} {request}")
            done = wait_for(
                lambda: (
                    (answer := topo.xenstore("read", f"{base}/done")).startswith(f"{ident} ")
                    and answer
                ),
                30,
                f"the writer to answer {request!r}",
            )
            return done.split(" ", 1)[1]

        async def run() -> None:
            async with XenControl.connect(topo.run_dir) as xc:
                await xc.logdirty_enable(domid)
                await xc.logdirty_clean(domid)
                answer = await trio.to_thread.run_sync(ask, 1, "write 3")
                written = {int(gfn) for gfn in answer.split()}
                assert len(written) == 3
                assert written <= set(bitmap_frames(await xc.logdirty_clean(domid)))
                digest = await trio.to_thread.run_sync(ask, 2, f"read {SECTOR}")
                assert digest == hashlib.sha256(block).hexdigest()
                dirty = bitmap_frames(await xc.logdirty_clean(domid))
                pages = []
                for pfn in dirty:
                    pages += (await xc.read_frames(domid, pfn, 1)).values()
                assert block in pages, f"{len(dirty)} dirty frames, none holds the block read"

        trio.run(run)
        topo.xenlike("destroy", "writer")
        log = (topo.run_dir / "hypervisor.log").read_text()
        assert f"(d{domid}) log-dirty off" in log
