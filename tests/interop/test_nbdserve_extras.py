"""Features qemu-nbd does not have, driven with real clients: pseudo-files, nbdkit-style
captive mode (--run), qemu-storage-daemon syntax with several exports, meta contexts on a
RAM disk. Skipped (cleanly) when the suite runs against qemu-nbd."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.interop._server import (
    ImageFactory,
    MiB,
    RunningServer,
    ServeFactory,
    free_tcp_port,
    nbdserve_argv,
)
from tests.interop._tools import nbdinfo_json, qemu_io, run

pytestmark = pytest.mark.usefixtures("nbdserve_only")

GiB = 1 << 30


def nbdserve(*args: str, expect_rc: int | None = 0, cwd: Path | None = None) -> Any:
    return run([*nbdserve_argv(), *args], expect_rc=expect_rc, timeout=90, cwd=cwd)


def extents(server: RunningServer, context: str = "base:allocation",
            uri: str | None = None) -> list[tuple[int, int, int]]:
    out = run(["nbdinfo", f"--map={context}", "--json", uri or server.uri()],
              server=server).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def flags_at(entries: list[tuple[int, int, int]], offset: int) -> int:
    for start, length, flags in entries:
        if start <= offset < start + length:
            return flags
    raise AssertionError(f"no extent covers {offset}: {entries}")


# -- pseudo-files ------------------------------------------------------------------------

def test_memory_pseudo_file_is_a_sparse_ram_disk(serve: ServeFactory) -> None:
    server = serve("memory:64M")
    export = nbdinfo_json(server)["exports"][0]
    assert export["export-size"] == 64 * MiB
    assert export["is_read_only"] is False
    assert export["can_zero"] is True
    qemu_io(server, "read -P 0 0 64M", "write -P 0x3e 1M 1M", "write -P 0x3f 4095 3",
            "read -P 0x3e 1M 1M", "read -P 0x3f 4095 3", "read -P 0 0 4095")
    # A second client sees the first one's data: the RAM disk lives as long as the server.
    qemu_io(server, "read -P 0x3e 1M 1M")
    entries = extents(server)
    assert sum(length for _, length, _ in entries) == 64 * MiB
    assert flags_at(entries, MiB) & 2 == 0            # written: not reported as zero
    assert flags_at(entries, 32 * MiB) & 2 == 2       # never written: reads as zero


def test_null_pseudo_file_reads_zeros_and_drops_writes(serve: ServeFactory) -> None:
    server = serve("null:1G")
    assert nbdinfo_json(server)["exports"][0]["export-size"] == GiB
    qemu_io(server, "write -P 0x55 0 64k", "read -P 0 0 64k", "read -P 0 1023M 1M")
    entries = extents(server)
    assert sum(length for _, length, _ in entries) == GiB
    assert all(flags & 2 for _, _, flags in entries), entries


@pytest.mark.parametrize("bad", ["memory:lots", "null:-1M"])
def test_bad_pseudo_file_sizes_are_clear_errors(bad: str, tmp_path: Path) -> None:
    result = nbdserve("-k", str(tmp_path / "s.sock"), bad, expect_rc=None, cwd=tmp_path)
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stderr
    assert bad.partition(":")[2] in result.stderr or bad in result.stderr, result.stderr


# -- captive mode ------------------------------------------------------------------------

def test_run_nbdinfo_against_a_memory_disk() -> None:
    result = nbdserve("--run", 'nbdinfo --json "$uri"', "memory:64M")
    info = json.loads(result.stdout)
    assert info["exports"][0]["export-size"] == 64 * MiB


@pytest.mark.parametrize("command", ["exit 0", "exit 3", "kill -TERM $$"])
def test_run_exit_status_matches_nbdkit(command: str) -> None:
    # nbdkit's captive mode is the reference: its exit status for the same command
    # (a signal-killed command gives 128+N).
    full = f'nbdinfo --size "$uri" >/dev/null && {command}'
    expected = run(["nbdkit", "-U", "-", "memory", "1M", "--run", full],
                   expect_rc=None).returncode
    assert expected in (0, 3, 143)
    nbdserve("--run", full, "memory:1M", expect_rc=expected)


def test_run_is_not_started_when_the_server_cannot_start() -> None:
    result = nbdserve("--run", "echo SHOULD-NOT-RUN", "-f", "raw", "/nonexistent/disk.img",
                      expect_rc=1)
    assert "SHOULD-NOT-RUN" not in result.stdout
    assert "/nonexistent/disk.img" in result.stderr and "Traceback" not in result.stderr


def test_run_propagates_a_client_failure() -> None:
    # A pattern check that fails inside the command makes nbdserve fail the same way.
    result = nbdserve("--run", 'qemu-io -f raw -c "read -P 0x01 0 4k" "$uri"', "memory:1M",
                      expect_rc=1)
    assert "Pattern verification failed" in result.stdout, result


def test_run_sets_the_nbdkit_variables() -> None:
    result = nbdserve("-x", "disk", "--run",
                      'printf "%s\\n" "$uri" "$nbd" "$unixsocket" "$exportname" "$port"',
                      "memory:1M")
    uri, nbd, unixsocket, exportname, port = result.stdout.split("\n")[:5]
    assert uri == f"nbd+unix:///disk?socket={unixsocket}"
    assert nbd == uri
    assert exportname == "disk"
    assert port == ""
    assert unixsocket.startswith("/")
    assert not os.path.exists(unixsocket), "the private socket outlived the server"


def test_run_with_parallel_copy_and_compare(make_image: ImageFactory) -> None:
    src = make_image(16 * MiB, {0: random.Random(5).randbytes(5 * MiB),
                                9 * MiB: random.Random(6).randbytes(3 * MiB)})
    nbdserve("--run", f'nbdcopy {src} "$uri" && qemu-img compare -f raw -F raw {src} "$uri"',
             "memory:16M")


def test_run_over_tcp_sets_port() -> None:
    port = free_tcp_port()
    result = nbdserve("-b", "127.0.0.1", "-p", str(port), "--run",
                      'printf "%s\\n" "$uri" "$port" && nbdinfo --size "$uri"', "memory:2M")
    uri, reported_port, size = result.stdout.split("\n")[:3]
    assert reported_port == str(port)
    assert uri.startswith("nbd://") and f":{port}/" in uri
    assert size == str(2 * MiB)


# -- qemu-storage-daemon syntax ----------------------------------------------------------

def test_storage_daemon_syntax_with_two_exports(start_raw: Any, make_image: ImageFactory,
                                                tmp_path: Path) -> None:
    disk0 = make_image(8 * MiB, {0: b"\x0d" * MiB})
    sock = tmp_path / "qsd.sock"
    server: RunningServer = start_raw([
        "--blockdev", f"driver=file,node-name=proto0,filename={disk0}",
        "--blockdev", "driver=raw,node-name=fmt0,file=proto0",
        "--blockdev", json.dumps({"driver": "memory", "node-name": "ram1", "size": 4 * MiB}),
        "--export", "type=nbd,id=e0,node-name=fmt0,name=disk0,writable=on,"
                    "description=The first disk",
        "--export", "type=nbd,id=e1,node-name=ram1,name=scratch,description=RAM scratch",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
    ], socket_path=sock, export_name="disk0")

    listing = nbdinfo_json(server, "--list")
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"disk0", "scratch"}
    assert exports["disk0"]["description"] == "The first disk"
    assert exports["scratch"]["description"] == "RAM scratch"
    assert exports["disk0"]["export-size"] == 8 * MiB
    assert exports["scratch"]["export-size"] == 4 * MiB
    assert exports["disk0"]["is_read_only"] is False
    assert exports["scratch"]["is_read_only"] is True  # writable defaults to off, as in QSD

    qemu_io(server, "read -P 0x0d 0 1M", "write -P 0x0e 2M 64k")
    qemu_io(server, "read -P 0 0 4M", uri=server.uri("scratch"), read_only=True)
    # Several clients at once: qemu-storage-daemon serves any number by default.
    run(["nbdcopy", server.uri("disk0"), str(tmp_path / "copy.img")], server=server)
    server.stop()
    data = disk0.read_bytes()
    assert data[2 * MiB:2 * MiB + 65536] == b"\x0e" * 65536
    assert (tmp_path / "copy.img").read_bytes() == data


def test_storage_daemon_syntax_over_tcp_with_allocation_depth(start_raw: Any) -> None:
    port = free_tcp_port()
    server: RunningServer = start_raw([
        "--blockdev", "driver=memory,node-name=m0,size=8M",
        "--export", "type=nbd,id=e0,node-name=m0,name=ram,writable=on,allocation-depth=on",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
    ], port=port, export_name="ram")
    info = run(["qemu-img", "info", "--output=json", "-f", "raw", server.uri()],
               server=server).stdout
    assert json.loads(info)["virtual-size"] == 8 * MiB
    export = nbdinfo_json(server)["exports"][0]
    assert "qemu:allocation-depth" in export["contexts"]
    qemu_io(server, "write -P 0x21 0 1M")
    depth = extents(server, "qemu:allocation-depth")
    assert sum(length for _, length, _ in depth) == 8 * MiB
    assert flags_at(depth, 0) >= 1


def test_storage_daemon_errors_name_the_problem(tmp_path: Path) -> None:
    cases = [
        (["--blockdev", "driver=memory,node-name=m0,size=1M",
          "--export", "type=nbd,id=e0,node-name=nope,name=x"], "nope"),
        (["--blockdev", "driver=nosuchdriver,node-name=m0",
          "--export", "type=nbd,id=e0,node-name=m0"], "nosuchdriver"),
        (["--blockdev", "{not json", "--export", "type=nbd,id=e0,node-name=m0"], "--blockdev"),
    ]
    for args, named in cases:
        result = nbdserve(*args, "--nbd-server", f"addr.type=unix,addr.path={tmp_path}/s",
                          expect_rc=None, cwd=tmp_path)
        assert result.returncode in (1, 2), (args, result)
        assert named in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr


# -- meta contexts on a RAM disk ---------------------------------------------------------

def test_allocation_depth_flag_on_memory_disk(serve: ServeFactory) -> None:
    server = serve("-A", "memory:16M")
    export = nbdinfo_json(server)["exports"][0]
    assert set(export["contexts"]) >= {"base:allocation", "qemu:allocation-depth"}
    qemu_io(server, "write -P 0x44 4M 1M")
    depth = extents(server, "qemu:allocation-depth")
    assert sum(length for _, length, _ in depth) == 16 * MiB
    assert flags_at(depth, 4 * MiB) >= 1
    base = extents(server)
    assert flags_at(base, 4 * MiB) & 2 == 0
