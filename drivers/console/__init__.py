"""The PV console: the xencons_interface page between a guest and xenconsoled.

The primary console is not a XenBus device: its page and event channel come
with the domain (start_info.console.domU, grant ref GNTTAB_RESERVED_CONSOLE),
and xenconsoled in Dom0 finds them under /local/domain/<id>/console.
"""

from drivers.console.back import ConsoleBack
from drivers.console.front import ConsoleFront, ConsoleWriter

__all__ = ["ConsoleBack", "ConsoleFront", "ConsoleWriter"]
