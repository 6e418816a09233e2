"""Xen's save format, sans I/O: xl's save file around libxl's and libxc's streams.

A save file is three layers, each Xen's own and byte for byte (docs/save-format.md):

- `xl_format`: xl's header, with the domain's config as optional data;
- `libxl_stream`: libxl's stream v2 ("LibxlFmt"): LIBXC_CONTEXT, XenStore, END;
- `libxc_stream`: libxc's stream v3 ("XENF"): memory, shared info, vCPUs.

`write_save_file(image)` yields the bytes; `read_save_file(data)` checks every
layer and gives the image back, or raises `StreamError` with one line saying
what is wrong and where; `scan_save_file(fd)` checks an open file the same way
reading no page, and says where its pages lie (a restore copies them from there).
Beside that pread, nothing here touches a file, a socket or a domain: `xenlike
save` and `migrate` bring the bytes to and from those.
"""

from xenlike.migration._record import StreamError
from xenlike.migration.image import DomainImage
from xenlike.migration.xl_format import read as read_save_file
from xenlike.migration.xl_format import scan as scan_save_file
from xenlike.migration.xl_format import write as write_save_file

__all__ = ["DomainImage", "StreamError", "read_save_file", "scan_save_file", "write_save_file"]
