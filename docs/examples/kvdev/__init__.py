"""A PV key-value device: the tutorial's driver (docs/writing-a-driver.md)."""

from kvdev.back import KvBackend
from kvdev.front import KvError, KvFrontend
from xenlike.xenbus import Driver

DRIVER = Driver("kv", frontend=KvFrontend, backend=KvBackend)

__all__ = ["DRIVER", "KvBackend", "KvError", "KvFrontend"]
