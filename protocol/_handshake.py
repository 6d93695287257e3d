"""The fixed-newstyle handshake, server side (nbd-protocol.md §3, §5, §6.1).

"The server sends a greeting, the client answers with its flags, then haggles over options
one at a time until it picks an export (GO or EXPORT_NAME) or gives up (ABORT)." Every option
reply is queued for :meth:`ServerHandshake.data_to_send`; the caller learns what happened from
the returned events.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from . import _wire as wire
from ._buffer import ReceiveBuffer
from ._constants import (
    IHAVEOPT,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    Aborted,
    Catalogue,
    Closed,
    ExportInfo,
    NeedData,
    OptionHandled,
    Ready,
    Session,
    StartTLS,
    TLSMode,
)

__all__ = [
    "DEFAULT_MAX_OPTIONS",
    "DEFAULT_MAX_OPTION_LENGTH",
    "MAX_STRING",
    "SERVER_HANDSHAKE_FLAGS",
    "ServerHandshake",
    "export_flags",
]

#: Longest option payload accepted. A legal option is at most a few names and queries of
#: ≤ 4096 bytes, so 64 KiB is plenty; longer → disconnect (as qemu and nbdkit do, with
#: larger caps), which bounds the receive buffer.
DEFAULT_MAX_OPTION_LENGTH = 64 * 1024
#: Options accepted per handshake before the client is judged a denial of service
#: (nbdkit allows 32, plus 32 per export listed).
DEFAULT_MAX_OPTIONS = 128
#: Longest export name, context name or query, in bytes (the spec's MUST); longer → ERR_INVALID.
MAX_STRING = 4096
#: The greeting's handshake flags: fixed newstyle, and the 124 zero bytes may be omitted.
SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES

# Flags the protocol layer controls itself; a catalogue's value for them is ignored.
_PROTOCOL_FLAGS = (
    TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_DF | TransmissionFlag.BLOCK_STATUS_PAYLOAD
)


def export_flags(export: ExportInfo, structured: bool) -> TransmissionFlag:
    """The transmission flags to send for ``export`` given the negotiated reply mode."""
    flags = (export.flags & ~_PROTOCOL_FLAGS) | TransmissionFlag.HAS_FLAGS
    if not flags & TransmissionFlag.SEND_WRITE_ZEROES:  # FAST_ZERO MUST be 0 without it
        flags &= ~TransmissionFlag.SEND_FAST_ZERO
    if structured:
        flags |= TransmissionFlag.SEND_DF
    return TransmissionFlag(flags)


class _State(Enum):
    IDLE = "idle"  # initiate() not called yet
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TLS_PENDING = "waiting for tls_established()"
    DONE = "done"
    ERROR = "error"


class _OptionError(Exception):
    """Answer the option in hand with an error reply and carry on."""

    def __init__(self, reply: Rep, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


class ServerHandshake:
    """Server side of the handshake.

    Usage::

        hs = ServerHandshake(catalogue, tls=TLSMode.OFF)
        write(hs.initiate())
        while True:
            event = hs.next_event()
            write(hs.data_to_send())
            if event is NEED_DATA: hs.receive_data(read())
            elif isinstance(event, Ready): ...   # ServerTransmission(event.session, ...)

    Raises :class:`RemoteProtocolError` for everything the client cannot recover from (bad
    magic or client flags, an unknown export on EXPORT_NAME, an over-long option, too many
    options, EOF inside a message); every other mistake gets an option error reply.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        tls: TLSMode = TLSMode.OFF,
        max_option_length: int = DEFAULT_MAX_OPTION_LENGTH,
        max_options: int = DEFAULT_MAX_OPTIONS,
    ) -> None:
        self.catalogue = catalogue
        self.tls_mode = tls
        self.max_option_length = max_option_length
        self.max_options = max_options
        self._buffer = ReceiveBuffer()
        self._out = bytearray()
        self._state = _State.IDLE
        self._options_seen = 0
        self._no_zeroes = False
        self._fixed = False
        self._tls = False
        self._shutting_down = False
        self._reset_negotiated()
        self._handlers: dict[int, Callable[[bytes], Any]] = {
            Opt.EXPORT_NAME: self._opt_export_name,
            Opt.ABORT: self._opt_abort,
            Opt.LIST: self._opt_list,
            Opt.STARTTLS: self._opt_starttls,
            Opt.INFO: self._opt_info,
            Opt.GO: self._opt_go,
            Opt.STRUCTURED_REPLY: self._opt_structured_reply,
            Opt.LIST_META_CONTEXT: self._opt_list_meta_context,
            Opt.SET_META_CONTEXT: self._opt_set_meta_context,
            Opt.EXTENDED_HEADERS: self._opt_extended_headers,
        }

    def _reset_negotiated(self) -> None:
        """Forget everything a STARTTLS must wipe (spec: "TLS support")."""
        self._structured = False
        self._extended = False
        self._meta_export: str | None = None
        self._meta_selected: dict[int, str] = {}

    # -- the three verbs -----------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The 18-byte greeting; call once, first."""
        if self._state is not _State.IDLE:
            raise LocalProtocolError("initiate() called twice")
        self._state = _State.CLIENT_FLAGS
        return wire.build(wire.Greeting, {"flags": SERVER_HANDSHAKE_FLAGS})

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events (at most one option's worth)."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the client; ``b""`` means EOF."""
        if self._state is _State.TLS_PENDING:
            raise LocalProtocolError("call tls_established() before feeding TLS-decrypted data")
        self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call (possibly ``b""``)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> OptionHandled | StartTLS | Aborted | Closed | Ready | NeedData:
        state = self._state
        if state is _State.OPTIONS:
            pass
        elif state is _State.CLIENT_FLAGS:
            if not self._read_client_flags():
                return self._short()
        elif state is _State.ERROR:
            raise RemoteProtocolError("the handshake already failed")
        else:
            raise LocalProtocolError(f"next_event() while {state.value}")
        try:
            return self._next_option()
        except RemoteProtocolError:
            self._state = _State.ERROR
            raise

    def shutting_down(self) -> None:
        """The server is stopping: every later option but ABORT gets ERR_SHUTDOWN.

        The client is expected to give up (ABORT or close); the caller should still bound
        how long it waits.
        """
        self._shutting_down = True

    def tls_established(self) -> None:
        """The stream is now TLS: reset the negotiated state and accept options again."""
        if self._state is not _State.TLS_PENDING:
            raise LocalProtocolError("tls_established() without an accepted STARTTLS")
        self._reset_negotiated()
        self._tls = True
        self._state = _State.OPTIONS

    # -- framing -------------------------------------------------------------------------------

    def _short(self) -> NeedData | Closed:
        buf = self._buffer
        if not buf.eof:
            return NEED_DATA
        if len(buf) == 0:
            self._state = _State.DONE
            return Closed()
        self._state = _State.ERROR
        raise RemoteProtocolError(f"EOF inside a handshake message ({len(buf)} bytes)")

    def _read_client_flags(self) -> bool:
        buf = self._buffer
        if len(buf) < wire.U32.size:
            return False
        (flags,) = buf.unpack(wire.U32)
        buf.skip(wire.U32.size)
        if flags & ~int(SERVER_HANDSHAKE_FLAGS):
            self._state = _State.ERROR
            raise RemoteProtocolError(f"unknown client flags 0x{flags:08x}")
        self._fixed = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._state = _State.OPTIONS
        return True

    def _next_option(self) -> OptionHandled | StartTLS | Aborted | Closed | Ready | NeedData:
        buf = self._buffer
        if len(buf) < wire.OPTION_HEADER.size:
            return self._short()
        magic, option, length = buf.unpack(wire.OPTION_HEADER)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic 0x{magic:016x}")
        if length > self.max_option_length:
            raise RemoteProtocolError(
                f"option {option} of {length} bytes exceeds the limit {self.max_option_length}"
            )
        if len(buf) < wire.OPTION_HEADER.size + length:
            return self._short()
        self._options_seen += 1
        if self._options_seen > self.max_options:
            raise RemoteProtocolError(f"more than {self.max_options} options")
        buf.skip(wire.OPTION_HEADER.size)
        data = buf.take(length)
        if not self._fixed and option != Opt.EXPORT_NAME:
            raise RemoteProtocolError("a non-fixed-newstyle client may only send EXPORT_NAME")
        try:
            opt: Opt | int = Opt(option)
        except ValueError:
            opt = option
        try:
            if self._shutting_down and opt is not Opt.ABORT:
                if opt is Opt.EXPORT_NAME:  # no error path exists for it
                    raise RemoteProtocolError("EXPORT_NAME while the server shuts down")
                raise _OptionError(Rep.ERR_SHUTDOWN, "the server is shutting down")
            if (
                self.tls_mode is TLSMode.REQUIRE
                and not self._tls
                and opt not in (Opt.STARTTLS, Opt.ABORT)
            ):
                if opt is Opt.EXPORT_NAME:  # no error path exists for it
                    raise RemoteProtocolError("EXPORT_NAME before the required TLS")
                raise _OptionError(Rep.ERR_TLS_REQD, "TLS is required")
            handler = self._handlers.get(option)
            if handler is None:
                raise _OptionError(Rep.ERR_UNSUP, f"option {option} is not supported")
            result = handler(data)
        except _OptionError as err:
            self._reply(option, err.reply, err.message.encode())
            return OptionHandled(opt, err.reply)
        if isinstance(result, Rep):
            return OptionHandled(opt, result)
        assert isinstance(result, StartTLS | Aborted | Ready)
        return result

    def _reply(self, option: int, reply: Rep, payload: bytes = b"") -> None:
        self._out += wire.build(
            wire.OptionReply, {"option": option, "type": reply, "data": payload}
        )

    # -- options -------------------------------------------------------------------------------

    @staticmethod
    def _no_data(data: bytes) -> None:
        if data:
            raise _OptionError(Rep.ERR_INVALID, "this option takes no data")

    @staticmethod
    def _check_name(name: str, what: str) -> None:
        if len(name.encode()) > MAX_STRING:
            raise _OptionError(Rep.ERR_INVALID, f"{what} longer than {MAX_STRING} bytes")
        if "\0" in name:
            raise _OptionError(Rep.ERR_INVALID, f"{what} contains NUL")

    def _lookup(self, name: str) -> ExportInfo:
        self._check_name(name, "export name")
        export = self.catalogue.lookup(name)
        if export is None:
            raise _OptionError(Rep.ERR_UNKNOWN, f"unknown export {name!r}")
        return export

    def _opt_export_name(self, data: bytes) -> Ready:
        if self._extended:
            raise RemoteProtocolError("EXPORT_NAME after extended headers were negotiated")
        try:
            name = data.decode("utf-8")
            export = self._lookup(name)
        except (UnicodeDecodeError, _OptionError) as exc:
            raise RemoteProtocolError(f"EXPORT_NAME refused: {exc}") from None
        flags = export_flags(export, self._structured)
        schema = wire.ExportNameReplyShort if self._no_zeroes else wire.ExportNameReply
        self._out += wire.build(schema, {"size": export.size, "flags": flags})
        return self._ready(export, flags, block_size=None)

    def _opt_abort(self, data: bytes) -> Aborted:
        # The client SHOULD send no data, and the server SHOULD ignore any it gets.
        self._reply(Opt.ABORT, Rep.ACK)
        self._state = _State.DONE
        return Aborted()

    def _opt_list(self, data: bytes) -> Rep:
        self._no_data(data)
        for export in self.catalogue.exports():
            payload = wire.build(
                wire.RepServer, {"name": export.name, "description": export.description}
            )
            self._reply(Opt.LIST, Rep.SERVER, payload)
        self._reply(Opt.LIST, Rep.ACK)
        return Rep.ACK

    def _opt_starttls(self, data: bytes) -> StartTLS:
        self._no_data(data)
        if self.tls_mode is TLSMode.OFF:
            raise _OptionError(Rep.ERR_POLICY, "TLS is not enabled on this server")
        if self._tls:
            raise _OptionError(Rep.ERR_INVALID, "TLS is already active")
        if len(self._buffer):
            # Plaintext after STARTTLS, before the TLS handshake, would be spliced into the
            # encrypted session (the classic STARTTLS injection): refuse to go on.
            raise RemoteProtocolError("data sent after STARTTLS before the TLS handshake")
        self._reply(Opt.STARTTLS, Rep.ACK)
        self._state = _State.TLS_PENDING
        return StartTLS()

    def _parse(self, schema: Any, data: bytes, what: str) -> Any:
        try:
            return wire.parse(schema, data, what)
        except RemoteProtocolError as exc:
            raise _OptionError(Rep.ERR_INVALID, str(exc)) from None

    def _opt_info(self, data: bytes) -> Rep:
        self._info_or_go(Opt.INFO, data)
        return Rep.ACK

    def _opt_go(self, data: bytes) -> Ready:
        export, flags, requested = self._info_or_go(Opt.GO, data)
        # GO with NBD_INFO_BLOCK_SIZE in its list commits the client to the constraints.
        committed = export.block_size if Info.BLOCK_SIZE in requested else None
        return self._ready(export, flags, committed)

    def _info_or_go(
        self, option: Opt, data: bytes
    ) -> tuple[ExportInfo, TransmissionFlag, list[int]]:
        parsed = self._parse(wire.InfoRequest, data, f"{option.name} request")
        export = self._lookup(parsed.name)
        requested = list(dict.fromkeys(parsed.requests))
        flags = export_flags(export, self._structured)
        self._reply(
            option,
            Rep.INFO,
            wire.build(wire.InfoExport, {"size": export.size, "flags": flags}),
        )
        for info in requested:
            if info == Info.NAME:
                payload = wire.build(wire.InfoName, {"name": export.name})
            elif info == Info.DESCRIPTION and export.description:
                payload = wire.build(wire.InfoDescription, {"description": export.description})
            else:
                continue  # unknown types are ignored; BLOCK_SIZE is sent below regardless
            self._reply(option, Rep.INFO, payload)
        if export.block_size is not None:
            minimum, preferred, maximum = export.block_size
            payload = wire.build(
                wire.InfoBlockSize,
                {"minimum": minimum, "preferred": preferred, "maximum": maximum},
            )
            self._reply(option, Rep.INFO, payload)
        self._reply(option, Rep.ACK)
        return export, flags, requested

    def _ready(
        self,
        export: ExportInfo,
        flags: TransmissionFlag,
        block_size: tuple[int, int, int] | None,
    ) -> Ready:
        # A selection made for another export is void (qemu nbd_check_meta_export).
        contexts = self._meta_selected if self._meta_export == export.name else {}
        session = Session(
            export=export,
            flags=flags,
            structured=self._structured,
            extended=self._extended,
            contexts=dict(contexts),
            block_size=block_size,
            tls=self._tls,
        )
        self._state = _State.DONE
        return Ready(session, self._buffer.take_all())

    def _opt_structured_reply(self, data: bytes) -> Rep:
        self._no_data(data)
        if self._extended:
            raise _OptionError(Rep.ERR_EXT_HEADER_REQD, "extended headers are already active")
        if self._structured:
            raise _OptionError(Rep.ERR_INVALID, "structured replies are already active")
        self._structured = True
        self._reply(Opt.STRUCTURED_REPLY, Rep.ACK)
        return Rep.ACK

    def _opt_extended_headers(self, data: bytes) -> Rep:
        self._no_data(data)
        if self._extended:
            raise _OptionError(Rep.ERR_INVALID, "extended headers are already active")
        self._extended = True
        self._structured = True  # extended headers imply structured-reply semantics
        self._reply(Opt.EXTENDED_HEADERS, Rep.ACK)
        return Rep.ACK

    def _meta_request(self, option: Opt, data: bytes) -> tuple[ExportInfo, list[str]]:
        parsed = self._parse(wire.MetaContextRequest, data, f"{option.name} request")
        export = self._lookup(parsed.name)
        return export, list(parsed.queries)

    def _opt_list_meta_context(self, data: bytes) -> Rep:
        export, queries = self._meta_request(Opt.LIST_META_CONTEXT, data)
        if not queries:
            matches = list(export.contexts)
        else:
            matches = []
            for query in queries:
                # Over-long queries can name no context; ignore them, as qemu does.
                if len(query.encode()) > MAX_STRING:
                    continue
                if query.endswith(":"):  # "ns:" lists every context of that namespace
                    matches += [c for c in export.contexts if c.startswith(query)]
                elif query in export.contexts:
                    matches.append(query)
        for name in dict.fromkeys(matches):
            payload = wire.build(wire.RepMetaContext, {"context_id": 0, "name": name})
            self._reply(Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, payload)
        self._reply(Opt.LIST_META_CONTEXT, Rep.ACK)
        return Rep.ACK

    def _opt_set_meta_context(self, data: bytes) -> Rep:
        # SET replaces the selection even when it fails.
        self._meta_export = None
        self._meta_selected = {}
        if not self._structured:
            raise _OptionError(Rep.ERR_INVALID, "SET_META_CONTEXT needs structured replies")
        export, queries = self._meta_request(Opt.SET_META_CONTEXT, data)
        selected: dict[int, str] = {}
        for query in queries:
            # Exact names only: "ns:" wildcards select nothing in SET (the spec MUST for base:).
            if query in export.contexts and not query.endswith(":"):
                selected[export.contexts.index(query)] = query
        for context_id, name in selected.items():
            payload = wire.build(wire.RepMetaContext, {"context_id": context_id, "name": name})
            self._reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, payload)
        self._reply(Opt.SET_META_CONTEXT, Rep.ACK)
        self._meta_export = export.name
        self._meta_selected = selected
        return Rep.ACK
