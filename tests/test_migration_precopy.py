"""Why live pre-copy reads a running domain's frames through the hypervisor.

Log-dirty here compares a frame with a reference copy (xenlike/hypervisor/
logdirty.py). A frame Dom0 reads through a mapping of the running domain, with
the reference left as it was, is found dirty later only if its content then
differs from the reference: a frame written, read, and written back to its old
bytes (a lock word taken and released, a counter reset) is not, and the
destination would keep what was read. `XENLIKE_DOMCTL_read_frames` makes what
Dom0 read the reference (note_read), so any later change is found.
"""

from xenlike.hypervisor.logdirty import DirtyLog, bitmap_frames
from xenlike.memory import XEN_PAGE_SIZE

PAGE = XEN_PAGE_SIZE


def test_a_frame_read_through_a_mapping_and_written_back_is_not_found_dirty() -> None:
    memory = bytearray(4 * PAGE)  # frame 1 holds a lock word, free (0)
    log = DirtyLog.start(memory)
    memory[PAGE] = 1  # taken
    sent = bytes(memory[PAGE : 2 * PAGE])  # pre-copy reads it through a mapping: taken
    memory[PAGE] = 0  # released: back to what the reference holds
    log.scan(memory)
    assert bitmap_frames(log.bitmap(4)) == []  # not resent: the destination keeps "taken"
    assert sent != memory[PAGE : 2 * PAGE]


def test_a_frame_read_through_the_hypervisor_and_written_back_is_found_dirty() -> None:
    memory = bytearray(4 * PAGE)
    log = DirtyLog.start(memory)
    memory[PAGE] = 1
    log.note_read(1, bytes(memory[PAGE : 2 * PAGE]))  # read_frames: what Dom0 has
    log.clean()  # the round's CLEAN, before the frame is released
    memory[PAGE] = 0
    log.scan(memory)
    assert bitmap_frames(log.bitmap(4)) == [1]  # resent with its last content
