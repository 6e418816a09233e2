"""The DomU kernel: boot, XenStore over the ring, front ends, then the guest program.

What `kernel = "domains.guest:main"` runs in every guest (the default):

1. the PV console on the page and port start_info names; `print` goes there;
2. XenStore over the guest's ring page and store event channel;
3. probing `device/*` and starting the front end of every known type, and the
   balloon driver (`xenlike.domain.balloon`), which follows `memory/target`;
4. the guest program named by `init=package.module:function` on the kernel
   command line, called with a `Guest`; meanwhile `control/shutdown` is
   watched, as Linux's xenbus does, for the toolstack's poweroff or reboot.

The program's return powers the domain off; an exception prints its
traceback on the console and crashes the domain (on_crash then applies).
"""

from domains.guest.kernel import main
from domains.guest.system import Guest

__all__ = ["Guest", "main"]
