"""Micro-benchmark of the protocol hot path: µs per request, parse + reply build.

    python3 bench/wire.py [--number N]

For each message it compares interpreted construct, compiled construct, and the path
``protocol`` actually uses (struct fast paths inside ServerTransmission, including event
construction and validation). Best of 5 runs, timed with ``time.process_time`` so that other
processes competing for the CPU (the test suite, other benchmarks) do not inflate the result;
numbers are CPU-only, no I/O.
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

from protocol import (
    REQUEST_MAGIC,
    Cmd,
    ExportInfo,
    Request,
    ServerTransmission,
    Session,
    StateFlag,
    TransmissionFlag,
)
from protocol import _wire as wire

CAPS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
)
EXPORT = ExportInfo("bench", 1 << 30, CAPS)


def _request(cmd: Cmd, length: int, extended: bool = False) -> bytes:
    schema = wire.ExtendedRequest if extended else wire.Request
    raw: bytes = schema.build(dict(flags=0, type=cmd, cookie=42, offset=1 << 20, length=length))
    return raw


def cases() -> dict[str, dict[str, Callable[[], object]]]:
    flush = _request(Cmd.FLUSH, 0).replace((1 << 20).to_bytes(8, "big"), bytes(8))
    read = _request(Cmd.READ, 4096)
    ext_read = _request(Cmd.READ, 4096, extended=True)
    data = bytes(4096)

    simple = ServerTransmission(Session(EXPORT, CAPS))
    structured = ServerTransmission(
        Session(EXPORT, CAPS | TransmissionFlag.SEND_DF, structured=True,
                contexts={0: "base:allocation"})
    )  # fmt: skip
    extended = ServerTransmission(
        Session(EXPORT, CAPS | TransmissionFlag.SEND_DF, structured=True, extended=True,
                contexts={0: "base:allocation"})
    )  # fmt: skip
    read_req = Request(42, Cmd.READ, offset=1 << 20, length=4096)
    bs_req = Request(42, Cmd.BLOCK_STATUS, offset=1 << 20, length=1 << 20)
    extents = {0: [(65536, 0), (65536, StateFlag.HOLE | StateFlag.ZERO), (1 << 19, 0)]}

    def hot(tx: ServerTransmission, raw: bytes, answer: Callable[[Request], object]) -> object:
        tx.receive_data(raw)
        ev = tx.next_event()
        assert isinstance(ev, Request)
        return answer(ev)

    def interp_flush() -> object:
        r = wire.Request.parse(flush)
        return wire.SimpleReply.build(dict(error=0, cookie=r.cookie))

    def compiled_flush() -> object:
        r = wire.RequestCompiled.parse(flush)
        return wire.SimpleReplyCompiled.build(dict(error=0, cookie=r.cookie))

    def struct_flush() -> object:
        _, _, _, cookie, _, _ = wire.REQUEST.unpack(flush)
        return wire.SIMPLE_REPLY.pack(0x67446698, 0, cookie)

    def interp_read_reply() -> object:
        head = wire.ChunkHeader.build(dict(flags=1, type=1, cookie=42, length=4104))
        return [head + wire.OffsetDataHeader.build(dict(offset=1 << 20)), data]

    offset_compiled = wire.OffsetDataHeader.compile()

    def compiled_read_reply() -> object:
        head = wire.ChunkHeaderCompiled.build(dict(flags=1, type=1, cookie=42, length=4104))
        return [head + offset_compiled.build(dict(offset=1 << 20)), data]

    assert wire.REQUEST.unpack(flush)[0] == REQUEST_MAGIC
    # fmt: off
    return {
        "compact FLUSH parsed + simple reply built": {
            "interpreted construct": interp_flush,
            "compiled construct": compiled_flush,
            "bare struct (lower bound)": struct_flush,
            "protocol hot path": lambda: hot(simple, flush, simple.reply),
        },
        "compact READ 4K parsed + simple reply_read": {
            "interpreted construct": lambda: [
                wire.SimpleReply.build(dict(error=0, cookie=wire.Request.parse(read).cookie)),
                data,
            ],
            "compiled construct": lambda: [
                wire.SimpleReplyCompiled.build(
                    dict(error=0, cookie=wire.RequestCompiled.parse(read).cookie)
                ),
                data,
            ],
            "protocol hot path": lambda: hot(simple, read, lambda r: simple.reply_read(r, data)),
        },
        "structured READ reply built (OFFSET_DATA+DONE)": {
            "interpreted construct": interp_read_reply,
            "compiled construct": compiled_read_reply,
            "protocol hot path": lambda: structured.reply_read(read_req, data),
        },
        "extended READ parsed + reply_read": {
            "interpreted construct": lambda: wire.ExtendedChunkHeader.build(
                dict(flags=1, type=1, cookie=wire.ExtendedRequest.parse(ext_read).cookie,
                     offset=1 << 20, length=4104)
            ),
            "compiled construct": lambda: wire.ExtendedChunkHeaderCompiled.build(
                dict(flags=1, type=1, cookie=wire.ExtendedRequestCompiled.parse(ext_read).cookie,
                     offset=1 << 20, length=4104)
            ),
            "protocol hot path": lambda: hot(
                extended, ext_read, lambda r: extended.reply_read(r, data)
            ),
        },
        "BLOCK_STATUS reply, 3 extents": {
            "interpreted construct": lambda: wire.ChunkHeader.build(
                dict(flags=1, type=5, cookie=42, length=28)
            ) + wire.BlockStatus.build(dict(context_id=0, extents=[
                dict(length=n, flags=f) for n, f in extents[0]])),
            "protocol hot path": lambda: structured.reply_block_status(bs_req, extents),
        },
    }
    # fmt: on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="calls per timing run")
    args = parser.parse_args()
    for title, variants in cases().items():
        print(title)
        for name, fn in variants.items():
            runs = timeit.repeat(fn, number=args.number, repeat=5, timer=time.process_time)
            best = min(runs) / args.number
            print(f"  {name:28s} {best * 1e6:7.2f} µs")


if __name__ == "__main__":
    main()
