"""Value objects: the export description, the negotiated session, and every event.

All of them are frozen, slotted dataclasses: an event is a fact about the conversation, not a
handle to mutate. Do not subclass them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ._constants import Cmd, CmdFlag, Errno, Opt, Rep, TransmissionFlag

__all__ = [
    "NEED_DATA",
    "Aborted",
    "BlockStatusReply",
    "Buffer",
    "Catalogue",
    "Closed",
    "Disconnect",
    "ErrorReply",
    "ExportEntry",
    "ExportInfo",
    "InfoBlockSize",
    "InfoDescription",
    "InfoExport",
    "InfoName",
    "MetaContext",
    "NeedData",
    "OptionAck",
    "OptionError",
    "OptionHandled",
    "ReadData",
    "ReadHole",
    "Ready",
    "ReplyDone",
    "Request",
    "ServerGreeting",
    "Session",
    "StartTLS",
    "TLSMode",
]

_NO_EXPORT_FLAGS = TransmissionFlag(0)
_NO_CMD_FLAGS = CmdFlag(0)

#: Anything ``socket.sendmsg`` accepts as one element of its buffer list.
Buffer = bytes | bytearray | memoryview


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when no complete event is buffered yet.
NEED_DATA: Literal[NeedData.NEED_DATA] = NeedData.NEED_DATA


class TLSMode(enum.Enum):
    """How a server handshake treats NBD_OPT_STARTTLS (one mode per connection)."""

    OFF = "off"  #: STARTTLS refused with ERR_POLICY
    ON = "on"  #: STARTTLS accepted, TLS optional
    REQUIRE = "require"  #: every option but STARTTLS/ABORT gets ERR_TLS_REQD until TLS is up


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export as the server's catalogue describes it.

    ``flags`` are the export's capabilities (READ_ONLY, SEND_FLUSH, SEND_FUA, SEND_TRIM,
    SEND_WRITE_ZEROES, SEND_FAST_ZERO, SEND_CACHE, CAN_MULTI_CONN, ROTATIONAL). The protocol
    adds HAS_FLAGS itself, and SEND_DF only once structured replies were negotiated.
    ``block_size`` is (minimum, preferred, maximum payload); when set it is always sent in
    INFO/GO replies, as qemu does. ``contexts`` are the meta contexts the export offers; a
    context's id is its index in this tuple.
    """

    name: str
    size: int
    flags: TransmissionFlag = _NO_EXPORT_FLAGS
    description: str = ""
    block_size: tuple[int, int, int] | None = None
    contexts: tuple[str, ...] = ("base:allocation",)


class Catalogue(Protocol):
    """Answers the server handshake's questions about exports."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export called ``name`` ("" is the default export), or None if unknown."""
        ...

    def exports(self) -> Iterable[ExportInfo]:
        """Every export to show in NBD_OPT_LIST."""
        ...


@dataclass(frozen=True, slots=True)
class Session:
    """What the handshake negotiated; the transmission phase works from it alone.

    ``flags`` are exactly the transmission flags sent to the client. ``structured`` is true
    when structured replies or extended headers were negotiated (both mean structured-reply
    semantics). ``contexts`` maps the selected meta-context ids to their names, for this
    export. ``block_size`` is set only if the client committed to the constraints by
    requesting NBD_INFO_BLOCK_SIZE in GO.
    """

    export: ExportInfo
    flags: TransmissionFlag
    structured: bool = False
    extended: bool = False
    contexts: Mapping[int, str] = field(default_factory=dict)
    block_size: tuple[int, int, int] | None = None
    tls: bool = False


# -- handshake events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionHandled:
    """Server side: an option was answered; ``reply`` is its final reply (already queued)."""

    option: Opt | int
    reply: Rep


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Server side: STARTTLS was accepted and its ACK queued.

    Write the ACK, wrap the stream in TLS, then call ``tls_established()``.
    """


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client sent NBD_OPT_ABORT; the ACK is queued. Write it (ignoring errors), close."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer closed the connection cleanly, at a message boundary."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The handshake is over: start transmission with ``session`` and feed it ``leftover``.

    On the server side the final reply (GO's ACK or the EXPORT_NAME reply) is queued.
    """

    session: Session
    leftover: bytes = b""


