"""The threaded data path (nbdserve/datapath.py): the graph lock, batching, back-pressure and
ending a connection whose thread is blocked."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
import trio

from nbdserve import connection as connection_module
from nbdserve.block.io import Unlocker
from nbdserve.commands import HANDLERS, CommandContext
from nbdserve.config import ExportSpec
from nbdserve.datapath import PASS_MAX_REQUESTS, SEND_BATCH_BYTES, ThreadedLoop, graph_lock
from nbdserve.transport import IOV_MAX
from nbdserve.types import Buffer, FileRange
from protocol import Cmd, CmdFlag, Request

from .harness import MiB, Running, start_server
from .nbdclient import NBDClient

GARBAGE = b"\xde\xad\xbe\xef" * 7  # not a request magic: a protocol error

#: A memory disk whose writes take 100 ms, exported writable.
SLOW_WRITES = dict(
    blockdevs=[{"driver": "memory", "node-name": "m0", "size": 4 * MiB},
               {"driver": "blkdebug", "node-name": "dbg", "image": "m0",
                "inject-delay": [{"iotype": "write", "ms": 100}]}],
    exports=[ExportSpec(name="", node_name="dbg", writable=True)],
)


@pytest.fixture(params=["thread", "trio"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both transmission loops: the socket thread and the trio loop (which
    TLS and pipes use), by hiding the socket transport from the connection."""
    if request.param == "trio":
        monkeypatch.setattr(connection_module, "SocketTransport", type("NoSocket", (), {}))
    return str(request.param)


