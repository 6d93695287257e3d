"""Image locking between processes, byte-compatible with QEMU's file-posix.

Permissions become open-file-description (OFD) byte-range read locks: byte ``100 + bit`` is
locked for every permission a node holds, byte ``200 + bit`` for every permission it refuses
to share (bits as in :class:`Perm`, which match QEMU's BLK_PERM_*). Holding a permission
means testing that nobody locked its "refused" byte; refusing one means testing that nobody
locked its "held" byte. Because QEMU uses the same bytes, ``qemu-img``, ``qemu-io``,
``qemu-nbd`` and QEMU itself see our locks and we see theirs.

OFD locks belong to one ``open()``, not to a process: two opens of one image inside this
process conflict just as two processes do, and closing the descriptor drops its locks even if
the process lives on (a crash can't leave a stale lock behind).
"""

from __future__ import annotations

import errno
import fcntl
import struct

from ..types import Perm

PERM_BASE = 100
SHARED_BASE = 200

#: QEMU's names, so messages read the same as qemu-img's.
PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
_BITS = tuple(PERM_NAMES)

# struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid, padded to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")


class ImageLockedError(OSError):
    """Another user (process, or another open in this one) conflicts with our permissions."""


def _flock(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One fcntl on a single byte; returns the l_type the kernel hands back."""
    arg = _FLOCK.pack(kind, 0, offset, 1, 0)  # l_pid must be 0 for OFD locks
    out = fcntl.fcntl(fd, cmd, arg)
    assert isinstance(out, bytes)
    l_type: int = _FLOCK.unpack(out)[0]
    return l_type


def _kind(locked: Perm) -> int:
    return fcntl.F_RDLCK if locked else fcntl.F_UNLCK


def ofd_locks_supported(fd: int) -> bool:
    """Whether the filesystem under ``fd`` implements OFD locks (most local ones do)."""
    try:
        _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return False
        raise
    return True


class ImageLock:
    """The lock bytes one open file description holds, and how to change them."""

    def __init__(self, fd: int, filename: str) -> None:
        self.fd = fd
        self.filename = filename
        self.held = Perm.NONE  # bytes 100+bit we have locked
        self.refused = Perm.NONE  # bytes 200+bit we have locked
        self._committed = self._pending = (Perm.NONE, Perm.NONE)

    def update(self, perm: Perm, shared: Perm) -> None:
        """Hold ``perm`` and share ``shared`` from now on, or raise and change nothing."""
        self.prepare(perm, shared)
        self.commit()

    def prepare(self, perm: Perm, shared: Perm) -> None:
        """First half of a change: take the new bytes (keeping the old ones) and test for
        conflicts; raise, with nothing changed, on a conflict. Locking before testing, as
        QEMU does, means two processes racing for one image can't both pass."""
        perm &= Perm.ALL
        refused = Perm.ALL & ~shared
        self._committed = (self.held, self.refused)
        try:
            self._lock(perm | self.held, refused | self.refused)
            self._check(perm, shared)
        except OSError:
            self._lock(*self._committed)
            raise
        self._pending = (perm, refused)

    def commit(self) -> None:
        """Second half: drop the bytes only the old permissions needed."""
        self._lock(*self._pending)
        self._committed = self._pending

    def abort(self) -> None:
        """Undo a successful ``prepare``."""
        self._lock(*self._committed)
        self._pending = self._committed

    def release(self) -> None:
        self._lock(Perm.NONE, Perm.NONE)
        self._pending = self._committed = (Perm.NONE, Perm.NONE)

    def _lock(self, held: Perm, refused: Perm) -> None:
        # State is updated byte by byte so a failure half-way leaves it truthful.
        for i, bit in enumerate(_BITS):
            if (held ^ self.held) & bit:
                self._set(_kind(held & bit), PERM_BASE + i)
                self.held ^= bit
            if (refused ^ self.refused) & bit:
                self._set(_kind(refused & bit), SHARED_BASE + i)
                self.refused ^= bit

    def _set(self, kind: int, offset: int) -> None:
        try:
            _flock(self.fd, fcntl.F_OFD_SETLK, kind, offset)
        except OSError as exc:
            # Only an exclusive lock on our byte blocks a shared one: not QEMU's doing, but
            # still somebody else guarding the image.
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise self._conflict(f"Failed to lock byte {offset}") from None
            raise

    def _check(self, perm: Perm, shared: Perm) -> None:
        for i, bit in enumerate(_BITS):
            if perm & bit and self._taken(SHARED_BASE + i):
                raise self._conflict(f'Failed to get "{PERM_NAMES[bit]}" lock')
        for i, bit in enumerate(_BITS):
            if not shared & bit and self._taken(PERM_BASE + i):
                raise self._conflict(f'Failed to get shared "{PERM_NAMES[bit]}" lock')

    def _taken(self, offset: int) -> bool:
        # F_OFD_GETLK ignores our own locks: it reports only other open file descriptions.
        return _flock(self.fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK

    def _conflict(self, what: str) -> ImageLockedError:
        return ImageLockedError(
            errno.EAGAIN,
            f"{what} on '{self.filename}': is another process using the image? "
            "(locking=off disables the check)",
        )
