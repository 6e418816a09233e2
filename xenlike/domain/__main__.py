"""`python -m xenlike.domain`: the process the hypervisor spawns for each domain."""

import argparse

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
args = parser.parse_args()
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
