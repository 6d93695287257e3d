"""Small shared types of the server layer."""

from __future__ import annotations

#: Anything sendmsg takes; READ data is passed through as the block layer returned it.
Buffer = bytes | bytearray | memoryview
