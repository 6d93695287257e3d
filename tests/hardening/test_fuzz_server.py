"""Random and mutated byte streams thrown at a running server while a good client works.

Several threads open connections and send seeded garbage: pure random bytes, and valid
recorded sessions (against the export ``fuzz``) with bits flipped, bytes replaced, inserted,
deleted or duplicated, and length fields set to boundary values. Meanwhile a well-behaved
client writes and reads the export ``good`` and checks every byte against a model. Afterwards
the server must be alive, the good export must equal the model, and the server's RSS must
have stayed bounded. Deterministic per seed; bounded by count and by time.
"""

from __future__ import annotations

import contextlib
import functools
import random
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import _nbdraw as nbd
from ._server import MiB, Server, Servers

pytestmark = pytest.mark.usefixtures("nbdserve_only")

SEED = 20261125
FUZZERS = 4
MAX_INPUTS_PER_FUZZER = 400
FUZZ_SECONDS = 8.0
GOOD_SIZE = 8 * MiB
RSS_LIMIT_KIB = 200 * 1024
INTERESTING_U32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 4096, 4097, 32 * MiB + 1, 65536]


def _sessions() -> list[bytes]:
    """Valid client byte streams against the ``fuzz`` export (the mutation seeds)."""
    name = b"fuzz"
    go = nbd.option(nbd.OPT_GO, nbd.go_data(name, (0, 1, 2, 3)))
    meta = nbd.option(
        nbd.OPT_SET_META_CONTEXT,
        struct.pack(">I", len(name)) + name + struct.pack(">II", 1, 15) + b"base:allocation",
    )
    payload = bytes(range(256)) * 8
    requests = (
        nbd.request(nbd.CMD_WRITE, 1, 4096, len(payload)) + payload
        + nbd.request(nbd.CMD_READ, 2, 0, 65536)
        + nbd.request(nbd.CMD_WRITE_ZEROES, 3, 65536, 65536)
        + nbd.request(nbd.CMD_TRIM, 4, 131072, 65536)
        + nbd.request(7, 5, 0, 1 << 20)  # BLOCK_STATUS
        + nbd.request(nbd.CMD_FLUSH, 6, 0, 0)
        + nbd.request(nbd.CMD_READ, 7, 4000, 300, 4)  # DF
        + nbd.request(nbd.CMD_DISC, 8, 0, 0)
    )  # fmt: skip
    flags = nbd.client_flags()
    return [
        flags + nbd.option(nbd.OPT_STRUCTURED_REPLY) + meta + go + requests,
        flags + go + requests,
        flags + nbd.option(nbd.OPT_LIST) + nbd.option(nbd.OPT_INFO, nbd.go_data(name)) + go,
        nbd.client_flags(nbd.C_FIXED_NEWSTYLE) + nbd.option(nbd.OPT_EXPORT_NAME, name) + requests,
        flags + nbd.option(99, b"?" * 100) + nbd.option(nbd.OPT_STARTTLS) + go + requests,
        flags + nbd.option(nbd.OPT_ABORT),
    ]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 64))
        op = rng.randrange(7)
        i = rng.randrange(len(buf))
        if op == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[i] = rng.randrange(256)
        elif op == 2:
            buf[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == 3:
            del buf[i : i + rng.randint(1, 32)]
        elif op == 4:
            j = rng.randrange(len(buf))
            buf[i:i] = buf[j : j + rng.randint(1, 64)]
        elif op == 5 and i + 4 <= len(buf):
            buf[i : i + 4] = struct.pack(">I", rng.choice(INTERESTING_U32))
        else:
            del buf[i:]
    return bytes(buf)


def _input(rng: random.Random, seeds: list[bytes]) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 2048))
    if kind == 1:  # a valid handshake, then garbage where requests should be
        return seeds[1][: 4 + 16 + 4 + 4 + 2 + 8] + rng.randbytes(rng.randint(1, 512))
    return _mutate(rng, rng.choice(seeds))


