"""Per-request cost of a connection thread's pass, in process (no sockets, no threads).

    python3 -m bench.hot_path [--batches N] [--repeat R] [--dir DIR]

Feeds batches of 16 pipelined 4 KiB requests (random offsets of a 64 MiB page-cached raw
image, as fio's QD16 rows send) into a real :class:`ServerTransmission` and serves them with
``Connection._serve_now``, exactly as ``ThreadedLoop`` does between a receive and a send, and
reports µs per request: the parse alone (``next_plain``), and parse + serve + reply. Rows
take turns; each figure is the best of R runs. What it leaves out (the receive, the send,
the graph lock) is the same system-call work floor.py does.
"""

from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time
from collections.abc import Callable

import trio

from nbdserve.block import open_graph
from nbdserve.commands import CommandContext
from nbdserve.config import ExportSpec
from nbdserve.connection import Connection
from nbdserve.exports import attach_exports
from nbdserve.stats import ConnectionStats
from nbdserve.types import Buffer
from protocol import NEED_DATA, Cmd, ServerTransmission, Session, TransmissionFlag

IMAGE = 64 << 20
BLOCK = 4096
QD = 16
_REQUEST = struct.Struct(">IHHQQI")
_MAGIC = 0x25609513


def batches(cmd: Cmd, count: int) -> list[bytes]:
    """``count`` receive buffers of QD requests each, as a client pipelines them."""
    step = IMAGE // BLOCK
    payload = os.urandom(BLOCK) if cmd is Cmd.WRITE else b""
    out = []
    for b in range(count):
        parts = []
        for i in range(QD):
            offset = ((b * QD + i) * 7919 % step) * BLOCK
            parts.append(_REQUEST.pack(_MAGIC, 0, int(cmd), i, offset, BLOCK) + payload)
        out.append(b"".join(parts))
    return out


def serve(conn: Connection, parse_only: bool) -> Callable[[bytes], int]:
    tx, serve_now = conn._tx, conn._serve_now

    def one_batch(data: bytes) -> int:
        """How many requests were parsed (parse_only) or answered at once."""
        tx.receive_data(data)
        out: list[Buffer] = []
        done = 0
        while (event := tx.next_plain()) is not NEED_DATA:
            if type(event) is not tuple:  # not a valid READ/WRITE: the batch is wrong
                raise RuntimeError(f"unexpected event {event!r}")
            done += parse_only or isinstance(serve_now(event, out), int)
        return done

    return one_batch


async def measure(count: int, repeat: int, directory: str) -> list[tuple[str, float]]:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".img")
    try:
        os.write(fd, os.urandom(IMAGE))
        # As `nbdserve -f raw IMAGE` serves it: the file node alone.
        graph = await open_graph([{"driver": "file", "node-name": "f", "filename": path}])
        (export,) = attach_exports(graph, [ExportSpec(name="", node_name="f", writable=True)],
                                   multi_conn_allowed=True)
        flags = export.info.flags | TransmissionFlag.HAS_FLAGS
        session = Session(export.info, flags, structured=True, extended=False)
        conn = Connection.__new__(Connection)  # only what _serve_now reads
        conn.stats = ConnectionStats()
        conn._tx = ServerTransmission(session)
        conn._ctx = CommandContext(export, conn._tx)
        rows = [
            (f"{cmd.name} parse", cmd, True) for cmd in (Cmd.READ, Cmd.WRITE)
        ] + [(f"{cmd.name} parse + serve + reply", cmd, False) for cmd in (Cmd.READ, Cmd.WRITE)]
        data = {cmd: batches(cmd, count) for cmd in (Cmd.READ, Cmd.WRITE)}
        best = {name: float("inf") for name, _, _ in rows}
        for name, cmd, parse_only in rows:  # the figures mean nothing unless all are served
            serve(conn, parse_only)(data[cmd][0])  # the file driver learns what the fs can do
            if serve(conn, parse_only)(data[cmd][1]) != QD:
                raise RuntimeError(f"{name}: not every request was served at once")
        for _ in range(repeat):
            for name, cmd, parse_only in rows:
                one_batch = serve(conn, parse_only)
                start = time.perf_counter_ns()
                for batch in data[cmd]:
                    one_batch(batch)
                best[name] = min(best[name], (time.perf_counter_ns() - start) / (count * QD))
        await graph.close()
        return [(name, best[name] / 1000) for name, _, _ in rows]
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    results = trio.run(measure, args.batches, args.repeat, args.dir)
    print(f"4 KiB requests in batches of {QD}, best of {args.repeat} x {args.batches * QD}")
    for name, us in results:
        print(f"{name:<32} {us:6.2f} µs/req")


if __name__ == "__main__":
    main()