@pytest.fixture
def end_reasons(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reasons: list[str] = []
    summary = connection_module.Connection._log_summary

    def record(self: connection_module.Connection) -> None:
        reasons.append(self.end_reason)
        summary(self)

    monkeypatch.setattr(connection_module.Connection, "_log_summary", record)
    return reasons


async def replies_until_closed(client: NBDClient) -> list[int]:
    """Cookies of every reply the client gets before the server closes the connection."""
    got: list[int] = []
    with trio.fail_after(5):
        try:
            while True:
                await client._pump()
                got.extend(client.replies)
                client.replies.clear()
        except (ConnectionError, trio.BrokenResourceError):
            pass
    return got


async def test_graph_lock_is_free_only_while_trio_waits() -> None:
    lock = graph_lock().lock

    def take_and_release(timeout: float) -> bool:
        got = lock.acquire(timeout=timeout)
        if got:
            lock.release()
        return got

    # While this task waits for the worker thread, trio sits in its I/O wait: lock free.
    assert await trio.to_thread.run_sync(take_and_release, 5.0)

    # While a task runs (here: blocks the trio thread on purpose), no other thread gets it.
    result: list[bool] = []
    started = threading.Event()

    def contender() -> None:
        started.set()
        result.append(take_and_release(0.2))

    thread = threading.Thread(target=contender)
    thread.start()
    started.wait()
    time.sleep(0.4)
    thread.join()
    assert result == [False]


async def test_unix_connections_run_on_their_own_thread(nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect()
    await client.write(0, b"abc")
    (conn,) = srv.server.connections
    assert conn._threaded is not None
    assert await client.read(0, 3) == b"abc"


async def test_more_replies_than_one_batch_from_one_receive(nursery: trio.Nursery,
                                                            tmp_path: Path) -> None:
    # 64 MiB of reads arrive in one go: the thread must send them in several batches and go
    # on with the requests still buffered instead of waiting for more bytes from the client.
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect()
    for i in range(16):
        await client.write(i * MiB, bytes([i + 1]) * MiB)
    count = 64
    assert count * MiB > 4 * SEND_BATCH_BYTES
    with trio.fail_after(20):
        cookies = [await client.send(Cmd.READ, (i % 16) * MiB, MiB) for i in range(count)]
        for i, cookie in enumerate(cookies):
            reply = await client.wait(cookie)
            assert reply.error == 0
            assert reply.data() == bytes([i % 16 + 1]) * MiB


async def test_slow_requests_respect_max_in_flight(nursery: trio.Nursery,
                                                   tmp_path: Path) -> None:
    # FUA writes always go to trio tasks; with a delay they pile up against the limit while
    # plain reads in between are answered by the thread.
    srv = await start_server(
        nursery, tmp_path, max_in_flight=2,
        blockdevs=[{"driver": "memory", "node-name": "m0", "size": 4 * MiB},
                   {"driver": "blkdebug", "node-name": "dbg", "image": "m0",
                    "inject-delay": [{"iotype": "write", "ms": 5}]}],
        exports=[ExportSpec(name="", node_name="dbg", writable=True)],
    )
    client = await srv.connect()
    (conn,) = srv.server.connections
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, conn.in_flight_bytes)
            await trio.sleep(0)

    with trio.fail_after(20):
        async with trio.open_nursery() as inner:
            inner.start_soon(watch)
            cookies = {}
            for i in range(24):
                data = bytes([i]) * 65536
                cookies[await client.send(Cmd.WRITE, i * 65536, flags=CmdFlag.FUA,
                                          data=data)] = None
                cookies[await client.send(Cmd.READ, 3 * MiB, 4096)] = None
            for cookie in cookies:
                assert (await client.wait(cookie)).error == 0
            inner.cancel_scope.cancel()
        for i in range(24):
            assert await client.read(i * 65536, 65536) == bytes([i]) * 65536
    assert 65536 <= peak <= 2 * 65536


async def test_shutdown_ends_a_thread_blocked_sending(nursery: trio.Nursery,
                                                      tmp_path: Path) -> None:
    # The client asks for far more than the socket buffers hold and never reads: the thread
    # blocks in sendmsg. Once the grace period is over the connection must still end.
    srv = await start_server(nursery, tmp_path, shutdown_grace=0.3)
    client = await srv.connect(structured=False)  # no sparse replies: every byte is sent
    for _ in range(64):
        await client.send(Cmd.READ, 0, MiB)
    await trio.sleep(0.2)
    srv.server.shutdown()
    with trio.fail_after(10):
        await srv.server.closed.wait()
    await client.close()


async def test_reply_ready_when_a_protocol_error_arrives_is_sent(
        nursery: trio.Nursery, tmp_path: Path, loop: str, end_reasons: list[str]) -> None:
    # A (slow) holds the whole payload budget, B waits for it, then garbage: A was done and
    # its reply must reach the client before the connection is dropped.
    srv = await start_server(nursery, tmp_path, max_in_flight_bytes=65536, **SLOW_WRITES)
    client = await srv.connect()
    a = await client.send(Cmd.WRITE, 0, flags=CmdFlag.FUA, data=b"a" * 65536)
    await client.send(Cmd.WRITE, 65536, flags=CmdFlag.FUA, data=b"b" * 65536)
    await client.stream.send_all(GARBAGE)
    assert a in await replies_until_closed(client)
    with trio.fail_after(5):
        while not end_reasons:
            await trio.sleep(0.01)
    assert end_reasons == ["protocol error"]


async def test_request_finishing_after_the_connection_failed(
        nursery: trio.Nursery, tmp_path: Path, loop: str, end_reasons: list[str]) -> None:
    # max_in_flight=1: A is slow, CACHE waits for the slot, garbage ends the connection. The
    # CACHE task may then run to its end with nobody left to send its reply; that must not
    # turn into an error (it once wrote to a closed eventfd).
    for i in range(8):
        directory = tmp_path / str(i)
        directory.mkdir()
        async with trio.open_nursery() as inner:
            srv = await start_server(inner, directory, max_in_flight=1, **SLOW_WRITES)
            client = await srv.connect()
            await client.send(Cmd.WRITE, 0, flags=CmdFlag.FUA, data=b"a" * 4096)
            await client.send(Cmd.CACHE, 0, 4096)
            await client.stream.send_all(GARBAGE)
            await replies_until_closed(client)
            with trio.fail_after(5):
                while len(end_reasons) <= i:
                    await trio.sleep(0.01)
            srv.server.shutdown()
    assert end_reasons == ["protocol error"] * 8


async def test_request_tasks_log_with_the_connection_fields(
        nursery: trio.Nursery, tmp_path: Path, loop: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []

    async def flush(ctx: CommandContext, request: Request) -> Sequence[Buffer]:
        seen.append(structlog.contextvars.get_contextvars())
        return [ctx.tx.reply(request)]

    monkeypatch.setitem(HANDLERS, Cmd.FLUSH, flush)  # FLUSH always runs as a trio task
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect()
    reply = await client.request(Cmd.FLUSH)
    assert reply.error == 0
    (conn,) = srv.server.connections
    assert seen and seen[0].get("conn") == conn.id
    assert str(seen[0].get("peer", "")).startswith("unix:")


async def test_a_pass_serves_a_bounded_number_of_requests(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A pass holds the graph lock: a flood of tiny pipelined requests must be served in
    # bounded passes, each ending with a send (and the lock let go), not in one long pass.
    batches: list[int] = []
    send = ThreadedLoop._send

    def recording_send(self: ThreadedLoop, buffers: list[Buffer]) -> None:
        batches.append(len(buffers))
        send(self, buffers)

    monkeypatch.setattr(ThreadedLoop, "_send", recording_send)
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect(structured=False)  # each reply: header + data, 2 buffers
    await client.write(0, b"z")
    batches.clear()
    count = 2000
    requests = b"".join(
        bytes(b) for i in range(count)
        for b in client.tx.send(Request(i + 1000, Cmd.READ, CmdFlag(0), 0, 1)))
    for i in range(count):
        client._requests[i + 1000] = Request(i + 1000, Cmd.READ, CmdFlag(0), 0, 1)
    with trio.fail_after(20):
        await client.stream.send_all(requests)  # all in one go: most arrive in one receive
        for i in range(count):
            assert (await client.wait(i + 1000)).data() == b"z"
    assert sum(batches) == 2 * count
    assert max(batches) <= 2 * PASS_MAX_REQUESTS


class ShortSock:
    """sendmsg takes at most ``cap`` bytes per call, as when a signal cuts it short."""

    def __init__(self, cap: int) -> None:
        self.cap, self.calls, self.got = cap, 0, bytearray()

    def sendmsg(self, buffers: list[Buffer], ancdata: object = (), flags: int = 0) -> int:
        assert len(buffers) <= IOV_MAX
        self.calls += 1
        data = b"".join(bytes(b) for b in buffers)[: self.cap]
        self.got += data
        return len(data)


def test_send_finishes_what_a_short_sendmsg_left() -> None:
    sock = ShortSock(cap=5)
    ThreadedLoop._send(SimpleNamespace(sock=sock),  # type: ignore[arg-type]
                       [b"abc", memoryview(b"defgh"), b"ij", b"klmnopq"])
    assert sock.got == b"abcdefghijklmnopq" and sock.calls == 4
    many = ShortSock(cap=1 << 20)  # more buffers than one sendmsg takes
    ThreadedLoop._send(SimpleNamespace(sock=many),  # type: ignore[arg-type]
                       [bytes([i % 256]) for i in range(IOV_MAX + 10)])
    assert many.got == bytes(i % 256 for i in range(IOV_MAX + 10)) and many.calls == 2


@pytest.fixture
def shm_image() -> Iterator[Path]:
    """8 MiB on a memory filesystem: distinct bytes in [0, 6 MiB), a hole after."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        path = Path(tmp) / "disk.img"
        with open(path, "wb") as f:
            f.write(bytes(range(256)) * (6 * MiB // 256 - 1) + b"\x5a" * 256)
            f.truncate(8 * MiB)
        yield path


def count_sendfile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte counts asked of os.sendfile from now on."""
    sent: list[int] = []
    sendfile = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent.append(count)
        return sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(os, "sendfile", counting)
    return sent


async def serve_shm(nursery: trio.Nursery, tmp_path: Path, image: Path) -> Running:
    return await start_server(
        nursery, tmp_path,
        blockdevs=[{"driver": "file", "node-name": "f", "filename": str(image)}],
        exports=[ExportSpec(name="", node_name="f", writable=True)])


@pytest.mark.parametrize("mode", ["simple", "structured", "extended"])
async def test_large_reads_of_a_file_in_memory_go_out_with_sendfile(
        nursery: trio.Nursery, tmp_path: Path, shm_image: Path,
        monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    sent = count_sendfile(monkeypatch)
    srv = await serve_shm(nursery, tmp_path, shm_image)
    structured = mode != "simple"
    client = await srv.connect(structured=structured, extended=mode == "extended")
    image = shm_image.read_bytes()
    # Pipelined, so that small replies and spliced ones share a batch and keep their order.
    reads = [(0, 4096), (MiB, MiB), (4096, 65536), (3 * MiB, 256 << 10), (5 * MiB, 512),
             (6 * MiB - 65536, 65536)]
    with trio.fail_after(10):
        cookies = [await client.send(Cmd.READ, offset, length) for offset, length in reads]
        write = await client.send(Cmd.WRITE, 7 * MiB, data=b"\x77" * 4096)
        for (offset, length), cookie in zip(reads, cookies, strict=True):
            reply = await client.wait(cookie)
            assert reply.error == 0 and reply.data() == image[offset:offset + length]
            assert not reply.holes
        assert (await client.wait(write)).error == 0
    assert sorted(sent) == [65536, 65536, 256 << 10, MiB]  # the reads of 64 KiB or more
    assert shm_image.read_bytes()[7 * MiB:7 * MiB + 4096] == b"\x77" * 4096
    # A read that starts in the hole is not spliced: structured, it comes as a hole.
    hole = await client.request(Cmd.READ, 6 * MiB + 65536, 512 << 10)
    assert hole.data() == bytes(512 << 10) and len(sent) == 4
    assert hole.holes == ([(6 * MiB + 65536, 512 << 10)] if structured else [])


async def test_a_spliced_read_is_answered_before_a_protocol_error_ends_the_connection(
        nursery: trio.Nursery, tmp_path: Path, shm_image: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent = count_sendfile(monkeypatch)
    srv = await serve_shm(nursery, tmp_path, shm_image)
    client = await srv.connect()
    with trio.fail_after(10):
        cookie = await client.send(Cmd.READ, MiB, MiB)
        await client.stream.send_all(b"\xde\xad" * 14)  # not a request: bad magic
        reply = await client.wait(cookie)
        assert reply.data() == shm_image.read_bytes()[MiB:2 * MiB]
        assert await client.eof()
    assert sent == [MiB]


def test_a_file_that_shrank_is_sent_as_zeros_past_its_end(tmp_path: Path) -> None:
    # The header promised the bytes before sendfile found the file shorter: the rest goes
    # out as zeros, and the stream stays in step.
    path = tmp_path / "short"
    path.write_bytes(b"\x11" * 1000)
    a, b = socket.socketpair()
    fd = os.open(path, os.O_RDONLY)
    try:
        loop = SimpleNamespace(sock=a)
        loop._send = lambda items, flags=0: ThreadedLoop._send(loop, items, flags)  # type: ignore[attr-defined]
        ThreadedLoop._send_files(loop, [b"head", FileRange(fd, 500, 4000), b"tail"])  # type: ignore[arg-type]
        a.close()
        got = b"".join(iter(lambda: b.recv(65536), b""))
        assert got == b"head" + b"\x11" * 500 + bytes(3500) + b"tail"
    finally:
        os.close(fd)
        b.close()


class Gate:
    """Wraps the Unlocker a connection thread lends the file driver: each unlocked copy
    waits at a gate (3 s at most) once the lock is let go."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
        from nbdserve.block.drivers.file import FileDriver

        self.gate, self.started = threading.Event(), threading.Event()
        self.opened: list[bool] = []  # per copy: let through by the gate, not by its timeout
        real = getattr(FileDriver, method)
        gate = self

        class Gated:
            def __init__(self, unlock: Unlocker) -> None:
                self.unlock = unlock

            def __enter__(self) -> None:
                self.unlock.__enter__()
                gate.started.set()
                gate.opened.append(gate.gate.wait(3))

            def __exit__(self, *exc_info: object) -> None:
                self.unlock.__exit__(*exc_info)

            def run_soon(self, fn: Callable[[], object]) -> None:
                self.unlock.run_soon(fn)

        def gated(driver: FileDriver, offset: int, what: Any, unlock: Unlocker) -> Any:
            return real(driver, offset, what, Gated(unlock))

        monkeypatch.setattr(FileDriver, method, gated)

    async def wait_started(self) -> None:
        while not self.started.is_set():
            await trio.sleep(0.005)


async def _raw_over_file(nursery: trio.Nursery, tmp_path: Path) -> Running:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(4 * MiB))
    return await start_server(
        nursery, tmp_path,
        blockdevs=[{"driver": "file", "node-name": "f", "filename": str(img)},
                   {"driver": "raw", "node-name": "r", "file": "f"}],
        exports=[ExportSpec(name="", node_name="r", writable=True)],
    )


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.READ])
async def test_a_large_copy_runs_without_the_graph_lock(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cmd: Cmd
) -> None:
    # Connection A's 256 KiB request is held inside its copy into or out of the file until
    # connection B has written and read back; had A's thread kept the graph lock, trio (and
    # B) would stall until the gate timed out.
    held = Gate(monkeypatch, "write_unlocked" if cmd is Cmd.WRITE else "read_unlocked")
    srv = await _raw_over_file(nursery, tmp_path)
    a, b = await srv.connect(), await srv.connect()
    big = bytes(range(256)) * 1024
    if cmd is Cmd.WRITE:
        cookie = await a.send(Cmd.WRITE, MiB, data=big)
    else:
        await a.write(MiB, big)  # not gated: only reads are
        cookie = await a.send(Cmd.READ, MiB, len(big))
    with trio.fail_after(10):
        await held.wait_started()
        await b.write(0, b"\x22" * 4096)
        assert await b.read(0, 4096) == b"\x22" * 4096
        held.gate.set()
        reply = await a.wait(cookie)
        assert reply.error == 0
    assert held.opened == [True]
    if cmd is Cmd.READ:
        assert reply.data() == big
    assert await b.read(MiB, len(big)) == big


async def test_a_serialising_request_waits_for_an_unlocked_write(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a read-modify-write on the file node would: it must not start while the copy runs,
    # and it is woken on the trio thread once the copy is done.
    held = Gate(monkeypatch, "write_unlocked")
    srv = await _raw_over_file(nursery, tmp_path)
    client = await srv.connect()
    cookie = await client.send(Cmd.WRITE, MiB, data=b"\x33" * (256 << 10))
    tracker = srv.graph.node("f")._tracker
    woken: list[int] = []

    async def serialising() -> None:
        req = await tracker.begin(MiB, MiB + 1, True)
        woken.append(threading.get_ident())
        tracker.end(req)

    with trio.fail_after(10):
        await held.wait_started()
        nursery.start_soon(serialising)
        await trio.sleep(0.05)
        assert woken == []
        held.gate.set()
        assert (await client.wait(cookie)).error == 0
        while not woken:
            await trio.sleep(0.005)
    assert woken == [threading.get_ident()]


async def test_an_error_in_an_unlocked_copy_is_answered(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbdserve.block.drivers import file

    def half_then_full(fd: int, data: Buffer, offset: int) -> int:
        if len(data) < (64 << 10):
            return os.pwrite(fd, data, offset)
        os.pwrite(fd, memoryview(data)[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file, "_pwrite", half_then_full)
    srv = await _raw_over_file(nursery, tmp_path)
    client = await srv.connect()
    with trio.fail_after(10):
        reply = await client.request(Cmd.WRITE, MiB, data=b"\x11" * (256 << 10))
        assert reply.error == errno.ENOSPC
        await client.write(0, b"\x22" * 4096)  # the connection and the lock carry on
        assert await client.read(0, 4096) == b"\x22" * 4096
    for name in "rf":
        assert not srv.graph.node(name)._tracker.requests
    assert srv.graph.node("f").stats.errors == {"ENOSPC": 1}


async def test_a_run_of_large_writes_is_received_into_its_own_buffers(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After one large WRITE the thread receives only the next header, so the following
    # payloads land in their pooled buffers instead of being copied through the protocol's.
    from protocol import ServerTransmission

    fed: list[int] = []
    feed = ServerTransmission.receive_data

    def counting(self: ServerTransmission, data: Buffer) -> None:
        fed.append(len(data))
        feed(self, data)

    monkeypatch.setattr(ServerTransmission, "receive_data", counting)
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect()
    fed.clear()  # the handshake's
    blocks = [bytes([i]) * (256 << 10) for i in range(1, 9)]
    with trio.fail_after(10):
        cookies = [await client.send(Cmd.WRITE, i * MiB, data=b) for i, b in enumerate(blocks)]
        for cookie in cookies:
            assert (await client.wait(cookie)).error == 0
        for i, b in enumerate(blocks):
            assert await client.read(i * MiB, len(b)) == b
    # The first receive may take up to 128 KiB of the first payload; then headers only.
    assert sum(fed) < (128 << 10) + 16 * 28, fed
