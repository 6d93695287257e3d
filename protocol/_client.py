"""The handshake, client side: mirrors :class:`ServerHandshake` for tests and benchmarks.

The client sends options when told to (``go()``, ``list_exports()``, ... or the raw
``send_option()``), and turns the server's replies into events. Options may be pipelined;
replies are matched to them in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from . import _wire as wire
from ._buffer import ReceiveBuffer
from ._constants import (
    IHAVEOPT,
    NBDMAGIC,
    REP_MAGIC,
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
    Closed,
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
    Ready,
    ServerGreeting,
    Session,
)

__all__ = ["MAX_OPTION_REPLY", "ClientHandshake"]

#: Longest option reply payload the client accepts (names and descriptions are ≤ 4 KiB each).
MAX_OPTION_REPLY = 64 * 1024

ClientEvent = (
    ServerGreeting
    | OptionAck
    | OptionError
    | ExportEntry
    | MetaContext
    | InfoExport
    | InfoName
    | InfoDescription
    | InfoBlockSize
    | Ready
    | Closed
    | NeedData
)


class _State(Enum):
    GREETING = "greeting"
    OPTIONS = "options"
    TLS_PENDING = "waiting for tls_established()"
    ABORTED = "aborted"
    DONE = "done"
    ERROR = "error"


@dataclass
class _Pending:
    option: int
    name: str = ""
    requests: tuple[int, ...] = ()
    infos: dict[int, object] = field(default_factory=dict)
    contexts: dict[int, str] = field(default_factory=dict)


class ClientHandshake:
    """Client side of the fixed-newstyle handshake."""

    def __init__(self, *, no_zeroes: bool = True) -> None:
        self._want_no_zeroes = no_zeroes
        self._buffer = ReceiveBuffer()
        self._out = bytearray()
        self._state = _State.GREETING
        self._pending: deque[_Pending] = deque()
        self._no_zeroes = False
        self._tls = False
        self._reset_negotiated()

    def _reset_negotiated(self) -> None:
        self.structured = False
        self.extended = False
        self._meta_export: str | None = None
        self._meta_selected: dict[int, str] = {}

    # -- verbs ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.feed(data)

    def data_to_send(self) -> bytes:
        """Bytes to send to the server; options queued early wait for the greeting, because
        the client flags must go first."""
        if self._state is _State.GREETING:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        if self._state is not _State.TLS_PENDING:
            raise LocalProtocolError("tls_established() without an acknowledged STARTTLS")
        self._reset_negotiated()
        self._tls = True
        self._state = _State.OPTIONS

    def send_option(
        self, option: int, data: bytes = b"", *, name: str = "", requests: Iterable[int] = ()
    ) -> None:
        """Queue a raw option request (``name``/``requests`` say how to read its replies)."""
        if self._state not in (_State.GREETING, _State.OPTIONS):
            raise LocalProtocolError(f"cannot send an option while {self._state.value}")
        self._out += wire.build(wire.OptionRequest, {"option": option, "data": data})
        self._pending.append(_Pending(option, name, tuple(requests)))

    def export_name(self, name: str = "") -> None:
        self.send_option(Opt.EXPORT_NAME, name.encode(), name=name)

    def abort(self) -> None:
        self.send_option(Opt.ABORT)

    def list_exports(self) -> None:
        self.send_option(Opt.LIST)

    def starttls(self) -> None:
        self.send_option(Opt.STARTTLS)

    def structured_reply(self) -> None:
        self.send_option(Opt.STRUCTURED_REPLY)

    def extended_headers(self) -> None:
        self.send_option(Opt.EXTENDED_HEADERS)

    def info(self, name: str = "", requests: Iterable[int] = ()) -> None:
        self._info_or_go(Opt.INFO, name, tuple(requests))

    def go(self, name: str = "", requests: Iterable[int] = (Info.BLOCK_SIZE,)) -> None:
        self._info_or_go(Opt.GO, name, tuple(requests))

    def _info_or_go(self, option: Opt, name: str, requests: tuple[int, ...]) -> None:
        data = wire.build(wire.InfoRequest, {"name": name, "requests": list(requests)})
        self.send_option(option, data, name=name, requests=requests)

    def list_meta_context(self, name: str = "", queries: Iterable[str] = ()) -> None:
        self._meta(Opt.LIST_META_CONTEXT, name, queries)

    def set_meta_context(self, name: str = "", queries: Iterable[str] = ()) -> None:
        self._meta(Opt.SET_META_CONTEXT, name, queries)

    def _meta(self, option: Opt, name: str, queries: Iterable[str]) -> None:
        data = wire.build(wire.MetaContextRequest, {"name": name, "queries": list(queries)})
        self.send_option(option, data, name=name)

    # -- receiving -----------------------------------------------------------------------------

    def next_event(self) -> ClientEvent:
        state = self._state
        if state is _State.ERROR:
            raise RemoteProtocolError("the handshake already failed")
        if state is _State.ABORTED:
            return Closed() if self._buffer.eof else NEED_DATA
        if state is _State.DONE:
            raise LocalProtocolError("the handshake is over")
        try:
            event = self._greeting() if state is _State.GREETING else self._option_reply()
        except RemoteProtocolError:
            self._state = _State.ERROR
            raise
        if event is not None:
            return event
        buf = self._buffer
        if not buf.eof:
            return NEED_DATA
        if len(buf):
            self._state = _State.ERROR
            raise RemoteProtocolError(f"EOF inside a server message ({len(buf)} bytes)")
        self._state = _State.DONE
        return Closed()

    def _greeting(self) -> ServerGreeting | None:
        buf = self._buffer
        size = wire.Greeting.sizeof()
        if len(buf) < size:
            return None
        raw = buf.take(size)
        if raw[:8] != NBDMAGIC.to_bytes(8, "big") or raw[8:16] != IHAVEOPT.to_bytes(8, "big"):
            raise RemoteProtocolError("not a newstyle NBD server")
        flags = wire.parse(wire.Greeting, raw, "greeting").flags
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("the server does not speak fixed newstyle")
        client = ClientFlag.FIXED_NEWSTYLE
        if self._want_no_zeroes and flags & HandshakeFlag.NO_ZEROES:
            client |= ClientFlag.NO_ZEROES
            self._no_zeroes = True
        # Client flags go before any option already queued.
        self._out[:0] = wire.build(wire.ClientFlags, {"flags": client})
        self._state = _State.OPTIONS
        return ServerGreeting(flags)

    def _option_reply(self) -> ClientEvent | None:
        if not self._pending:
            if len(self._buffer):
                raise RemoteProtocolError("option reply without an option")
            return None
        pending = self._pending[0]
        if pending.option == Opt.EXPORT_NAME:
            return self._export_name_reply(pending)
        buf = self._buffer
        header = wire.OPTION_REPLY_HEADER
        if len(buf) < header.size:
            return None
        magic, option, kind, length = buf.unpack(header)
        if magic != REP_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic 0x{magic:016x}")
        if option != pending.option:
            raise RemoteProtocolError(f"reply for option {option}, expected {pending.option}")
        if length > MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too long")
        if len(buf) < header.size + length:
            return None
        buf.skip(header.size)
        payload = buf.take(length)
        opt = _opt(option)
        if kind == Rep.ACK:
            if payload:
                raise RemoteProtocolError("ACK with a payload")
            self._pending.popleft()
            return self._ack(pending, opt)
        if kind & 0x80000000:
            self._pending.popleft()
            if option == Opt.SET_META_CONTEXT:  # a failed SET still replaces the selection
                self._meta_export, self._meta_selected = None, {}
            try:
                rep: Rep | int = Rep(kind)
            except ValueError:
                rep = kind
            message = payload.decode("utf-8", "replace")
            return OptionError(opt, rep, message)
        if kind == Rep.SERVER and option == Opt.LIST:
            parsed = wire.parse(wire.RepServer, payload, "NBD_REP_SERVER")
            return ExportEntry(parsed.name, parsed.description)
        if kind == Rep.META_CONTEXT and option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            parsed = wire.parse(wire.RepMetaContext, payload, "NBD_REP_META_CONTEXT")
            if option == Opt.SET_META_CONTEXT:
                if parsed.context_id in pending.contexts:
                    raise RemoteProtocolError(f"duplicate context id {parsed.context_id}")
                pending.contexts[parsed.context_id] = parsed.name
            return MetaContext(opt, parsed.context_id, parsed.name)
        if kind == Rep.INFO and option in (Opt.INFO, Opt.GO):
            return self._info(pending, payload)
        raise RemoteProtocolError(f"unexpected reply type {kind} to option {option}")

    def _info(self, pending: _Pending, payload: bytes) -> ClientEvent | None:
        if len(payload) < 2:
            raise RemoteProtocolError("NBD_REP_INFO shorter than its type")
        kind = int.from_bytes(payload[:2], "big")
        event: InfoExport | InfoName | InfoDescription | InfoBlockSize
        if kind == Info.EXPORT:
            p = wire.parse(wire.InfoExport, payload, "NBD_INFO_EXPORT")
            event = InfoExport(p.size, TransmissionFlag(p.flags))
        elif kind == Info.NAME:
            event = InfoName(wire.parse(wire.InfoName, payload, "NBD_INFO_NAME").name)
        elif kind == Info.DESCRIPTION:
            p = wire.parse(wire.InfoDescription, payload, "NBD_INFO_DESCRIPTION")
            event = InfoDescription(p.description)
        elif kind == Info.BLOCK_SIZE:
            p = wire.parse(wire.InfoBlockSize, payload, "NBD_INFO_BLOCK_SIZE")
            event = InfoBlockSize(p.minimum, p.preferred, p.maximum)
        else:
            return self._option_reply()  # unknown info types are to be ignored
        pending.infos[kind] = event
        return event

    def _ack(self, pending: _Pending, opt: Opt | int) -> ClientEvent:
        if opt is Opt.STRUCTURED_REPLY:
            self.structured = True
        elif opt is Opt.EXTENDED_HEADERS:
            self.extended = True
            self.structured = True
        elif opt is Opt.SET_META_CONTEXT:
            self._meta_export = pending.name
            self._meta_selected = dict(pending.contexts)
        elif opt is Opt.STARTTLS:
            self._state = _State.TLS_PENDING
        elif opt is Opt.ABORT:
            self._state = _State.ABORTED
        elif opt is Opt.GO:
            return self._go_ready(pending)
        return OptionAck(opt)

    def _go_ready(self, pending: _Pending) -> Ready:
        info = pending.infos.get(Info.EXPORT)
        if not isinstance(info, InfoExport):
            raise RemoteProtocolError("GO succeeded without NBD_INFO_EXPORT")
        name_info = pending.infos.get(Info.NAME)
        desc = pending.infos.get(Info.DESCRIPTION)
        sizes = pending.infos.get(Info.BLOCK_SIZE)
        block_size = (
            (sizes.minimum, sizes.preferred, sizes.maximum)
            if isinstance(sizes, InfoBlockSize)
            else None
        )
        committed = block_size if Info.BLOCK_SIZE in pending.requests else None
        contexts = self._meta_selected if self._meta_export == pending.name else {}
        return self._ready(
            ExportInfo(
                name=name_info.name if isinstance(name_info, InfoName) else pending.name,
                size=info.size,
                flags=info.flags,
                description=desc.description if isinstance(desc, InfoDescription) else "",
                block_size=block_size,
                contexts=tuple(contexts.values()),
            ),
            info.flags,
            contexts,
            committed,
        )

    def _export_name_reply(self, pending: _Pending) -> Ready | None:
        schema = wire.ExportNameReplyShort if self._no_zeroes else wire.ExportNameReply
        size = schema.sizeof()
        if len(self._buffer) < size:
            return None
        parsed = wire.parse(schema, self._buffer.take(size), "EXPORT_NAME reply")
        self._pending.popleft()
        flags = TransmissionFlag(parsed.flags)
        contexts = self._meta_selected if self._meta_export == pending.name else {}
        export = ExportInfo(pending.name, parsed.size, flags, contexts=tuple(contexts.values()))
        return self._ready(export, flags, contexts, None)

    def _ready(
        self,
        export: ExportInfo,
        flags: TransmissionFlag,
        contexts: dict[int, str],
        block_size: tuple[int, int, int] | None,
    ) -> Ready:
        self._state = _State.DONE
        session = Session(
            export=export,
            flags=flags,
            structured=self.structured,
            extended=self.extended,
            contexts=dict(contexts),
            block_size=block_size,
            tls=self._tls,
        )
        return Ready(session, self._buffer.take_all())


def _opt(option: int) -> Opt | int:
    try:
        return Opt(option)
    except ValueError:
        return option
