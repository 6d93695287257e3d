"""Sans-IO NBD: bytes in, events out; events in, bytes out.

Everything public is re-exported here; the ``_*`` modules are private. The package does no
I/O and imports only the standard library and ``construct``.

Server side, in two phases handed over with the bytes already received::

    hs = ServerHandshake(catalogue, tls=TLSMode.OFF)
    send(hs.initiate())
    while not isinstance(ev := hs.next_event(), Ready | Aborted | Closed):
        send(hs.data_to_send())                 # every option reply is queued
        if ev is NEED_DATA:
            hs.receive_data(recv())             # b"" = EOF
        elif isinstance(ev, StartTLS):
            wrap_in_tls(); hs.tls_established()
    send(hs.data_to_send())
    tx = ServerTransmission(ev.session, leftover=ev.leftover)
    ev = tx.next_event()                        # Request | Disconnect | Closed | NEED_DATA
    if ev.error is not None: sendmsg([tx.reply(ev)])         # validation failed
    elif ev.cmd is Cmd.READ: sendmsg(tx.reply_read(ev, data))  # data is not copied

Errors say whose fault they are: :class:`RemoteProtocolError` means the peer broke the
protocol and the connection must be dropped (after sending what ``data_to_send()`` holds);
everything the peer can be told about is an option error reply or a ``Request.error``.
:class:`ClientHandshake` and :class:`ClientTransmission` mirror the server for tests and
benchmarks. Limits: :data:`DEFAULT_MAX_OPTION_LENGTH`, :data:`DEFAULT_MAX_OPTIONS`,
:data:`MAX_STRING`, :data:`DEFAULT_MAX_PAYLOAD`, :data:`MAX_ERROR_MESSAGE`,
:data:`MAX_EXTENTS`.
"""

from ._client import MAX_OPTION_REPLY, ClientHandshake
from ._constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    REP_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)
from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    Aborted,
    BlockStatusReply,
    Buffer,
    Catalogue,
    Closed,
    Disconnect,
    ErrorReply,
    ExportEntry,
    ExportInfo,
    InfoBlockSize,
    InfoDescription,
    InfoExport,
    InfoName,
    MetaContext,
    NeedData,
    OptionAck,
    OptionError,
    OptionHandled,
    ReadData,
    ReadHole,
    Ready,
    ReplyDone,
    Request,
    ServerGreeting,
    Session,
    StartTLS,
    TLSMode,
)
from ._handshake import (
    DEFAULT_MAX_OPTION_LENGTH,
    DEFAULT_MAX_OPTIONS,
    MAX_STRING,
    SERVER_HANDSHAKE_FLAGS,
    ServerHandshake,
    export_flags,
)
from ._transmission import (
    DEFAULT_MAX_PAYLOAD,
    DIRECT_PAYLOAD_MIN,
    MAX_ERROR_MESSAGE,
    MAX_EXTENTS,
    ClientTransmission,
    PlainRequest,
    ReadPiece,
    ServerTransmission,
)

__all__ = [
    "DEFAULT_MAX_OPTIONS",
    "DEFAULT_MAX_OPTION_LENGTH",
    "DEFAULT_MAX_PAYLOAD",
    "DIRECT_PAYLOAD_MIN",
    "EXTENDED_REPLY_MAGIC",
    "EXTENDED_REQUEST_MAGIC",
    "IHAVEOPT",
    "MAX_ERROR_MESSAGE",
    "MAX_EXTENTS",
    "MAX_OPTION_REPLY",
    "MAX_STRING",
    "NBDMAGIC",
    "NEED_DATA",
    "OLDSTYLE_MAGIC",
    "REP_MAGIC",
    "REQUEST_MAGIC",
    "SERVER_HANDSHAKE_FLAGS",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "Aborted",
    "BlockStatusReply",
    "Buffer",
    "Catalogue",
    "ClientFlag",
    "ClientHandshake",
    "ClientTransmission",
    "Closed",
    "Cmd",
    "CmdFlag",
    "Disconnect",
    "Errno",
    "ErrorReply",
    "ExportEntry",
    "ExportInfo",
    "HandshakeFlag",
    "Info",
    "InfoBlockSize",
    "InfoDescription",
    "InfoExport",
    "InfoName",
    "LocalProtocolError",
    "MetaContext",
    "NeedData",
    "Opt",
    "OptionAck",
    "OptionError",
    "OptionHandled",
    "PlainRequest",
    "ProtocolError",
    "ReadData",
    "ReadHole",
    "ReadPiece",
    "Ready",
    "RemoteProtocolError",
    "Rep",
    "ReplyDone",
    "ReplyFlag",
    "ReplyType",
    "Request",
    "ServerGreeting",
    "ServerHandshake",
    "ServerTransmission",
    "Session",
    "StartTLS",
    "StateFlag",
    "TLSMode",
    "TransmissionFlag",
    "export_flags",
]
