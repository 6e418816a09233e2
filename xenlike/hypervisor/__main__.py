"""`python -m xenlike.hypervisor --run-dir DIR`: a hypervisor on its own.

Dom0 tools then reach it through DIR/hypervisor.sock. With --dom0-kernel it
also boots Dom0 running that kernel.
"""

import argparse
from pathlib import Path

import trio

from xenlike.hypervisor import Hypervisor

parser = argparse.ArgumentParser(prog="python -m xenlike.hypervisor", description=__doc__)
parser.add_argument("--run-dir", type=Path, required=True)
parser.add_argument("--dom0-kernel", help="Dom0's kernel, module:function")
parser.add_argument("--dom0-memory", type=int, default=64, help="MiB (default 64)")
args = parser.parse_args()


async def main() -> None:
    hv = Hypervisor(args.run_dir, dom0_memory_mb=args.dom0_memory)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: hv.serve(dom0_kernel=args.dom0_kernel,
                                                         task_status=task_status))
        print(f"hypervisor listening on {hv.control_path}", flush=True)


try:
    trio.run(main)
except KeyboardInterrupt:
    pass
