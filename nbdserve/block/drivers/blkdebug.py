"""``blkdebug``: a filter that injects errors and latency, for testing error paths.

Child: ``image`` (the node being wrapped). Options:

``align``, ``max-transfer``
    Override the node's request alignment and maximum transfer (0 = the child's), so the
    generic layer pads, read-modify-writes and splits above an unaligned-capable child.
    Every callback also *asserts* what the generic layer guarantees (alignment, size).
``inject-error``
    A list of rules; each a dict with
    ``errno`` (number or name, default ``EIO``), ``iotype`` (one name or a list of
    ``read``, ``write``, ``zero``, ``discard``, ``flush``, ``block-status``; default all but
    ``block-status``), ``offset`` and ``length`` (the rule fires for requests overlapping
    ``offset..offset+length``; default: any offset; length defaults to 1), ``once``
    (fire once, then retire; default off) and ``after`` (let this many matching requests
    through first; default 0).
``inject-delay``
    A list of rules with ``iotype``, ``offset``, ``length`` as above, and ``ms`` (default 0):
    matching requests sleep that long before running.

Dotted form: ``driver=blkdebug,image=disk0,inject-error.0.errno=ENOSPC,``
``inject-error.0.iotype=write,inject-error.0.offset=1M,inject-error.0.once=on``
(``iotype.0=read,iotype.1=write`` for several types).
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from ..driver import ChildSpec, Driver, Opt
from ..errors import GraphError
from ..options import parse_bool, parse_size
from ..types import Buffer, Extent, ReqFlags, Role

if TYPE_CHECKING:
    from ..io import Child

__all__ = ["BlkdebugDriver"]

IOTYPES = ("read", "write", "zero", "discard", "flush", "block-status")
_DEFAULT_IOTYPES = frozenset(IOTYPES) - {"block-status"}


@dataclass(slots=True)
class _Rule:
    iotypes: frozenset[str]
    start: int | None
    end: int
    errno: int = _errno.EIO
    once: bool = False
    after: int = 0
    delay: float = 0.0
    seen: int = 0
    spent: bool = False

    def matches(self, op: str, offset: int, length: int) -> bool:
        if self.spent or op not in self.iotypes:
            return False
        if self.start is None or op == "flush":
            return True
        return offset < self.end and self.start < offset + max(length, 1)


class BlkdebugDriver(Driver):
    name = "blkdebug"
    is_filter = True
    options: ClassVar[dict[str, Opt]] = {
        "align": Opt("size", 0, "request alignment (0 = the child's)"),
        "max-transfer": Opt("size", 0, "largest request passed down (0 = the child's)"),
        "inject-error": Opt(list, [], "error rules (see the module docstring)"),
        "inject-delay": Opt(list, [], "latency rules (see the module docstring)"),
    }
    children: ClassVar[dict[str, ChildSpec]] = {"image": ChildSpec(Role.FILTERED)}

    def __init__(self, node: Any, opts: Any) -> None:
        super().__init__(node, opts)
        name = node.name
        self.errors = [
            _parse_rule(name, "inject-error", i, r) for i, r in enumerate(opts["inject-error"])
        ]
        self.delays = [
            _parse_rule(name, "inject-delay", i, r) for i, r in enumerate(opts["inject-delay"])
        ]
        for key in ("align", "max-transfer"):
            value = opts[key]
            if key == "align" and value & (value - 1):
                raise GraphError.at(name, key, f"{value} is not a power of two")
        self._rules_for: dict[str, bool] = {}

    @property
    def image(self) -> Child:
        return self.node.children["image"]

    async def open(self) -> None:
        child = self.image.node
        lim = child.limits
        align = max(self.opts["align"] or 1, lim.request_alignment)
        max_xfer = self.opts["max-transfer"] or lim.max_transfer
        if max_xfer and max_xfer % align:
            raise GraphError.at(
                self.node.name,
                "max-transfer",
                f"{max_xfer} is not a multiple of the alignment {align}",
            )
        self.limits = replace(lim, request_alignment=align, max_transfer=max_xfer)
        self._align = align
        self._max_xfer = max_xfer
        self.supported_write_flags = ReqFlags.FUA | ReqFlags.WRITE_UNCHANGED
        self.supported_zero_flags = (
            ReqFlags.FUA
            | ReqFlags.MAY_UNMAP
            | (ReqFlags.NO_FALLBACK if child.can_fast_zero() else ReqFlags.NONE)
        )
        self._rules_for = {
            op: any(op in r.iotypes for r in self.errors + self.delays) for op in IOTYPES
        }

    def length(self) -> int:
        return int(self.image.size)

    # -- rule engine ----------------------------------------------------------------------
    def add_error(self, **rule: Any) -> None:
        """Add an inject-error rule at run time (same keys as the option)."""
        self.errors.append(_parse_rule(self.node.name, "inject-error", len(self.errors), rule))
        self._rules_for = {
            op: any(op in r.iotypes for r in self.errors + self.delays) for op in IOTYPES
        }

    def _check(self, op: str, offset: int, length: int) -> None:
        for rule in self.errors:
            if rule.matches(op, offset, length):
                rule.seen += 1
                if rule.seen <= rule.after:
                    continue
                if rule.once:
                    rule.spent = True
                name = _errno.errorcode.get(rule.errno, str(rule.errno))
                raise OSError(
                    rule.errno,
                    f"blkdebug '{self.node.name}': injected {name} on {op} at {offset}+{length}",
                )

    async def _enter(self, op: str, offset: int, length: int) -> None:
        if op != "flush" and op != "block-status":
            self._assert_aligned(op, offset, length)
        for rule in self.delays:
            if rule.matches(op, offset, length):
                await trio.sleep(rule.delay)  # ms=0 still yields: requests interleave
        self._check(op, offset, length)

    def _assert_aligned(self, op: str, offset: int, length: int) -> None:
        align = self._align
        size = self.image.size
        end_limit = (size + align - 1) // align * align
        if offset % align or length % align or offset + length > end_limit or length <= 0:
            raise AssertionError(
                f"blkdebug '{self.node.name}': generic layer passed unaligned {op} "
                f"{offset}+{length} (alignment {align}, size {size})"
            )
        if self._max_xfer and op in ("read", "write") and length > self._max_xfer:
            raise AssertionError(
                f"blkdebug '{self.node.name}': {op} of {length} exceeds max-transfer "
                f"{self._max_xfer}"
            )

    # -- callbacks ------------------------------------------------------------------------
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        if self._rules_for["read"]:
            return None
        self._assert_aligned("read", offset, length)
        return self._read_child_nowait(offset, length)

    def _read_child_nowait(self, offset: int, length: int) -> Buffer | None:
        n = min(length, self.image.size - offset)
        data: Buffer | None = self.image.read_nowait(offset, n)
        if data is None or n == length:
            return data
        return bytes(data) + bytes(length - n)

    async def read(self, offset: int, length: int) -> Buffer:
        await self._enter("read", offset, length)
        n = min(length, self.image.size - offset)
        data = await self.image.read(offset, n)
        return data if n == length else bytes(data) + bytes(length - n)

    # The generic layer pads to ``align``; when the image ends inside the last block, the
    # part past its end is padding and is not passed on.

    def _clamp(self, offset: int, length: int) -> int:
        return min(length, self.image.size - offset)

    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags) -> bool:
        if self._rules_for["write"]:
            return False
        self._assert_aligned("write", offset, len(data))
        n = self._clamp(offset, len(data))
        return bool(self.image.write_nowait(offset, memoryview(data)[:n], flags))

    async def write(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        await self._enter("write", offset, len(data))
        n = self._clamp(offset, len(data))
        await self.image.write(offset, memoryview(data)[:n], flags)

    async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        await self._enter("zero", offset, length)
        await self.image.zero(offset, self._clamp(offset, length), flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._enter("discard", offset, length)
        await self.image.discard(offset, self._clamp(offset, length))

    async def flush(self) -> None:
        # The generic layer flushes the child afterwards (this edge holds write permission).
        await self._enter("flush", 0, 0)

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._enter("block-status", offset, length)
        # The query is rounded up to ``align``; the image may end inside the last block.
        length = min(length, self.image.size - offset)
        result: Extent = await self.image.block_status_one(offset, length)
        return result


def _parse_rule(node: str, key: str, index: int, raw: Any) -> _Rule:
    where = f"{key}.{index}"
    if not isinstance(raw, dict):
        raise GraphError.at(node, where, f"expected a dict of rule options, got {raw!r}")
    rule = dict(raw)
    try:
        field = "iotype"
        iotypes = rule.pop("iotype", None)
        if iotypes is None:
            ops = _DEFAULT_IOTYPES
        else:
            names = [iotypes] if isinstance(iotypes, str) else list(iotypes)
            bad = [n for n in names if n not in IOTYPES]
            if bad or not names:
                raise ValueError(f"expected {', '.join(IOTYPES)}; got {iotypes!r}")
            ops = frozenset(names)
        field = "offset"
        offset = rule.pop("offset", None)
        start = None if offset in (None, -1, "-1") else parse_size(offset)
        field = "length"
        length = parse_size(rule.pop("length", 1))
        if length <= 0:
            raise ValueError("must be positive")
        result = _Rule(ops, start, (start or 0) + length)
        if key == "inject-error":
            field = "errno"
            result.errno = _parse_errno(rule.pop("errno", _errno.EIO))
            field = "once"
            result.once = parse_bool(rule.pop("once", False))
            field = "after"
            after = rule.pop("after", 0)
            result.after = int(after)
            if result.after < 0:
                raise ValueError("must not be negative")
        else:
            field = "ms"
            result.delay = float(rule.pop("ms", 0)) / 1000
            if result.delay < 0:
                raise ValueError("must not be negative")
        if rule:
            field = next(iter(rule))
            raise ValueError("unknown rule option")
    except (ValueError, TypeError) as exc:
        raise GraphError.at(node, f"{where}.{field}", str(exc)) from None
    return result


def _parse_errno(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        if value.isdigit() and int(value) > 0:
            return int(value)
        code = getattr(_errno, value.upper(), None)
        if isinstance(code, int):
            return code
    raise ValueError(f"expected an errno number or name such as EIO, got {value!r}")