@dataclass(frozen=True, slots=True)
class ServerGreeting:
    """Client side: the server's newstyle greeting arrived (client flags are now queued)."""

    flags: int


@dataclass(frozen=True, slots=True)
class OptionAck:
    """Client side: NBD_REP_ACK for ``option``."""

    option: Opt | int


@dataclass(frozen=True, slots=True)
class OptionError:
    """Client side: an error reply (``reply.is_error``) for ``option``."""

    option: Opt | int
    reply: Rep | int
    message: str = ""


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """Client side: one NBD_REP_SERVER of NBD_OPT_LIST."""

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class MetaContext:
    """Client side: one NBD_REP_META_CONTEXT (id is 0 in LIST replies)."""

    option: Opt | int
    context_id: int
    name: str


@dataclass(frozen=True, slots=True)
class InfoExport:
    """Client side: NBD_INFO_EXPORT."""

    size: int
    flags: TransmissionFlag


@dataclass(frozen=True, slots=True)
class InfoName:
    """Client side: NBD_INFO_NAME (the canonical export name)."""

    name: str


@dataclass(frozen=True, slots=True)
class InfoDescription:
    """Client side: NBD_INFO_DESCRIPTION."""

    description: str


@dataclass(frozen=True, slots=True)
class InfoBlockSize:
    """Client side: NBD_INFO_BLOCK_SIZE."""

    minimum: int
    preferred: int
    maximum: int


# -- transmission events -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """Server side: one request, fully read (a WRITE with its payload).

    ``error`` is None for a valid request. Otherwise the request failed validation against
    the session and must be answered with that error (``message`` says why) without being
    executed. ``cmd`` is the raw int for an unknown command. ``data`` is the WRITE payload; it
    stays valid after later ``receive_data`` calls.
    """

    cookie: int
    cmd: Cmd | int
    flags: CmdFlag = _NO_CMD_FLAGS
    offset: int = 0
    length: int = 0
    data: bytes | bytearray | memoryview | None = None
    error: Errno | None = None
    message: str = ""


_new = object.__new__
_set_request_fields = tuple(
    getattr(Request, name).__set__
    for name in ("cookie", "cmd", "flags", "offset", "length", "data", "error", "message")
)


def new_request(
    cookie: int,
    cmd: Cmd | int,
    flags: CmdFlag,
    offset: int,
    length: int,
    data: bytes | bytearray | memoryview | None,
    error: Errno | None = None,
    message: str = "",
) -> Request:
    """``Request(...)`` for the hot path, about 3x faster.

    A frozen dataclass's ``__init__`` assigns each field through ``object.__setattr__``;
    setting the slots through their descriptors gives the same object for less. Equality
    with the normal constructor is tested (tests/protocol/test_transmission.py).
    """
    request: Request = _new(Request)
    s_cookie, s_cmd, s_flags, s_offset, s_length, s_data, s_error, s_message = (
        _set_request_fields
    )
    s_cookie(request, cookie)
    s_cmd(request, cmd)
    s_flags(request, flags)
    s_offset(request, offset)
    s_length(request, length)
    s_data(request, data)
    s_error(request, error)
    s_message(request, message)
    return request


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Server side: NBD_CMD_DISC. No reply; finish in-flight requests, then close."""


@dataclass(frozen=True, slots=True)
class ReadData:
    """Client side: READ data (a simple reply's payload, or an OFFSET_DATA chunk)."""

    cookie: int
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ReadHole:
    """Client side: an OFFSET_HOLE chunk (the range reads as zeros)."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatusReply:
    """Client side: one BLOCK_STATUS / BLOCK_STATUS_EXT chunk."""

    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Client side: an ERROR / ERROR_OFFSET chunk (simple-reply errors only give ReplyDone)."""

    cookie: int
    error: int
    message: str
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """Client side: the reply for ``cookie`` is complete; ``error`` is its first error or 0."""

    cookie: int
    error: int = 0
