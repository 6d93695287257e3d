"""The transmission phase: every command client↔server, validation, reply framing, limits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    NEED_DATA,
    BlockStatusReply,
    ClientTransmission,
    Closed,
    Cmd,
    CmdFlag,
    Disconnect,
    Errno,
    ErrorReply,
    ExportInfo,
    Info,
    LocalProtocolError,
    ReadData,
    ReadHole,
    Ready,
    RemoteProtocolError,
    ReplyDone,
    Request,
    ServerTransmission,
    Session,
    StateFlag,
    TransmissionFlag,
)
from protocol import _wire as wire

from .helpers import ALL_CAPS, HandshakePair

MODES = ["simple", "structured", "extended"]


def connect(
    mode: str = "simple",
    *,
    export: str = "disk",
    contexts: Sequence[str] = (),
    block_size: bool = False,
    max_payload: int = 32 * 1024 * 1024,
) -> tuple[ClientTransmission, ServerTransmission]:
    """A real handshake, then both transmission objects."""
    pair = HandshakePair()
    if mode == "structured":
        pair.client.structured_reply()
    elif mode == "extended":
        pair.client.extended_headers()
    if contexts:
        pair.client.set_meta_context(export, contexts)
    pair.client.go(export, [Info.BLOCK_SIZE] if block_size else [])
    pair.pump()
    return pair.transmission(max_payload)


def exchange(
    client: ClientTransmission, server: ServerTransmission, request: Request
) -> tuple[Request | Disconnect, list[Any]]:
    """Send one request, let the caller-free server answer it like a RAM disk, collect events."""
    for buf in client.send(request):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request | Disconnect), ev
    assert server.next_event() is NEED_DATA
    if isinstance(ev, Disconnect):
        return ev, []
    if ev.error is None and ev.cmd is Cmd.READ:
        reply: list[Any] = server.reply_read(ev, bytes(range(256)) * (ev.length // 256)
                                             + bytes(ev.length % 256))  # fmt: skip
    elif ev.error is None and ev.cmd is Cmd.BLOCK_STATUS:
        extents = {cid: [(ev.length, StateFlag.ZERO)] for cid in server.session.contexts}
        reply = [server.reply_block_status(ev, extents)]
    else:
        reply = [server.reply(ev)]
    client.receive_data(b"".join(bytes(b) for b in reply))
    events = []
    while (cev := client.next_event()) is not NEED_DATA:
        events.append(cev)
    return ev, events


@pytest.mark.parametrize("mode", MODES)
def test_every_command(mode: str) -> None:
    client, server = connect(mode, contexts=["base:allocation"] if mode != "simple" else [])
    cookie = client.new_cookie

    ev, events = exchange(client, server, Request(cookie(), Cmd.READ, offset=512, length=1000))
    assert isinstance(ev, Request) and ev.error is None and ev.data is None
    assert [type(e) for e in events] == [ReadData, ReplyDone]
    assert events[0].offset == 512 and len(events[0].data) == 1000
    assert events[1].error == 0

    data = b"x" * 4096
    ev, events = exchange(
        client, server, Request(cookie(), Cmd.WRITE, CmdFlag.FUA, 4096, 4096, data)
    )
    assert isinstance(ev, Request) and ev.error is None
    payload_len = CmdFlag.PAYLOAD_LEN if mode == "extended" else CmdFlag(0)
    assert ev.data == data and ev.flags == CmdFlag.FUA | payload_len
    assert events == [ReplyDone(ev.cookie, 0)]

    simple_cmds = [
        (Cmd.FLUSH, CmdFlag(0), 0, 0),
        (Cmd.TRIM, CmdFlag.FUA, 0, 65536),
        (Cmd.CACHE, CmdFlag(0), 0, 65536),
        (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, 0, 8192),
        (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, 0, 8192),
    ]
    for cmd, flags, offset, length in simple_cmds:
        ev, events = exchange(client, server, Request(cookie(), cmd, flags, offset, length))
        assert isinstance(ev, Request) and ev.error is None, ev
        assert (ev.cmd, ev.flags, ev.offset, ev.length) == (cmd, flags, offset, length)
        assert events == [ReplyDone(ev.cookie, 0)]

    ev, events = exchange(client, server, Request(cookie(), Cmd.BLOCK_STATUS, length=4096))
    assert isinstance(ev, Request)
    if mode == "simple":
        assert ev.error is Errno.EINVAL and "structured" in ev.message
        assert events == [ReplyDone(ev.cookie, Errno.EINVAL)]
    else:
        assert ev.error is None
        assert events == [
            BlockStatusReply(ev.cookie, 0, ((4096, StateFlag.ZERO),)),
            ReplyDone(ev.cookie, 0),
        ]

    ev, events = exchange(client, server, Request(cookie(), Cmd.DISC))
    assert ev == Disconnect() and events == []
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    assert server.next_event() == Closed()
    assert client.in_flight == 0


@pytest.mark.parametrize("mode", MODES)
def test_error_replies(mode: str) -> None:
    client, server = connect(mode)
    ev, events = exchange(client, server, Request(7, Cmd.READ, offset=1 << 20, length=1))
    assert isinstance(ev, Request) and ev.error is Errno.EINVAL
    if mode == "simple":
        assert events == [ReplyDone(7, Errno.EINVAL)]
    else:
        assert events == [ErrorReply(7, Errno.EINVAL, ev.message), ReplyDone(7, Errno.EINVAL)]
    # An error from the block layer, with a message.
    for buf in client.send(Request(8, Cmd.WRITE, offset=0, length=2, data=b"ab")):
        server.receive_data(bytes(buf))
    write = server.next_event()
    assert isinstance(write, Request)
    client.receive_data(server.reply(write, Errno.EIO, "disk on fire"))
    events = [client.next_event(), client.next_event()]
    if mode == "simple":
        assert events[0] == ReplyDone(8, Errno.EIO)
    else:
        assert events == [ErrorReply(8, Errno.EIO, "disk on fire"), ReplyDone(8, Errno.EIO)]


def test_reply_framing_bytes() -> None:
    session = Session(ExportInfo("e", 1 << 20), TransmissionFlag.HAS_FLAGS)
    simple = ServerTransmission(session)
    req = Request(0x0102030405060708, Cmd.FLUSH)
    assert simple.reply(req) == bytes.fromhex("67446698 00000000 0102030405060708")
    assert simple.reply(req, Errno.EIO, "ignored") == bytes.fromhex(
        "67446698 00000005 0102030405060708"
    )
    read = Request(9, Cmd.READ, offset=512, length=3)
    data = bytearray(b"abc")
    out = simple.reply_read(read, data)
    assert out[1] is data  # not copied
    assert out[0] == wire.SimpleReply.build(dict(error=0, cookie=9))

    structured = ServerTransmission(Session(session.export, session.flags, structured=True))
    out = structured.reply_read(read, data)
    assert out[1] is data
    assert out[0] == wire.ChunkHeader.build(
        dict(flags=1, type=1, cookie=9, length=11)
    ) + wire.OffsetDataHeader.build(dict(offset=512))
    assert structured.reply(req) == simple.reply(req)  # no payload: simple reply allowed
    err = structured.reply(req, Errno.EIO, "boom")
    assert err == wire.ChunkHeader.build(
        dict(flags=1, type=0x8001, cookie=req.cookie, length=10)
    ) + wire.ErrorChunk.build(dict(error=5, message="boom"))

    extended = ServerTransmission(
        Session(session.export, session.flags, structured=True, extended=True)
    )
    assert extended.reply(req) == wire.ExtendedChunkHeader.build(
        dict(flags=1, type=0, cookie=req.cookie, offset=0, length=0)
    )
    out = extended.reply_read(read, data)
    assert out[0] == wire.ExtendedChunkHeader.build(
        dict(flags=1, type=1, cookie=9, offset=512, length=11)
    ) + wire.OffsetDataHeader.build(dict(offset=512))


def test_error_message_is_truncated_on_a_character_boundary() -> None:
    session = Session(ExportInfo("e", 100), TransmissionFlag.HAS_FLAGS, structured=True)
    tx = ServerTransmission(session)
    reply = tx.reply(Request(1, Cmd.FLUSH), Errno.EIO, "é" * 1000)
    payload = reply[20:]
    assert len(payload) <= 6 + 896
    assert wire.ErrorChunk.parse(payload).message == "é" * 448


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_read_chunks_with_holes(mode: str) -> None:
    client, server = connect(mode)
    for buf in client.send(Request(3, Cmd.READ, offset=4096, length=12288)):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request)
    pieces: list[Any] = [(8192, memoryview(b"d" * 4096)), (4096, 4096), (12288, 4096)]
    reply = server.reply_read_chunks(ev, pieces)
    assert any(isinstance(b, memoryview) for b in reply)  # data passed through uncopied
    client.receive_data(b"".join(bytes(b) for b in reply))
    events = []
    while (cev := client.next_event()) is not NEED_DATA:
        events.append(cev)
    assert events == [
        ReadData(3, 8192, b"d" * 4096),
        ReadHole(3, 4096, 4096),
        ReadHole(3, 12288, 4096),
        ReplyDone(3, 0),
    ]


def test_read_chunks_then_error() -> None:
    client, server = connect("structured")
    for buf in client.send(Request(3, Cmd.READ, offset=0, length=8192)):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request)
    first = server.reply_read_chunks(ev, [(0, b"a" * 4096)], done=False)
    last = server.reply(ev, Errno.EIO, "second half failed")
    client.receive_data(b"".join(bytes(b) for b in first) + last)
    events = [client.next_event() for _ in range(3)]
    assert events == [
        ReadData(3, 0, b"a" * 4096),
        ErrorReply(3, Errno.EIO, "second half failed"),
        ReplyDone(3, Errno.EIO),
    ]


def test_error_offset_chunk() -> None:
    client, server = connect("structured")
    for buf in client.send(Request(4, Cmd.READ, offset=4096, length=8192)):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request)
    with pytest.raises(LocalProtocolError, match="outside"):
        server.reply(ev, Errno.EIO, "bad sector", offset=4095)
    client.receive_data(server.reply(ev, Errno.EIO, "bad sector", offset=8192))
    assert [client.next_event(), client.next_event()] == [
        ErrorReply(4, Errno.EIO, "bad sector", 8192),
        ReplyDone(4, Errno.EIO),
    ]


@pytest.mark.parametrize(
    ("pieces", "match"),
    [
        ([(0, 4096)], "cover"),  # incomplete
        ([(0, 8192), (4096, 4096)], "overlap"),
        ([(8192, 1)], "outside"),
        ([(0, 0), (0, 8192)], "outside"),
        ([], "cover"),
    ],
)
def test_read_chunks_misuse(pieces: list[Any], match: str) -> None:
    session = Session(ExportInfo("e", 1 << 20), TransmissionFlag.HAS_FLAGS, structured=True)
    tx = ServerTransmission(session)
    with pytest.raises(LocalProtocolError, match=match):
        tx.reply_read_chunks(Request(1, Cmd.READ, length=8192), pieces)


def test_read_chunks_need_structured_and_df_allows_one() -> None:
    export = ExportInfo("e", 1 << 20)
    simple = ServerTransmission(Session(export, TransmissionFlag.HAS_FLAGS))
    with pytest.raises(LocalProtocolError, match="structured"):
        simple.reply_read_chunks(Request(1, Cmd.READ, length=1), [(0, b"x")])
    structured = ServerTransmission(Session(export, TransmissionFlag.HAS_FLAGS, structured=True))
    df = Request(1, Cmd.READ, CmdFlag.DF, length=2)
    with pytest.raises(LocalProtocolError, match="DF"):
        structured.reply_read_chunks(df, [(0, b"x"), (1, b"y")])
    assert len(structured.reply_read_chunks(df, [(0, b"xy")])) == 3


def test_reply_misuse() -> None:
    session = Session(ExportInfo("e", 100), TransmissionFlag.HAS_FLAGS, structured=True)
    tx = ServerTransmission(session)
    with pytest.raises(LocalProtocolError, match="reply_read"):
        tx.reply(Request(1, Cmd.READ, length=1))
    with pytest.raises(LocalProtocolError, match="reply_block_status"):
        tx.reply(Request(1, Cmd.BLOCK_STATUS, length=1))
    with pytest.raises(LocalProtocolError, match="DISC"):
        tx.reply(Request(1, Cmd.DISC))
    with pytest.raises(LocalProtocolError, match="answered with"):
        tx.reply_read(Request(1, Cmd.READ, length=2), b"x")
    with pytest.raises(LocalProtocolError):
        tx.reply_block_status(Request(1, Cmd.READ, length=1), {})
    # Zero-length structured READ: a NONE chunk (a data chunk must cover ≥ 1 byte).
    (none,) = tx.reply_read(Request(1, Cmd.READ, length=0), b"")
    assert wire.ChunkHeader.parse(none).type == 0


@pytest.mark.parametrize("mode", ["structured", "extended"])
def test_block_status_several_contexts(mode: str) -> None:
    contexts = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
    client, server = connect(mode, contexts=contexts)
    assert server.session.contexts == {0: contexts[0], 1: contexts[1], 2: contexts[2]}
    for buf in client.send(Request(5, Cmd.BLOCK_STATUS, offset=0, length=8192)):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request) and ev.error is None
    extents = {
        0: [(4096, 0), (4096, StateFlag.HOLE | StateFlag.ZERO), (1 << 19, 0)],  # last cut
        1: [(1 << 20, 1)],  # may run past the request
        2: [(512, 1), (7680, 0)],
    }
    raw = server.reply_block_status(ev, extents)
    client.receive_data(raw)
    events = [client.next_event() for _ in range(4)]
    assert events == [
        BlockStatusReply(5, 0, ((4096, 0), (4096, 3))),
        BlockStatusReply(5, 1, ((1 << 20, 1),)),
        BlockStatusReply(5, 2, ((512, 1), (7680, 0))),
        ReplyDone(5, 0),
    ]
    kinds = []
    while raw:
        if mode == "extended":
            h = wire.ExtendedChunkHeader.parse(raw)
            size = 32 + h.length
        else:
            h = wire.ChunkHeader.parse(raw)
            size = 20 + h.length
        kinds.append((h.type, h.flags))
        raw = raw[size:]
    kind = 6 if mode == "extended" else 5
    assert kinds == [(kind, 0), (kind, 0), (kind, 1)]  # DONE on the last one only


def test_block_status_req_one_and_clamping() -> None:
    client, server = connect("structured", contexts=["base:allocation"])
    ev = Request(1, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 1000)
    for buf in client.send(ev):
        server.receive_data(bytes(buf))
    req = server.next_event()
    assert isinstance(req, Request) and req.error is None
    client.receive_data(server.reply_block_status(req, {0: [(4096, 0), (4096, 1)]}))
    assert client.next_event() == BlockStatusReply(1, 0, ((1000, 0),))

    # Compact extents are at most 32 bits; a longer one is clamped and ends the list.
    big = Request(2, Cmd.BLOCK_STATUS, length=0xFFFFFFFF)
    raw = server.reply_block_status(big, {0: [(1 << 40, 2), (5, 0)]})
    parsed = wire.BlockStatus.parse(raw[20:])
    assert [(e.length, e.flags) for e in parsed.extents] == [(0xFFFF0000, 2)]
    with pytest.raises(LocalProtocolError, match="contexts"):
        server.reply_block_status(big, {1: [(1, 0)]})
    with pytest.raises(LocalProtocolError, match="positive"):
        server.reply_block_status(big, {0: [(0, 0)]})
    with pytest.raises(LocalProtocolError, match="at least one"):
        server.reply_block_status(big, {0: []})


# -- validation --------------------------------------------------------------------------------

RW = ALL_CAPS
VALIDATION = [
    # (mode, request, expected error, message fragment)
    ("simple", Request(1, 99, length=1), Errno.EINVAL, "unknown command"),
    ("simple", Request(1, Cmd.READ, CmdFlag(0x40)), Errno.EINVAL, "0x40"),
    ("simple", Request(1, Cmd.READ, CmdFlag.DF, length=1), Errno.EINVAL, "DF"),
    ("structured", Request(1, Cmd.READ, CmdFlag.DF, length=1), None, ""),
    ("simple", Request(1, Cmd.READ, CmdFlag.NO_HOLE, length=1), Errno.EINVAL, "NO_HOLE"),
    ("simple", Request(1, Cmd.READ, CmdFlag.FUA, length=1), None, ""),  # FUA on any command
    ("simple", Request(1, Cmd.TRIM, CmdFlag.REQ_ONE, length=1), Errno.EINVAL, "REQ_ONE"),
    ("simple", Request(1, Cmd.READ, CmdFlag.PAYLOAD_LEN, length=1), Errno.EINVAL, "PAYLOAD_LEN"),
    ("simple", Request(1, Cmd.READ, offset=(1 << 20) - 1, length=2), Errno.EINVAL, "beyond"),
    ("simple", Request(1, Cmd.READ, offset=1 << 20, length=0), None, ""),  # empty at the end
    ("simple", Request(1, Cmd.READ, offset=(1 << 20) + 1, length=0), Errno.EINVAL, "beyond"),
    ("simple", Request(1, Cmd.READ, offset=(1 << 64) - 1, length=1), Errno.EINVAL, "beyond"),
    ("simple", Request(1, Cmd.WRITE, offset=1 << 20, length=1, data=b"x"), Errno.ENOSPC, "beyond"),
    ("simple", Request(1, Cmd.WRITE_ZEROES, offset=1 << 20, length=1), Errno.ENOSPC, "beyond"),
    ("simple", Request(1, Cmd.TRIM, offset=1 << 20, length=1), Errno.EINVAL, "beyond"),
    ("simple", Request(1, Cmd.CACHE, offset=1 << 20, length=1), Errno.EINVAL, "beyond"),
    ("simple", Request(1, Cmd.FLUSH, offset=1), Errno.EINVAL, "zero offset"),
    ("simple", Request(1, Cmd.RESIZE, offset=1 << 30), Errno.EINVAL, "not advertised"),
    ("simple", Request(1, Cmd.READ, length=(1 << 20) + 1), Errno.EINVAL, "beyond"),
    ("structured", Request(1, Cmd.BLOCK_STATUS, length=1), Errno.EINVAL, "context"),
    ("structured+ctx", Request(1, Cmd.BLOCK_STATUS, length=0), Errno.EINVAL, "non-zero"),
    ("structured+ctx", Request(1, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, length=1), None, ""),
    ("extended", Request(1, Cmd.TRIM, length=1), None, ""),
    ("blocksize", Request(1, Cmd.READ, offset=1, length=512), Errno.EINVAL, "aligned"),
    ("blocksize", Request(1, Cmd.TRIM, offset=512, length=511), Errno.EINVAL, "aligned"),
    ("blocksize", Request(1, Cmd.READ, offset=512, length=512), None, ""),
    ("blocksize", Request(1, Cmd.FLUSH), None, ""),
    ("simple", Request(1, Cmd.WRITE_ZEROES, length=0), None, ""),  # zero length: a no-op
]  # fmt: skip


@pytest.mark.parametrize(("mode", "request_", "error", "fragment"), VALIDATION)
def test_validation(mode: str, request_: Request, error: Errno | None, fragment: str) -> None:
    kwargs: dict[str, Any] = {}
    if mode == "structured+ctx":
        mode, kwargs["contexts"] = "structured", ["base:allocation"]
    if mode == "blocksize":
        mode, kwargs["block_size"] = "simple", True
    client, server = connect(mode, **kwargs)
    for buf in client.send(request_):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request)
    assert ev.error == error, ev.message
    assert fragment in ev.message
    assert server.next_event() is NEED_DATA  # nothing left over: framing stayed in sync


@pytest.mark.parametrize(
    ("flags", "request_", "error"),
    [
        (TransmissionFlag.READ_ONLY, Request(1, Cmd.WRITE, length=1, data=b"x"), Errno.EPERM),
        (TransmissionFlag.READ_ONLY, Request(1, Cmd.TRIM, length=1), Errno.EPERM),
        (TransmissionFlag.READ_ONLY | RW, Request(1, Cmd.WRITE_ZEROES, length=1), Errno.EPERM),
        # read-only is checked before the bounds, as qemu does
        (TransmissionFlag.READ_ONLY, Request(1, Cmd.WRITE, offset=1 << 40, length=1,
                                              data=b"x"), Errno.EPERM),
        (TransmissionFlag(0), Request(1, Cmd.FLUSH), Errno.EINVAL),
        (TransmissionFlag(0), Request(1, Cmd.TRIM, length=1), Errno.EINVAL),
        (TransmissionFlag(0), Request(1, Cmd.WRITE_ZEROES, length=1), Errno.EINVAL),
        (TransmissionFlag(0), Request(1, Cmd.CACHE, length=1), None),  # tolerated unadvertised
        (TransmissionFlag(0), Request(1, Cmd.WRITE, CmdFlag.FUA, length=1, data=b"x"),
         Errno.EINVAL),
        (TransmissionFlag.SEND_WRITE_ZEROES,
         Request(1, Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, length=1), Errno.EINVAL),
        (TransmissionFlag.SEND_WRITE_ZEROES,
         Request(1, Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE, length=1), None),
    ],
)  # fmt: skip
def test_validation_against_export_flags(
    flags: TransmissionFlag, request_: Request, error: Errno | None
) -> None:
    export = ExportInfo("e", 4096, flags)
    session = Session(export, flags | TransmissionFlag.HAS_FLAGS)
    client, server = ClientTransmission(session), ServerTransmission(session)
    for buf in client.send(request_):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request)
    assert ev.error == error, ev.message
    if error is not None:  # answering it uses the request's own error
        client.receive_data(server.reply(ev))
        assert client.next_event() == ReplyDone(1, error)


def test_advertised_maximum_payload() -> None:
    export = ExportInfo("e", 1 << 24, block_size=(1, 4096, 65536))
    session = Session(export, TransmissionFlag.HAS_FLAGS)
    server = ServerTransmission(session)
    client = ClientTransmission(session)
    for req in (Request(1, Cmd.READ, length=65537), Request(2, Cmd.READ, length=65536)):
        for buf in client.send(req):
            server.receive_data(bytes(buf))
    first, second = server.next_event(), server.next_event()
    assert isinstance(first, Request) and first.error is Errno.EINVAL
    assert isinstance(second, Request) and second.error is None


def test_large_trim_is_not_limited_by_max_payload() -> None:
    export = ExportInfo("e", 1 << 40, ALL_CAPS)
    session = Session(export, ALL_CAPS | TransmissionFlag.HAS_FLAGS)
    server = ServerTransmission(session, max_payload=1 << 20)
    server.receive_data(bytes(ClientTransmission(session).send(
        Request(1, Cmd.TRIM, length=0xFFFFFFFF))[0]))  # fmt: skip
    ev = server.next_event()
    assert isinstance(ev, Request) and ev.error is None


# -- framing errors ------------------------------------------------------------------------------


def _session(extended: bool = False) -> Session:
    export = ExportInfo("e", 1 << 30, ALL_CAPS)
    return Session(export, ALL_CAPS | TransmissionFlag.HAS_FLAGS, extended, extended)


@pytest.mark.parametrize("extended", [False, True])
def test_bad_magic_disconnects(extended: bool) -> None:
    server = ServerTransmission(_session(extended))
    other = wire.REQUEST if extended else wire.EXTENDED_REQUEST
    magic = 0x25609513 if extended else 0x21E41C71  # the wrong mode's magic
    server.receive_data(other.pack(magic, 0, 0, 1, 0, 0).ljust(32, b"\0"))
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_oversized_write_disconnects_before_payload() -> None:
    server = ServerTransmission(_session(), max_payload=4096)
    server.receive_data(wire.REQUEST.pack(0x25609513, 0, Cmd.WRITE, 1, 0, 4097))
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()


def test_extended_payload_on_other_commands_is_consumed() -> None:
    session = _session(extended=True)
    server = ServerTransmission(session)
    head = wire.EXTENDED_REQUEST.pack(0x21E41C71, CmdFlag.PAYLOAD_LEN, Cmd.READ, 1, 0, 3)
    follow = wire.EXTENDED_REQUEST.pack(0x21E41C71, 0, Cmd.FLUSH, 2, 0, 0)
    server.receive_data(head + b"abc" + follow)
    first = server.next_event()
    assert isinstance(first, Request) and first.error is Errno.EINVAL
    assert first.data == b"abc"
    second = server.next_event()
    assert isinstance(second, Request) and second.cookie == 2 and second.error is None


def test_extended_write_without_payload_len_is_tolerated() -> None:
    server = ServerTransmission(_session(extended=True))
    head = wire.EXTENDED_REQUEST.pack(0x21E41C71, 0, Cmd.WRITE, 1, 0, 2)
    server.receive_data(head + b"hi")
    ev = server.next_event()
    assert isinstance(ev, Request) and ev.error is None and ev.data == b"hi"


def test_extended_64bit_effect_length() -> None:
    session = Session(ExportInfo("e", 1 << 40, ALL_CAPS), ALL_CAPS, True, True)
    client, server = ClientTransmission(session), ServerTransmission(session)
    for buf in client.send(Request(1, Cmd.WRITE_ZEROES, offset=0, length=1 << 36)):
        server.receive_data(bytes(buf))
    ev = server.next_event()
    assert isinstance(ev, Request) and ev.length == 1 << 36 and ev.error is None


@pytest.mark.parametrize("cut", [1, 27, 28, 29])
def test_eof_inside_a_request(cut: int) -> None:
    server = ServerTransmission(_session())
    raw = wire.REQUEST.pack(0x25609513, 0, Cmd.WRITE, 1, 0, 2) + b"hi"
    server.receive_data(raw[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="EOF"):
        server.next_event()


def test_data_after_disc_disconnects() -> None:
    server = ServerTransmission(_session())
    server.receive_data(wire.REQUEST.pack(0x25609513, 0, Cmd.DISC, 1, 0, 0) + b"x")
    assert server.next_event() == Disconnect()
    with pytest.raises(RemoteProtocolError, match="DISC"):
        server.next_event()


def test_write_data_survives_later_receives() -> None:
    server = ServerTransmission(_session())
    server.receive_data(wire.REQUEST.pack(0x25609513, 0, Cmd.WRITE, 1, 0, 4) + b"abcd")
    ev = server.next_event()
    assert isinstance(ev, Request)
    server.receive_data(b"\xff" * 200_000)  # forces the buffer to grow and compact
    assert ev.data == b"abcd"


# -- byte at a time ------------------------------------------------------------------------------


def _requests() -> list[Request]:
    return [
        Request(1, Cmd.READ, offset=0, length=4096),
        Request(2, Cmd.WRITE, CmdFlag.FUA, 512, 5, b"hello"),
        Request(3, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 4096),
        Request(4, Cmd.READ, CmdFlag(0x8000), 0, 1),
        Request(5, Cmd.TRIM, offset=1 << 40, length=1),
        Request(6, 42),
        Request(7, Cmd.DISC),
    ]


@pytest.mark.parametrize("mode", MODES)
def test_byte_at_a_time_equals_one_buffer(mode: str) -> None:
    client, whole = connect(mode, contexts=["base:allocation"] if mode != "simple" else [])
    raw = b"".join(bytes(b) for r in _requests() for b in client.send(r))
    whole.receive_data(raw)
    expected = []
    while (ev := whole.next_event()) is not NEED_DATA:
        expected.append(ev)
    assert len(expected) == len(_requests())

    _, trickle = connect(mode, contexts=["base:allocation"] if mode != "simple" else [])
    got = []
    for i in range(len(raw)):
        trickle.receive_data(raw[i : i + 1])
        while (ev := trickle.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == expected

    # And the replies, byte at a time, into the client.
    reqs = [e for e in expected if isinstance(e, Request)]
    replies = b"".join(
        bytes(b)
        for r in reqs
        for b in (
            whole.reply_read(r, bytes(r.length))
            if r.cmd is Cmd.READ and r.error is None
            else [whole.reply_block_status(r, {0: [(4096, 0)]})]
            if r.cmd is Cmd.BLOCK_STATUS and r.error is None
            else [whole.reply(r)]
        )
    )
    client2 = ClientTransmission(client.session)
    for r in _requests()[:-1]:
        client2.send(r)
    one = ClientTransmission(client.session)
    for r in _requests()[:-1]:
        one.send(r)
    one.receive_data(replies)
    expected_c = []
    while (cev := one.next_event()) is not NEED_DATA:
        expected_c.append(cev)
    got_c = []
    for i in range(len(replies)):
        client2.receive_data(replies[i : i + 1])
        while (cev := client2.next_event()) is not NEED_DATA:
            got_c.append(cev)
    assert got_c == expected_c
    assert sum(isinstance(e, ReplyDone) for e in got_c) == len(reqs)


def test_fast_request_constructor_equals_the_dataclass() -> None:
    from protocol._events import new_request

    args = (7, Cmd.WRITE, CmdFlag.FUA, 512, 3, b"abc", Errno.EIO, "why")
    fast, normal = new_request(*args), Request(*args)
    assert fast == normal and hash(fast) == hash(normal) and repr(fast) == repr(normal)
    assert new_request(*args[:6]) == Request(*args[:6])
    with pytest.raises(AttributeError):
        fast.cookie = 8  # type: ignore[misc]  # still frozen


# -- client-side checks ----------------------------------------------------------------------


def test_client_rejects_unknown_cookie_and_bad_magic() -> None:
    session = _session()
    client = ClientTransmission(session)
    client.receive_data(wire.SIMPLE_REPLY.pack(0x67446698, 0, 99))
    with pytest.raises(RemoteProtocolError, match="cookie"):
        client.next_event()
    client = ClientTransmission(session)
    client.receive_data(b"\xde\xad\xbe\xef" + bytes(12))
    with pytest.raises(RemoteProtocolError, match="magic"):
        client.next_event()


def test_client_misuse() -> None:
    client = ClientTransmission(_session())
    client.send(Request(1, Cmd.FLUSH))
    with pytest.raises(LocalProtocolError, match="in flight"):
        client.send(Request(1, Cmd.FLUSH))
    with pytest.raises(LocalProtocolError, match="data"):
        client.send(Request(2, Cmd.WRITE, length=1))
    with pytest.raises(LocalProtocolError, match="length"):
        client.send(Request(2, Cmd.WRITE, length=2, data=b"x"))
    assert client.new_cookie() == 2
    client.send(Request(3, Cmd.DISC))
    with pytest.raises(LocalProtocolError):
        client.send(Request(4, Cmd.FLUSH))


def test_requests_pipelined_behind_go_reach_the_transmission() -> None:
    # A client may send its first requests right behind GO; the handshake hands them over.
    pair = HandshakePair()
    pair.client.go("disk")
    head = pair.client.data_to_send()
    early = Session(ExportInfo("disk", 1 << 20), TransmissionFlag.HAS_FLAGS)
    requests = [Request(1, Cmd.READ, length=512), Request(2, Cmd.FLUSH)]
    body = b"".join(bytes(b) for r in requests for b in ClientTransmission(early).send(r))
    for i in range(0, len(head + body), 7):  # in awkward pieces
        pair.server.receive_data((head + body)[i : i + 7])
    while not isinstance(ev := pair.server.next_event(), Ready):
        assert ev is not NEED_DATA
    tx = ServerTransmission(ev.session, leftover=ev.leftover)
    got = [tx.next_event(), tx.next_event(), tx.next_event()]
    assert [(r.cookie, r.cmd) for r in got[:2] if isinstance(r, Request)] == [
        (1, Cmd.READ),
        (2, Cmd.FLUSH),
    ]
    assert got[2] is NEED_DATA


# -- large WRITE payloads received in place ------------------------------------------------------


def _large_writes_stream() -> tuple[bytes, list[Request]]:
    big = bytes(range(256)) * 1024  # 256 KiB, above DIRECT_PAYLOAD_MIN
    requests = [
        Request(1, Cmd.WRITE, offset=0, length=len(big), data=big),
        Request(2, Cmd.READ, offset=0, length=4096),
        Request(3, Cmd.WRITE, CmdFlag.FUA, 4096, len(big), big[::-1]),
        Request(4, Cmd.WRITE, offset=1 << 40, length=1 << 16, data=bytes(1 << 16)),  # invalid
    ]
    raw = b"".join(
        wire.REQUEST.pack(0x25609513, int(r.flags), int(r.cmd), r.cookie, r.offset, r.length)
        + (r.data or b"")
        for r in requests
    )
    return raw, requests


@pytest.mark.parametrize("chunk", [1000, 65536, 300_000])
def test_payload_buffer_gives_the_same_events_as_receive_data(chunk: int) -> None:
    raw, requests = _large_writes_stream()
    fed = ServerTransmission(_session())
    fed.receive_data(raw)
    expected = []
    while (ev := fed.next_event()) is not NEED_DATA:
        expected.append(ev)
    assert [r.cookie for r in expected] == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert expected[0].data == requests[0].data  # type: ignore[union-attr]
    assert expected[3].error is Errno.ENOSPC  # type: ignore[union-attr]

    sizes: list[int] = []

    def allocate(length: int) -> memoryview:
        sizes.append(length)
        return memoryview(bytearray(length))

    server = ServerTransmission(_session(), payload_allocator=allocate)
    got = []
    pos = 0
    direct = 0
    while pos < len(raw):
        view = server.payload_buffer()
        if view is not None:  # a socket's recv_into, in a server
            n = min(chunk, len(view), len(raw) - pos)
            view[:n] = raw[pos : pos + n]
            server.payload_received(n)
            direct += n
        else:
            n = chunk
            server.receive_data(raw[pos : pos + n])
        pos += n
        while (ev := server.next_event()) is not NEED_DATA:
            got.append(ev)
    assert got == expected
    assert sizes == [256 * 1024, 256 * 1024, 1 << 16]
    assert direct > 0 and server.buffered == 0 and server.payload_buffer() is None


def test_eof_inside_a_payload_received_in_place() -> None:
    server = ServerTransmission(_session())
    server.receive_data(wire.REQUEST.pack(0x25609513, 0, Cmd.WRITE, 1, 0, 1 << 17) + b"ab")
    assert server.next_event() is NEED_DATA
    view = server.payload_buffer()
    assert view is not None and len(view) == (1 << 17) - 2
    assert server.buffered == 28 + 2
    with pytest.raises(LocalProtocolError):
        server.payload_received(len(view) + 1)
    server.payload_received(0)  # EOF
    with pytest.raises(RemoteProtocolError, match="EOF inside a request"):
        server.next_event()


def test_receiving_by_header_missing_copies_no_payload() -> None:
    # A server that asks for just header_missing() bytes when it expects a large WRITE never
    # has a payload byte pass through the receive buffer.
    raw, _ = _large_writes_stream()
    server = ServerTransmission(_session())
    assert server.header_missing() == 28
    pos = fed = 0
    got = []
    while pos < len(raw):
        view = server.payload_buffer()
        if view is not None:
            n = min(len(view), len(raw) - pos)
            view[:n] = raw[pos : pos + n]
            server.payload_received(n)
        else:
            n = server.header_missing()
            assert n > 0
            server.receive_data(raw[pos : pos + n])
            fed += n
        pos += n
        while (ev := server.next_event()) is not NEED_DATA:
            got.append(ev)
    assert [r.cookie for r in got] == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert fed == 4 * 28  # the four headers, nothing else
    server.receive_data(raw[:10])
    assert server.header_missing() == 18


def test_payload_received_without_a_payload_is_misuse() -> None:
    server = ServerTransmission(_session())
    assert server.payload_buffer() is None
    with pytest.raises(LocalProtocolError):
        server.payload_received(1)


# -- plain requests for the server's hot path ----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_next_plain_equals_next_event(mode: str) -> None:
    contexts = ["base:allocation"] if mode != "simple" else []
    client, by_event = connect(mode, contexts=contexts)
    requests = [
        *_requests()[:-1],
        Request(8, Cmd.WRITE, offset=4096, length=1 << 17, data=bytes(range(256)) * 512),
        Request(9, Cmd.READ, CmdFlag.FUA, 0, 512),
        Request(10, Cmd.WRITE, offset=1 << 40, length=3, data=b"out"),  # invalid: a Request
        Request(11, Cmd.READ, offset=0, length=0),
        Request(12, Cmd.FLUSH),
        _requests()[-1],
    ]
    raw = b"".join(bytes(b) for r in requests for b in client.send(r))
    by_event.receive_data(raw)
    expected = []
    while (ev := by_event.next_event()) is not NEED_DATA:
        expected.append(ev)
    assert len(expected) == len(requests)

    _, by_plain = connect(mode, contexts=contexts)
    by_plain.receive_data(raw)
    got: list[Any] = []
    while (ev2 := by_plain.next_plain()) is not NEED_DATA:
        got.append(ev2)
    plain = [g for g in got if isinstance(g, tuple)]
    valid_io = [
        e.cookie
        for e in expected
        if isinstance(e, Request) and e.error is None and e.cmd in (Cmd.READ, Cmd.WRITE)
    ]
    assert [p[2] for p in plain] == valid_io
    assert {1, 8, 9, 11} <= set(valid_io)
    assert [by_plain.as_request(g) if isinstance(g, tuple) else g for g in got] == expected

    # The plain reply builders frame exactly what the Request ones do.
    for g in plain:
        request = by_plain.as_request(g)
        if request.cmd is Cmd.READ:
            data = bytes(request.length)
            assert by_plain.reply_read_plain(g, data) == by_plain.reply_read(request, data)
            if request.length:  # the header alone, for data sent some other way
                head = by_plain.reply_read_head_plain(g)
                assert [head, data] == by_plain.reply_read(request, data)
        else:
            assert by_plain.reply_ok_plain(g) == by_plain.reply(request)


@settings(max_examples=400, deadline=None)
@given(
    cmd=st.sampled_from([Cmd.READ, Cmd.WRITE]),
    flags=st.integers(0, 127),
    offset=st.one_of(st.integers(0, 1 << 21), st.just((1 << 64) - 1)),
    length=st.integers(0, 8192),
    read_only=st.booleans(),
    structured=st.booleans(),
    block_size=st.sampled_from([None, (512, 4096, 4096), (3, 4096, 4096)]),
    max_payload=st.sampled_from([4096, 1 << 20]),
)
def test_inline_read_write_checks_match_the_validator(
    cmd: Cmd, flags: int, offset: int, length: int, read_only: bool, structured: bool,
    block_size: tuple[int, int, int] | None, max_payload: int,
) -> None:
    # next_plain checks READ/WRITE inline (Validator.plain_rules); next_event always runs
    # the full Validator.check. Both must reach the same verdict on every request.
    caps = ALL_CAPS | TransmissionFlag.HAS_FLAGS
    if read_only:
        caps |= TransmissionFlag.READ_ONLY
    if structured:
        caps |= TransmissionFlag.SEND_DF
    session = Session(ExportInfo("e", 1 << 20, caps), caps, structured=structured,
                      block_size=block_size)
    raw = wire.REQUEST.pack(0x25609513, flags, cmd, 7, offset, length)
    if cmd is Cmd.WRITE:
        raw += bytes(length)
    verdicts: list[object] = []
    for plain in (False, True):
        server = ServerTransmission(session, max_payload=max_payload)
        server.receive_data(raw)
        try:
            event: object = server.next_plain() if plain else server.next_event()
        except RemoteProtocolError:
            event = "disconnect"
        if isinstance(event, tuple):
            event = server.as_request(event)
        verdicts.append(event)
    assert verdicts[0] == verdicts[1]
