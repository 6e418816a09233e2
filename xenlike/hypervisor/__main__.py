"""`python -m xenlike.hypervisor --run-dir DIR`: a hypervisor on its own.

It holds the run directory's lock while it runs, writes its pid there, and
on SIGTERM or SIGINT tears every domain down before it exits. Dom0 tools
reach it through DIR/hypervisor.sock; with --dom0-kernel it also boots Dom0.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import trio

from xenlike.hypervisor import Hypervisor
from xenlike.rundir import RunDir, RunDirBusy
from xenlike.sandbox import set_not_dumpable

parser = argparse.ArgumentParser(prog="python -m xenlike.hypervisor", description=__doc__)
parser.add_argument("--run-dir", type=Path, required=True)
parser.add_argument("--dom0-kernel", help="Dom0's kernel, module:function")
parser.add_argument("--dom0-cmdline", default="", help="Dom0's kernel command line")
parser.add_argument("--dom0-memory", type=int, default=64, help="MiB (default 64)")
parser.add_argument(
    "--host-memory", type=int, default=1024, help="MiB in the host's memory pool (default 1024)"
)
args = parser.parse_args()


async def main(run_dir: RunDir) -> None:
    hv = Hypervisor(run_dir.path, dom0_memory_mb=args.dom0_memory, host_memory_mb=args.host_memory)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                await hv.serve(
                    dom0_kernel=args.dom0_kernel,
                    dom0_cmdline=args.dom0_cmdline,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # it stopped on its own: Dom0 has exited

            await nursery.start(serve)
            print(f"hypervisor listening on {hv.control_path}", flush=True)
            async for signum in signals:
                hv.log(None, f"{signal.Signals(signum).name}: shutting down")
                nursery.cancel_scope.cancel()
                break


set_not_dumpable()  # no guest reads this process's /proc: its fds are every domain's memory
run_dir = RunDir(args.run_dir)
try:
    lock = run_dir.acquire()
except RunDirBusy as exc:
    print(f"xenlike hypervisor: {exc}", file=sys.stderr)
    raise SystemExit(1) from None
run_dir.pid_file.write_text(f"{os.getpid()}\n")
try:
    trio.run(main, run_dir)
finally:
    run_dir.pid_file.unlink(missing_ok=True)
    os.close(lock)
