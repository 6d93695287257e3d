"""Hypothesis: whatever a peer sends, the server side yields events or RemoteProtocolError —
nothing else — and never buffers more than one bounded message."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    IHAVEOPT,
    NEED_DATA,
    Aborted,
    ClientTransmission,
    Closed,
    Cmd,
    Disconnect,
    ExportInfo,
    OptionHandled,
    Ready,
    RemoteProtocolError,
    Request,
    ServerHandshake,
    ServerTransmission,
    Session,
    StartTLS,
    TLSMode,
    TransmissionFlag,
)
from protocol import _wire as wire

from .helpers import ALL_CAPS, default_catalogue

MAX_OPTION = 2048
MAX_PAYLOAD = 4096
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Structured inputs reach deep code in few examples, and each one costs more to generate.
FUZZ_SHAPED = settings(FUZZ, max_examples=80)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in pairwise(points)]


def _drive_handshake(server: ServerHandshake, pieces: list[bytes], eof: bool) -> None:
    try:
        for piece in [*pieces, b""] if eof else pieces:
            server.receive_data(piece)
            while True:
                ev = server.next_event()
                server.data_to_send()
                if ev is NEED_DATA:
                    # Bounded: less than one option header + payload (or the client flags).
                    assert server.buffered < 16 + MAX_OPTION
                    break
                if isinstance(ev, StartTLS):
                    server.tls_established()
                    continue
                if isinstance(ev, Aborted | Closed | Ready):
                    return
                assert isinstance(ev, OptionHandled)
    except RemoteProtocolError:
        pass


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8),
       eof=st.booleans(), tls=st.sampled_from(TLSMode))  # fmt: skip
def test_handshake_arbitrary_bytes(data: bytes, cuts: list[int], eof: bool, tls: TLSMode) -> None:
    server = ServerHandshake(default_catalogue(), tls=tls, max_option_length=MAX_OPTION)
    server.initiate()
    _drive_handshake(server, _chunks(data, cuts), eof)


_option = st.builds(
    lambda opt, data, bad_len: wire.OPTION_HEADER.pack(
        IHAVEOPT, opt, len(data) if bad_len is None else bad_len
    ) + data,
    st.one_of(st.integers(0, 13), st.integers(0, 0xFFFFFFFF)),
    st.one_of(
        st.binary(max_size=64),
        # Well-formed-looking INFO/GO/meta payloads with random names and counts.
        st.builds(lambda n, r: wire.InfoRequest.build(dict(name=n, requests=r)),
                  st.sampled_from(["", "disk", "ro", "nope"]),
                  st.lists(st.integers(0, 5), max_size=4)),
        st.builds(lambda n, q: wire.MetaContextRequest.build(dict(name=n, queries=q)),
                  st.sampled_from(["", "disk", "nope"]),
                  st.lists(st.sampled_from(["base:", "base:allocation", "qemu:", "x:"]),
                           max_size=3)),
    ),
    st.one_of(st.none(), st.integers(0, 5000)),
)  # fmt: skip


@FUZZ_SHAPED
@given(flags=st.sampled_from([0, 1, 2, 3, 7]), options=st.lists(_option, max_size=12),
       tail=st.binary(max_size=40), cuts=st.lists(st.integers(0, 4000), max_size=6),
       eof=st.booleans(), tls=st.sampled_from(TLSMode))  # fmt: skip
def test_handshake_option_shaped_bytes(
    flags: int, options: list[bytes], tail: bytes, cuts: list[int], eof: bool, tls: TLSMode
) -> None:
    server = ServerHandshake(default_catalogue(), tls=tls, max_option_length=MAX_OPTION)
    server.initiate()
    data = flags.to_bytes(4, "big") + b"".join(options) + tail
    _drive_handshake(server, _chunks(data, cuts), eof)


def _session(extended: bool, structured: bool, flags: TransmissionFlag) -> Session:
    export = ExportInfo("e", 1 << 20, flags, block_size=(512, 4096, MAX_PAYLOAD))
    return Session(export, flags | TransmissionFlag.HAS_FLAGS, structured or extended,
                   extended, {0: "base:allocation"}, (512, 4096, MAX_PAYLOAD))  # fmt: skip


def _drive_transmission(server: ServerTransmission, pieces: list[bytes], eof: bool) -> None:
    header = 32 if server.session.extended else 28
    try:
        for piece in [*pieces, b""] if eof else pieces:
            server.receive_data(piece)
            while True:
                ev = server.next_event()
                if ev is NEED_DATA:
                    # Bounded: less than one request header + the largest payload.
                    assert server.buffered < header + MAX_PAYLOAD
                    break
                if isinstance(ev, Closed):
                    return
                if isinstance(ev, Request):
                    # Every request can be answered: replies never fail on peer input.
                    if ev.error is None and ev.cmd is Cmd.READ:
                        server.reply_read(ev, bytes(ev.length))
                    elif ev.error is None and ev.cmd is Cmd.BLOCK_STATUS:
                        server.reply_block_status(ev, {0: [(ev.length, 0)]})
                    else:
                        server.reply(ev)
                else:
                    assert isinstance(ev, Disconnect)
    except RemoteProtocolError:
        pass


_modes = st.tuples(st.booleans(), st.booleans(), st.sampled_from(
    [TransmissionFlag(0), TransmissionFlag.READ_ONLY, ALL_CAPS]))  # fmt: skip


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8),
       eof=st.booleans(), mode=_modes)  # fmt: skip
def test_transmission_arbitrary_bytes(
    data: bytes, cuts: list[int], eof: bool, mode: tuple[bool, bool, TransmissionFlag]
) -> None:
    server = ServerTransmission(_session(*mode), max_payload=MAX_PAYLOAD)
    _drive_transmission(server, _chunks(data, cuts), eof)


_request = st.builds(
    lambda cmd, flags, offset, length: (cmd, flags, offset, length),
    st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 0x3F), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 1 << 21), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 5000), st.integers(0, 0xFFFFFFFF)),
)


@FUZZ_SHAPED
@given(requests=st.lists(_request, max_size=10), cuts=st.lists(st.integers(0, 9000), max_size=6),
       eof=st.booleans(), mode=_modes)  # fmt: skip
def test_transmission_request_shaped_bytes(
    requests: list[tuple[int, int, int, int]],
    cuts: list[int],
    eof: bool,
    mode: tuple[bool, bool, TransmissionFlag],
) -> None:
    session = _session(*mode)
    fmt, magic = (
        (wire.EXTENDED_REQUEST, 0x21E41C71) if session.extended else (wire.REQUEST, 0x25609513)
    )
    raw = b""
    for i, (cmd, flags, offset, length) in enumerate(requests):
        raw += fmt.pack(magic, flags, cmd, i, offset, length)
        if cmd == Cmd.WRITE or (session.extended and flags & 0x20):
            raw += bytes(min(length, MAX_PAYLOAD + 1))
    server = ServerTransmission(session, max_payload=MAX_PAYLOAD)
    _drive_transmission(server, _chunks(raw, cuts), eof)


@FUZZ
@given(data=st.binary(max_size=400), mode=_modes)
def test_client_transmission_arbitrary_replies(
    data: bytes, mode: tuple[bool, bool, TransmissionFlag]
) -> None:
    client = ClientTransmission(_session(*mode))
    client.send(Request(0, Cmd.READ, length=16))
    client.send(Request(1, Cmd.BLOCK_STATUS, length=16))
    if data:
        client.receive_data(data)
    client.receive_data(b"")
    try:
        while not isinstance(client.next_event(), Closed):
            pass
    except RemoteProtocolError:
        pass
