"""SIGKILL the server during a random workload; acknowledged, flushed data must survive.

A libnbd client writes whole 4 KiB blocks, each stamped with (write id, block number), flushes
now and then and sends some writes with FUA, and journals every step to its stdout. The test
kills the server at a seeded random point, restarts it on the same image and reads every
block back. The NBD contract: a write acknowledged before a FLUSH that completed, or a write
acknowledged with FUA, is durable. So each block must hold its last durable write, or any
write sent after that one (those may or may not have landed); nothing else, and never a torn
mixture.
"""

from __future__ import annotations

import json
import random
import signal
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import _libnbd as libnbd
from ._server import LIBNBD_PYTHON, MiB, Servers

BLOCK = 4096
SIZE = 8 * MiB
NBLOCKS = SIZE // BLOCK
SEED = 7409

WORKLOAD = """
import json
import random
rng = random.Random(ARGS["seed"])
h = nbd.NBD()
h.connect_unix(ARGS["sock"])
def say(line):
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
wid = 0
try:
    while True:
        if rng.random() < 0.05:
            say("FS")
            h.flush()
            say("F")
            continue
        wid += 1
        b = rng.randrange(ARGS["nblocks"])
        n = min(rng.randint(1, 8), ARGS["nblocks"] - b)
        fua = rng.random() < 0.1
        data = b"".join(
            (wid.to_bytes(8, "little") + (b + i).to_bytes(8, "little")) * 256 for i in range(n))
        say(f"S {wid} {b} {n}")
        h.pwrite(data, b * 4096, nbd.CMD_FLAG_FUA if fua else 0)
        say(f"{'U' if fua else 'W'} {wid}")
except nbd.Error as e:
    say(f"E {e.string}")
"""

READ_ALL = """
h = nbd.NBD()
h.connect_unix(ARGS["sock"])
with open(ARGS["out"], "wb") as f:
    for off in range(0, h.get_size(), 1 << 20):
        f.write(h.pread(1 << 20, off))
h.shutdown()
"""


@dataclass
class Journal:
    """What the client knows: writes sent, acknowledged, and made durable."""

    sent: dict[int, tuple[int, int]] = field(default_factory=dict)  # wid -> (block, count)
    acked: list[int] = field(default_factory=list)
    durable: set[int] = field(default_factory=set)
    flushes: int = 0
    fua: int = 0
    _flush_covers: list[int] = field(default_factory=list)

    def feed(self, line: str) -> None:
        kind, *rest = line.split()
        if kind == "S":
            wid, block, count = map(int, rest)
            self.sent[wid] = (block, count)
        elif kind in ("W", "U"):
            self.acked.append(int(rest[0]))
            if kind == "U":
                self.durable.add(int(rest[0]))
                self.fua += 1
        elif kind == "FS":
            self._flush_covers = list(self.acked)
        elif kind == "F":
            self.durable.update(self._flush_covers)
            self.flushes += 1

    def allowed(self) -> list[set[int]]:
        """Per block: the write ids its content may come from after the crash (0 = zeros)."""
        history: list[list[int]] = [[] for _ in range(NBLOCKS)]
        for wid in sorted(self.sent):
            block, count = self.sent[wid]
            for b in range(block, block + count):
                history[b].append(wid)
        allowed = []
        for writes in history:
            last_durable = max((i for i, w in enumerate(writes) if w in self.durable), default=-1)
            floor = {writes[last_durable]} if last_durable >= 0 else {0}
            allowed.append(floor | set(writes[last_durable + 1 :]))
        return allowed


def _decode(block: bytes, b: int) -> int | None:
    """The write id stamped on a block, 0 for zeros, None if it is not one whole stamp."""
    wid, blockno = struct.unpack("<QQ", block[:16])
    if block == bytes(BLOCK):
        return 0
    if blockno == b and block == block[:16] * 256:
        return int(wid)
    return None


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_acknowledged_flushed_writes_survive_sigkill(
    serve: Servers, tmp_path: Path, fmt: str
) -> None:
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(SIZE)], check=True)
    rng = random.Random(f"{SEED}-{fmt}")
    kill_after_flushes = rng.randint(3, 8)
    kill_after_more_lines = rng.randint(0, 60)

    server = serve("-f", fmt, str(image))
    client = subprocess.Popen(
        [LIBNBD_PYTHON, "-c", libnbd.PRELUDE + WORKLOAD,
         json.dumps({"sock": str(server.sock), "seed": SEED, "nblocks": NBLOCKS})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    journal = Journal()
    assert client.stdout is not None
    extra = 0
    for line in client.stdout:
        journal.feed(line)
        if journal.flushes >= kill_after_flushes:
            extra += 1
            if extra > kill_after_more_lines:
                break
    else:
        pytest.fail(f"client ended early: {client.wait()} {client.stderr and client.stderr.read()}")
    server.stop(signal.SIGKILL)
    for line in client.stdout:  # the client notices and stops
        journal.feed(line)
    assert client.wait(30) == 0, client.stderr and client.stderr.read()
    assert journal.flushes >= kill_after_flushes and journal.acked

    if fmt == "qcow2":
        check = subprocess.run(["qemu-img", "check", "-q", str(image)], capture_output=True)
        assert check.returncode in (0, 3), check  # 3 = leaked clusters only: no corruption

    restarted = serve("-f", fmt, str(image))
    dump = tmp_path / "after.bin"
    libnbd.check(READ_ALL, sock=str(restarted.sock), out=str(dump))
    content = dump.read_bytes()
    assert len(content) == SIZE
    if fmt == "qcow2":  # qemu reads the image the same way: nothing only nbdserve understands
        restarted.stop()
        theirs = tmp_path / "qemu.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(theirs)],
            check=True,
        )
        assert theirs.read_bytes() == content

    allowed = journal.allowed()
    bad = []
    for b in range(NBLOCKS):
        got = _decode(content[b * BLOCK : (b + 1) * BLOCK], b)
        if got not in allowed[b]:
            bad.append((b, got, sorted(allowed[b])[:5]))
    durable_blocks = sum(1 for a in allowed if a != {0})
    print(
        f"\ncrash[{fmt}]: {len(journal.sent)} writes sent, {len(journal.acked)} acked, "
        f"{len(journal.durable)} durable ({journal.flushes} flushes, {journal.fua} FUA); "
        f"{NBLOCKS} blocks verified, {durable_blocks} written"
    )
    assert not bad, f"{len(bad)} blocks lost or corrupted, e.g. (block, found, allowed): {bad[:5]}"


def test_the_checker_itself_catches_lost_and_torn_writes() -> None:
    j = Journal()
    for line in ["S 1 0 2", "W 1", "FS", "F", "S 2 1 1", "W 2", "S 3 1 1", "U 3", "S 4 5 1"]:
        j.feed(line)
    allowed = j.allowed()
    assert allowed[0] == {1}  # flushed: must survive
    assert allowed[1] == {3}  # FUA write after the flushed one: only it
    assert allowed[5] == {0, 4}  # sent, never acknowledged: either
    assert allowed[2] == {0}
    stamp = (1).to_bytes(8, "little") + (0).to_bytes(8, "little")
    assert _decode(stamp * 256, 0) == 1
    assert _decode(stamp * 256, 1) is None  # right id, wrong place
    assert _decode(stamp * 128 + bytes(2048), 0) is None  # torn
    assert _decode(bytes(BLOCK), 7) == 0
