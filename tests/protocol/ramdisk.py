"""A minimal blocking NBD server over a bytearray, built only on ``protocol``.

Test-only: it checks the sans-IO layer against real clients (qemu-io, nbdinfo) without the
trio server. One thread, one connection at a time, sequential requests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from protocol import (
    NEED_DATA,
    Aborted,
    Buffer,
    Closed,
    Cmd,
    Disconnect,
    ExportInfo,
    Ready,
    RemoteProtocolError,
    Request,
    ServerHandshake,
    ServerTransmission,
    StartTLS,
    StateFlag,
    TransmissionFlag,
)

FLAGS = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_CACHE
)


class RamDisk:
    """Catalogue with one export, "disk"; the first 64 KiB are data, the rest reads as zero."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.data = bytearray(size)
        self.allocated = bytearray(size // 4096)
        self.data[:65536] = bytes(range(256)) * 256
        self.allocated[:16] = b"\1" * 16
        self.info = ExportInfo("disk", size, FLAGS, "a RAM disk", (1, 4096, 1 << 20))
        self.errors: list[BaseException] = []

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name in ("", "disk") else None

    def exports(self) -> Iterable[ExportInfo]:
        return [self.info]

    def extents(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        pos = offset
        while pos < offset + length:
            block_end = (pos // 4096 + 1) * 4096
            flags = 0 if self.allocated[pos // 4096] else StateFlag.HOLE | StateFlag.ZERO
            size = min(block_end, offset + length) - pos
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + size, flags)
            else:
                out.append((size, int(flags)))
            pos += size
        return out

    def answer(self, tx: ServerTransmission, req: Request) -> list[Buffer]:
        if req.error is not None:
            return [tx.reply(req)]
        start, end = req.offset, req.offset + req.length
        if req.cmd is Cmd.READ:
            return tx.reply_read(req, memoryview(self.data)[start:end])
        if req.cmd is Cmd.WRITE:
            assert req.data is not None
            self.data[start:end] = req.data
            self.allocated[start // 4096 : (end + 4095) // 4096] = b"\1" * (
                (end + 4095) // 4096 - start // 4096
            )
        elif req.cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
            self.data[start:end] = bytes(req.length)
        elif req.cmd is Cmd.BLOCK_STATUS:
            extents = self.extents(start, req.length)
            return [tx.reply_block_status(req, dict.fromkeys(tx.session.contexts, extents))]
        return [tx.reply(req)]

    def serve(self, conn: socket.socket) -> None:
        hs = ServerHandshake(self)
        conn.sendall(hs.initiate())
        while True:
            ev = hs.next_event()
            if isinstance(ev, Aborted):
                # The client may close without reading the ACK: a failed send is normal.
                with contextlib.suppress(OSError):
                    conn.sendall(hs.data_to_send())
                return
            out = hs.data_to_send()
            if out:
                conn.sendall(out)
            if ev is NEED_DATA:
                hs.receive_data(conn.recv(65536))
            elif isinstance(ev, Closed):
                return
            elif isinstance(ev, Ready):
                break
            assert not isinstance(ev, StartTLS)
        tx = ServerTransmission(ev.session, leftover=ev.leftover)
        while True:
            req = tx.next_event()
            if req is NEED_DATA:
                tx.receive_data(conn.recv(1 << 20))
            elif isinstance(req, Disconnect | Closed):
                return
            else:
                conn.sendmsg(self.answer(tx, req))


@contextlib.contextmanager
def serving(disk: RamDisk, path: Path) -> Iterator[RamDisk]:
    """Serve ``disk`` on a Unix socket at ``path`` from a thread, until the block exits."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # listener closed
            with conn:
                try:
                    disk.serve(conn)
                except (RemoteProtocolError, OSError) as exc:
                    disk.errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield disk
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
