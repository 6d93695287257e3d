"""The wire layer against real peers: libnbd and qemu clients against a tiny server built on
``protocol`` (tests/protocol/ramdisk.py), and our client objects against qemu-nbd.

qemu 7.2 and libnbd 1.14 (Debian 12) predate extended headers, so those are covered by the
client/server pair tests only.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import (
    NEED_DATA,
    BlockStatusReply,
    ClientHandshake,
    ClientTransmission,
    Cmd,
    Info,
    ReadData,
    ReadHole,
    Ready,
    ReplyDone,
    Request,
    StateFlag,
    TransmissionFlag,
)

from .ramdisk import RamDisk, serving

TIMEOUT = 30


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def ramdisk(tmp_path: Path) -> Iterator[tuple[RamDisk, str]]:
    with serving(RamDisk(), tmp_path / "sock") as disk:
        yield disk, f"nbd+unix:///disk?socket={tmp_path / 'sock'}"
    assert disk.errors == []


def test_nbdinfo_sees_the_export(ramdisk: tuple[RamDisk, str]) -> None:
    _, uri = ramdisk
    info = json.loads(run("nbdinfo", "--json", uri))
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk"
    assert export["description"] == "a RAM disk"
    assert export["export-size"] == 1 << 20
    assert export["contexts"] == ["base:allocation"]
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 1 << 20)  # fmt: skip
    assert export["can_df"] and export["can_flush"] and export["can_trim"]
    assert not export["is_read_only"] and not export["can_fast_zero"]


def test_nbdinfo_list_and_map(ramdisk: tuple[RamDisk, str]) -> None:
    _, uri = ramdisk
    listing = run("nbdinfo", "--list", uri.replace("/disk", "/"))
    assert 'export="disk"' in listing
    assert run("nbdinfo", "--map", uri).split() == [
        "0", "65536", "0", "data", "65536", "983040", "3", "hole,zero",
    ]  # fmt: skip


def test_qemu_io_reads_and_writes(ramdisk: tuple[RamDisk, str]) -> None:
    disk, uri = ramdisk
    run(
        "qemu-io", "-f", "raw",
        "-c", "write -P 0xab 1048064 512",
        "-c", "read -P 0xab 1048064 512",
        "-c", "read -P 0 200000 4096",
        "-c", "write -z 0 4096",
        "-c", "read -P 0 0 4096",
        "-c", "flush",
        uri,
    )  # fmt: skip
    assert disk.data[1048064:] == b"\xab" * 512
    assert disk.data[:4096] == bytes(4096)
    assert disk.data[4096:4352] == bytes(range(256))
    mapping = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri))
    assert [(m["start"], m["data"]) for m in mapping] == [
        (0, True), (65536, False), (1044480, True),
    ]  # fmt: skip


# -- our client against qemu-nbd -----------------------------------------------------------------


@pytest.fixture
def qemu_nbd(tmp_path: Path) -> Iterator[Path]:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(1 << 20)
        f.write(bytes(range(256)) * 256)  # 64 KiB of data, then a hole
    sock = tmp_path / "qemu.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", "disk", "-D", "a disk", "-A", "-k", str(sock),
         "--persistent", "--cache=none", "--aio=threads", str(image)],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + TIMEOUT
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.01)
        yield sock
    finally:
        proc.terminate()
        proc.wait(TIMEOUT)


def _connect(sock_path: Path, client: ClientHandshake) -> tuple[socket.socket, Ready]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(TIMEOUT)
    sock.connect(str(sock_path))
    while True:
        ev = client.next_event()
        sock.sendall(client.data_to_send())
        if ev is NEED_DATA:
            client.receive_data(sock.recv(65536))
        elif isinstance(ev, Ready):
            return sock, ev


def _roundtrip(sock: socket.socket, tx: ClientTransmission, request: Request) -> list[object]:
    sock.sendmsg(tx.send(request))
    events: list[object] = []
    while not events or not isinstance(events[-1], ReplyDone):
        ev = tx.next_event()
        if ev is NEED_DATA:
            tx.receive_data(sock.recv(1 << 20))
        else:
            events.append(ev)
    return events


def _assemble(events: list[object], offset: int, length: int) -> bytes:
    """The bytes a structured READ reply describes (chunks may come in any order)."""
    data = bytearray(b"?" * length)
    for ev in events:
        if isinstance(ev, ReadData):
            data[ev.offset - offset : ev.offset - offset + len(ev.data)] = ev.data
        elif isinstance(ev, ReadHole):
            data[ev.offset - offset : ev.offset - offset + ev.length] = bytes(ev.length)
    return bytes(data)


def test_our_client_against_qemu_nbd_structured(qemu_nbd: Path) -> None:
    client = ClientHandshake()
    client.structured_reply()
    client.set_meta_context("disk", ["base:allocation", "qemu:allocation-depth"])
    client.go("disk", [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION])
    sock, ready = _connect(qemu_nbd, client)
    session = ready.session
    assert session.export.size == 1 << 20 and session.export.description == "a disk"
    assert session.structured and session.flags & TransmissionFlag.SEND_DF
    assert sorted(session.contexts.values()) == ["base:allocation", "qemu:allocation-depth"]
    tx = ClientTransmission(session, leftover=ready.leftover)
    with sock:
        events = _roundtrip(sock, tx, Request(1, Cmd.READ, offset=0, length=1 << 20))
        assert any(isinstance(ev, ReadHole) for ev in events)  # qemu reads sparsely
        assert _assemble(events, 0, 1 << 20) == bytes(range(256)) * 256 + bytes(15 << 16)
        assert events[-1] == ReplyDone(1, 0)

        events = _roundtrip(sock, tx, Request(2, Cmd.BLOCK_STATUS, offset=0, length=1 << 20))
        by_name = {
            session.contexts[ev.context_id]: ev.extents
            for ev in events
            if isinstance(ev, BlockStatusReply)
        }
        assert by_name["base:allocation"][0] == (65536, 0)
        assert by_name["base:allocation"][1][1] == StateFlag.HOLE | StateFlag.ZERO
        assert by_name["qemu:allocation-depth"][0][1] == 1

        assert _roundtrip(sock, tx, Request(3, Cmd.WRITE, offset=4096, length=3,
                                            data=b"xyz")) == [ReplyDone(3, 0)]  # fmt: skip
        assert _roundtrip(sock, tx, Request(4, Cmd.FLUSH)) == [ReplyDone(4, 0)]
        assert _roundtrip(sock, tx, Request(5, Cmd.WRITE_ZEROES, length=4096)) == [
            ReplyDone(5, 0)
        ]
        assert _roundtrip(sock, tx, Request(6, Cmd.TRIM, offset=8192, length=4096)) == [
            ReplyDone(6, 0)
        ]
        events = _roundtrip(sock, tx, Request(7, Cmd.READ, offset=0, length=4099))
        assert _assemble(events, 0, 4099) == bytes(4096) + b"xyz"
        # An error reply from a real server: reading past the end.
        events = _roundtrip(sock, tx, Request(8, Cmd.READ, offset=1 << 20, length=1))
        assert events[-1] == ReplyDone(8, 22)
        sock.sendmsg(tx.send(Request(9, Cmd.DISC)))


def test_our_client_against_qemu_nbd_export_name(qemu_nbd: Path) -> None:
    client = ClientHandshake(no_zeroes=False)
    client.list_exports()
    client.export_name("disk")
    sock, ready = _connect(qemu_nbd, client)
    with sock:
        assert ready.session.export.size == 1 << 20 and not ready.session.structured
        tx = ClientTransmission(ready.session, leftover=ready.leftover)
        events = _roundtrip(sock, tx, Request(1, Cmd.READ, offset=256, length=256))
        assert events == [ReadData(1, 256, bytes(range(256))), ReplyDone(1, 0)]
        sock.sendmsg(tx.send(Request(2, Cmd.DISC)))
