"""The generic request path: every request from a user or a parent passes through a
:class:`Child` edge, which checks it and turns it into what the driver can take.

It checks bounds and permissions; pads unaligned reads; does read-modify-write for
unaligned writes (serialised against overlapping writes, see ``tracking.py``); splits at
``max_transfer``; applies the request flags (FUA natively or by a flush; MAY_UNMAP only under
``discard=unmap``; NO_FALLBACK refused before touching the driver; WRITE_UNCHANGED);
falls back to writing zero buffers when a driver can't zero; applies the discard and
detect-zeroes policies; de-duplicates flushes; counts statistics.

The common case -- an aligned, in-bounds request without flags -- is a few attribute checks
and one driver call: no allocation, no await, no logging.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from .types import Buffer, Extent, Limits, Perm, ReqFlags, Role
from .zeros import is_zero

_T = TypeVar("_T")

if TYPE_CHECKING:
    from .node import Caps, Node

__all__ = ["Child", "Unlocker"]

_ENOTSUP = {errno.ENOTSUP, errno.EOPNOTSUPP}
_NO_FLAGS = ReqFlags.NONE
#: Largest zero buffer written when a driver cannot zero by itself.
ZERO_CHUNK = 1 << 20
#: Copy-on-read copies backing data up in pieces of at least this size (cf. a qcow2 cluster).
COPY_ON_READ_GRANULE = 1 << 16
_WRITE_PERMS = Perm.WRITE | Perm.WRITE_UNCHANGED
_STATUS_RESULT_LIMIT = 1 << 20


class Unlocker(Protocol):
    """What a caller on a connection thread lends :meth:`Child.read_unlocked` and
    :meth:`Child.write_unlocked`: entering lets the graph lock go (other connections and
    trio run meanwhile), leaving takes it back; ``run_soon`` runs a function on the trio
    thread (trio objects live there)."""

    def __enter__(self) -> None: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def run_soon(self, fn: Callable[[], object]) -> None: ...


def _range_error(node: Node, offset: int, length: int) -> OSError:
    return OSError(
        errno.EINVAL,
        f"request at {offset} of {length} bytes is outside node '{node.name}' (size {node._size})",
    )


def _whole_aligned_read(node: Node, offset: int, length: int) -> bool:
    """What a driver's fast read path may be asked: aligned, within the node, no larger
    than a transfer (and no read at all on a copy-on-read node)."""
    return (
        offset >= 0
        and 0 < length <= node._read_max
        and offset + length <= node._size
        and not (offset | length) & node._align_mask
    )


def _counted_read(node: Node, length: int, fn: Callable[..., _T], *args: object) -> _T:
    """Call a driver's read callback: errors and completed reads go into the node's stats."""
    try:
        result = fn(*args)
    except OSError as exc:
        node.stats.error(exc)
        raise
    if result is not None:
        st = node.stats
        st.read_ops += 1
        st.read_bytes += length
    return result


def _check_range(node: Node, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > node._size:
        raise _range_error(node, offset, length)


def _pad(buf: Buffer, length: int) -> Buffer:
    """A driver read of the last block may stop at the end of the node: zero-fill the rest."""
    if len(buf) >= length:
        return buf
    out = bytearray(length)
    out[: len(buf)] = buf
    return out


class Child:
    """An edge from a parent (a node, or a user such as an export) to ``node``.

    Holds the permissions its parent uses (``perm``) and lets others use (``shared``);
    every request goes through one, so the request path below runs here.
    """

    __slots__ = (
        "_caps",
        "_req_perm",
        "_req_shared",
        "_writable",
        "name",
        "node",
        "parent",
        "perm",
        "role",
        "shared",
        "user",
    )

    def __init__(
        self,
        node: Node,
        *,
        parent: Node | None = None,
        name: str = "root",
        role: Role = Role.PRIMARY,
        perm: Perm = Perm.NONE,
        shared: Perm = Perm.ALL,
        user: str | None = None,
    ) -> None:
        self.node = node
        self.parent = parent
        self.name = name
        self.role = role
        #: What a root edge asked for; a node's edges are recomputed from its users.
        self._req_perm = perm
        self._req_shared = shared
        self.perm = Perm.NONE
        self.shared = Perm.ALL
        self._writable = False
        self._caps: Caps | None = None
        if user is None:
            user = f"node '{parent.name}' (child '{name}')" if parent is not None else name
        self.user = user

    def __repr__(self) -> str:
        return f"<Child {self.user} -> {self.node.name!r} perm={self.perm!r}>"

    def _set_perm(self, perm: Perm, shared: Perm) -> None:
        self.perm = perm
        self.shared = shared
        self._writable = bool(perm & Perm.WRITE) and not self.node.read_only
        self._caps = None

    # -- properties -----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.node._size

    @property
    def limits(self) -> Limits:
        return self.node.limits

    @property
    def caps(self) -> Caps:
        if self._caps is None:
            self._caps = self.node.caps_for(self.perm)
        return self._caps

    def detach(self) -> None:
        """Remove this edge from the graph, releasing its permissions."""
        self.node.graph._detach(self)

    # -- read -----------------------------------------------------------------------------
    def read_nowait(self, offset: int, length: int) -> Buffer | None:
        """Read without blocking, or return None: then ``await read()``."""
        node = self.node
        if (
            offset >= 0
            and 0 < length <= node._read_max
            and offset + length <= node._size
            and not (offset | length) & node._align_mask
        ):
            rd = node._drv_read_nowait
            if rd is None:
                return None
            # _whole_aligned_read and _counted_read, inline: one call less per small read.
            try:
                buf = rd(offset, length)
            except OSError as exc:
                node.stats.error(exc)
                raise
            if buf is not None:
                st = node.stats
                st.read_ops += 1
                st.read_bytes += length
            return buf
        return self._read_nowait_padded(offset, length)

    def read_unlocked(self, offset: int, length: int, unlock: Unlocker) -> Buffer | None:
        """:meth:`read_nowait` for a caller on a connection thread, holding the graph lock,
        with a large read: the copy out of the page cache runs with the lock let go, so
        that several connections' copies overlap. Only a chain of generic edges down to a
        driver with ``read_unlocked`` takes this path; anything else returns None: then
        ``read_nowait`` or ``read``."""
        node = self.node
        rd = node._drv_read_unlocked
        if rd is None or not _whole_aligned_read(node, offset, length):
            return None
        return _counted_read(node, length, rd, offset, length, unlock)

    def read_splice(self, offset: int, length: int) -> tuple[int, int] | None:
        """Where an aligned read's bytes lie, for a caller that sends them with
        ``sendfile``: a file descriptor and an offset in it. Only a chain of generic edges
        down to a driver with ``read_splice`` (a file in memory) answers; anything else
        returns None: then ``read_nowait`` or ``read``. The bytes are taken only as they
        are sent, and from a file in memory the socket may hold the file's pages themselves
        until the client has read them: a write that runs meanwhile may show in the reply,
        as it may between any two requests in flight at once."""
        node = self.node
        rd = node._drv_read_splice
        if rd is None or not _whole_aligned_read(node, offset, length):
            return None
        return _counted_read(node, length, rd, offset, length)

    def _read_nowait_padded(self, offset: int, length: int) -> Buffer | None:
        node = self.node
        if offset < 0 or length < 0 or offset + length > node._size:
            node.stats.error(_range_error(node, offset, length))
            raise _range_error(node, offset, length)
        if length == 0:
            return b""
        mask = node._align_mask
        start = offset & ~mask
        end = (offset + length + mask) & ~mask
        rd = node._drv_read_nowait
        if end - start > node._read_max or rd is None:
            return None
        try:
            buf = rd(start, end - start)
        except OSError as exc:
            node.stats.error(exc)
            raise
        if buf is None:
            return None
        buf = _pad(buf, end - start)
        st = node.stats
        st.read_ops += 1
        st.read_bytes += length
        return memoryview(buf)[offset - start : offset - start + length]

    async def read(self, offset: int, length: int) -> Buffer:
        node = self.node
        if _whole_aligned_read(node, offset, length):
            try:
                rd = node._drv_read_nowait
                buf = rd(offset, length) if rd is not None else None
                if buf is None:
                    buf = await node._drv_read(offset, length)  # type: ignore[misc]
            except OSError as exc:
                node.stats.error(exc)
                raise
            st = node.stats
            st.read_ops += 1
            st.read_bytes += length
            return buf
        return await self._read_slow(offset, length)

    async def _read_slow(self, offset: int, length: int) -> Buffer:
        node = self.node
        try:
            _check_range(node, offset, length)
            if length == 0:
                return b""
            mask = node._align_mask
            start = offset & ~mask
            end = (offset + length + mask) & ~mask
            if node.copy_on_read:
                await _copy_up(node, start, end)
            buf = await _read_aligned(node, start, end - start)
        except OSError as exc:
            node.stats.error(exc)
            raise
        st = node.stats
        st.read_ops += 1
        st.read_bytes += length
        if start == offset and end - start == length:
            return buf
        return memoryview(buf)[offset - start : offset - start + length]

    # -- write ----------------------------------------------------------------------------
    def write_nowait(self, offset: int, data: Buffer, flags: ReqFlags = ReqFlags.NONE) -> bool:
        """Write without blocking, or return False: then ``await write()``."""
        node = self.node
        length = len(data)
        if (
            self._writable
            and (flags is _NO_FLAGS or not flags)  # identity first: Flag.__bool__ is Python
            and node._fast_write
            and not node._tracker.serialising
            and offset >= 0
            and 0 < length <= node._max_xfer
            and offset + length <= node._size
            and not (offset | length) & node._align_mask
        ):
            wr = node._drv_write_nowait
            if wr is None:
                return False
            try:
                done = wr(offset, data, flags)
            except OSError as exc:
                node.stats.error(exc)
                raise
            if done:
                node.write_gen += 1
                st = node.stats
                st.write_ops += 1
                st.write_bytes += length
            return done
        return False

    def write_unlocked(self, offset: int, data: Buffer, unlock: Unlocker) -> bool:
        """:meth:`write_nowait` for a caller on a connection thread, holding the graph lock,
        with a large payload: the copy into the file runs with the lock let go, so that the
        copies of several connections overlap (nbdcopy writes on four). Only a chain of
        generic edges down to a driver with ``write_unlocked`` takes this path; anything
        else returns False and nothing was written: then ``write_nowait`` or ``write``.

        While the lock is away other requests run, as at an await: the write is registered
        with the tracker so that a read-modify-write waits for it."""
        node = self.node
        length = len(data)
        wr = node._drv_write_unlocked
        if not (
            wr is not None
            and self._writable
            and node._fast_write
            and offset >= 0
            and 0 < length <= node._max_xfer
            and offset + length <= node._size
            and not (offset | length) & node._align_mask
        ):
            return False
        tracker = node._tracker
        if tracker.conflict(offset, offset + length, False) is not None:
            return False
        req = tracker.add(offset, offset + length, False)
        try:
            done = wr(offset, data, unlock)
        except OSError as exc:
            node.stats.error(exc)
            raise
        finally:
            tracker.end(req, unlock.run_soon)
        if done:
            node.write_gen += 1
            st = node.stats
            st.write_ops += 1
            st.write_bytes += length
        return done

    def _check_write(self, flags: ReqFlags) -> None:
        if self._writable:
            return
        node = self.node
        if node.read_only:
            raise OSError(errno.EPERM, f"node '{node.name}' is read-only")
        if flags & ReqFlags.WRITE_UNCHANGED and self.perm & _WRITE_PERMS:
            return
        raise OSError(errno.EPERM, f"{self.user} holds no write permission on node '{node.name}'")

    async def write(self, offset: int, data: Buffer, flags: ReqFlags = ReqFlags.NONE) -> None:
        node = self.node
        length = len(data)
        try:
            self._check_write(flags)
            _check_range(node, offset, length)
            if length == 0:
                return
            if node.detect_zeroes != "off" and is_zero(data):
                if node.detect_zeroes == "unmap":
                    flags |= ReqFlags.MAY_UNMAP
                await self._zero(offset, length, flags & ~ReqFlags.WRITE_UNCHANGED)
            elif not (offset | length) & node._align_mask:
                await _write_tracked(node, offset, data, flags)
            else:
                await self._rmw(offset, data, flags)
        except OSError as exc:
            node.stats.error(exc)
            raise
        st = node.stats
        st.write_ops += 1
        st.write_bytes += length

    async def _rmw(self, offset: int, data: Buffer, flags: ReqFlags) -> None:
        """Write an unaligned range: read the edge blocks, patch, write back, serialised."""
        node = self.node
        mask = node._align_mask
        align = mask + 1
        length = len(data)
        start = offset & ~mask
        end = (offset + length + mask) & ~mask
        tracker = node._tracker
        req = await tracker.begin(start, end, True)
        try:
            buf = bytearray(end - start)
            if offset != start:
                buf[:align] = await _read_aligned(node, start, align)
            if offset + length != end and (end - align != start or offset == start):
                buf[-align:] = await _read_aligned(node, end - align, align)
            buf[offset - start : offset - start + length] = data
            await _write_aligned(
                node, start, buf, flags & (ReqFlags.FUA | ReqFlags.WRITE_UNCHANGED)
            )
        finally:
            tracker.end(req)
        node.stats.rmw_ops += 1

    # -- zero -----------------------------------------------------------------------------
    async def zero(self, offset: int, length: int, flags: ReqFlags = ReqFlags.NONE) -> None:
        """Make the range read as zeros. MAY_UNMAP lets it deallocate (only under
        ``discard=unmap``); NO_FALLBACK fails with ENOTSUP rather than write zero buffers."""
        node = self.node
        try:
            self._check_write(flags)
            _check_range(node, offset, length)
            if length == 0:
                return
            await self._zero(offset, length, flags)
        except OSError as exc:
            node.stats.error(exc)
            raise
        st = node.stats
        st.zero_ops += 1
        st.zero_bytes += length

    async def _zero(self, offset: int, length: int, flags: ReqFlags) -> None:
        node = self.node
        if node.discard != "unmap":
            flags &= ~ReqFlags.MAY_UNMAP
        mask = node._align_mask
        if flags & ReqFlags.NO_FALLBACK and (not node.can_fast_zero() or (offset | length) & mask):
            raise OSError(
                errno.ENOTSUP,
                f"node '{node.name}' cannot zero {offset}+{length} without a slow fallback",
            )
        end = offset + length
        inner = flags & ~ReqFlags.FUA
        native_fua = bool(flags & ReqFlags.FUA) and bool(node._zero_flags & ReqFlags.FUA)
        if native_fua and not (offset | length) & mask:
            inner = flags  # one aligned range: the driver makes every piece durable itself
        else:
            native_fua = False
        mid_start = (offset + mask) & ~mask
        mid_end = end & ~mask
        if mid_start >= mid_end:
            await self._rmw(offset, bytes(length), inner)
        else:
            if offset < mid_start:
                await self._rmw(offset, bytes(mid_start - offset), inner)
            tracker = node._tracker
            req = await tracker.begin(mid_start, mid_end, False)
            try:
                await _zero_aligned(node, mid_start, mid_end - mid_start, inner)
            finally:
                tracker.end(req)
            if mid_end < end:
                await self._rmw(mid_end, bytes(end - mid_end), inner)
        if flags & ReqFlags.FUA and not native_fua:
            await flush_node(node)

    # -- discard --------------------------------------------------------------------------
    async def discard(self, offset: int, length: int, flags: ReqFlags = ReqFlags.NONE) -> None:
        """Advisory: frees space where the node's discard policy is ``unmap`` and the driver
        can; otherwise succeeds doing nothing. FUA flushes afterwards."""
        node = self.node
        try:
            self._check_write(ReqFlags.NONE)
            _check_range(node, offset, length)
            if length == 0:
                return
            if node.discard == "unmap" and node._drv_discard is not None:
                await _discard_aligned(node, offset, length)
            if flags & ReqFlags.FUA:
                await flush_node(node)
        except OSError as exc:
            node.stats.error(exc)
            raise
        st = node.stats
        st.discard_ops += 1
        st.discard_bytes += length

    # -- flush, cache, truncate -----------------------------------------------------------
    async def flush(self) -> None:
        await flush_node(self.node)

    async def cache(self, offset: int, length: int) -> None:
        """A prefetch hint: copies backing data up on a copy-on-read node, else passes the
        hint to the driver; a no-op where neither has a use for it."""
        node = self.node
        try:
            _check_range(node, offset, length)
            fn = node._drv_cache
            if length and (fn is not None or node.copy_on_read):
                mask = node._align_mask
                start = offset & ~mask
                end = min((offset + length + mask) & ~mask, (node._size + mask) & ~mask)
                if node.copy_on_read:
                    await _copy_up(node, start, end)
                else:
                    await fn(start, end - start)  # type: ignore[misc]
        except OSError as exc:
            node.stats.error(exc)
            raise
        node.stats.cache_ops += 1

    async def truncate(self, length: int) -> None:
        node = self.node
        try:
            if not self.perm & Perm.RESIZE:
                raise OSError(errno.EPERM, f"{self.user} holds no resize permission")
            if node.read_only:
                raise OSError(errno.EPERM, f"node '{node.name}' is read-only")
            if length < 0:
                raise OSError(errno.EINVAL, f"negative size {length}")
            fn = node._drv_truncate
            if fn is None:
                raise OSError(errno.ENOTSUP, f"node '{node.name}' cannot be resized")
            await fn(length)
        except OSError as exc:
            node.stats.error(exc)
            raise
        node.write_gen += 1
        for n in node.graph._nodes_above(node):
            n.refresh()

    # -- block status ---------------------------------------------------------------------
    async def block_status(
        self, offset: int, length: int, *, max_extents: int = _STATUS_RESULT_LIMIT
    ) -> list[Extent]:
        """The status of ``offset..offset+length`` over the whole backing chain, as merged
        extents (equal flags, contiguous mapping); never past EOF; at least one extent.
        An extent's ``depth`` is that of its first byte: use :meth:`allocation_depth` for
        depths."""
        from .status import block_status

        node = self.node
        try:
            self._check_status_range(offset, length)
            result = await block_status(node, offset, length, max_extents)
        except OSError as exc:
            node.stats.error(exc)
            raise
        node.stats.block_status_ops += 1
        return result

    async def block_status_one(self, offset: int, length: int) -> Extent:
        """The first extent at ``offset`` (not merged): what a filter driver returns."""
        from .status import status_above

        self._check_status_range(offset, length)
        return await status_above(self.node, offset, length)

    async def allocation_depth(
        self, offset: int, length: int, *, max_extents: int = _STATUS_RESULT_LIMIT
    ) -> list[Extent]:
        """Extents with ``depth``: 1 = allocated in this node, 2 = in its backing, ...,
        0 = nowhere (reads as zeros). ``status`` is ALLOCATED where depth > 0."""
        from .status import allocation_depth

        node = self.node
        try:
            self._check_status_range(offset, length)
            result = await allocation_depth(node, offset, length, max_extents)
        except OSError as exc:
            node.stats.error(exc)
            raise
        node.stats.block_status_ops += 1
        return result

    def _check_status_range(self, offset: int, length: int) -> None:
        node = self.node
        if offset < 0 or length <= 0 or offset + length > node._size:
            raise _range_error(node, offset, length)


# -- helpers on the aligned path -------------------------------------------------------------


async def _read_aligned(node: Node, offset: int, length: int) -> Buffer:
    """Read an aligned range (possibly ending in the node's last partial block), split at
    max_transfer."""
    max_xfer = node._max_xfer
    rd_nowait = node._drv_read_nowait
    rd = node._drv_read
    assert rd is not None
    if length <= max_xfer:
        buf = rd_nowait(offset, length) if rd_nowait is not None else None
        if buf is None:
            buf = await rd(offset, length)
        return _pad(buf, length)
    out = bytearray(length)
    pos = 0
    while pos < length:
        n = min(max_xfer, length - pos)
        piece = rd_nowait(offset + pos, n) if rd_nowait is not None else None
        if piece is None:
            piece = await rd(offset + pos, n)
        out[pos : pos + len(piece)] = piece
        pos += n
    return out


async def _copy_up(node: Node, start: int, end: int) -> None:
    """Copy-on-read: copy what this node's backing chain supplies for ``start..end``
    (widened to COPY_ON_READ_GRANULE) into the node itself, so later reads are served here.
    Serialising, so a write can't land between the copy's read and its write. Ranges that
    are unallocated all the way down read as zeros and are left alone."""
    from .status import status_above

    if node.backing is None and node.filtered is None:
        return  # nothing below to copy from
    granule = max(node._align_mask + 1, COPY_ON_READ_GRANULE)
    mask = node._align_mask
    start -= start % granule
    end = min(-(-end // granule) * granule, (node._size + mask) & ~mask)
    tracker = node._tracker
    req = await tracker.begin(start, end, True)
    try:
        pos = start
        while pos < min(end, node._size):
            ext = await status_above(node, pos, end - pos)
            n = ext.length
            if ext.depth > 1:
                piece_end = min((pos + n + mask) & ~mask, end)
                data = await _read_aligned(node, pos, piece_end - pos)
                flags = ReqFlags.WRITE_UNCHANGED & node._write_flags
                await _write_aligned(node, pos, data, flags)
                node.stats.copy_on_read_bytes += piece_end - pos
                n = piece_end - pos
            pos += n
    finally:
        tracker.end(req)


async def _write_tracked(node: Node, offset: int, data: Buffer, flags: ReqFlags) -> None:
    """An aligned write, registered so a read-modify-write arriving later waits for it."""
    tracker = node._tracker
    if not tracker.serialising and not flags and len(data) <= node._max_xfer:
        wr_nowait = node._drv_write_nowait
        if wr_nowait is not None and wr_nowait(offset, data, flags):
            node.write_gen += 1
            return
    req = await tracker.begin(offset, offset + len(data), False)
    try:
        await _write_aligned(node, offset, data, flags)
    finally:
        tracker.end(req)


async def _write_aligned(node: Node, offset: int, data: Buffer, flags: ReqFlags) -> None:
    """Split at max_transfer; FUA only on the last piece, or a flush when not native."""
    wr = node._drv_write
    if wr is None:
        raise OSError(errno.EPERM, f"node '{node.name}' cannot write")
    drv_flags = flags & node._write_flags
    emulate_fua = bool(flags & ReqFlags.FUA) and not drv_flags & ReqFlags.FUA
    length = len(data)
    max_xfer = node._max_xfer
    if length <= max_xfer:
        await wr(offset, data, drv_flags)
    else:
        view = memoryview(data)
        last = drv_flags
        drv_flags &= ~ReqFlags.FUA
        pos = 0
        while pos < length:
            n = min(max_xfer, length - pos)
            await wr(offset + pos, view[pos : pos + n], last if pos + n == length else drv_flags)
            pos += n
    node.write_gen += 1
    if emulate_fua:
        await flush_node(node)


async def _zero_aligned(node: Node, offset: int, length: int, flags: ReqFlags) -> None:
    zero = node._drv_zero
    no_fallback = bool(flags & ReqFlags.NO_FALLBACK)
    if zero is None:
        if no_fallback:
            raise OSError(errno.ENOTSUP, f"node '{node.name}' cannot zero")
        await _write_zeroes(node, offset, length)
        return
    lim = node.limits
    align = node._align_mask + 1
    zalign = max(lim.zero_alignment, align)
    max_zero = lim.max_zero or (1 << 62)
    if max_zero >= zalign:
        max_zero -= max_zero % zalign
    drv_flags = flags & node._zero_flags
    fell_back = False
    pos = offset
    end = offset + length
    while pos < end:
        n = end - pos
        head = pos % zalign
        if head:
            # A piece never crosses a zero_alignment boundary unless it starts on one.
            n = min(n, zalign - head)
        n = min(n, max_zero)
        try:
            await zero(pos, n, drv_flags)
        except OSError as exc:
            if exc.errno not in _ENOTSUP or no_fallback:
                raise
            await _write_zeroes(node, pos, n)
            fell_back = True
        pos += n
    node.write_gen += 1
    if fell_back and drv_flags & ReqFlags.FUA:
        await flush_node(node)  # the fallback writes carried no FUA


async def _write_zeroes(node: Node, offset: int, length: int) -> None:
    """The fallback: plain writes from one zero buffer of at most ZERO_CHUNK bytes."""
    chunk = min(ZERO_CHUNK, node._max_xfer, length)
    mask = node._align_mask
    if chunk > mask:
        chunk &= ~mask
    zeros = memoryview(bytes(chunk))
    pos = 0
    while pos < length:
        n = min(chunk, length - pos)
        await _write_aligned(node, offset + pos, zeros[:n], ReqFlags.NONE)
        pos += n


async def _discard_aligned(node: Node, offset: int, length: int) -> None:
    """Send the request-aligned part in pieces that respect discard alignment and maximum;
    a driver refusing a piece with ENOTSUP is ignored (discard is advisory)."""
    discard = node._drv_discard
    assert discard is not None
    mask = node._align_mask
    start = (offset + mask) & ~mask
    end = (offset + length) & ~mask
    if start >= end:
        return
    lim = node.limits
    dalign = max(lim.discard_alignment, mask + 1)
    max_discard = lim.max_discard or (1 << 62)
    if max_discard >= dalign:
        max_discard -= max_discard % dalign
    tracker = node._tracker
    req = await tracker.begin(start, end, False)
    try:
        pos = start
        while pos < end:
            n = end - pos
            head = pos % dalign
            if head:
                n = min(n, dalign - head)
            n = min(n, max_discard)
            try:
                await discard(pos, n)
            except OSError as exc:
                if exc.errno not in _ENOTSUP:
                    raise
            pos += n
    finally:
        tracker.end(req)
    node.write_gen += 1


async def flush_node(node: Node) -> None:
    """Flush the node's driver unless nothing was written since its last flush, then every
    child it holds write permission on. The first error wins; the others are still tried."""
    if node.read_only:
        return
    gen = node.write_gen
    error: OSError | None = None
    async with node._flush_lock:
        fn = node._drv_flush
        if fn is not None and not node.cache_no_flush and node.flushed_gen < gen:
            try:
                await fn()
                node.stats.flush_ops += 1
            except OSError as exc:
                node.stats.error(exc)
                error = exc
        else:
            node.stats.flushes_skipped += 1
        for edge in list(node.children.values()):
            if edge.perm & _WRITE_PERMS:
                try:
                    await flush_node(edge.node)
                except OSError as exc:
                    error = error or exc
        if error is not None:
            raise error
        node.flushed_gen = max(node.flushed_gen, gen)
