"""The handshake: client and server objects talking, and the server against raw bytes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    NEED_DATA,
    Aborted,
    ClientHandshake,
    Closed,
    ExportEntry,
    ExportInfo,
    Info,
    InfoBlockSize,
    InfoDescription,
    InfoExport,
    InfoName,
    LocalProtocolError,
    MetaContext,
    Opt,
    OptionAck,
    OptionError,
    OptionHandled,
    Ready,
    RemoteProtocolError,
    Rep,
    ServerGreeting,
    ServerHandshake,
    StartTLS,
    TLSMode,
    TransmissionFlag,
)
from protocol import _wire as wire

from .helpers import Catalogue, HandshakePair, default_catalogue


def of_type(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


# -- conversations ------------------------------------------------------------------------------


def test_go_with_everything() -> None:
    pair = HandshakePair()
    pair.client.structured_reply()
    pair.client.set_meta_context("disk", ["base:allocation", "qemu:allocation-depth"])
    pair.client.go("disk", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])
    pair.pump()
    assert pair.server_ready is not None and pair.client_ready is not None
    server, client = pair.server_ready.session, pair.client_ready.session
    assert server.flags == client.flags
    assert server.flags & TransmissionFlag.HAS_FLAGS
    assert server.flags & TransmissionFlag.SEND_DF  # structured replies were negotiated
    assert server.structured and client.structured and not server.extended
    assert server.contexts == client.contexts == {0: "base:allocation", 1: "qemu:allocation-depth"}
    assert server.block_size == client.block_size == (512, 4096, 1 << 20)
    assert client.export.description == "the main disk"
    assert of_type(pair.client_events, InfoName) == [InfoName("disk")]
    assert of_type(pair.client_events, InfoDescription) == [InfoDescription("the main disk")]
    assert pair.server_ready.leftover == b""


def test_go_default_export_without_extras() -> None:
    pair = HandshakePair()
    pair.client.go("", [])
    pair.pump()
    assert pair.server_ready is not None and pair.client_ready is not None
    session = pair.server_ready.session
    assert session.export.name == "disk"
    assert not session.structured and not session.flags & TransmissionFlag.SEND_DF
    assert session.block_size is None  # not requested in GO: the client is not committed
    assert session.contexts == {}
    # BLOCK_SIZE is sent whenever the export has it (as qemu), even unasked.
    assert of_type(pair.client_events, InfoBlockSize) == [InfoBlockSize(512, 4096, 1 << 20)]
    assert of_type(pair.client_events, InfoName) == []
    assert pair.client_ready.session.flags == session.flags


def test_list_and_info() -> None:
    pair = HandshakePair()
    pair.client.list_exports()
    pair.client.info("ro", [Info.NAME, Info.DESCRIPTION, 999])
    pair.client.info("nope")
    pair.pump()
    assert of_type(pair.client_events, ExportEntry) == [
        ExportEntry("disk", "the main disk"),
        ExportEntry("ro", ""),
    ]
    exports = of_type(pair.client_events, InfoExport)
    assert exports == [
        InfoExport(65536, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
                   | TransmissionFlag.SEND_FLUSH)
    ]  # fmt: skip
    assert of_type(pair.client_events, InfoDescription) == []  # "ro" has none
    errors = of_type(pair.client_events, OptionError)
    assert [(e.option, e.reply) for e in errors] == [(Opt.INFO, Rep.ERR_UNKNOWN)]
    assert "nope" in errors[0].message
    assert [e.reply for e in pair.server_events if isinstance(e, OptionHandled)] == [
        Rep.ACK,
        Rep.ACK,
        Rep.ERR_UNKNOWN,
    ]
    assert pair.server_ready is None


def test_info_then_go_return_the_same_information() -> None:
    pair = HandshakePair()
    pair.client.structured_reply()
    pair.client.info("disk", [Info.BLOCK_SIZE])
    pair.client.go("disk", [Info.BLOCK_SIZE])
    pair.pump()
    infos = [e for e in pair.client_events if isinstance(e, InfoExport | InfoBlockSize)]
    assert infos[:2] == infos[2:]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]),
        (["base:"], ["base:allocation"]),
        (["qemu:"], ["qemu:allocation-depth", "qemu:dirty-bitmap:b0"]),
        (["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:b0"]),
        (["x-unknown:foo", "nocolon", "base:allocation"], ["base:allocation"]),
        (["base:allocation", "base:"], ["base:allocation"]),  # no duplicates
        (["base:other"], []),
    ],
)
def test_list_meta_context(queries: list[str], expected: list[str]) -> None:
    pair = HandshakePair()
    pair.client.list_meta_context("disk", queries)
    pair.pump()
    contexts = of_type(pair.client_events, MetaContext)
    assert [c.name for c in contexts] == expected
    assert all(c.context_id == 0 for c in contexts)
    assert of_type(pair.client_events, OptionAck) == [OptionAck(Opt.LIST_META_CONTEXT)]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], {}),
        (["base:"], {}),  # the spec: SET MUST ignore "base:"
        (["qemu:"], {}),
        (["base:allocation"], {0: "base:allocation"}),
        (["qemu:dirty-bitmap:b0", "base:allocation"],
         {2: "qemu:dirty-bitmap:b0", 0: "base:allocation"}),
        (["x-foo:bar", "base:allocation", "base:allocation"], {0: "base:allocation"}),
    ],
)  # fmt: skip
def test_set_meta_context(queries: list[str], expected: dict[int, str]) -> None:
    pair = HandshakePair()
    pair.client.structured_reply()
    pair.client.set_meta_context("disk", queries)
    pair.client.go("disk")
    pair.pump()
    replies = of_type(pair.client_events, MetaContext)
    assert {c.context_id: c.name for c in replies} == expected
    assert len({c.context_id for c in replies}) == len(replies)
    assert pair.server_ready is not None
    assert pair.server_ready.session.contexts == expected


def test_meta_context_errors() -> None:
    pair = HandshakePair()
    pair.client.set_meta_context("disk", ["base:allocation"])  # before structured replies
    pair.client.list_meta_context("nope", [])
    pair.client.structured_reply()
    pair.client.set_meta_context("nope", ["base:allocation"])
    pair.pump()
    errors = [(e.option, e.reply) for e in of_type(pair.client_events, OptionError)]
    assert errors == [
        (Opt.SET_META_CONTEXT, Rep.ERR_INVALID),
        (Opt.LIST_META_CONTEXT, Rep.ERR_UNKNOWN),
        (Opt.SET_META_CONTEXT, Rep.ERR_UNKNOWN),
    ]


def test_go_to_another_export_clears_the_selection() -> None:
    catalogue = default_catalogue()
    pair = HandshakePair(catalogue)
    pair.client.structured_reply()
    pair.client.set_meta_context("disk", ["base:allocation"])
    pair.client.go("ro")
    pair.pump()
    assert pair.server_ready is not None
    assert pair.server_ready.session.contexts == {}


def test_failed_set_clears_an_earlier_selection() -> None:
    pair = HandshakePair()
    pair.client.structured_reply()
    pair.client.set_meta_context("disk", ["base:allocation"])
    pair.client.set_meta_context("nope", ["base:allocation"])
    pair.client.go("disk")
    pair.pump()
    assert pair.server_ready is not None
    assert pair.server_ready.session.contexts == {}


def test_default_export_name_matches_its_canonical_name() -> None:
    pair = HandshakePair()
    pair.client.structured_reply()
    pair.client.set_meta_context("", ["base:allocation"])
    pair.client.go("disk")
    pair.pump()
    assert pair.server_ready is not None
    assert pair.server_ready.session.contexts == {0: "base:allocation"}


def test_extended_headers() -> None:
    pair = HandshakePair()
    pair.client.extended_headers()
    pair.client.structured_reply()  # downgrade refused
    pair.client.extended_headers()  # repeated
    pair.client.go("disk")
    pair.pump()
    errors = [e.reply for e in of_type(pair.client_events, OptionError)]
    assert errors == [Rep.ERR_EXT_HEADER_REQD, Rep.ERR_INVALID]
    assert pair.server_ready is not None and pair.client_ready is not None
    for session in (pair.server_ready.session, pair.client_ready.session):
        assert session.extended and session.structured
        assert session.flags & TransmissionFlag.SEND_DF


def test_structured_reply_twice_and_with_data() -> None:
    pair = HandshakePair()
    pair.client.structured_reply()
    pair.client.structured_reply()
    pair.client.send_option(Opt.STRUCTURED_REPLY, b"x")
    pair.client.send_option(Opt.LIST, b"x")
    pair.client.send_option(Opt.EXTENDED_HEADERS, b"x")
    pair.pump()
    replies = [e.reply for e in pair.server_events if isinstance(e, OptionHandled)]
    assert replies == [Rep.ACK] + [Rep.ERR_INVALID] * 4


def test_unknown_options_are_skipped_with_unsup() -> None:
    pair = HandshakePair()
    pair.client.send_option(Opt.PEEK_EXPORT, b"abc")
    pair.client.send_option(12, b"\0" * 100)
    pair.client.send_option(0xFFFFFFFF)
    pair.client.go("disk")
    pair.pump()
    replies = [(e.option, e.reply) for e in of_type(pair.client_events, OptionError)]
    assert replies == [(Opt.PEEK_EXPORT, Rep.ERR_UNSUP), (12, Rep.ERR_UNSUP),
                       (0xFFFFFFFF, Rep.ERR_UNSUP)]  # fmt: skip
    assert pair.server_ready is not None


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    pair = HandshakePair(no_zeroes=no_zeroes)
    pair.client.structured_reply()
    pair.client.export_name("ro")
    # Capture the raw bytes of the EXPORT_NAME reply on the way to the client.
    pair.server.receive_data(pair.client.data_to_send())
    assert isinstance(pair.server.next_event(), OptionHandled)
    pair.client.receive_data(pair.server.data_to_send())
    ready = pair.server.next_event()
    assert isinstance(ready, Ready)
    raw = pair.server.data_to_send()
    assert len(raw) == (10 if no_zeroes else 134)
    assert raw[:8] == (65536).to_bytes(8, "big")
    flags = TransmissionFlag(int.from_bytes(raw[8:10], "big"))
    assert flags == ready.session.flags
    assert flags & TransmissionFlag.SEND_DF  # structured replies came first
    assert ready.session.block_size is None
    pair.client.receive_data(raw + b"tail")
    events = []
    while (ev := pair.client.next_event()) is not NEED_DATA:
        events.append(ev)
        if isinstance(ev, Ready):
            break
    assert isinstance(events[-1], Ready)
    assert events[-1].session.export.size == 65536
    assert events[-1].session.flags == flags
    assert events[-1].leftover == b"tail"


def test_export_name_unknown_disconnects() -> None:
    pair = HandshakePair()
    pair.client.export_name("nope")
    with pytest.raises(RemoteProtocolError, match="unknown export"):
        pair.pump()


def test_export_name_after_extended_headers_disconnects() -> None:
    pair = HandshakePair()
    pair.client.extended_headers()
    pair.client.export_name("disk")
    with pytest.raises(RemoteProtocolError, match="extended"):
        pair.pump()


def test_abort() -> None:
    pair = HandshakePair()
    pair.client.abort()
    pair.pump()
    assert pair.server_events == [Aborted()]
    assert of_type(pair.client_events, OptionAck) == [OptionAck(Opt.ABORT)]
    with pytest.raises(LocalProtocolError):
        pair.server.next_event()


def test_leftover_after_go_is_handed_over() -> None:
    pair = HandshakePair()
    pair.client.go("disk")
    pair.server.receive_data(pair.client.data_to_send() + b"early request bytes")
    events = []
    while not isinstance(ev := pair.server.next_event(), Ready):
        events.append(ev)
    assert ev.leftover == b"early request bytes"


# -- TLS ----------------------------------------------------------------------------------------


def test_starttls_refused_when_off() -> None:
    pair = HandshakePair(tls=TLSMode.OFF)
    pair.client.starttls()
    pair.pump()
    assert [e.reply for e in of_type(pair.client_events, OptionError)] == [Rep.ERR_POLICY]


def test_starttls_resets_negotiated_state() -> None:
    pair = HandshakePair(tls=TLSMode.ON)
    pair.client.structured_reply()
    pair.client.set_meta_context("disk", ["base:allocation"])
    pair.client.starttls()
    pair.pump()
    assert StartTLS() in pair.server_events
    pair.client.starttls()  # again, inside TLS
    pair.client.go("disk")
    pair.pump()
    assert [e.reply for e in of_type(pair.client_events, OptionError)] == [Rep.ERR_INVALID]
    assert pair.server_ready is not None and pair.client_ready is not None
    session = pair.server_ready.session
    assert session.tls and pair.client_ready.session.tls
    assert not session.structured and session.contexts == {}
    assert not session.flags & TransmissionFlag.SEND_DF


def test_starttls_with_data_is_invalid() -> None:
    pair = HandshakePair(tls=TLSMode.ON)
    pair.client.send_option(Opt.STARTTLS, b"x")
    pair.pump()
    assert [e.reply for e in of_type(pair.client_events, OptionError)] == [Rep.ERR_INVALID]


def test_plaintext_after_starttls_disconnects() -> None:
    server = ServerHandshake(default_catalogue(), tls=TLSMode.ON)
    client = ClientHandshake()
    client.receive_data(server.initiate())
    client.next_event()
    client.starttls()
    server.receive_data(client.data_to_send() + b"\x16\x03\x01 smuggled")
    with pytest.raises(RemoteProtocolError, match="STARTTLS"):
        server.next_event()


def test_tls_required_mode() -> None:
    pair = HandshakePair(tls=TLSMode.REQUIRE)
    pair.client.list_exports()
    pair.client.info("disk")
    pair.client.go("disk")
    pair.client.structured_reply()
    pair.client.send_option(99)
    pair.pump()
    errors = of_type(pair.client_events, OptionError)
    assert [e.reply for e in errors] == [Rep.ERR_TLS_REQD] * 5
    assert of_type(pair.client_events, InfoExport) == []  # no INFO before the error
    pair.client.starttls()
    pair.pump()  # a client must wait for the ACK before anything else
    pair.client.go("disk")
    pair.pump()
    assert pair.server_ready is not None and pair.server_ready.session.tls


def test_tls_required_export_name_disconnects() -> None:
    pair = HandshakePair(tls=TLSMode.REQUIRE)
    pair.client.export_name("disk")
    with pytest.raises(RemoteProtocolError, match="TLS"):
        pair.pump()


def test_tls_required_abort_is_allowed() -> None:
    pair = HandshakePair(tls=TLSMode.REQUIRE)
    pair.client.abort()
    pair.pump()
    assert pair.server_events == [Aborted()]


def test_tls_established_misuse() -> None:
    server = ServerHandshake(default_catalogue(), tls=TLSMode.ON)
    with pytest.raises(LocalProtocolError):
        server.tls_established()


# -- raw bytes against the server ---------------------------------------------------------------


def _greeting() -> bytes:
    return b"NBDMAGICIHAVEOPT\x00\x03"


def _server(**kwargs: Any) -> ServerHandshake:
    server = ServerHandshake(default_catalogue(), **kwargs)
    assert server.initiate() == _greeting()
    return server


def _option(option: int, data: bytes = b"") -> bytes:
    return wire.build(wire.OptionRequest, {"option": option, "data": data})


def _replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while raw:
        _, option, kind, length = wire.OPTION_REPLY_HEADER.unpack_from(raw)
        out.append((option, kind, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return out


def test_greeting_is_fixed_newstyle_no_zeroes() -> None:
    parsed = wire.Greeting.parse(_greeting())
    assert parsed.flags == 3


def test_next_event_before_initiate() -> None:
    with pytest.raises(LocalProtocolError):
        ServerHandshake(default_catalogue()).next_event()


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_unknown_client_flags_disconnect(flags: int) -> None:
    server = _server()
    server.receive_data(flags.to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError, match="client flags"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):  # stays failed
        server.next_event()


def test_eof_before_client_flags_is_quiet() -> None:
    server = _server()
    server.receive_data(b"")
    assert server.next_event() == Closed()


def test_eof_between_options_is_quiet() -> None:
    server = _server()
    server.receive_data(b"\0\0\0\3" + _option(Opt.LIST))
    assert isinstance(server.next_event(), OptionHandled)
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    assert server.next_event() == Closed()


@pytest.mark.parametrize("cut", [1, 15, 17])
def test_eof_inside_an_option_disconnects(cut: int) -> None:
    server = _server()
    server.receive_data(b"\0\0\0\3" + _option(Opt.LIST, b"xx")[:cut])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="EOF"):
        server.next_event()


def test_bad_option_magic_disconnects() -> None:
    server = _server()
    server.receive_data(b"\0\0\0\3" + b"IHAVEOPX" + bytes(8))
    with pytest.raises(RemoteProtocolError, match="magic"):
        server.next_event()


def test_over_long_option_disconnects_at_once() -> None:
    server = ServerHandshake(default_catalogue(), max_option_length=1000)
    server.initiate()
    header = wire.OPTION_HEADER.pack(0x49484156454F5054, Opt.LIST, 1001)
    server.receive_data(b"\0\0\0\3" + header)  # no need to wait for the payload
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()


def test_too_many_options_disconnect() -> None:
    server = ServerHandshake(default_catalogue(), max_options=3)
    server.initiate()
    server.receive_data(b"\0\0\0\3" + _option(Opt.LIST) * 4)
    for _ in range(3):
        assert isinstance(server.next_event(), OptionHandled)
    with pytest.raises(RemoteProtocolError, match="more than 3"):
        server.next_event()


def test_non_fixed_client_may_only_use_export_name() -> None:
    server = _server()
    server.receive_data(b"\0\0\0\0" + _option(Opt.LIST))
    with pytest.raises(RemoteProtocolError, match="fixed"):
        server.next_event()
    server = _server()
    server.receive_data(b"\0\0\0\0" + _option(Opt.EXPORT_NAME, b"ro"))
    ready = server.next_event()
    assert isinstance(ready, Ready)
    assert len(server.data_to_send()) == 134  # the client did not ask for NO_ZEROES


@pytest.mark.parametrize(
    "data",
    [
        b"",  # shorter than the minimum
        b"\0\0\0\5ab\0\0",  # name runs past the data
        b"\0\0\0\4disk\0\1",  # fewer info requests than announced
        b"\0\0\0\4disk\0\0\0",  # trailing byte
        b"\0\0\0\2\xff\xfe\0\0",  # invalid UTF-8
        b"\0\0\0\2a\0\0\0",  # NUL in the name
        (5000).to_bytes(4, "big") + b"a" * 5000 + b"\0\0",  # name over 4096 bytes
    ],
)
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_malformed_info_or_go_is_invalid(option: Opt, data: bytes) -> None:
    server = _server()
    server.receive_data(b"\0\0\0\3" + _option(option, data) + _option(Opt.LIST))
    assert server.next_event() == OptionHandled(option, Rep.ERR_INVALID)
    replies = _replies(server.data_to_send())
    assert [(o, k) for o, k, _ in replies] == [(option, Rep.ERR_INVALID)]
    assert replies[0][2]  # a message saying why
    assert server.next_event() == OptionHandled(Opt.LIST, Rep.ACK)  # still in sync


@pytest.mark.parametrize(
    "data",
    [
        b"\0\0\0\4disk",  # no query count
        b"\0\0\0\4disk\0\0\0\1",  # announced query missing
        b"\0\0\0\4disk\0\0\0\1\0\0\0\x09base",  # query runs past the data
        b"\0\0\0\4disk\0\0\0\0x",  # trailing byte
    ],
)
def test_malformed_meta_context_is_invalid(data: bytes) -> None:
    server = _server()
    server.receive_data(b"\0\0\0\3" + _option(Opt.LIST_META_CONTEXT, data))
    assert server.next_event() == OptionHandled(Opt.LIST_META_CONTEXT, Rep.ERR_INVALID)


def test_over_long_query_is_ignored() -> None:
    server = _server()
    query = "base:" + "a" * 5000
    data = wire.build(wire.MetaContextRequest, {"name": "disk", "queries": [query]})
    server.receive_data(b"\0\0\0\3" + _option(Opt.LIST_META_CONTEXT, data))
    assert server.next_event() == OptionHandled(Opt.LIST_META_CONTEXT, Rep.ACK)
    assert [k for _, k, _ in _replies(server.data_to_send())] == [Rep.ACK]


def test_list_reply_bytes() -> None:
    server = ServerHandshake(Catalogue([ExportInfo("a", 1, description="dd")]))
    server.initiate()
    server.receive_data(b"\0\0\0\3" + _option(Opt.LIST))
    server.next_event()
    replies = _replies(server.data_to_send())
    # NBD_REP_SERVER length = 4 + name + description (the xapi-project/nbd#128 bug).
    assert replies == [(Opt.LIST, Rep.SERVER, b"\0\0\0\1add"), (Opt.LIST, Rep.ACK, b"")]


def test_go_reply_bytes_put_info_export_first() -> None:
    server = _server()
    go = wire.build(wire.InfoRequest, {"name": "ro", "requests": [Info.NAME]})
    server.receive_data(b"\0\0\0\3" + _option(Opt.GO, go))
    assert isinstance(server.next_event(), Ready)
    replies = _replies(server.data_to_send())
    assert replies == [
        (Opt.GO, Rep.INFO, b"\0\0" + (65536).to_bytes(8, "big") + b"\0\x07"),
        (Opt.GO, Rep.INFO, b"\0\1ro"),
        (Opt.GO, Rep.ACK, b""),
    ]


def test_receive_after_eof_is_local_error() -> None:
    server = _server()
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


def test_client_rejects_a_non_nbd_server() -> None:
    client = ClientHandshake()
    client.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_client_greeting_event() -> None:
    client = ClientHandshake()
    client.go("x")
    assert client.data_to_send() == b""  # held back: the client flags must go first
    client.receive_data(_greeting())
    assert client.next_event() == ServerGreeting(3)
    out = client.data_to_send()
    assert out[:4] == b"\0\0\0\3"  # client flags go out before the queued option
    assert out[4:12] == b"IHAVEOPT"


# -- byte at a time -----------------------------------------------------------------------------


def _script(pair: HandshakePair) -> None:
    pair.client.list_exports()
    pair.client.send_option(42, b"junk")
    pair.client.structured_reply()
    pair.client.list_meta_context("disk", ["qemu:"])
    pair.client.set_meta_context("disk", ["base:allocation", "qemu:dirty-bitmap:b0"])
    pair.client.info("ro", [Info.NAME])
    pair.client.info("missing")
    pair.client.go("disk", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])


@pytest.mark.parametrize("tls", [TLSMode.OFF, TLSMode.ON])
def test_byte_at_a_time_equals_one_buffer(tls: TLSMode) -> None:
    whole, trickle = HandshakePair(tls=tls), HandshakePair(tls=tls, chunk=1)
    for pair in (whole, trickle):
        if tls is TLSMode.ON:
            pair.client.starttls()
            pair.pump()
        _script(pair)
        pair.pump()
    assert trickle.server_events == whole.server_events
    assert trickle.client_events == whole.client_events
    assert whole.server_ready is not None and whole.client_ready is not None
    assert whole.server_ready.session.tls == (tls is TLSMode.ON)
    assert len(whole.server_events) == 8 + (tls is TLSMode.ON)


def test_shutting_down() -> None:
    pair = HandshakePair()
    pair.client.list_exports()
    pair.pump()
    pair.server.shutting_down()
    pair.client.go("disk")
    pair.client.abort()
    pair.pump()
    assert [(e.option, e.reply) for e in of_type(pair.client_events, OptionError)] == [
        (Opt.GO, Rep.ERR_SHUTDOWN)
    ]
    assert pair.server_events[-1] == Aborted()
    pair = HandshakePair()
    pair.server.shutting_down()
    pair.client.export_name("disk")
    with pytest.raises(RemoteProtocolError, match="shuts down"):
        pair.pump()


def test_export_flags_are_derived_not_copied() -> None:
    from protocol import export_flags

    export = ExportInfo(
        "e", 1, TransmissionFlag.SEND_FAST_ZERO | TransmissionFlag.SEND_DF
        | TransmissionFlag.BLOCK_STATUS_PAYLOAD | TransmissionFlag.READ_ONLY,
    )  # fmt: skip
    # FAST_ZERO needs WRITE_ZEROES; DF needs structured replies; HAS_FLAGS always.
    assert export_flags(export, False) == TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY
    assert export_flags(export, True) == (
        TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_DF
    )


_ACTIONS = st.lists(
    st.one_of(
        st.just(("structured_reply",)),
        st.just(("extended_headers",)),
        st.just(("list_exports",)),
        st.tuples(st.just("set_meta_context"), st.sampled_from(["", "disk", "ro", "x"]),
                  st.lists(st.sampled_from(["base:allocation", "base:", "qemu:",
                                            "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]),
                           max_size=3)),
        st.tuples(st.just("info"), st.sampled_from(["", "disk", "ro", "x"]),
                  st.lists(st.sampled_from(list(Info)), max_size=3)),
    ),
    max_size=6,
)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(actions=_ACTIONS, go=st.sampled_from(["", "disk", "ro"]),
       requests=st.lists(st.sampled_from(list(Info)), max_size=3),
       chunk=st.sampled_from([None, 1, 5]))  # fmt: skip
def test_random_conversations_agree(
    actions: list[tuple[Any, ...]], go: str, requests: list[Info], chunk: int | None
) -> None:
    pair = HandshakePair(chunk=chunk)
    for name, *args in actions:
        getattr(pair.client, name)(*args)
    pair.client.go(go, requests)
    pair.pump()
    assert pair.server_ready is not None and pair.client_ready is not None
    server, client = pair.server_ready.session, pair.client_ready.session
    assert server.flags == client.flags
    assert (server.structured, server.extended) == (client.structured, client.extended)
    assert server.block_size == client.block_size
    sets = [a for a in actions if a[0] == "set_meta_context"]
    if sets and sets[-1][1] == go:  # same name in SET and GO: both sides must agree
        assert dict(server.contexts) == dict(client.contexts)
    if not sets:
        assert server.contexts == {} == client.contexts
    assert server.export.size == client.export.size
    assert len(pair.server_events) == len(actions) + 1
