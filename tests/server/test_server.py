"""The server in-process: handshake variants, every command and flag mapping, errors,
concurrency, misbehaving clients and shutdown."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from nbdserve.block import ReqFlags
from nbdserve.block.zeros import is_zero
from nbdserve.commands import HANDLERS
from nbdserve.config import ExportSpec
from protocol import (
    Cmd,
    CmdFlag,
    Errno,
    ReadData,
    ReadHole,
    Request,
    StateFlag,
    TransmissionFlag,
)

from .harness import MiB, start_server
from .nbdclient import HandshakeRefused, NBDClient

HOLE_ZERO = int(StateFlag.HOLE | StateFlag.ZERO)


def blkdebug(*rules: dict[str, object], delay: list[dict[str, object]] | None = None,
             size: int = 4 * MiB) -> list[dict[str, object]]:
    return [{"driver": "memory", "node-name": "m0", "size": size},
            {"driver": "blkdebug", "node-name": "dbg", "image": "m0",
             "inject-error": list(rules), "inject-delay": delay or []}]


DBG_EXPORT = [ExportSpec(name="", node_name="dbg", writable=True)]


@pytest.mark.parametrize("mode", ["simple", "structured", "extended", "export_name"])
async def test_write_read_round_trip_in_every_mode(nursery: trio.Nursery, tmp_path: Path,
                                                   mode: str) -> None:
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect(structured=mode != "simple", extended=mode == "extended",
                               export_name=mode == "export_name")
    assert client.session.structured == (mode != "simple")
    assert client.session.extended == (mode == "extended")
    await client.write(12345, b"hello, world" * 1000)
    assert await client.read(12345, 12000) == b"hello, world" * 1000
    assert await client.read(0, 4096) == bytes(4096)
    await client.disconnect()
    assert await client.eof()


async def test_export_flags_follow_the_node(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(
        nursery, tmp_path,
        blockdevs=[{"driver": "memory", "node-name": "m0", "size": MiB, "discard": "unmap"},
                   {"driver": "memory", "node-name": "m1", "size": MiB}],
        exports=[ExportSpec(name="rw", node_name="m0", writable=True, description="RAM"),
                 ExportSpec(name="ro", node_name="m1")],
        max_connections=1)
    rw = (await srv.connect(export="rw")).session.flags
    assert rw & TransmissionFlag.SEND_TRIM and rw & TransmissionFlag.SEND_WRITE_ZEROES
    assert rw & TransmissionFlag.SEND_FAST_ZERO and rw & TransmissionFlag.SEND_FLUSH
    assert not rw & TransmissionFlag.READ_ONLY
    # One connection at a time: multi-conn would be a false promise.
    assert not rw & TransmissionFlag.CAN_MULTI_CONN
    info = srv.exports[0].info
    assert (info.description, info.size, info.block_size) == ("RAM", MiB, (1, 4096, 32 * MiB))
    ro = srv.exports[1].info.flags
    assert ro & TransmissionFlag.READ_ONLY and not ro & TransmissionFlag.SEND_TRIM
    assert not ro & TransmissionFlag.SEND_WRITE_ZEROES


async def test_multi_conn_only_when_allowed(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path, max_connections=0)
    assert srv.exports[0].info.flags & TransmissionFlag.CAN_MULTI_CONN
    # Like qemu-nbd, TRIM and CACHE are offered even where they do nothing (discard=ignore).
    assert srv.exports[0].info.flags & TransmissionFlag.SEND_TRIM
    assert srv.exports[0].info.flags & TransmissionFlag.SEND_CACHE


async def test_unknown_export_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             exports=[ExportSpec(name="a", node_name="m0", writable=True),
                                      ExportSpec(name="b", node_name="m0")])
    with pytest.raises(HandshakeRefused):
        await srv.connect(export="nope")
    # With several exports "" is not a default.
    with pytest.raises(HandshakeRefused):
        await srv.connect(export="")
    client = await srv.connect(export="b")
    assert client.session.flags & TransmissionFlag.READ_ONLY


async def test_only_export_answers_to_empty_name(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             exports=[ExportSpec(name="disk", node_name="m0", writable=True)])
    client = await srv.connect(export="")
    assert client.session.export.size == 16 * MiB
    await client.write(0, b"default")
    assert await client.read(0, 7) == b"default"


async def test_sparse_structured_reads_send_holes(nursery: trio.Nursery,
                                                  tmp_path: Path) -> None:
    # A read rule (with no delay, far away) makes every read wait: the block-status path.
    srv = await start_server(
        nursery, tmp_path, exports=DBG_EXPORT,
        blockdevs=blkdebug(delay=[{"iotype": "read", "offset": 15 * MiB, "ms": 0}],
                           size=16 * MiB))
    client = await srv.connect()
    await client.write(MiB + 4096, b"\xab" * 8192)
    reply = await client.request(Cmd.READ, MiB, 256 * 1024)
    assert reply.error == 0
    expected = bytearray(256 * 1024)
    expected[4096:4096 + 8192] = b"\xab" * 8192
    assert reply.data() == expected
    assert reply.holes, "zero ranges found by block status go out as OFFSET_HOLE"
    # The memory driver allocates 64 KiB pages: the rest of the range is holes.
    assert sum(n for _, n in reply.holes) == 256 * 1024 - 65536
    # DF: one data chunk, no holes.
    reply = await client.request(Cmd.READ, MiB, 256 * 1024, CmdFlag.DF)
    assert [type(c) for c in reply.chunks] == [ReadData] and reply.data() == expected
    # Small reads never pay for block status: one data chunk.
    reply = await client.request(Cmd.READ, 0, 4096)
    assert [type(c) for c in reply.chunks] == [ReadData]


async def test_all_zero_read_is_one_hole(nursery: trio.Nursery, tmp_path: Path) -> None:
    # Served at once from memory: the data itself is checked for zeros.
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect()
    reply = await client.request(Cmd.READ, 0, MiB)
    assert [type(c) for c in reply.chunks] == [ReadHole]
    assert reply.holes == [(0, MiB)]
    await client.write(MiB - 1, b"\1")
    reply = await client.request(Cmd.READ, 0, MiB)
    assert [type(c) for c in reply.chunks] == [ReadData]
    assert reply.data() == bytes(MiB - 1) + b"\1"
    # Simple replies and DF reads always carry the data.
    reply = await client.request(Cmd.READ, 2 * MiB, MiB, CmdFlag.DF)
    assert [type(c) for c in reply.chunks] == [ReadData]
    simple = await srv.connect(structured=False)
    assert await simple.read(2 * MiB, MiB) == bytes(MiB)


def test_is_zero() -> None:
    assert is_zero(b"") and is_zero(bytes(5 << 20)) and is_zero(memoryview(bytearray(100)))
    for size, where in [(100, 99), (5 << 20, 0), (5 << 20, (5 << 20) - 1), (3 << 20, 1 << 20)]:
        data = bytearray(size)
        data[where] = 1
        assert not is_zero(data) and not is_zero(memoryview(data))


async def test_write_zeroes_trim_flush_cache_fua(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(
        nursery, tmp_path,
        blockdevs=[{"driver": "memory", "node-name": "m0", "size": 4 * MiB, "discard": "unmap"}])
    client = await srv.connect(contexts=["base:allocation"])
    await client.write(0, b"\x11" * (2 * MiB), CmdFlag.FUA)
    for cmd, offset, length, flags in [
        (Cmd.WRITE_ZEROES, 0, 65536, CmdFlag(0)),
        (Cmd.WRITE_ZEROES, 65536, 65536, CmdFlag.NO_HOLE | CmdFlag.FUA),
        (Cmd.WRITE_ZEROES, 131072, 65536, CmdFlag.FAST_ZERO),
        (Cmd.TRIM, MiB, 65536, CmdFlag(0)),
        (Cmd.TRIM, MiB + 65536, 65536, CmdFlag.FUA),
        (Cmd.FLUSH, 0, 0, CmdFlag(0)),
        (Cmd.CACHE, 0, MiB, CmdFlag(0)),
        (Cmd.READ, 0, 4096, CmdFlag.FUA),
    ]:
        reply = await client.request(cmd, offset, length, flags)
        assert reply.error == 0, (cmd, reply.messages)
    assert await client.read(0, 3 * 65536) == bytes(3 * 65536)
    assert await client.read(MiB, 2 * 65536) == bytes(2 * 65536)
    assert await client.read(3 * 65536, 4096) == b"\x11" * 4096
    # A zero-write allowed to punch holes became a hole (discard=unmap).
    reply = await client.request(Cmd.BLOCK_STATUS, 0, 65536)
    assert reply.extents[0][0] == (65536, HOLE_ZERO)


@pytest.mark.parametrize(("nbd_flags", "block_flags"), [
    (CmdFlag(0), ReqFlags.MAY_UNMAP),
    (CmdFlag.NO_HOLE, ReqFlags.NONE),
    (CmdFlag.FUA | CmdFlag.NO_HOLE, ReqFlags.FUA),
    (CmdFlag.FAST_ZERO, ReqFlags.MAY_UNMAP | ReqFlags.NO_FALLBACK),
])
async def test_write_zeroes_flag_mapping(nbd_flags: CmdFlag, block_flags: ReqFlags) -> None:
    seen = []

    class Edge:
        async def zero(self, offset: int, length: int, flags: ReqFlags) -> None:
            seen.append((offset, length, flags))

    class Tx:
        def reply(self, request: Request) -> bytes:
            return b"ok"

    ctx = SimpleNamespace(child=Edge(), tx=Tx(), writethrough=False,
                          write_flags=lambda r: ReqFlags.FUA if r.flags & CmdFlag.FUA
                          else ReqFlags.NONE)
    request = Request(1, Cmd.WRITE_ZEROES, nbd_flags, 4096, 512)
    assert await HANDLERS[Cmd.WRITE_ZEROES](ctx, request) == [b"ok"]  # type: ignore[arg-type]
    assert seen == [(4096, 512, block_flags)]


async def test_block_status_base_allocation(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect(contexts=["base:allocation"])
    assert dict(client.session.contexts) == {0: "base:allocation"}
    await client.write(MiB, b"\x01" * 65536)
    reply = await client.request(Cmd.BLOCK_STATUS, 0, 4 * MiB)
    assert reply.error == 0
    extents = reply.extents[0]
    assert extents[0] == (MiB, HOLE_ZERO)
    assert extents[1] == (65536, 0)
    assert sum(n for n, _ in extents) <= 4 * MiB
    one = await client.request(Cmd.BLOCK_STATUS, 0, 4 * MiB, CmdFlag.REQ_ONE)
    assert one.extents[0] == ((MiB, HOLE_ZERO),)
    # The last extent never runs past the end of the export.
    tail = await client.request(Cmd.BLOCK_STATUS, 16 * MiB - 4096, 4096)
    assert tail.extents[0] == ((4096, HOLE_ZERO),)


async def test_block_status_extended(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect(extended=True, contexts=["base:allocation"])
    await client.write(0, b"x" * 65536)
    reply = await client.request(Cmd.BLOCK_STATUS, 0, 131072)
    assert reply.extents[0] == ((65536, 0), (65536, HOLE_ZERO))


async def test_allocation_depth(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(
        nursery, tmp_path,
        blockdevs=[{"driver": "memory", "node-name": "base", "size": MiB},
                   {"driver": "memory", "node-name": "top", "backing": "base"}],
        exports=[ExportSpec(name="", node_name="top", writable=True, allocation_depth=True)])
    base = srv.graph.attach("base", perm=__import__("nbdserve.block").block.Perm.CONSISTENT_READ
                            | __import__("nbdserve.block").block.Perm.WRITE,
                            shared=__import__("nbdserve.block").block.Perm.ALL, user="test")
    await base.write(0, b"b" * 65536)
    client = await srv.connect(contexts=["base:allocation", "qemu:allocation-depth"])
    await client.write(65536, b"t" * 65536)
    reply = await client.request(Cmd.BLOCK_STATUS, 0, 3 * 65536)
    by_name = {name: reply.extents[cid] for cid, name in client.session.contexts.items()}
    assert by_name["qemu:allocation-depth"] == ((65536, 2), (65536, 1), (65536, 0))
    assert await client.read(0, 4) == b"bbbb"


async def test_read_only_export_refuses_writes(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             exports=[ExportSpec(name="", node_name="m0", writable=False)])
    for structured in (True, False):
        client = await srv.connect(structured=structured)
        assert client.session.flags & TransmissionFlag.READ_ONLY
        for cmd, data in [(Cmd.WRITE, b"x" * 512), (Cmd.WRITE_ZEROES, None), (Cmd.TRIM, None)]:
            reply = await client.request(cmd, 0, 512, data=data)
            assert reply.error == Errno.EPERM
        assert await client.read(0, 512) == bytes(512)


@pytest.mark.parametrize(("iotype", "injected", "expected"), [
    ("read", "EIO", Errno.EIO),
    ("write", "ENOSPC", Errno.ENOSPC),
    ("write", "EDQUOT", Errno.ENOSPC),
    ("write", "EROFS", Errno.EPERM),
    ("flush", "EIO", Errno.EIO),
    ("zero", "ENOMEM", Errno.ENOMEM),
    ("read", "EBUSY", Errno.EINVAL),
])
async def test_block_errors_map_to_nbd_errors(nursery: trio.Nursery, tmp_path: Path,
                                              iotype: str, injected: str,
                                              expected: Errno) -> None:
    srv = await start_server(nursery, tmp_path,
                             blockdevs=blkdebug({"errno": injected, "iotype": iotype}),
                             exports=DBG_EXPORT)
    client = await srv.connect()
    cmd = {"read": Cmd.READ, "write": Cmd.WRITE, "flush": Cmd.FLUSH,
           "zero": Cmd.WRITE_ZEROES}[iotype]
    length = 0 if cmd is Cmd.FLUSH else 4096
    if cmd is Cmd.FLUSH:
        await client.write(0, b"dirty")  # a flush with nothing written does not reach the node
    reply = await client.request(cmd, 0, length, data=b"x" * 4096 if cmd is Cmd.WRITE else None)
    assert reply.error == expected
    # Structured clients get an error chunk with a message.
    assert reply.messages and "failed" in reply.messages[0]
    # The connection stays usable.
    assert (await client.request(Cmd.CACHE, 0, 4096)).error == 0


async def test_enotsup_only_for_fast_zero(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             blockdevs=blkdebug({"errno": "ENOTSUP",
                                                 "iotype": ["zero", "write"]}),
                             exports=DBG_EXPORT)
    client = await srv.connect(structured=False)
    fast = await client.request(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.FAST_ZERO)
    assert fast.error == Errno.ENOTSUP
    # Without FAST_ZERO the block layer falls back to writing zeros; that write fails with
    # ENOTSUP too, which only FAST_ZERO may see on the wire.
    slow = await client.request(Cmd.WRITE_ZEROES, 0, 4096)
    assert slow.error == Errno.EINVAL
    # A simple-reply client gets the error without a message.
    assert slow.messages == []


async def test_invalid_requests_get_errors(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    client = await srv.connect()
    assert (await client.request(Cmd.READ, 16 * MiB, 4096)).error == Errno.EINVAL
    past = await client.request(Cmd.WRITE, 16 * MiB - 512, data=b"x" * 4096)
    assert past.error == Errno.ENOSPC
    assert (await client.request(Cmd.BLOCK_STATUS, 0, 4096)).error == Errno.EINVAL
    assert (await client.request(Cmd.RESIZE, 0, 0)).error == Errno.EINVAL
    assert await client.read(0, 4) == bytes(4)


async def test_many_requests_in_flight(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path, max_in_flight=4)
    client = await srv.connect()
    writes = [await client.send(Cmd.WRITE, i * 65536, data=bytes([i]) * 65536)
              for i in range(64)]
    for cookie in writes:
        assert (await client.wait(cookie)).error == 0
    reads = {await client.send(Cmd.READ, i * 65536, 65536): i for i in range(64)}
    flushes = [await client.send(Cmd.FLUSH) for _ in range(8)]
    for cookie in reversed(list(reads)):  # replies matched by cookie, in any order
        reply = await client.wait(cookie)
        assert reply.data() == bytes([reads[cookie]]) * 65536
    for cookie in flushes:
        assert (await client.wait(cookie)).error == 0


async def test_vanishing_client_does_not_affect_others(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             blockdevs=blkdebug(delay=[{"iotype": "read", "ms": 50}]),
                             exports=DBG_EXPORT)
    good = await srv.connect()
    bad = await srv.connect()
    for i in range(16):
        await bad.send(Cmd.READ, i * 65536, 65536)
    # A whole write (away from the good client's bytes: two connections' writes are not
    # ordered), then a half-sent one.
    await bad.send(Cmd.WRITE, 2 * MiB, data=b"x" * 100000)
    await bad.stream.send_all(b"\x25\x60\x95\x13\x00\x00\x00\x01")
    await bad.close()
    await good.write(4096, b"still here")
    assert await good.read(4096, 10) == b"still here"
    with trio.fail_after(5):
        while len(srv.server.connections) > 1:
            await trio.sleep(0.01)
    assert await good.read(4096, 10) == b"still here"


async def test_protocol_violation_drops_only_that_client(nursery: trio.Nursery,
                                                         tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path)
    good = await srv.connect()
    bad = await srv.connect()
    await bad.stream.send_all(b"\xde\xad\xbe\xef" * 7)
    assert await bad.eof()
    await good.write(0, b"ok")
    assert await good.read(0, 2) == b"ok"


async def test_disc_waits_for_in_flight_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             blockdevs=blkdebug(delay=[{"iotype": "write", "ms": 200}]),
                             exports=DBG_EXPORT)
    client = await srv.connect()
    cookie = await client.send(Cmd.WRITE, 0, data=b"durable" * 100)
    await client.disconnect()
    reply = await client.wait(cookie)
    assert reply.error == 0
    assert await client.eof()
    check = await srv.connect()
    assert await check.read(0, 7) == b"durable"


async def test_shutdown_finishes_in_flight_then_closes(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             blockdevs=blkdebug(delay=[{"iotype": "write", "ms": 200}]),
                             exports=DBG_EXPORT)
    client = await srv.connect()
    idle = await srv.connect()
    cookie = await client.send(Cmd.WRITE, 0, data=b"x" * 4096)
    await trio.sleep(0.05)
    srv.server.shutdown()
    assert (await client.wait(cookie)).error == 0
    assert await client.eof() and await idle.eof()
    with trio.fail_after(5):
        await srv.server.closed.wait()
    assert not Path(srv.path).exists(), "the socket file is removed"


async def test_handshake_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path, handshake_timeout=0.2)
    stream = await trio.open_unix_socket(srv.path)
    greeting = await stream.receive_some(18)
    assert greeting[:8] == b"NBDMAGIC"
    with trio.fail_after(5):
        while await stream.receive_some(100):
            pass  # the server hangs up on a client that never negotiates
    client = await srv.connect()  # others are still served
    assert await client.read(0, 1) == b"\0"


async def test_connection_limit_queues_clients(nursery: trio.Nursery, tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path, max_connections=1)
    first = await srv.connect()
    second_stream = await trio.open_unix_socket(srv.path)
    with trio.move_on_after(0.2):
        await second_stream.receive_some(18)
        pytest.fail("a second client is not served while the first is connected")
    await first.disconnect()
    assert await first.eof()
    second = await NBDClient.handshake(second_stream)
    assert await second.read(0, 1) == b"\0"


async def test_not_persistent_stops_after_last_client(nursery: trio.Nursery,
                                                      tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path, persistent=False)
    client = await srv.connect()
    await client.write(0, b"x")
    await client.disconnect()
    with trio.fail_after(5):
        await srv.server.closed.wait()
    assert srv.server.served == 1


def test_errno_table() -> None:
    from nbdserve.errors import nbd_errno

    assert nbd_errno(errno.EPERM) is Errno.EPERM
    assert nbd_errno(errno.EROFS) is Errno.EPERM
    assert nbd_errno(errno.EFBIG) is Errno.ENOSPC
    assert nbd_errno(errno.EOVERFLOW) is Errno.EOVERFLOW
    assert nbd_errno(errno.ESHUTDOWN) is Errno.ESHUTDOWN
    assert nbd_errno(errno.EOPNOTSUPP, fast_zero=True) is Errno.ENOTSUP
    assert nbd_errno(errno.ENOTSUP) is Errno.EINVAL
    assert nbd_errno(errno.EACCES) is Errno.EINVAL
    assert nbd_errno(None) is Errno.EIO


async def test_payload_budget_bounds_requests_in_flight(nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    srv = await start_server(nursery, tmp_path,
                             blockdevs=blkdebug(delay=[{"iotype": "write", "ms": 20}]),
                             exports=DBG_EXPORT)
    client = await srv.connect()
    srv.server.budget.limit = 2 * MiB
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, srv.server.budget.used)
            await trio.sleep(0.001)

    async with trio.open_nursery() as inner:
        inner.start_soon(watch)
        cookies = [await client.send(Cmd.WRITE, i * MiB, data=bytes([i]) * MiB)
                   for i in range(4)]
        for cookie in cookies:
            assert (await client.wait(cookie)).error == 0
        inner.cancel_scope.cancel()
    assert 0 < peak <= 2 * MiB
    assert await client.read(3 * MiB, 4) == b"\3" * 4


async def test_connection_limit_with_several_listeners(nursery: trio.Nursery,
                                                       tmp_path: Path) -> None:
    # Two listeners, one slot: clients on either listener are served in turn (a slot must
    # not sit with an idle accept on the other listener).
    from nbdserve.block import open_graph
    from nbdserve.exports import Catalogue, attach_exports
    from nbdserve.listeners import open_unix
    from nbdserve.server import Server

    graph = await open_graph([{"driver": "memory", "node-name": "m0", "size": MiB}])
    exports = attach_exports(graph, [ExportSpec(name="", node_name="m0")],
                             multi_conn_allowed=False)
    server = Server(Catalogue(exports), max_connections=1)
    paths = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    await nursery.start(server.serve, [open_unix(p) for p in paths])
    for path in [paths[0], paths[0], paths[1], paths[1], paths[0]]:
        with trio.fail_after(5):
            client = await NBDClient.connect(path)
            assert await client.read(0, 1) == b"\0"
            await client.disconnect()
            assert await client.eof()
