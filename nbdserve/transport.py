"""The byte pipe under one NBD connection.

The data path talks to a non-blocking stdlib socket directly: it tries ``recv``/``sendmsg``
first and only waits for readiness when the kernel says it would block, which saves a trip
through the scheduler on every call. Anything else that looks like a trio stream (a pipe pair
for ``--stdin``, a TLS stream later) goes through :class:`StreamTransport`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Sequence

import trio

from .types import Buffer

#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call.
IOV_MAX = 1024
#: A bigger socket send buffer lets one sendmsg carry a whole 1 MiB read reply.
_SOCKET_BUFFER = 4 << 20
#: Consecutive non-blocking receives before yielding to the scheduler anyway, so a client
#: that keeps the pipe full cannot starve request tasks or other connections.
_MAX_SPINS = 16


class Transport:
    """What a connection needs from its byte pipe."""

    #: "unix", "tcp" or "stdio", for the connection's log line.
    kind: str = ""
    #: Printable peer address.
    peer: str = ""

    async def receive(self, max_bytes: int) -> bytes | memoryview:
        """Up to ``max_bytes``; empty at end of file. The result is only valid until the next
        call (the protocol objects copy what they are fed)."""
        raise NotImplementedError

    def receive_nowait(self, max_bytes: int) -> bytes | memoryview | None:
        """Like :meth:`receive` if that would not wait; else None (and nothing consumed)."""
        return None

    async def receive_into(self, view: memoryview) -> int:
        """Receive up to ``len(view)`` bytes into ``view``; 0 at end of file."""
        data = await self.receive(len(view))
        view[: len(data)] = data
        return len(data)

    async def send(self, buffers: Sequence[Buffer]) -> None:
        """Write every buffer, in order, completely."""
        raise NotImplementedError

    def into_stream(self) -> trio.abc.Stream:
        """The connection as a trio stream, to wrap in TLS after STARTTLS. The transport
        must not be used afterwards."""
        raise NotImplementedError

    def stop_receiving(self) -> None:
        """Make the pending and every later ``receive`` return ``b""`` (graceful shutdown:
        replies can still be sent)."""
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class SocketTransport(Transport):
    def __init__(self, sock: socket.socket, *, kind: str, peer: str) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        except OSError:  # pragma: no cover - the kernel caps it; a smaller buffer still works
            pass
        self._sock = sock
        self._spins = 0
        # One receive buffer for the connection's life: no allocation per recv.
        self._buffer = bytearray(0)
        self._view = memoryview(self._buffer)
        self.kind = kind
        self.peer = peer

    @property
    def socket(self) -> socket.socket:
        return self._sock

    async def receive(self, max_bytes: int) -> bytes | memoryview:
        sock = self._sock
        self._spins += 1
        if self._spins >= _MAX_SPINS:
            self._spins = 0
            await trio.lowlevel.checkpoint()
        if len(self._buffer) < max_bytes:
            self._view.release()
            self._buffer = bytearray(max_bytes)
            self._view = memoryview(self._buffer)
        view = self._view
        while True:
            try:
                return view[:sock.recv_into(view, max_bytes)]
            except BlockingIOError:
                self._spins = 0
                await trio.lowlevel.wait_readable(sock)

    def receive_nowait(self, max_bytes: int) -> bytes | memoryview | None:
        if len(self._buffer) < max_bytes:
            return None  # receive() sizes the buffer; this path is for the steady state
        view = self._view
        try:
            return view[: self._sock.recv_into(view, max_bytes)]
        except BlockingIOError:
            return None

    async def receive_into(self, view: memoryview) -> int:
        # Straight into the caller's buffer (a large WRITE payload): no copy in user space.
        sock = self._sock
        self._spins += 1
        if self._spins >= _MAX_SPINS:
            self._spins = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                return sock.recv_into(view)
            except BlockingIOError:
                self._spins = 0
                await trio.lowlevel.wait_readable(sock)

    async def send(self, buffers: Sequence[Buffer]) -> None:
        sock = self._sock
        pending: list[Buffer] = list(buffers)
        while pending:
            try:
                sent = sock.sendmsg(pending[:IOV_MAX])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            pending = unsent(pending, sent)

    def into_stream(self) -> trio.abc.Stream:
        return trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))

    def stop_receiving(self) -> None:
        # The kernel wakes a waiting recv with EOF; the write side stays open.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RD)

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()
        await trio.lowlevel.checkpoint()


def unsent(buffers: list[Buffer], sent: int) -> list[Buffer]:
    """What is left of ``buffers`` after a ``sendmsg`` that sent ``sent`` bytes of them; a
    partly sent buffer continues as a memoryview slice."""
    i, n = 0, len(buffers)
    while i < n:
        size = len(buffers[i])
        if sent < size:
            break
        sent -= size
        i += 1
    rest = buffers[i:]
    if sent:
        rest[0] = memoryview(rest[0])[sent:]
    return rest


class StreamTransport(Transport):
    """Any trio stream: pipes for ``--stdin``, and TLS once STARTTLS exists."""

    def __init__(self, stream: trio.abc.Stream, *, kind: str, peer: str) -> None:
        self.stream = stream
        self.kind = kind
        self.peer = peer
        self._stopped = False
        self._receive_scope: trio.CancelScope | None = None

    # Stream errors become ConnectionResetError, so the connection treats a vanished peer
    # the same way whatever carries it.

    async def receive(self, max_bytes: int) -> bytes:
        if self._stopped:
            return b""
        with trio.CancelScope() as self._receive_scope:
            try:
                return bytes(await self.stream.receive_some(max_bytes))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise ConnectionResetError(str(e)) from e
        return b""  # cancelled by stop_receiving()

    def into_stream(self) -> trio.abc.Stream:
        return self.stream

    def stop_receiving(self) -> None:
        self._stopped = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def send(self, buffers: Sequence[Buffer]) -> None:
        try:
            if len(buffers) == 1:
                await self.stream.send_all(buffers[0])
            else:
                await self.stream.send_all(b"".join(buffers))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise ConnectionResetError(str(e)) from e

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def stdio_transport() -> Transport:
    """The connection on stdin/stdout (inetd style, libnbd's ``connect_command``).

    libnbd hands us one socket as both stdin and stdout: then the fast socket path applies.
    Pipes get a stream pair. The descriptors are duplicated so closing the connection does not
    close fds 0 and 1 under the rest of the process."""
    st_in, st_out = os.fstat(0), os.fstat(1)
    if stat.S_ISSOCK(st_in.st_mode) and (st_in.st_dev, st_in.st_ino) == (st_out.st_dev,
                                                                        st_out.st_ino):
        sock = socket.socket(fileno=os.dup(0))
        return SocketTransport(sock, kind="stdio", peer="stdin")
    stream = trio.StapledStream(trio.lowlevel.FdStream(os.dup(1)),
                                trio.lowlevel.FdStream(os.dup(0)))
    return StreamTransport(stream, kind="stdio", peer="stdin")