@dataclass
class Tally:
    inputs: int = 0
    bytes_sent: int = 0
    hangs: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _fuzzer(sock_path: Path, seed: int, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(seed)
    seeds = _sessions()
    for n in range(MAX_INPUTS_PER_FUZZER):
        if stop.is_set():
            return
        data = _input(rng, seeds)
        try:
            with nbd.connect(sock_path, timeout=10) as s:
                nbd.recv_exact(s, 18)
                for i in range(0, len(data), 97):  # split: framing must not matter
                    s.sendall(data[i : i + 97])
                s.shutdown(socket.SHUT_WR)
                # After our EOF the server must finish and hang up: anything else is a hang.
                nbd.wait_closed(s, timeout=10)
        except (BrokenPipeError, ConnectionResetError, nbd.Closed):
            pass  # the server hung up on us early: fine
        except AssertionError as e:
            with tally.lock:
                tally.hangs.append(f"seed {seed} input {n}: {e}")
        with tally.lock:
            tally.inputs += 1
            tally.bytes_sent += len(data)


@dataclass
class GoodClient:
    sock_path: Path
    seed: int
    model: bytearray = field(default_factory=lambda: bytearray(GOOD_SIZE))
    ops: int = 0
    verified: int = 0
    error: BaseException | None = None

    def run(self, stop: threading.Event) -> None:
        try:
            self._run(stop)
        except BaseException as e:
            self.error = e

    def _run(self, stop: threading.Event) -> None:
        rng = random.Random(self.seed)
        cookie = 0
        with nbd.connect(self.sock_path, timeout=30) as s:
            size, _ = nbd.handshake(s, b"good", structured=True)
            assert size == GOOD_SIZE
            while not stop.is_set():
                cookie += 1
                off = rng.randrange(GOOD_SIZE - 1)
                length = rng.randint(1, min(128 << 10, GOOD_SIZE - off))
                op = rng.randrange(10)
                if op < 4:
                    data = rng.randbytes(length)
                    s.sendall(nbd.request(nbd.CMD_WRITE, cookie, off, length) + data)
                    assert nbd.read_reply_of(s).error == 0
                    self.model[off : off + length] = data
                elif op < 5:
                    s.sendall(nbd.request(nbd.CMD_WRITE_ZEROES, cookie, off, length))
                    assert nbd.read_reply_of(s).error == 0
                    self.model[off : off + length] = bytes(length)
                elif op < 6:
                    s.sendall(nbd.request(nbd.CMD_FLUSH, cookie, 0, 0))
                    assert nbd.read_reply_of(s).error == 0
                else:
                    s.sendall(nbd.request(nbd.CMD_READ, cookie, off, length))
                    r = nbd.read_reply_of(s, off, length)
                    assert (r.cookie, r.error) == (cookie, 0)
                    assert r.data == self.model[off : off + length], f"corrupt at {off}+{length}"
                    self.verified += length
                self.ops += 1
            # Finally the whole export, in 1 MiB reads.
            for off in range(0, GOOD_SIZE, MiB):
                cookie += 1
                s.sendall(nbd.request(nbd.CMD_READ, cookie, off, MiB))
                r = nbd.read_reply_of(s, off, MiB)
                assert r.data == self.model[off : off + MiB], f"corrupt in final pass at {off}"
                self.verified += MiB


@pytest.fixture
def fuzz_server(tmp_path: Path) -> Iterator[Server]:
    sockdir = Path(tempfile.mkdtemp(prefix="nbdh-"))
    servers = Servers(tmp_path, sockdir)
    sock = sockdir / "fuzz.sock"
    args = [
        "--blockdev", "driver=memory,node-name=fuzz,size=8M",
        "--blockdev", "driver=memory,node-name=good,size=8M",
        # The fuzzed export comes first, should anything treat the first export as default.
        "--export", "type=nbd,id=e0,node-name=fuzz,name=fuzz,writable=on",
        "--export", "type=nbd,id=e1,node-name=good,name=good,writable=on",
        "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=64",
    ]  # fmt: skip
    yield servers.daemon(*args, sock=sock)
    servers.finish()
    shutil.rmtree(sockdir, ignore_errors=True)


def _sample_rss(server: Server, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], server.rss_kib())
        stop.wait(0.05)


def test_fuzzed_connections_do_not_disturb_a_good_client(fuzz_server: Server) -> None:
    tally = Tally()
    stop_fuzz, stop_good = threading.Event(), threading.Event()
    good = GoodClient(fuzz_server.sock, SEED)
    peak = [fuzz_server.rss_kib()]
    threads: list[tuple[threading.Thread, threading.Event]] = []

    def spawn(fn: Callable[[], None], ev: threading.Event) -> None:
        t = threading.Thread(target=fn, daemon=True)
        t.start()
        threads.append((t, ev))

    spawn(lambda: good.run(stop_good), stop_good)
    spawn(lambda: _sample_rss(fuzz_server, stop_good, peak), stop_good)
    for k in range(FUZZERS):
        spawn(
            functools.partial(_fuzzer, fuzz_server.sock, SEED + 1 + k, stop_fuzz, tally), stop_fuzz
        )
    deadline = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < deadline and any(t.is_alive() for t, ev in threads if ev is stop_fuzz):
        time.sleep(0.1)
    stop_fuzz.set()
    for t, ev in threads:
        if ev is stop_fuzz:
            t.join(30)
    stop_good.set()
    for t, _ in threads:
        t.join(60)
        assert not t.is_alive(), "a client thread is stuck"

    print(
        f"\nfuzz: {tally.inputs} inputs ({tally.bytes_sent} bytes) on as many connections; "
        f"good client: {good.ops} ops, {good.verified} bytes verified; "
        f"peak RSS {peak[0] // 1024} MiB"
    )
    assert good.error is None, repr(good.error)
    assert not tally.hangs, tally.hangs[:5]
    assert fuzz_server.alive(), fuzz_server.log_tail()
    assert tally.inputs >= 100
    assert good.ops > 0
    assert peak[0] < RSS_LIMIT_KIB, f"server RSS peaked at {peak[0] // 1024} MiB"
    nbd.assert_serves(fuzz_server.sock, b"good", offset=0)
