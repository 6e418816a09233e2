"""xenlike: a Xen-style paravirtualization framework in Python.

Domains are processes under a hypervisor process; they talk through
shared-memory rings in granted pages, event channels and the XenStore, with
Xen's own layouts, numbers and names.
"""

from importlib.metadata import version as _version

__version__ = _version("xenlike")

__all__ = ["__version__"]
