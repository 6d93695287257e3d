"""Small shared types of the server layer."""

from __future__ import annotations

#: Anything sendmsg takes; READ data is passed through as the block layer returned it.
Buffer = bytes | bytearray | memoryview


class FileRange:
    """Bytes of a file that a reply carries as they are, sent with ``os.sendfile`` (only a
    connection thread sends these; see datapath.py). The descriptor is the node's own: it
    stays open because a node outlives every request made of it."""

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length


#: What a list of replies holds.
Outgoing = Buffer | FileRange
