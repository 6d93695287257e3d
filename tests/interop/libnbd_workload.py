"""A seeded random workload through libnbd, checked against an in-memory model of the disk.

Run with Debian's /usr/bin/python3 (libnbd's `nbd` module):

    libnbd_workload.py URI --seed 1 --connections 4 --in-flight 16 --requests 2000

It opens several connections and keeps many asynchronous requests in flight on each: reads,
writes (some with FUA), write-zeroes (with and without NO_HOLE, some FUA), trims, flushes,
cache and base:allocation block-status queries, at aligned and unaligned offsets. Requests
whose ranges conflict (a write against anything) are never in flight together, so every
read has exactly one correct answer: the model's bytes. After TRIM the contents are
unspecified (NBD spec), so those bytes are "unknown" until written again.

At the end every connection flushes and reads the whole disk back. Prints a JSON summary;
exits 1 with a description of the first mismatch or error. With --model-out PATH it writes
the model and PATH.known (1 per byte whose value is specified) for checking the image file.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import nbd  # type: ignore[import-not-found]

STATE_ZERO = 2  # base:allocation: reads as zeros
KNOWN_RUNS = re.compile(rb"\x01+")
WATCHDOG_SECONDS = 120.0


class Mismatch(Exception):
    pass


@dataclass
class Op:
    kind: str
    offset: int
    length: int
    flags: int = 0
    handle_index: int = 0
    buffer: Any = None  # nbd.Buffer kept alive until the command completes
    extents: list[tuple[str, int, list[int]]] = field(default_factory=list)

    @property
    def writes(self) -> bool:
        return self.kind in ("write", "zero", "trim")

    def describe(self) -> str:
        return (f"{self.kind}(offset={self.offset}, length={self.length}, "
                f"flags={self.flags:#x}) on connection {self.handle_index}")


class Model:
    def __init__(self, initial: bytearray) -> None:
        self.data = initial
        self.known = bytearray(b"\x01" * len(initial))

    def write(self, offset: int, chunk: bytes) -> None:
        self.data[offset:offset + len(chunk)] = chunk
        self.known[offset:offset + len(chunk)] = b"\x01" * len(chunk)

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def forget(self, offset: int, length: int) -> None:
        self.known[offset:offset + length] = bytes(length)

    def check(self, offset: int, actual: bytes, what: str) -> None:
        """Every known byte in [offset, offset+len(actual)) must equal the model."""
        end = offset + len(actual)
        for run in KNOWN_RUNS.finditer(self.known, offset, end):
            lo, hi = run.start(), run.end()
            expected = self.data[lo:hi]
            got = actual[lo - offset:hi - offset]
            if got != expected:
                first = next(i for i in range(len(got)) if got[i] != expected[i])
                raise Mismatch(f"{what}: byte {lo + first} is {got[first]:#04x}, "
                               f"model says {expected[first]:#04x}")

    def check_zero_extent(self, offset: int, length: int, what: str) -> None:
        self.check(offset, bytes(length), what)


class Workload:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.handles: list[Any] = []
        for _ in range(args.connections):
            h = nbd.NBD()
            if args.simple_replies:  # the kernel client's mode: no structured replies
                h.set_request_structured_replies(False)
            else:
                h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.connect_uri(args.uri)
            self.handles.append(h)
        h0 = self.handles[0]
        self.size: int = h0.get_size()
        self.can_trim = bool(h0.can_trim())
        self.can_zero = bool(h0.can_zero())
        self.can_fua = bool(h0.can_fua())
        self.can_cache = bool(h0.can_cache())
        self.structured = bool(h0.get_structured_replies_negotiated())
        self.can_block_status = self.structured and bool(
            h0.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        self.in_flight: list[dict[int, Op]] = [{} for _ in self.handles]
        self.counts: dict[str, int] = {}
        self.bytes_moved = 0
        self.max_in_flight_seen = 0
        self.model = Model(self.read_all(h0))

    # -- whole-disk helpers -----------------------------------------------------------------

    def read_all(self, h: Any) -> bytearray:
        out = bytearray()
        step = 4 << 20
        for offset in range(0, self.size, step):
            out += h.pread(min(step, self.size - offset), offset)
        return out

    # -- choosing requests -----------------------------------------------------------------

    def random_range(self) -> tuple[int, int]:
        shape = self.rng.random()
        if shape < 0.35:    # small and unaligned
            length = self.rng.randint(1, 4096)
            offset = self.rng.randrange(0, self.size - length + 1)
        elif shape < 0.85:  # 4 KiB-aligned, up to 128 KiB
            length = 4096 * self.rng.randint(1, 32)
            offset = 4096 * self.rng.randrange(0, (self.size - length) // 4096 + 1)
        else:               # large, odd boundaries
            length = self.rng.randint(64 << 10, 1 << 20)
            offset = self.rng.randrange(0, self.size - length + 1)
        return offset, length

    def choose(self) -> Op:
        kinds = {"read": 0.34, "write": 0.34, "zero": 0.12 if self.can_zero else 0,
                 "trim": 0.05 if self.can_trim else 0, "flush": 0.04,
                 "block_status": 0.08 if self.can_block_status else 0,
                 "cache": 0.03 if self.can_cache else 0}
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        if kind == "flush":
            return Op("flush", 0, 0)
        offset, length = self.random_range()
        flags = 0
        if kind in ("write", "zero", "trim") and self.can_fua and self.rng.random() < 0.15:
            flags |= nbd.CMD_FLAG_FUA
        if kind == "zero" and self.rng.random() < 0.5:
            flags |= nbd.CMD_FLAG_NO_HOLE
        return Op(kind, offset, length, flags)

    def conflicts(self, op: Op) -> bool:
        if op.kind == "flush":
            return False
        end = op.offset + op.length
        for table in self.in_flight:
            for other in table.values():
                if other.kind == "flush" or not (op.writes or other.writes):
                    continue
                if op.offset < other.offset + other.length and other.offset < end:
                    return True
        return False

    # -- issuing and completing ------------------------------------------------------------

    def issue(self, index: int, op: Op) -> None:
        h = self.handles[index]
        op.handle_index = index
        if op.kind == "read":
            op.buffer = nbd.Buffer(op.length)
            cookie = h.aio_pread(op.buffer, op.offset, flags=op.flags)
        elif op.kind == "write":
            chunk = self.rng.randbytes(op.length)
            op.buffer = nbd.Buffer.from_bytearray(chunk)
            cookie = h.aio_pwrite(op.buffer, op.offset, flags=op.flags)
            self.model.write(op.offset, chunk)
        elif op.kind == "zero":
            cookie = h.aio_zero(op.length, op.offset, flags=op.flags)
            self.model.zero(op.offset, op.length)
        elif op.kind == "trim":
            cookie = h.aio_trim(op.length, op.offset, flags=op.flags)
            self.model.forget(op.offset, op.length)
        elif op.kind == "flush":
            cookie = h.aio_flush()
        elif op.kind == "cache":
            cookie = h.aio_cache(op.length, op.offset)
        elif op.kind == "block_status":
            def extent(context: str, offset: int, entries: list[int], err: Any) -> int:
                op.extents.append((context, offset, list(entries)))
                return 0
            cookie = h.aio_block_status(op.length, op.offset, extent)
        else:
            raise AssertionError(op.kind)
        self.in_flight[index][cookie] = op
        self.counts[op.kind] = self.counts.get(op.kind, 0) + 1
        self.bytes_moved += op.length if op.kind in ("read", "write") else 0

    def complete(self, op: Op) -> None:
        if op.kind == "read":
            self.model.check(op.offset, bytes(op.buffer.to_bytearray()), op.describe())
        elif op.kind == "block_status":
            covered = 0
            for context, offset, entries in op.extents:
                if context != nbd.CONTEXT_BASE_ALLOCATION:
                    continue
                position = offset
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    lo = max(position, op.offset)
                    hi = min(position + length, op.offset + op.length)
                    if hi > lo and flags & STATE_ZERO:
                        self.model.check_zero_extent(lo, hi - lo, f"{op.describe()} says zero")
                    position += length
                covered = position - op.offset
            if covered <= 0:
                raise Mismatch(f"{op.describe()}: no base:allocation extents returned")

    def reap(self) -> int:
        done = 0
        for index, h in enumerate(self.handles):
            table = self.in_flight[index]
            for cookie in list(table):
                try:
                    finished = h.aio_command_completed(cookie)
                except nbd.Error as e:
                    raise Mismatch(f"{table[cookie].describe()} failed: {e.string}") from None
                if finished:
                    self.complete(table.pop(cookie))
                    done += 1
        return done

    def wait_for_io(self) -> None:
        poller = select.poll()
        by_fd: dict[int, Any] = {}
        for h in self.handles:
            direction = h.aio_get_direction()
            events = 0
            if direction & nbd.AIO_DIRECTION_READ:
                events |= select.POLLIN
            if direction & nbd.AIO_DIRECTION_WRITE:
                events |= select.POLLOUT
            if events:
                fd = h.aio_get_fd()
                poller.register(fd, events)
                by_fd[fd] = h
        for fd, revents in poller.poll(1000):
            h = by_fd[fd]
            if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            if revents & select.POLLOUT:
                h.aio_notify_write()

    def total_in_flight(self) -> int:
        return sum(len(t) for t in self.in_flight)

    def run(self) -> dict[str, Any]:
        issued = 0
        deadline = time.monotonic() + WATCHDOG_SECONDS
        while issued < self.args.requests or self.total_in_flight():
            # Fill every connection up to its queue depth with non-conflicting requests.
            stalled = 0
            while issued < self.args.requests and stalled < 8:
                free = [i for i, t in enumerate(self.in_flight) if len(t) < self.args.in_flight]
                if not free:
                    break
                op = self.choose()
                if self.conflicts(op):
                    stalled += 1
                    continue
                self.issue(self.rng.choice(free), op)
                issued += 1
            self.max_in_flight_seen = max(self.max_in_flight_seen, self.total_in_flight())
            if self.total_in_flight():
                self.wait_for_io()
            self.reap()
            if time.monotonic() > deadline:
                raise Mismatch(f"stuck: {self.total_in_flight()} requests still in flight "
                               f"after {WATCHDOG_SECONDS} s")
        # Make everything durable and visible, then read it back on every connection.
        for h in self.handles:
            h.flush()
        for index, h in enumerate(self.handles):
            self.model.check(0, bytes(self.read_all(h)), f"final read on connection {index}")
        for h in self.handles:
            h.shutdown()
        return {
            "size": self.size,
            "connections": len(self.handles),
            "requests": issued,
            "counts": self.counts,
            "bytes_read_or_written": self.bytes_moved,
            "max_in_flight_seen": self.max_in_flight_seen,
            "known_bytes": self.model.known.count(1),
            "structured_replies": self.structured,
            "can": {"trim": self.can_trim, "zero": self.can_zero, "fua": self.can_fua,
                    "cache": self.can_cache, "block_status": self.can_block_status,
                    "multi_conn": bool(self.handles[0].can_multi_conn())},
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("uri")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--model-out", help="write the model here and PATH.known")
    parser.add_argument("--simple-replies", action="store_true",
                        help="do not negotiate structured replies")
    parser.add_argument("--self-test-flip", type=int, metavar="OFFSET",
                        help="flip one model byte first, to prove mismatches are caught")
    args = parser.parse_args()
    workload = Workload(args)
    if args.self_test_flip is not None:
        workload.model.data[args.self_test_flip] ^= 0xFF
    try:
        summary = workload.run()
    except Mismatch as e:
        print(f"MISMATCH: {e}", file=sys.stderr)
        return 1
    if args.model_out:
        with open(args.model_out, "wb") as f:
            f.write(workload.model.data)
        with open(args.model_out + ".known", "wb") as f:
            f.write(workload.model.known)
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
