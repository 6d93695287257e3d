"""Every NBD message, declared once with ``construct``.

These schemas are the single source of truth for the wire format: sizes come from
``.sizeof()``, and the ``struct.Struct`` fast paths at the bottom are proven byte-identical to
them by tests/protocol/test_wire.py. Section numbers refer to
../shared/reference/nbd-protocol.md (§2 "Byte layouts").

Schemas only ever see exactly-framed buffers: the connection objects do the framing, so a
schema failure always means a malformed message, never "need more data".
"""

from __future__ import annotations

import io
import struct
from typing import Any

import construct
from construct import (
    Array,
    Const,
    Construct,
    ConstructError,
    GreedyBytes,
    GreedyRange,
    GreedyString,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    Prefixed,
    PrefixedArray,
    Rebuild,
    Struct,
    Terminated,
    len_,
    this,
)

from ._constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REP_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
)
from ._errors import LocalProtocolError, RemoteProtocolError

__all__: list[str] = []  # private module: nothing is re-exported

# -- handshake (§2.1 - §2.4) -------------------------------------------------------------------

#: Newstyle greeting, server → client (18 bytes).
Greeting = Struct(
    "nbdmagic" / Const(NBDMAGIC, Int64ub),
    "ihaveopt" / Const(IHAVEOPT, Int64ub),
    "flags" / Int16ub,
)
#: Client flags, client → server (4 bytes).
ClientFlags = Struct("flags" / Int32ub)

#: Option request header (16 bytes); the magic is a plain int so the caller applies policy.
OptionHeader = Struct("magic" / Int64ub, "option" / Int32ub, "length" / Int32ub)
#: A whole option request, for building (client side).
OptionRequest = Struct(
    "magic" / Const(IHAVEOPT, Int64ub),
    "option" / Int32ub,
    "data" / Prefixed(Int32ub, GreedyBytes),
)

#: Option reply header (20 bytes), for parsing.
OptionReplyHeader = Struct(
    "magic" / Int64ub, "option" / Int32ub, "type" / Int32ub, "length" / Int32ub
)
#: A whole option reply, for building.
OptionReply = Struct(
    "magic" / Const(REP_MAGIC, Int64ub),
    "option" / Int32ub,
    "type" / Int32ub,
    "data" / Prefixed(Int32ub, GreedyBytes),
)

_Name32 = PascalString(Int32ub, "utf8")

#: NBD_REP_SERVER payload: one export of NBD_OPT_LIST.
RepServer = Struct("name" / _Name32, "description" / GreedyString("utf8"))
#: NBD_REP_META_CONTEXT payload.
RepMetaContext = Struct("context_id" / Int32ub, "name" / GreedyString("utf8"))

#: NBD_REP_INFO payloads; each starts with its NBD_INFO_* type.
InfoExport = Struct(
    "type" / Const(int(Info.EXPORT), Int16ub), "size" / Int64ub, "flags" / Int16ub
)
InfoName = Struct("type" / Const(int(Info.NAME), Int16ub), "name" / GreedyString("utf8"))
InfoDescription = Struct(
    "type" / Const(int(Info.DESCRIPTION), Int16ub), "description" / GreedyString("utf8")
)
InfoBlockSize = Struct(
    "type" / Const(int(Info.BLOCK_SIZE), Int16ub),
    "minimum" / Int32ub,
    "preferred" / Int32ub,
    "maximum" / Int32ub,
)
#: First two bytes of any NBD_REP_INFO payload.
InfoType = Struct("type" / Int16ub)

#: Option data of NBD_OPT_INFO and NBD_OPT_GO.
InfoRequest = Struct(
    "name" / _Name32, "requests" / PrefixedArray(Int16ub, Int16ub), Terminated
)
#: Option data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
MetaContextRequest = Struct(
    "name" / _Name32, "queries" / PrefixedArray(Int32ub, _Name32), Terminated
)

#: Reply to NBD_OPT_EXPORT_NAME: no header, with the 124-byte pad (134 bytes) ...
ExportNameReply = Struct("size" / Int64ub, "flags" / Int16ub, "zeroes" / Const(bytes(124)))
#: ... or without it, when both sides agreed NO_ZEROES (10 bytes).
ExportNameReplyShort = Struct("size" / Int64ub, "flags" / Int16ub)

# -- transmission (§2.5 - §2.7) ----------------------------------------------------------------

