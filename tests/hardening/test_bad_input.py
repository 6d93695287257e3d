"""The security history of qemu-nbd, nbdkit and nbd-server (peers.md §5), replayed at nbdserve.

Each test abuses a running server through its CLI and then checks that the server is still up
and serving a well-behaved client (the ``serve`` fixture also fails a test whose server died).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from . import _nbdraw as nbd
from ._server import MiB, Server, Servers

NAME_MAX = 4096


# qemu CVE-2017-15118, nbd-server CVE-2022-26495/26496: huge lengths in options and names.


@pytest.mark.parametrize("opt", [nbd.OPT_GO, nbd.OPT_EXPORT_NAME, nbd.OPT_LIST, 99])
@pytest.mark.parametrize("length", [0xFFFFFFFF, 1 << 31])
def test_huge_option_length_disconnects_at_once(server: Server, opt: int, length: int) -> None:
    rss_before = server.rss_kib()
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(opt, b"\0" * 64, length=length))
        # The server must neither wait for 4 GiB nor try to buffer it: it hangs up.
        got = nbd.wait_closed(s, timeout=5)
    assert b"\x00\x03\xe8\x89\x04\x55\x65\xa9" + struct.pack(">II", opt, nbd.REP_ACK) not in got
    assert server.rss_kib() < rss_before + 32 * 1024
    nbd.assert_serves(server.sock)


def test_export_name_of_4096_bytes_is_served_4097_refused(serve: Servers, image: Path) -> None:
    name = b"n" * NAME_MAX
    server = serve("-f", "raw", "-x", name.decode(), str(image))
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags())
        for opt in (nbd.OPT_INFO, nbd.OPT_GO):
            s.sendall(nbd.option(opt, nbd.go_data(name + b"n")))
            _, r = nbd.read_final_reply(s)
            assert r.type in (nbd.REP_ERR_INVALID, nbd.REP_ERR_TOO_BIG), hex(r.type)
        # The connection stays in step: the longest legal name still works.
        size, _ = nbd.negotiate(s, name)
        assert size == 64 * MiB
    nbd.assert_serves(server.sock, name)


@pytest.mark.parametrize("name_len", [0xFFFFFFFF, 0x80000000, 5, 4097])
def test_name_length_field_beyond_the_option_is_invalid(server: Server, name_len: int) -> None:
    # nbd-server CVE-2022-26495: the name length inside INFO/GO was trusted over the option's.
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags())
        for opt in (nbd.OPT_INFO, nbd.OPT_GO):
            s.sendall(nbd.option(opt, nbd.go_data(b"abcd", name_len=name_len)))
            infos, r = nbd.read_final_reply(s)
            assert (infos, r.type) == ([], nbd.REP_ERR_INVALID), hex(r.type)
        nbd.negotiate(s)


@pytest.mark.parametrize("length", [NAME_MAX + 1, 3000 * 1024])
def test_export_name_option_too_long_disconnects(server: Server, length: int) -> None:
    # NBD_OPT_EXPORT_NAME has no error reply: the only safe answer is to hang up.
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_EXPORT_NAME, b"a" * length))
        assert nbd.wait_closed(s, timeout=5) == b""
    nbd.assert_serves(server.sock)


# qemu CVE-2017-7539/10664, nbd-server CVE-2013-7441: EOF or a vanished peer at any point.


def _recorded_session() -> tuple[bytes, list[int]]:
    """A valid client byte stream and the offsets to cut it at."""
    handshake = (
        nbd.client_flags()
        + nbd.option(nbd.OPT_STRUCTURED_REPLY)
        + nbd.option(nbd.OPT_INFO, nbd.go_data(b"", (3,)))
        + nbd.option(nbd.OPT_GO, nbd.go_data(b"", (0, 3)))
    )
    payload = b"\xa5" * 512
    write = nbd.request(nbd.CMD_WRITE, 1, 4096, len(payload)) + payload
    rest = (
        nbd.request(nbd.CMD_READ, 2, 0, 8192)
        + nbd.request(nbd.CMD_FLUSH, 3, 0, 0)
        + nbd.request(nbd.CMD_DISC, 4, 0, 0)
    )
    stream = handshake + write + rest
    # Every byte of the handshake and of every request header; a few payload offsets.
    cuts = list(range(len(handshake) + 28 + 1))
    cuts += [len(handshake) + 28 + k for k in (1, 255, 511)]
    cuts += list(range(len(handshake) + len(write), len(stream) + 1))
    return stream, cuts


def test_eof_at_every_byte_of_a_session(server: Server) -> None:
    stream, cuts = _recorded_session()
    nbd.assert_serves(server.sock)
    fds_before = server.open_fds()
    for cut in cuts:
        with nbd.connect(server.sock) as s:
            nbd.greeting(s)
            s.sendall(stream[:cut])
            s.shutdown(socket.SHUT_WR)
            # The server answers what it can, then notices EOF and closes its end.
            nbd.wait_closed(s, timeout=5)
    assert server.alive()
    nbd.assert_serves(server.sock)
    # Nothing leaked per connection (a little slack for lazily opened files).
    assert server.open_fds() <= fds_before + 4
    assert "Traceback" not in server.log.read_text(errors="replace")
    print(f"EOF-at-every-byte: {len(cuts)} truncated sessions")


def test_eof_before_greeting_is_read(server: Server) -> None:
    for _ in range(20):
        s = nbd.connect(server.sock)
        s.close()
    nbd.assert_serves(server.sock)


def test_client_vanishes_with_replies_pending(server: Server) -> None:
    # qemu CVE-2017-10664: a write to a closed socket raised SIGPIPE and killed the server.
    for i in range(10):
        s = nbd.connect(server.sock)
        nbd.handshake(s, structured=bool(i % 2))
        s.sendall(b"".join(nbd.request(nbd.CMD_READ, k, 0, 8 * MiB) for k in range(4)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST while the server is writing 32 MiB at us
    for _ in range(10):
        s = nbd.connect(server.sock)
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_LIST))
        s.close()  # gone before the LIST reply
    nbd.assert_serves(server.sock)


# Requests over the 32 MiB that clients and servers agree on (qemu's NBD_MAX_BUFFER_SIZE).


@pytest.mark.parametrize("structured", [False, True])
def test_read_over_32mib_is_an_error_and_the_connection_stays(
    server: Server, structured: bool
) -> None:
    with nbd.connect(server.sock) as s:
        nbd.handshake(s, structured=structured)
        for cookie, length in ((7, 32 * MiB + 1), (8, 64 * MiB)):
            s.sendall(nbd.request(nbd.CMD_READ, cookie, 0, length))
            r = nbd.read_reply_of(s)  # an error carries no data
            assert (r.cookie, r.error != 0) == (cookie, True)
        s.sendall(nbd.request(nbd.CMD_READ, 9, 0, 4096))
        r = nbd.read_reply_of(s, 0, 4096)
        assert (r.cookie, r.error) == (9, 0)


@pytest.mark.parametrize("length", [0xFFFFFFFF, 32 * MiB + 1])
def test_write_over_32mib_is_refused_without_buffering(server: Server, length: int) -> None:
    rss_before = server.rss_kib()
    with nbd.connect(server.sock) as s:
        nbd.handshake(s)
        s.sendall(nbd.request(nbd.CMD_WRITE, 5, 0, length) + b"\0" * 65536)
        # The payload cannot be trusted to follow, so the stream cannot be resynchronised:
        # the server may send an error reply, but it must hang up rather than wait.
        got = nbd.wait_closed(s, timeout=5)
    if len(got) >= 16:
        magic, error, cookie = struct.unpack(">IIQ", got[:16])
        assert (magic, cookie) == (nbd.SIMPLE_REPLY_MAGIC, 5)
        assert error != 0
    assert server.rss_kib() < rss_before + 16 * 1024
    nbd.assert_serves(server.sock)


# nbdkit CVE-2021-3716's cousin: negotiated state must be exact, even when repeated.


def test_second_structured_reply_option(server: Server) -> None:
    with nbd.connect(server.sock) as s:
        nbd.greeting(s)
        s.sendall(nbd.client_flags() + nbd.option(nbd.OPT_STRUCTURED_REPLY))
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ACK
        s.sendall(nbd.option(nbd.OPT_STRUCTURED_REPLY))
        assert nbd.read_final_reply(s)[1].type in (nbd.REP_ACK, nbd.REP_ERR_INVALID)
        s.sendall(nbd.option(nbd.OPT_STRUCTURED_REPLY, b"x"))  # data is never allowed
        assert nbd.read_final_reply(s)[1].type == nbd.REP_ERR_INVALID
        _, tflags = nbd.negotiate(s)
        assert tflags & nbd.FLAG_SEND_DF
        s.sendall(nbd.request(nbd.CMD_READ, 1, 0, 4096))
        assert nbd.read_reply_of(s, 0, 4096).structured


# qemu CVE-2024-7409: shutdown while clients hold connections open.


# nbdserve only: --shutdown-grace is ours, and qemu-nbd 7.2 hangs here (the CVE's pattern).
@pytest.mark.usefixtures("nbdserve_only")
def test_sigterm_with_clients_connected_exits_cleanly(serve: Servers, image: Path) -> None:
    # A stalled reader holds its requests until the grace period ends: keep it short.
    server = serve("-f", "raw", "--shutdown-grace", "1", str(image))
    idle = nbd.connect(server.sock)
    nbd.handshake(idle)
    half = nbd.connect(server.sock)
    nbd.greeting(half)
    silent = nbd.connect(server.sock)  # never reads the greeting
    stalled = nbd.connect(server.sock)  # asks for 32 MiB and never reads it
    nbd.handshake(stalled)
    stalled.sendall(b"".join(nbd.request(nbd.CMD_READ, k, 0, 8 * MiB) for k in range(4)))
    writer = nbd.connect(server.sock)
    nbd.handshake(writer)
    writer.sendall(nbd.request(nbd.CMD_WRITE, 1, 0, 4) + b"done")
    assert nbd.read_reply_of(writer).error == 0
    time.sleep(0.2)  # let the stalled client's replies fill the socket buffer
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - started < 8  # the 1 s grace, not the default 10 s
    for s in (idle, half, silent, writer):
        nbd.wait_closed(s, timeout=5)
        s.close()
    stalled.close()
    assert image.read_bytes()[:4] == b"done"


# Many idle, half-open and trickling connections (a handshake time limit).


def _trickle(socks: list[socket.socket], data: bytes, stop: threading.Event) -> list[int]:
    """Send ``data`` one byte per 50 ms on each socket; returns how far each one got."""
    sent = [0] * len(socks)
    alive = set(range(len(socks)))
    while alive and not stop.is_set():
        for i in list(alive):
            if sent[i] == len(data):
                alive.discard(i)
                continue
            try:
                socks[i].send(data[sent[i] : sent[i] + 1])
                sent[i] += 1
            except OSError:
                alive.discard(i)
        stop.wait(0.05)
    return sent


@pytest.mark.usefixtures("nbdserve_only")
def test_idle_and_slow_handshakes_are_dropped(serve: Servers, image: Path) -> None:
    server = serve("--handshake-timeout", "1", "-f", "raw", str(image))
    fds_before = server.open_fds()
    silent = [nbd.connect(server.sock) for _ in range(40)]
    half = []
    for _ in range(10):
        s = nbd.connect(server.sock)
        nbd.greeting(s)
        s.sendall(nbd.client_flags())
        half.append(s)
    slow = [nbd.connect(server.sock) for _ in range(10)]
    for s in slow:
        nbd.greeting(s)
    # 49 bytes at 20 bytes/s: a complete handshake would take 2.5 s, over the 1 s limit.
    stream = nbd.client_flags() + nbd.option(nbd.OPT_GO, nbd.go_data(b"", (0,) * 2))
    stop = threading.Event()
    result: list[list[int]] = []
    t = threading.Thread(target=lambda: result.append(_trickle(slow, stream, stop)))
    t.start()
    try:
        # While all of them hold connections, a good client is served.
        nbd.assert_serves(server.sock)
        for s in silent + half:
            nbd.wait_closed(s, timeout=10)
    finally:
        stop.set()
        t.join()
    assert all(n < len(stream) for n in result[0]), result  # none finished its handshake
    for s in slow:
        nbd.wait_closed(s, timeout=10)
    for s in silent + half + slow:
        s.close()
    deadline = time.monotonic() + 10
    while server.open_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.open_fds() <= fds_before + 2
    nbd.assert_serves(server.sock)


@pytest.mark.usefixtures("nbdserve_only")
def test_connection_limit_frees_slots_of_idle_clients(serve: Servers, image: Path) -> None:
    server = serve("--handshake-timeout", "1", "-f", "raw", str(image), shared=2)
    squatters = [nbd.connect(server.sock) for _ in range(4)]
    # The good client waits for a slot (or is turned away and retries), and gets served
    # once the handshake limit has evicted the squatters.
    deadline = time.monotonic() + 15
    while True:
        try:
            nbd.assert_serves(server.sock)
            break
        except (nbd.Closed, ConnectionResetError, TimeoutError, AssertionError):
            if time.monotonic() > deadline:
                raise
    for s in squatters:
        nbd.wait_closed(s, timeout=10)
        s.close()
    # SIGINT, like SIGTERM, is a clean stop.
    assert server.stop(signal.SIGINT) == 0


# Limits on what a client can make the server buffer.


def test_memory_for_pipelined_payloads_is_bounded(server: Server) -> None:
    # Four clients each pipeline three maximal (32 MiB) writes without waiting: 384 MiB offered
    # at once. The server must apply back-pressure (stop reading) rather than buffer it all.
    conns, writes, size = 4, 3, 32 * MiB
    payload = b"\xab" * size
    peak = [server.rss_kib()]
    start_rss = peak[0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], server.rss_kib())
            stop.wait(0.02)

    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with nbd.connect(server.sock, timeout=60) as s:
                nbd.handshake(s)
                for i in range(writes):
                    off = (k * writes + i) % 2 * size
                    s.sendall(nbd.request(nbd.CMD_WRITE, i, off, size) + payload)
                for _ in range(writes):
                    assert nbd.read_reply_of(s).error == 0
        except BaseException as e:
            errors.append(e)

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(conns)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(120)
    stop.set()
    sampler.join()
    assert not errors, errors
    grown = (peak[0] - start_rss) // 1024
    print(f"\npipelined {conns * writes * size >> 20} MiB: server RSS grew by {grown} MiB")
    assert grown < 256, f"server RSS grew by {grown} MiB while clients pipelined writes"
