"""Shared helpers: a catalogue and a client↔server pair wired together in memory."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from protocol import (
    NEED_DATA,
    Aborted,
    ClientHandshake,
    ClientTransmission,
    Closed,
    ExportInfo,
    OptionHandled,
    Ready,
    ServerHandshake,
    ServerTransmission,
    StartTLS,
    TLSMode,
    TransmissionFlag,
)

ALL_CAPS = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.CAN_MULTI_CONN
)


@dataclass
class Catalogue:
    """A fixed list of exports; the first one is the default ("")."""

    items: list[ExportInfo] = field(default_factory=list)

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.items:
            return self.items[0]
        return next((e for e in self.items if e.name == name), None)

    def exports(self) -> Iterable[ExportInfo]:
        return list(self.items)


def default_catalogue() -> Catalogue:
    return Catalogue(
        [
            ExportInfo(
                "disk",
                1 << 20,
                ALL_CAPS,
                description="the main disk",
                block_size=(512, 4096, 1 << 20),
                contexts=("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"),
            ),
            ExportInfo("ro", 65536, TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH),
        ]
    )


class HandshakePair:
    """Runs a ClientHandshake against a ServerHandshake, recording both sides' events."""

    def __init__(
        self,
        catalogue: Catalogue | None = None,
        tls: TLSMode = TLSMode.OFF,
        *,
        no_zeroes: bool = True,
        chunk: int | None = None,
    ) -> None:
        self.server = ServerHandshake(catalogue or default_catalogue(), tls=tls)
        self.client = ClientHandshake(no_zeroes=no_zeroes)
        self.chunk = chunk
        self.server_events: list[object] = []
        self.client_events: list[object] = []
        self.server_ready: Ready | None = None
        self.client_ready: Ready | None = None
        self.server_done = False
        self._feed_client(self.server.initiate())
        # Take the greeting now so the client flags lead the client's first bytes.
        while not self.client_events:
            ev = self.client.next_event()
            assert ev is not NEED_DATA
            self.client_events.append(ev)

    def _split(self, data: bytes) -> list[bytes]:
        if not self.chunk:
            return [data] if data else []
        return [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]

    def _feed_client(self, data: bytes) -> None:
        for piece in self._split(data):
            self.client.receive_data(piece)

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything left to say.

        With ``chunk`` set, every piece is followed by draining the receiver's events, so
        each object really works from partial input.
        """
        while True:
            out = self.client.data_to_send()
            if not out or self.server_done:
                return
            for piece in self._split(out):
                self.server.receive_data(piece)
                self._drain_server()

    def _drain_server(self) -> None:
        while not self.server_done:
            ev = self.server.next_event()
            reply = self.server.data_to_send()
            for piece in self._split(reply):
                self.client.receive_data(piece)
                self._drain_client()
            if ev is NEED_DATA:
                return
            self.server_events.append(ev)
            if isinstance(ev, StartTLS):
                # In memory the "TLS" stream is the same pipe; both sides reset.
                self.client.tls_established()
                self.server.tls_established()
            elif isinstance(ev, Ready):
                self.server_ready = ev
            if isinstance(ev, Aborted | Closed | Ready):
                self.server_done = True
            else:
                assert isinstance(ev, OptionHandled | StartTLS)

    def _drain_client(self) -> None:
        while self.client_ready is None:
            ev = self.client.next_event()
            if ev is NEED_DATA or isinstance(ev, Closed):
                return
            self.client_events.append(ev)
            if isinstance(ev, Ready):
                self.client_ready = ev

    def transmission(
        self, max_payload: int = 32 * 1024 * 1024
    ) -> tuple[ClientTransmission, ServerTransmission]:
        assert self.client_ready is not None and self.server_ready is not None
        client = ClientTransmission(self.client_ready.session, leftover=self.client_ready.leftover)
        server = ServerTransmission(
            self.server_ready.session, max_payload, leftover=self.server_ready.leftover
        )
        return client, server