#: Compact request header (28 bytes).
Request = Struct(
    "magic" / Const(REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int32ub,
)
#: Extended request header (32 bytes).
ExtendedRequest = Struct(
    "magic" / Const(EXTENDED_REQUEST_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)
#: Simple reply (16 bytes); a successful READ's data follows.
SimpleReply = Struct(
    "magic" / Const(SIMPLE_REPLY_MAGIC, Int32ub), "error" / Int32ub, "cookie" / Int64ub
)
#: Structured reply chunk header (20 bytes).
ChunkHeader = Struct(
    "magic" / Const(STRUCTURED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "length" / Int32ub,
)
#: Extended reply chunk header (32 bytes).
ExtendedChunkHeader = Struct(
    "magic" / Const(EXTENDED_REPLY_MAGIC, Int32ub),
    "flags" / Int16ub,
    "type" / Int16ub,
    "cookie" / Int64ub,
    "offset" / Int64ub,
    "length" / Int64ub,
)
#: The 4 bytes every reply starts with, to tell the framings apart (client side).
ReplyMagic = Struct("magic" / Int32ub)

#: OFFSET_DATA payload: offset, then the data (all the rest).
OffsetData = Struct("offset" / Int64ub, "data" / GreedyBytes)
#: OFFSET_DATA payload without its data, i.e. what precedes the (uncopied) data buffer.
OffsetDataHeader = Struct("offset" / Int64ub)
#: OFFSET_HOLE payload; the hole size stays 32-bit even in extended mode.
OffsetHole = Struct("offset" / Int64ub, "length" / Int32ub)
#: BLOCK_STATUS payload (compact extents).
BlockStatus = Struct(
    "context_id" / Int32ub,
    "extents" / GreedyRange(Struct("length" / Int32ub, "flags" / Int32ub)),
)
#: BLOCK_STATUS_EXT payload (64-bit extents, with a descriptor count).
BlockStatusExt = Struct(
    "context_id" / Int32ub,
    "count" / Rebuild(Int32ub, len_(this.extents)),
    "extents" / Array(this.count, Struct("length" / Int64ub, "flags" / Int64ub)),
)
#: ERROR payload.
ErrorChunk = Struct("error" / Int32ub, "message" / PascalString(Int16ub, "utf8"))
#: ERROR_OFFSET payload.
ErrorOffsetChunk = Struct(
    "error" / Int32ub, "message" / PascalString(Int16ub, "utf8"), "offset" / Int64ub
)

# The hot messages, compiled once at import (construct's generated-code form).
RequestCompiled = Request.compile()
ExtendedRequestCompiled = ExtendedRequest.compile()
SimpleReplyCompiled = SimpleReply.compile()
ChunkHeaderCompiled = ChunkHeader.compile()
ExtendedChunkHeaderCompiled = ExtendedChunkHeader.compile()

#: Every schema by name, for tests that walk them all.
SCHEMAS: dict[str, Construct] = {
    name: value
    for name, value in dict(globals()).items()
    if isinstance(value, Construct)
    and name[0].isupper()
    and not name.endswith("Compiled")
    and not hasattr(construct, name)
}

# -- fast paths --------------------------------------------------------------------------------
# Header parsing/building is most of the per-request protocol cost, and compiled construct is
# still ~25x slower than struct for fixed layouts (aesthetics.md §4.7). These mirror the schemas
# above field for field; tests prove the bytes identical.

REQUEST = struct.Struct(">IHHQQI")
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK_HEADER = struct.Struct(">IHHQI")
EXTENDED_CHUNK_HEADER = struct.Struct(">IHHQQQ")
#: Structured chunk header immediately followed by the OFFSET_DATA offset (one pack call).
CHUNK_HEADER_OFFSET = struct.Struct(">IHHQIQ")
EXTENDED_CHUNK_HEADER_OFFSET = struct.Struct(">IHHQQQQ")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")
U64 = struct.Struct(">Q")
OFFSET_HOLE = struct.Struct(">QI")

_PARSE_ERRORS = (ConstructError, UnicodeError, ValueError, struct.error)


def parse(schema: Construct, data: bytes | bytearray | memoryview, what: str) -> Any:
    """Parse an exactly-framed peer message; any failure is the peer's fault.

    The message must fill ``data`` exactly: trailing bytes are as malformed as missing ones.
    """
    stream = io.BytesIO(data)
    try:
        result = schema.parse_stream(stream)
    except _PARSE_ERRORS as exc:
        raise RemoteProtocolError(f"malformed {what}: {exc}") from None
    if stream.tell() != len(data):
        raise RemoteProtocolError(f"malformed {what}: {len(data) - stream.tell()} extra bytes")
    return result


def build(schema: Construct, value: dict[str, Any]) -> bytes:
    """Build one of our own messages (a failure here is a bug in our caller)."""
    try:
        result: bytes = schema.build(value)
    except _PARSE_ERRORS as exc:
        raise LocalProtocolError(f"cannot build {schema.name or 'message'}: {exc}") from None
    return result
