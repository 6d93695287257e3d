"""A small async NBD client for the server tests, built on protocol's client side."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol import (
    NEED_DATA,
    BlockStatusReply,
    ClientHandshake,
    ClientTransmission,
    Closed,
    Cmd,
    CmdFlag,
    ErrorReply,
    Info,
    OptionError,
    ReadData,
    ReadHole,
    Ready,
    ReplyDone,
    Request,
    ServerGreeting,
    Session,
)

NO_FLAGS = CmdFlag(0)


@dataclass
class Reply:
    cookie: int
    error: int = 0
    messages: list[str] = field(default_factory=list)
    chunks: list[Any] = field(default_factory=list)
    extents: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    request: Request | None = None

    def data(self) -> bytes:
        """READ content reassembled from data and hole chunks."""
        assert self.request is not None
        buf = bytearray(self.request.length)
        base = self.request.offset
        for c in self.chunks:
            if isinstance(c, ReadData):
                buf[c.offset - base:c.offset - base + len(c.data)] = c.data
        return bytes(buf)

    @property
    def holes(self) -> list[tuple[int, int]]:
        return [(c.offset, c.length) for c in self.chunks if isinstance(c, ReadHole)]


class HandshakeRefused(Exception):
    def __init__(self, error: OptionError) -> None:
        super().__init__(f"{error.option!r}: {error.reply!r} {error.message}")
        self.error = error


class NBDClient:
    def __init__(self, stream: trio.SocketStream, session: Session, leftover: bytes,
                 options: list[Any]) -> None:
        self.stream = stream
        self.session = session
        self.options = options
        self.tx = ClientTransmission(session, leftover=leftover)
        self.replies: dict[int, Reply] = {}
        self._requests: dict[int, Request] = {}
        self._partial: dict[int, Reply] = {}

    @classmethod
    async def connect(cls, path: str, *, export: str = "", structured: bool = True,
                      extended: bool = False, contexts: Iterable[str] = (),
                      block_size: bool = True, export_name: bool = False) -> NBDClient:
        stream = await trio.open_unix_socket(path)
        try:
            return await cls.handshake(stream, export=export, structured=structured,
                                       extended=extended, contexts=contexts,
                                       block_size=block_size, export_name=export_name)
        except BaseException:
            await stream.aclose()
            raise

    @classmethod
    async def handshake(cls, stream: Any, *, export: str = "", structured: bool = True,
                        extended: bool = False, contexts: Iterable[str] = (),
                        block_size: bool = True, export_name: bool = False) -> NBDClient:
        hs = ClientHandshake()
        while True:  # options may only follow the client flags, sent after the greeting
            event = hs.next_event()
            if event is NEED_DATA:
                hs.receive_data(await stream.receive_some(65536))
            elif isinstance(event, ServerGreeting):
                break
            else:
                raise ConnectionError(f"unexpected {event!r} before the greeting")
        if extended:
            hs.extended_headers()
        elif structured:
            hs.structured_reply()
        contexts = list(contexts)
        if contexts:
            hs.set_meta_context(export, contexts)
        if export_name:
            hs.export_name(export)
        else:
            hs.go(export, (Info.BLOCK_SIZE,) if block_size else ())
        seen: list[Any] = []
        while True:
            out = hs.data_to_send()
            if out:
                await stream.send_all(out)
            event = hs.next_event()
            if event is NEED_DATA:
                hs.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, Ready):
                return cls(stream, event.session, event.leftover, seen)
            if isinstance(event, OptionError) and event.option in (7, 1):
                raise HandshakeRefused(event)
            if isinstance(event, Closed):
                raise ConnectionError("server closed the connection during the handshake")
            seen.append(event)

    async def send(self, cmd: Cmd, offset: int = 0, length: int = 0,
                   flags: CmdFlag = NO_FLAGS, data: bytes | None = None) -> int:
        cookie = self.tx.new_cookie()
        if data is not None:
            length = len(data)
        request = Request(cookie, cmd, flags, offset, length, data)
        self._requests[cookie] = request
        await self.stream.send_all(b"".join(bytes(b) for b in self.tx.send(request)))
        return cookie

    async def wait(self, cookie: int) -> Reply:
        while cookie not in self.replies:
            await self._pump()
        return self.replies.pop(cookie)

    async def _pump(self) -> None:
        event = self.tx.next_event()
        if event is NEED_DATA:
            data = await self.stream.receive_some(1 << 20)
            self.tx.receive_data(data)
            return
        if isinstance(event, Closed):
            raise ConnectionError("server closed the connection")
        cookie = event.cookie
        reply = self._partial.setdefault(cookie, Reply(cookie, request=self._requests[cookie]))
        if isinstance(event, ReplyDone):
            reply.error = event.error
            self.replies[cookie] = self._partial.pop(cookie)
            del self._requests[cookie]
        elif isinstance(event, ErrorReply):
            reply.messages.append(event.message)
        elif isinstance(event, BlockStatusReply):
            reply.extents[event.context_id] = event.extents
        else:
            reply.chunks.append(event)

    async def request(self, cmd: Cmd, offset: int = 0, length: int = 0,
                      flags: CmdFlag = NO_FLAGS, data: bytes | None = None) -> Reply:
        return await self.wait(await self.send(cmd, offset, length, flags, data))

    async def read(self, offset: int, length: int, flags: CmdFlag = NO_FLAGS) -> bytes:
        reply = await self.request(Cmd.READ, offset, length, flags)
        assert reply.error == 0, (reply.error, reply.messages)
        return reply.data()

    async def write(self, offset: int, data: bytes, flags: CmdFlag = NO_FLAGS) -> None:
        reply = await self.request(Cmd.WRITE, offset, flags=flags, data=data)
        assert reply.error == 0, (reply.error, reply.messages)

    async def disconnect(self) -> None:
        await self.stream.send_all(b"".join(bytes(b) for b in self.tx.send(
            Request(0, Cmd.DISC, CmdFlag(0), 0, 0))))

    async def close(self) -> None:
        await self.stream.aclose()

    async def eof(self) -> bool:
        """True once the server has closed its side."""
        data: bytes = await self.stream.receive_some(65536)
        return data == b""
