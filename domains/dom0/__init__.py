"""The Dom0 kernel: xenstored, xenconsoled, the toolstack, the back ends, the hardware.

What the hypervisor runs as domain 0 under `xenlike up` (its command line
names the run directory). Dom0 is the only domain that may open the
emulated hardware, and the only one that drives back ends.
"""

from domains.dom0.kernel import main

__all__ = ["main"]
