"""`python -m xenlike.domain`: the process the hypervisor spawns for each domain."""

import argparse
import contextlib
import importlib
import os

import trio

from xenlike.domain.runtime import boot

parser = argparse.ArgumentParser(prog="python -m xenlike.domain", description=__doc__)
parser.add_argument("--hypercall-fd", type=int, required=True)
parser.add_argument("--memory-fd", type=int, required=True)
parser.add_argument("--nr-pages", type=int, required=True)
parser.add_argument(
    "--frames-fd",
    type=int,
    required=True,
    help="the frame channel: frames with files of their own, both ways",
)
parser.add_argument("--domid", type=int, required=True)
parser.add_argument("--kernel", required=True, help="the kernel entry point, module:function")
parser.add_argument("--trace-fd", type=int, required=True, help="the domain's trace buffer")
parser.add_argument(
    "--hold-fd",
    type=int,
    help="wait for a byte here before running the kernel: the domain is built, not unpaused",
)
args = parser.parse_args()
if args.hold_fd is not None:
    # Load the kernel while held, as a builder loads the image before the first unpause,
    # with what its `preload` loads (its drivers); what fails here fails again, and is
    # reported, in boot.
    with contextlib.suppress(Exception):
        preload = getattr(importlib.import_module(args.kernel.partition(":")[0]), "preload", None)
        if callable(preload):
            preload()
    go = os.read(args.hold_fd, 1)
    os.close(args.hold_fd)
    if not go:  # destroyed before it ever ran
        raise SystemExit(0)
raise SystemExit(
    trio.run(
        lambda: boot(
            hypercall_fd=args.hypercall_fd,
            memory_fd=args.memory_fd,
            nr_pages=args.nr_pages,
            frames_fd=args.frames_fd,
            domid=args.domid,
            kernel=args.kernel,
            trace_fd=args.trace_fd,
        )
    )
)
