"""The threaded data path (nbdserve/datapath.py): the graph lock, batching, back-pressure and
ending a connection whose thread is blocked."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio

from nbdserve.config import ExportSpec
from nbdserve.datapath import SEND_BATCH_BYTES, graph_lock
from protocol import Cmd, CmdFlag

from .harness import MiB, start_server


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
