"""Every NBD constant, with the values of the protocol specification (doc/proto.md, plus the
extended-headers and resize extension branches).

Enum member names double as log strings, so they follow the spec names minus the ``NBD_``
prefix and the group prefix (``Cmd.WRITE_ZEROES`` is ``NBD_CMD_WRITE_ZEROES``).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

__all__ = [
    "EXTENDED_REPLY_MAGIC",
    "EXTENDED_REQUEST_MAGIC",
    "IHAVEOPT",
    "NBDMAGIC",
    "OLDSTYLE_MAGIC",
    "REP_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "Errno",
    "HandshakeFlag",
    "Info",
    "Opt",
    "Rep",
    "ReplyFlag",
    "ReplyType",
    "StateFlag",
    "TransmissionFlag",
]

#: First 8 bytes the server sends, ASCII "NBDMAGIC".
NBDMAGIC = 0x4E42444D41474943
#: Second word of the newstyle greeting, and the start of every option request ("IHAVEOPT").
IHAVEOPT = 0x49484156454F5054
#: Second word of the (unsupported) oldstyle greeting; listed so it is never mistaken.
OLDSTYLE_MAGIC = 0x00420281861253
#: Starts every fixed-newstyle option reply.
REP_MAGIC = 0x0003E889045565A9
#: Compact (28-byte) request header.
REQUEST_MAGIC = 0x25609513
#: Extended (32-byte) request header, after NBD_OPT_EXTENDED_HEADERS.
EXTENDED_REQUEST_MAGIC = 0x21E41C71
#: Simple (16-byte) reply.
SIMPLE_REPLY_MAGIC = 0x67446698
#: Structured reply chunk (20-byte header).
STRUCTURED_REPLY_MAGIC = 0x668E33EF
#: Extended reply chunk (32-byte header).
EXTENDED_REPLY_MAGIC = 0x6E8A278C


class HandshakeFlag(IntFlag):
    """u16 the server sends in the newstyle greeting."""

    FIXED_NEWSTYLE = 0x0001
    NO_ZEROES = 0x0002


class ClientFlag(IntFlag):
    """u32 the client answers the greeting with."""

    FIXED_NEWSTYLE = 0x00000001
    NO_ZEROES = 0x00000002


class Opt(IntEnum):
    """Option types (u32) of the handshake phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn; answered with ERR_UNSUP
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types (u32); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10

    @property
    def is_error(self) -> bool:
        return bool(self & _REP_ERR)


class Info(IntEnum):
    """Information types (u16) inside NBD_REP_INFO, requested by INFO/GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    """Per-export u16 flags sent at the end of the handshake."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Cmd(IntEnum):
    """Request types (u16)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    """Request flags (u16)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyType(IntEnum):
    """Structured/extended reply chunk types (u16); bit 15 marks an error chunk."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2

    @property
    def is_error(self) -> bool:
        return bool(self & (1 << 15))


class ReplyFlag(IntFlag):
    """Chunk flags (u16)."""

    DONE = 1 << 0


class Errno(IntEnum):
    """Error values of simple replies and error chunks (0 means success)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Status flags of the ``base:allocation`` meta context."""

    HOLE = 1 << 0
    ZERO = 1 << 1
