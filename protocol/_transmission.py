"""The transmission phase, server and client side (nbd-protocol.md §4, §6.3, §7).

The hot path (a compact request parsed, a simple reply or a READ reply built) uses the
``struct`` mirrors of the schemas in ``_wire``; everything else goes through construct.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import cast

from . import _wire as wire
from ._buffer import _COMPACT_AT, ReceiveBuffer
from ._constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
    ReplyFlag,
    ReplyType,
)
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import (
    NEED_DATA,
    BlockStatusReply,
    Buffer,
    Closed,
    Disconnect,
    ErrorReply,
    NeedData,
    ReadData,
    ReadHole,
    ReplyDone,
    Request,
    Session,
    new_request,
)
from ._validate import Validator

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "DIRECT_PAYLOAD_MIN",
    "MAX_ERROR_MESSAGE",
    "MAX_EXTENTS",
    "ClientTransmission",
    "PlainRequest",
    "ReadPiece",
    "ServerTransmission",
]

#: Largest READ/WRITE payload a server accepts by default (the spec's 32 MiB default). A WRITE
#: payload above the server's limit is a denial of service: the server disconnects (as qemu).
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024
#: WRITE payloads at least this long get a buffer of their own from the payload allocator, and
#: the caller may receive the rest of one straight into it (``payload_buffer()``): a large
#: payload is then never copied in user space. Smaller ones are cheaper to copy.
DIRECT_PAYLOAD_MIN = 64 * 1024
#: Gives a writable buffer of exactly the requested size for a large WRITE payload.
PayloadAllocator = Callable[[int], memoryview]
#: A valid READ or WRITE from :meth:`ServerTransmission.next_plain`: (command, flags, cookie,
#: offset, length, WRITE payload or None), the command and flags as plain ints.
PlainRequest = tuple[int, int, int, int, int, "bytes | bytearray | memoryview | None"]
#: Error chunk messages are cut to this many UTF-8 bytes: qemu's client refuses non-data chunk
#: payloads over 1000 bytes.
MAX_ERROR_MESSAGE = 896
#: Extents sent per BLOCK_STATUS chunk at most (qemu's cap, 2**17); the rest is left out, which
#: the spec allows (the client asks again from where the reply ended).
MAX_EXTENTS = 1 << 17

_U32_MAX = 0xFFFFFFFF
# Longest extent a compact BLOCK_STATUS chunk can carry, kept a multiple of any legal minimum
# block size (≤ 64 KiB) so clamping never produces a misaligned extent.
_MAX_COMPACT_EXTENT = 0xFFFF0000

#: One piece of a structured READ reply: (offset, data) or (offset, hole length).
ReadPiece = tuple[int, Buffer] | tuple[int, int]

_CMD_BY_VALUE: dict[int, Cmd] = {int(c): c for c in Cmd}
_FLAGS_BY_VALUE: dict[int, CmdFlag] = {v: CmdFlag(v) for v in range(int(max(CmdFlag)) * 2)}
_DONE = int(ReplyFlag.DONE)
_pack_simple = wire.SIMPLE_REPLY.pack
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_WRITE = int(Cmd.WRITE)  # READ is 0


class _State(Enum):
    OPEN = "open"
    DISCONNECTED = "disconnected"  # NBD_CMD_DISC received or sent
    CLOSED = "closed"  # EOF seen
    ERROR = "error"  # the peer broke the protocol


def _bytearray_view(length: int) -> memoryview:
    return memoryview(bytearray(length))


def _truncate_message(message: str) -> bytes:
    raw = message.encode("utf-8", "replace")
    if len(raw) > MAX_ERROR_MESSAGE:
        raw = raw[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode()
    return raw


class ServerTransmission:
    """Server side of the transmission phase.

    Feed bytes with :meth:`receive_data`, take :class:`Request`, :class:`Disconnect` or
    :class:`Closed` events from :meth:`next_event`, and build replies with the ``reply*``
    methods, which pick simple, structured or extended framing from the session. Replies are
    returned, not queued: requests may be answered in any order, and the caller writes each
    returned reply as one unit (one ``sendmsg``) so replies never interleave on the wire.

    Memory is bounded: a request's payload is read only if it fits ``max_payload``; a bigger
    WRITE payload raises :class:`RemoteProtocolError` as soon as its header arrives.

    A WRITE payload of at least :data:`DIRECT_PAYLOAD_MIN` bytes goes into a buffer from
    ``payload_allocator`` (a ``bytearray`` by default; a server may hand out page-aligned
    pooled memory). While one is incomplete, :meth:`payload_buffer` returns the part still
    missing: receive into it and report the count with :meth:`payload_received`, or keep
    feeding :meth:`receive_data` as usual; both give the same events.
    """

    def __init__(
        self,
        session: Session,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        leftover: bytes = b"",
        payload_allocator: PayloadAllocator = _bytearray_view,
    ) -> None:
        if max_payload <= 0:
            raise LocalProtocolError("max_payload must be positive")
        self.session = session
        self.max_payload = max_payload
        self._buffer = ReceiveBuffer(leftover)
        self._state = _State.OPEN
        self._validator = Validator(session, max_payload)
        self._extended = session.extended
        self._structured = session.structured
        if session.extended:
            self._header = wire.EXTENDED_REQUEST
            self._magic = EXTENDED_REQUEST_MAGIC
        else:
            self._header = wire.REQUEST
            self._magic = REQUEST_MAGIC
        self._header_size = self._header.size
        self._plain_rules = self._validator.plain_rules
        self._allocate = payload_allocator
        # A large WRITE whose header is parsed and whose payload is still arriving: the
        # header's fields, the payload buffer and how much of it is filled.
        self._head: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
        self._payload: memoryview | None = None
        self._filled = 0

    # -- receiving -----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        if self._payload is not None:
            return self._header_size + self._filled + len(self._buffer)
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the client; ``b""`` means EOF.

        Drain :meth:`next_event` until NEED_DATA before feeding more: the buffer then never
        holds more than one incomplete request (header + at most ``max_payload``) plus the
        bytes just fed.
        """
        payload = self._payload
        if payload is not None and data:
            filled = self._filled
            n = min(len(data), len(payload) - filled)
            if n:
                payload[filled : filled + n] = data[:n]
                self._filled = filled + n
                if n == len(data):
                    return
                data = memoryview(data)[n:]
        self._buffer.feed(data)

    def payload_buffer(self) -> memoryview | None:
        """The missing part of a large WRITE payload, to receive into directly; None when
        no payload is in progress. Report what arrived with :meth:`payload_received`."""
        payload = self._payload
        if payload is None or self._filled == len(payload):
            return None
        return payload[self._filled :]

    def header_missing(self) -> int:
        """How many more bytes complete the next request header (0 when none is missing).
        A caller expecting another large WRITE receives just that much first: its payload
        then lands in its own buffer (:meth:`payload_buffer`) instead of being copied out
        of the receive buffer."""
        if self._payload is not None:
            return 0
        return max(0, self._header_size - len(self._buffer))

    def payload_received(self, n: int) -> None:
        """``n`` bytes were written into the :meth:`payload_buffer`; 0 means EOF."""
        payload = self._payload
        if payload is None or not 0 <= n <= len(payload) - self._filled:
            raise LocalProtocolError(f"payload_received({n}) without that much room")
        if n == 0:
            self._buffer.feed(b"")
        self._filled += n

    def next_event(self) -> Request | Disconnect | Closed | NeedData:
        """The next complete request, or NEED_DATA.

        Raises:
            RemoteProtocolError: bad magic, an oversized payload, EOF inside a message, or
                data after NBD_CMD_DISC. Drop the connection.
        """
        return cast("Request | Disconnect | Closed | NeedData", self._next(False))

    def next_plain(self) -> PlainRequest | Request | Disconnect | Closed | NeedData:
        """:meth:`next_event`, except that a valid READ or WRITE comes as a
        :data:`PlainRequest` tuple: a server's hot path then builds no object for the
        requests it answers at once. :meth:`as_request` turns the tuple into the
        :class:`Request` that :meth:`next_event` would have returned (tested)."""
        return self._next(True)

    def as_request(self, plain: PlainRequest) -> Request:
        """The :class:`Request` of a tuple from :meth:`next_plain`."""
        cmd, flags, cookie, offset, length, data = plain
        cmd_flags = _FLAGS_BY_VALUE.get(flags)
        if cmd_flags is None:
            cmd_flags = CmdFlag(flags)
        return new_request(cookie, _CMD_BY_VALUE[cmd], cmd_flags, offset, length, data)

    def _next(self, plain: bool) -> PlainRequest | Request | Disconnect | Closed | NeedData:
        state = self._state
        if state is not _State.OPEN:
            return self._next_event_closing(state)
        buf = self._buffer
        payload = self._payload
        if payload is not None:
            if self._filled < len(payload):
                if buf.eof:
                    self._state = _State.ERROR
                    raise RemoteProtocolError(
                        f"EOF inside a request ({self.buffered} bytes buffered)"
                    )
                return NEED_DATA
            self._payload = None
            flags, cmd_value, cookie, offset, length = self._head
            return self._request(flags, cmd_value, cookie, offset, length, payload, plain)
        # The buffer's fields are read here directly: this runs once per request, and each
        # method call on the buffer would cost as much as the work it does.
        raw, pos = buf._buf, buf._pos
        available = len(raw) - pos
        header_size = self._header_size
        if available < header_size:
            return self._short(available)
        magic, flags, cmd_value, cookie, offset, length = self._header.unpack_from(raw, pos)
        if magic != self._magic:
            self._state = _State.ERROR
            kind = "extended" if self._extended else "compact"
            raise RemoteProtocolError(f"bad {kind} request magic 0x{magic:08x}")
        # Payload framing comes first: even a request we reject must have its payload consumed.
        if cmd_value == _WRITE or (flags & _PAYLOAD_LEN and self._extended):
            if length > self.max_payload:
                self._state = _State.ERROR
                raise RemoteProtocolError(
                    f"payload of {length} bytes exceeds the limit {self.max_payload}"
                )
            if length >= DIRECT_PAYLOAD_MIN:
                buf.skip(header_size)
                payload = self._allocate(length)
                filled = buf.take_into(payload)
                if filled < length:
                    self._head = (flags, cmd_value, cookie, offset, length)
                    self._payload, self._filled = payload, filled
                    return self._next(plain)  # NEED_DATA, or the error at EOF
                data: bytes | bytearray | memoryview | None = payload
            elif available < header_size + length:
                return self._short(available)
            else:  # a small payload: copied out of the buffer (inline, as below)
                start = pos + header_size
                pos = start + length
                data = raw[start:pos]
                buf._pos = pos
                if pos == len(raw) or pos >= _COMPACT_AT:
                    buf.skip(0)
        else:
            pos += header_size
            buf._pos = pos
            if pos == len(raw) or pos >= _COMPACT_AT:
                buf.skip(0)  # let the buffer drop what is consumed
            data = None
        if plain and cmd_value <= _WRITE:
            # Validator.check's verdict on a valid READ or WRITE, inline: this runs once per
            # request. Anything it does not pass goes to the full check below.
            read_flags, write_flags, size, mask, max_io = self._plain_rules
            allowed = write_flags if cmd_value else read_flags
            if (
                allowed >= 0
                and not flags & ~allowed
                and offset <= size
                and length <= size - offset
                and length <= max_io
                and mask >= 0
                and not (offset | length) & mask
            ):
                return (cmd_value, flags, cookie, offset, length, data)
        return self._request(flags, cmd_value, cookie, offset, length, data, plain)

    def _request(
        self,
        flags: int,
        cmd_value: int,
        cookie: int,
        offset: int,
        length: int,
        data: bytes | bytearray | memoryview | None,
        plain: bool,
    ) -> PlainRequest | Request | Disconnect:
        cmd = _CMD_BY_VALUE.get(cmd_value)
        cmd_flags = _FLAGS_BY_VALUE.get(flags)
        if cmd_flags is None:
            cmd_flags = CmdFlag(flags)
        if cmd is None:
            return new_request(
                cookie, cmd_value, cmd_flags, offset, length, data,
                Errno.EINVAL, f"unknown command {cmd_value}",
            )  # fmt: skip
        if cmd is Cmd.DISC:
            self._state = _State.DISCONNECTED
            return Disconnect()
        problem = self._validator.check(cmd, flags, offset, length)
        if problem is None:
            if plain and (cmd is Cmd.READ or cmd is Cmd.WRITE):
                return (cmd_value, flags, cookie, offset, length, data)
            return new_request(cookie, cmd, cmd_flags, offset, length, data)
        return new_request(cookie, cmd, cmd_flags, offset, length, data, problem[0], problem[1])

    def _short(self, available: int) -> NeedData | Closed:
        if not self._buffer.eof:
            return NEED_DATA
        if available == 0:
            self._state = _State.CLOSED
            return Closed()
        self._state = _State.ERROR
        raise RemoteProtocolError(f"EOF inside a request ({available} bytes buffered)")

    def _next_event_closing(self, state: _State) -> Disconnect | Closed | NeedData:
        if state is _State.ERROR:
            raise RemoteProtocolError("the connection already failed")
        if len(self._buffer):
            self._state = _State.ERROR
            raise RemoteProtocolError("data after NBD_CMD_DISC")
        if self._buffer.eof:
            self._state = _State.CLOSED
            return Closed()
        return NEED_DATA

    # -- replying ------------------------------------------------------------------------------

    def reply(
        self, request: Request, error: int = 0, message: str = "", *, offset: int | None = None
    ) -> bytes:
        """The whole reply to a request that carries no data back.

        Use it for every command but a successful READ or BLOCK_STATUS, and for errors on
        any command. With ``error=0`` on a request that failed validation, the request's own
        error and message are used. Framing: an error chunk (with ``message``) under
        structured replies, a NONE chunk for success under extended headers, a simple reply
        otherwise. ``offset`` (structured only) pins the failing byte of a READ: an
        ERROR_OFFSET chunk instead of ERROR.
        """
        if error == 0 and request.error is not None:
            error, message = request.error, request.message
        if not 0 <= error <= _U32_MAX:
            raise LocalProtocolError(f"error value {error} out of range")
        cmd = request.cmd
        if cmd is Cmd.DISC:
            raise LocalProtocolError("NBD_CMD_DISC has no reply")
        if error == 0:
            if cmd is Cmd.READ:
                raise LocalProtocolError("a successful READ needs reply_read()")
            if cmd is Cmd.BLOCK_STATUS:
                raise LocalProtocolError("a successful BLOCK_STATUS needs reply_block_status()")
            if self._extended:
                return wire.EXTENDED_CHUNK_HEADER.pack(
                    EXTENDED_REPLY_MAGIC, _DONE, ReplyType.NONE, request.cookie,
                    request.offset, 0,
                )  # fmt: skip
            return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, request.cookie)
        if self._structured:
            payload = self.error_payload(error, message)
            if offset is None:
                return self._chunk(request, _DONE, ReplyType.ERROR, payload)
            if not request.offset <= offset < request.offset + request.length:
                raise LocalProtocolError(f"error offset {offset} outside the request")
            payload += wire.U64.pack(offset)
            return self._chunk(request, _DONE, ReplyType.ERROR_OFFSET, payload)
        return wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, request.cookie)

    @staticmethod
    def error_payload(error: int, message: str) -> bytes:
        raw = _truncate_message(message)
        return wire.U32.pack(error) + wire.U16.pack(len(raw)) + raw

    def reply_read(self, request: Request, data: Buffer) -> list[Buffer]:
        """A whole successful READ: the header(s), then ``data`` itself, uncopied."""
        if request.cmd is not Cmd.READ:
            raise LocalProtocolError("reply_read() is for READ requests")
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if size != request.length:
            raise LocalProtocolError(f"READ of {request.length} bytes answered with {size}")
        cookie = request.cookie
        if not self._structured:
            return [wire.SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        if size == 0:  # a chunk must cover at least one byte
            return [self._chunk(request, _DONE, ReplyType.NONE, b"")]
        if self._extended:
            head = wire.EXTENDED_CHUNK_HEADER_OFFSET.pack(
                EXTENDED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie,
                request.offset, size + 8, request.offset,
            )  # fmt: skip
        else:
            head = wire.CHUNK_HEADER_OFFSET.pack(
                STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie,
                size + 8, request.offset,
            )  # fmt: skip
        return [head, data]

    def reply_ok_plain(self, plain: PlainRequest) -> bytes:
        """:meth:`reply` for a WRITE from :meth:`next_plain` that succeeded."""
        if self._extended:
            return wire.EXTENDED_CHUNK_HEADER.pack(
                EXTENDED_REPLY_MAGIC, _DONE, ReplyType.NONE, plain[2], plain[3], 0
            )
        return _pack_simple(SIMPLE_REPLY_MAGIC, 0, plain[2])

    def reply_read_plain(self, plain: PlainRequest, data: Buffer) -> list[Buffer]:
        """:meth:`reply_read` for a READ from :meth:`next_plain`."""
        size = len(data) if not isinstance(data, memoryview) else data.nbytes
        if size != plain[4] or not size:
            return self.reply_read(self.as_request(plain), data)
        return [self.reply_read_head_plain(plain), data]

    def reply_read_head_plain(self, plain: PlainRequest) -> bytes:
        """What precedes the data of a whole successful READ from :meth:`next_plain` (of at
        least one byte): the caller sends all ``length`` bytes right after it, for instance
        with ``sendfile`` from the file that holds them."""
        cookie, offset, length = plain[2], plain[3], plain[4]
        if not self._structured:
            return _pack_simple(SIMPLE_REPLY_MAGIC, 0, cookie)
        if self._extended:
            return wire.EXTENDED_CHUNK_HEADER_OFFSET.pack(
                EXTENDED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie,
                offset, length + 8, offset,
            )  # fmt: skip
        return wire.CHUNK_HEADER_OFFSET.pack(
            STRUCTURED_REPLY_MAGIC, _DONE, ReplyType.OFFSET_DATA, cookie, length + 8, offset
        )

    def reply_read_chunks(
        self, request: Request, pieces: Sequence[ReadPiece], *, done: bool = True
    ) -> list[Buffer]:
        """A structured READ reply made of OFFSET_DATA and OFFSET_HOLE chunks.

        ``pieces`` are ``(offset, data)`` or ``(offset, hole_length)``, in any order, each
        inside the request and not overlapping. With ``done`` (the default) they must cover
        the whole request and the last chunk carries DONE; with ``done=False`` the reply
        stays open, to be finished by another call or by an error ``reply()``.
        """
        if not self._structured:
            raise LocalProtocolError("chunked READ replies need structured replies")
        if request.cmd is not Cmd.READ:
            raise LocalProtocolError("reply_read_chunks() is for READ requests")
        if request.flags & CmdFlag.DF and len(pieces) > 1:
            raise LocalProtocolError("a DF read allows one content chunk")
        start, end = request.offset, request.offset + request.length
        spans: list[tuple[int, int]] = []
        out: list[Buffer] = []
        last = len(pieces) - 1
        for i, (offset, body) in enumerate(pieces):
            flags = _DONE if done and i == last else 0
            if isinstance(body, int):
                size = body
                if size > _U32_MAX:
                    raise LocalProtocolError("a hole chunk covers at most 4 GiB - 1")
                payload: bytes = wire.OFFSET_HOLE.pack(offset, size)
                out.append(self._chunk(request, flags, ReplyType.OFFSET_HOLE, payload))
            else:
                size = len(body) if not isinstance(body, memoryview) else body.nbytes
                out.append(self._chunk_head(request, flags, ReplyType.OFFSET_DATA, size + 8))
                out.append(wire.U64.pack(offset))
                out.append(body)
            if size <= 0 or offset < start or offset + size > end:
                raise LocalProtocolError(f"piece ({offset}, {size}) outside [{start}, {end})")
            spans.append((offset, offset + size))
        spans.sort()
        covered = 0
        for i, (lo, hi) in enumerate(spans):
            if i and lo < spans[i - 1][1]:
                raise LocalProtocolError(f"pieces overlap at offset {lo}")
            covered += hi - lo
        if done:
            if covered != request.length:
                raise LocalProtocolError(
                    f"pieces cover {covered} of the {request.length} bytes requested"
                )
            if not pieces:
                out.append(self._chunk(request, _DONE, ReplyType.NONE, b""))
        return out

    def reply_block_status(
        self, request: Request, extents: Mapping[int, Sequence[tuple[int, int]]]
    ) -> bytes:
        """A successful BLOCK_STATUS reply: one chunk per selected context, DONE on the last.

        ``extents`` maps each selected context id to consecutive ``(length, flags)`` extents
        from the request's offset. They are trimmed to what the spec allows: one extent
        (clamped to the request length) under REQ_ONE, no extents past the first one that
        reaches the end of the request, at most :data:`MAX_EXTENTS`, and in compact mode no
        extent over 32 bits.
        """
        if request.cmd is not Cmd.BLOCK_STATUS:
            raise LocalProtocolError("reply_block_status() is for BLOCK_STATUS requests")
        if set(extents) != set(self.session.contexts):
            raise LocalProtocolError(
                f"extents for contexts {sorted(extents)}, selected {sorted(self.session.contexts)}"
            )
        out = []
        last = len(extents) - 1
        for i, (context_id, items) in enumerate(extents.items()):
            trimmed = self._trim_extents(request, items)
            flags = _DONE if i == last else 0
            if self._extended:
                payload = b"".join(
                    [wire.U32.pack(context_id), wire.U32.pack(len(trimmed))]
                    + [wire.U64.pack(n) + wire.U64.pack(f) for n, f in trimmed]
                )
                out.append(self._chunk(request, flags, ReplyType.BLOCK_STATUS_EXT, payload))
            else:
                payload = b"".join(
                    [wire.U32.pack(context_id)]
                    + [wire.U32.pack(n) + wire.U32.pack(f) for n, f in trimmed]
                )
                out.append(self._chunk(request, flags, ReplyType.BLOCK_STATUS, payload))
        return b"".join(out)

    def _trim_extents(
        self, request: Request, items: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        if not items:
            raise LocalProtocolError("a BLOCK_STATUS chunk needs at least one extent")
        limit = request.length
        if request.flags & CmdFlag.REQ_ONE:
            length, flags = items[0]
            items = [(min(length, limit), flags)]
        compact = not self._extended
        out: list[tuple[int, int]] = []
        total = 0
        for length, flags in items:
            if length <= 0:
                raise LocalProtocolError(f"extent length {length} must be positive")
            if compact and flags > _U32_MAX:
                raise LocalProtocolError("64-bit status needs extended headers")
            if compact and length > _MAX_COMPACT_EXTENT:
                # The rest cannot follow a shortened extent; the client asks again from there.
                out.append((_MAX_COMPACT_EXTENT, flags))
                break
            out.append((length, flags))
            total += length
            if total >= limit or len(out) == MAX_EXTENTS:
                break
        return out

    def _chunk_head(self, request: Request, flags: int, kind: int, length: int) -> bytes:
        if self._extended:
            return wire.EXTENDED_CHUNK_HEADER.pack(
                EXTENDED_REPLY_MAGIC, flags, kind, request.cookie, request.offset, length
            )
        return wire.CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, request.cookie, length)

    def _chunk(self, request: Request, flags: int, kind: int, payload: bytes) -> bytes:
        return self._chunk_head(request, flags, kind, len(payload)) + payload


class ClientTransmission:
    """Client side of the transmission phase (tests, benchmarks, a future client driver).

    :meth:`send` turns a :class:`Request` into buffers to write; :meth:`next_event` turns
    the server's replies into :class:`ReadData`, :class:`ReadHole`,
    :class:`BlockStatusReply` and :class:`ErrorReply` events, each reply ending with one
    :class:`ReplyDone`. The client sends what it is told, invalid requests included, so
    tests can probe a server; it only refuses what it could not frame.
    """

    def __init__(
        self,
        session: Session,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        leftover: bytes = b"",
    ) -> None:
        self.session = session
        # A reply chunk may exceed the payload limit by its fixed overhead, and block status
        # chunks may be larger still (up to 2**20 extents).
        self.max_chunk = max(max_payload + 64, 16 * (1 << 20) + 64)
        self._buffer = ReceiveBuffer(leftover)
        self._state = _State.OPEN
        self._inflight: dict[int, Request] = {}
        self._errors: dict[int, int] = {}
        self._pending: deque[ReadData | ReadHole | BlockStatusReply | ErrorReply | ReplyDone]
        self._pending = deque()
        self._next_cookie = 1

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def new_cookie(self) -> int:
        """A cookie not used by any request in flight."""
        while True:
            cookie = self._next_cookie
            self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF
            if cookie not in self._inflight:
                return cookie

    def send(self, request: Request) -> list[Buffer]:
        """The buffers of one request (header, then a WRITE's payload, uncopied)."""
        if self._state is not _State.OPEN:
            raise LocalProtocolError(f"cannot send a request: connection is {self._state.value}")
        if request.cookie in self._inflight:
            raise LocalProtocolError(f"cookie {request.cookie} is already in flight")
        flags = int(request.flags)
        length = request.length
        data = request.data
        if data is not None:
            size = len(data) if not isinstance(data, memoryview) else data.nbytes
            if size != length:
                raise LocalProtocolError(f"payload of {size} bytes but length {length}")
            if self.session.extended:
                flags |= CmdFlag.PAYLOAD_LEN
        elif request.cmd is Cmd.WRITE:
            raise LocalProtocolError("WRITE needs data")
        if self.session.extended:
            head = wire.EXTENDED_REQUEST.pack(
                EXTENDED_REQUEST_MAGIC, flags, request.cmd, request.cookie, request.offset, length
            )
        else:
            if length > _U32_MAX:
                raise LocalProtocolError("compact requests have 32-bit lengths")
            head = wire.REQUEST.pack(
                REQUEST_MAGIC, flags, request.cmd, request.cookie, request.offset, length
            )
        if request.cmd is Cmd.DISC:
            self._state = _State.DISCONNECTED
        else:
            self._inflight[request.cookie] = request
        return [head] if data is None else [head, data]

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer.feed(data)

    def next_event(
        self,
    ) -> ReadData | ReadHole | BlockStatusReply | ErrorReply | ReplyDone | Closed | NeedData:
        if self._pending:
            return self._pending.popleft()
        if self._state is _State.ERROR:
            raise RemoteProtocolError("the connection already failed")
        if self._state is _State.CLOSED:
            return Closed()
        try:
            self._parse_reply()
        except RemoteProtocolError:
            self._state = _State.ERROR
            raise
        if self._pending:
            return self._pending.popleft()
        buf = self._buffer
        if not buf.eof:
            return NEED_DATA
        if len(buf):
            self._state = _State.ERROR
            raise RemoteProtocolError(f"EOF inside a reply ({len(buf)} bytes buffered)")
        self._state = _State.CLOSED
        return Closed()

    def _parse_reply(self) -> None:
        buf = self._buffer
        if len(buf) < 4:
            return
        (magic,) = buf.unpack(wire.U32)
        if magic == SIMPLE_REPLY_MAGIC:
            self._parse_simple()
        elif magic == STRUCTURED_REPLY_MAGIC and not self.session.extended:
            if not self.session.structured:
                raise RemoteProtocolError("structured reply without structured replies")
            self._parse_chunk(wire.CHUNK_HEADER)
        elif magic == EXTENDED_REPLY_MAGIC and self.session.extended:
            self._parse_chunk(wire.EXTENDED_CHUNK_HEADER)
        else:
            raise RemoteProtocolError(f"bad reply magic 0x{magic:08x}")

    def _request_for(self, cookie: int) -> Request:
        request = self._inflight.get(cookie)
        if request is None:
            raise RemoteProtocolError(f"reply for unknown cookie {cookie}")
        return request

    def _finish(self, cookie: int, error: int) -> None:
        del self._inflight[cookie]
        first = self._errors.pop(cookie, 0)
        self._pending.append(ReplyDone(cookie, first or error))

    def _parse_simple(self) -> None:
        if self.session.extended:
            raise RemoteProtocolError("simple reply under extended headers")
        buf = self._buffer
        if len(buf) < wire.SIMPLE_REPLY.size:
            return
        _, error, cookie = buf.unpack(wire.SIMPLE_REPLY)
        request = self._request_for(cookie)
        if request.cmd is Cmd.READ and error == 0:
            if self.session.structured:
                raise RemoteProtocolError("simple reply to READ under structured replies")
            if len(buf) < wire.SIMPLE_REPLY.size + request.length:
                return
            buf.skip(wire.SIMPLE_REPLY.size)
            data = buf.take(request.length)
            if data:
                self._pending.append(ReadData(cookie, request.offset, data))
        else:
            buf.skip(wire.SIMPLE_REPLY.size)
        self._finish(cookie, error)

    def _parse_chunk(self, header: struct.Struct) -> None:
        buf = self._buffer
        if len(buf) < header.size:
            return
        fields = buf.unpack(header)
        flags, kind, cookie, length = fields[1], fields[2], fields[3], fields[-1]
        if length > self.max_chunk:
            raise RemoteProtocolError(f"reply chunk of {length} bytes is too long")
        if len(buf) < header.size + length:
            return
        request = self._request_for(cookie)
        if self.session.extended and fields[4] != request.offset:
            raise RemoteProtocolError("extended reply offset differs from the request's")
        buf.skip(header.size)
        payload = buf.take(length)
        self._pending.extend(self._chunk_events(request, flags, kind, payload))
        if flags & _DONE:
            self._finish(cookie, 0)

    def _chunk_events(
        self, request: Request, flags: int, kind: int, payload: bytes
    ) -> list[ReadData | ReadHole | BlockStatusReply | ErrorReply]:
        cookie = request.cookie
        start, end = request.offset, request.offset + request.length
        if kind == ReplyType.NONE:
            if payload or not flags & _DONE:
                raise RemoteProtocolError("NONE chunk must be empty and carry DONE")
            return []
        if kind == ReplyType.OFFSET_DATA or kind == ReplyType.OFFSET_HOLE:
            if request.cmd is not Cmd.READ:
                raise RemoteProtocolError(f"read chunk in reply to {request.cmd!r}")
            if kind == ReplyType.OFFSET_DATA:
                parsed = wire.parse(wire.OffsetData, payload, "OFFSET_DATA chunk")
                offset, size = parsed.offset, len(parsed.data)
                event: ReadData | ReadHole = ReadData(cookie, offset, parsed.data)
            else:
                parsed = wire.parse(wire.OffsetHole, payload, "OFFSET_HOLE chunk")
                offset, size = parsed.offset, parsed.length
                event = ReadHole(cookie, offset, size)
            if size == 0 or offset < start or offset + size > end:
                raise RemoteProtocolError(f"read chunk ({offset}, {size}) outside the request")
            return [event]
        if kind == ReplyType.BLOCK_STATUS or kind == ReplyType.BLOCK_STATUS_EXT:
            if request.cmd is not Cmd.BLOCK_STATUS:
                raise RemoteProtocolError(f"block status chunk in reply to {request.cmd!r}")
            extended = kind == ReplyType.BLOCK_STATUS_EXT
            if extended != self.session.extended:
                raise RemoteProtocolError("block status chunk type does not match the headers")
            schema = wire.BlockStatusExt if extended else wire.BlockStatus
            parsed = wire.parse(schema, payload, "block status chunk")
            if not parsed.extents or any(e.length == 0 for e in parsed.extents):
                raise RemoteProtocolError("block status chunk with no or empty extents")
            if parsed.context_id not in self.session.contexts:
                raise RemoteProtocolError(f"block status for unknown context {parsed.context_id}")
            extents = tuple((e.length, e.flags) for e in parsed.extents)
            return [BlockStatusReply(cookie, parsed.context_id, extents)]
        if kind == ReplyType.ERROR or kind == ReplyType.ERROR_OFFSET:
            if kind == ReplyType.ERROR:
                parsed = wire.parse(wire.ErrorChunk, payload, "error chunk")
                offset_or_none = None
            else:
                parsed = wire.parse(wire.ErrorOffsetChunk, payload, "error chunk")
                offset_or_none = parsed.offset
            if parsed.error == 0:
                raise RemoteProtocolError("error chunk with error 0")
            self._errors.setdefault(cookie, parsed.error)
            return [ErrorReply(cookie, parsed.error, parsed.message, offset_or_none)]
        if kind & 0x8000:  # unknown error chunk: the spec says treat it as an error
            self._errors.setdefault(cookie, int(Errno.EINVAL))
            return [ErrorReply(cookie, int(Errno.EINVAL), f"unknown error chunk type {kind}")]
        raise RemoteProtocolError(f"unknown reply chunk type {kind}")
