"""The socket transport's data path: non-blocking receives, receiving in place, whole sends."""

from __future__ import annotations

import socket

import trio

from nbdserve.transport import SocketTransport


def _pair() -> tuple[SocketTransport, socket.socket]:
    ours, theirs = socket.socketpair()
    return SocketTransport(ours, kind="unix", peer="test"), theirs


async def test_receive_nowait_returns_none_instead_of_waiting() -> None:
    transport, peer = _pair()
    with peer:
        assert transport.receive_nowait(1024) is None  # receive() has not sized its buffer
        peer.sendall(b"abc")
        assert bytes(await transport.receive(1024)) == b"abc"
        assert transport.receive_nowait(1024) is None  # nothing there: no wait, no data
        peer.sendall(b"defg")
        assert bytes(transport.receive_nowait(1024) or b"") == b"defg"
        peer.shutdown(socket.SHUT_WR)
        assert transport.receive_nowait(1024) == b""  # EOF
        await transport.aclose()


async def test_receive_into_fills_the_callers_buffer() -> None:
    transport, peer = _pair()
    with peer:
        target = bytearray(10)
        view = memoryview(target)

        async def late_sender() -> None:
            await trio.sleep(0.01)
            peer.sendall(b"0123456789xyz")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_sender)
            got = 0
            while got < 10:
                got += await transport.receive_into(view[got:])
        assert target == b"0123456789"
        assert bytes(await transport.receive(100)) == b"xyz"  # nothing beyond the view taken
        peer.close()
        assert await transport.receive_into(view) == 0
        await transport.aclose()


async def test_send_delivers_every_buffer_whole_past_a_full_socket() -> None:
    transport, peer = _pair()
    with peer:
        peer.setblocking(False)
        chunks = [bytes([i]) * 300_000 for i in range(1, 40)]  # far beyond the socket buffer
        received = bytearray()

        async def drain() -> None:
            while len(received) < sum(map(len, chunks)):
                await trio.lowlevel.wait_readable(peer)
                received.extend(peer.recv(1 << 20))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await transport.send([memoryview(c) for c in chunks])
        assert received == b"".join(chunks)
        await transport.aclose()
