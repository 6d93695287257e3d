"""A memory disk that records every driver call, with switchable capabilities, for testing
what the generic request path hands to drivers. Registered in tests through ``register()``."""

from __future__ import annotations

import errno
from typing import Any, ClassVar

import pytest

from nbdserve.block import ChildSpec, Limits, Opt, Perm, ReqFlags, Role
from nbdserve.block.drivers import DRIVERS
from nbdserve.block.drivers.memory import MemoryDriver
from nbdserve.block.types import Buffer


class RecordingDriver(MemoryDriver):
    name = "recording"
    options: ClassVar[dict[str, Opt]] = {
        **MemoryDriver.options,
        "align": Opt(int, 1),
        "max-transfer": Opt(int, 0),
        "max-zero": Opt(int, 0),
        "native-fua": Opt(bool, True),
        "can-zero": Opt(bool, True),
        "fast-zero": Opt(bool, True),
        "zero-enotsup": Opt(bool, False),
    }

    def __init__(self, node: Any, opts: Any) -> None:
        super().__init__(node, opts)
        self.calls: list[tuple[str, int, int, ReqFlags]] = []
        self.flushes = 0

    async def open(self) -> None:
        await super().open()
        o = self.opts
        self.limits = Limits(
            request_alignment=o["align"], max_transfer=o["max-transfer"], max_zero=o["max-zero"]
        )
        self.supported_write_flags = ReqFlags.FUA if o["native-fua"] else ReqFlags.NONE
        self.supported_zero_flags = ReqFlags.MAY_UNMAP | (
            ReqFlags.NO_FALLBACK if o["fast-zero"] else ReqFlags.NONE
        )
        if o["native-fua"]:
            self.supported_zero_flags |= ReqFlags.FUA
        if not o["can-zero"]:
            self.zero = None  # type: ignore[assignment,method-assign]

    def ops(self, name: str) -> list[tuple[str, int, int, ReqFlags]]:
        return [c for c in self.calls if c[0] == name]

    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        self.calls.append(("read", offset, length, ReqFlags.NONE))
        return super().read_nowait(offset, length)

    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        self.calls.append(("write", offset, len(data), flags))
        return super().write_nowait(offset, data, flags)

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        self.calls.append(("write", offset, len(data), flags))
        await super().write(offset, data, flags)

    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        self.calls.append(("zero", offset, length, flags))
        if self.opts["zero-enotsup"]:
            raise OSError(errno.ENOTSUP, "no")
        await super().zero(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length, ReqFlags.NONE))
        await super().discard(offset, length)

    async def flush(self) -> None:
        self.flushes += 1


def register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DRIVERS, "recording", "tests.block.recording:RecordingDriver")


class PickyDriver(MemoryDriver):
    """Refuses write permission in ``check_perm`` when ``refuse-write`` is set; logs the
    permission protocol."""

    name = "picky"
    options: ClassVar[dict[str, Opt]] = {
        **MemoryDriver.options,
        "refuse-write": Opt(bool, False),
    }
    # An optional child that simply receives this node's permissions.
    children: ClassVar[dict[str, ChildSpec]] = {
        **MemoryDriver.children,
        "file": ChildSpec(Role.FILE, required=False),
    }

    def child_perms(
        self, child: str, role: Role, perm: Perm, shared: Perm
    ) -> tuple[Perm, Perm] | None:
        return (perm, shared) if child == "file" else None

    def __init__(self, node: Any, opts: Any) -> None:
        super().__init__(node, opts)
        self.log: list[str] = []

    def check_perm(self, perm: Perm, shared: Perm) -> None:
        self.log.append(f"check {perm.value}")
        if self.opts["refuse-write"] and perm & Perm.WRITE:
            raise OSError(errno.EBUSY, "image is locked by another process")

    def set_perm(self, perm: Perm, shared: Perm) -> None:
        self.log.append(f"set {perm.value}")

    def abort_perm(self) -> None:
        self.log.append("abort")


def register_picky(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DRIVERS, "picky", "tests.block.recording:PickyDriver")
