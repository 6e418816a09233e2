"""Domain kernels: Dom0 (xenstored, back ends, hardware) and the DomU guest."""
