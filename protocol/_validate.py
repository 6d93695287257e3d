"""Request validation: every check the spec puts on a server, against the negotiated session.

The order follows qemu and nbdkit (nbd-protocol.md §4.2): unknown command, flags, read-only,
command not advertised, bounds, alignment, payload size, zero length. The first failed check
decides the error.
"""

from __future__ import annotations

from ._constants import Cmd, CmdFlag, Errno, TransmissionFlag
from ._events import Session

__all__: list[str] = []

_KNOWN_FLAGS = max(CmdFlag) * 2 - 1

#: Commands that modify the export (refused on a read-only export with EPERM).
_WRITES = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.RESIZE})
#: Commands the client may only send if the export advertised them.
_ADVERTISED = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.RESIZE: TransmissionFlag.SEND_RESIZE,
}
#: Commands with a byte range that must lie inside the export (FLUSH/DISC have none).
_RANGED = frozenset(
    {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS}
)


def allowed_flags(session: Session) -> dict[int, int]:
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
    # Plain ints: ``~`` on an IntFlag would only complement the known bits.
    return {int(cmd): int(value) for cmd, value in table.items()}


def flag_error(cmd: Cmd, bad: int) -> str:
    known = bad & _KNOWN_FLAGS
    names = "|".join(f.name or "?" for f in CmdFlag if f & known)
    if bad & ~_KNOWN_FLAGS:
        names = "|".join(filter(None, [names, f"0x{bad & ~_KNOWN_FLAGS:x}"]))
    return f"flag {names} not allowed on {cmd.name} here"


def validate(
    session: Session,
    allowed: dict[int, int],
    cmd: Cmd,
    flags: int,
    offset: int,
    length: int,
    max_payload: int,
) -> tuple[Errno, str] | None:
    """Check a request of a known command; return (error, why) or None if it is valid."""
    bad = flags & ~allowed[cmd]
    if bad:
        return Errno.EINVAL, flag_error(cmd, bad)
    export_flags = session.flags
    if cmd in _WRITES and export_flags & TransmissionFlag.READ_ONLY:
        return Errno.EPERM, f"{cmd.name} on a read-only export"
    needed = _ADVERTISED.get(cmd)
    if needed is not None and not export_flags & needed:
        return Errno.EINVAL, f"{cmd.name} was not advertised"
    if cmd is Cmd.BLOCK_STATUS:
        if not session.structured:
            return Errno.EINVAL, "BLOCK_STATUS needs structured replies"
        if not session.contexts:
            return Errno.EINVAL, "BLOCK_STATUS without a selected meta context"
    if cmd in _RANGED:
        size = session.export.size
        if offset > size or length > size - offset:
            errno = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            return errno, f"{cmd.name} of {length} bytes at {offset} is beyond the size {size}"
    elif cmd is Cmd.FLUSH and (offset or length):
        return Errno.EINVAL, "FLUSH must have zero offset and length"
    block_size = session.block_size
    if block_size is not None and cmd in _RANGED:
        minimum = block_size[0]
        if offset % minimum or length % minimum:
            return Errno.EINVAL, f"{cmd.name} not aligned to the block size {minimum}"
    if cmd is Cmd.READ or cmd is Cmd.WRITE:
        # The advertised maximum binds the client whether or not it asked for it.
        advertised = session.export.block_size
        limit = min(max_payload, advertised[2]) if advertised is not None else max_payload
        if length > limit:
            return Errno.EINVAL, f"{cmd.name} of {length} bytes exceeds the maximum {limit}"
    if cmd is Cmd.BLOCK_STATUS and length == 0:
        return Errno.EINVAL, "BLOCK_STATUS needs a non-zero length"
    return None
