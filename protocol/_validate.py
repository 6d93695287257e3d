"""Request validation: every check the spec puts on a server, against the negotiated session.

The order follows qemu and nbdkit (nbd-protocol.md §4.2): flags, read-only, command not
advertised, bounds, alignment, payload size, zero length. The first failed check decides the
error. Everything that depends only on the session and the command is computed once per
session, so the per-request cost is a few integer comparisons (no enum arithmetic, which runs
in Python code).
"""

from __future__ import annotations

from ._constants import Cmd, CmdFlag, Errno, TransmissionFlag
from ._events import Session

__all__: list[str] = []

_KNOWN_FLAGS = int(max(CmdFlag)) * 2 - 1

#: Commands that modify the export (refused on a read-only export with EPERM).
_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.RESIZE})
#: Commands the client may only send if the export advertised them. CACHE is missing on
#: purpose: clients send it unadvertised, and the spec asks servers to tolerate that.
_ADVERTISED = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.RESIZE: TransmissionFlag.SEND_RESIZE,
}
#: Commands with a byte range that must lie inside the export (FLUSH/DISC/RESIZE have none).
_RANGED = frozenset(
    {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS}
)
_OUT_OF_RANGE = {Cmd.WRITE: Errno.ENOSPC, Cmd.WRITE_ZEROES: Errno.ENOSPC}


def _allowed_flags(session: Session) -> dict[Cmd, int]:
    """For each command, the flags it may carry in this session.

    FUA is legal on every command once SEND_FUA was advertised (clients do send it on
    non-writes); the other flags belong to one command each and need their feature.
    """
    flags = session.flags
    fua = CmdFlag.FUA if flags & TransmissionFlag.SEND_FUA else CmdFlag(0)
    payload = CmdFlag.PAYLOAD_LEN if session.extended else CmdFlag(0)
    df = CmdFlag.DF if flags & TransmissionFlag.SEND_DF else CmdFlag(0)
    fast = CmdFlag.FAST_ZERO if flags & TransmissionFlag.SEND_FAST_ZERO else CmdFlag(0)
    table = {cmd: fua for cmd in Cmd}
    table[Cmd.READ] |= df
    table[Cmd.WRITE] |= payload
    table[Cmd.WRITE_ZEROES] |= CmdFlag.NO_HOLE | fast
    table[Cmd.BLOCK_STATUS] |= CmdFlag.REQ_ONE
    return {cmd: int(value) for cmd, value in table.items()}


def _static_error(session: Session, cmd: Cmd) -> tuple[Errno, str] | None:
    """The error every request of ``cmd`` gets in this session, whatever its range."""
    flags = session.flags
    if cmd in _WRITES and flags & TransmissionFlag.READ_ONLY:
        return Errno.EPERM, f"{cmd.name} on a read-only export"
    needed = _ADVERTISED.get(cmd)
    if needed is not None and not flags & needed:
        return Errno.EINVAL, f"{cmd.name} was not advertised"
    if cmd is Cmd.BLOCK_STATUS:
        if not session.structured:
            return Errno.EINVAL, "BLOCK_STATUS needs structured replies"
        if not session.contexts:
            return Errno.EINVAL, "BLOCK_STATUS without a selected meta context"
    return None


def _flag_error(cmd: Cmd, bad: int) -> str:
    known = bad & _KNOWN_FLAGS
    names = "|".join(f.name or "?" for f in CmdFlag if f & known)
    if bad & ~_KNOWN_FLAGS:
        names = "|".join(filter(None, [names, f"0x{bad & ~_KNOWN_FLAGS:x}"]))
    return f"flag {names} not allowed on {cmd.name} here"


class Validator:
    """Checks requests of known commands against one session."""

    __slots__ = ("_alignment", "_allowed", "_max_io", "_size", "_static", "plain_rules")

    def __init__(self, session: Session, max_payload: int) -> None:
        self._allowed = _allowed_flags(session)
        self._static = {cmd: _static_error(session, cmd) for cmd in Cmd}
        self._size = session.export.size
        # Alignment binds only a client that committed to the block sizes (GO + BLOCK_SIZE).
        self._alignment = session.block_size[0] if session.block_size else 1
        # The advertised maximum binds the client whether or not it asked for it.
        advertised = session.export.block_size
        self._max_io = min(max_payload, advertised[2]) if advertised else max_payload
        #: The checks of a READ or WRITE as plain integers, for a caller that inlines them:
        #: (READ's allowed flags, WRITE's, size, alignment mask, max_io). An allowed-flags of
        #: -1 means every request of that command fails a static check; an alignment that is
        #: not a power of two disables the inline check (mask -1). :meth:`check` decides
        #: whatever the inline check does not pass.
        mask = self._alignment - 1 if self._alignment & (self._alignment - 1) == 0 else -1
        self.plain_rules = (
            -1 if self._static[Cmd.READ] else self._allowed[Cmd.READ],
            -1 if self._static[Cmd.WRITE] else self._allowed[Cmd.WRITE],
            self._size, mask, self._max_io,
        )  # fmt: skip

    def check(self, cmd: Cmd, flags: int, offset: int, length: int) -> tuple[Errno, str] | None:
        """Return (error, why) for an invalid request, None for a valid one."""
        bad = flags & ~self._allowed[cmd]
        if bad:
            return Errno.EINVAL, _flag_error(cmd, bad)
        static = self._static[cmd]
        if static is not None:
            return static
        if cmd in _RANGED:
            size = self._size
            if offset > size or length > size - offset:
                return (
                    _OUT_OF_RANGE.get(cmd, Errno.EINVAL),
                    f"{cmd.name} of {length} bytes at {offset} is beyond the size {size}",
                )
            alignment = self._alignment
            if alignment > 1 and (offset % alignment or length % alignment):
                return Errno.EINVAL, f"{cmd.name} not aligned to the block size {alignment}"
            if length > self._max_io and (cmd is Cmd.READ or cmd is Cmd.WRITE):
                return (
                    Errno.EINVAL,
                    f"{cmd.name} of {length} bytes exceeds the maximum {self._max_io}",
                )
            if length == 0 and cmd is Cmd.BLOCK_STATUS:
                return Errno.EINVAL, "BLOCK_STATUS needs a non-zero length"
        elif cmd is Cmd.FLUSH and (offset or length):
            return Errno.EINVAL, "FLUSH must have zero offset and length"
        return None
