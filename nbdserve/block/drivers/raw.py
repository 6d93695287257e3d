"""``raw``: the image is the bytes of its ``file`` child, optionally a window of it.

Options: ``offset`` (default 0) and ``size`` (default: the rest of the file, following it if
the file is resized). Requests are shifted by ``offset``; block status is the file's, with
``map_offset`` pointing into the file. Resizing is refused when ``size`` is fixed.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar

from ..driver import ChildSpec, Driver, Opt
from ..errors import GraphError
from ..io import Child
from ..types import Buffer, Extent, Perm, ReqFlags, Role, Status

__all__ = ["RawDriver"]

_LAYER = Status.DATA | Status.ZERO | Status.OFFSET_VALID


class RawDriver(Driver):
    name = "raw"
    options: ClassVar[dict[str, Opt]] = {
        "offset": Opt("size", 0, "where the image starts in the file"),
        "size": Opt("size", None, "image size (default: to the end of the file)"),
    }
    children: ClassVar[dict[str, ChildSpec]] = {"file": ChildSpec(Role.FILE)}

    def __init__(self, node: Any, opts: Any) -> None:
        super().__init__(node, opts)
        self._offset: int = opts["offset"]
        self._fixed_size: int | None = opts["size"]

    def child_perms(self, child: str, role: Role, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
        # Only data lives in the file, so (unlike a format with metadata) raw takes write
        # only for writers and lets others write around its window; it keeps the file's
        # size from changing under a fixed window.
        use = Perm.CONSISTENT_READ | (perm & (Perm.WRITE | Perm.RESIZE | Perm.WRITE_UNCHANGED))
        return use, shared & ~Perm.RESIZE if self._fixed_size is not None else shared

    async def open(self) -> None:
        file = self.file
        flen = file.size
        if self._offset > flen:
            raise GraphError.at(
                self.node.name, "offset", f"{self._offset} is past the end of the file ({flen})"
            )
        if self._fixed_size is not None and self._offset + self._fixed_size > flen:
            raise GraphError.at(
                self.node.name,
                "size",
                f"offset {self._offset} + size {self._fixed_size} exceeds the file ({flen})",
            )
        child = file.node
        self.limits = child.limits
        self.supported_write_flags = ReqFlags.WRITE_UNCHANGED | (
            ReqFlags.FUA if child.native_fua() else ReqFlags.NONE
        )
        self.supported_zero_flags = ReqFlags.MAY_UNMAP | (
            ReqFlags.NO_FALLBACK if child.can_fast_zero() else ReqFlags.NONE
        )

    def length(self) -> int:
        if self._fixed_size is not None:
            return self._fixed_size
        return max(0, self.file.size - self._offset)

    def same_offsets(self) -> Child | None:
        return self.file if self._offset == 0 else None

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        return self.file.read_nowait(self._offset + offset, length)

    async def read(self, offset: int, length: int) -> Buffer:
        return await self.file.read(self._offset + offset, length)

    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        return self.file.write_nowait(self._offset + offset, data, flags)

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        await self.file.write(self._offset + offset, data, flags)

    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self.file.zero(self._offset + offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self.file.discard(self._offset + offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.file.cache(self._offset + offset, length)

    async def block_status(self, offset: int, length: int) -> Extent:
        length = min(length, self.length() - offset)  # the query may be rounded up
        ext = await self.file.block_status_one(self._offset + offset, length)
        return Extent(ext.length, ext.status & _LAYER, ext.map_offset, ext.file)

    async def truncate(self, length: int) -> None:
        if self._fixed_size is not None:
            raise OSError(errno.ENOTSUP, f"node '{self.node.name}' has a fixed size")
        await self.file.truncate(self._offset + length)
